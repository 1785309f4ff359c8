"""Property-based tests of the right-padding guard.

The guard's contract: when it holds, causal attention without the padding mask gives the masked
result at every real position, and the label-shifted loss is unchanged. These tests draw random
masks and labels, compare the guard with a direct definition, and check the contract itself on
attention and on the loss.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from graphopt.guards import Guard, evaluate_guards, right_padding_guard, shift_targets

IGNORE = -100


@st.composite
def masks_and_labels(draw):
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["right", "left", "random"]))
    if kind == "random":
        rows = [draw(st.lists(st.integers(0, 2), min_size=seq, max_size=seq)) for _ in range(batch)]
        mask = torch.tensor(rows)
    else:
        lengths = torch.tensor(draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch)))
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        if kind == "left":
            mask = mask.flip(1)
    labels = torch.tensor(
        [draw(st.lists(st.integers(0, 9), min_size=seq, max_size=seq)) for _ in range(batch)]
    )
    if draw(st.booleans()):
        labels = labels.masked_fill(mask == 0, IGNORE)
    flips = draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, seq - 1)), max_size=2))
    for b, t in flips:
        labels[b, t] = IGNORE if labels[b, t] != IGNORE else 3
    return mask, labels


def definition(mask, labels) -> dict[str, bool]:
    """The guard's conditions written out row by row."""
    rows = [[int(v != 0) for v in row] for row in mask.tolist()]
    right = all(row == sorted(row, reverse=True) for row in rows)
    nonempty = all(row[0] == 1 for row in rows)
    targets = [row[1:] + [IGNORE] for row in labels.tolist()]
    ignored = all(
        keep or target == IGNORE for mrow, trow in zip(rows, targets) for keep, target in zip(mrow, trow)
    )
    return {"right_padded": right, "no_empty_rows": nonempty, "pads_ignored": ignored}


@settings(max_examples=300, deadline=None)
@given(masks_and_labels())
def test_guard_matches_its_definition(case):
    mask, labels = case
    targets = shift_targets(labels, 1, IGNORE)
    got = {k: bool(v) for k, v in right_padding_guard(mask, targets, ignore_index=IGNORE).items()}
    assert got == definition(mask, labels)


def _attention(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


@settings(max_examples=150, deadline=None)
@given(masks_and_labels(), st.integers(0, 2**31 - 1))
def test_when_the_guard_holds_elision_is_exact(case, seed):
    mask, labels = case
    batch, seq = mask.shape
    conditions = right_padding_guard(mask, shift_targets(labels, 1, IGNORE), ignore_index=IGNORE)
    if not all(bool(v) for v in conditions.values()):
        return
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 2, seq, 4, generator=g, dtype=torch.float64) for _ in range(3))
    idx = torch.arange(seq)
    full_mask = (idx[None, :] <= idx[:, None])[None, None] & (mask != 0)[:, None, None, :]
    masked = _attention(q, k, v, full_mask)
    elided = _attention(q, k, v)
    real = (mask != 0)[:, None, :, None].expand_as(masked)
    torch.testing.assert_close(elided[real], masked[real], rtol=1e-12, atol=1e-12)

    # A loss computed from per-position values that differ only at padded positions is unchanged.
    logits_masked = masked.sum(1).sum(-1, keepdim=True).repeat(1, 1, 10)
    logits_elided = elided.sum(1).sum(-1, keepdim=True).repeat(1, 1, 10)
    logits_elided = torch.where(real[:, 0, :, :1], logits_elided, torch.full_like(logits_elided, 7.0))
    targets = shift_targets(labels, 1, IGNORE)
    loss_masked = F.cross_entropy(logits_masked.reshape(-1, 10), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    loss_elided = F.cross_entropy(logits_elided.reshape(-1, 10), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss_elided, loss_masked, rtol=1e-12, atol=1e-12)


def test_shift_targets_pads_with_ignore_index():
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert shift_targets(labels, 1, IGNORE).tolist() == [[2, 3, IGNORE], [5, 6, IGNORE]]
    assert shift_targets(labels, 0, IGNORE).tolist() == labels.tolist()


def _guard(m, labels):
    return right_padding_guard(m, shift_targets(labels, 1, IGNORE), ignore_index=IGNORE)


def test_evaluate_guards_reports_the_cause_of_each_guard_and_host_decisions():
    """A left-padded row also has an empty first column and a scored pad, but only the first
    failing condition of a guard (its cause) is reported; each guard reports its own."""
    mask = torch.tensor([[0, 1, 1]])
    labels = torch.tensor([[5, 5, 5]])
    guards = [
        Guard("right_padding", _guard, (0, 1), ""),
        Guard("length", lambda m: {"lengths_agree": True, "proven_length": m.shape[1] <= 2}, (0,), ""),
    ]
    assert sorted(evaluate_guards(guards, [mask, labels]).failed) == ["proven_length", "right_padded"]
    # Right padded, but a row is empty and a pad is scored: the empty row is the cause.
    assert evaluate_guards(guards[:1], [torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.tensor([[1, 2, 3], [4, 4, 4]])]).failed == ["no_empty_rows"]
    assert evaluate_guards(guards[:1], [torch.tensor([[1, 0, 0]]), torch.tensor([[1, 2, 3]])]).failed == ["pads_ignored"]
    assert evaluate_guards(guards[:1], [torch.tensor([[1, 1, 0]]), torch.tensor([[1, 2, IGNORE]])]).failed == []


def test_guard_identity_includes_its_parameters():
    """Two guards with the same name and inputs but other parameters are two guards."""
    from graphopt.inspection import GraphReport
    from graphopt.options import GraphoptOptions
    from graphopt.passes import PassContext

    ctx = PassContext(GraphoptOptions(), GraphReport(0, ""))
    a = ctx.add_guard(Guard("right_padding", _guard, (0, 1), "", params=("ce", -100)))
    b = ctx.add_guard(Guard("right_padding", _guard, (0, 1), "", params=("ce", -1)))
    c = ctx.add_guard(Guard("right_padding", _guard, (0, 1), "", params=("ce", -100), rewrites=["mask"]))
    assert a is not b and c is a and len(ctx.guards) == 2 and a.rewrites == ["mask"]
