"""Mask recognition by meaning: differently spelled masks of the same meaning are recognized, masks
of another meaning are not. Graphs are captured with Dynamo and analysed without compiling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt.masks import MaskKind, document_ids, document_starts, find_masks
from tests.support.mask_graphs import B, H, S, capture, qkv, sdpa_with

def broadcast_spelling(am):  # transformers' non-vmap sdpa_mask
    idx = torch.arange(am.shape[1])
    causal = idx[None, None, None, :] <= idx[None, None, :, None]
    return causal & am.bool()[:, None, None, :]


def tril_spelling(am):
    ones = torch.ones(am.shape[1], am.shape[1], dtype=torch.bool)
    return torch.tril(ones)[None, None] & (am[:, None, None, :] > 0)


def where_spelling(am):
    idx = torch.arange(am.shape[1])
    pad = am.to(torch.bool).unsqueeze(1).unsqueeze(1).expand(-1, 1, am.shape[1], -1)
    return torch.where(idx[None, :] > idx[:, None], False, pad)


def sliding_window(am):
    idx = torch.arange(am.shape[1])
    window = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 3)
    return window[None, None] & am.bool()[:, None, None, :]


def bidirectional(am):
    return am.bool()[:, None, None, :].expand(-1, 1, am.shape[1], -1)


def am_right():
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 5:] = 0
    return am


@pytest.mark.parametrize("spelling", [broadcast_spelling, tril_spelling, where_spelling])
def test_causal_padding_is_recognized_in_any_spelling(spelling):
    gm = capture(sdpa_with(spelling), *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.CAUSAL_PADDING, cand.reason
    assert cand.input.name.endswith("am_") and len(cand.sdpa_users) == 1


def chunked(am):  # attention within chunks of 3 (Llama 4's chunked attention): no sliding window
    idx = torch.arange(am.shape[1])
    same_chunk = idx[None, :] // 3 == idx[:, None] // 3
    return ((idx[None, :] <= idx[:, None]) & same_chunk)[None, None] & am.bool()[:, None, None, :]


def widened(am):  # a sliding window of 3 that also always sees the first token (a "sink" token)
    return sliding_window(am) | ((torch.arange(am.shape[1]) == 0)[None, None, None, :] & am.bool()[:, None, None, :])


def chunked_from_first_token(am):  # transformers' chunked_overlay: chunks start at the first real token
    idx = torch.arange(am.shape[1])
    first = (am.cumsum(-1) == 0).sum(-1)[:, None, None]
    same_chunk = (idx[None, :, None] - first) // 3 == (idx[None, None, :] - first) // 3
    return ((idx[None, :] <= idx[:, None])[None] & same_chunk & am.bool()[:, None, :])[:, None]


def chunks_that_see_the_previous_chunk(am):
    idx = torch.arange(am.shape[1])
    near = (idx[:, None] // 3 - idx[None, :] // 3) <= 1
    return ((idx[None, :] <= idx[:, None]) & near)[None, None] & am.bool()[:, None, None, :]


@pytest.mark.parametrize("spelling", [chunked, chunked_from_first_token])
def test_chunked_attention_is_recognized_with_its_chunk(spelling):
    """Llama 4's chunked layers, in both ways of counting chunks on padded rows (they agree on the
    rows the right-padding guard admits, the only ones probed for this kind)."""
    (cand,) = find_masks(capture(sdpa_with(spelling), *qkv(), am_right()))
    assert cand.kind == MaskKind.CHUNKED_CAUSAL_PADDING and cand.chunk == 3 and cand.window is None, cand.reason
    assert cand.kind.base == MaskKind.CAUSAL_PADDING and cand.kind.chunked and not cand.kind.sliding


def test_chunked_attention_of_no_input_and_of_packed_documents_is_recognized():
    """Without an input chunks count by index; in packed rows by position (each document's
    positions cut where they reach a multiple of the chunk)."""

    def no_input(q, k, v):
        idx = torch.arange(q.shape[2])
        mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] // 3 == idx[:, None] // 3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    (cand,) = find_masks(capture(no_input, *qkv()))
    assert cand.kind == MaskKind.CHUNKED_CAUSAL and cand.chunk == 3, cand.reason

    def packed(q, k, v, position_ids):
        docs = document_ids(position_ids)
        same_chunk = position_ids[:, :, None] // 3 == position_ids[:, None, :] // 3
        idx = torch.arange(position_ids.shape[1])
        mask = (idx[None, :] <= idx[:, None]) & (docs[:, :, None] == docs[:, None, :]) & same_chunk
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]])
    (cand,) = find_masks(capture(packed, *qkv(), positions))
    assert cand.kind == MaskKind.CHUNKED_PACKED_CAUSAL and cand.chunk == 3, cand.reason
    starts = document_starts(torch.tensor([[5, 6, 7, 8, 0, 1, 2, 3]]), 3)
    assert starts.tolist() == [[True, True, False, False, True, False, False, True]]


@pytest.mark.parametrize("spelling", [bidirectional, widened, chunks_that_see_the_previous_chunk])
def test_other_masks_are_not_recognized(spelling):
    gm = capture(sdpa_with(spelling), *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.UNKNOWN and cand.window is None and cand.chunk is None
    assert "neither causal" in cand.reason


def test_a_sliding_window_is_recognized_with_its_window():
    gm = capture(sdpa_with(sliding_window), *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.SLIDING_CAUSAL_PADDING and cand.window == 3, cand.reason
    assert cand.kind.unwindowed == MaskKind.CAUSAL_PADDING


@pytest.mark.parametrize("window", [1, 2, 5, S - 1])
def test_sliding_windows_of_any_width_shorter_than_the_sequence_are_proven(window):
    def spelling(am):  # transformers' sliding_window_overlay: kv > q - window
        idx = torch.arange(am.shape[1])
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)
        return torch.where(band[None, None] & am.bool()[:, None, None, :], 0.0, torch.finfo(torch.float32).min)

    gm = capture(sdpa_with(spelling), *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.SLIDING_CAUSAL_PADDING and cand.window == window, cand.reason
    assert cand.masked_value == torch.finfo(torch.float32).min


def test_a_window_as_long_as_the_sequence_is_plain_causal():
    """At this length the window hides nothing: the mask is causal ∧ padding (a longer length is
    proven when it arrives, and a window then shows)."""

    def spelling(am):
        idx = torch.arange(am.shape[1])
        return ((idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - S))[None, None] & am.bool()[:, None, None, :]

    (cand,) = find_masks(capture(sdpa_with(spelling), *qkv(), am_right()))
    assert cand.kind == MaskKind.CAUSAL_PADDING and cand.window is None


def test_a_sliding_window_of_no_input_and_of_packed_documents_is_recognized():
    def no_input(q, k, v):
        idx = torch.arange(q.shape[2])
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band[None, None])

    (cand,) = find_masks(capture(no_input, *qkv()))
    assert cand.kind == MaskKind.SLIDING_CAUSAL and cand.window == 2, cand.reason

    def packed(q, k, v, position_ids):
        docs = document_ids(position_ids)
        idx = torch.arange(position_ids.shape[1])
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 3)
        mask = band[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]])
    (cand,) = find_masks(capture(packed, *qkv(), positions))
    assert cand.kind == MaskKind.SLIDING_PACKED_CAUSAL and cand.window == 3, cand.reason


def test_additive_mask_into_softmax_is_recognized_with_its_masked_value():
    def fn(q, k, v, am):
        mask = torch.where(broadcast_spelling(am), 0.0, torch.finfo(torch.float32).min)
        scores = q @ k.transpose(-1, -2) + mask
        return torch.softmax(scores, dim=-1) @ v

    gm = capture(fn, *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.CAUSAL_PADDING and len(cand.additive_users) == 1
    assert cand.masked_value == torch.finfo(torch.float32).min


def test_mask_with_other_users_is_left_alone():
    def fn(q, k, v, am):
        mask = broadcast_spelling(am)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mask.sum()

    gm = capture(fn, *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.UNKNOWN and "derived from the mask" in cand.reason


def test_plain_causal_mask_needs_no_input():
    def fn(q, k, v):
        idx = torch.arange(q.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(idx[None, :] <= idx[:, None])[None, None])

    (cand,) = find_masks(capture(fn, *qkv()))
    assert cand.kind == MaskKind.CAUSAL and cand.input is None


def test_packed_block_causal_mask_is_recognized():
    def fn(q, k, v, pos):
        docs = document_ids(pos)
        idx = torch.arange(pos.shape[1])
        mask = (idx[None, :] <= idx[:, None])[None] & (docs[:, :, None] == docs[:, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    (cand,) = find_masks(capture(fn, *qkv(), pos))
    assert cand.kind == MaskKind.PACKED_CAUSAL, cand.reason


def test_document_ids_split_where_positions_do_not_step_by_one():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 3]]


def _additive(am):
    return torch.where(broadcast_spelling(am), 0.0, torch.finfo(torch.float32).min)


def _eager_with_sinks(cat_dim: int = -1, softmax_dim: int = -1):
    """gpt-oss's eager attention: a learned sink logit per head joins each row before the softmax."""

    def fn(q, k, v, am, sink):
        scores = q @ k.transpose(-1, -2) + _additive(am)
        if cat_dim == -1:
            combined = torch.cat([scores, sink.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)], dim=-1)
        else:
            combined = torch.cat([scores, sink.reshape(1, -1, 1, 1).expand(q.shape[0], -1, -1, q.shape[2])], dim=-2)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=softmax_dim)
        return (probs[..., :S] if cat_dim == -1 else probs[:, :, :S]) @ v

    return fn


def _sink() -> torch.Tensor:
    return torch.zeros(H, requires_grad=True)


def test_scores_with_a_sink_logit_concatenated_along_the_keys_are_attention():
    (cand,) = find_masks(capture(_eager_with_sinks(), *qkv(), am_right(), _sink()))
    assert cand.kind == MaskKind.CAUSAL_PADDING and len(cand.additive_users) == 1, cand.reason


@pytest.mark.parametrize("cat_dim, softmax_dim", [(-1, -2), (-2, -1)], ids=["softmax_over_queries", "cat_along_queries"])
def test_scores_that_mix_query_rows_are_not_attention(cat_dim, softmax_dim):
    """A softmax over the queries reads several query rows of the sum, so a mask equal to another
    only at real rows could not take its place; a concatenation along the queries is not a form
    attention takes. Both are declined."""
    (cand,) = find_masks(capture(_eager_with_sinks(cat_dim, softmax_dim), *qkv(), am_right(), _sink()))
    assert cand.kind == MaskKind.UNKNOWN and not cand.additive_users
    assert "not attention" in cand.reason


def test_a_query_scale_built_from_positions_is_not_a_mask():
    """Llama 4's attention temperature: a (B, 1, S, 1) factor of the query, built from the
    positions alone. One value per query row, no key dimension: not a mask candidate (it would
    be reported as a mask used by something that is not attention)."""
    def fn(q, k, v, position_ids):
        scale = torch.log1p(torch.floor((position_ids.float() + 1.0) / 8.0)) * 0.1 + 1.0
        return F.scaled_dot_product_attention(q * scale[:, None, :, None], k, v, is_causal=True)

    assert find_masks(capture(fn, *qkv(), torch.arange(S).expand(B, S).clone())) == []
