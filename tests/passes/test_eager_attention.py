"""Eager attention of packed batches (softcap, sinks, windows) becomes graphopt::varlen_attention.

End to end: Gemma 2 (eager attention with a logit softcap, alternate sliding layers with a window
of 4 over documents both shorter and longer than it), eager HF vs ``backend="graphopt"`` on one
training step, comparing the loss and every parameter gradient. Attention with sink logits
(gpt-oss's eager form) runs end to end on a small function over a packed mask: gpt-oss's own
mask does not depend on ``position_ids`` (its documents attend to each other), so no
per-document rewrite applies to it. The matcher itself is tested on small Dynamo graphs.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.masks import MaskKind, document_starts, find_masks
from graphopt.passes.eager_attention import EagerAttention, match_eager_attention
from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, enable_checkpointing
from tests.support.mask_graphs import capture
from tests.support.tolerances import tol

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

WINDOW = 4


def packed(seq: int, seed: int) -> dict:
    return make_batch("packed", batch=1, seq=seq, seed=seed) | {"use_cache": False}


def _lengths(batch: dict) -> torch.Tensor:
    positions = batch["position_ids"][0]
    return torch.diff(torch.nonzero(positions == 0).flatten(), append=torch.tensor([positions.shape[0]]))


@pytest.fixture(scope="module")
def gemma2():
    torch.manual_seed(0)
    return CompiledModel(build_tiny_model("gemma2", sliding_window=WINDOW))


@pytest.mark.parametrize("seq, seed", [(24, 1), (40, 0)])
def test_gemma2_packed_runs_softcapped_per_document_attention(gemma2, seq, seed):
    """Layer 0 slides (window 4), layer 1 attends fully; both softcap their scores at 50. The
    second length recompiles with symbolic sizes."""
    batch = packed(seq, seed)
    lengths = _lengths(batch)
    assert lengths.max() > WINDOW >= lengths.min(), lengths  # the window cuts some documents only
    eager, compiled, report = gemma2.step(batch)
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    for graph in gemma2.compile_reports:  # every graph this model compiled rewrote both layers
        rules = collections.Counter((r.name, r.rule) for r in graph.rewrites)
        assert rules[("varlen_attention", "eager_packed_sliding")] == 1, graph
        assert rules[("varlen_attention", "eager_packed")] == 1, graph
        assert rules[("rope_fusion", "half")] == 2, graph
        details = [r.detail for r in graph.rewrites if r.name == "varlen_attention"]
        assert all("softcap 50" in d for d in details) and sum("window 4" in d for d in details) == 1, details
    code = gemma2.after_code()
    assert code.count("torch.ops.graphopt.varlen_attention") == 2 * len(gemma2.compile_reports)
    assert "softmax" not in code and "torch.where" not in code  # no scores softmax, no T×T mask
    assert report.guards == []


def test_gemma2_active_attention_dropout_is_declined():
    """Dropout in the attention (p=0.1, train mode) is random: varlen_attention has none, so the
    mask is kept, with the reason."""
    model = build_tiny_model("gemma2", sliding_window=WINDOW, attention_dropout=0.1)
    report = graphopt.explain(model, **packed(24, 1))
    assert report.counts["varlen_attention"] == 0, report
    reasons = [r for name, r in report.declines if name == "varlen_attention"]
    assert len(reasons) == 2 and all("attention dropout is active" in r and "p=0.1" in r for r in reasons), reasons


def test_llama4_eager_chunked_attention_runs_per_chunk_packed_and_padded():
    """Llama 4 with eager attention, layer 0 in chunks of 8 (layer 1 NoPE): packed, the chunked
    layer's documents are cut into chunks (``eager_packed_chunked_unfused``); right-padded (24
    and 12 real tokens), its rows are cut into chunks behind the guard
    (``eager_chunked_causal_padding``) and unpadded (the packed rows cut into the same chunks);
    left-padded, the exact masked path. Loss and every gradient against eager HF."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("llama4_text", attention_chunk_size=8, attn_implementation="eager"))
    batch = make_batch("packed", batch=2, seq=24, seed=3) | {"use_cache": False}
    lengths = [n for row in batch["position_ids"].split(1) for n in _lengths({"position_ids": row}).tolist()]
    assert max(lengths) > 8 >= min(lengths), lengths  # chunks cut some documents only
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[("varlen_attention", "eager_packed_chunked_unfused")] == 1, report
    assert report.rule_counts[("varlen_attention", "eager_packed_unfused")] == 1, report
    assert "softmax" not in "\n".join(report.graph_code("after"))
    right = make_batch("right", batch=2, seq=24, seed=5) | {"use_cache": False}
    assert right["attention_mask"].sum(1).tolist() == [24, 12]
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=right["attention_mask"].bool())
    assert report.rule_counts[("mask_elision", "eager_chunked_causal_padding")] == 1, report
    assert report.rule_counts[("mask_elision", "eager_causal_padding")] == 1, report
    assert report.runtime["fast_path"] == 1 and report.runtime["unpad"] == 1, report
    left = make_batch("left", batch=2, seq=24, seed=4) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1, report


# ---------------------------------------------------------------------------------------------
# gpt-oss-style sinks, end to end on a small function over a packed block-causal mask
# ---------------------------------------------------------------------------------------------

B, HQ, HKV, S, D = 1, 4, 2, 24, 8
SINK_POSITIONS = torch.tensor([list(range(5)) + list(range(12)) + list(range(7))])


def _packed_additive_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """transformers' eager block-causal mask: 0 where a query sees a key of its document."""
    docs = document_starts(position_ids).cumsum(-1)
    idx = torch.arange(position_ids.shape[-1])
    allowed = (docs[:, :, None] == docs[:, None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    return torch.where(allowed[:, None], 0.0, torch.finfo(torch.float32).min)


def _sink_attention(window: int | None, softcap: float | None):
    def attention(q, k, v, sinks, position_ids):
        mask = _packed_additive_mask(position_ids, window)
        k = k[:, :, None].expand(B, HKV, HQ // HKV, S, D).reshape(B, HQ, S, D)  # repeat_kv
        v = v[:, :, None].expand(B, HKV, HQ // HKV, S, D).reshape(B, HQ, S, D)
        scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores + mask
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, column], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        probs = F.dropout(probs, p=0.0, training=True)
        return torch.matmul(probs, v)

    return attention


@pytest.mark.parametrize("window, softcap", [(None, None), (5, 30.0)])
def test_sink_attention_over_a_packed_mask_runs_per_document(window, softcap):
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, h, S, D, generator=gen, requires_grad=True) for h in (HQ, HKV, HKV)]
    sinks = torch.randn(HQ, generator=gen, requires_grad=True)
    fn = _sink_attention(window, softcap)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="graphopt", dynamic=False)
    with graphopt.capture() as report:
        out = compiled(*inputs, sinks, SINK_POSITIONS)
    expected = fn(*inputs, sinks, SINK_POSITIONS)
    torch.testing.assert_close(out, expected, **tol(torch.float32))
    grad = torch.randn(expected.shape, generator=gen)
    got = torch.autograd.grad(out, [*inputs, sinks], grad)
    want = torch.autograd.grad(expected, [*inputs, sinks], grad)
    for name, g, w in zip(("q", "k", "v", "sinks"), got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32, "grad"), msg=lambda m: f"{name}: {m}")
    rule = "eager_packed_unfused" if window is None else "eager_packed_sliding_unfused"  # q/k are inputs: no RoPE
    assert report.rule_counts[("varlen_attention", rule)] == 1, report
    (detail,) = [r.detail for g in report.graphs for r in g.rewrites if r.name == "varlen_attention"]
    assert "sinks" in detail and (softcap is None or "softcap 30" in detail), detail
    code = "\n".join(report.graph_code("after"))
    assert "softmax" not in code and "torch.where" not in code


# ---------------------------------------------------------------------------------------------
# The matcher on small Dynamo graphs
# ---------------------------------------------------------------------------------------------


def _eager(softcap=None, *, dim=-1, returns_scores=False, dropout=0.0, scale_input=False):
    """Gemma-2-style eager attention of (B, H, S, D) q, k, v and an additive mask."""
    def attention(q, k, v, mask, t):
        scores = torch.matmul(q, k.transpose(2, 3)) * (t if scale_input else 0.25)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        weights = F.softmax(scores + mask, dim=dim, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(F.dropout(weights, p=dropout, training=True), v)
        return (out, scores) if returns_scores else out

    return attention


def _match(fn, *, sinks=False, dtype=torch.float32, masked_value=None, heads=2, seq=8, dim=16) -> EagerAttention | str:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(dtype) for _ in range(3))
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    mask = torch.zeros(1, 1, seq, seq, dtype=dtype).masked_fill(future, torch.finfo(dtype).min if masked_value is None else masked_value)
    last = torch.randn(heads, generator=gen) if sinks else torch.tensor(0.5)
    gm = capture(fn, q, k, v, mask, last)
    mask_node = next(p for p in gm.graph.find_nodes(op="placeholder") if p.name == "l_mask_")
    (add,) = mask_node.users
    return match_eager_attention(gm, add, mask_node, masked_value)


def test_softcapped_attention_is_matched_with_its_scale_and_cap():
    found = _match(_eager(softcap=50.0))
    assert isinstance(found, EagerAttention), found
    assert (found.scale, found.softcap, found.sinks) == (0.25, 50.0, None)
    assert found.q.name == "l_q_" and found.k.name == "l_k_" and found.v.name == "l_v_"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_is_matched(dtype):
    """The scale and cap are read in float64 however the graph's dtype rounds; float16's lowest
    value still zeroes masked probabilities of capped scores."""
    found = _match(_eager(softcap=50.0), dtype=dtype)
    assert isinstance(found, EagerAttention), found
    assert (found.scale, found.softcap) == (0.25, 50.0)


def test_a_masked_value_that_may_leave_probability_is_declined():
    """Uncapped scores minus 1000 may still get a nonzero probability: documents would leak."""
    found = _match(_eager(), masked_value=-1000.0)
    assert isinstance(found, str) and "may leave masked probabilities nonzero" in found, found


def test_attention_without_softcap_has_cap_zero():
    found = _match(_eager())
    assert isinstance(found, EagerAttention), found
    assert (found.scale, found.softcap) == (0.25, 0.0)


def test_sink_logits_are_matched_as_per_head_sinks():
    def attention(q, k, v, mask, sinks):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.125 + mask
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, column], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        return torch.matmul(probs, v)

    found = _match(attention, sinks=True)
    assert isinstance(found, EagerAttention), found
    assert (found.scale, found.softcap) == (0.125, 0.0) and found.sinks is not None and found.sinks.name == "l_sinks_"


def test_a_sink_column_that_is_not_one_logit_per_head_is_declined():
    def attention(q, k, v, mask, sinks):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        column = sinks.reshape(1, 1, 1, 1).expand(q.shape[0], q.shape[1], q.shape[-2], -1)  # one logit for all heads
        probs = F.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        return torch.matmul(probs, v)

    found = _match(attention)
    assert isinstance(found, str) and "not one logit per head" in found, found


def test_a_softmax_over_the_queries_is_declined():
    found = _match(_eager(softcap=50.0, dim=-2))
    assert isinstance(found, str) and "a softmax not over the keys" in found, found


def test_scores_used_elsewhere_are_declined():
    found = _match(_eager(softcap=50.0, returns_scores=True))
    assert isinstance(found, str) and "is also used by" in found, found


def test_active_dropout_is_declined():
    found = _match(_eager(dropout=0.1))
    assert isinstance(found, str) and "attention dropout is active" in found and "p=0.1" in found, found


def test_a_scale_that_is_a_tensor_is_declined():
    found = _match(_eager(scale_input=True))
    assert isinstance(found, str) and "besides q and k" in found, found


def test_the_packed_mask_of_the_sink_function_is_proven_block_causal():
    """The end-to-end sink test relies on find_masks proving its mask, window or not."""
    gen = torch.Generator().manual_seed(2)
    args = [torch.randn(B, h, S, D, generator=gen) for h in (HQ, HKV, HKV)] + [torch.randn(HQ, generator=gen), SINK_POSITIONS]
    kinds = []
    for window in (None, 5):
        (cand,) = find_masks(capture(_sink_attention(window, None), *args))
        kinds.append((cand.kind, cand.window, len(cand.additive_users)))
    assert kinds == [(MaskKind.PACKED_CAUSAL, None, 1), (MaskKind.SLIDING_PACKED_CAUSAL, 5, 1)]


def test_gemma2_packed_inside_checkpointed_layers():
    """Each layer runs inside ``tag_activation_checkpoint``: the rewrite happens in the bodies,
    which receive the positions instead of the mask, and the backward recomputes the rewritten
    body."""
    torch.manual_seed(0)
    model = build_tiny_model("gemma2", sliding_window=WINDOW)
    enable_checkpointing(model, use_reentrant=False)
    cm = CompiledModel(model)
    eager, compiled, report = cm.step(packed(24, 1))
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[("varlen_attention", "eager_packed_sliding")] == 1, report
    assert report.rule_counts[("varlen_attention", "eager_packed")] == 1, report
    code = cm.after_code()
    assert code.count("tag_activation_checkpoint(") == 2 and code.count("torch.ops.graphopt.varlen_attention") == 2
    assert "softmax" not in code and "torch.where" not in code
