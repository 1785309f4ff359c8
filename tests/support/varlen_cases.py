"""Packed-document inputs shared by the varlen attention tests."""

import torch


def rotary_tables(cu_seqlens: torch.Tensor, rotary_dim: int, interleaved: bool, dtype=torch.float32):
    """HF-style (T, R) cos/sin with positions restarting at every document."""
    n_tokens = int(cu_seqlens[-1])
    tokens = torch.arange(n_tokens)
    starts = cu_seqlens.long()[torch.searchsorted(cu_seqlens.long(), tokens, right=True) - 1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = (tokens - starts)[:, None].float() * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_case(lengths, hq, hkv, d, r, dv=None, pad=0, interleaved=False, dtype=torch.float32,
              device="cpu", seed=0) -> dict:
    """Inputs of ``graphopt::varlen_attention`` for documents of ``lengths`` tokens (0: empty),
    ``cu_seqlens`` padded with ``pad`` repeated T's: q (T, hq, d), k (T, hkv, d), v (T, hkv, dv)
    leaves requiring grad, fp32 cos/sin (T, r), ``scale``, ``interleaved`` and a ``grad_out``."""
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()] + [sum(lengths)] * pad, dtype=torch.int32)
    n_tokens, dv = sum(lengths), dv or d
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    cos, sin = rotary_tables(cu_seqlens, r, interleaved)
    return dict(
        q=randn(n_tokens, hq, d),
        k=randn(n_tokens, hkv, d),
        v=randn(n_tokens, hkv, dv),
        cos=cos.to(device),
        sin=sin.to(device),
        cu_seqlens=cu_seqlens.to(device),
        scale=d**-0.5,
        interleaved=interleaved,
        grad_out=torch.randn(n_tokens, hq, dv, generator=generator).to(device, dtype),
    )
