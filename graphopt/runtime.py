"""What runs when a graph graphopt compiled is called: the wrappers around the compiled graphs.

:func:`graphopt.backend.graphopt_backend` builds, for each Dynamo graph, a stack of these, from the
inside out:

1. the compiled rewritten graph, or :class:`UnpaddedGraph` (a right-padded batch on its real
   tokens), each wrapped in :class:`AttachedLogitsGraph` when the fused loss returns detached logits;
2. :class:`GuardedGraph` when a rewrite depends on input values (fast graph, or an
   :class:`ExactFallback` compiled on first need), else :class:`RewrittenGraph`;
3. :class:`PublishedMasks` when the graph returns a mask it proved (:mod:`graphopt.handoff`);
4. :class:`PublishedOnFirstCall`, outermost: the graph's report is published when it first runs.

A call with fake tensors (the DDP optimizer's shape call, :func:`is_fake_call`) reads no data:
guards are not evaluated, nothing is published or counted.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from graphopt import analysis, inspection
from graphopt.guards import GUARD_ADVICE, Guard, evaluate_guards

log = logging.getLogger("graphopt")


def attach_logits(compiled, detached: list, n_outputs: int):
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


def is_fake_call(args) -> bool:
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
        if is_fake_call(args):
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
    """The packed version of a graph that receives its mask (see :func:`graphopt.backend._packed_version`): called
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
        if not is_fake_call(args):
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
                self._compiled = attach_logits(compiled, self.detached, self.n_outputs)
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
        if is_fake_call(args):  # shapes only: the fast graph's outputs have the fallback's metadata
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
        if is_fake_call(args):  # no data to pack: the padded graph has the same output metadata
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
