"""Sliding-window attention, end to end, at windows shorter than the test sequences.

Tiny configs hide windows when the window exceeds the test length; here every model has a window
of 4 tokens over sequences of 24, with documents both shorter and longer than it. Eager HF vs
``backend="graphopt"`` on one training step, comparing the loss and every parameter gradient,
with what fired asserted per layer kind: sliding layers run per-document attention with the
window, full layers without it (RoPE not fused where a layer has none); batches the guards refuse
run the exact masked path.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

WINDOW = 4
SEQ = 24
# family -> (sliding layers, full layers with RoPE, full layers without RoPE) of its tiny
# windowed config (2 layers). Cohere2's and EXAONE 4's full-attention layers apply no RoPE.
LAYERS = {
    "mistral": (2, 0, 0),
    "qwen2": (1, 1, 0),  # use_sliding_window: layers >= max_window_layers (1) slide
    "gemma3_text": (1, 1, 0),
    "cohere2": (1, 0, 1),
    "exaone4": (1, 0, 1),
}


def packed(seed: int) -> dict:
    return make_batch("packed", batch=1, seq=SEQ, seed=seed) | {"use_cache": False}


@pytest.fixture(scope="module", params=list(LAYERS))
def family_model(request):
    torch.manual_seed(0)
    return request.param, CompiledModel(build_tiny_model(request.param, sliding_window=WINDOW))


def test_packed_sliding_layers_run_windowed_per_document_attention(family_model):
    family, cm = family_model
    sliding, full, nope = LAYERS[family]
    batch = packed(seed=3)
    lengths = torch.diff(torch.nonzero(batch["position_ids"][0] == 0).flatten(), append=torch.tensor([SEQ]))
    assert lengths.max() > WINDOW >= lengths.min(), lengths  # the window cuts some documents only
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[("varlen_attention", "sdpa_packed_sliding")] == sliding, report
    assert report.rule_counts[("varlen_attention", "sdpa_packed")] == full, report
    # A layer without RoPE runs per document too, over its own q and k (RoPE not fused, noted).
    assert report.rule_counts[("varlen_attention", "sdpa_packed_unfused")] == nope, report
    assert report.counts["rope_fusion"] == sliding + full, report
    assert not [r for n, r in report.declines if n == "varlen_attention"], report.declines
    assert "scaled_dot_product_attention" not in "\n".join(report.graph_code("after"))


def test_padded_batches_of_sliding_models_drop_every_mask_behind_the_guard(family_model):
    """Right padding first (the compile, whose report says what was rewritten), then left padding
    and right padding with the pads scored (labels not -100 there) on the same graph, which the
    right-padding guard sends to the exact masked path."""
    family, cm = family_model
    sliding, full, nope = LAYERS[family]
    right = make_batch("right", batch=2, seq=SEQ, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=real_positions(right))
    # Sliding layers: per-row attention with the window (varlen_attention); full layers: is_causal.
    assert report.rule_counts[("mask_elision", "sdpa_sliding_causal_padding")] == sliding, report
    assert report.rule_counts[("mask_elision", "sdpa_causal_padding")] == full + nope, report
    assert report.runtime["fast_path"] == 1, report
    code = "\n".join(report.graph_code("after"))
    # Unpadded, every layer runs per row as varlen_attention (a layer without RoPE over its own q
    # and k, RoPE not fused).
    assert report.counts["unpad"] == 1 and report.runtime["unpad"] == 1, report
    assert code.count("torch.ops.graphopt.varlen_attention") == sliding + full + nope
    assert "attn_mask" not in code.replace("attn_mask = None", "")
    left = make_batch("left", batch=2, seq=SEQ, seed=4) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1, report
    scored = make_batch("pad_labels_unmasked", batch=2, seq=SEQ, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(scored)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:pads_ignored"] == 1, report


@pytest.mark.inductor  # its own model, through Inductor: the op with sinks, the experts unpadded
def test_gpt_oss_eager_attention_with_sink_logits_drops_both_masks_behind_the_guard():
    """gpt-oss's eager attention concatenates a sink logit to each row of ``scores + mask`` and
    subtracts the row max before the softmax: still one query row at a time, so both layers run
    per row as varlen_attention with their sinks (and the window) behind the right-padding guard.
    Its RoPE takes tables of one angle per rotary pair, (B, S, D/2), and is fused all the same.
    Its routed layers (grouped experts with biases) are unpadded with the rest, and so is the
    router's auxiliary loss (its sums over the tokens are weighted by the mask): the router's
    logits get gradients from the experts' top-k and from that loss. Before its outputs went back
    to their padded rows by a gather, Inductor dropped the top-k's share of them here."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("gpt_oss", sliding_window=WINDOW, output_router_logits=True, router_aux_loss_coef=0.5))
    right = make_batch("right", batch=2, seq=SEQ, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=real_positions(right))
    assert report.rule_counts[("mask_elision", "eager_sliding_causal_padding")] == 1, report
    assert report.rule_counts[("mask_elision", "eager_causal_padding")] == 1, report
    assert report.rule_counts[("rope_fusion", "half")] == 2, report
    code = "\n".join(report.graph_code("after"))
    assert code.count("torch.ops.graphopt.varlen_attention") == 2  # both layers, no S x S scores
    # and the whole decoder runs on the real tokens, the routed experts included (test_unpad_experts.py)
    assert report.runtime["fast_path"] == 1 and report.runtime["unpad"] == 1, report
    assert code.count("torch.sort") == 2 and code.count("grouped_mm_fallback") == 4 and "scatter_add_" in code
    assert any("reduce over positions only through sums weighted" in n for g in cm.compile_reports for n in g.notes)
    left = make_batch("left", batch=2, seq=SEQ, seed=4) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1
