"""Every rewrite through Inductor's code generation, once per distinct attention and RoPE layout.

Most model-level tests check graphopt's rewrites without Inductor's C++ code generation (the
``aot_eager`` modules, see ``tests/conftest.py``). Inductor itself is where graphopt's ops meet
generated kernels (their layouts, their fake implementations under dynamic shapes, the gradients of
their outputs): this module compiles one model per layout with the real backend, as a user does,
and runs a right-padded step (mask elision, unpadding, the fused loss, behind the guard) and a
packed step (per-document attention, RoPE fused), and for Llama a left-padded step (the exact
masked path, a graph with only the rewrites that need no guard).
Eager HF vs ``backend="graphopt"``: the loss and every parameter gradient, what fired asserted.

The layouts: Llama (half RoPE, SDPA), Gemma 2 (eager attention with a logit softcap, layer 0
sliding over 4 tokens, a softcapped loss), GLM-4 (partial interleaved RoPE), Phi-3 (fused qkv),
Cohere (RoPE in fp32, a logit scale folded into the loss). Also through Inductor elsewhere: the
trainers, TRL, PEFT and an MoE model with its auxiliary loss (``test_hf.py``), DDP and FSDP2
(``test_distributed.py``), gpt-oss's sinks (``passes/test_sliding_windows.py``).
"""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

pytestmark = pytest.mark.slow

SEQ = 24
# family -> (config overrides, packed rules {(pass, rule): layers}, padded rules, the loss rule)
LAYOUTS = {
    "llama": ({}, {("varlen_attention", "sdpa_packed"): 2}, {("mask_elision", "sdpa_causal_padding"): 2}, "mean"),
    "gemma2": (
        {"sliding_window": 4},
        {("varlen_attention", "eager_packed_sliding"): 1, ("varlen_attention", "eager_packed"): 1},
        {("mask_elision", "eager_sliding_causal_padding"): 1, ("mask_elision", "eager_causal_padding"): 1},
        "mean_softcap",
    ),
    "glm4": ({}, {("varlen_attention", "sdpa_packed"): 2}, {("mask_elision", "sdpa_causal_padding"): 2}, "mean"),
    "phi3": ({}, {("varlen_attention", "sdpa_packed"): 2}, {("mask_elision", "sdpa_causal_padding"): 2}, "mean"),
    "cohere": ({}, {("varlen_attention", "sdpa_packed"): 2}, {("mask_elision", "sdpa_causal_padding"): 2}, "mean_scaled"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    torch.manual_seed(0)
    overrides = LAYOUTS[request.param][0]
    return request.param, CompiledModel(build_tiny_model(request.param, **overrides))


def test_padded_packed_and_left_padded_steps_through_inductor(layout):
    family, cm = layout
    _, packed_rules, padded_rules, loss_rule = LAYOUTS[family]

    right = make_batch("right", batch=3, seq=SEQ, pad_fraction=0.4, seed=5) | {"use_cache": False}
    eager, compiled, report = cm.step(right)
    assert_steps_equal(eager, compiled, real_positions=real_positions(right))
    for rule, n in padded_rules.items():
        assert report.rule_counts[rule] == n, (rule, report)
    assert report.rule_counts[("fused_cross_entropy", loss_rule)] == 1, report
    assert report.runtime["fast_path"] == 1 and report.runtime["unpad"] == 1, report
    assert "torch.ops.graphopt.linear_cross_entropy" in "\n".join(report.graph_code("after"))

    packed = make_batch("packed", batch=1, seq=SEQ, seed=3) | {"use_cache": False}
    eager, compiled, report = cm.step(packed)
    assert_steps_equal(eager, compiled)
    for rule, n in packed_rules.items():
        assert report.rule_counts[rule] == n, (rule, report)
    assert report.counts["rope_fusion"] == 2, report
    code = "\n".join(report.graph_code("after"))
    assert "scaled_dot_product_attention" not in code and "softmax" not in code

    if family != "llama":  # the exact fallback is Inductor's compile of the graph as traced
        return
    left = make_batch("left", batch=3, seq=SEQ, pad_fraction=0.4, seed=4) | {"use_cache": False}
    eager, compiled, report = cm.step(left)
    assert_steps_equal(eager, compiled)
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1, report
