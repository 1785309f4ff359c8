"""Masks handed from one graph to the next (:mod:`graphopt.handoff`), in pieces: what a published
mask tells the graphs that receive it, and which received masks attention reads unchanged.

The whole path (a model whose step is several graphs) is tested in :mod:`tests.test_split_graphs`
and, with DDP and FSDP2, in :mod:`tests.test_distributed`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt import handoff
from graphopt.masks import MaskKind, find_masks
from tests.support.mask_graphs import B, S, capture, qkv, sdpa_with


def _causal(batch: int = B, seq: int = S) -> torch.Tensor:
    idx = torch.arange(seq)
    return (idx[None, :] <= idx[:, None]).expand(batch, 1, seq, seq).clone()


def _guard(mask, *, promise=False):
    return handoff.HandedOffMaskGuard(promise)(mask)


def test_unpublished_mask_is_unknown():
    assert _guard(_causal()) == {"mask_known": False}
    assert handoff.HandedOffPackedGuard()(_causal()) == {"mask_known": False}


def test_causal_mask_holds_without_reading_data():
    mask = _causal()
    handoff.publish(mask, "causal", None)
    assert _guard(mask) == {"mask_known": True}


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[1, 1, 1, 1], [1, 1, 1, 1]], {"right_padded": True, "no_empty_rows": True, "no_padding": True}),
        ([[1, 1, 1, 1], [1, 1, 0, 0]], {"right_padded": True, "no_empty_rows": True, "no_padding": False}),
        ([[1, 1, 1, 1], [0, 0, 1, 1]], {"right_padded": False, "no_empty_rows": False, "no_padding": False}),
        ([[1, 0, 1, 1], [1, 1, 1, 1]], {"right_padded": False, "no_empty_rows": True, "no_padding": False}),
        ([[1, 1, 1, 1], [0, 0, 0, 0]], {"right_padded": True, "no_empty_rows": False, "no_padding": False}),
    ],
    ids=["no_padding", "right", "left", "holes", "empty_row"],
)
def test_padding_mask_conditions(rows, expected):
    attention_mask = torch.tensor(rows)
    mask = _causal(2, 4)
    handoff.publish(mask, "causal_padding", attention_mask)
    assert _guard(mask) == {"mask_known": True, **expected}
    promised = dict(expected)
    promised.pop("no_padding")
    assert _guard(mask, promise=True) == {"mask_known": True, **promised}


@pytest.mark.parametrize(
    "positions, one_document",
    [([[0, 1, 2, 3], [5, 6, 7, 8]], True), ([[0, 1, 0, 1], [0, 1, 2, 3]], False)],
    ids=["one_document_per_row", "several_documents"],
)
def test_packed_mask_conditions(positions, one_document):
    position_ids = torch.tensor(positions)
    mask = _causal(2, 4)
    handoff.publish(mask, "packed_causal", position_ids)
    assert _guard(mask) == {"mask_known": True, "one_document_per_row": one_document}
    assert handoff.HandedOffPackedGuard()(mask) == {"mask_known": True, "packed": True}


def test_packed_boundaries_are_the_documents():
    mask = _causal(2, 4)
    handoff.publish(mask, "packed_causal", torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]))
    cu = handoff.lookup(mask).cu_seqlens(2)
    assert cu.tolist() == [0, 2, 4, 7, 8, 8, 8, 8, 8]
    assert handoff.lookup(mask).cu_seqlens(2) is cu  # computed once per mask


def test_packed_guard_refuses_positions_of_another_shape():
    mask = _causal(2, 4)
    handoff.publish(mask, "packed_causal", torch.tensor([[0, 1, 2]]))
    assert handoff.HandedOffPackedGuard()(mask)["packed"] is False
    handoff.publish(mask, "causal_padding", torch.ones(2, 4, dtype=torch.long))
    assert handoff.HandedOffPackedGuard()(mask)["packed"] is False


def test_mask_modified_after_publication_is_unknown():
    mask = _causal()
    handoff.publish(mask, "causal", None)
    mask[0, 0, 0, 1] = True
    assert _guard(mask) == {"mask_known": False}


def test_source_modified_after_publication_is_unknown():
    attention_mask = torch.ones(2, 4, dtype=torch.long)
    mask = _causal(2, 4)
    handoff.publish(mask, "causal_padding", attention_mask)
    attention_mask[1, 0] = 0
    assert _guard(mask) == {"mask_known": False}


def test_registry_does_not_keep_masks_alive():
    import gc
    import weakref

    mask = _causal()
    handoff.publish(mask, "causal", None)
    ref = weakref.ref(mask)
    del mask
    gc.collect()
    assert ref() is None


# -- received masks: attention must read them unchanged --------------------------------------------


@pytest.mark.parametrize(
    "transform",
    [lambda m: m, lambda m: m[:, :, :, :S], lambda m: m[:, :, :S, :S]],
    ids=["as_received", "key_slice", "corner"],
)
def test_mask_read_unchanged_is_received(transform):
    gm = capture(sdpa_with(transform), *qkv(), _causal())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.RECEIVED, cand.reason
    assert len(cand.sdpa_users) == 1


@pytest.mark.parametrize(
    "transform",
    [lambda m: ~m, lambda m: m.transpose(-1, -2), lambda m: m & m.flip(-1), lambda m: m.roll(1, -1)],
    ids=["negated", "transposed", "combined", "rolled"],
)
def test_mask_changed_before_attention_is_not_received(transform):
    gm = capture(sdpa_with(transform), *qkv(), _causal())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.UNKNOWN
    assert "changed before attention reads it" in cand.reason


def test_float_query_is_not_a_received_mask():
    """A 4-D float input that is not a mask (the query) is not a candidate."""
    gm = capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *qkv())
    assert find_masks(gm) == []


@pytest.mark.parametrize("transform", [lambda m: m, lambda m: m[:, :, :, :S]], ids=["as_received", "key_slice"])
def test_mask_added_to_eager_scores_is_received(transform):
    """Eager attention adds the received (additive) mask to its scores: the mask is a received
    candidate; the query and key, also 4-D inputs without gradient, are not."""
    def eager(q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) + transform(mask), dim=-1) @ v

    additive = torch.zeros(B, 1, S, S).masked_fill(~_causal(), torch.finfo(torch.float32).min)
    (cand,) = find_masks(capture(eager, *qkv(), additive))
    assert cand.kind == MaskKind.RECEIVED and len(cand.additive_users) == 1, cand.reason
    assert cand.input.name == "l_mask_"


def test_returned_mask_is_exported_and_classified():
    def build(am):
        idx = torch.arange(am.shape[1])
        return (idx[None, None, None, :] <= idx[None, None, :, None]) & am.bool()[:, None, None, :]

    gm = capture(build, torch.ones(B, S, dtype=torch.long))
    (cand,) = find_masks(gm)
    assert cand.exported and cand.kind == MaskKind.CAUSAL_PADDING, cand.reason
    assert not cand.users


def test_mask_passed_on_by_a_graph_stays_known():
    """A graph that receives a mask and returns it unchanged passes its fact on: the next graph
    still drops it (three compiled functions, the mask crossing two boundaries)."""
    import graphopt

    def build(am):
        idx = torch.arange(am.shape[1])
        return (idx[None, None, None, :] <= idx[None, None, :, None]) & am.bool()[:, None, None, :]

    def attend_and_pass_on(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mask.clone()[:, :, :, :]

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    steps = [torch.compile(f, backend="graphopt", options={"padded_outputs_unused": True}) for f in (build, attend_and_pass_on, attend)]
    q, k, v = qkv()
    am = torch.ones(B, S, dtype=torch.long)
    with graphopt.capture() as report:
        mask = steps[0](am)
        out1, passed = steps[1](q, k, v, mask)
        out2 = steps[2](q, k, v, passed)
    torch.testing.assert_close(out2, attend(q, k, v, build(am)))
    assert report.runtime["fast_path"] == 3 and not report.runtime.get("fallback"), report  # all three graphs


@pytest.mark.parametrize("kind", [MaskKind.SLIDING_CAUSAL, MaskKind.SLIDING_CAUSAL_PADDING, MaskKind.SLIDING_PACKED_CAUSAL])
def test_a_sliding_mask_is_never_dropped_as_causal_by_a_graph_that_receives_it(kind):
    """A published sliding mask passes only the guard of a version built for its window, never
    the causal or the packed one, whatever its source holds."""
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    source = torch.arange(4)[None] if kind == MaskKind.SLIDING_PACKED_CAUSAL else torch.ones(1, 4, dtype=torch.int64)
    handoff.publish(mask, kind, source, window=2)
    conditions = handoff.HandedOffMaskGuard(padded_outputs_unused=True)(mask)
    assert conditions == {"mask_known": True, "causal_kind": False}, conditions
    assert not all(handoff.HandedOffPackedGuard()(mask).values())
    assert all(handoff.HandedOffWindowGuard(2, padded_outputs_unused=True)(mask).values())
    assert handoff.HandedOffWindowGuard(3, padded_outputs_unused=True)(mask) == {"mask_known": True, "same_window": False}


def test_a_mask_without_a_window_never_passes_a_window_guard():
    mask = _causal(2, 4)
    handoff.publish(mask, "causal_padding", torch.ones(2, 4, dtype=torch.long))
    assert handoff.HandedOffWindowGuard(2, padded_outputs_unused=True)(mask) == {"mask_known": True, "same_window": False}


def test_a_sliding_mask_is_published_with_its_window():
    with pytest.raises(ValueError, match="needs its window"):
        handoff.publish(_causal(2, 4), MaskKind.SLIDING_CAUSAL, None)
    with pytest.raises(ValueError, match="has no window"):
        handoff.publish(_causal(2, 4), MaskKind.CAUSAL, None, window=2)


@pytest.mark.parametrize("masked_value, low", [(-3.4e38, True), (float("-inf"), True), (-100.0, False), (None, False)])
def test_eager_receivers_need_a_low_enough_masked_value(masked_value, low):
    """Eager attention adds the received mask to its scores: each guard then also needs the mask
    published as additive with a masked value at most the bound (here softcap 50's, -210), so a
    masked score gets probability exactly 0. A bool mask (None) or a mild masked value fails."""
    mask = torch.zeros(1, 1, 4, 4)
    positions = torch.arange(4)[None]
    handoff.publish(mask, MaskKind.PACKED_CAUSAL, positions, masked_value=masked_value)
    assert handoff.HandedOffPackedGuard(masked_at_most=-210.0)(mask) == {"mask_known": True, "packed": True, "masked_low": low}
    assert "masked_low" not in handoff.HandedOffPackedGuard()(mask)  # SDPA reads it as it is
    assert handoff.HandedOffMaskGuard(False, masked_at_most=-210.0)(mask)["masked_low"] is low
    handoff.publish(mask, MaskKind.SLIDING_PACKED_CAUSAL, positions, window=2, masked_value=masked_value)
    assert handoff.HandedOffWindowGuard(2, False, masked_at_most=-210.0)(mask)["masked_low"] is low


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[1, 1, 1, 1], [1, 1, 0, 0]], {"right_padded": True, "no_empty_rows": True, "no_padding": False}),
        ([[1, 1, 1, 1], [0, 0, 1, 1]], {"right_padded": False, "no_empty_rows": False, "no_padding": False}),
    ],
    ids=["right", "left"],
)
def test_padded_sliding_mask_conditions_and_row_boundaries(rows, expected):
    """A padded sliding mask runs each row as one document: the padding conditions of a causal
    padded mask, and boundaries at the rows (the packed layout, padded with T)."""
    mask = _causal(2, 4)
    handoff.publish(mask, MaskKind.SLIDING_CAUSAL_PADDING, torch.tensor(rows), window=2)
    assert handoff.HandedOffWindowGuard(2, padded_outputs_unused=False)(mask) == {"mask_known": True, "same_window": True, **expected}
    assert handoff.lookup(mask).cu_seqlens(2).tolist() == [0, 4, 8, 8, 8, 8, 8, 8, 8]


def test_a_returned_sliding_mask_is_published_with_its_window():
    def fn(q, k, v, am):
        idx = torch.arange(am.shape[1])
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 3)
        mask = band[None, None] & am.bool()[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mask

    from graphopt.inspection import GraphReport
    from graphopt.options import GraphoptOptions
    from graphopt.passes import run_passes
    from graphopt.passes.mask_elision import PublishMasks

    gm = capture(fn, *qkv(), torch.ones(B, S, dtype=torch.int64))
    report = GraphReport(graph_id=0, before="", quiet=True)
    _, ctx = run_passes(gm, GraphoptOptions(padded_outputs_unused=True), report)
    [published] = ctx.adapters_of(PublishMasks)
    assert (published.kind, published.window) == (MaskKind.SLIDING_CAUSAL_PADDING, 3)
    assert report.counts["mask_handoff"] == 1 and 3 in handoff.expected_windows()
    # its own SDPA (q/k without RoPE) runs per row with the window, RoPE not fused
    assert [(r.name, r.rule) for r in report.rewrites].count(("mask_elision", "sdpa_sliding_causal_padding")) == 1, report.rewrites
    assert any("RoPE not fused" in n for n in report.notes), report.notes
