"""The ``graphopt`` torch.compile backend.

``torch.compile(model, backend="graphopt", mode=..., options=...)`` hands each Dynamo graph to
:func:`graphopt_backend`, which

1. runs the passes (:mod:`graphopt.passes`) on a copy of the graph, recording a report;
2. compiles the rewritten graph with Inductor, exactly as ``backend="inductor"`` would (same mode,
   same Inductor options, AOTAutograd for training);
3. when the fused loss returns detached logits, wraps the compiled graph in
   :class:`AttachedLogitsGraph`, which gives them their gradient outside the graph;
4. when a rewrite depends on input values, returns a :class:`GuardedGraph` that checks the guards
   before every call and runs the original graph, compiled by Inductor on first need, when they
   fail.

A graph with nothing to rewrite goes to Inductor unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch
import torch.fx as fx

from graphopt import inspection
from graphopt.guards import GUARD_ADVICE, Guard, evaluate_guards
from graphopt.options import split_options

log = logging.getLogger("graphopt")


def graphopt_backend(gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None, options: dict | None = None):
    """Dynamo backend entry point (registered as ``"graphopt"``)."""
    opts, inductor_options = split_options(options)
    inductor = torch._TorchCompileInductorWrapper(mode, inductor_options, None)

    from graphopt.passes import PassContext, enabled_passes

    report = inspection.new_graph_report(gm.code)
    work = fx.GraphModule(gm, _copy_graph(gm.graph))
    ctx = PassContext(opts, report)
    start = time.perf_counter()
    for p in enabled_passes(opts):
        p.apply(work, ctx)
        work.graph.lint()
    work.recompile()
    report.pass_seconds = time.perf_counter() - start
    report.after = work.code if report.changed else report.before
    report.guards = [inspection.GuardRecord(g.name, g.description, list(g.rewrites)) for g in ctx.guards]
    inspection.publish(report, opts.dump_dir)

    if not report.changed:
        return inductor(gm, example_inputs)
    fast = inductor(work, example_inputs)
    if ctx.detached_logits:
        n_outputs = len(gm.graph.find_nodes(op="output")[0].args[0])
        fast = AttachedLogitsGraph(fast, ctx.detached_logits, n_outputs)
    if not ctx.guards:
        return fast
    return GuardedGraph(fast, gm, ctx.guards, inductor, report.graph_id)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


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
            logits = self._attach(outputs[d.positions[0]], outputs[d.hidden_position], args[d.weight_input])
            for position in d.positions:
                outputs[position] = logits
        return outputs[: self.n_outputs]


class GuardedGraph:
    """Run the rewritten graph when every guard holds, the original graph otherwise.

    The original is compiled lazily, with Inductor and the same options, the first time a call
    fails a guard, and reused after that: a run of failing batches does not recompile. A failed
    condition is logged once per graph with advice on how to reach the fast path.
    """

    def __init__(self, fast, original: fx.GraphModule, guards: list[Guard], inductor, graph_id: int):
        self.fast = fast
        self.original = original
        self.guards = guards
        self.inductor = inductor
        self.graph_id = graph_id
        self._fallback = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, *args):
        failed = evaluate_guards(self.guards, args)
        if not failed:
            inspection.record_runtime("fast_path")
            return self.fast(*args)
        inspection.record_runtime("fallback")
        for name in failed:
            inspection.record_runtime(f"failed:{name}")
        self._warn(failed)
        return self.fallback(*args)

    @property
    def fallback(self):
        with self._lock:
            if self._fallback is None:
                start = time.perf_counter()
                self._fallback = torch.compile(self.original, backend=self.inductor)
                log.info("graph %d: exact fallback prepared in %.2fs (compiles on first call)", self.graph_id, time.perf_counter() - start)
            return self._fallback

    def _warn(self, failed: list[str]) -> None:
        new = [name for name in failed if name not in self._warned]
        if not new:
            return
        self._warned.update(new)
        advice = " ".join(GUARD_ADVICE.get(name, name) for name in new)
        log.warning("graphopt: graph %d runs its exact masked path for this batch: %s", self.graph_id, advice)
