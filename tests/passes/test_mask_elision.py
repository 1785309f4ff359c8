"""Mask elision, end to end: eager vs ``backend="graphopt"`` on one training step of tiny models,
comparing the loss and every parameter gradient, with the rewrite asserted to fire (or not).

One compiled model per family serves every layout: the padded layouts share shapes, so they share
the compiled graph, and the guard decides per call between the fast path and the exact fallback.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.harness import CompiledModel, assert_steps_equal, real_positions

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
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
    torch.manual_seed(0)
    return request.param, CompiledModel(build_tiny_model(request.param))


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
    else:
        assert ".triu(" in code


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


def test_sliding_window_is_declined():
    torch.manual_seed(0)
    model = build_tiny_model("mistral", sliding_window=4)
    cm = CompiledModel(model)
    batch = make_batch("right", batch=2, seq=SEQ, seed=6)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == 0, report
    assert any("sliding window" in reason for _, reason in report.declines), report


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
    assert any(g.name == "probed_length" for g in cm.compile_reports[-1].guards)


def test_trust_right_padding_installs_no_guard():
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"), options={"trust_right_padding": True})
    batch = make_batch("right", batch=2, seq=SEQ, seed=8)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == N_LAYERS
    # (a probed_length guard may remain: shapes can be dynamic after earlier tests; it reads no data)
    assert not any(g.name == "right_padding" for g in report.guards)


def test_mask_elision_can_be_switched_off():
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama"), options={"mask_elision": False})
    batch = make_batch("right", batch=2, seq=SEQ, seed=9)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["mask_elision"] == 0
    assert "attn_mask = attention_mask" in "\n".join(report.graph_code("after"))
