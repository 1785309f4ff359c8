"""The backend's contract with torch.compile: registration, options, training and inference, and
plain Inductor behaviour when there is nothing to rewrite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import graphopt
from graphopt.options import GraphoptOptions, split_options


def test_backend_resolves_in_a_fresh_interpreter_without_importing_graphopt():
    code = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda x: (x * 2).sin(), backend="graphopt")
        assert torch.equal(f(torch.ones(3)), (torch.ones(3) * 2).sin())
        assert "graphopt" in sys.modules  # loaded through the entry point
        assert "transformers" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_lean():
    code = textwrap.dedent(
        """
        import sys, torch, torch._dynamo  # what torch.compile loads anyway
        before = set(sys.modules)
        import graphopt
        added = sorted(m for m in set(sys.modules) - before if not m.startswith("graphopt"))
        assert not added, added
        assert not any(m in sys.modules for m in ("graphopt.ops", "graphopt.passes", "transformers"))
        assert not torch.cuda.is_initialized()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_graphopt_and_inductor_options_are_split():
    ours, theirs = split_options({"trust_right_padding": True, "max_autotune": False, "graphopt.drop_logits": True})
    assert ours == GraphoptOptions(trust_right_padding=True, drop_logits=True)
    assert theirs == {"max_autotune": False}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"trust_right_paddin": True}, "Did you mean 'trust_right_padding'"),
        ({"graphopt.max_autotune": True}, "Unknown option 'graphopt.max_autotune'"),
        ({"mask_elision": "yes"}, "must be a bool"),
        ({"attention_impl": "cudnn"}, "attention_impl"),
        ({"drop_logits": True, "fused_cross_entropy": False}, "drop_logits=True needs"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        split_options(options)


def test_bad_options_surface_at_compile_time():
    f = torch.compile(lambda x: x + 1, backend="graphopt", options={"no_such_option": 1})
    with pytest.raises(Exception, match="Unknown option 'no_such_option'"):
        f(torch.ones(2))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x)).sum()


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs"])
def test_graph_without_rewrites_compiles_like_inductor(mode):
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 8)
    with graphopt.capture() as report:
        loss = torch.compile(model, backend="graphopt", mode=mode)(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.testing.assert_close(loss, model(x))
    model(x).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    (graph,) = report.graphs
    assert not graph.changed and graph.after == graph.before
    assert report.runtime == {}  # no guard: the Inductor callable is returned as is


def test_inference_under_no_grad():
    model = Tiny()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="graphopt")(x), model(x))


# ---------------------------------------------------------------------------------------------------
# The pipeline: failing passes, contracts, and the exact fallback


def _llama_step_graph():
    from graphopt.tiny_models import build_tiny_model, make_batch
    from tests.support.retarget import capture_graphs

    (gm,) = capture_graphs(build_tiny_model("llama"), **make_batch("right", batch=2, seq=16, seed=1))
    return gm


def test_a_pass_that_raises_is_undone_and_reported(monkeypatch):
    """Issue 8 §5: any exception inside a pass becomes a decline; later passes still run."""
    from graphopt.inspection import GraphReport
    from graphopt.passes import run_passes
    from graphopt.passes.mask_elision import MaskElision

    def broken(self, gm, ctx):
        sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
        sdpa.kwargs = {**sdpa.kwargs, "attn_mask": None}  # a half-done rewrite
        raise KeyError("boom")

    monkeypatch.setattr(MaskElision, "apply", broken)
    gm = _llama_step_graph()
    report = GraphReport(0, gm.code, quiet=True)
    work, ctx = run_passes(gm, GraphoptOptions(), report)
    assert ("mask_elision", "the pass raised KeyError: 'boom'; the graph is left as it was") in [
        (d.name, d.reason) for d in report.declines
    ]
    assert report.counts == {"fused_cross_entropy": 1} and ctx.guards == []
    assert "scaled_dot_product_attention" in work.code and "attn_mask = " in work.code


def test_a_pass_that_raises_leaves_a_working_exact_compile(monkeypatch):
    from graphopt.passes.mask_elision import MaskElision
    from graphopt.tiny_models import build_tiny_model, make_batch
    from tests.support.harness import CompiledModel, assert_steps_equal

    monkeypatch.setattr(MaskElision, "apply", lambda self, gm, ctx: 1 / 0)
    cm = CompiledModel(build_tiny_model("llama"))
    eager, compiled, report = cm.step(make_batch("right", batch=2, seq=16, seed=2))
    assert_steps_equal(eager, compiled)
    assert any("ZeroDivisionError" in reason for name, reason in report.declines if name == "mask_elision")
    assert report.counts["fused_cross_entropy"] == 1


def test_rewritten_graph_keeps_meta_and_the_original_is_untouched():
    from graphopt.inspection import GraphReport
    from graphopt.passes import run_passes

    gm = _llama_step_graph()
    gm.meta["user"] = "kept"
    before = gm.code
    work, _ = run_passes(gm, GraphoptOptions(), GraphReport(0, before, quiet=True))
    assert work.meta["user"] == "kept" and work is not gm
    assert gm.code == before and work.code != before


def test_cached_analyses_are_recomputed_after_a_pass_changes_the_graph(monkeypatch):
    import graphopt.passes as passes

    seen = []

    class Rewrites:
        name = "first"

        def apply(self, gm, ctx):
            seen.append(id(ctx.masks(gm)))
            ctx.report.rewrite(self.name, "r", "changed")

    class Reads:
        name = "second"

        def apply(self, gm, ctx):
            seen.append(id(ctx.masks(gm)))

    monkeypatch.setattr(passes, "enabled_passes", lambda options: [Rewrites(), Reads()])
    passes.run_passes(_llama_step_graph(), GraphoptOptions(), passes.GraphReport(0, "", quiet=True))
    assert len(seen) == 2 and seen[0] != seen[1]


@pytest.mark.parametrize("off", ["mask_elision", "varlen_attention", "fused_cross_entropy", "unpad"])
def test_enabled_passes_honours_the_options(off):
    from graphopt.passes import enabled_passes

    names = [p.name for p in enabled_passes(GraphoptOptions(**{off: False}))]
    # unpad builds on mask elision's guard and varlen attention's op: it goes with either
    expected = {"mask_elision": 2, "varlen_attention": 2, "fused_cross_entropy": 3, "unpad": 3}[off]
    assert off not in names and len(names) == expected
    assert [p.name for p in enabled_passes(GraphoptOptions())] == ["mask_elision", "varlen_attention", "fused_cross_entropy", "unpad"]


def test_fallback_is_compiled_by_inductor_once_and_reused(monkeypatch):
    """Issue 8 §1: the exact fallback is a real Inductor compilation (Dynamo skips the code of the
    GraphModule it handed the backend, so compiling that one would silently run it eagerly), made
    on the first failing call and reused after."""
    import torch._inductor.compile_fx as compile_fx_module

    from graphopt.tiny_models import build_tiny_model, make_batch
    from tests.support.harness import CompiledModel, assert_steps_equal

    calls = []
    real = compile_fx_module.compile_fx
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda *a, **k: calls.append(1) or real(*a, **k))
    cm = CompiledModel(build_tiny_model("llama"))
    eager, compiled, report = cm.step(make_batch("right", batch=2, seq=16, seed=3))
    assert_steps_equal(eager, compiled)
    assert report.runtime["fast_path"] == 1 and len(calls) == 1
    for seed in (4, 5):
        eager, compiled, report = cm.step(make_batch("left", batch=2, seq=16, seed=seed))
        assert_steps_equal(eager, compiled)
        assert report.runtime["fallback"] == 1
        assert len(calls) == 2, "the fallback was compiled once, on its first use, then reused"
    assert any("exact fallback keeps the rewrites that need no guard (fused_cross_entropy)" in n for g in cm.compile_reports for n in g.notes)


def test_drop_logits_gives_the_same_outputs_on_the_fast_path_and_the_fallback():
    from graphopt.tiny_models import build_tiny_model, make_batch
    from tests.support.harness import CompiledModel

    cm = CompiledModel(build_tiny_model("llama"), options={"drop_logits": True})
    shapes = {}
    for layout in ("right", "left"):
        with graphopt.capture() as report:
            out = cm.compiled(**make_batch(layout, batch=2, seq=16, seed=6))
        shapes[layout] = tuple(out.logits.shape)
        assert report.runtime["fast_path" if layout == "right" else "fallback"] == 1
    assert shapes == {"right": (0,), "left": (0,)}


def test_unguarded_rewritten_graphs_count_their_calls():
    """Issue 9 §8: report.runtime shows the calls of rewritten graphs that need no guard."""
    from graphopt.tiny_models import build_tiny_model, make_batch
    from tests.support.harness import CompiledModel

    cm = CompiledModel(build_tiny_model("llama"))
    eager, compiled, report = cm.step(make_batch("packed", batch=2, seq=16, seed=7) | {"use_cache": False})
    assert report.counts["varlen_attention"] == 2 and report.graphs[0].guards == []
    assert report.runtime == {"fast_path": 1}


def test_a_graph_dynamo_throws_away_leaves_nothing_in_the_report():
    """Issue 9 §8: with dynamic=True, Dynamo compiles a packed batch's graph once with a symbolic
    dropout probability, throws it away and traces again; only the graph that runs is reported."""
    from graphopt.tiny_models import build_tiny_model, make_batch

    torch._dynamo.reset()
    compiled = torch.compile(build_tiny_model("llama"), backend="graphopt", dynamic=True)
    with graphopt.capture() as report:
        compiled(**make_batch("packed", batch=2, seq=16, seed=8), use_cache=False)
    assert len(report.graphs) == 1 and report.counts["varlen_attention"] == 2, report
    assert not any("dropout" in reason for _, reason in report.declines), report
    assert report.runtime == {"fast_path": 1}
