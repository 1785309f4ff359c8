"""Masks handed from one compiled graph to another.

A training step often reaches the backend as several graphs: Dynamo's DDP optimizer splits it at
gradient buckets, FSDP2's hooks break it around every sharded module, and any graph break in the
model's forward splits it too. transformers builds the attention mask once, so the graph that
builds it returns it, and the graphs of later layers receive it as an input. Those graphs cannot
prove anything about an input tensor at compile time; they learn what it holds at run time here:

- the graph that builds a mask proven ``causal``, ``causal_padding`` or ``packed_causal``, with or
  without a sliding window (:mod:`graphopt.masks`), *publishes* the tensor it returns, with the
  input the mask was proven to be a function of and its window (:func:`publish`, called by
  :class:`graphopt.passes.mask_elision.PublishMasks`);
- a graph that receives a mask, and whose only use of it is as SDPA's ``attn_mask`` exactly as
  received, or as the additive mask of eager attention, *looks it up* (:func:`lookup`) before it
  runs, and takes a fast path only when the mask is known and what it holds makes that path
  exact: causal SDPA (per-row attention for eager attention) for a causal mask
  (:class:`HandedOffMaskGuard`), per-document attention for a packed one
  (:class:`HandedOffPackedGuard`), per-document attention with the window for a sliding one
  (:class:`HandedOffWindowGuard`). Eager attention also needs the mask's masked value low enough
  that a masked score gets probability exactly 0 (``masked_low``: the published mask's
  ``masked_value``, see :func:`graphopt.passes.eager_attention.masked_value_bound`).

A sliding window is a compile-time argument of the attention that replaces the mask, and the
receiving graph sees none of the mask's code. So the graph that proves a sliding mask also
records its window when it is compiled (:func:`expect_window`); graphs compiled after it (those
that receive its mask are, since they run after it) build one windowed version per window recorded
(:func:`expected_windows`), each guarded on the published window being its own.

The registry holds tensors weakly (an entry dies with its mask) and records the version counters
of the mask and of its source input: a mask or input modified in place after publication is not
known any more. Conditions that read device data (is the batch right-padded? does any row hold
several documents?) are read once per published mask, in one host read, by the first graph that
asks, and shared by the others.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from graphopt.guards import right_padding_guard
from graphopt.masks import MaskKind, document_starts

_FACTS = WeakIdKeyDictionary()
_LOCK = threading.Lock()


_WINDOWS: set[int] = set()


def expect_window(window: int) -> None:
    """Record, at compile time, that a graph publishes masks with a sliding ``window``."""
    with _LOCK:
        _WINDOWS.add(window)


def expected_windows() -> list[int]:
    """The windows of the sliding masks that graphs compiled so far publish, smallest first."""
    with _LOCK:
        return sorted(_WINDOWS)


class MaskFact:
    """What a published mask holds: ``kind`` (as :class:`graphopt.masks.MaskCandidate` proves it)
    as a function of ``source`` (the 2-D ``attention_mask`` for ``causal_padding``, the
    ``position_ids`` for ``packed_causal``, None for ``causal``), for a sliding kind its
    ``window``, and for an additive (float) mask the ``masked_value`` at its masked positions
    (None for a bool mask, or when the proof saw no masked position)."""

    def __init__(
        self,
        mask: torch.Tensor,
        kind: MaskKind,
        source: torch.Tensor | None,
        window: int | None = None,
        masked_value: float | None = None,
    ):
        kind = MaskKind(kind)
        if kind.sliding != (window is not None):
            need = "needs its window" if kind.sliding else "has no window"
            raise ValueError(f"publishing a {kind.value} mask with window={window}: a {kind.value} mask {need}")
        self.kind = kind
        self.source = source
        self.window = window
        self.masked_value = masked_value
        self._length, self._device = mask.shape[-1], mask.device
        self._versions = self._versions_of(mask)
        self._conditions: dict[str, bool] | None = None
        self._cu_seqlens: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _versions_of(self, mask: torch.Tensor) -> tuple[int, int]:
        return mask._version, -1 if self.source is None else self.source._version

    def current(self, mask: torch.Tensor) -> bool:
        """Whether neither the mask nor its source was modified since publication."""
        return self._versions_of(mask) == self._versions

    def conditions(self) -> dict[str, bool]:
        """The batch's properties, read from ``source`` once (one host read):

        - ``right_padded``, ``no_empty_rows``, ``no_padding`` for ``causal_padding``;
        - ``one_document_per_row`` for ``packed_causal`` (positions increase by one along every
          row: the block-causal mask is then the causal one).
        """
        with self._lock:
            if self._conditions is None:
                self._conditions = self._read()
            return self._conditions

    def cu_seqlens(self, batch: int) -> torch.Tensor:
        """The document boundaries of the mask's ``batch`` rows, flattened, in the layout of
        :func:`graphopt.passes.varlen_attention.cu_seqlens_from_position_ids`: the documents of
        the positions for a packed kind, each row one document otherwise (a padded row's real
        queries see only its real keys when the batch is right-padded); computed on the device
        once per mask (no host read)."""
        from graphopt.passes.varlen_attention import cu_seqlens_from_position_ids

        with self._lock:
            if batch not in self._cu_seqlens:
                if self.kind.unwindowed == MaskKind.PACKED_CAUSAL:
                    cu = cu_seqlens_from_position_ids(self.source, batch)
                else:  # (B*S + 1,) like the packed layout: rows, then empty documents at T
                    total = batch * self._length
                    cu = torch.full((total + 1,), total, dtype=torch.int32, device=self._device)
                    cu[: batch + 1] = torch.arange(batch + 1, dtype=torch.int32, device=self._device) * self._length
                self._cu_seqlens[batch] = cu
            return self._cu_seqlens[batch]

    def _read(self) -> dict[str, bool]:
        kind = self.kind.unwindowed
        if kind == MaskKind.CAUSAL or self.kind == MaskKind.SLIDING_PACKED_CAUSAL:
            return {}  # causal; windowed per-document attention is exact at every position
        if kind == MaskKind.CAUSAL_PADDING:
            on_device = right_padding_guard(self.source, None, ignore_index=-100)
            on_device["no_padding"] = (self.source != 0).all()
        elif self.kind == MaskKind.PACKED_CAUSAL:
            on_device = {"one_document_per_row": ~document_starts(self.source).narrow(1, 1, self.source.shape[1] - 1).any()}
        else:  # no other kind is published; one that were could not be dropped as causal
            return {"causal_kind": False}
        return dict(zip(on_device, torch.stack(list(on_device.values())).tolist()))


def publish(
    mask: torch.Tensor,
    kind: MaskKind,
    source: torch.Tensor | None,
    window: int | None = None,
    masked_value: float | None = None,
) -> None:
    """Record that ``mask`` holds the ``kind`` mask of ``source`` (with ``window`` for a sliding
    kind, and ``masked_value`` for an additive mask)."""
    with _LOCK:
        _FACTS[mask] = MaskFact(mask, kind, source, window, masked_value)


def _source_fits(source: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a mask's 2-D source (positions or padding) has one row or the mask's rows, and the
    square mask's length."""
    return (
        source.dim() == 2
        and source.shape[0] in (1, mask.shape[0])
        and source.shape[1] == mask.shape[-1] == mask.shape[-2]
    )


def _masked_low(fact: MaskFact, masked_at_most: float | None) -> dict[str, bool]:
    """``{"masked_low": ...}`` for a receiver that adds the mask to scores (eager attention):
    the mask is additive with a masked value at most ``masked_at_most``; ``{}`` for SDPA (None)."""
    if masked_at_most is None:
        return {}
    return {"masked_low": fact.masked_value is not None and fact.masked_value <= masked_at_most}


def lookup(mask: torch.Tensor) -> MaskFact | None:
    """The fact published for ``mask``, or None when it was not published or was modified since."""
    with _LOCK:
        fact = _FACTS.get(mask)
    return fact if fact is not None and fact.current(mask) else None


class HandedOffPackedGuard:
    """The guard of a graph that replaced a received mask with per-document attention (the
    ``"packed"`` version of a graph, see :class:`graphopt.runtime.GuardedDispatch`).

    Conditions: ``mask_known`` (as :class:`HandedOffMaskGuard`), then ``packed``: the mask was
    published as the block-causal mask of its ``position_ids``, which have one row or the mask's
    rows, and the mask's length; then, with ``masked_at_most`` (eager attention), ``masked_low``.
    Host values only (no device read)."""

    def __init__(self, masked_at_most: float | None = None):
        self.masked_at_most = masked_at_most

    def __call__(self, mask: torch.Tensor) -> dict[str, bool]:
        fact = lookup(mask)
        if fact is None:
            return {"mask_known": False}
        packed = fact.kind == MaskKind.PACKED_CAUSAL and _source_fits(fact.source, mask)
        return {"mask_known": True, "packed": packed, **_masked_low(fact, self.masked_at_most)}


class HandedOffMaskGuard:
    """The guard of a graph that replaced a received mask with ``is_causal=True``.

    Conditions, in order of precedence:

    - ``mask_known``: the mask was published by the graph that built it and not modified since;
    - for a ``causal_padding`` mask: ``right_padded`` and ``no_empty_rows`` (as the right-padding
      guard), then ``no_padding`` unless ``padded_outputs_unused``: this graph cannot see the
      labels, so it cannot check that nothing scores a padded position;
    - for a ``packed_causal`` mask: ``one_document_per_row``;
    - with ``masked_at_most`` (eager attention reads the mask): ``masked_low``.

    Host values only: the device data of a mask's source is read once per mask
    (:meth:`MaskFact.conditions`), however many graphs receive it.
    """

    def __init__(self, padded_outputs_unused: bool, masked_at_most: float | None = None):
        self.padded_outputs_unused = padded_outputs_unused
        self.masked_at_most = masked_at_most

    def __call__(self, mask: torch.Tensor) -> dict[str, bool]:
        fact = lookup(mask)
        if fact is None:
            return {"mask_known": False}
        if fact.kind.sliding:  # causal SDPA would drop its window
            return {"mask_known": True, "causal_kind": False}
        conditions = {"mask_known": True, **fact.conditions()}
        if fact.kind == MaskKind.CAUSAL_PADDING and self.padded_outputs_unused:
            conditions.pop("no_padding")
        return conditions | _masked_low(fact, self.masked_at_most)


class HandedOffWindowGuard:
    """The guard of a graph version that replaced a received mask with per-document attention
    over a sliding ``window`` (built for each window in :func:`expected_windows`).

    Conditions: ``mask_known`` (as :class:`HandedOffMaskGuard`), then ``same_window``: the mask
    was published as a sliding mask of this window, causal, padded or packed, whose source has one
    row or the mask's rows and the mask's length; then for a padded one the conditions of
    :class:`HandedOffMaskGuard` (``right_padded``, ``no_empty_rows``, ``no_padding`` unless
    ``padded_outputs_unused``; each row is one document); then, with ``masked_at_most`` (eager
    attention), ``masked_low``. Host values only."""

    def __init__(self, window: int, padded_outputs_unused: bool, masked_at_most: float | None = None):
        self.window = window
        self.padded_outputs_unused = padded_outputs_unused
        self.masked_at_most = masked_at_most

    def __call__(self, mask: torch.Tensor) -> dict[str, bool]:
        fact = lookup(mask)
        if fact is None:
            return {"mask_known": False}
        same = fact.kind.sliding and fact.window == self.window and mask.shape[-1] == mask.shape[-2]
        if not (same and (fact.source is None or _source_fits(fact.source, mask))):
            return {"mask_known": True, "same_window": False}
        conditions = {"mask_known": True, "same_window": True, **fact.conditions()}
        if self.padded_outputs_unused:
            conditions.pop("no_padding", None)
        return conditions | _masked_low(fact, self.masked_at_most)
