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
