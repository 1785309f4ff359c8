"""Dynamo graphs captured on the CPU and retargeted to another device, with nothing run there.

:func:`capture_graphs` records the FX graphs Dynamo hands a backend (without compiling them).
:func:`retarget` rewrites such a graph for ``device`` (``"cuda"``): every device constant in the
graph names it, and every node's ``example_value`` is recomputed as a fake tensor on it, as Dynamo
would have recorded them when tracing on that device. Fake tensors need no GPU, so a CPU machine
can check that graphopt recognizes a CUDA graph exactly as its CPU twin.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode


def capture_graphs(fn, *args, **kwargs) -> list[fx.GraphModule]:
    """The graphs Dynamo traces for ``fn(*args, **kwargs)``; each runs eagerly, uncompiled."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=False)(*args, **kwargs)
    return graphs


def retarget(gm: fx.GraphModule, device: str) -> fx.GraphModule:
    """A copy of ``gm`` as Dynamo would have traced it on ``device``.

    Device constants in the graph's arguments name ``device``, and every node's ``example_value``
    becomes a fake tensor on ``device`` with the shape, strides, dtype and ``requires_grad`` of the
    value recorded on the CPU. Nothing is executed: a CPU build of torch cannot run even fake ops
    that need a CUDA device guard (Python indexing does).
    """
    new = copy.deepcopy(gm)
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", 0)  # what tensors created on "cuda" report
    mode = FakeTensorMode()
    for old, node in zip(gm.graph.nodes, new.graph.nodes):
        node.args = fx.node.map_aggregate(node.args, lambda a: target if isinstance(a, torch.device) else a)
        node.kwargs = fx.node.map_aggregate(node.kwargs, lambda a: target if isinstance(a, torch.device) else a)
        value = old.meta.get("example_value", old.meta.get("val"))
        node.meta.pop("val", None)
        if value is not None:
            node.meta["example_value"] = torch.utils._pytree.tree_map(lambda v: _fake_like(v, mode, target), value)
    new.recompile()
    return new


def _fake_like(value, mode: FakeTensorMode, device: torch.device):
    if not isinstance(value, torch.Tensor):
        return value
    with mode:
        fake = torch.empty_strided(
            tuple(int(s) for s in value.shape), tuple(int(s) for s in value.stride()), dtype=value.dtype, device=device
        )
    return fake.requires_grad_(value.requires_grad) if value.requires_grad else fake
