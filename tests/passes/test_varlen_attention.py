"""Packed sequences, end to end: block-causal SDPA + RoPE become graphopt::varlen_attention.

Eager HF vs ``backend="graphopt"`` on one training step, comparing the loss, the logits and every
parameter gradient, with the rewrites asserted to fire (or not).
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.tiny_models import ROTARY_LAYOUT, build_tiny_model, collate_flattening, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, run_step
from tests.support.tolerances import tol

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "cohere", "glm4"]
N_LAYERS = 2
SEQ = 24


def packed(seed: int, batch: int = 1, seq: int = SEQ) -> dict:
    # A cache object makes transformers skip packed-sequence detection: training runs without one.
    return make_batch("packed", batch=batch, seq=seq, seed=seed) | {"use_cache": False}


def _layout(family: str) -> str:
    return ROTARY_LAYOUT[family]["layout"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, CompiledModel(build_tiny_model(request.param))


def test_packed_batch_runs_per_document_attention(family_model):
    family, cm = family_model
    batch = packed(seed=1)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    assert report.counts["varlen_attention"] == N_LAYERS, report
    assert report.rule_counts[("rope_fusion", _layout(family))] == N_LAYERS, report
    code = "\n".join(report.graph_code("after"))
    assert "torch.ops.graphopt.varlen_attention" in code
    assert "scaled_dot_product_attention" not in code  # no attention left over a T×T mask
    assert report.guards == []  # the document rule is proven for every input: no runtime guard


def test_packed_equals_padded_documents(family_model):
    family, cm = family_model
    eager_padded = run_step(cm.model, make_batch("packed_docs", batch=1, seq=SEQ, seed=1) | {"use_cache": False})
    _, compiled_packed, _ = cm.step(packed(seed=1))
    assert_steps_equal(eager_padded, compiled_packed)


@pytest.mark.parametrize("family, full_layers", [("mistral", 0), ("qwen2", 1)])
def test_packed_documents_with_a_sliding_window_run_windowed_per_document_attention(family, full_layers):
    """A window of 4 tokens, documents longer and shorter than it (Mistral: every layer; Qwen2
    with use_sliding_window: layer 0 full, layer 1 sliding). Each layer's mask is proven with its
    window and its attention runs per document with that window, RoPE fused; no mask is left."""
    cm = CompiledModel(build_tiny_model(family, sliding_window=4))
    batch = packed(seed=1)
    lengths = torch.diff(torch.nonzero(batch["position_ids"][0] == 0).flatten(), append=torch.tensor([SEQ]))
    assert lengths.max() > 4 and lengths.min() <= 4, lengths  # the window cuts some documents only
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    assert report.rule_counts[("varlen_attention", "sdpa_packed_sliding")] == N_LAYERS - full_layers, report
    assert report.rule_counts[("varlen_attention", "sdpa_packed")] == full_layers, report
    code = "\n".join(report.graph_code("after"))
    assert "scaled_dot_product_attention" not in code


def test_gemma2_eager_attention_runs_per_document():
    """Gemma2's eager, softcapped attention over the packed mask runs per document too, RoPE fused
    (graphopt.passes.eager_attention; its windowed and checkpointed cases are tested there)."""
    cm = CompiledModel(build_tiny_model("gemma2"))
    eager, compiled, report = cm.step(packed(seed=2))
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[("varlen_attention", "eager_packed")] == N_LAYERS, report
    assert report.rule_counts[("rope_fusion", "half")] == N_LAYERS, report


@pytest.fixture(scope="module")
def llama_rows():
    """One compiled llama for (2, SEQ) position layouts: they all share one graph."""
    return CompiledModel(build_tiny_model("llama"))


def _with_positions(positions: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, positions.shape, generator=gen)
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}


LAYOUTS = {
    "two packed rows": lambda: packed(seed=3, batch=2),
    "single document per row": lambda: _with_positions(torch.arange(SEQ).repeat(2, 1), 4),
    "every token its own document": lambda: _with_positions(torch.zeros(2, SEQ, dtype=torch.long), 5),
    "documents not starting at 0": lambda: _with_positions(
        torch.tensor([list(range(7, 7 + 10)) + list(range(14)), list(range(3)) * 8]), 6
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_position_layouts(llama_rows, name):
    batch = LAYOUTS[name]()
    eager, compiled, report = llama_rows.step(batch)
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    # Every graph this model compiled (dynamic shapes may add one) rewrote every layer.
    assert llama_rows.compile_reports
    assert all(g.counts["varlen_attention"] == N_LAYERS for g in llama_rows.compile_reports)
    assert report.runtime["fallback"] == 0


def test_changing_one_document_leaves_the_others_bit_identical(llama_rows):
    batch = _with_positions(torch.tensor([list(range(10)) + list(range(14))] * 2), 7)
    with torch.no_grad():
        before = llama_rows.compiled(**batch).logits
        batch["input_ids"][:, :10] = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(8))
        after = llama_rows.compiled(**batch).logits
    assert torch.equal(before[:, 10:], after[:, 10:])  # document B never sees document A
    assert not torch.equal(before[:, :10], after[:, :10])


def test_data_collator_with_flattening_end_to_end():
    gen = torch.Generator().manual_seed(9)
    documents = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 1, 9, 3)]
    batch = collate_flattening(documents) | {"use_cache": False}
    cm = CompiledModel(build_tiny_model("qwen2"))
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.counts["varlen_attention"] == N_LAYERS and report.counts["rope_fusion"] == N_LAYERS


def test_with_a_cache_documents_attend_to_each_other_and_nothing_is_rewritten():
    """transformers skips packed detection when a cache object exists; graphopt keeps that meaning."""
    cm = CompiledModel(build_tiny_model("llama"))
    eager, compiled, report = cm.step(make_batch("packed", seq=SEQ, seed=10))
    assert_steps_equal(eager, compiled)
    assert report.counts["varlen_attention"] == 0


def test_option_off_keeps_the_mask():
    cm = CompiledModel(build_tiny_model("llama"), options={"varlen_attention": False})
    eager, compiled, report = cm.step(packed(seed=11))
    assert_steps_equal(eager, compiled)
    assert report.counts["varlen_attention"] == 0 and report.counts["rope_fusion"] == 0
    assert "scaled_dot_product_attention" in "\n".join(report.graph_code("after"))


def test_explain_reports_varlen_and_rope_fusion():
    report = graphopt.explain(build_tiny_model("glm4"), **packed(seed=12))
    assert report.counts["varlen_attention"] == N_LAYERS
    assert report.rule_counts[("rope_fusion", "interleaved")] == N_LAYERS
    assert "varlen_attention x2" in str(report)


SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    # yarn also scales cos/sin by its attention factor: still only the tables change
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope_type", list(SCALED_ROPE))
def test_scaled_rope_only_changes_the_tables(rope_type):
    cm = CompiledModel(build_tiny_model("llama", rope_parameters=SCALED_ROPE[rope_type]))
    eager, compiled, report = cm.step(packed(seed=13, seq=40))
    assert_steps_equal(eager, compiled)
    assert report.counts["rope_fusion"] == N_LAYERS and report.counts["varlen_attention"] == N_LAYERS


def _halves_rope(x, cos, sin):  # gpt-oss: one angle per pair, rotating the two halves of x
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _halves_wrong_sign(x, cos, sin):  # the second half's sign flipped: no rotation
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos - first * sin), dim=-1)


def _halves_unpaired(x, cos, sin):  # each half with its own table: tables of D/2 are not pairs' angles here
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos, second * sin), dim=-1)


@pytest.mark.parametrize(
    "rotate, proven", [(_halves_rope, True), (_halves_wrong_sign, False), (_halves_unpaired, False)],
    ids=["paired", "wrong_sign", "unpaired"],
)
def test_rope_with_one_angle_per_pair_is_proven_with_doubled_tables(rotate, proven):
    """Tables of one angle per rotary pair, (B, 1, S, D/2), are RoPE of the halves layout with
    the tables doubled (``paired``); an op on the same tables that is not that rotation is not."""
    from graphopt.passes import varlen_attention as varlen_pass
    from tests.support.mask_graphs import capture

    gm = capture(rotate, torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
    x, cos, sin = gm.graph.find_nodes(op="placeholder")
    (out,) = gm.graph.output_node().args[0]
    found = varlen_pass._probe_rope(gm, out, x, [cos, sin])
    assert (found == (cos, sin, False, True)) if proven else found is None, found
