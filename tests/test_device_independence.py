"""Recognition does not depend on the graph's device or dtype.

Every family's Dynamo graph, for each batch layout, with and without labels, in fp32 and bf16, is
captured on the CPU and retargeted to CUDA (device constants and fake example values, see
``tests/support/retarget.py``; nothing runs on a GPU). graphopt's passes must make the same rewrites and
the same declines on both, and no pass may raise. Probes run on the CPU whatever the graph names,
so a CUDA graph is recognized exactly as its CPU twin.

A CPU-only build of torch cannot run some ops on fake CUDA tensors (those that take a CUDA device
guard, e.g. ``contiguous`` of a strided tensor), which the passes do to record metadata for the
nodes they insert. There the graph is retargeted to the ``meta`` device instead: it is just as
foreign to the CPU probes (a probe that mixed devices would raise the same way), and every op runs
on it. A CUDA build (the GPU machines) retargets to ``cuda`` itself.
"""

from __future__ import annotations

import collections

import pytest
import torch

from graphopt.inspection import GraphReport
from graphopt.options import GraphoptOptions
from graphopt.passes import run_passes
from graphopt.tiny_models import FAMILIES, build_tiny_model, make_batch
from tests.support.retarget import capture_graphs, retarget

# "left" and "right" trace to the same graph (they differ only in values), checked below once.
LAYOUTS = ("right", "packed", "none")
DEVICE = "cuda" if torch.backends.cuda.is_built() else "meta"


def _passes(gm) -> tuple:
    report = GraphReport(0, gm.code, quiet=True)
    _, ctx = run_passes(gm, GraphoptOptions(), report)
    rewrites = collections.Counter((r.name, r.rule) for r in report.rewrites)
    declines = sorted((d.name, d.reason) for d in report.declines)
    guards = sorted(g.name for g in ctx.guards)
    return rewrites, declines, guards


def _batch(layout: str, labels: bool) -> dict:
    batch = make_batch(layout, batch=2, seq=16, seed=1)
    if layout == "packed":
        batch["use_cache"] = False  # transformers splits packed rows only without a cache
    if not labels:
        batch.pop("labels")
    return batch


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_get_the_rewrites_of_their_cpu_twins(family, dtype):
    model = build_tiny_model(family, dtype=dtype)
    for layout in LAYOUTS:
        for labels in (True, False):
            with torch.set_grad_enabled(labels):
                graphs = capture_graphs(model, **_batch(layout, labels))
            assert graphs, f"{family}/{layout}: nothing was traced"
            for gm in graphs:
                on_cpu = _passes(gm)
                on_cuda = _passes(retarget(gm, DEVICE))
                where = f"{family}/{layout}/{'labels' if labels else 'no labels'}/{dtype}"
                assert on_cuda == on_cpu, f"{where}:\n cpu:  {on_cpu}\n cuda: {on_cuda}"
                raised = [reason for _, reason in on_cpu[1] if "the pass raised" in reason]
                assert not raised, f"{where}: {raised}"
                if labels and layout == "right":
                    assert on_cpu[0][("mask_elision", "eager_causal_padding" if family == "gemma2" else "sdpa_causal_padding")] == 2, where
                if labels and layout == "packed" and family != "gemma2":
                    assert on_cpu[0][("varlen_attention", "sdpa_packed")] == 2, where


def test_left_and_right_padding_trace_the_same_graph():
    model = build_tiny_model("llama")
    (right,) = capture_graphs(model, **make_batch("right", batch=2, seq=16, seed=1))
    (left,) = capture_graphs(model, **make_batch("left", batch=2, seq=16, seed=1))
    assert right.code == left.code


def test_retargeted_graph_names_only_the_new_device():
    model = build_tiny_model("llama")
    (gm,) = capture_graphs(model, **make_batch("right", batch=2, seq=16, seed=1))
    cuda = retarget(gm, DEVICE)
    devices = set()
    for node in cuda.graph.nodes:
        value = node.meta.get("example_value")
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                devices.add(leaf.device.type)
        torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: devices.add(a.type) if isinstance(a, torch.device) else None)
    assert devices == {DEVICE}
