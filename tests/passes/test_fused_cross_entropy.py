"""Fused LM head + cross-entropy, end to end: ``linear`` + ``cross_entropy`` become
``graphopt::linear_cross_entropy``.

Eager vs ``backend="graphopt"`` on training steps of tiny models and on plain loss functions,
comparing the loss and every gradient, with the rewrite asserted to fire (counter, rule, op in the
code after the passes) or to decline (counter at 0, reason reported, no op in the code).

Compiled models are shared across the module (one per family and options, see ``models``); every
model-level batch has the same (2, SEQ) shape unless a test needs another.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.tiny_models import IGNORE_INDEX, build_tiny_model, make_batch
from tests.support.harness import (
    CompiledModel,
    Step,
    assert_steps_equal,
    count_attached_logits_backward,
    real_positions,
    run_step,
)
from tests.support.tolerances import tol

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

BATCH, SEQ = 2, 16
FUSED_OP = "torch.ops.graphopt.linear_cross_entropy"
UNFUSED_CE = "torch.nn.functional.cross_entropy"
NAME = "fused_cross_entropy"


@pytest.fixture(scope="module")
def models():
    """``models(family, **options)``: one :class:`CompiledModel` per (family, options), built on
    first use and shared by every test of the module (same shapes, so they share graphs)."""
    cache: dict[tuple, CompiledModel] = {}

    def get(family: str, **options) -> CompiledModel:
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = CompiledModel(build_tiny_model(family), **({"options": options} if options else {}))
        return cache[key]

    get.compiled = cache
    return get


def _rules(graphs) -> collections.Counter:
    return collections.Counter((r.name, r.rule) for g in graphs for r in g.rewrites)


def assert_fused(cm: CompiledModel, rule: str) -> None:
    """Every graph ``cm`` compiled so far fused its one loss (so did whichever graph served the
    last call), and some graph did so with ``rule``."""
    assert cm.compile_reports, "nothing was compiled"
    for graph in cm.compile_reports:
        assert graph.counts[NAME] == 1, graph
        assert FUSED_OP in graph.after and UNFUSED_CE not in graph.after
    assert _rules(cm.compile_reports)[(NAME, rule)] >= 1, _rules(cm.compile_reports)


def assert_declined(graphs, reason: str) -> None:
    """No graph fused its loss, and one reported a decline whose reason contains ``reason``."""
    assert graphs, "nothing was compiled"
    for graph in graphs:
        assert graph.counts[NAME] == 0, graph
        assert FUSED_OP not in graph.after
    reasons = [d.reason for g in graphs for d in g.declines if d.name == NAME]
    assert any(reason in r for r in reasons), reasons


def right_padded(seed: int, **kwargs) -> dict:
    return make_batch("right", batch=BATCH, seq=SEQ, seed=seed, **kwargs)


def n_targets(batch: dict) -> int:
    """HF's num_items_in_batch: labels that are targets after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------
# Family matrix


# Every family's loss is fused and exact through the whole pipeline in tests/test_tracing.py, and
# unpadded in tests/passes/test_unpad.py (every SDPA family); one family per layout also through
# Inductor in tests/test_inductor.py. Here, on the padded fast path, one family of each head / RoPE
# layout: half RoPE, softcapped eager (gemma2), partial interleaved RoPE (glm4), fused qkv (phi3).
@pytest.mark.parametrize("family", ["llama", "gemma2", "glm4", "phi3"])
def test_family_loss_is_fused_and_exact(models, family):
    cm = models(family)
    batch = right_padded(seed=1)
    eager, compiled, _ = cm.step(batch)
    # Logits at padded positions are unspecified: mask elision changes what pads attend to.
    assert compiled.logits.shape == eager.logits.shape
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert_fused(cm, "mean_softcap" if family == "gemma2" else "mean")


def test_chunked_logits_equal_eager_everywhere_without_mask_elision(models):
    """32 tokens in chunks of 5 (the last one short): the op writes the logits chunk by chunk."""
    cm = models("llama", mask_elision=False, cross_entropy_chunk_size=5)
    eager, compiled, _ = cm.step(right_padded(seed=2))
    assert_steps_equal(eager, compiled)
    torch.testing.assert_close(compiled.logits, eager.logits, **tol(torch.float32))
    assert_fused(cm, "mean")
    assert any("chunks of 5" in r.detail for g in cm.compile_reports for r in g.rewrites if r.name == NAME)


def test_cohere_logit_scale_is_fused_and_padded_logits_are_elided(models):
    """Cohere multiplies the logits by ``logit_scale`` before the loss: the scale is folded into
    the op, and mask elision still proves the padded outputs unused through it."""
    cm = models("cohere")
    batch = right_padded(seed=1)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert_fused(cm, "mean_scaled")
    assert cm.counts()["mask_elision"] == 2 and report.runtime["fast_path"] == 1
    assert "logit_scale = 0.0625" in cm.after_code()


def test_drop_logits_returns_empty_logits_and_says_what_it_saves(models):
    cm = models("llama", drop_logits=True)
    eager, compiled, _ = cm.step(right_padded(seed=3))
    assert_steps_equal(eager, compiled)
    assert compiled.logits.numel() == 0 and eager.logits.shape == (BATCH, SEQ, 128)
    assert_fused(cm, "mean")
    notes = [n for g in cm.compile_reports for n in g.notes]
    assert any("drop_logits=True" in n and "saves" in n for n in notes), notes


# ---------------------------------------------------------------------------------------------------
# The gradient of the returned logits


def _logits_mode(graphs) -> set[str]:
    """The ``logits`` argument of every fused op in ``graphs`` (from the code after the passes)."""
    modes = {mode for mode in ("'none'", "'differentiable'", "'detached'") for g in graphs if mode in g.after}
    return {m.strip("'") for m in modes}


def _loss_and_logits(batch: dict, probe: torch.Tensor):
    """An objective with a second mean term on the logits (an auxiliary loss), read at real
    positions, where mask elision keeps them exact."""
    real = batch["attention_mask"].bool()
    return lambda out: out.loss + (out.logits * probe)[real].mean()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradient_through_returned_logits_is_exact(models, monkeypatch, family):
    """A second loss term on the logits: llama's logits get their gradient attached outside the
    graph, gemma2's softcapped logits keep it in the graph. Both equal eager."""
    cm = models(family)
    batch = right_padded(seed=8)
    cm.step(batch)  # compiled (and reported) by the same shapes
    probe = torch.randn(BATCH, SEQ, cm.model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    calls = count_attached_logits_backward(monkeypatch)
    eager = run_step(cm.model, batch, objective=_loss_and_logits(batch, probe))
    compiled = run_step(cm.compiled, batch, objective=_loss_and_logits(batch, probe))
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    detached = family == "llama"
    assert _logits_mode(cm.compile_reports) == {"detached" if detached else "differentiable"}
    assert len(calls) == int(detached)
    where = "attached outside the graph" if detached else "in the graph"
    assert any(where in n for g in cm.compile_reports for n in g.notes)


def test_loss_only_backward_never_runs_the_logits_gradient(models, monkeypatch):
    cm = models("llama")
    calls = count_attached_logits_backward(monkeypatch)
    batch = right_padded(seed=9)
    eager, compiled, _ = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert _logits_mode(cm.compile_reports) == {"detached"}
    assert calls == []


def test_frozen_lm_head_with_gradient_through_logits():
    """LoRA-style: lm_head frozen, so only the hidden states get the logits' gradient."""
    model = build_tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    cm = CompiledModel(model)
    batch = right_padded(seed=10)
    cm.step(batch)
    probe = torch.randn(BATCH, SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    eager = run_step(model, batch, objective=_loss_and_logits(batch, probe))
    compiled = run_step(cm.compiled, batch, objective=_loss_and_logits(batch, probe))
    assert "lm_head.weight" not in compiled.grads and "model.norm.weight" in compiled.grads
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert _logits_mode(cm.compile_reports) == {"detached"}
    # No (V, H) weight-gradient accumulator or matmul for a frozen head.
    assert "compute_grad_weight = False" in cm.after_code()


# ---------------------------------------------------------------------------------------------------
# Normalization


def _sum_grads(steps: list[Step]) -> dict[str, torch.Tensor]:
    return {name: sum(s.grads[name] for s in steps) for name in steps[0].grads}


def test_gradient_accumulation_with_num_items_equals_the_full_batch(models):
    """HF's Trainer passes the global token count to every micro-batch: the loss is then a sum
    divided by it (``reduction="sum"``), and the micro-batch gradients add up to the full batch's."""
    cm = models("llama")
    micro = [right_padded(seed=10 + i, pad_fraction=f) for i, f in enumerate((0.05, 0.25, 0.45))]
    counts = [n_targets(b) for b in micro]
    assert len(set(counts)) == len(counts), counts
    num_items = torch.tensor(sum(counts))

    steps = [cm.step(b | {"num_items_in_batch": num_items})[:2] for b in micro]
    for eager, compiled in steps:  # compiled equals eager at each micro-step
        assert_steps_equal(eager, compiled)
    full = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    eager_full, compiled_full, _ = cm.step(full | {"num_items_in_batch": num_items})
    assert_steps_equal(eager_full, compiled_full)

    for which, full_step in ((0, eager_full), (1, compiled_full)):
        accumulated = Step(sum(s[which].loss for s in steps), None, _sum_grads([s[which] for s in steps]))
        assert_steps_equal(full_step, accumulated)
    assert_fused(cm, "sum")


@pytest.mark.parametrize(
    "num_items", [torch.tensor(37.0), torch.tensor(37), 37, 37.0], ids=["float_tensor", "int_tensor", "int", "float"]
)
def test_num_items_in_batch_as_the_trainer_passes_it(models, num_items):
    """HF's Trainer passes num_items_in_batch as a float tensor (a true division); users pass ints
    and numbers. Each is a divisor, not a reason to decline, and mask elision still fires."""
    cm = models("llama")
    batch = right_padded(seed=12)
    eager, compiled, report = cm.step(batch | {"num_items_in_batch": num_items})
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert report.runtime["fast_path"] == 1, report
    assert_fused(cm, "sum")
    assert cm.counts()["mask_elision"] >= 2


def test_autocast_runs_the_head_in_autocasts_dtype(models):
    """Issue 9 §5: under autocast eager's lm_head runs (and returns logits) in bf16 and the loss
    upcasts them; the fused op does the same instead of running the head in fp32."""
    cm = models("llama")
    batch = right_padded(seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, compiled, report = cm.step(batch)
    assert eager.logits.dtype == compiled.logits.dtype == torch.bfloat16
    assert_steps_equal(eager, compiled, dtype=torch.bfloat16, real_positions=real_positions(batch))
    assert_fused(cm, "mean")
    assert report.runtime["fast_path"] == 1


def test_a_divisor_computed_from_activations_keeps_mask_elision_off():
    """A loss divided by something the model computes could read padded positions."""

    class Normalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = build_tiny_model("llama")

        def forward(self, input_ids, attention_mask, labels):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            logits = out.logits.float()
            shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            total = F.cross_entropy(logits.view(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum")
            return total / out.hidden_states[-1].abs().sum()

    model = Normalized()
    batch = right_padded(seed=13)
    eager = model(**batch)
    torch._dynamo.reset()
    with graphopt.capture() as report:
        compiled = torch.compile(model, backend="graphopt")(**batch)
    torch.testing.assert_close(compiled, eager, **tol(torch.float32))
    assert report.counts["mask_elision"] == 0 and report.counts[NAME] == 1, report
    assert any("computed from model activations" in reason for _, reason in report.declines), report


def test_packed_batch_equals_padded_documents(models):
    """Same documents, packed in (2, SEQ) rows or one per right-padded row: same mean loss."""
    cm = models("llama")
    packed = make_batch("packed", batch=BATCH, seq=SEQ, seed=4) | {"use_cache": False}
    padded = make_batch("packed_docs", batch=BATCH, seq=SEQ, seed=4) | {"use_cache": False}
    assert n_targets(packed) == n_targets(padded)
    eager_padded, compiled_padded, _ = cm.step(padded)
    _, compiled_packed, _ = cm.step(packed)
    assert_steps_equal(eager_padded, compiled_padded)
    assert_steps_equal(eager_padded, compiled_packed)
    assert_fused(cm, "mean")


def _all_ignored(seed: int) -> dict:
    batch = right_padded(seed=seed)
    return batch | {"labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def test_all_labels_ignored_mean_is_nan_like_eager(models):
    cm = models("llama")
    eager, compiled, _ = cm.step(_all_ignored(seed=5))
    assert torch.isnan(eager.loss) and torch.isnan(compiled.loss)
    assert_steps_equal(eager, compiled)
    assert all(not g.any() for g in eager.grads.values())  # 0 * (1/0): eager's gradients are 0
    assert_fused(cm, "mean")


def test_all_labels_ignored_sum_over_num_items_is_zero_like_eager(models):
    """A micro-batch without targets in an accumulation step (the global count is not 0)."""
    cm = models("llama")
    eager, compiled, _ = cm.step(_all_ignored(seed=6) | {"num_items_in_batch": torch.tensor(7)})
    assert eager.loss.item() == 0.0 and compiled.loss.item() == 0.0
    assert_steps_equal(eager, compiled)
    assert all(not g.any() for g in compiled.grads.values())
    assert_fused(cm, "sum")


# ---------------------------------------------------------------------------------------------------
# Convergence


def _train_step(model, optimizer, batch: dict) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_twenty_adamw_steps_track_eager(models):
    model = build_tiny_model("llama")
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="graphopt")
    opt_compiled = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_eager = torch.optim.AdamW(eager_model.parameters(), lr=1e-3)
    with graphopt.capture() as report:
        for step in range(20):
            batch = right_padded(seed=100 + step)
            loss_eager = _train_step(eager_model, opt_eager, batch)
            loss_compiled = _train_step(compiled, opt_compiled, batch)
            torch.testing.assert_close(loss_compiled, loss_eager, **tol(torch.float32), msg=lambda m, step=step: f"step {step}: {m}")
    # Dynamo serves a new model instance from the graphs cached for the class: those compiled
    # here, or earlier by the module's shared llama models. Every one of them fused the loss.
    graphs = report.graphs + [g for (family, _), cm in models.compiled.items() if family == "llama" for g in cm.compile_reports]
    assert graphs and all(g.counts[NAME] == 1 for g in graphs), report
    assert report.runtime["fast_path"] == 20, report
    eager_params = dict(eager_model.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, eager_params[name], **tol(torch.float32, "grad"), msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------
# Plain loss functions: shift-0 labels, hidden (B, S, H)

B, S, H, V = 2, 5, 8, 11


def _loss_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    target = torch.randint(0, V, (B, S), generator=gen)
    target[0, -2:] = IGNORE_INDEX
    return hidden, weight, target


def _loss_and_grads(fn, hidden, weight, target) -> Step:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, target)
    loss.backward()
    return Step(loss.detach(), None, {"hidden": hidden.grad, "weight": weight.grad})


def compare_loss_fn(fn, seed: int = 0, **options):
    """Eager vs compiled ``fn(hidden, weight, target)``, loss and both gradients; the report."""
    inputs = _loss_inputs(seed)
    eager = _loss_and_grads(fn, *inputs)
    with graphopt.capture() as report:
        compiled = _loss_and_grads(torch.compile(fn, backend="graphopt", options=options or None), *inputs)
    assert_steps_equal(eager, compiled)
    return report


def plain_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1))


def label_smoothed_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), label_smoothing=0.1)


CLASS_WEIGHT = torch.linspace(0.5, 1.5, V)


def class_weighted_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), weight=CLASS_WEIGHT)


def exp_logits_loss(h, w, y):
    """The cross_entropy input comes from a parameter through exp, with no linear on its path."""
    logits = (w[:, :S].t().reshape(1, S, V) + h[..., :1]).exp()
    return F.cross_entropy(logits.float().reshape(-1, V), y.view(-1))


def logits_also_regularized_loss(h, w, y):
    """The logits feed a second term too: the op's backward adds their gradient to the loss's."""
    logits = F.linear(h, w)
    return F.cross_entropy(logits.float().view(-1, V), y.view(-1)) + 0.1 * logits.pow(2).mean()


@pytest.mark.parametrize("fn", [plain_loss, logits_also_regularized_loss], ids=lambda fn: fn.__name__)
def test_plain_function_with_unshifted_labels_is_fused(fn):
    """Labels used as they are (shift 0); 10 tokens in chunks of 3, ignored targets included."""
    report = compare_loss_fn(fn, cross_entropy_chunk_size=3)
    assert report.rule_counts[(NAME, "mean")] == 1, report
    (after,) = report.graph_code("after")
    assert FUSED_OP in after and UNFUSED_CE not in after
    # Logits read by other graph code keep their gradient in the graph; plain_loss returns none.
    assert _logits_mode(report.graphs) == ({"differentiable"} if fn is logits_also_regularized_loss else {"none"})


def loss_and_logits(h, w, y):
    """Returns the logits too: their gradient is attached outside the graph, to the hidden states
    that are here a graph input (the extra output is then a view of an input)."""
    logits = F.linear(h, w)
    return F.cross_entropy(logits.float().view(-1, V), y.view(-1)), logits


def scaled_loss_and_logits(h, w, y):
    logits = F.linear(h, w) * 0.25
    return F.cross_entropy(logits.float().view(-1, V), y.view(-1)), logits


@pytest.mark.parametrize("through_logits", [True, False], ids=["loss_and_logits", "loss_only"])
@pytest.mark.parametrize("scale", [1.0, 0.25], ids=["unscaled", "scaled"])
def test_returned_logits_of_a_graph_input(monkeypatch, through_logits, scale):
    """Returned logits (scaled or not) keep their values and get their gradient attached."""
    calls = count_attached_logits_backward(monkeypatch)
    probe = torch.randn(B, S, V, generator=torch.Generator().manual_seed(2))
    fn = loss_and_logits if scale == 1.0 else scaled_loss_and_logits

    def objective(h, w, y, fn):
        loss, logits = fn(h, w, y)
        return loss + (logits * probe).mean() if through_logits else loss

    inputs = _loss_inputs(seed=3)
    eager = _loss_and_grads(lambda h, w, y: objective(h, w, y, fn), *inputs)
    torch._dynamo.reset()
    compiled_fn = torch.compile(fn, backend="graphopt", options={"cross_entropy_chunk_size": 3})
    with graphopt.capture() as report:
        compiled = _loss_and_grads(lambda h, w, y: objective(h, w, y, compiled_fn), *inputs)
    assert_steps_equal(eager, compiled)
    assert report.rule_counts[(NAME, "mean" if scale == 1.0 else "mean_scaled")] == 1, report
    assert _logits_mode(report.graphs) == {"detached"}
    assert len(calls) == int(through_logits)
    logits = compiled_fn(*inputs)[1]
    torch.testing.assert_close(logits, F.linear(inputs[0], inputs[1]) * scale, **tol(torch.float32))


@pytest.mark.parametrize(
    "fn, reason",
    [(label_smoothed_loss, "label_smoothing"), (class_weighted_loss, "class weights")],
    ids=["label_smoothing", "class_weight"],
)
def test_unsupported_cross_entropy_arguments_are_declined(fn, reason):
    report = compare_loss_fn(fn)
    assert_declined(report.graphs, reason)


def scaled_loss(h, w, y):
    """Logits scaled by a constant before the upcast (as Cohere's logit_scale)."""
    return F.cross_entropy((F.linear(h, w) * 0.25).float().view(-1, V), y.view(-1))


def divided_loss(h, w, y):
    """Logits divided by a constant before the upcast (a temperature, as some families do)."""
    return F.cross_entropy((F.linear(h, w) / 3.0).float().view(-1, V), y.view(-1), reduction="sum") / 7


@pytest.mark.parametrize("fn, rule", [(scaled_loss, "mean_scaled"), (divided_loss, "sum_scaled")], ids=["multiply", "divide"])
def test_constant_logit_scales_are_fused(fn, rule):
    report = compare_loss_fn(fn, cross_entropy_chunk_size=3)
    assert report.rule_counts[(NAME, rule)] == 1, report
    (after,) = report.graph_code("after")
    assert FUSED_OP in after and UNFUSED_CE not in after


def test_logits_not_from_a_linear_are_not_fused():
    report = compare_loss_fn(exp_logits_loss)
    assert_declined(report.graphs, "not an elementwise map of lm_head")


def test_unscaled_logits_used_besides_the_scaled_ones_are_declined():
    def fn(h, w, y):
        logits = F.linear(h, w)
        return F.cross_entropy((logits * 0.5).float().view(-1, V), y.view(-1)) + logits.mean()

    report = compare_loss_fn(fn)
    assert_declined(report.graphs, "unscaled lm_head output is used")


# ---------------------------------------------------------------------------------------------------
# explain (last: it resets Dynamo, so the shared compiled models above would recompile)


def test_explain_reports_the_fused_loss():
    model = build_tiny_model("llama")
    eager = run_step(copy.deepcopy(model), right_padded(seed=7))
    report = graphopt.explain(model, **right_padded(seed=7))
    report.result.loss.backward()
    compiled = Step(report.result.loss.detach(), None, {n: p.grad for n, p in model.named_parameters()})
    assert_steps_equal(eager, compiled)
    assert report.counts[NAME] == 1 and report.rule_counts[(NAME, "mean")] == 1
    assert f"{NAME} x1" in str(report) and f"{NAME}/mean: 1" in str(report)
    assert FUSED_OP in report.graph_code("after")[0]
