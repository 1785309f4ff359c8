"""graphopt's graph rewrites, one concern per module (installed as ``graphopt.passes``).

A pass is an object with a ``name`` and ``apply(graph_module, context)``. It rewrites the Dynamo
FX graph in place, records every rewrite and every decline on ``context.report``, and registers a
:class:`graphopt.guards.Guard` for each assumption about input values that its rewrite relies on.
Passes run in :data:`PASSES` order; each leaves a valid graph (``graph.lint()`` passes, dead
nodes it created are gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from graphopt.guards import Guard
from graphopt.inspection import GraphReport
from graphopt.options import GraphoptOptions


@dataclass
class DetachedLogits:
    """Logits that the rewritten graph returns without a gradient; the backend attaches it.

    Attributes:
        positions: where the logits stand in the graph's outputs.
        hidden_position: the output the pass appended, holding the (N, H) hidden states the fused
            loss read; the backend removes it from what the caller sees.
        weight_input: the graph input (placeholder index) holding the lm_head weight.
    """

    positions: list[int]
    hidden_position: int
    weight_input: int


@dataclass
class PassContext:
    """What a pass may read and where it records what it did."""

    options: GraphoptOptions
    report: GraphReport
    guards: list[Guard] = field(default_factory=list)
    detached_logits: list[DetachedLogits] = field(default_factory=list)
    _masks: list | None = None
    _losses: tuple | None = None

    def masks(self, gm: fx.GraphModule) -> list:
        """The attention masks of ``gm`` (:func:`graphopt.masks.find_masks`), found once."""
        if self._masks is None:
            from graphopt.masks import find_masks

            self._masks = find_masks(gm)
        return self._masks

    def losses(self, gm: fx.GraphModule) -> tuple[list, list[str]]:
        """The proven losses of ``gm`` and the reasons others are not (:func:`graphopt.losses.find_losses`)."""
        if self._losses is None:
            from graphopt.losses import find_losses

            self._losses = find_losses(gm)
        return self._losses

    def placeholder_index(self, gm: fx.GraphModule, node: fx.Node) -> int:
        """Position of placeholder ``node`` in the graph's argument list."""
        return [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)

    def add_guard(self, guard: Guard) -> Guard:
        """Register ``guard``, or return the equal one already registered."""
        for existing in self.guards:
            if existing.name == guard.name and list(existing.input_indices) == list(guard.input_indices):
                existing.rewrites.extend(guard.rewrites)
                return existing
        self.guards.append(guard)
        return guard


def enabled_passes(options: GraphoptOptions) -> list:
    """The passes to run, in order, for ``options``."""
    from graphopt.passes.fused_cross_entropy import FusedCrossEntropy
    from graphopt.passes.mask_elision import MaskElision
    from graphopt.passes.varlen_attention import VarlenAttention

    return [MaskElision(), VarlenAttention(), FusedCrossEntropy()]
