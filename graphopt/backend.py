"""The ``graphopt`` torch.compile backend.

``torch.compile(model, backend="graphopt", mode=..., options=...)`` hands each Dynamo graph to
:func:`graphopt_backend`, which

1. runs the passes (:func:`graphopt.passes.run_passes`) on a copy of the graph, recording a report;
2. compiles the rewritten graph with Inductor, exactly as ``backend="inductor"`` would (same mode,
   same Inductor options, AOTAutograd for training);
3. when the fused loss returns detached logits, wraps the compiled graph in
   :class:`AttachedLogitsGraph`, which gives them their gradient outside the graph;
4. when a rewrite depends on input values, returns a :class:`GuardedGraph` that checks the guards
   before every call and otherwise runs an :class:`ExactFallback`: the graph with every rewrite
   that needs no guard (the fused loss, packed attention), compiled by Inductor on first need;
5. when the graph returns an attention mask it proved, publishes the mask after every call for
   the graphs that receive it (:class:`PublishedMasks`, :mod:`graphopt.handoff`);
6. publishes the graph's report when the graph first runs (:class:`PublishedOnFirstCall`).

A graph with nothing to rewrite goes to Inductor unchanged. The wrappers that run at call time
live in :mod:`graphopt.runtime`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx as fx

from graphopt import inspection
from graphopt.options import split_options
from graphopt.runtime import (
    ExactFallback,
    GuardedGraph,
    PublishedMasks,
    PublishedOnFirstCall,
    ReceivedPackedGraph,
    RewrittenGraph,
    UnpaddedGraph,
    attach_logits,
)

log = logging.getLogger("graphopt")


def graphopt_backend(gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None, options: dict | None = None):
    """Dynamo backend entry point (registered as ``"graphopt"``)."""
    from graphopt.passes import run_passes

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
    fallback = _exact_fallback(gm, opts, report, inductor, ctx.memo) if report.changed and ctx.guards else None

    if not report.changed:
        compiled = inductor(gm, example_inputs)
    else:
        n_outputs = len(gm.graph.output_node().args[0])
        if ctx.unpad is not None:  # the padded fast graph is never run: the unpadded one replaces it
            report.after = inspection.module_code(ctx.unpad.module)
            fast = UnpaddedGraph(ctx.unpad, ctx.detached_logits, n_outputs, inductor, report.graph_id, fallback)
            reads = fast.lengths
        else:
            fast = attach_logits(inductor(work, example_inputs), ctx.detached_logits, n_outputs)
            reads = None
        first = _packed_version(gm, opts, report, inductor, ctx) if ctx.received_rewritten else None
        if ctx.guards:
            compiled = GuardedGraph(fast, fallback, ctx.guards, report.graph_id, reads=reads, first=first)
        else:
            compiled = RewrittenGraph(fast)
    if ctx.exports:
        compiled = PublishedMasks(compiled, ctx.exports)
    return PublishedOnFirstCall(compiled, report, opts.dump_dir)


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


def _exact_fallback(gm: fx.GraphModule, opts, report: inspection.GraphReport, inductor, memo: dict) -> ExactFallback:
    """The graph to run when a guard fails: ``gm`` with the rewrites that need no guard. The passes
    reuse what probing found for the fast graph (``memo``)."""
    from graphopt.passes import Variant, run_passes

    quiet = inspection.GraphReport(graph_id=report.graph_id, before=report.before, quiet=True)
    work, ctx = run_passes(gm, opts, quiet, variant=Variant.FALLBACK, memo=memo)
    if quiet.changed:
        kept = ", ".join(sorted(quiet.counts)) or "none"
        report.note(f"the exact fallback keeps the rewrites that need no guard ({kept})")
        return ExactFallback(work, ctx.detached_logits, len(gm.graph.output_node().args[0]), inductor, report.graph_id)
    return ExactFallback(gm, [], 0, inductor, report.graph_id)


def _packed_version(gm: fx.GraphModule, opts, report: inspection.GraphReport, inductor, ctx):
    """For a graph that drops a mask it receives (:mod:`graphopt.handoff`): the version that runs
    per-document attention when the mask is packed, as ``(guards, graph)`` for
    :class:`GuardedGraph`'s ``first``; None when its attention cannot be rewritten so."""
    from graphopt.passes import Variant, run_passes

    quiet = inspection.GraphReport(graph_id=report.graph_id, before=report.before, quiet=True)
    work, packed_ctx = run_passes(gm, opts, quiet, variant=Variant.RECEIVED_PACKED, memo=ctx.memo)
    if len(packed_ctx.received_rewritten) != 1:
        why = "; ".join(d.reason for d in quiet.declines if d.name == "varlen_attention")
        report.note(
            "when the mask this graph receives is packed (several documents per row), the exact masked "
            "path runs" + (f": {why}" if why else "")
        )
        return None
    n_outputs = len(gm.graph.output_node().args[0])
    module = ExactFallback(work, packed_ctx.detached_logits, n_outputs, inductor, report.graph_id, what="packed version")
    report.guards += [inspection.GuardRecord(g.name, g.description, list(g.rewrites)) for g in packed_ctx.guards]
    calls = sum(1 for r in quiet.rewrites if (r.name, r.rule) == ("varlen_attention", "sdpa_packed"))
    report.note(
        f"when the mask this graph receives is packed, a second fast graph runs its {calls} attention "
        "call(s) per document (varlen_attention, RoPE fused); compiled on first use"
    )
    return packed_ctx.guards, ReceivedPackedGraph(module, packed_ctx.received_rewritten[0])
