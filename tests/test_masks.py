"""Mask recognition by meaning: differently spelled masks of the same meaning are recognized, masks
of another meaning are not. Graphs are captured with Dynamo and analysed without compiling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt.masks import MaskKind, document_ids, find_masks
from tests.support.mask_graphs import B, S, capture, qkv, sdpa_with

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


@pytest.mark.parametrize("spelling", [sliding_window, bidirectional])
def test_other_masks_are_not_recognized(spelling):
    gm = capture(sdpa_with(spelling), *qkv(), am_right())
    (cand,) = find_masks(gm)
    assert cand.kind == MaskKind.UNKNOWN
    assert "neither causal" in cand.reason


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
