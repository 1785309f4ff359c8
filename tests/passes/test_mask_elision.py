"""Mask elision, end to end: eager vs ``backend="graphopt"`` on one training step of tiny models,
comparing the loss and every parameter gradient, with the rewrite asserted to fire (or not).

One compiled model per family serves every layout: the padded layouts share shapes, so they share
the compiled graph, and the guard decides per call between the fast path and the exact fallback.
"""

from __future__ import annotations

import pytest
import torch

from graphopt import masks
from graphopt.masks import MaskKind
from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

# The padded fast path through Inductor for one family of each attention layout: plain SDPA
# (llama), q/k norms (qwen3), fused qkv (phi3), eager softcapped attention (gemma2). Every family's
# mask elision is asserted, with exact losses and gradients, in tests/test_tracing.py (the whole
# pipeline without Inductor) and tests/test_device_independence.py (CPU and CUDA graphs).
FAMILIES = ["llama", "qwen3", "phi3", "gemma2"]
SEQ = 16
N_LAYERS = 2

# Layouts the right-padding guard accepts, and those it must send to the exact masked path
# (with the condition that fails).
FAST_LAYOUTS = ["right", "ones"]
FALLBACK_LAYOUTS = {
    "left": "right_padded",
    "holes": "right_padded",
    "pad_labels_unmasked": "pads_ignored",
    "all_pad_row": "no_empty_rows",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    # The padded fast path itself: with unpadding on (the default), a right-padded training batch
    # runs unpadded instead (tests/passes/test_unpad.py).
    torch.manual_seed(0)
    return request.param, CompiledModel(build_tiny_model(request.param), options={"unpad": False})


def _rule(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"


@pytest.mark.parametrize("layout", FAST_LAYOUTS)
def test_right_padded_batch_takes_the_fast_path(family_model, layout):
    family, cm = family_model
    batch = make_batch(layout, batch=2, seq=SEQ, seed=1)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.runtime["fast_path"] == 1 and report.runtime["fallback"] == 0, report
    # The rewrite fired in the graph that ran: once per layer, under the right-padding guard.
    assert cm.counts()["mask_elision"] >= N_LAYERS
    assert any(g.name == "right_padding" for r in cm.compile_reports for g in r.guards)
    code = cm.after_code()
    if _rule(family) == "sdpa":
        assert "is_causal = True" in code and "attn_mask = attention_mask" not in code
    else:  # eager attention: per-row varlen attention with its softcap, no mask, no (S, S) scores
        assert "graphopt.varlen_attention" in code and ".triu(" not in code and "softmax" not in code


@pytest.mark.parametrize("layout", sorted(FALLBACK_LAYOUTS))
def test_unsafe_batch_runs_the_exact_masked_path(family_model, layout):
    family, cm = family_model
    batch = make_batch(layout, batch=2, seq=SEQ, seed=2)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fast_path"] == 0 and report.runtime["fallback"] == 1, report
    assert report.runtime[f"failed:{FALLBACK_LAYOUTS[layout]}"] == 1, report
    assert not torch.isnan(compiled.loss)


def test_no_attention_mask_is_plain_causal_without_guard(family_model):
    """Training without a cache and without attention_mask: transformers still builds a mask
    from its own arange positions; it is plain causal and needs no guard. (With a cache object,
    transformers already passes is_causal=True and there is nothing to rewrite.)"""
    family, cm = family_model
    batch = make_batch("none", batch=2, seq=SEQ, seed=3) | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    (graph,) = report.graphs  # this layout has no attention_mask input: a graph of its own
    assert graph.guards == []
    assert report.rule_counts[("mask_elision", f"{_rule(family)}_causal")] == N_LAYERS, report
    assert report.runtime["fallback"] == 0


def test_eval_without_labels_keeps_the_mask(family_model):
    family, cm = family_model
    batch = make_batch("right", batch=2, seq=SEQ, seed=4)
    batch.pop("labels")
    cm.model.eval()
    try:
        eager, compiled, report = cm.step(batch, backward=False)
    finally:
        cm.model.train()
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled.logits[mask], eager.logits[mask])
    torch.testing.assert_close(compiled.logits, eager.logits)  # the mask is kept: all positions equal
    assert report.counts["mask_elision"] == 0, report
    assert any("padded_outputs_unused" in reason for _, reason in report.declines), report


def test_padded_outputs_unused_elides_in_eval():
    torch.manual_seed(0)
    model = build_tiny_model("llama").eval()
    batch = make_batch("right", batch=2, seq=SEQ, seed=5)
    batch.pop("labels")
    cm = CompiledModel(model, options={"padded_outputs_unused": True})
    eager, compiled, report = cm.step(batch, backward=False)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled.logits[mask], eager.logits[mask])
    assert report.counts["mask_elision"] == N_LAYERS and report.runtime["fast_path"] == 1


def test_a_sliding_mask_over_queries_without_rope_runs_per_row_unfused():
    """SDPA has no window argument: a sliding mask is dropped where its attention runs as windowed
    per-row varlen attention. Here q and k are plain inputs (no RoPE to fuse): the op reads them
    as they are, behind the right-padding guard, and a note says RoPE is not fused. (Windowed
    layers of real models are tested in tests/passes/test_sliding_windows.py.)"""
    from graphopt.inspection import GraphReport
    from graphopt.options import GraphoptOptions
    from graphopt.passes import run_passes
    from tests.support.mask_graphs import B, S, capture, qkv, sdpa_with

    def sliding(am):
        idx = torch.arange(am.shape[1])
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 3)
        return band[None, None] & am.bool()[:, None, None, :]

    args = (*qkv(), torch.ones(B, S, dtype=torch.int64))
    gm = capture(sdpa_with(sliding), *args)
    report = GraphReport(graph_id=0, before="", quiet=True)
    work, ctx = run_passes(gm, GraphoptOptions(padded_outputs_unused=True), report)
    assert [(r.name, r.rule) for r in report.rewrites] == [("mask_elision", "sdpa_sliding_causal_padding")], report.rewrites
    assert [g.name for g in ctx.guards] == ["right_padding"]
    assert any("RoPE not fused" in n for n in report.notes), report.notes
    assert "attn_mask" not in work.code and "graphopt.varlen_attention" in work.code
    am = args[-1].clone()
    am[1, S // 2 :] = 0  # right padding: equal at the real queries of every row
    by_name = dict(zip("qkv", args[:-1]), am=am)
    inputs = [by_name[p.name.removeprefix("l_").removesuffix("_")] for p in gm.graph.find_nodes(op="placeholder")]
    (expected,), (got,) = gm(*inputs), work(*inputs)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1, :, : S // 2], expected[1, :, : S // 2])


def test_eager_sliding_layers_add_a_constant_banded_mask():
    """Gemma2 (eager, softcapped attention; layers sliding, full) with a window of 4 tokens: both
    masks are dropped behind the right-padding guard, the sliding layer's replaced by a constant
    (S, S) band holding the mask's own masked value; left padding still falls back."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("gemma2", sliding_window=4))
    batch = make_batch("right", batch=2, seq=SEQ, seed=6) | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.rule_counts[("mask_elision", "eager_sliding_causal_padding")] == 1, report
    assert report.rule_counts[("mask_elision", "eager_causal_padding")] == 1, report
    assert report.runtime["fast_path"] == 1
    left = make_batch("left", batch=2, seq=SEQ, seed=7) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1


def test_dynamic_sequence_lengths_keep_the_rewrite_with_bounded_compiles():
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"))
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(8, 40, (20,), generator=gen).tolist()
    fast = 0
    for i, seq in enumerate(lengths):
        batch = make_batch("right", batch=2, seq=seq, seed=100 + i)
        eager, compiled, report = cm.step(batch)
        assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
        fast += report.runtime["fast_path"]
    n_graphs = len(cm.compile_reports)
    print(f"20 steps over lengths {sorted(set(lengths))}: {n_graphs} graph compile(s)")
    assert fast == 20
    assert n_graphs <= 2  # one static, then one dynamic graph that serves every length
    assert all(r.counts["mask_elision"] == N_LAYERS for r in cm.compile_reports)
    assert any(g.name == "proven_length" for g in cm.compile_reports[-1].guards)


def test_trust_right_padding_installs_no_guard():
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"), options={"trust_right_padding": True})
    batch = make_batch("right", batch=2, seq=SEQ, seed=8)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == N_LAYERS
    # (a proven_length guard may remain: shapes can be dynamic after earlier tests; it reads no data)
    assert not any(g.name == "right_padding" for g in report.guards)


def test_mask_elision_can_be_switched_off():
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"), options={"mask_elision": False})
    batch = make_batch("right", batch=2, seq=SEQ, seed=9)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == 0
    assert "attn_mask = attention_mask" in "\n".join(report.graph_code("after"))


# ---------------------------------------------------------------------------------------------------
# The guard checks what the loss scores


class LabelWrapper(torch.nn.Module):
    """A user's wrapper that transforms the labels inside the compiled forward."""

    def __init__(self, model, transform):
        super().__init__()
        self.model = model
        self.transform = transform

    def forward(self, input_ids, attention_mask, labels):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=self.transform(labels))


LABEL_TRANSFORMS = {
    # -100 becomes class 0: pads are scored, the fast path would be wrong.
    "clamp": (lambda labels: labels.clamp(min=0), "pads_ignored"),
    "ignored_to_eos": (lambda labels: labels.masked_fill(labels < 0, 2), "pads_ignored"),
    # a remap that keeps -100: still right to take the fast path.
    "remap_keeps_ignore": (lambda labels: torch.where(labels == 7, 8, labels), None),
}


@pytest.fixture(scope="module")
def wrapped():
    """One compiled wrapper per transform, built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = CompiledModel(LabelWrapper(build_tiny_model("llama"), LABEL_TRANSFORMS[name][0]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(LABEL_TRANSFORMS))
def test_labels_transformed_in_the_graph_are_guarded_on_the_scored_targets(wrapped, name):
    """Issue: ``labels.clamp(min=0)`` in a wrapper passed a guard that read the labels input, and
    the fast path returned a wrong loss. The guard now evaluates the graph's own label path."""
    cm = wrapped(name)
    failing = LABEL_TRANSFORMS[name][1]
    batch = make_batch("right", batch=2, seq=SEQ, seed=11)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert cm.counts()["mask_elision"] == N_LAYERS
    if failing is None:
        assert report.runtime["fast_path"] == 1 and report.runtime["fallback"] == 0, report
    else:
        assert report.runtime["fallback"] == 1 and report.runtime[f"failed:{failing}"] == 1, report
        assert {k for k in report.runtime if k.startswith("failed:")} == {f"failed:{failing}"}, report
        assert any("as transformed in the graph" in g.description for r in cm.compile_reports for g in r.guards)
        with torch.no_grad():  # the transform matters: a guard on the raw labels would be wrong
            untransformed = cm.model.model(**batch).loss
        assert not torch.isclose(compiled.loss, untransformed)


def test_left_padding_reports_only_its_cause(family_model):
    """A left-padded batch also scores a pad and may start with a pad; only the cause is reported."""
    family, cm = family_model
    batch = make_batch("left", batch=2, seq=SEQ, seed=12)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert {k for k in report.runtime if k.startswith("failed:")} == {"failed:right_padded"}, report


# ---------------------------------------------------------------------------------------------------
# Inputs eager accepts compile, inputs eager rejects fail as clearly


@pytest.mark.parametrize("extra_columns", [-3, 2])
def test_attention_mask_of_another_length_compiles_and_is_exact(extra_columns):
    """transformers pads a shorter attention_mask with zeros and slices a longer one."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"))
    batch = make_batch("right", batch=2, seq=SEQ, seed=13)
    mask = batch["attention_mask"]
    if extra_columns < 0:
        mask = mask[:, :extra_columns]
        batch["labels"][:, extra_columns:] = -100  # columns past the mask are padding
    else:
        mask = torch.cat((mask, torch.ones(2, extra_columns, dtype=mask.dtype)), dim=1)
    batch["attention_mask"] = mask
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == 0
    assert any("columns for" in reason for _, reason in report.declines), report


def test_int32_labels_fail_with_eagers_message():
    torch.manual_seed(0)
    model = build_tiny_model("llama")
    batch = make_batch("right", batch=2, seq=SEQ, seed=14)
    batch["labels"] = batch["labels"].int()
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte"):
        model(**batch)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="expected target dtype to be Long or Byte.*labels.long"):
        torch.compile(model, backend="graphopt")(**batch)


# ---------------------------------------------------------------------------------------------------
# Every sequence length: longer lengths are proven when they arrive


def test_lengths_past_the_compile_time_probes_are_proven_on_arrival(monkeypatch):
    """With compile-time probes only up to 9 tokens, every longer batch is proven when it first
    arrives (at the next power of two) and takes the fast path."""
    monkeypatch.setattr(masks, "PROBE_LENGTHS", (1, 2, 5, 8))
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"))
    lengths = [12, 14, 20, 33, 40, 17, 64]
    for i, seq in enumerate(lengths):
        batch = make_batch("right", batch=2, seq=seq, seed=200 + i)
        eager, compiled, report = cm.step(batch)
        assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
        assert report.runtime["fast_path"] == 1 and report.runtime["fallback"] == 0, (seq, report)
    assert len(cm.compile_reports) <= 2
    (guard,) = [g for g in cm.compile_reports[-1].guards if g.name == "proven_length"]
    assert "longer lengths are proven on arrival" in guard.description


def test_a_window_longer_than_the_probes_fails_its_proof_past_it(monkeypatch):
    """A mask with a 24-token window is causal ∧ padding at every compile-time probe (up to 9
    tokens); the length guard proves each longer length on arrival and refuses those past the
    window, remembering both outcomes."""
    import torch.nn.functional as F

    from graphopt.passes.mask_elision import proven_length_guard
    from tests.support.retarget import capture_graphs

    def attention(q, k, v, am):
        idx = torch.arange(am.shape[1])
        window = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 24)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=window[None, None] & am.bool()[:, None, None, :])

    monkeypatch.setattr(masks, "PROBE_LENGTHS", (1, 2, 5, 8))
    q = torch.randn(2, 2, 8, 4)
    torch._dynamo.mark_dynamic(q, 2)
    am = torch.ones(2, 8, dtype=torch.long)
    torch._dynamo.mark_dynamic(am, 1)
    (gm,) = capture_graphs(attention, q, q, q, am)
    (cand,) = masks.find_masks(gm)
    assert cand.kind == MaskKind.CAUSAL_PADDING and cand.max_probed_len == 9
    guard = proven_length_guard(gm, cand)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def check(length):
        args = []
        for node in placeholders:
            value = node.meta["example_value"]
            if isinstance(value, torch.SymInt):
                args.append(length)
            else:
                shape = [length if isinstance(s, torch.SymInt) else s for s in value.shape]
                args.append(torch.ones(shape, dtype=value.dtype))
        return guard.conditions(args)

    assert check(20) == {"lengths_agree": True, "proven_length": True}  # proven at 20 (32 fails)
    assert check(30) == {"lengths_agree": True, "proven_length": False}
    assert check(22) == {"lengths_agree": True, "proven_length": True}
    assert check(9) == {"lengths_agree": True, "proven_length": True}
    assert check(100)["proven_length"] is False
    assert cand.max_probed_len == 22
