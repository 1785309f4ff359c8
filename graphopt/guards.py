"""Runtime guards: the conditions under which a rewritten graph is exact.

A pass that rewrites under an assumption about input *values* registers a :class:`Guard`. Before
each call, the backend evaluates every guard on the call's inputs with a single device-to-host read
and runs the rewritten graph only when all hold; otherwise it runs the original graph, compiled by
Inductor, which is exact by construction.

Each guard function computes a small boolean tensor of named conditions on the device, so guards
compose without extra syncs and a failure can say which condition failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def shift_targets(labels: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """The target each query position is scored against: ``labels[:, t + shift]``, or
    ``ignore_index`` past the end. Shape (B, S), like ``labels``."""
    if shift == 0:
        return labels
    filler = labels.new_full((labels.shape[0], shift), ignore_index)
    return torch.cat((labels[:, shift:], filler), dim=1)


def right_padding_guard(
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    shift: int,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    """Conditions under which causal attention without the padding mask is exact.

    Dropping the key-padding term of ``causal ∧ attention_mask[b, kv]`` changes nothing for a query
    at a real position when every row is right-padded: all keys ``kv <= q`` of a real ``q`` are real.
    Queries at padded positions do change, so nothing derived from them may reach the loss:

    - ``right_padded``: every row of ``attention_mask`` is ones followed by zeros (all-ones rows
      included). Nonzero counts as one, as transformers casts the mask to bool.
    - ``no_empty_rows``: no row is entirely padding. Such a row would still be exact (all its
      queries are padded) but it is a sign of a broken collator, and the masked path handles it.
    - ``pads_ignored``: every target scored at a padded query position is ``ignore_index``. The
      target at position ``t`` is ``labels[t + shift]`` (``shift=1`` is the causal-LM label shift).
      Omitted when ``labels`` is None (the caller promised padded outputs are unused).

    Args:
        attention_mask: (B, S) integer or bool padding mask.
        labels: (B, S) int64 labels, or None.

    Returns:
        name → 0-dim bool tensor, on ``attention_mask``'s device (no host sync here).
    """
    keep = attention_mask != 0
    conditions = {
        "right_padded": (keep[:, 1:] <= keep[:, :-1]).all(),
        "no_empty_rows": keep[:, 0].all(),
    }
    if labels is not None:
        targets = shift_targets(labels, shift, ignore_index).to(keep.device)
        conditions["pads_ignored"] = (keep | (targets == ignore_index)).all()
    return conditions


GUARD_ADVICE = {
    "right_padded": (
        "the batch is not right-padded (a row of attention_mask has a 0 before a 1: left padding or "
        "holes). Pad on the right (tokenizer.padding_side = 'right') to get the fast path."
    ),
    "no_empty_rows": "a row of the batch is entirely padding; drop empty rows to get the fast path.",
    "probed_length": (
        "the sequence is longer than any length the attention mask was proven causal at, or the "
        "attention_mask length differs from the sequence length (symbolic shapes); such calls run "
        "the exact masked path."
    ),
    "pads_ignored": (
        "labels at padded positions are not ignored. Set labels[attention_mask == 0] = -100 "
        "(the ignore_index) to get the fast path."
    ),
}


@dataclass
class Guard:
    """A runtime condition on graph inputs that a rewrite depends on.

    Attributes:
        name: the guard's name in reports, e.g. ``"right_padding"``.
        fn: ``fn(*tensors) -> dict[condition, 0-dim bool tensor or bool]`` (a bool is a
            condition decided on the host, from shapes).
        input_indices: positions in the graph's argument list of the tensors ``fn`` takes
            (None passes None).
        description: one line for the inspection report.
        rewrites: the rewrites that depend on it.
    """

    name: str
    fn: Callable[..., dict[str, torch.Tensor]]
    input_indices: Sequence[int | None]
    description: str
    rewrites: list[str] = field(default_factory=list)

    def conditions(self, args: Sequence) -> dict[str, torch.Tensor]:
        tensors = [None if i is None else args[i] for i in self.input_indices]
        return self.fn(*tensors)


def evaluate_guards(guards: Sequence[Guard], args: Sequence) -> list[str]:
    """Evaluate all guards with one host read. Returns the names of the failed conditions."""
    failed: list[str] = []
    names: list[str] = []
    values: list[torch.Tensor] = []
    for guard in guards:
        for name, value in guard.conditions(args).items():
            if isinstance(value, bool):  # decided on the host (shapes)
                if not value:
                    failed.append(name)
                continue
            names.append(name)
            values.append(value.reshape(()))
    if values:
        if len({v.device for v in values}) > 1:
            values = [v.cpu() for v in values]
        held = torch.stack(values).tolist()  # the one device-to-host read
        failed.extend(name for name, ok in zip(names, held) if not ok)
    return failed
