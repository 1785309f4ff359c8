"""Dimension tags (:mod:`graphopt.passes.dimension_tags`), function by function, on shapes and
tags alone: every accepted op's exact output tags, and every way an op declines (None from
:func:`view_tags`, :class:`MixesPositions` with its reason from the others). B = 2, S = 6.
"""

from __future__ import annotations

import pytest
import torch.fx as fx

from graphopt.passes.dimension_tags import (
    MixesPositions,
    broadcast_tags,
    cat_tags,
    expand_tags,
    flatten_tags,
    getitem_tags,
    merge_tags,
    permute_tags,
    reduction_tags,
    squeeze_tags,
    stack_tags,
    tag_size,
    transpose_tags,
    unflatten_tags,
    unsqueeze_tags,
    view_tags,
)

B, S = 2, 6


@pytest.mark.parametrize(
    "tag, size, expected",
    [("B", 2, 1), ("S", 6, "T"), ("BS", 12, "T"), ("BS*2", 24, "2T"), ("4*BS", -1, "4T"), (None, 8, 8), (None, -1, -1)],
)
def test_tag_size(tag, size, expected):
    assert tag_size(tag, size, lambda k: "T" if k == 1 else f"{k}T") == expected


@pytest.mark.parametrize(
    "group, shape, expected",
    [
        ((None, None), (4, 8), None),
        (("B", "S"), (2, 6), "BS"),
        (("B", None, "S"), (2, 1, 6), "BS"),  # an untagged size-1 dim carries nothing
        ((None, "S"), (1, 6), "S"),
        (("BS",), (12,), "BS"),
        (("BS", None), (12, 2), "BS*2"),  # each token's k picks in a row
        ((None, "BS"), (4, 12), "4*BS"),  # all the tokens, once per expert
    ],
)
def test_merge_tags(group, shape, expected):
    assert merge_tags(group, shape) == expected


@pytest.mark.parametrize(
    "group, shape",
    [
        (("S", None), (6, 8)),  # the sequence with a feature dim
        (("S", "B"), (6, 2)),  # merged in the wrong order
        (("BS", "S"), (12, 6)),
        (("B", "S", None), (2, 6, 2)),  # tokens and picks, from unmerged tokens
        ((None, "BS", None), (4, 12, 2)),
    ],
)
def test_merge_tags_declines_mixing_tokens_and_features(group, shape):
    with pytest.raises(MixesPositions, match="flattens token and feature dimensions together"):
        merge_tags(group, shape)


@pytest.mark.parametrize(
    "in_shape, in_tags, out_shape, expected",
    [
        ((2, 6, 8), ("B", "S", None), (2, 6, 8), ("B", "S", None)),
        ((2, 6, 8), ("B", "S", None), (2, 6, 2, 4), ("B", "S", None, None)),  # heads split off
        ((2, 6, 2, 4), ("B", "S", None, None), (2, 6, 8), ("B", "S", None)),
        ((2, 6, 8), ("B", "S", None), (12, 8), ("BS", None)),
        ((12, 8), ("BS", None), (2, 6, 8), ("B", "S", None)),
        ((2, 6, 8), ("B", "S", None), (2, 1, 6, 8), ("B", None, "S", None)),  # a size-1 dim inserted
        ((1, 6, 8), (None, "S", None), (6, 8), ("S", None)),  # an untagged size-1 dim dropped
        ((6, 8), ("S", None), (1, 6, 8), (None, "S", None)),
        ((2, 2, 2, 6, 4), ("B", None, None, "S", None), (2, 4, 6, 4), ("B", None, "S", None)),
        ((12, 2), ("BS", None), (24,), ("BS*2",)),  # a router's (tokens, k) picks flattened
        ((24, 8), ("BS*2", None), (12, 2, 8), ("BS", None, None)),  # and back, to sum over the picks
        ((4, 12, 8), (None, "BS", None), (48, 8), ("4*BS", None)),  # Llama 4: per expert, flattened
        ((48, 8), ("4*BS", None), (4, 12, 8), (None, "BS", None)),
    ],
)
def test_view_tags(in_shape, in_tags, out_shape, expected):
    assert view_tags(list(in_shape), in_tags, list(out_shape), B, S) == expected


@pytest.mark.parametrize(
    "in_shape, in_tags, out_shape",
    [
        ((2, 6, 8), ("B", "S", None), (2, 48)),  # the sequence merged with features
        ((2, 6, 8), ("B", "S", None), (96,)),
        ((12, 8), ("BS", None), (3, 4, 8)),  # the merged tokens split into other than (B, S)
        ((12, 8), ("BS", None), (4, 3, 8)),
        ((2, 6, 8), ("B", "S", None), (2, 6, 4)),  # not a view: the sizes do not match
        ((2, 6, 8), ("B", "S", None), (2, 3, 16)),
        ((24, 8), ("BS*2", None), (2, 12, 8)),  # the picks split the other way round
        ((24, 8), ("BS*2", None), (2, 6, 2, 8)),  # split into more than (tokens, k)
        ((48, 8), ("4*BS", None), (12, 4, 8)),
    ],
)
def test_view_tags_declines_with_none(in_shape, in_tags, out_shape):
    assert view_tags(list(in_shape), in_tags, list(out_shape), B, S) is None


@pytest.mark.parametrize(
    "tags, n_sizes, expected",
    [
        (("B", "S", None), 3, ("B", "S", None)),
        ((None, "S", None), 4, (None, None, "S", None)),  # a new leading dim is untagged
    ],
)
def test_expand_tags(tags, n_sizes, expected):
    assert expand_tags(tags, n_sizes) == expected


@pytest.mark.parametrize(
    "dims, expected",
    [
        ((1, 2), ("B", "S", None, None)),
        ((-2, -3), ("B", "S", None, None)),
        ((0, 0), ("B", None, "S", None)),
    ],
)
def test_transpose_tags(dims, expected):
    assert transpose_tags(("B", None, "S", None), *dims) == expected


@pytest.mark.parametrize(
    "dims, expected",
    [
        ((0, 2, 1, 3), ("B", None, "S", None)),
        ((-1, -2, -3, -4), (None, None, "S", "B")),
    ],
)
def test_permute_tags(dims, expected):
    assert permute_tags(("B", "S", None, None), dims) == expected


@pytest.mark.parametrize(
    "dim, expected",
    [(0, (None, "S", None)), (1, ("S", None, None)), (-1, ("S", None, None)), (-3, (None, "S", None))],
)
def test_unsqueeze_tags(dim, expected):
    assert unsqueeze_tags(("S", None), dim) == expected


@pytest.mark.parametrize(
    "dims, expected",
    [
        ((), ("B", "S")),  # every size-1 dim
        ((1,), ("B", "S", None)),
        ((-3,), ("B", "S", None)),
        ((0,), ("B", None, "S", None)),  # a dim of size 2 stays
        ((1, 3), ("B", "S")),
        (((1, 3),), ("B", "S")),  # x.squeeze((1, 3)): the tuple form, each dim squeezed
    ],
)
def test_squeeze_tags(dims, expected):
    assert squeeze_tags(("B", None, "S", None), (2, 1, 6, 1), dims) == expected


def test_squeeze_over_a_dim_that_is_not_a_constant_is_declined():
    with pytest.raises(MixesPositions, match="not constant ints"):
        squeeze_tags(("B", None, "S", None), (2, 1, 6, 1), ("one",))


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (0, 1, ("BS", None, None)),
        (-4, -3, ("BS", None, None)),
        (2, -1, ("B", "S", None)),  # the feature dims
        (3, 3, ("B", "S", None, None)),
        (1, 1, ("B", "S", None, None)),  # one dim: itself
    ],
)
def test_flatten_tags(start, end, expected):
    assert flatten_tags(("B", "S", None, None), (2, 6, 2, 4), start, end) == expected


@pytest.mark.parametrize("start, end", [(1, 2), (0, -1)])
def test_flatten_tags_declines_tokens_with_features(start, end):
    with pytest.raises(MixesPositions, match="flattens token and feature dimensions together"):
        flatten_tags(("B", "S", None), (2, 6, 8), start, end)


@pytest.mark.parametrize(
    "tags, dim, sizes, expected",
    [
        (("BS", None), 0, (2, 6), ("B", "S", None)),
        (("BS", None), -2, (2, 6), ("B", "S", None)),
        (("BS", None), 1, (2, 4), ("BS", None, None)),  # a feature dim splits freely
        (("B", "S", None), -1, (2, 2, 2), ("B", "S", None, None, None)),
    ],
)
def test_unflatten_tags(tags, dim, sizes, expected):
    assert unflatten_tags(tags, dim, sizes, B, S) == expected


@pytest.mark.parametrize(
    "tags, dim, sizes",
    [
        (("BS", None), 0, (3, 4)),  # merged tokens split into other than (B, S)
        (("BS", None), 0, (6, 2)),
        (("S", None), 0, (2, 3)),  # the sequence split in two
        (("B", "S", None), 0, (1, 2)),
    ],
)
def test_unflatten_tags_declines_splitting_a_token_dim(tags, dim, sizes):
    with pytest.raises(MixesPositions, match="splits a token dimension"):
        unflatten_tags(tags, dim, sizes, B, S)


@pytest.mark.parametrize(
    "operands, rank, expected",
    [
        ([("x", ("B", "S", None), (2, 6, 8)), ("w", None, (8,))], 3, ("B", "S", None)),  # x * weight
        ([("x", ("B", "S", None), (2, 6, 8)), ("c", None, (1, 1, 8))], 3, ("B", "S", None)),
        ([("x", (None, "S", None), (1, 6, 8)), ("y", ("B", None, None), (2, 1, 8))], 3, ("B", "S", None)),
        ([("x", ("B", "S", None), (2, 6, 8)), ("y", ("B", "S", None), (2, 6, 8))], 3, ("B", "S", None)),
        ([("cos", (None, "S", None), (1, 6, 4)), ("x", ("B", None, "S", None), (2, 3, 6, 4))], 4, ("B", None, "S", None)),
        ([("x", ("BS", None), (12, 8))], 2, ("BS", None)),
        ([("x", (), ()), ("y", ("S",), (6,))], 1, ("S",)),  # a 0-dim value
    ],
)
def test_broadcast_tags(operands, rank, expected):
    assert broadcast_tags(operands, rank) == expected


@pytest.mark.parametrize(
    "operands, rank, reason",
    [
        ([("x", ("B", "S"), (2, 6)), ("y", ("S", "B"), (6, 2))], 2, "combines different token dimensions"),
        ([("x", ("BS", None), (12, 8)), ("y", ("S", None), (12, 8))], 2, "combines different token dimensions"),
        (
            [("x", ("B", "S", None), (2, 6, 8)), ("bias", None, (6, 8))],
            3,
            "combines the tokens with bias, a constant of their shape",
        ),
        (
            [("x", ("B", "S", None), (2, 6, 8)), ("m", None, (2, 1, 1))],
            3,
            "combines the tokens with m, a constant of their shape",
        ),
        ([("x", ("S", None), (6, 1)), ("y", (None, "S"), (1, 6))], 2, "would carry one token dimension twice"),
        # a token value whose dim of the batch's size is not tracked: unpadded, it would broadcast
        # the packed row against B copies
        (
            [("q", ("B", "S", None), (2, 6, 8)), ("scale", (None, "S", None), (2, 6, 1))],
            3,
            "combines the tokens with an untracked dimension of scale of size 2",
        ),
    ],
)
def test_broadcast_tags_declines(operands, rank, reason):
    with pytest.raises(MixesPositions, match=reason):
        broadcast_tags(operands, rank)


def _node() -> fx.Node:
    return fx.Graph().placeholder("n")


@pytest.mark.parametrize(
    "index, expected",
    [
        ((Ellipsis, slice(None, 4)), ("B", "S", None)),  # a feature slice
        ((slice(None), slice(None), 0), ("B", "S")),  # a feature index
        ((Ellipsis, None), ("B", "S", None, None)),
        (None, (None, "B", "S", None)),
        ((slice(None), slice(0, 6)), ("B", "S", None)),  # a full slice of the sequence
        ((slice(None), slice(None, None, 1)), ("B", "S", None)),
        ((slice(None), slice(-6, None)), ("B", "S", None)),
        ((slice(None), Ellipsis, 0), ("B", "S")),
        (slice(None), ("B", "S", None)),
        ((Ellipsis, slice(None, _node())), ("B", "S", None)),  # a symbolic bound on a feature dim
    ],
)
def test_getitem_tags(index, expected):
    assert getitem_tags(("B", "S", None), (2, 6, 8), index) == expected


@pytest.mark.parametrize(
    "index, reason",
    [
        ((slice(None), slice(1, None)), "slices a token dimension"),
        ((slice(None), slice(None, -1)), "slices a token dimension"),
        ((slice(None), slice(None, None, 2)), "slices a token dimension"),
        ((slice(None), slice(None, _node())), "slices a token dimension"),  # a symbolic bound
        ((slice(None), 3), "indexes a token dimension"),
        (0, "indexes a token dimension"),
        ((Ellipsis, -1, slice(None)), "indexes a token dimension"),
        ((slice(None), _node()), "indexes with a tensor or a symbolic value"),
        ((True,), "indexes with a tensor or a symbolic value"),
        ((slice(None), slice(None), [0, 1]), "indexes with a tensor or a symbolic value"),
    ],
)
def test_getitem_tags_declines(index, reason):
    with pytest.raises(MixesPositions, match=reason):
        getitem_tags(("B", "S", None), (2, 6, 8), index)


@pytest.mark.parametrize(
    "dims, keepdim, expected",
    [
        (-1, False, ("B", "S", None)),
        (-1, True, ("B", "S", None, None)),
        (2, False, ("B", "S", None)),
        ((2, 3), False, ("B", "S")),
        ([-1, -2], True, ("B", "S", None, None)),
    ],
)
def test_reduction_tags(dims, keepdim, expected):
    assert reduction_tags(("B", "S", None, None), dims, keepdim) == expected


@pytest.mark.parametrize(
    "dims, reason",
    [
        (None, "reduces over all positions"),
        (1, "reduces over a token dimension"),
        (-4, "reduces over a token dimension"),
        ((0, 2), "reduces over a token dimension"),
    ],
)
def test_reduction_tags_declines(dims, reason):
    with pytest.raises(MixesPositions, match=reason):
        reduction_tags(("B", "S", None, None), dims, keepdim=False)


@pytest.mark.parametrize(
    "operand_tags, dim, expected",
    [
        ([("B", "S", None), ("B", "S", None)], -1, ("B", "S", None)),
        ([("B", "S", None), ("B", "S", None), ("B", "S", None)], 2, ("B", "S", None)),
        ([("B", "S", None)], 1, ("B", "S", None)),  # one value is itself, whatever the dim
    ],
)
def test_cat_tags(operand_tags, dim, expected):
    assert cat_tags(operand_tags, dim) == expected


@pytest.mark.parametrize(
    "operand_tags, dim, reason",
    [
        ([("B", "S", None), ("B", "S", None)], 1, "concatenates along a token dimension"),
        ([("B", "S", None), ("B", "S", None)], -3, "concatenates along a token dimension"),
        ([("B", "S", None), None], -1, "joins token and non-token values"),
        ([("B", "S", None), ("B", None, None)], -1, "joins token and non-token values"),
    ],
)
def test_cat_tags_declines(operand_tags, dim, reason):
    with pytest.raises(MixesPositions, match=reason):
        cat_tags(operand_tags, dim)


@pytest.mark.parametrize(
    "dim, expected",
    [(0, (None, "S", None)), (1, ("S", None, None)), (-1, ("S", None, None)), (2, ("S", None, None))],
)
def test_stack_tags(dim, expected):
    assert stack_tags([("S", None), ("S", None)], dim) == expected


def test_stack_tags_declines_joining_token_and_non_token_values():
    with pytest.raises(MixesPositions, match="joins token and non-token values"):
        stack_tags([("S", None), (None, None)], 0)
