"""What runs when a graph graphopt compiled is called.

A rewrite may change its graph's *calling convention*: the inputs the graph takes, the outputs it
returns, what must happen around each call. Each such change is an :class:`Adapter`, registered
by the pass that makes it, next to its rewrite (:meth:`graphopt.passes.PassContext.adapt`):

========================================  ==========================================================
adapter (pass)                            change to the calling convention
========================================  ==========================================================
``AttachLogits`` (fused_cross_entropy)    logits returned detached + the hidden states they came from:
                                          the logits get their gradient, the extra output goes
``PublishMasks`` (mask_elision)           after a call, the proven masks the graph returns are
                                          published for the graphs that receive them
``ReceivedBoundaries`` (varlen_attention) one more input: the document boundaries of a received
                                          packed mask
``PackTokens`` (unpad)                    four more inputs: the packing indices of a right-padded
                                          batch, built from row lengths read with the guards
========================================  ==========================================================

:func:`graphopt.backend.graphopt_backend` builds, for each Dynamo graph, from the inside out:

1. for each version of the graph the passes built (:class:`graphopt.passes.Variant`: the fast
   graph, the exact fallback, the received-packed version) an :class:`AdaptedGraph`: the compiled
   graph (the fast one compiled now, the others by a :class:`LazyGraph` on first call) run through
   its adapters;
2. a :class:`GuardedDispatch`: each call runs the first version whose guards hold, the exact
   fallback when none does; a call with fake tensors (:func:`is_fake_call`) runs the version
   with Dynamo's calling convention for shapes only, reading no guard and publishing nothing;
3. :class:`PublishedOnFirstCall`, outermost: the graph's report is published when it first runs.

A graph with nothing to rewrite is Inductor's compiled graph inside :class:`PublishedOnFirstCall`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from graphopt import analysis, inspection
from graphopt.guards import GUARD_ADVICE, Guard, evaluate_guards

log = logging.getLogger("graphopt")


class Adapter:
    """One change a rewrite makes to its graph's calling convention.

    A subclass overrides what it changes; the defaults change nothing. :class:`AdaptedGraph`
    calls the hooks of its adapters around every call:

    - :meth:`reads` and :meth:`inputs` in registration order (the pass that appends placeholders
      registers its adapter at the same time, so the extra arguments line up);
    - :meth:`outputs` in reverse order, each undoing its own change to the outputs;
    - :meth:`after` in registration order, last.

    A call with fake tensors (shapes only) runs :meth:`outputs` alone: it must compute with
    tensors only, never read values on the host or record anything.

    Attributes:
        input_names: the placeholders the rewrite appended to the graph, in order; the arguments
            :meth:`inputs` supplies fill them.
    """

    input_names: tuple[str, ...] = ()

    def reads(self, args: Sequence) -> torch.Tensor | None:
        """A 1-D integer device tensor whose values :meth:`inputs` needs on the host, or None.
        It is read together with the guards, in their one device-to-host transfer."""
        return None

    def inputs(self, args: Sequence, host: list[int] | None) -> tuple:
        """The extra arguments of this call, one per name of :attr:`input_names`. ``host``: the
        values of :meth:`reads`, on the host."""
        return ()

    def outputs(self, args: Sequence, outputs: list) -> list:
        """The outputs the caller sees, from the outputs the compiled graph returned."""
        return outputs

    def after(self, args: Sequence, outputs: list) -> None:
        """Side effects of a real call (publication, counters), given the fixed-up outputs."""


class AdaptedGraph:
    """A compiled version of a graph, run through its adapters (see :class:`Adapter`).

    ``module`` is the FX graph ``compiled`` runs; its placeholders must be Dynamo's ``n_args``
    inputs followed by exactly the adapters' :attr:`~Adapter.input_names`, in order. That is
    checked here, when the version is built: an adapter that does not match its rewrite is an
    error at compile time, never a silently shifted argument.
    """

    def __init__(self, compiled, adapters: Sequence[Adapter], module: fx.GraphModule, n_args: int):
        names = [n.name for n in module.graph.find_nodes(op="placeholder")]
        expected = [name for a in adapters for name in a.input_names]
        if names[n_args:] != expected:
            raise RuntimeError(
                f"graphopt internal error: the graph's extra inputs {names[n_args:]} do not match its "
                f"adapters' {expected}; please report this with TORCH_LOGS=+graphopt output"
            )
        self.compiled = compiled
        self.adapters = list(adapters)
        self.adds_inputs = bool(expected)

    def reads(self, args: Sequence) -> HostReads | None:
        """What the adapters need on the host for this call (None: nothing)."""
        parts = [a.reads(args) for a in self.adapters]
        if all(p is None for p in parts):
            return None
        return HostReads(
            torch.cat([p.reshape(-1).to(torch.int64) for p in parts if p is not None]),
            [0 if p is None else p.numel() for p in parts],
        )

    def __call__(self, *args, host_values: list[list[int] | None] | None = None):
        """A real call. ``host_values``: per adapter, the values of its :meth:`~Adapter.reads`
        read with the guards (:meth:`HostReads.split`); read here when not given."""
        if host_values is None:
            request = self.reads(args)
            host_values = [None] * len(self.adapters) if request is None else request.split(request.values.tolist())
        extra: list = []
        for adapter, host in zip(self.adapters, host_values):
            extra.extend(adapter.inputs(args, host))
        outputs = self._outputs(args, self.compiled(*args, *extra))
        for adapter in self.adapters:
            adapter.after(args, outputs)
        return outputs

    def shapes(self, *args):
        """A call with fake tensors: the outputs' metadata, nothing read or recorded. Only a
        version that adds no inputs can answer it (there are no values to build them from)."""
        assert not self.adds_inputs, "a version with extra inputs cannot answer a shapes-only call"
        return self._outputs(args, self.compiled(*args))

    def _outputs(self, args: Sequence, outputs) -> list:
        outputs = list(outputs)
        for adapter in reversed(self.adapters):
            outputs = adapter.outputs(args, outputs)
        return outputs


class LazyGraph:
    """An FX graph compiled by Inductor on its first call (the exact fallback, the unpadded graph,
    the received-packed version: graphs that may never run, or whose extra inputs Dynamo has no
    example values for).

    It is compiled with ``torch.compile(backend=<the same Inductor>)`` on a GraphModule built at
    first use: Dynamo skips the code of GraphModules generated while it compiles a frame, so
    compiling the one Dynamo handed us would silently run it eagerly. Dynamo then guards and
    reuses it like any compiled function (one compile per shape regime, not per batch).
    """

    def __init__(self, module: fx.GraphModule, inductor, graph_id: int, what: str):
        self.module = module
        self.inductor = inductor
        self.graph_id = graph_id
        self.what = what
        self._compiled = _Once(self._compile)

    def __call__(self, *args):
        return self.compiled(*args)

    @property
    def compiled(self):
        return self._compiled.get()

    def _compile(self):
        start = time.perf_counter()
        # Built now, outside Dynamo's compile: fresh code objects, which Dynamo traces.
        compiled = torch.compile(analysis.copy_graph_module(self.module), backend=self.inductor)
        log.info("graph %d: %s prepared in %.2fs (compiles on first call)", self.graph_id, self.what, time.perf_counter() - start)
        return compiled


class _Once:
    """The value of ``make()``, computed on first use, once, whichever thread asks first."""

    def __init__(self, make):
        self._make = make
        self._value = None
        self._done = False
        self._lock = threading.Lock()

    def get(self):
        if not self._done:
            with self._lock:
                if not self._done:
                    self._value = self._make()
                    self._done = True
        return self._value


@dataclass
class HostReads:
    """The values a version's adapters need on the host: one tensor, read with the guards."""

    values: torch.Tensor  # 1-D int64, the adapters' reads concatenated
    sizes: list[int]  # per adapter, how many of them are its own (0: it reads nothing)

    def split(self, host: list[int]) -> list[list[int] | None]:
        """``host`` (the values, read) cut back into each adapter's part."""
        parts: list[list[int] | None] = []
        start = 0
        for n in self.sizes:
            parts.append(host[start : start + n] if n else None)
            start += n
        return parts


@dataclass
class Version:
    """A version of a graph and the guards under which it computes what the original does."""

    guards: list[Guard]
    graph: AdaptedGraph


def is_fake_call(args) -> bool:
    """Whether a compiled graph is being called with fake tensors: the DDP optimizer does that while
    it compiles, to get the next piece's example inputs. Such a call reads no data and counts for
    nothing."""
    return any(isinstance(a, FakeTensor) for a in args)


# Conditions that only say a version is not the one for this kind of input (a received mask of
# another kind or window), not why the batch cannot take a fast path.
SELECTING_CONDITIONS = frozenset({"same_window", "packed", "causal_kind"})


class GuardedDispatch:
    """Run the first version whose guards hold, else the exact fallback.

    ``versions`` are tried in order (the received-windowed and received-packed versions, whose
    guards read no device data of their own, before the fast graph). A version's guards and its
    adapters' host values come in one device-to-host read. Each call is counted: ``fast_path``, or
    ``fallback`` with the failed conditions (``failed:<condition>``) of the first version whose
    failure is not only a :data:`SELECTING_CONDITIONS` one (the version meant for this batch), else
    of the last; a failed condition is logged once per graph with advice on how to reach the fast
    path; only the condition that is the cause is reported (see
    :func:`~graphopt.guards.evaluate_guards`).

    A call with fake tensors goes to ``shapes_only``, a version with Dynamo's calling convention.
    """

    def __init__(self, versions: Sequence[Version], fallback: AdaptedGraph | None, graph_id: int, *, shapes_only: AdaptedGraph):
        if fallback is None and any(v.guards for v in versions):
            raise ValueError("a version with guards needs an exact fallback")
        self.versions = list(versions)
        self.fallback = fallback
        self.graph_id = graph_id
        self.shapes_only = shapes_only
        self._warned: set[str] = set()

    def __call__(self, *args):
        if is_fake_call(args):
            return self.shapes_only.shapes(*args)
        failed: list[str] | None = None
        for version in self.versions:
            request = version.graph.reads(args)
            result = evaluate_guards(version.guards, args, also_read=None if request is None else request.values)
            if result.held:
                inspection.record_runtime("fast_path")
                host = None if request is None else request.split(result.also_read)
                return version.graph(*args, host_values=host)
            if failed is None or set(failed) <= SELECTING_CONDITIONS:
                failed = result.failed  # the first version meant for this batch says why
        inspection.record_runtime("fallback")
        for name in failed or ():
            inspection.record_runtime(f"failed:{name}")
        self._warn(failed)
        return self.fallback(*args)

    def _warn(self, failed: list[str]) -> None:
        new = [name for name in failed if name not in self._warned]
        if not new:
            return
        self._warned.update(new)
        advice = " ".join(GUARD_ADVICE.get(name, name) for name in new)
        log.warning("graphopt: graph %d runs its exact masked path for this batch: %s", self.graph_id, advice)


class PublishedOnFirstCall:
    """Publish a graph's report (log, ``capture()`` listeners, dumps) when the graph first runs.

    Dynamo sometimes throws a compiled graph away and traces the frame again (for instance when a
    symbolic float gets specialized while compiling); publishing at the first call keeps such a
    graph's rewrites and declines out of the report.
    """

    def __init__(self, compiled, report: inspection.GraphReport, dump_dir: str | None):
        self.compiled = compiled
        self.report = report
        self._published = _Once(lambda: inspection.publish(report, dump_dir))

    def __call__(self, *args):
        self._published.get()
        return self.compiled(*args)
