"""The call-time wrappers of :mod:`graphopt.runtime`, with stub callables: no compile, milliseconds.

What each test pins: a failed guard runs the fallback (counted, the cause logged once), a call with
fake tensors goes to the fast graph without reading a guard, ``first`` runs when its own guards
hold, host values read with the guards reach the fast graph, a guard-free graph counts its calls,
a report is published on the first call only, and published masks reach the handoff registry.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import graphopt
from graphopt import handoff, inspection, runtime
from graphopt.guards import Guard
from graphopt.masks import MaskKind
from graphopt.passes import MaskExport


class Recorder:
    """A stub graph: records its calls and returns a marker."""

    def __init__(self, name: str):
        self.name, self.calls = name, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return [self.name]


def _guard(holds: bool, name: str = "right_padded") -> Guard:
    return Guard(name="g", fn=lambda x: {name: torch.tensor(holds)}, input_indices=(0,), description="stub")


def test_guards_that_hold_run_the_fast_graph_and_count_it():
    fast, fallback = Recorder("fast"), Recorder("fallback")
    graph = runtime.GuardedGraph(fast, fallback, [_guard(True)], graph_id=0)
    with graphopt.capture() as report:
        assert graph(torch.ones(2)) == ["fast"]
    assert not fallback.calls and report.runtime == {"fast_path": 1}


def test_a_failed_guard_runs_the_fallback_counts_the_cause_and_warns_once(caplog):
    fast, fallback = Recorder("fast"), Recorder("fallback")
    graph = runtime.GuardedGraph(fast, fallback, [_guard(False)], graph_id=7)
    with graphopt.capture() as report, caplog.at_level("WARNING", logger="graphopt"):
        assert graph(torch.ones(2)) == ["fallback"]
        assert graph(torch.ones(2)) == ["fallback"]
    assert not fast.calls
    assert report.runtime == {"fallback": 2, "failed:right_padded": 2}
    assert len([r for r in caplog.records if "graph 7 runs its exact masked path" in r.getMessage()]) == 1


def test_a_fake_call_reads_no_guard_and_counts_nothing():
    fast, fallback = Recorder("fast"), Recorder("fallback")

    def never(x):
        raise AssertionError("a guard was read during a fake call")

    graph = runtime.GuardedGraph(fast, fallback, [Guard(name="g", fn=never, input_indices=(0,), description="")], graph_id=0)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    with graphopt.capture() as report:
        assert graph(fake) == ["fast"]
    assert report.runtime == {}


def test_first_runs_when_its_guards_hold_and_the_main_guards_otherwise():
    fast, fallback, packed = Recorder("fast"), Recorder("fallback"), Recorder("packed")
    holds = runtime.GuardedGraph(fast, fallback, [_guard(True)], 0, first=([_guard(True)], packed))
    assert holds(torch.ones(2)) == ["packed"]
    fails = runtime.GuardedGraph(fast, fallback, [_guard(True)], 0, first=([_guard(False)], packed))
    assert fails(torch.ones(2)) == ["fast"]


def test_host_values_read_with_the_guards_reach_the_fast_graph():
    fast, fallback = Recorder("fast"), Recorder("fallback")
    graph = runtime.GuardedGraph(fast, fallback, [_guard(True)], 0, reads=lambda args: torch.tensor([3, 5]))
    graph(torch.ones(2))
    assert fast.calls[0][1] == {"host_values": [3, 5]}


def test_a_graph_without_guards_counts_its_calls():
    inner = Recorder("inner")
    with graphopt.capture() as report:
        runtime.RewrittenGraph(inner)(torch.ones(1))
    assert report.runtime == {"fast_path": 1}


def test_a_report_is_published_on_the_first_call_only():
    graph_report = inspection.new_graph_report("code")
    graph = runtime.PublishedOnFirstCall(Recorder("inner"), graph_report, dump_dir=None)
    with graphopt.capture() as report:
        graph(torch.ones(1))
        graph(torch.ones(1))
    assert report.graphs == [graph_report]


def test_published_masks_reach_the_handoff_registry_except_on_fake_calls():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    source = torch.ones(1, 4, dtype=torch.int64)
    graph = runtime.PublishedMasks(lambda *args: [mask], [MaskExport(positions=[0], kind=MaskKind.CAUSAL_PADDING, input_index=0)])
    graph(source)
    fact = handoff.lookup(mask)
    assert fact is not None and fact.kind == MaskKind.CAUSAL_PADDING and fact.source is source
    other = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with FakeTensorMode() as mode:
        fake_source = mode.from_tensor(source)
    runtime.PublishedMasks(lambda *args: [other], [MaskExport(positions=[0], kind=MaskKind.CAUSAL, input_index=None)])(fake_source)
    assert handoff.lookup(other) is None
