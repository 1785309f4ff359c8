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

A graph with nothing to rewrite goes to Inductor unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from graphopt import analysis, inspection
from graphopt.guards import GUARD_ADVICE, Guard, evaluate_guards
from graphopt.options import split_options

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
            fast = _attach_logits(inductor(work, example_inputs), ctx.detached_logits, n_outputs)
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


def _attach_logits(compiled, detached: list, n_outputs: int):
    """``compiled``, or :class:`AttachedLogitsGraph` around it when it returns detached logits."""
    return AttachedLogitsGraph(compiled, detached, n_outputs) if detached else compiled


class AttachedLogitsGraph:
    """Run the rewritten graph and attach the gradient of the logits it returns detached.

    The fused loss returns the logits without a gradient plus, as an extra output, the hidden states
    it read (see :mod:`graphopt.passes.fused_cross_entropy`). This restores the graph's original
    outputs: the logits get ``d logits / d (hidden, weight)`` as an autograd node of their own
    (:func:`~graphopt.ops.linear_cross_entropy.attach_logits_grad`), and the extra outputs go.
    """

    def __init__(self, compiled, detached: list, n_outputs: int):
        from graphopt.ops.linear_cross_entropy import attach_logits_grad  # the op module imports triton

        self.compiled = compiled
        self.detached = detached
        self.n_outputs = n_outputs
        self._attach = attach_logits_grad

    def __call__(self, *args):
        outputs = list(self.compiled(*args))
        for d in self.detached:
            scale = {} if d.logit_scale == 1.0 else {"logit_scale": d.logit_scale}
            logits = self._attach(outputs[d.positions[0]], outputs[d.hidden_position], args[d.weight_input], **scale)
            for position in d.positions:
                outputs[position] = logits
        return outputs[: self.n_outputs]


class PublishedOnFirstCall:
    """Publish a graph's report (log, ``capture()`` listeners, dumps) when the graph first runs.

    Dynamo sometimes throws a compiled graph away and traces the frame again (for instance when a
    symbolic float gets specialized while compiling); publishing at the first call keeps such a
    graph's rewrites and declines out of the report.
    """

    def __init__(self, compiled, report: inspection.GraphReport, dump_dir: str | None):
        self.compiled = compiled
        self.report = report
        self.dump_dir = dump_dir
        self._pending = True
        self._lock = threading.Lock()

    def __call__(self, *args):
        if self._pending:
            with self._lock:
                if self._pending:
                    inspection.publish(self.report, self.dump_dir)
                    self._pending = False
        return self.compiled(*args)


def _is_fake_call(args) -> bool:
    """Whether a compiled graph is being called with fake tensors: the DDP optimizer does that while
    it compiles, to get the next piece's example inputs. Such a call reads no data and counts for
    nothing."""
    return any(isinstance(a, FakeTensor) for a in args)


class PublishedMasks:
    """Publish the proven masks a graph returns (:mod:`graphopt.handoff`), after each call, so the
    graphs that receive them can drop them. A symbolic-size mask is published only at lengths its
    proof covers; a mask the graph received and returns passes its fact on."""

    def __init__(self, compiled, exports: list):
        self.compiled = compiled
        self.exports = exports

    def __call__(self, *args):
        outputs = self.compiled(*args)
        if _is_fake_call(args):
            return outputs
        from graphopt import handoff
        from graphopt.masks import MaskKind

        for export in self.exports:
            if export.proof is not None and not all(export.proof.conditions(args).values()):
                continue
            source = None if export.input_index is None else args[export.input_index]
            if export.kind == MaskKind.RECEIVED:
                fact = handoff.lookup(source)
                if fact is None:
                    continue
                kind, source = fact.kind, fact.source
            else:
                kind = export.kind
            for position in export.positions:
                handoff.publish(outputs[position], kind, source)
        return outputs


class ReceivedPackedGraph:
    """The packed version of a graph that receives its mask (see :func:`_packed_version`): called
    with the graph's arguments plus the document boundaries of the received mask, computed once
    per mask on the device (:meth:`graphopt.handoff.MaskFact.cu_seqlens`)."""

    def __init__(self, module: ExactFallback, mask_index: int):
        self.module = module
        self.mask_index = mask_index

    def __call__(self, *args):
        from graphopt import handoff

        mask = args[self.mask_index]
        fact = handoff.lookup(mask)  # the guards held: it is known and packed
        inspection.record_runtime("received_packed")
        return self.module(*args, fact.cu_seqlens(mask.shape[0]))


class RewrittenGraph:
    """A rewritten graph that needs no guard; counts its calls as ``fast_path`` in the report."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        if not _is_fake_call(args):
            inspection.record_runtime("fast_path")
        return self.compiled(*args)


class ExactFallback:
    """The graph a :class:`GuardedGraph` runs when a guard fails, compiled by Inductor on first use.

    It is compiled with ``torch.compile(backend=<the same Inductor>)`` on a GraphModule built at
    first use: Dynamo skips the code of GraphModules generated while it compiles a frame, so
    compiling the one Dynamo handed us would silently run it eagerly. Dynamo then guards and
    reuses it like any compiled function (one compile per shape regime, not per batch).
    """

    def __init__(self, module: fx.GraphModule, detached: list, n_outputs: int, inductor, graph_id: int, what: str = "exact fallback"):
        self.module = module
        self.what = what
        self.detached = detached
        self.n_outputs = n_outputs
        self.inductor = inductor
        self.graph_id = graph_id
        self._compiled = None
        self._lock = threading.Lock()

    def __call__(self, *args):
        return self.compiled(*args)

    @property
    def compiled(self):
        with self._lock:
            if self._compiled is None:
                start = time.perf_counter()
                # Built now, outside Dynamo's compile: fresh code objects, which Dynamo traces.
                compiled = torch.compile(analysis.copy_graph_module(self.module), backend=self.inductor)
                self._compiled = _attach_logits(compiled, self.detached, self.n_outputs)
                log.info("graph %d: %s prepared in %.2fs (compiles on first call)", self.graph_id, self.what, time.perf_counter() - start)
            return self._compiled


class GuardedGraph:
    """Run the rewritten graph when every guard holds, the :class:`ExactFallback` otherwise.

    A failed condition is logged once per graph with advice on how to reach the fast path; only
    the condition that is the cause is reported (see :func:`~graphopt.guards.evaluate_guards`).

    ``reads``: for a fast graph that needs values on the host too (the unpadded graph's row
    lengths), ``reads(args)`` gives them as a device tensor; they come in the guards' one read and
    the fast graph is called with ``host_values=`` them.

    ``first``: ``(guards, graph)``, another fast graph tried first, when its own guards hold (the
    packed version of a graph that receives its mask; its guards read no device data).
    """

    def __init__(self, fast, fallback: ExactFallback, guards: list[Guard], graph_id: int, *, reads=None, first=None):
        self.fast = fast
        self.fallback = fallback
        self.guards = guards
        self.graph_id = graph_id
        self.reads = reads
        self.first = first
        self._warned: set[str] = set()

    def __call__(self, *args):
        if _is_fake_call(args):  # shapes only: the fast graph's outputs have the fallback's metadata
            return self.fast(*args)
        if self.first is not None and evaluate_guards(self.first[0], args).held:
            inspection.record_runtime("fast_path")
            return self.first[1](*args)
        result = evaluate_guards(self.guards, args, also_read=None if self.reads is None else self.reads(args))
        if result.held:
            inspection.record_runtime("fast_path")
            extra = {} if self.reads is None else {"host_values": result.also_read}
            return self.fast(*args, **extra)
        inspection.record_runtime("fallback")
        for name in result.failed:
            inspection.record_runtime(f"failed:{name}")
        self._warn(result.failed)
        return self.fallback(*args)

    def _warn(self, failed: list[str]) -> None:
        new = [name for name in failed if name not in self._warned]
        if not new:
            return
        self._warned.update(new)
        advice = " ".join(GUARD_ADVICE.get(name, name) for name in new)
        log.warning("graphopt: graph %d runs its exact masked path for this batch: %s", self.graph_id, advice)


class UnpaddedGraph:
    """The fast path of a right-padded batch, run on its real tokens only
    (:mod:`graphopt.passes.unpad`): builds the packing indices from the attention mask, then runs
    the unpadded graph, compiled by Inductor on first use. The packed length is marked dynamic, so
    batches of other real-token counts reuse the compilation."""

    def __init__(self, plan, detached: list, n_outputs: int, inductor, graph_id: int, shapes_only):
        self.plan = plan
        self.module = ExactFallback(plan.module, detached, n_outputs, inductor, graph_id, what="unpadded graph")
        self.graph_id = graph_id
        self.shapes_only = shapes_only  # the padded graph that answers calls with fake tensors

    def lengths(self, args) -> torch.Tensor:
        """The real-token count of each row, on the device (read with the guards)."""
        return (args[self.plan.mask_input] != 0).sum(-1)

    def __call__(self, *args, host_values: list[int] | None = None):
        if _is_fake_call(args):  # no data to pack: the padded graph has the same output metadata
            return self.shapes_only(*args)
        from graphopt.passes.unpad import packing_indices

        lengths = self.lengths(args).tolist() if host_values is None else host_values
        extra, n_real, packed = packing_indices(args[self.plan.mask_input], lengths, self.plan.bucket)
        for name in ("gather", "positions", "scatter"):
            torch._dynamo.maybe_mark_dynamic(extra[name], 0)
        padded = args[self.plan.mask_input].numel()
        inspection.record_runtime("unpad")
        inspection.record_runtime("unpad_tokens_saved", padded - packed)
        inspection.record_runtime("unpad_bucket_waste", packed - n_real)
        return self.module(*args, extra["gather"], extra["positions"], extra["cu_seqlens"], extra["scatter"])
