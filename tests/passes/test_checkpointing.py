"""Rewrites through activation checkpointing (``model.gradient_checkpointing_enable()``).

Each decoder layer then runs inside ``tag_activation_checkpoint(body, *operands)``: the mask, the
RoPE tables and the hidden states enter the body as operands and attention happens inside it.
Mask elision and packed attention must rewrite inside the bodies (and stop passing the mask in),
the recomputation in the backward must use the rewritten body, and every result must equal eager:
the loss and every parameter gradient.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, enable_checkpointing, real_positions

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

SEQ = 16
N_LAYERS = 2


@pytest.fixture(scope="module")
def checkpointed():
    """``checkpointed(family, reentrant)``: one compiled checkpointed model each, on first use."""
    cache = {}

    def get(family: str, reentrant: bool = False) -> CompiledModel:
        if (family, reentrant) not in cache:
            model = build_tiny_model(family)
            enable_checkpointing(model, use_reentrant=reentrant)
            cache[family, reentrant] = CompiledModel(model)
        return cache[family, reentrant]

    return get


def _batch(layout: str, seed: int) -> dict:
    # use_cache=False: with a cache requested, transformers warns (once) that checkpointing turns it
    # off, and that warning breaks the Dynamo graph in two.
    return make_batch(layout, batch=2, seq=SEQ, seed=seed) | {"use_cache": False}


def _after(cm: CompiledModel, rewrite: str) -> str:
    """The code after the passes (outer graph and checkpoint bodies) of the graph ``cm`` compiled
    that made ``rewrite``."""
    (graph,) = [g for g in cm.compile_reports if g.counts[rewrite]]
    return graph.after


@pytest.mark.parametrize("family, reentrant", [("llama", False), ("gemma2", False), ("glm4", False), ("llama", True)])
def test_padded_masks_are_elided_inside_checkpointed_layers(checkpointed, family, reentrant):
    cm = checkpointed(family, reentrant)
    batch = _batch("right", seed=1)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.runtime["fast_path"] == 1, report
    rule = "eager_causal_padding" if family == "gemma2" else "sdpa_causal_padding"
    assert report.rule_counts[("mask_elision", rule)] == N_LAYERS, report
    after = _after(cm, "mask_elision")
    assert after.count("tag_activation_checkpoint(") == N_LAYERS  # still checkpointed
    # the graph that runs is the unpadded one (tests/passes/test_unpad.py): each body runs per-row
    # varlen attention on the packed tokens (Gemma 2's eager attention too, with its softcap)
    assert report.runtime["unpad"] == 1, report
    assert after.count("graphopt.varlen_attention") == N_LAYERS
    assert "attention_mask_1" not in after  # the mask is no longer built or passed in


@pytest.mark.parametrize("family, reentrant", [("llama", False), ("gemma2", False), ("llama", True)])
def test_left_padded_batches_run_the_exact_fallback(checkpointed, family, reentrant):
    cm = checkpointed(family, reentrant)
    eager, compiled, report = cm.step(_batch("left", seed=2))
    assert_steps_equal(eager, compiled)
    assert report.runtime == {"fallback": 1, "failed:right_padded": 1}, report


@pytest.mark.parametrize("family, reentrant", [("llama", False), ("glm4", False), ("llama", True)])
def test_packed_attention_runs_per_document_inside_checkpointed_layers(checkpointed, family, reentrant):
    cm = checkpointed(family, reentrant)
    eager, compiled, report = cm.step(_batch("packed", seed=3))
    assert_steps_equal(eager, compiled)
    assert report.counts["varlen_attention"] == N_LAYERS and report.counts["rope_fusion"] == N_LAYERS, report
    assert report.runtime == {"fast_path": 1}, report
    after = _after(cm, "varlen_attention")
    assert after.count("tag_activation_checkpoint(") == N_LAYERS
    assert after.count("torch.ops.graphopt.varlen_attention") == N_LAYERS
    assert "scaled_dot_product_attention" not in after


def test_a_body_shared_by_two_checkpoint_calls_is_rewritten_for_each(monkeypatch):
    """A checkpoint body that two calls run is copied before a rewrite inside it."""
    import torch.fx as fx

    from graphopt import analysis

    def layer(x, mask):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)

    class Model(torch.nn.Module):
        def forward(self, x, mask):
            for _ in range(2):
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            return x

    from tests.support.retarget import capture_graphs

    (gm,) = capture_graphs(Model(), torch.randn(1, 2, 4, 8), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    hops = [n for n in gm.graph.nodes if analysis.is_checkpoint(n)]
    assert len(hops) == 2
    copy = analysis.copy_graph_module(gm)
    analysis.unshare_checkpoint_bodies(copy)
    bodies = [analysis.checkpoint_body(n) for n in copy.graph.nodes if analysis.is_checkpoint(n)]
    assert len({id(b) for b in bodies}) == 2
    assert all(isinstance(b, fx.GraphModule) for b in bodies)
    assert all(analysis.checkpoint_body(h) is not b for h in hops for b in bodies)  # the original is untouched


@pytest.mark.parametrize("other_use", [False, True], ids=["attention_only", "also_summed"])
def test_a_mask_read_by_other_code_inside_a_body_is_kept(other_use):
    """Inside a checkpointed body a mask used only as attention's mask is dropped; when it also
    feeds a sum it is not only attention's mask, and nothing is rewritten (the reason names the use)."""
    import torch.nn.functional as F

    from graphopt.inspection import GraphReport
    from graphopt.options import GraphoptOptions
    from graphopt.passes import run_passes
    from tests.support.retarget import capture_graphs

    def layer(x, mask):
        out = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
        return out + mask.sum() if other_use else out

    def model(x, am):
        idx = torch.arange(am.shape[1])
        mask = (idx[None, :] <= idx[:, None])[None, None] & am.bool()[:, None, None, :]
        return torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)

    (gm,) = capture_graphs(model, torch.randn(2, 2, 8, 4), torch.ones(2, 8, dtype=torch.long))
    report = GraphReport(0, gm.code, quiet=True)
    _, ctx = run_passes(gm, GraphoptOptions(padded_outputs_unused=True), report)
    if not other_use:
        assert report.counts["mask_elision"] == 1 and [g.name for g in ctx.guards] == ["right_padding"]
        return
    assert report.counts["mask_elision"] == 0 and ctx.guards == []
    assert any("inside" in d.reason and "not attention" in d.reason for d in report.declines), report.declines
