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
from typing import NamedTuple

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
    targets: torch.Tensor | None,
    *,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    """Conditions under which causal attention without the padding mask is exact.

    Dropping the key-padding term of ``causal ∧ attention_mask[b, kv]`` changes nothing for a query
    at a real position when every row is right-padded: all keys ``kv <= q`` of a real ``q`` are real.
    Queries at padded positions do change, so nothing derived from them may reach the loss. In
    order of precedence (a failure is reported only for the first condition that fails, the cause):

    - ``right_padded``: every row of ``attention_mask`` is ones followed by zeros (all-ones rows
      included). Nonzero counts as one, as transformers casts the mask to bool.
    - ``no_empty_rows``: no row is entirely padding. Such a row would still be exact (all its
      queries are padded) but it is a sign of a broken collator, and the masked path handles it.
    - ``pads_ignored``: the target the loss scores at every padded query position is
      ``ignore_index``. ``targets`` holds exactly what the loss scores, per query position:
      the graph's own label path (HF's shift, and any transform a wrapper applies to the labels)
      evaluated on this call's inputs. Omitted when ``targets`` is None (the caller promised
      padded outputs are unused).

    Args:
        attention_mask: (B, S) integer or bool padding mask.
        targets: (B, S) integer targets scored at each query position, or None.

    Returns:
        name → 0-dim bool tensor, on ``attention_mask``'s device (no host sync here), in order of
        precedence.
    """
    keep = attention_mask != 0
    conditions = {
        "right_padded": (keep[:, 1:] <= keep[:, :-1]).all(),
        "no_empty_rows": keep[:, 0].all(),
    }
    if targets is not None:
        targets = targets.to(keep.device).reshape(keep.shape)
        conditions["pads_ignored"] = (keep | (targets == ignore_index)).all()
    return conditions


GUARD_ADVICE = {
    "right_padded": (
        "the batch is not right-padded (a row of attention_mask has a 0 before a 1: left padding or "
        "holes). Pad on the right (tokenizer.padding_side = 'right') to get the fast path."
    ),
    "no_empty_rows": "a row of the batch is entirely padding; drop empty rows to get the fast path.",
    "lengths_agree": (
        "the attention_mask has a different length than the input sequence (transformers pads or "
        "slices it); pass an attention_mask as long as input_ids to get the fast path."
    ),
    "proven_length": (
        "the attention mask is not causal at this sequence length (a sliding window or chunk shorter "
        "than the sequence?); such calls run the exact masked path."
    ),
    "mask_known": (
        "the attention mask this graph received was not built by a graphopt graph that proved it (or "
        "was modified since); the exact masked path runs."
    ),
    "no_padding": (
        "the batch is padded, and this graph cannot see the labels: the step is split into several "
        "graphs (Dynamo's DDP graph split, FSDP2, a graph break) and the loss is computed in a later "
        "one. Pass options={'padded_outputs_unused': True} if nothing reads padded positions (labels "
        "are -100 there, as DataCollatorForLanguageModeling sets them); under DDP set "
        "torch._dynamo.config.optimize_ddp = False (graphopt then sees the whole graph); or pack the "
        "batch (DataCollatorWithFlattening) to get the fast path."
    ),
    "masked_low": (
        "eager attention adds the mask this graph received to its scores, and the mask was not "
        "published as an additive mask whose masked value is low enough for a masked score to get "
        "probability exactly 0 (transformers uses the dtype's lowest value); the exact masked path runs."
    ),
    "same_window": (
        "the mask this graph received has no sliding window or another one than the windows this "
        "graph was built for (those of the graphs compiled before it); the exact masked path runs."
    ),
    "causal_kind": (
        "the mask this graph received was published as a kind it cannot drop as causal (a sliding "
        "window?); the exact masked path runs."
    ),
    "one_document_per_row": (
        "a row of the packed batch holds several documents, and this graph received the mask from an "
        "earlier one; the exact masked path runs."
    ),
    "pads_ignored": (
        "the loss scores a target at a padded position (labels, as the graph shifts and transforms "
        "them, are not the ignore_index there). Set labels[attention_mask == 0] = -100 (the "
        "ignore_index), and do not map -100 to a class before the loss, to get the fast path."
    ),
}


@dataclass
class Guard:
    """A runtime condition on graph inputs that a rewrite depends on.

    Attributes:
        name: the guard's name in reports, e.g. ``"right_padding"``.
        fn: ``fn(*inputs) -> dict[condition, 0-dim bool tensor or bool]`` (a bool is a
            condition decided on the host, from shapes), in order of precedence.
        input_indices: positions in the graph's argument list of the values ``fn`` takes.
        description: one line for the inspection report.
        params: everything else ``fn`` depends on (ignore index, lengths, which loss it reads).
            Two guards are the same guard only if name, inputs and params are all equal.
        rewrites: the rewrites that depend on it.
    """

    name: str
    fn: Callable[..., dict[str, torch.Tensor | bool]]
    input_indices: Sequence[int]
    description: str
    params: tuple = ()
    rewrites: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """The guard's identity: registering an equal key twice installs one guard."""
        return (self.name, tuple(self.input_indices), self.params)

    def conditions(self, args: Sequence) -> dict[str, torch.Tensor | bool]:
        return self.fn(*(args[i] for i in self.input_indices))


class GuardResult(NamedTuple):
    """What :func:`evaluate_guards` found.

    Attributes:
        failed: the failed conditions that are causes, per guard the first failing one in its
            order of precedence; empty when every guard holds.
        also_read: the values of ``also_read`` read with the guards, or None when none was asked.
    """

    failed: list[str]
    also_read: list[int] | None

    @property
    def held(self) -> bool:
        return not self.failed


def evaluate_guards(guards: Sequence[Guard], args: Sequence, *, also_read: torch.Tensor | None = None) -> GuardResult:
    """Evaluate all guards with one host read.

    ``also_read``: a 1-D integer tensor the caller needs on the host too (the unpadded graph's row
    lengths); it rides along in the same read.
    """
    per_guard: list[tuple[list[str], list]] = []
    device_values: list[torch.Tensor] = []
    for guard in guards:
        names, values = [], []
        for name, value in guard.conditions(args).items():
            names.append(name)
            if isinstance(value, bool):  # decided on the host (shapes)
                values.append(value)
            else:
                values.append(len(device_values))
                device_values.append(value.reshape(()))
        per_guard.append((names, values))
    held: list = []
    extra: list[int] | None = None
    if also_read is not None:
        device_values = [v.to(torch.int64) for v in device_values]
        device_values.append(also_read.reshape(-1).to(torch.int64))
    if device_values:
        if len({v.device for v in device_values}) > 1:
            device_values = [v.cpu() for v in device_values]
        flat = [v.reshape(-1) for v in device_values]
        held = torch.cat(flat).tolist()  # the one device-to-host read
        if also_read is not None:
            n_extra = flat[-1].numel()
            held, extra = held[: len(held) - n_extra], held[len(held) - n_extra :]
    failed = []
    for names, values in per_guard:
        causes = [name for name, v in zip(names, values) if not (v if isinstance(v, bool) else held[v])]
        failed.extend(causes[:1])
    return GuardResult(failed, extra)
