"""The ``graphopt`` torch.compile backend.

``torch.compile(model, backend="graphopt", mode=..., options=...)`` hands each Dynamo graph to
:func:`graphopt_backend`, which

1. runs the passes (:func:`graphopt.passes.run_passes`) on a copy of the graph, recording a report:
   the fast version, with every rewrite;
2. compiles it with Inductor, exactly as ``backend="inductor"`` would (same mode, same Inductor
   options, AOTAutograd for training), wrapped in the adapters its rewrites registered
   (:class:`graphopt.runtime.AdaptedGraph`);
3. when a rewrite depends on input values (it registered guards), also builds the exact
   fallback, the graph with only the rewrites that need no guard, and, for a graph that drops a
   mask it receives, the version that runs that mask's documents separately, and one per sliding
   window that earlier graphs publish masks with (:func:`graphopt.handoff.expected_windows`); all
   are compiled on first need. A :class:`graphopt.runtime.GuardedDispatch` chooses per call;
4. publishes the graph's report when the graph first runs (:class:`graphopt.runtime.PublishedOnFirstCall`).

A graph with nothing to rewrite goes to Inductor unchanged. What runs at call time lives in
:mod:`graphopt.runtime`; "How a call flows" in ``docs/design.md`` walks through one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx as fx

from graphopt import inspection
from graphopt.options import split_options
from graphopt.runtime import AdaptedGraph, GuardedDispatch, LazyGraph, PublishedOnFirstCall, Version

log = logging.getLogger("graphopt")


def graphopt_backend(gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None, options: dict | None = None):
    """Dynamo backend entry point (registered as ``"graphopt"``)."""
    from graphopt.passes import Variant, run_passes

    opts, inductor_options = split_options(options)
    inductor = _inductor(mode, inductor_options)
    report = inspection.new_graph_report(inspection.module_code(gm))
    _note_graph_breaks(report)
    if _is_ddp_piece(gm):
        report.note(
            "this graph is one piece of a graph Dynamo's DDP optimizer split at gradient buckets: a mask "
            "built in one piece is dropped in the next at run time, but the labels live in the last "
            "piece, so a padded batch keeps its mask unless padded_outputs_unused=True. Set "
            "torch._dynamo.config.optimize_ddp = False: graphopt then rewrites the whole graph and "
            "splits it at DDP's buckets itself."
        )
    work, ctx = run_passes(gm, opts, report)
    report.after = inspection.module_code(work) if report.changed else report.before
    report.guards = [inspection.GuardRecord(g.name, g.description, list(g.rewrites)) for g in ctx.guards]
    if not report.changed:
        return PublishedOnFirstCall(inductor(gm, example_inputs), report, opts.dump_dir)

    n_args = len(gm.graph.find_nodes(op="placeholder"))
    if any(a.input_names for a in ctx.adapters):  # no example values for the inputs it adds
        compiled = LazyGraph(work, inductor, report.graph_id, "fast graph")
    else:
        compiled = inductor(work, example_inputs)
    fast = AdaptedGraph(compiled, ctx.adapters, work, n_args)
    versions, fallback = [Version(ctx.guards, fast)], None
    if ctx.guards:
        fallback = _version(gm, opts, report, inductor, ctx, Variant.FALLBACK)
        if ctx.received_rewritten:
            from graphopt import handoff

            received = [(Variant.RECEIVED_PACKED, None)] + [(Variant.RECEIVED_WINDOWED, w) for w in handoff.expected_windows()]
            for variant, window in reversed(received):  # windowed versions first, then packed, then fast
                version = _version(gm, opts, report, inductor, ctx, variant, window)
                if version is not None:
                    versions.insert(0, version)
        fallback = fallback.graph
    shapes_only = fallback if fast.adds_inputs else fast  # answers calls with fake tensors
    dispatch = GuardedDispatch(versions, fallback, report.graph_id, shapes_only=shapes_only)
    return PublishedOnFirstCall(dispatch, report, opts.dump_dir)


def _note_graph_breaks(report: inspection.GraphReport) -> None:
    """Note in ``report`` the graph breaks Dynamo recorded since the previous graph, with the fix
    of each known cause (warned once per cause), and a Dynamo graphopt could not hook."""
    from graphopt import tracing

    for reason in tracing.new_graph_breaks():
        report.graph_breaks.append(reason)
        fix = tracing.advice(reason)
        if fix is not None:
            report.note(f"Dynamo split the step before this graph ({reason}): {fix}")
            tracing.warn_once(reason)
    problem = tracing.warn_unsupported_versions_once()
    if problem is not None:
        report.note(problem)
    if tracing.install_failure is not None:
        report.note(f"checkpointed layers of transformers >= 5.25 may fall out of the graph: {tracing.install_failure}")


def _inductor(mode: str | None, inductor_options: dict):
    """Inductor, as ``backend="inductor"`` compiles. Under DDP with Dynamo's own DDP optimizer
    turned off (``torch._dynamo.config.optimize_ddp = False``), each graph graphopt compiles (the
    rewritten one, the exact fallback) is split at DDP's gradient buckets first, by the same
    ``DDPOptimizer`` Dynamo would use, so communication still overlaps the backward: the passes see
    the whole graph (one guard reads the attention mask and the labels before any piece runs)."""
    inductor = torch._TorchCompileInductorWrapper(mode, inductor_options, None)
    ddp = _active_ddp_module()
    if ddp is None or torch._dynamo.utils.get_optimize_ddp_mode() != "no_optimization":
        return inductor
    from torch._dynamo.backends.distributed import DDPOptimizer

    def bucketed(gm: fx.GraphModule, example_inputs):
        return DDPOptimizer(bucket_bytes_cap=ddp.bucket_bytes_cap, backend_compile_fn=inductor).compile_fn(gm, example_inputs)

    return bucketed


def _active_ddp_module():
    """The ``DistributedDataParallel`` module whose forward is being compiled, or None."""
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return get() if get is not None else None


def _is_ddp_piece(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a piece of a graph split by Dynamo's DDP optimizer."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return "DDPOptimizer" in str(getattr(reason, "reason", ""))


def _version(
    gm: fx.GraphModule, opts, report: inspection.GraphReport, inductor, ctx, variant, window: int | None = None
) -> Version | None:
    """Another version of ``gm`` (:class:`graphopt.passes.Variant`; ``window``: the received-windowed
    version's), compiled on first call, with the guards it needs; the passes reuse what probing
    found for the fast graph (``ctx.memo``). What it keeps goes into ``report``'s notes (and its
    guards into ``report.guards``). None for a received version whose attention cannot be
    rewritten so."""
    from graphopt.passes import Variant, run_passes

    quiet = inspection.GraphReport(graph_id=report.graph_id, before=report.before, quiet=True)
    work, version_ctx = run_passes(gm, opts, quiet, variant=variant, memo=ctx.memo, received_window=window)
    n_args = len(gm.graph.find_nodes(op="placeholder"))
    if variant is Variant.FALLBACK:
        if not quiet.changed:
            work, version_ctx.adapters = gm, []
        else:
            kept = ", ".join(sorted(quiet.counts)) or "none"
            report.note(f"the exact fallback keeps the rewrites that need no guard ({kept})")
        return Version([], AdaptedGraph(LazyGraph(work, inductor, report.graph_id, "exact fallback"), version_ctx.adapters, work, n_args))
    which = "packed (several documents per row)" if window is None else f"a sliding mask of window {window}"
    if len(version_ctx.received_rewritten) != 1:
        why = "; ".join(d.reason for d in quiet.declines if d.name == "varlen_attention")
        report.note(f"when the mask this graph receives is {which}, the exact masked path runs" + (f": {why}" if why else ""))
        return None
    report.guards += [inspection.GuardRecord(g.name, g.description, list(g.rewrites)) for g in version_ctx.guards]
    calls = sum(1 for r in quiet.rewrites if r.name == "varlen_attention")
    how = "per document" if window is None else f"per document with the window of {window}"
    report.note(
        f"when the mask this graph receives is {which}, another fast graph runs its {calls} attention "
        f"call(s) {how} (varlen_attention); compiled on first use"
    )
    module = LazyGraph(work, inductor, report.graph_id, "packed version" if window is None else f"window-{window} version")
    return Version(version_ctx.guards, AdaptedGraph(module, version_ctx.adapters, work, n_args))
