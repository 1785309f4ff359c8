"""Packed batches over attention that is not "RoPE then SDPA": layers without RoPE (EXAONE 4's and
Cohere 2's full layers, SmolLM3's and Llama 4's NoPE layers), a norm after RoPE (Llama 4's qk
norm), RoPE as complex products (Llama 4) and multi-head latent attention (DeepSeek-V3: q =
cat(q_nope, rope(q_pe)), a key written in place, qk head dim 24 and value head dim 12).

The mask alone says which keys a query sees, so these layers run per-document attention too, over
the SDPA's own q and k with RoPE not fused (``varlen_attention/sdpa_packed[_sliding]_unfused``,
and a note saying why); layers whose RoPE is proven keep it fused. Eager HF vs
``backend="graphopt"`` on one training step, comparing the loss, the logits and every parameter
gradient, with each layer's rewrite asserted; windows (4) and chunks (8) are shorter than some
documents. Also checkpointed (DeepSeek-V3) and split into a graph per layer (SmolLM3, the mask
received from an earlier graph); padded batches and a cache still get no per-document attention.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, enable_checkpointing, real_positions
from tests.support.tolerances import tol

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

SEQ, ROWS, WINDOW, CHUNK = 24, 2, 4, 8
RULES = (
    "sdpa_packed", "sdpa_packed_sliding", "sdpa_packed_chunked",
    "sdpa_packed_unfused", "sdpa_packed_sliding_unfused", "sdpa_packed_chunked_unfused",
)

# name -> (family, config overrides, {varlen rule: layers}, layers with RoPE fused, SDPA calls left
# with their mask). Every tiny config has 2 layers.
VARIANTS = {
    # layer 0 slides (RoPE), layer 1 attends fully without RoPE
    "exaone4": ("exaone4", {"sliding_window": WINDOW}, {"sdpa_packed_sliding": 1, "sdpa_packed_unfused": 1}, 1, 0),
    "cohere2": ("cohere2", {"sliding_window": WINDOW}, {"sdpa_packed_sliding": 1, "sdpa_packed_unfused": 1}, 1, 0),
    # layer 1 without RoPE, full or (use_sliding_window) sliding
    "smollm3_nope": ("smollm3", {"no_rope_layers": [1, 0]}, {"sdpa_packed": 1, "sdpa_packed_unfused": 1}, 1, 0),
    "smollm3_nope_sliding": (
        "smollm3", {"no_rope_layers": [1, 0], "sliding_window": WINDOW},
        {"sdpa_packed": 1, "sdpa_packed_sliding_unfused": 1}, 1, 0,
    ),
    "deepseek_v3": ("deepseek_v3", {}, {"sdpa_packed_unfused": 2}, 0, 0),
    # layer 0: complex RoPE then the qk norm; layer 1: NoPE with the query temperature
    "llama4_text_full": ("llama4_text", {"attention_chunk_size": None}, {"sdpa_packed_unfused": 2}, 0, 0),
    # layer 0 attends in chunks of CHUNK positions: its documents are cut into chunks
    "llama4_text_chunked": (
        "llama4_text", {"attention_chunk_size": CHUNK}, {"sdpa_packed_chunked_unfused": 1, "sdpa_packed_unfused": 1}, 0, 0,
    ),
}


def packed() -> dict:
    return make_batch("packed", batch=ROWS, seq=SEQ, seed=3) | {"use_cache": False}


def _document_lengths(position_ids: torch.Tensor) -> list[int]:
    return [
        length for row in position_ids
        for length in torch.diff(torch.nonzero(row == 0).flatten(), append=torch.tensor([row.numel()])).tolist()
    ]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    family, overrides, *_ = VARIANTS[request.param]
    torch.manual_seed(0)
    return request.param, CompiledModel(build_tiny_model(family, **overrides))


def test_every_layer_with_a_packed_mask_runs_per_document_attention(variant):
    name, cm = variant
    _, _, rules, fused, masked = VARIANTS[name]
    batch = packed()
    lengths = _document_lengths(batch["position_ids"])
    assert max(lengths) > CHUNK > WINDOW >= min(lengths), lengths  # windows and chunks cut some documents only
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    for rule in RULES:
        assert report.rule_counts[("varlen_attention", rule)] == rules.get(rule, 0), (rule, report)
    assert report.counts["rope_fusion"] == fused, report
    unfused = sum(n for rule, n in rules.items() if rule.endswith("_unfused"))
    notes = [n for g in report.graphs for n in g.notes if "RoPE not fused" in n]
    assert len(notes) == unfused, notes  # each says why, as a note: nothing is lost on the mask
    assert not [r for n, r in report.declines if n == "varlen_attention"], report.declines
    code = "\n".join(report.graph_code("after"))
    assert code.count("torch.ops.graphopt.varlen_attention") == sum(rules.values())
    assert code.count("scaled_dot_product_attention") == masked, code
    assert report.guards == []  # the document rule is proven for every input
    assert not [r for n, r in report.declines if n == "mask_elision"], report.declines


# Padded batches of the variants whose padded path no other test takes: a NoPE layer with a window
# (per-row varlen_attention, RoPE not fused), Llama 4's chunked layer (each row cut into chunks,
# per-row varlen_attention) beside a NoPE layer with the query temperature. (DeepSeek-V3 below; EXAONE 4 and Cohere 2 in test_sliding_windows.py;
# the other two run the same rewrites as these.)
PADDED = ("smollm3_nope_sliding", "llama4_text_chunked")


def test_padded_batches_drop_every_provable_mask_behind_the_guard(variant):
    """Right-padded: each layer runs without its mask behind the right-padding guard, a NoPE,
    sliding or chunked layer per row as varlen_attention (Llama 4's rows of 24 tokens cut into
    chunks of 8, and unpadded: the packed rows cut into the same chunks); exact at real positions. Left padding, and pads that are scored, take the exact
    masked path."""
    name, cm = variant
    if name not in PADDED:
        pytest.skip("this variant's padded path is the same as one tested (see PADDED)")
    masked = VARIANTS[name][4]
    right = make_batch("right", batch=ROWS, seq=SEQ, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=real_positions(right))
    assert report.counts["mask_elision"] == 2 - masked, report
    if name == "llama4_text_chunked":
        assert report.rule_counts[("mask_elision", "sdpa_chunked_causal_padding")] == 1, report
        # unpadded: the packed rows (24 and 12 real tokens) cut into the same chunks of 8 on
        # layer 0, one document per row on layer 1 (its SDPA runs as varlen_attention too)
        assert right["attention_mask"].sum(1).tolist() == [24, 12]
        assert report.runtime["unpad"] == 1, report
        code = "\n".join(report.graph_code("after"))
        assert code.count("torch.ops.graphopt.varlen_attention") == 2, code.count("torch.ops.graphopt.varlen_attention")
        assert "scaled_dot_product_attention" not in code
        assert not [r for n, r in report.declines if n == "unpad"], report.declines
    assert report.runtime["fast_path"] == 1 and not report.runtime.get("fallback"), report
    for layout, failed in (("left", "right_padded"), ("pad_labels_unmasked", "pads_ignored")):
        batch = make_batch(layout, batch=ROWS, seq=SEQ, seed=4) | {"use_cache": False}
        eager, compiled, report = cm.step(batch)
        assert_steps_equal(eager, compiled)
        assert report.runtime["fallback"] == 1 and report.runtime[f"failed:{failed}"] == 1, (layout, report)


def test_mla_inside_checkpointed_layers_runs_per_document():
    """DeepSeek-V3 with activation checkpointing: each layer's body (its key written in place)
    runs per-document attention, and the backward's recomputation runs the rewritten body."""
    model = build_tiny_model("deepseek_v3")
    enable_checkpointing(model, use_reentrant=False)
    cm = CompiledModel(model)
    eager, compiled, report = cm.step(packed())
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[("varlen_attention", "sdpa_packed_unfused")] == 2, report
    code = "\n".join(report.graph_code("after"))
    assert "tag_activation_checkpoint" in code and "scaled_dot_product_attention" not in code


@pytest.mark.slow
def test_a_received_packed_mask_runs_a_layer_without_rope_per_document():
    """Split per layer (a graph break before each), SmolLM3's NoPE layer reads the packed mask
    built by an earlier graph: its received-packed version runs per document too, RoPE not fused."""
    model = build_tiny_model("smollm3", no_rope_layers=[1, 0])
    for layer in model.model.layers:
        layer.register_forward_pre_hook(torch._dynamo.disable(lambda module, args: None))
    cm = CompiledModel(model)
    eager, compiled, report = cm.step(packed())
    assert_steps_equal(eager, compiled)
    assert report.runtime["received_packed"] == 2 and not report.runtime.get("fallback"), report
    # (windowed versions are also noted for windows other graphs of the process publish)
    notes = [n for g in cm.compile_reports for n in g.notes if "runs its 1 attention call(s) per document (varlen" in n]
    assert len(notes) == 2, [n for g in cm.compile_reports for n in g.notes]  # each layer's graph, NoPE included


def test_padded_mla_batches_are_not_packed_and_fall_back_when_left_padded():
    """Negative: a right-padded DeepSeek-V3 batch has a padding mask, not a packed one: the varlen
    pass does not run per document on it; mask elision drops the mask and unpadding runs the
    decoder on the real tokens, exact at real positions: both MLA layers (each writes its key's
    nope and rope channels into one ``new_empty`` buffer with ``copy_``, which unpadding packs like
    any token value), the dense MLP of layer 0 and the routed experts of layer 1 (the tokens sorted
    by expert, the permutation tracked: test_unpad_experts.py). A left-padded batch on the same
    graph takes the exact masked path."""
    cm = CompiledModel(build_tiny_model("deepseek_v3"))
    right = make_batch("right", batch=ROWS, seq=SEQ, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=real_positions(right))
    assert report.counts["varlen_attention"] == 0, report
    assert report.rule_counts[("mask_elision", "sdpa_causal_padding")] == 2, report
    assert report.runtime["fast_path"] == 1 and report.runtime["unpad"] == 1, report
    assert not [r for n, r in report.declines if n == "unpad"], report
    code = cm.after_code()
    assert "grouped_mm_fallback" in code and "torch.sort" in code and "copy_" in code
    assert code.count("torch.ops.graphopt.varlen_attention") == 2
    left = make_batch("left", batch=ROWS, seq=SEQ, seed=4) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1, report


def test_with_a_cache_documents_of_a_nope_model_attend_to_each_other_and_nothing_is_rewritten():
    """Negative: with a cache object transformers builds a plain causal mask over the packed row
    (documents see each other), which is not block-causal: no per-document attention."""
    cm = CompiledModel(build_tiny_model("smollm3", no_rope_layers=[1, 0]))
    eager, compiled, report = cm.step(make_batch("packed", batch=ROWS, seq=SEQ, seed=3))
    assert_steps_equal(eager, compiled)
    assert report.counts["varlen_attention"] == 0, report

