"""Dimension tags: which dimension of a value holds the token positions, for :mod:`graphopt.passes.unpad`.

Unpadding runs every token-wise op on the packed tokens, (1, T), instead of the padded batch,
(B, S). It proves an op token-wise by tracking, for every value, what each of its dimensions is:

- ``"B"``: the batch. Size B in the padded graph, 1 in the unpadded one.
- ``"S"``: the sequence. Size S in the padded graph, T in the unpadded one.
- ``"BS"``: batch and sequence merged into one dimension (``hidden.view(-1, H)``). Size B*S in the
  padded graph, T in the unpadded one.
- ``"BS*k"``: the merged tokens, each repeated ``k`` times in a row (``topk_index.reshape(-1)``:
  token ``t``'s ``k`` experts at ``t*k .. t*k+k-1``). Size B*S*k padded, T*k unpadded.
- ``"k*BS"``: the merged tokens, the whole run of them ``k`` times over (``x.repeat(k, 1)``, one
  run per expert). Size k*B*S padded, k*T unpadded.
- ``"sorted by <node>"``: a merged token dimension reordered by the permutation a ``sort`` node
  found (rows grouped by expert). Same size as the dimension sorted.
- ``None``: any other dimension (features, heads, a broadcast's size 1), the same in both graphs.

A value's tags are a tuple with one entry per dimension; a value that is not a token value at all
(parameters, constants, the label path) has tags None, and a node that returns several values
(``chunk``, the fused loss) has a list of their tags. :data:`PADDED_ROWS` tags the one value that
has left the packed layout: the fused loss's logits, written straight to their padded rows.

Each function here gives the tags of an op's output from the tags and sizes of its inputs (the
padded graph's sizes, as concrete hints), or declines when the op would mix positions: it raises
:class:`MixesPositions`, whose message says how (the caller names the op). :func:`view_tags`
returns None instead, and its caller words the decline with the shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

# Tag of the fused loss's logits output in the unpadded graph: already at padded positions, plus
# one extra row (the bucket's extra tokens) that the getitem reading it cuts off.
PADDED_ROWS = "padded+1"


class MixesPositions(Exception):
    """The op would mix the values of different token positions; the message says how."""


def tag_size(tag: str | None, size, packed):
    """The size argument, in the unpadded graph, of a dimension tagged ``tag`` whose size
    argument in the padded graph is ``size``: 1 for the batch, ``packed(factor)`` for the sequence
    or a merged token dimension (``packed`` gives the packed length times ``factor``: 1 for
    ``S`` and ``BS``, ``k`` for ``BS*k`` and ``k*BS``), ``size`` otherwise."""
    if tag is None:
        return size
    if tag == "B":
        return 1
    return packed(repeats(tag))


def repeats(tag: str) -> int:
    """How many times a token dimension tagged ``tag`` holds each token: ``k`` for ``BS*k`` and
    ``k*BS``, 1 for the others (a sorted dimension is tagged by its sort, whose source says)."""
    if tag.startswith("BS*"):
        return int(tag[3:])
    if tag.endswith("*BS"):
        return int(tag[:-3])
    return 1


def _merged(tags: list, sizes: list[int]) -> str | None:
    """The tag of dimensions ``tags`` (sizes ``sizes``) merged into one, where the merge keeps
    every token's values together or in whole runs: ('B', 'S'), ('BS', k) and (k, 'BS'); None
    for any other merge of a token dimension."""
    if tags == ["B", "S"]:
        return "BS"
    if tags == ["BS", None]:
        return f"BS*{sizes[1]}"
    if tags == [None, "BS"]:
        return f"{sizes[0]}*BS"
    return None


def _split(tag: str, sizes: list[int], B: int, S: int) -> list | None:
    """The tags of a dimension tagged ``tag`` split into dims of ``sizes``, the inverse of
    :func:`_merged`; None for any other split of a token dimension."""
    if tag == "BS" and sizes == [B, S]:
        return ["B", "S"]
    k = repeats(tag)
    if tag.startswith("BS*") and sizes == [B * S, k]:
        return ["BS", None]
    if tag.endswith("*BS") and sizes == [k, B * S]:
        return [None, "BS"]
    return None


def merge_tags(group: Sequence, shape: Sequence[int]) -> str | None:
    """The tag of dimensions tagged ``group`` (sizes ``shape``) flattened into one: None, 'BS'
    for ('B', 'S'), or the single tag of the group. Untagged dimensions of size 1 do not count;
    raises :class:`MixesPositions` when token and feature dimensions would mix."""
    tagged = [t for t in group if t is not None]
    if not tagged:
        return None
    kept = [(t, s) for t, s in zip(group, shape) if t is not None or s != 1]
    if len(kept) == 1:
        return kept[0][0]
    merged = _merged([t for t, _ in kept], [s for _, s in kept])
    if merged is None:
        raise MixesPositions("flattens token and feature dimensions together")
    return merged


def view_tags(in_shape: list[int], in_tags: tuple, out_shape: list[int], B: int, S: int) -> tuple | None:
    """Tags of a view's output, or None when the view mixes token and feature dimensions.

    Dimensions are grouped greedily by equal products; a group keeps its tag when it maps one
    dim to one dim, merges ('B', 'S') into 'BS', ('BS', k) into 'BS*k', (k, 'BS') into 'k*BS',
    or splits one of those back."""
    out: list = []
    i = j = 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        # size-1 dims without a tag carry nothing
        if i < n and in_shape[i] == 1 and in_tags[i] is None and not (j < m and out_shape[j] == 1):
            i += 1
            continue
        if j < m and out_shape[j] == 1 and not (i < n and in_shape[i] == 1):
            out.append(None)
            j += 1
            continue
        if i >= n or j >= m:
            return None
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= n:
                    return None
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= m:
                    return None
                gj.append(j)
                pj *= out_shape[j]
        i += 1
        j += 1
        tags = [in_tags[k] for k in gi]
        if not any(tags):
            out.extend([None] * len(gj))
        elif len(gi) == 1 and len(gj) == 1:
            out.append(tags[0])
        elif len(gj) == 1 and _merged(tags, [in_shape[k] for k in gi]) is not None:
            out.append(_merged(tags, [in_shape[k] for k in gi]))
        elif len(gi) == 1 and tags[0] is not None and _split(tags[0], [out_shape[k] for k in gj], B, S) is not None:
            out.extend(_split(tags[0], [out_shape[k] for k in gj], B, S))
        else:
            return None
    return tuple(out)


def expand_tags(tags: tuple, n_sizes: int) -> tuple:
    """``x.expand(*sizes)`` with ``n_sizes`` sizes: new leading dimensions carry no tag."""
    return (None,) * (n_sizes - len(tags)) + tuple(tags)


def transpose_tags(tags: tuple, dim0: int, dim1: int) -> tuple:
    x = list(tags)
    a, b = dim0 % len(x), dim1 % len(x)
    x[a], x[b] = x[b], x[a]
    return tuple(x)


def permute_tags(tags: tuple, dims: Sequence[int]) -> tuple:
    return tuple(tags[d % len(tags)] for d in dims)


def unsqueeze_tags(tags: tuple, dim: int) -> tuple:
    d = dim % (len(tags) + 1)
    return tuple(tags[:d]) + (None,) + tuple(tags[d:])


def squeeze_tags(tags: tuple, shape: Sequence[int], dims: Sequence) -> tuple:
    """``x.squeeze(*dims)`` of a value of sizes ``shape``: the squeezed dims of size 1 go, with
    their tags; no ``dims`` squeezes every dim of size 1; a tuple of dims squeezes each. A dim
    that is not a constant int raises :class:`MixesPositions` (which dims go is not known)."""
    rank = len(tags)
    flat = [d for entry in dims for d in (entry if isinstance(entry, (tuple, list)) else (entry,))]
    if any(not isinstance(d, int) for d in flat):
        raise MixesPositions(f"squeeze over {tuple(dims)}: dims that are not constant ints are not tracked")
    squeezed = [d % rank for d in flat] if dims else [d for d in range(rank) if shape[d] == 1]
    return tuple(t for i, t in enumerate(tags) if not (i in squeezed and shape[i] == 1))


def flatten_tags(tags: tuple, shape: Sequence[int], start: int, end: int) -> tuple:
    """``x.flatten(start, end)`` of a value of sizes ``shape``: the flattened dims' tags merge
    (:func:`merge_tags`)."""
    rank = len(tags)
    start, end = start % rank, end % rank
    merged = merge_tags(tags[start : end + 1], shape[start : end + 1])
    return tuple(tags[:start]) + (merged,) + tuple(tags[end + 1 :])


def unflatten_tags(tags: tuple, dim: int, sizes: Sequence[int], B: int, S: int) -> tuple:
    """``x.unflatten(dim, ...)`` into dims of ``sizes``: an untagged dim splits into untagged
    dims, a merged token dim back into what it merged (see :func:`view_tags`); any other split of
    a token dim raises :class:`MixesPositions`."""
    d = dim % len(tags)
    if tags[d] is None:
        return tuple(tags[:d]) + (None,) * len(sizes) + tuple(tags[d + 1 :])
    split = _split(tags[d], list(sizes), B, S)
    if split is None:
        raise MixesPositions("splits a token dimension")
    return tuple(tags[:d]) + tuple(split) + tuple(tags[d + 1 :])


def broadcast_tags(operands: Sequence[tuple[str, tuple | None, Sequence[int]]], rank: int) -> tuple:
    """Tags of an elementwise op's output of ``rank`` dims from its tensor operands, each
    ``(name, tags, shape)`` (tags None for a value that is not a token value). Operands align
    at their last dim, as broadcasting does. Raises :class:`MixesPositions` when two operands
    tag one dim differently, when a value that is not a token value has a size other than 1
    under a token dim (a constant of the tokens' shape: the op would combine every token with
    a fixed position's value), or when the output would carry one tag twice."""
    result: list = [None] * rank
    for _, tags, shape in operands:
        for k, (tag, _size) in enumerate(zip(reversed(tags or (None,) * len(shape)), reversed(shape))):
            pos = rank - 1 - k
            if tag is not None:
                if result[pos] not in (None, tag):
                    raise MixesPositions("combines different token dimensions")
                result[pos] = tag
    for name, tags, shape in operands:
        for k, (tag, size) in enumerate(zip(reversed(tags or (None,) * len(shape)), reversed(shape))):
            if tag is None and result[rank - 1 - k] is not None and size != 1:
                if not tags:
                    raise MixesPositions(f"combines the tokens with {name}, a constant of their shape")
                # a token value with an untracked dimension under a token dimension of another
                # operand (e.g. expanded to a literal batch size): its positions are not known
                raise MixesPositions(f"combines the tokens with an untracked dimension of {name} of size {size}")
    named = [t for t in result if t is not None]
    if len(named) != len(set(named)):
        raise MixesPositions("would carry one token dimension twice")
    return tuple(result)


def getitem_tags(tags: tuple, shape: Sequence[int], index) -> tuple:
    """``x[index]`` of a value of sizes ``shape``: ``...``, None, full slices of token dims, and
    slices and ints of other dims. Raises :class:`MixesPositions` for a partial slice or an int
    index of a token dim, and for a tensor or symbolic index."""
    index = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = [], 0
    for item in index:
        if item is Ellipsis:
            for _ in range(len(shape) - n_real):
                out.append(tags[dim])
                dim += 1
        elif item is None:
            out.append(None)
        elif isinstance(item, slice):
            if tags[dim] is not None and not _is_full(item, shape[dim]):
                raise MixesPositions("slices a token dimension")
            out.append(tags[dim])
            dim += 1
        elif isinstance(item, int) and not isinstance(item, bool):
            if tags[dim] is not None:
                raise MixesPositions("indexes a token dimension")
            dim += 1
        else:
            raise MixesPositions("indexes with a tensor or a symbolic value")
    out.extend(tags[dim:])
    return tuple(out)


def _is_full(item: slice, size: int) -> bool:
    """The slice takes every index of a dim of ``size``, with constant bounds."""
    constant = all(not isinstance(v, fx.Node) for v in (item.start, item.stop, item.step))
    return constant and range(*item.indices(size)) == range(size)


def reduction_tags(tags: tuple, dims, keepdim: bool) -> tuple:
    """A reduction (``mean``, ``sum``, ...) over ``dims`` (an int, several, or None for all):
    reduced dims go (stay untagged with ``keepdim``). Raises :class:`MixesPositions` when it
    reduces over all dims or over a token dim."""
    if dims is None:
        raise MixesPositions("reduces over all positions")
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = len(tags)
    dims = [d % rank for d in dims]
    if any(tags[d] is not None for d in dims):
        raise MixesPositions("reduces over a token dimension")
    if keepdim:
        return tuple(None if i in dims else t for i, t in enumerate(tags))
    return tuple(t for i, t in enumerate(tags) if i not in dims)


def cat_tags(operand_tags: Sequence, dim: int) -> tuple:
    """``torch.cat`` along ``dim`` of values tagged ``operand_tags``: one value is itself; more
    must have equal tags and join along an untagged dim, or it raises :class:`MixesPositions`."""
    if len(operand_tags) == 1:
        return tuple(operand_tags[0])
    base = _common_tags(operand_tags)
    if base[dim % len(base)] is not None:
        raise MixesPositions("concatenates along a token dimension")
    return tuple(base)


def stack_tags(operand_tags: Sequence, dim: int) -> tuple:
    """``torch.stack`` along ``dim`` of values tagged ``operand_tags`` (equal tags, or it raises
    :class:`MixesPositions`): the new dim carries no tag."""
    base = _common_tags(operand_tags)
    d = dim % (len(base) + 1)
    return tuple(base[:d]) + (None,) + tuple(base[d:])


def _common_tags(operand_tags: Sequence) -> tuple:
    if any(t != operand_tags[0] for t in operand_tags):
        raise MixesPositions("joins token and non-token values")
    return tuple(operand_tags[0])
