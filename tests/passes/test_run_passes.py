"""The pass pipeline's contract: a pass that raises is undone whole (no compile, milliseconds)."""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.guards import Guard
from graphopt.inspection import GraphReport
from graphopt.options import GraphoptOptions
from graphopt.passes import PassContext, RightPadding, _apply_undoable
from graphopt.runtime import Adapter


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(lambda x: x + 1)


class _RaisesAfterRegistering:
    """Registers everything a pass can register on the context, rewrites, then fails."""

    name = "broken"

    def apply(self, gm, ctx):
        guard = ctx.add_guard(Guard(name="right_padding", fn=lambda m: {}, input_indices=(0,), description="d"))
        ctx.right_padding = RightPadding(guard, scores_targets=True)
        ctx.received_rewritten.append(0)
        ctx.adapt(Adapter())
        ctx.report.rewrite(self.name, "rule", "detail")
        next(n for n in gm.graph.nodes if n.op == "call_function").target = torch.sub
        gm.recompile()
        raise RuntimeError("analysis failed")


def test_a_pass_that_raises_is_undone_whole():
    report = GraphReport(graph_id=0, before="", quiet=True)
    ctx = PassContext(GraphoptOptions(), report)
    gm = _graph()
    work, changed = _apply_undoable(_RaisesAfterRegistering(), gm, ctx)
    assert not changed
    assert ctx.guards == [] and ctx.right_padding is None and ctx.received_rewritten == [] and ctx.adapters == []
    assert report.rewrites == [] and [d.name for d in report.declines] == ["broken"]
    assert "RuntimeError: analysis failed" in report.declines[0].reason
    assert work(torch.zeros(2)).tolist() == [1.0, 1.0]  # the graph as it was before the pass


class _ReturnsANewGraph:
    """Builds a new graph instead of rewriting in place (as unpad does)."""

    name = "replaces"

    def apply(self, gm, ctx):
        ctx.report.rewrite(self.name, "rule", "detail")
        return fx.symbolic_trace(lambda x: x * 3)


def test_a_pass_may_return_the_graph_that_replaces_its_input():
    report = GraphReport(graph_id=0, before="", quiet=True)
    work, changed = _apply_undoable(_ReturnsANewGraph(), _graph(), PassContext(GraphoptOptions(), report))
    assert changed
    assert work(torch.ones(2)).tolist() == [3.0, 3.0]
