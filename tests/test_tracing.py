"""What Dynamo hands graphopt, family by family: a guard against the next transformers release.

Each tiny family is compiled plain and under activation checkpointing (reentrant and not) with
graphopt's whole pipeline but Inductor replaced by the graph's own forward (seconds, not minutes;
the numbers of the Inductor path are covered by the pass tests). Each test asserts the number of
graphs of one training step and the rewrites that fire, and a failure prints Dynamo's graph-break
reasons: a release that splits the step fails here, with the reason, rather than twenty tests
far away.

Also here: :mod:`graphopt.tracing`'s allowance for kernels' ``use_kernelized_func`` wrapper is
scoped to graphopt's compiles and leaves kernels' state as it found it (its allowance for
transformers' output capture: ``passes/test_unpad_experts.py``).
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import tracing
from graphopt.tiny_models import FAMILIES, build_tiny_model, make_batch
from tests.support.harness import assert_steps_equal, compile_step, enable_checkpointing, explain_split

pytestmark = pytest.mark.oldest  # CI also runs this file against the oldest supported transformers

N_LAYERS = 2
def expected_rewrites(family: str, layout: str) -> dict[str, int]:
    if layout == "packed":
        return {"varlen_attention": N_LAYERS, "fused_cross_entropy": 1}
    return {"mask_elision": N_LAYERS, "fused_cross_entropy": 1, "unpad": 1}


@pytest.mark.parametrize("checkpointing", ["plain", "checkpointed", "reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_graph_per_step_and_the_rewrites_fire(without_inductor, family, checkpointing):
    model = build_tiny_model(family)
    if checkpointing != "plain":
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
    for layout in ("right", "packed"):
        batch = make_batch(layout, seq=16)
        eager, compiled, report = compile_step(model, dict(batch, use_cache=False))
        assert len(report.graphs) == 1, f"{family} {checkpointing} {layout}: {explain_split(report)}"
        counts = report.counts
        for name, n in expected_rewrites(family, layout).items():
            assert counts[name] == n, f"{family} {checkpointing} {layout}: {name} x{counts[name]}, expected {n}; {explain_split(report)}"
        assert_steps_equal(eager, compiled)


def test_kernels_state_is_restored_after_compiled_checkpointed_steps(without_inductor):
    layer = pytest.importorskip("kernels._internals.layer.layer")
    model = build_tiny_model("llama")
    enable_checkpointing(model, use_reentrant=False)
    _, _, report = compile_step(model, dict(make_batch("right"), use_cache=False))
    assert len(report.graphs) == 1, explain_split(report)
    state = layer._ACTIVE_KERNEL_FUNCS
    assert state.global_var is None and not state.uses_global_var and state.context_var.get() is None


def test_the_allowance_is_only_for_graphopt_compiles():
    """Another backend sees what Dynamo does without graphopt: with transformers' kernels wrapper
    on the attention class, the checkpointed step falls apart (and when a release removes the
    wrapper, one graph: either way the other backend's graphs are Dynamo's own)."""
    pytest.importorskip("kernels")
    from transformers.models.llama import modeling_llama

    wrapped = hasattr(modeling_llama.LlamaAttention.forward, "__wrapped__")
    model = build_tiny_model("llama")
    enable_checkpointing(model, use_reentrant=False)
    graphs = []

    def other_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=other_backend)(**make_batch("right"), use_cache=False).loss.backward()
    if wrapped:
        assert len(graphs) > 1 and not any(analysis_sdpa(g) for g in graphs)
    else:
        assert len(graphs) == 1


def analysis_sdpa(gm) -> bool:
    from graphopt import analysis

    modules = [gm, *(m for m in gm.modules() if hasattr(m, "graph"))]
    return any(analysis.is_sdpa(n) for m in modules for n in m.graph.nodes)


def test_is_graphopt_sees_through_torch_compile_wrappers():
    from torch._dynamo.eval_frame import get_compiler_fn

    assert tracing.is_graphopt(get_compiler_fn(torch._TorchCompileWrapper("graphopt", None, None, None)))
    assert tracing.is_graphopt(get_compiler_fn("graphopt"))
    assert not tracing.is_graphopt(get_compiler_fn(torch._TorchCompileWrapper("eager", None, None, None)))
    assert not tracing.is_graphopt(None)


def test_a_split_step_says_why_and_how_to_fix_it(without_inductor, monkeypatch, caplog):
    """With the allowance taken away, the checkpointed step splits: the report lists Dynamo's
    reason, the note gives the versions and the fix, and the warning comes once."""
    pytest.importorskip("kernels")
    from torch._dynamo.side_effects import SideEffects

    from torch._dynamo.variables.higher_order_ops import CheckpointHigherOrderVariable

    monkeypatch.setattr(SideEffects, "check_allowed_side_effect", SideEffects.check_allowed_side_effect.__wrapped__)
    monkeypatch.setattr(CheckpointHigherOrderVariable, "_call_function", CheckpointHigherOrderVariable._call_function.__wrapped__)
    monkeypatch.setattr(tracing, "_warned_causes", set())
    model = build_tiny_model("llama")
    enable_checkpointing(model, use_reentrant=False)
    with caplog.at_level("WARNING", logger="graphopt"):
        _, _, report = compile_step(model, dict(make_batch("right"), use_cache=False))
    assert len(report.graphs) > 1
    assert any("HOP: Unsafe side effect" in reason for reason in report.graph_breaks)
    text = str(report)
    assert "graph breaks" in text and "transformers " in text and "Fix: turn activation checkpointing off" in text
    warnings = [r for r in caplog.records if "Dynamo split the compiled step" in r.getMessage()]
    assert len(warnings) == 1
    assert report.counts["mask_elision"] == 0


def test_an_unsupported_transformers_is_named_with_the_fix(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    problem = tracing.unsupported_versions()
    assert "transformers 5.18.0" in problem and "pip install -U 'transformers>=5.19'" in problem
    monkeypatch.setattr(transformers, "__version__", "5.19.0")
    assert tracing.unsupported_versions() is None

