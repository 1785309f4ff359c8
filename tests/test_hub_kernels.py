"""Models kernelized by ``kernels`` (transformers >= 5.25 kernelizes ``from_pretrained`` models by
default): a hub RoPE kernel that rotates q and k in one custom op is proven by meaning, like any
other RoPE, and per-document attention replaces it. The stand-in kernel of
:mod:`tests.support.stand_in_kernels` runs on the CPU; a CUDA-only hub kernel cannot be probed there and
is declined with its name (see :func:`test_a_kernel_that_cannot_run_on_the_probe_device_is_named`).
"""

from __future__ import annotations

import pytest

import graphopt

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import assert_steps_equal, compile_step, explain_split

pytest.importorskip("kernels")
from tests.support.stand_in_kernels import kernelize_rope  # noqa: E402

N_LAYERS = 2


@pytest.fixture(scope="module")
def kernelized():
    model = build_tiny_model("llama")
    kernelize_rope(model)
    func = model.model.layers[0].self_attn._kernel_funcs["rotary_pos_emb"]
    assert func.forward.__func__ is not type(func).forward  # the stand-in replaced the torch code
    return model


def test_the_kernel_is_in_the_traced_graph(without_inductor, kernelized):
    _, _, report = compile_step(kernelized, dict(make_batch("packed"), use_cache=False))
    assert "graphopt_test.rotary" in report.graph_code("before")[0]


def test_packed_attention_over_a_kernelized_rope_runs_per_document(without_inductor, kernelized):
    eager, compiled, report = compile_step(kernelized, dict(make_batch("packed"), use_cache=False))
    assert report.counts["varlen_attention"] == N_LAYERS and report.counts["rope_fusion"] == N_LAYERS, explain_split(report)
    assert "graphopt_test.rotary" not in report.graph_code("after")[0]
    assert_steps_equal(eager, compiled)


def test_padded_batches_drop_the_mask_around_a_kernelized_rope(without_inductor, kernelized):
    """Mask elision fires; unpadding cannot prove the op token-wise and says which op and the fix."""
    eager, compiled, report = compile_step(kernelized, dict(make_batch("right"), use_cache=False))
    assert report.counts["mask_elision"] == N_LAYERS, explain_split(report)
    assert report.counts["unpad"] == 0
    (reason,) = [reason for name, reason in report.declines if name == "unpad"]
    assert "custom op (graphopt_test)" in reason and "model.reset_kernels()" in reason
    assert_steps_equal(eager, compiled)


def test_a_rope_that_reads_the_other_tensor_is_not_rope(without_inductor):
    """Negative: an op whose query output depends on the key is not RoPE of the query, even when
    the dependence is within the probe's tolerance of RoPE (two draws of the key tell). Eager only
    (it has no autograd formula), so the forward is compared."""
    import torch

    from tests.support.stand_in_kernels import LeakyRotary

    model = build_tiny_model("llama")
    kernelize_rope(model, LeakyRotary)
    batch = dict(make_batch("packed"), use_cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**batch).loss
        with graphopt.capture() as report:
            compiled = torch.compile(model, backend="graphopt")(**batch).loss
    # not fused: each layer attends per document over the kernel's own outputs, which is exact
    assert report.counts["rope_fusion"] == 0, explain_split(report)
    assert report.rule_counts[("varlen_attention", "sdpa_packed_unfused")] == 2, explain_split(report)
    notes = [n for g in report.graphs for n in g.notes]
    assert sum("could not prove the query is RoPE" in n for n in notes) == 2, notes
    torch.testing.assert_close(compiled, eager)


def test_the_trainer_callback_turns_hub_kernels_off():
    from graphopt.hf import turn_off_hub_kernels

    model = build_tiny_model("llama")
    assert not turn_off_hub_kernels(model)  # not kernelized: nothing to do
    kernelize_rope(model)
    model._use_kernels = True  # what set_use_kernels records after kernelizing
    func = model.model.layers[0].self_attn._kernel_funcs["rotary_pos_emb"]
    assert "forward" in func.__dict__
    assert turn_off_hub_kernels(model)
    assert "forward" not in func.__dict__ and not model.use_kernels
