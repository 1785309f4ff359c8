"""Shared helpers for model-level tests: one training step eager vs compiled, compared on the loss
and every parameter gradient, with graphopt's report captured.

Compiling on 2 cores is slow, so :class:`CompiledModel` keeps one ``torch.compile``-d model per
family (and options) for a whole test module; layouts of the same shapes then reuse its graphs.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

import graphopt
from tests.support.tolerances import tol


@dataclass
class Step:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    grads: dict[str, torch.Tensor]


def run_step(model, batch: dict, *, backward: bool = True, objective=None) -> Step:
    """One forward (and backward) of ``model`` on ``batch``; returns the loss and fresh grads.

    The backward differentiates ``objective(output)`` if given, else the model's loss.
    """
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = out.loss
    if backward and loss is not None:
        (objective(out) if objective is not None else loss).backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in _named_parameters(model)
        if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    logits = out.logits.detach() if out.logits is not None else None
    return Step(loss.detach() if loss is not None else None, logits, grads)


def _named_parameters(model):
    return getattr(model, "_orig_mod", model).named_parameters()


def assert_steps_equal(eager: Step, compiled: Step, *, dtype=torch.float32, real_positions=None) -> None:
    """The loss and every parameter gradient agree (and neither is NaN unless both are)."""
    assert (eager.loss is None) == (compiled.loss is None)
    if eager.loss is not None:
        torch.testing.assert_close(compiled.loss, eager.loss, **tol(dtype), equal_nan=True)
    assert set(compiled.grads) == set(eager.grads), f"the compiled step left some parameter without a gradient: {set(eager.grads) ^ set(compiled.grads)}"
    for name, grad in eager.grads.items():
        assert not torch.isnan(compiled.grads[name]).any() or torch.isnan(grad).any(), f"NaN in grad of {name}"
        torch.testing.assert_close(compiled.grads[name], grad, **tol(dtype, "grad"), msg=lambda m: f"{name}: {m}")
    if real_positions is not None and eager.logits is not None:
        torch.testing.assert_close(compiled.logits[real_positions], eager.logits[real_positions], **tol(dtype))


class CompiledModel:
    """A model and its ``torch.compile(backend="graphopt")`` twin sharing parameters.

    ``step(batch)`` runs eager and compiled on the same batch and returns both steps and the
    report of what graphopt compiled and dispatched during the compiled call.
    """

    def __init__(self, model, **compile_kwargs):
        # Dynamo caches graphs per code object, and every HF model of a class shares its forward's
        # code: without a reset this model could run a graph compiled (and reported) for another.
        torch._dynamo.reset()
        self.model = model
        self.compiled = torch.compile(model, backend="graphopt", **compile_kwargs)
        self.compile_reports: list = []

    def step(self, batch: dict, *, backward: bool = True):
        eager = run_step(self.model, batch, backward=backward)
        with graphopt.capture() as report:
            compiled = run_step(self.compiled, batch, backward=backward)
        self.compile_reports.extend(report.graphs)
        return eager, compiled, report

    def counts(self) -> collections.Counter:
        """Rewrite counts over every graph this model compiled so far."""
        return sum((g.counts for g in self.compile_reports), collections.Counter())

    def after_code(self) -> str:
        return "\n".join(g.after for g in self.compile_reports)


def count_attached_logits_backward(monkeypatch) -> list:
    """A list that gains one item each time the gradient attached to detached logits runs
    (:func:`graphopt.ops.linear_cross_entropy.attach_logits_grad`)."""
    from graphopt.ops.linear_cross_entropy import _AttachLogitsGrad

    calls = []
    backward = _AttachLogitsGrad.backward
    monkeypatch.setattr(_AttachLogitsGrad, "backward", staticmethod(lambda ctx, g: calls.append(1) or backward(ctx, g)))
    return calls


def real_positions(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def compile_step(model, batch: dict):
    """One eager and one compiled training step of ``model``; returns both, the report, and the
    number of graphs Dynamo handed to graphopt."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphopt")
    eager = run_step(model, batch)
    with graphopt.capture() as report:
        step = run_step(compiled, batch)
    return eager, step, report


def explain_split(report) -> str:
    return (
        f"{len(report.graphs)} graphs; Dynamo's graph breaks: {report.graph_breaks or 'none'}; "
        f"rewrites {dict(report.counts)}; declines {report.declines}"
    )


def enable_checkpointing(model, **kwargs) -> None:
    """``activation_checkpointing_enable`` (transformers >= 5.2x) or its older name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
