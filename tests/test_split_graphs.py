"""A training step that reaches graphopt as several graphs, in one process: the mask is built in one
graph and read by the attention of later ones (:mod:`graphopt.handoff`).

The split is FSDP2's: ``fully_shard`` wraps its hooks in ``torch._dynamo.disable``, so Dynamo breaks
the graph around every sharded layer. Here each decoder layer gets such a hook (a no-op), which
gives the same graphs without a process group: the mask in a graph of its own, one graph per
layer receiving it, the loss in the last. DDP's split and FSDP2 itself run in
:mod:`tests.test_distributed`.

Every step is compared with eager on the loss and every gradient; every test also says which path
each layer took (the runtime counters).
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import TINY_DIMS, build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

LAYERS = TINY_DIMS["num_hidden_layers"]

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.aot_eager]


def _split_per_layer(model):
    for layer in model.model.layers:
        layer.register_forward_pre_hook(torch._dynamo.disable(lambda module, args: None))
    return model


@pytest.fixture(scope="module")
def split():
    return CompiledModel(_split_per_layer(build_tiny_model("llama")))


@pytest.fixture(scope="module")
def split_promised():
    return CompiledModel(_split_per_layer(build_tiny_model("llama")), options={"padded_outputs_unused": True})


def _attention_calls(cm: CompiledModel) -> int:
    return sum(g.before.count("scaled_dot_product_attention(") for g in cm.compile_reports)


def test_unpadded_batch_drops_the_received_mask(split):
    batch = make_batch("ones")
    eager, compiled, report = split.step(batch)
    assert_steps_equal(eager, compiled)
    assert len(report.graphs) >= LAYERS + 2, report  # mask, layers, loss: several graphs
    assert report.counts["mask_handoff"] == 1, report
    assert report.rule_counts[("mask_elision", "sdpa_handed_off")] == _attention_calls(split) == LAYERS, report
    assert report.runtime["fast_path"] >= LAYERS and not report.runtime.get("fallback"), report


def test_padded_batch_keeps_the_mask_without_labels(split):
    """The layers cannot see the labels: a padded batch runs their exact masked path, and says how
    to get the fast one."""
    batch = make_batch("right")
    eager, compiled, report = split.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.runtime["fallback"] == LAYERS and report.runtime["failed:no_padding"] == LAYERS, report
    assert "exact path ran (no_padding)" in str(report) and "padded_outputs_unused" in str(report), report


def test_left_padded_batch_keeps_the_mask(split):
    batch = make_batch("left")
    eager, compiled, report = split.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.runtime["failed:right_padded"] == LAYERS and not report.runtime.get("received_packed"), report


def test_packed_batch_runs_per_document(split):
    batch = make_batch("packed") | {"use_cache": False}
    eager, compiled, report = split.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.runtime["received_packed"] == LAYERS and not report.runtime.get("fallback"), report
    assert any("another fast graph runs its 1 attention call(s) per document" in n for g in split.compile_reports for n in g.notes), report


def test_other_lengths_drop_the_mask(split):
    """A second length recompiles with symbolic sizes: the mask is published and dropped at lengths
    its proof covers."""
    for seq in (24, 40):
        batch = make_batch("ones", seq=seq, seed=seq)
        eager, compiled, report = split.step(batch)
        assert_steps_equal(eager, compiled)
        assert report.runtime["fast_path"] >= LAYERS and not report.runtime.get("fallback"), report


def test_padded_batch_with_promise_drops_the_mask(split_promised):
    batch = make_batch("right")
    eager, compiled, report = split_promised.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.rule_counts[("mask_elision", "sdpa_handed_off")] == LAYERS, report
    assert report.runtime["fast_path"] >= LAYERS and not report.runtime.get("fallback"), report


# -- activation checkpointing, and the families whose RoPE differs ----------------------------------


@pytest.fixture(scope="module")
def split_checkpointed():
    model = _split_per_layer(build_tiny_model("llama"))
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return CompiledModel(model, options={"padded_outputs_unused": True})


@pytest.mark.parametrize("layout", ["right", "packed"])
def test_checkpointed_layers_drop_the_received_mask(split_checkpointed, layout):
    """The layers run inside tag_activation_checkpoint: the mask (and, packed, the rotary tables)
    enter the bodies as operands, and the recomputation runs the rewritten body."""
    batch = make_batch(layout)
    eager, compiled, report = split_checkpointed.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    taken = "received_packed" if layout == "packed" else "fast_path"
    assert report.runtime[taken] >= LAYERS and not report.runtime.get("fallback"), report


@pytest.mark.parametrize("family", ["cohere", "phi3", "glm4"])  # interleaved fp32, fused qkv, partial rotary
def test_packed_batch_runs_per_document_in_other_families(family):
    cm = CompiledModel(_split_per_layer(build_tiny_model(family)))
    batch = make_batch("packed") | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.runtime["received_packed"] == LAYERS and not report.runtime.get("fallback"), report


@pytest.mark.parametrize("layout", ["right", "packed"])
def test_received_sliding_masks_run_per_document_with_their_window(layout):
    """Gemma 3 split per layer, window 4 (shorter than the rows): the mask graph publishes both
    masks, the sliding one with its window; each layer's graph runs the version its mask's fact
    selects: per document (packed) or per row (right-padded) with the window for the sliding
    layer, without it (packed) or causal SDPA (padded) for the full one."""
    cm = CompiledModel(_split_per_layer(build_tiny_model("gemma3_text", sliding_window=4)), options={"padded_outputs_unused": True})
    batch = make_batch(layout, seq=24) | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    handoffs = [r.detail for g in report.graphs for r in g.rewrites if r.name == "mask_handoff"]
    assert any("with its window of 4" in d for d in handoffs), handoffs
    assert report.runtime["fast_path"] >= LAYERS and not report.runtime.get("fallback"), report
    notes = [n for g in cm.compile_reports for n in g.notes]
    assert any("per document with the window of 4" in n for n in notes), notes
    # received_packed counts the calls that took received boundaries: both layers packed, the
    # sliding one padded (the full one runs causal SDPA)
    assert report.runtime["received_packed"] == (LAYERS if layout == "packed" else 1), report
    left = make_batch("left", seq=24) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled, real_positions=real_positions(left))
    assert report.runtime["fallback"] == LAYERS and report.runtime["failed:right_padded"] == LAYERS, report


@pytest.mark.parametrize("layout, checkpointed", [("right", False), ("packed", False), ("packed", True)],
                         ids=["right", "packed", "packed-checkpointed"])
def test_received_masks_of_eager_attention_run_per_document(layout, checkpointed):
    """Gemma 2 split per layer: eager attention (softcap 50) adds the received mask to its
    scores. Layer 0 slides (window 4, shorter than the rows), layer 1 does not. Each layer graph
    runs its attention as varlen_attention with the softcap, per document (packed) or per row
    (right-padded), with the window where its mask has one: no received mask is kept. Checkpointed,
    the mask and the boundaries enter the layer's body as operands."""
    model = _split_per_layer(build_tiny_model("gemma2", sliding_window=4))
    if checkpointed:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    cm = CompiledModel(model, options={"padded_outputs_unused": True})
    batch = make_batch(layout, seq=24) | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    fast = [r.detail for g in cm.compile_reports for r in g.rewrites if r.name == "mask_elision" and r.rule == "eager_handed_off"]
    assert fast and all("softcap 50" in d for d in fast), fast
    notes = [n for g in cm.compile_reports for n in g.notes]
    assert any("per document with the window of 4" in n for n in notes), notes
    assert any("per document (varlen_attention)" in n for n in notes), notes
    assert not [d for g in cm.compile_reports for d in g.declines if "received" in d.reason], cm.compile_reports
    assert report.runtime["fast_path"] >= LAYERS and not report.runtime.get("fallback"), report
    # the sliding layer takes received boundaries in both layouts, the full one when packed
    assert report.runtime["received_packed"] == (LAYERS if layout == "packed" else 1), report
    left = make_batch("left", seq=24) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled, real_positions=real_positions(left))
    assert report.runtime["fallback"] == LAYERS and report.runtime["failed:right_padded"] == LAYERS, report


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["right", "packed"])
def test_split_layers_on_cuda(layout):
    """The handoff on the device: the mask published from a CUDA graph, its padding read once, the
    packed boundaries computed on the device (scripts/gpu_check.sh runs the cuda tests)."""
    model = _split_per_layer(build_tiny_model("llama")).cuda()
    cm = CompiledModel(model, options={"padded_outputs_unused": True})
    batch = {k: v.cuda() for k, v in make_batch(layout).items()} | {"use_cache": False}
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    taken = "received_packed" if layout == "packed" else "fast_path"
    assert report.runtime[taken] >= LAYERS and not report.runtime.get("fallback"), report
