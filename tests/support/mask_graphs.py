"""Tiny attention graphs for the mask tests (:mod:`tests.test_masks`, :mod:`tests.test_handoff`):
``sdpa_with(mask_fn)`` attends with the mask ``mask_fn`` builds from an attention mask, ``qkv()``
gives its inputs (``B, S, H, D``) and ``capture`` returns the single Dynamo graph of a call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

B, S, H, D = 2, 8, 2, 4


def capture(fn, *args):
    """The single Dynamo graph of ``fn(*args)`` (static shapes)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def sdpa_with(mask_fn):
    def fn(q, k, v, am):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(am))

    return fn
