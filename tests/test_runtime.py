"""The call-time layer of :mod:`graphopt.runtime` and the passes' adapters, with stub callables:
no compile, milliseconds.

What each test pins: guards that hold run the fast version and a failed guard the fallback
(counted, the cause logged once); a call with fake tensors reads no guard, runs the outputs'
fix-ups only and counts or publishes nothing; versions are tried in order; host values read with
the guards reach the adapters that asked for them; adapters supply inputs in order and fix up
outputs in reverse order; a version whose extra inputs do not match its adapters is refused; a
report is published on the first call only; and each pass's adapter does what its calling
convention says (attach the logits' gradient, publish masks, pack tokens, pass boundaries).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

import graphopt
from graphopt import handoff, inspection, runtime
from graphopt.guards import Guard
from graphopt.masks import MaskKind
from graphopt.passes.fused_cross_entropy import AttachLogits
from graphopt.passes.mask_elision import PublishMasks
from graphopt.passes.unpad import PackTokens, packing_indices
from graphopt.passes.varlen_attention import ReceivedBoundaries, cu_seqlens_from_position_ids


class Recorder:
    """A stub compiled graph: records its calls and returns a marker."""

    def __init__(self, name: str):
        self.name, self.calls = name, []

    def __call__(self, *args):
        self.calls.append(args)
        return [self.name]


def _module(n_args: int, extra: tuple[str, ...] = ()) -> fx.GraphModule:
    graph = fx.Graph()
    nodes = [graph.placeholder(f"arg{i}") for i in range(n_args)] + [graph.placeholder(name) for name in extra]
    graph.output(tuple(nodes))
    return fx.GraphModule({}, graph)


def _adapted(compiled, adapters=(), n_args: int = 1) -> runtime.AdaptedGraph:
    extra = tuple(name for a in adapters for name in a.input_names)
    return runtime.AdaptedGraph(compiled, adapters, _module(n_args, extra), n_args)


def _guard(holds: bool, name: str = "right_padded") -> Guard:
    return Guard(name="g", fn=lambda x: {name: torch.tensor(holds)}, input_indices=(0,), description="stub")


def _dispatch(fast, fallback, guards, graph_id=0, **kwargs) -> runtime.GuardedDispatch:
    fast = _adapted(fast)
    return runtime.GuardedDispatch([runtime.Version(guards, fast)], _adapted(fallback), graph_id, shapes_only=fast, **kwargs)


class Tagged(runtime.Adapter):
    """An adapter that records its hooks in a shared log: adds one input, appends its tag to the
    outputs, reads ``n_reads`` host values (their sum + the row index, so a wrong split shows)."""

    def __init__(self, tag: str, log: list, n_reads: int = 0):
        self.tag, self.log, self.n_reads = tag, log, n_reads
        self.input_names = (f"extra_{tag}",)

    def reads(self, args):
        return torch.arange(self.n_reads) + 10 * len(self.tag) if self.n_reads else None

    def inputs(self, args, host):
        self.log.append(("inputs", self.tag, host))
        return (f"in_{self.tag}",)

    def outputs(self, args, outputs):
        self.log.append(("outputs", self.tag))
        return outputs + [self.tag]

    def after(self, args, outputs):
        self.log.append(("after", self.tag, list(outputs)))


# -- the dispatch --------------------------------------------------------------------------------


def test_guards_that_hold_run_the_fast_graph_and_count_it():
    fast, fallback = Recorder("fast"), Recorder("fallback")
    with graphopt.capture() as report:
        assert _dispatch(fast, fallback, [_guard(True)])(torch.ones(2)) == ["fast"]
    assert not fallback.calls and report.runtime == {"fast_path": 1}


def test_a_failed_guard_runs_the_fallback_counts_the_cause_and_warns_once(caplog):
    fast, fallback = Recorder("fast"), Recorder("fallback")
    graph = _dispatch(fast, fallback, [_guard(False)], graph_id=7)
    with graphopt.capture() as report, caplog.at_level("WARNING", logger="graphopt"):
        assert graph(torch.ones(2)) == ["fallback"]
        assert graph(torch.ones(2)) == ["fallback"]
    assert not fast.calls
    assert report.runtime == {"fallback": 2, "failed:right_padded": 2}
    assert len([r for r in caplog.records if "graph 7 runs its exact masked path" in r.getMessage()]) == 1


def test_a_fake_call_reads_no_guard_fixes_up_outputs_and_records_nothing():
    def never(x):
        raise AssertionError("a guard was read during a fake call")

    log: list = []
    fast = _adapted(Recorder("fast"), [_OutputsOnly("o", log)])
    graph = runtime.GuardedDispatch(
        [runtime.Version([Guard(name="g", fn=never, input_indices=(0,), description="")], fast)],
        _adapted(Recorder("fallback")), 0, shapes_only=fast,
    )
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    with graphopt.capture() as report:
        assert graph(fake) == ["fast", "o"]
    assert report.runtime == {} and log == [("outputs", "o")]  # no after(): nothing published


class _OutputsOnly(Tagged):
    input_names = ()

    def __init__(self, tag, log):
        super().__init__(tag, log)
        self.input_names = ()


def test_versions_are_tried_in_order_and_the_fast_ones_failures_are_counted():
    fast, fallback, packed = Recorder("fast"), Recorder("fallback"), Recorder("packed")

    def dispatch(first_holds: bool, fast_holds: bool):
        versions = [runtime.Version([_guard(first_holds, "packed")], _adapted(packed)), runtime.Version([_guard(fast_holds)], _adapted(fast))]
        return runtime.GuardedDispatch(versions, _adapted(fallback), 0, shapes_only=_adapted(fast))

    assert dispatch(True, True)(torch.ones(2)) == ["packed"]
    assert dispatch(False, True)(torch.ones(2)) == ["fast"]
    with graphopt.capture() as report:
        assert dispatch(False, False)(torch.ones(2)) == ["fallback"]
    assert report.runtime == {"fallback": 1, "failed:right_padded": 1}


def test_the_version_meant_for_the_batch_says_why_it_fell_back():
    """A version that only selects another kind of input (``same_window``, ``packed``,
    ``causal_kind``) does not hide the failure of the version meant for this batch."""
    fast, fallback, windowed = Recorder("fast"), Recorder("fallback"), Recorder("windowed")

    def dispatch(windowed_fails: str, fast_fails: str):
        versions = [
            runtime.Version([_guard(False, windowed_fails)], _adapted(windowed)),
            runtime.Version([_guard(False, fast_fails)], _adapted(fast)),
        ]
        return runtime.GuardedDispatch(versions, _adapted(fallback), 0, shapes_only=_adapted(fast))

    for windowed_fails, fast_fails, cause in [
        ("right_padded", "causal_kind", "right_padded"),  # a sliding mask, left-padded
        ("same_window", "right_padded", "right_padded"),  # a full mask, left-padded
        ("same_window", "causal_kind", "causal_kind"),  # neither is meant for it: the last says
    ]:
        with graphopt.capture() as report:
            assert dispatch(windowed_fails, fast_fails)(torch.ones(2)) == ["fallback"]
        assert report.runtime == {"fallback": 1, f"failed:{cause}": 1}, (windowed_fails, fast_fails)


def test_a_graph_without_guards_counts_its_calls():
    inner = Recorder("inner")
    graph = runtime.GuardedDispatch([runtime.Version([], _adapted(inner))], None, 0, shapes_only=_adapted(inner))
    with graphopt.capture() as report:
        graph(torch.ones(1))
    assert report.runtime == {"fast_path": 1}


def test_a_version_with_guards_needs_a_fallback():
    with pytest.raises(ValueError, match="exact fallback"):
        runtime.GuardedDispatch([runtime.Version([_guard(True)], _adapted(Recorder("f")))], None, 0, shapes_only=_adapted(Recorder("f")))


def test_a_report_is_published_on_the_first_call_only():
    graph_report = inspection.new_graph_report("code")
    graph = runtime.PublishedOnFirstCall(Recorder("inner"), graph_report, dump_dir=None)
    with graphopt.capture() as report:
        graph(torch.ones(1))
        graph(torch.ones(1))
    assert report.graphs == [graph_report]


# -- adapters ------------------------------------------------------------------------------------


def test_adapters_supply_inputs_in_order_and_fix_up_outputs_in_reverse():
    log: list = []
    inner = Recorder("graph")
    graph = _adapted(inner, [Tagged("a", log), Tagged("bb", log)])
    assert graph(torch.ones(1)) == ["graph", "bb", "a"]
    assert inner.calls[0][1:] == ("in_a", "in_bb")
    assert log == [
        ("inputs", "a", None), ("inputs", "bb", None),
        ("outputs", "bb"), ("outputs", "a"),
        ("after", "a", ["graph", "bb", "a"]), ("after", "bb", ["graph", "bb", "a"]),
    ]


def test_host_values_read_with_the_guards_reach_each_adapter_its_own():
    log: list = []
    fast = _adapted(Recorder("fast"), [Tagged("a", log, n_reads=2), Tagged("xyz", log), Tagged("bb", log, n_reads=3)])
    reads = []
    original = runtime.evaluate_guards

    def spy(guards, args, *, also_read=None):
        reads.append(also_read)
        return original(guards, args, also_read=also_read)

    graph = runtime.GuardedDispatch([runtime.Version([_guard(True)], fast)], _adapted(Recorder("fallback")), 0, shapes_only=fast)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "evaluate_guards", spy)
        graph(torch.ones(2))
    assert reads[0].tolist() == [10, 11, 20, 21, 22]  # one read: the guards' and every adapter's
    assert [entry for entry in log if entry[0] == "inputs"] == [("inputs", "a", [10, 11]), ("inputs", "xyz", None), ("inputs", "bb", [20, 21, 22])]


def test_a_version_without_guards_reads_its_host_values_itself():
    log: list = []
    _adapted(Recorder("fast"), [Tagged("a", log, n_reads=2)])(torch.ones(2))
    assert log[0] == ("inputs", "a", [10, 11])


def test_extra_inputs_that_do_not_match_the_adapters_are_refused():
    with pytest.raises(RuntimeError, match="do not match its adapters"):
        runtime.AdaptedGraph(Recorder("g"), [Tagged("a", [])], _module(1, ("something_else",)), 1)
    with pytest.raises(RuntimeError, match="do not match its adapters"):
        runtime.AdaptedGraph(Recorder("g"), [], _module(1, ("extra_a",)), 1)


def test_attach_logits_gives_the_logits_their_gradient_and_drops_the_hidden_states():
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    detached = (hidden @ weight.T * 0.5).detach()
    adapter = AttachLogits(positions=[0, 2], hidden_position=3, weight_input=1, logit_scale=0.5)
    outputs = adapter.outputs((None, weight), [detached, "loss", detached, hidden])
    assert len(outputs) == 3 and outputs[1] == "loss" and outputs[0] is outputs[2]
    grad = torch.randn(6, 5)
    outputs[0].backward(grad)
    expected_h, expected_w = torch.autograd.grad(hidden @ weight.T * 0.5, (hidden, weight), grad)
    torch.testing.assert_close(hidden.grad, expected_h)
    torch.testing.assert_close(weight.grad, expected_w)


def test_published_masks_reach_the_handoff_registry_and_never_on_fake_calls():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    source = torch.ones(1, 4, dtype=torch.int64)
    graph = _adapted(lambda *args: [mask], [PublishMasks(positions=[0], kind=MaskKind.CAUSAL_PADDING, input_index=0)])
    runtime.GuardedDispatch([runtime.Version([], graph)], None, 0, shapes_only=graph)(source)
    fact = handoff.lookup(mask)
    assert fact is not None and fact.kind == MaskKind.CAUSAL_PADDING and fact.source is source

    other = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with FakeTensorMode() as mode:
        fake_source = mode.from_tensor(source)
    graph = _adapted(lambda *args: [other], [PublishMasks(positions=[0], kind=MaskKind.CAUSAL, input_index=None)])
    runtime.GuardedDispatch([runtime.Version([], graph)], None, 0, shapes_only=graph)(fake_source)
    assert handoff.lookup(other) is None


def test_a_sliding_mask_is_published_and_passed_on_with_its_window():
    mask, returned, source = torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.ones(1, 4)
    PublishMasks(positions=[0], kind=MaskKind.SLIDING_CAUSAL_PADDING, input_index=0, window=3).after((source,), [mask])
    assert (handoff.lookup(mask).kind, handoff.lookup(mask).window) == (MaskKind.SLIDING_CAUSAL_PADDING, 3)
    PublishMasks(positions=[0], kind=MaskKind.RECEIVED, input_index=0).after((mask,), [returned])
    fact = handoff.lookup(returned)
    assert (fact.kind, fact.window, fact.source) == (MaskKind.SLIDING_CAUSAL_PADDING, 3, source)


def test_an_additive_mask_is_published_and_passed_on_with_its_masked_value():
    mask, returned, source = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 4)
    PublishMasks(positions=[0], kind=MaskKind.CAUSAL_PADDING, input_index=0, masked_value=-3.0e38).after((source,), [mask])
    assert handoff.lookup(mask).masked_value == -3.0e38
    PublishMasks(positions=[0], kind=MaskKind.RECEIVED, input_index=0).after((mask,), [returned])
    assert handoff.lookup(returned).masked_value == -3.0e38


def test_a_received_mask_passed_on_keeps_its_fact_and_an_unknown_one_is_not_published():
    received, returned, source = torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.ones(1, 4)
    adapter = PublishMasks(positions=[0], kind=MaskKind.RECEIVED, input_index=0)
    adapter.after((received,), [returned])
    assert handoff.lookup(returned) is None
    handoff.publish(received, MaskKind.CAUSAL, source)
    adapter.after((received,), [returned])
    fact = handoff.lookup(returned)
    assert fact is not None and fact.kind == MaskKind.CAUSAL and fact.source is source


def test_pack_tokens_builds_the_packing_inputs_from_the_lengths_read_with_the_guards():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    adapter = PackTokens(mask_input=1, input_names=("g", "p", "c", "s"), bucket=4)
    assert adapter.reads((None, mask)).tolist() == [3, 1, 4]
    with graphopt.capture() as report:
        gather, positions, cu, scatter = adapter.inputs((None, mask), [3, 1, 4])
    expected, _, _ = packing_indices(mask, [3, 1, 4], bucket=4)
    for name, value in zip(("gather", "positions", "cu_seqlens", "scatter"), (gather, positions, cu, scatter)):
        assert torch.equal(value, expected[name]), name
    assert report.runtime == {"unpad": 1, "unpad_tokens_saved": 4, "unpad_bucket_waste": 0}


def test_received_boundaries_are_those_of_the_received_masks_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    handoff.publish(mask, MaskKind.PACKED_CAUSAL, positions)
    adapter = ReceivedBoundaries(mask_index=0, input_name="cu")
    assert adapter.input_names == ("cu",)
    with graphopt.capture() as report:
        (cu,) = adapter.inputs((mask,), None)
    assert torch.equal(cu, cu_seqlens_from_position_ids(positions, 2))
    assert report.runtime == {"received_packed": 1}
