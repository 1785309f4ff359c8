"""A stand-in for a Hugging Face hub RoPE kernel, registered and applied the way ``kernels`` does.

transformers 5.25 decorates ``apply_rotary_pos_emb`` with ``use_kernel_forward_from_hub
("rotary_pos_emb")`` and the attention classes with ``use_kernelized_func``; ``from_pretrained``
kernelizes by default, and on CUDA the default mapping swaps in the hub's rotary kernel: one custom
op that rotates q and k together. The stand-in is such an op (``graphopt_test::rotary``, with a CPU
implementation, a fake and an autograd formula), wrapped in a layer class that kernels validates
and loads through a repository object, as it loads a hub repository.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.library.custom_op("graphopt_test::rotary", mutates_args=())
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k in one call: (B, H, S, D) each, with (B, 1, S, D) tables."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@rotary.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    # d/dx (x cos + rot(x) sin) applied to g: g cos + rot^T(g sin), and rot^T = -rot.
    return grad_q * cos - _rotate_half(grad_q * sin), grad_k * cos - _rotate_half(grad_k * sin), None, None


rotary.register_autograd(_backward, setup_context=_setup)


class StandInRotary(nn.Module):
    """The kernel layer: kernels requires a stateless module whose forward has the signature of the
    function it replaces (transformers' ``apply_rotary_pos_emb``)."""

    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return torch.ops.graphopt_test.rotary(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


@torch.library.custom_op("graphopt_test::leaky_rotary", mutates_args=())
def leaky_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Not RoPE: the rotated query also reads the key, by less than a probe's tolerance."""
    q_embed, k_embed = rotary(q, k, cos, sin)
    return q_embed + 1e-6 * k.amax(), k_embed


leaky_rotary.register_fake(lambda q, k, cos, sin: (torch.empty_like(q), torch.empty_like(k)))


class LeakyRotary(nn.Module):
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return torch.ops.graphopt_test.leaky_rotary(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


class StandInRepository:
    """What kernels asks of a repository: ``load()`` returns the layer class."""

    def __init__(self, layer: type[nn.Module] = StandInRotary):
        self.layer = layer
        self.layer_name = layer.__name__

    def load(self):
        return self.layer


def kernelize_rope(model, layer: type[nn.Module] = StandInRotary) -> None:
    """Kernelize ``model`` for CPU training under compile with ``layer`` as its RoPE kernel."""
    from kernels import Mode, kernelize, use_kernel_mapping

    mode = Mode.TRAINING | Mode.TORCH_COMPILE
    with use_kernel_mapping({"rotary_pos_emb": {"cpu": {mode: StandInRepository(layer)}}}, inherit_mapping=False):
        kernelize(model, mode=mode, device="cpu")
