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
              device="cpu", seed=0, window=-1, softcap=0.0, sinks=False) -> dict:
    """Inputs of ``graphopt::varlen_attention`` for documents of ``lengths`` tokens (0: empty),
    ``cu_seqlens`` padded with ``pad`` repeated T's: q (T, hq, d), k (T, hkv, d), v (T, hkv, dv)
    leaves requiring grad, fp32 cos/sin (T, r), ``scale``, ``interleaved``, a ``grad_out``, and
    the options ``window``, ``softcap`` and ``sinks``: None, or with ``sinks=True`` an (hq,) leaf
    in ``dtype`` requiring grad, spread over [-3, 3] so that some sinks outweigh a row's keys."""
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()] + [sum(lengths)] * pad, dtype=torch.int32)
    n_tokens, dv = sum(lengths), dv or d
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    cos, sin = rotary_tables(cu_seqlens, r, interleaved)
    case = dict(
        q=randn(n_tokens, hq, d),
        k=randn(n_tokens, hkv, d),
        v=randn(n_tokens, hkv, dv),
        cos=cos.to(device),
        sin=sin.to(device),
        cu_seqlens=cu_seqlens.to(device),
        scale=d**-0.5,
        interleaved=interleaved,
        grad_out=torch.randn(n_tokens, hq, dv, generator=generator).to(device, dtype),
        window=window,
        softcap=softcap,
        sinks=None,
    )
    if sinks:
        case["sinks"] = torch.linspace(-3.0, 3.0, hq)[torch.randperm(hq, generator=generator)].to(device, dtype)
        case["sinks"].requires_grad_()
    return case


def options(case: dict) -> tuple:
    """``(window, softcap, sinks)`` of a case, the op's last three arguments."""
    return case["window"], case["softcap"], case["sinks"]


def leaves(case: dict) -> tuple:
    """The differentiable inputs of a case: q, k, v and its sinks if it has them."""
    return (case["q"], case["k"], case["v"]) + (() if case["sinks"] is None else (case["sinks"],))


# Sliding window, softcap and sinks (each case a make_case keyword set). Documents shorter than,
# as long as and longer than the window, lengths around the interpreter's 16-token tiles, one
# window of 1 (the diagonal only), empty documents; T <= 64 for the interpreter.
OPTION_CASES = {
    "window_crossing_tiles": dict(lengths=[5, 1, 17, 33, 8], hq=4, hkv=2, d=24, r=16, window=7),
    "window_equal_to_tile_and_documents": dict(lengths=[16, 16, 9, 20], hq=2, hkv=1, d=16, r=16, window=16),
    "window_one": dict(lengths=[6, 1, 21], hq=2, hkv=2, d=16, r=8, interleaved=True, window=1),
    "window_wider_than_documents": dict(lengths=[5, 1, 17, 9, 1, 30], hq=4, hkv=2, d=24, r=16, window=31),
    "softcap": dict(lengths=[5, 1, 17, 9, 1, 30], hq=4, hkv=2, d=24, r=16, softcap=1.5),
    "sinks": dict(lengths=[20, 3, 25], hq=4, hkv=1, d=16, r=16, interleaved=True, sinks=True),
    "window_softcap_sinks": dict(lengths=[3, 0, 7, 0, 20, 19], pad=3, hq=4, hkv=2, d=32, r=16, dv=16,
                                 window=9, softcap=2.0, sinks=True),
}

# For impl="torch" only (no interpreter): documents crossing its 128-row query blocks.
LONG_OPTION_CASES = {
    "long_window_softcap_sinks": dict(lengths=[300, 129, 7, 128, 1], hq=4, hkv=2, d=24, r=16, window=50,
                                      softcap=2.0, sinks=True),
    "long_softcap_no_window": dict(lengths=[260, 3, 131], hq=2, hkv=1, d=16, r=16, softcap=1.5),
    "long_window_equal_to_block": dict(lengths=[257, 128, 40], hq=2, hkv=2, d=16, r=16, window=128),
}
