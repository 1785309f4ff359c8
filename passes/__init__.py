"""graphopt's graph rewrites, one concern per module (installed as ``graphopt.passes``).

A pass is an object with a ``name`` and ``apply(graph_module, context)``. It rewrites the Dynamo
FX graph in place (or returns a new graph that replaces it), records every rewrite and every
decline on ``context.report``, registers a :class:`graphopt.guards.Guard` for each assumption
about input values that its rewrite relies on, and a :class:`graphopt.runtime.Adapter` for each
change it makes to the graph's calling convention (inputs it appends, outputs the caller must not
see, work around each call). :func:`run_passes` runs them in order on a copy of the graph; each
leaves a valid graph (``graph.lint()`` passes, dead nodes it created are gone). A pass that raises
is undone and reported as a decline: a failing analysis never breaks a user's compile.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from graphopt import analysis
from graphopt.guards import Guard
from graphopt.inspection import GraphReport
from graphopt.options import GraphoptOptions
from graphopt.runtime import Adapter

log = logging.getLogger("graphopt")
_warned: set[tuple[int, str]] = set()


class InvalidProgramError(ValueError):
    """The traced program fails in eager too (for example ``cross_entropy`` with int32 targets).

    A pass raises it instead of compiling a program that silently computes something eager would
    refuse; :func:`run_passes` lets it through (every other exception of a pass becomes a
    decline). The message says what eager says and how to fix the input.
    """


class Rollback(Exception):
    """A pass found, after rewriting, that it must not keep its rewrites (a proof that needs the
    rewritten graph failed). :func:`run_passes` undoes the pass, as for any exception, and
    reports the message as its decline, without a warning: this is an expected outcome."""


class Variant(enum.Enum):
    """Which version of a graph the passes build. The backend chooses it, once per version, and
    every pass reads it from the context (:attr:`PassContext.allow_guards`, :attr:`PassContext.received_as`)."""

    FAST = "fast"  # every rewrite, behind runtime guards where needed; received masks become causal SDPA
    FALLBACK = "fallback"  # only the rewrites that need no guard: what runs when a guard fails
    RECEIVED_PACKED = "received_packed"  # received packed masks run per document (a second fast graph)
    # received sliding masks of one window (PassContext.received_window) run per document with it
    RECEIVED_WINDOWED = "received_windowed"


@dataclass
class RightPadding:
    """The right-padding guard mask elision registered, for the passes that build on it (unpad).

    Attributes:
        guard: the registered guard; ``guard.input_indices[0]`` is the attention mask's
            placeholder index, the rest are the inputs of the scored targets.
        scores_targets: the guard also checks the targets a proven loss scores (False: the graph
            has no loss, and only ``padded_outputs_unused`` says padded outputs do not matter).
    """

    guard: Guard
    scores_targets: bool


@dataclass
class PassContext:
    """What a pass may read and where it records what it did.

    Attributes:
        options: the user's options.
        report: where rewrites, declines and notes go.
        variant: which version of the graph is built (:class:`Variant`).
        guards: the runtime guards the rewrites registered.
        adapters: the changes the rewrites made to the graph's calling convention, in the order
            they were made (:class:`graphopt.runtime.Adapter`).
        received_rewritten: placeholder indices of the received masks that were rewritten (the
            backend then builds the :attr:`Variant.RECEIVED_PACKED` version too).
        right_padding: the right-padding guard of mask elision, when it registered one.
        received_window: in the :attr:`Variant.RECEIVED_WINDOWED` version, the sliding window of
            the received masks it is built for.
        memo: probing results shared by the pipelines run on copies of one graph (the fast graph
            and the exact fallback), keyed by the probed subgraph's code.
    """

    options: GraphoptOptions
    report: GraphReport
    variant: Variant = Variant.FAST
    guards: list[Guard] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    received_rewritten: list[int] = field(default_factory=list)
    right_padding: RightPadding | None = None
    received_window: int | None = None
    _masks: list | None = None
    _losses: tuple | None = None

    @property
    def allow_guards(self) -> bool:
        """False in the exact fallback: a rewrite that needs a runtime guard is not made there."""
        return self.variant is not Variant.FALLBACK

    @property
    def received_as(self) -> str:
        """How masks received from earlier graphs are rewritten: ``"causal"`` (SDPA with
        ``is_causal=True``, by mask elision) or ``"packed"`` (per-document attention, by varlen
        attention, the document boundaries an extra input; with :attr:`received_window` in the
        windowed version)."""
        return "packed" if self.variant in (Variant.RECEIVED_PACKED, Variant.RECEIVED_WINDOWED) else "causal"

    def masks(self, gm: fx.GraphModule) -> list:
        """The attention masks of ``gm`` (:func:`graphopt.masks.find_masks`), found once per
        version of the graph (:meth:`invalidate` drops them)."""
        if self._masks is None:
            from graphopt.masks import find_masks

            self._masks = find_masks(gm, self.memo)
        return self._masks

    def losses(self, gm: fx.GraphModule) -> tuple[list, list[str]]:
        """The proven losses of ``gm`` and the reasons others are not (:func:`graphopt.losses.find_losses`),
        found once per version of the graph."""
        if self._losses is None:
            from graphopt.losses import find_losses

            self._losses = find_losses(gm)
        return self._losses

    def invalidate(self) -> None:
        """Forget the cached analyses: the graph they describe was changed."""
        self._masks = None
        self._losses = None

    def placeholder_index(self, gm: fx.GraphModule, node: fx.Node) -> int:
        """Position of placeholder ``node`` in the graph's argument list."""
        return [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)

    def adapt(self, adapter: Adapter) -> Adapter:
        """Register ``adapter``, a change to the graph's calling convention; a pass that appends
        placeholders registers its adapter when it appends them (see :class:`graphopt.runtime.Adapter`)."""
        self.adapters.append(adapter)
        return adapter

    def adapters_of(self, kind: type) -> list:
        """The registered adapters of class ``kind``."""
        return [a for a in self.adapters if isinstance(a, kind)]

    def add_guard(self, guard: Guard) -> Guard:
        """Register ``guard``, or return the one already registered with the same identity (name,
        inputs and parameters: see :attr:`Guard.key`)."""
        for existing in self.guards:
            if existing.key == guard.key:
                existing.rewrites.extend(guard.rewrites)
                return existing
        self.guards.append(guard)
        return guard


def retire_mask(gm: fx.GraphModule, ctx: PassContext, cand, guards: Sequence[Guard] = ()) -> list[Guard]:
    """The end of every rewrite that removed each use of mask ``cand`` (a
    :class:`graphopt.masks.MaskCandidate`): register ``guards``, naming the mask as what they
    protect; drop the mask from the checkpoint bodies it entered; erase its dead nodes. Returns
    the registered guards, in order (an equal guard registered earlier stands for its copy)."""
    registered = [ctx.add_guard(guard) for guard in guards]
    for guard in registered:
        guard.rewrites.append(cand.node.name)
    for checkpoint in set(cand.checkpoints.values()):
        analysis.drop_unused_checkpoint_operands(checkpoint)
    analysis.erase_dead(gm.graph, cand.slice_nodes)
    return registered


def enabled_passes(options: GraphoptOptions) -> list:
    """The passes to run, in order: each pass whose option (``mask_elision``,
    ``varlen_attention``, ``fused_cross_entropy``, ``unpad``) is on. ``unpad`` builds on the
    other two (the guard of mask elision, the attention op of varlen attention) and runs last."""
    from graphopt.passes.fused_cross_entropy import FusedCrossEntropy
    from graphopt.passes.mask_elision import MaskElision
    from graphopt.passes.unpad import Unpad
    from graphopt.passes.varlen_attention import VarlenAttention

    candidates = [
        (options.mask_elision, MaskElision),
        (options.varlen_attention, VarlenAttention),
        (options.fused_cross_entropy, FusedCrossEntropy),
        (options.unpad and options.mask_elision and options.varlen_attention, Unpad),
    ]
    return [cls() for enabled, cls in candidates if enabled]


def run_passes(
    gm: fx.GraphModule,
    options: GraphoptOptions,
    report: GraphReport,
    *,
    variant: Variant = Variant.FAST,
    memo: dict | None = None,
    received_window: int | None = None,
) -> tuple[fx.GraphModule, PassContext]:
    """Run :func:`enabled_passes` on a copy of ``gm``; returns the copy and the context.

    ``gm`` itself is never modified. A pass that raises is undone (its graph changes, guards and
    detached logits are dropped), logged once and reported as a decline naming the exception;
    the passes after it still run. The copy keeps ``gm.meta``. ``memo`` shares probing results
    with another run on the same graph (see :attr:`PassContext.memo`). ``received_window``: the
    window of the :attr:`Variant.RECEIVED_WINDOWED` version.

    Raises:
        InvalidProgramError: the program is one eager refuses to run (the user's input is wrong).
    """
    work = analysis.copy_graph_module(gm)
    analysis.unshare_checkpoint_bodies(work)
    for hop in [n for n in work.graph.nodes if analysis.is_checkpoint(n)]:
        # what nothing reads in a body (the indices of a max whose values alone are used: Dynamo
        # keeps them in bodies) would read as a second use of the attention's values
        body = analysis.checkpoint_body(hop)
        if analysis.erase_unused(body.graph):
            body.recompile()
    if (variant is Variant.RECEIVED_WINDOWED) != (received_window is not None):
        raise ValueError("the received-windowed version, and only it, is built for a received_window")
    ctx = PassContext(options, report, variant=variant, memo={} if memo is None else memo, received_window=received_window)
    start = time.perf_counter()
    for p in enabled_passes(options):
        work, changed = _apply_undoable(p, work, ctx)
        if changed:
            ctx.invalidate()
    analysis.recompile_all(work)
    report.pass_seconds = time.perf_counter() - start
    return work, ctx


def _apply_undoable(p, work: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, bool]:
    """Apply pass ``p`` to ``work`` in place; returns (the graph to continue with, changed).

    ``p.apply`` may return a new graph, which replaces ``work``. If ``p`` raises, a copy of
    ``work`` taken before it runs replaces it (the analyses cached on ``work`` are dropped with it)
    and everything ``p`` registered is removed: guards, adapters, received masks it rewrote and
    the right-padding guard.
    """
    snapshot = analysis.copy_graph_module(work)
    report = ctx.report
    n_guards, n_adapters, n_received = len(ctx.guards), len(ctx.adapters), len(ctx.received_rewritten)
    right_padding = ctx.right_padding
    n_rewrites, n_notes = len(report.rewrites), len(report.notes)
    try:
        replacement = p.apply(work, ctx)
        if replacement is not None:  # a new graph stands for the copy: it keeps the copy's meta
            replacement.meta = {**work.meta, **replacement.meta}
            work = replacement
        analysis.recompile_all(work)
    except InvalidProgramError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of an analysis must become a decline
        del ctx.guards[n_guards:], ctx.adapters[n_adapters:], ctx.received_rewritten[n_received:]
        ctx.right_padding = right_padding
        del report.rewrites[n_rewrites:], report.notes[n_notes:]
        ctx.invalidate()
        if isinstance(e, Rollback):
            report.decline(p.name, str(e))
            return snapshot, False
        reason = f"the pass raised {type(e).__name__}: {e}; the graph is left as it was"
        if (report.graph_id, p.name) not in _warned:  # the fallback graph runs the passes again
            _warned.add((report.graph_id, p.name))
            log.warning("graphopt: graph %d: %s %s", report.graph_id, p.name, reason, exc_info=log.isEnabledFor(logging.DEBUG))
        report.decline(p.name, reason)
        return snapshot, False
    return work, len(report.rewrites) > n_rewrites
