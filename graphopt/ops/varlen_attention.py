"""Causal attention inside each document of a packed token stream, with RoPE applied inside the op.

``torch.ops.graphopt.varlen_attention(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale,
interleaved, impl, window=-1, softcap=0.0, sinks=None) -> out`` is what the packed-sequence
rewrite calls in place of HF's rotary + ``repeat_kv`` + SDPA with a materialized (T, T)
block-causal mask. ``window`` (Mistral, Gemma-2/3, gpt-oss sliding layers), ``softcap`` (Gemma-2)
and ``sinks`` (gpt-oss) are optional; their defaults are plain causal attention.

Shapes and dtypes (T packed tokens, Hq query heads, Hkv kv heads, D = qk head dim, Dv = value head
dim, R = rotary dim, N documents)::

    q           (T, Hq, D)    fp32 | bf16 | fp16 (| fp64 for impl="torch")
    k           (T, Hkv, D)   q's dtype; Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv)
    v           (T, Hkv, Dv)  q's dtype
    cos, sin    (T, R)        fp32 or q's dtype; per-token tables exactly as HF builds them: half
                              layout cos = cat(f, f), interleaved layout each angle repeated twice
                              adjacently. R even, R <= D. Never differentiated.
    cu_seqlens  (N+1,) int32  on q's device; 0 = cu[0] <= cu[1] <= ... <= cu[N] = T. Document j is
                              tokens [cu[j], cu[j+1]). Repeated entries (empty documents, e.g. a
                              static-length (T+1,) array padded with T) are allowed. Not
                              validated on the device (that would need a host sync).
    max_seqlen  int           upper bound on a document's length (may be loose, e.g. T); only the
                              flash_attn / torch_varlen impls read it.
    scale       float         softmax scale.
    window      int           -1 (unlimited) or >= 1: each query sees the last ``window`` keys of
                              its document, itself included (transformers' ``sliding_window``;
                              flash-attn's ``window_size=(window - 1, 0)``).
    softcap     float         >= 0; > 0 caps the scaled scores Gemma-2 style, 0 disables.
    sinks       (Hq,) | None  fp32 or q's dtype: one learned logit per query head (gpt-oss), in
                              every row's softmax denominator only. Differentiated.
    out         (T, Hq, Dv)   q's dtype.

Math, per token t of document j and query head h (g = h // (Hq // Hkv))::

    x_rot = x[..., :R] * cos + rot(x[..., :R]) * sin,   x[..., R:] unchanged (partial rotary)
        rot = rotate_half, cat(-x2, x1) of the two halves         (interleaved=False)
        rot = (x0, x1) -> (-x1, x0) for each adjacent pair         (interleaved=True)
    keys(t)   = { s : cu[j] <= s <= t  and  (window == -1  or  t - window < s) }
    z[t,h,s]  = scale * q_rot[t, h] . k_rot[s, g]
    z[t,h,s]  = softcap * tanh(z[t,h,s] / softcap)                        (only if softcap > 0)
    lse[h, t] = log( exp(sinks[h]) + sum_{s in keys(t)} exp(z[t,h,s]) )   (no exp(sinks[h]) term
                                                                            without sinks)
    p[t,h,s]  = exp(z[t,h,s] - lse[h, t]),   s in keys(t)
    out[t, h] = sum_{s in keys(t)} p[t,h,s] v[s, g]

keys(t) always holds t itself, so every row is finite. A sink takes probability
``p_sink[t, h] = exp(sinks[h] - lse[h, t])`` and carries no value row, so a row's weights sum
to ``1 - p_sink``. Nothing crosses documents. Gradients flow to the unrotated q, k, v (the
backward applies the transpose of the rotation to dq_rot and dk_rot) and to sinks::

    D[t, h]   = sum_e dout[t,h,e] * out[t,h,e]
    dz[t,h,s] = p[t,h,s] * (dout[t, h] . v[s, g] - D[t, h])    (times 1 - (z / softcap)^2, the
                                                               tanh derivative, with softcap)
    dsinks[h] = -sum_t p_sink[t, h] * D[t, h]

cos, sin and cu_seqlens get none.

Implementations (``impl``):
    ``"torch"``         CPU. Documents are bucketed by length into right-padded batches; each
                        bucket is one causal call of aten's CPU flash attention (GQA native), whose
                        backward op is used with the saved lse. No (T, T) work or memory; cost
                        follows sum(len_j^2). Reads cu_seqlens on the host once per call. A bucket
                        that needs softcap, sinks or a window shorter than its length runs the
                        blocked attention of this file instead: query blocks against only the key
                        range the causal window reaches, fp32 scores (fp64 for fp64), the
                        backward recomputing each block from the saved lse; cost follows
                        sum(len_j * min(len_j, window)). No head-dim limit.
    ``"triton"``        CUDA (CPU tensors under TRITON_INTERPRET=1, for tests). Flash attention
                        over token tiles, window (loop bounds), softcap and sinks in the kernels,
                        fp32/bf16/fp16, D and Dv <= 128; see ``triton_varlen_attention.py``. RoPE
                        either fused into the Q/K tile loads (dQ/dK un-rotated in registers) or
                        applied once before the kernels, whichever ``rotate_before_triton`` finds
                        cheaper (below).
    ``"flash_attn3"``   CUDA sm_90, needs flash-attn 3 (``flash_attn_interface``, built from
                        flash-attn's ``hopper/``): ``apply_rotary`` then its
                        ``flash_attn_varlen_func(causal=True, window_size=(window - 1, 0),
                        softcap=softcap)``; autograd through both.
    ``"flash_attn"``    CUDA, needs the ``flash-attn`` (2) package: the same call of its
                        ``flash_attn_varlen_func``.
    ``"torch_varlen"``  CUDA, needs ``torch.nn.attention.varlen.varlen_attn``: same RoPE handling,
                        ``window_size=(window - 1, 0)`` (versions that take ``window_size``),
                        ``enable_gqa``.
    ``"auto"``          ``"torch"`` off CUDA; on CUDA the policy below.

The libraries get every argument their signature has, checked at first use
(``inspect.signature``, as releases added ``window_size``, ``softcap``, ``deterministic``), and
``deterministic=True`` when ``torch.use_deterministic_algorithms`` is on (the Triton backward is
deterministic by construction: no atomics). They take one head dim: when D != Dv (DeepSeek's MLA,
D = 192, Dv = 128) the narrower side is zero-padded to max(D, Dv) and the output sliced, which is
exact (MLA: 1.2x the attention FLOPs of a native D != Dv kernel).

Dispatch on CUDA (``choose_cuda_impl``, a pure function of ``VarlenCall``: capability, dtype, D,
Dv, GQA, window, softcap, sinks, deterministic mode; and of ``VarlenLibraries``: which libraries
import and the parameters their varlen function takes; each reason to decline is in
``unsupported``). The first of these that takes the call runs:

    1. flash-attn 3   sm_90 only, bf16/fp16, head dims <= 256 (multiples of 8). Public figures:
                      about 600-750 TFLOP/s bf16 forward on an H100 (FA3 paper), 1.5-2x FA2.
    2. flash-attn 2   sm_80+, bf16/fp16, head dims <= 256, window since 2.3, softcap since 2.6:
                      about 350 TFLOP/s forward on an H100 (35% of its peak, FA3 paper), up to
                      230 on an A100 (FA2 paper).
    3. varlen_attn    torch's wrapper of the same FA2 kernels (no softcap; windows and GQA in the
                      versions with ``window_size`` / ``enable_gqa``): FA2's speed, after flash-
                      attn 2 because the package is the newer build and takes more options.
    4. Triton         everything else it takes: sinks (no library has them), fp32, GPUs below
                      sm_80, a deterministic backward where the library has no such flag.
                      Behind FA2: its backward runs 9 matmuls per tile pair to flash's 7
                      (issue 21 relates that to a measured 1.23x gap); not timed since.

None takes the call (for example fp32 or sinks with D = 192): a RuntimeError names each
implementation's reason. An explicit library impl that is installed but cannot take the call
resolves to ``"triton"`` if the kernel takes it. The choice is logged once per distinct call and
library set at DEBUG on ``graphopt.ops.varlen_attention`` (``TORCH_LOGS="+graphopt"``). It happens
in the op's ``CompositeImplicitAutograd`` body, so a trace records the chosen path; every path
returns the same (T, Hq, Dv) tensor in q's dtype, and off CUDA (fake, meta) ``"auto"`` is
``"torch"``, whose fake needs no library.

RoPE for the Triton kernel: once, or in the tiles (``rotate_before_triton``). In the tiles, each
program rotates every Q/K tile it loads and re-reads its cos/sin rows: a K row is rotated once per
query head and per query tile of its document that reaches it, and so on in the backward. Once
before the call, torch rotates q and k (a fused pointwise pass under compile), the kernels get
R = 0 tables (``HAS_ROTARY`` off: no rotary column groups), and autograd applies the rotation's
transpose to dq/dk. The model compares, per token, the bytes of that pass (forward and backward)
with the cos/sin re-reads and rotation FLOPs of the tiles, for documents of ``max_seqlen`` tokens
(a symbolic ``max_seqlen`` counts as unbounded: no guard, and re-rotating grows with length while
rotating once costs one pass). At T = 32768, Hq/Hkv = 16/4, D = R = 128, bf16 with fp32 tables,
the pass moves about 738 MB, forward and backward: an estimated 0.15 ms at an H200's 4.8 TB/s,
0.22 ms at an H100's 3.35 TB/s. Not timed on a GPU. Rounding: rotating once rounds the rotated q/k to q's dtype in torch's op order (HF's
exactly, with tables in q's dtype) and rounds dq/dk once more before their transpose; both ways
are tested against the fp64 reference at the same tolerances.

Ops:
    ``graphopt::varlen_attention``             the public op, ``CompositeImplicitAutograd``: picks
                                               the impl and decomposes into one of
    ``graphopt::varlen_attention_torch_fwd``   (out, lse), opaque custom op, with autograd through
    ``graphopt::varlen_attention_torch_bwd``   (dq, dk, dv, dsinks)
    ``graphopt::varlen_attention_triton_fwd``  (out, lse), ``triton_op``, with autograd through
    ``graphopt::varlen_attention_triton_bwd``  (dq, dk, dv, dsinks), ``triton_op``
The fwd/bwd split keeps the backward traceable by AOTAutograd, and Inductor sees through the
``triton_op`` s to their kernels. ``lse`` is (Hq, T), fp32 (fp64 for fp64 inputs), the sink term
included. ``dsinks`` is (Hq,) in sinks' dtype, or (0,) fp32 without sinks.

``varlen_attention_reference`` (explicit (T, T) mask, fp64) is the definition of correct.
"""

import bisect
import dataclasses
import functools
import importlib
import inspect
import itertools
import logging
import math
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import triton_op, wrap_triton

from graphopt.ops.triton_varlen_attention import (
    varlen_attention_bwd_dkdv_kernel,
    varlen_attention_bwd_dq_kernel,
    varlen_attention_bwd_preprocess_kernel,
    varlen_attention_fwd_kernel,
)

IMPLS = ("auto", "torch", "triton", "flash_attn3", "flash_attn", "torch_varlen")
TORCH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Rotary embedding (pure torch, HF's math)
# ---------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """rotate_half (``cat(-x2, x1)``) or the pairwise rotation ``(x0, x1) -> (-x1, x0)``."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x[..., :R] * cos + rot(x[..., :R]) * sin``, channels R.. passed through; HF's math.

    Args:
        x: (T, H, D).
        cos, sin: (T, R), R even, R <= D; broadcast over heads.
        interleaved: pairwise rotation instead of rotate_half.

    Returns:
        (T, H, D) in x's dtype. Computed in the promoted dtype of x and cos: with cos/sin in x's
        dtype this is op for op HF's ``apply_rotary_pos_emb``; with fp32 tables it rounds once.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x_rot = x[..., :rotary_dim]
    y = (x_rot * cos + _rotate(x_rot, interleaved) * sin).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return y
    return torch.cat((y, x[..., rotary_dim:]), dim=-1)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    interleaved: bool,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition of correct: rotary, then attention under an explicit (T, T) mask.

    Shapes and math as in the module docstring: the mask is same document, causal and (if
    ``window != -1``) ``t - window < s``; the scaled scores are soft-capped if ``softcap > 0``;
    ``sinks`` (Hq,) join the softmax as one extra column per row whose probability is dropped.
    Computed in fp64 (repeats K/V per query head and builds (Hq, T, T) scores: small shapes only);
    returns (T, Hq, Dv) in q's dtype, differentiable w.r.t. q, k, v and sinks.
    """
    work = torch.float64
    q_rot = apply_rotary(q.to(work), cos.to(work), sin.to(work), interleaved)
    k_rot = apply_rotary(k.to(work), cos.to(work), sin.to(work), interleaved)
    n_tokens, group = q.shape[0], q.shape[1] // k.shape[1]
    positions = torch.arange(n_tokens, device=q.device)
    doc = torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True)
    allowed = (doc[:, None] == doc[None, :]) & (positions[None, :] <= positions[:, None])
    if window != -1:
        allowed &= positions[:, None] - window < positions[None, :]
    k_rot = k_rot.repeat_interleave(group, dim=1)
    v_rep = v.to(work).repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q_rot, k_rot) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        sink_column = sinks.to(work)[:, None, None].expand(-1, n_tokens, 1)
        probs = torch.cat((scores, sink_column), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("hts,she->the", probs, v_rep).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Checks shared by every implementation (real and fake)
# ---------------------------------------------------------------------------------------------


def check_inputs(q, k, v, cos, sin, cu_seqlens) -> None:
    """Shape/dtype/device checks of the contract; no device data is read."""
    torch._check(q.dim() == 3, lambda: f"q must be (T, Hq, D), got shape {tuple(q.shape)}")
    torch._check(k.dim() == 3, lambda: f"k must be (T, Hkv, D), got shape {tuple(k.shape)}")
    torch._check(v.dim() == 3, lambda: f"v must be (T, Hkv, Dv), got shape {tuple(v.shape)}")
    n_tokens, n_heads, head_dim = q.shape
    torch._check(
        k.shape[0] == n_tokens and v.shape[0] == n_tokens,
        lambda: f"q, k, v disagree on T: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    torch._check(k.shape[2] == head_dim, lambda: f"k head dim {k.shape[2]} != q head dim {head_dim}")
    torch._check(k.shape[1] == v.shape[1], lambda: f"k has {k.shape[1]} heads, v has {v.shape[1]}")
    torch._check(
        k.shape[1] >= 1 and n_heads % k.shape[1] == 0,
        lambda: f"Hq={n_heads} must be a multiple of Hkv={k.shape[1]}",
    )
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(q.dtype in TORCH_DTYPES, lambda: f"q must be fp32/fp64/bf16/fp16, got {q.dtype}")
    torch._check(
        cos.dim() == 2 and cos.shape == sin.shape and cos.shape[0] == n_tokens,
        lambda: f"cos and sin must both be (T, R) with T={n_tokens}, got {tuple(cos.shape)}, {tuple(sin.shape)}",
    )
    rotary_dim = cos.shape[1]
    torch._check(
        rotary_dim % 2 == 0 and rotary_dim <= head_dim,
        lambda: f"rotary dim R={rotary_dim} must be even and <= D={head_dim}",
    )
    torch._check(
        cos.dtype == sin.dtype and cos.dtype in (torch.float32, q.dtype),
        lambda: f"cos/sin must be fp32 or q's dtype {q.dtype}, got {cos.dtype}, {sin.dtype}",
    )
    torch._check(
        cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1 and cu_seqlens.dtype == torch.int32,
        lambda: f"cu_seqlens must be a non-empty 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}",
    )
    torch._check(
        q.device == k.device == v.device == cos.device == sin.device == cu_seqlens.device,
        lambda: "q, k, v, cos, sin, cu_seqlens must be on one device",
    )


def check_options(q: torch.Tensor, window: int, softcap: float, sinks: torch.Tensor | None) -> None:
    """Checks of ``window``, ``softcap`` (ValueError) and ``sinks`` (shape, dtype, device)."""
    if window != -1 and window < 1:
        raise ValueError(f"graphopt::varlen_attention: window must be -1 (unlimited) or >= 1, got {window}")
    if not softcap >= 0.0:
        raise ValueError(f"graphopt::varlen_attention: softcap must be >= 0 (0 disables), got {softcap}")
    if sinks is None:
        return
    torch._check(
        sinks.dim() == 1 and sinks.shape[0] == q.shape[1],
        lambda: f"sinks must be (Hq,) = ({q.shape[1]},), got shape {tuple(sinks.shape)}",
    )
    torch._check(
        sinks.dtype in (torch.float32, q.dtype), lambda: f"sinks must be fp32 or q's dtype {q.dtype}, got {sinks.dtype}"
    )
    torch._check(sinks.device == q.device, lambda: f"sinks are on {sinks.device}, q on {q.device}")


def _is_plain(window: int, softcap: float, sinks: torch.Tensor | None) -> bool:
    """No window, no softcap, no sinks: plain causal attention."""
    return window == -1 and softcap == 0.0 and sinks is None


def _require_frozen_tables(cos: torch.Tensor, sin: torch.Tensor) -> None:
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError(
            "graphopt::varlen_attention does not differentiate the rotary tables: cos/sin require grad; "
            "build them under torch.no_grad() (as HF does) or .detach() them"
        )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_dsinks(q: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The backward's ``dsinks`` buffer: (Hq,) like sinks, or (0,) fp32 without sinks."""
    return q.new_empty((0,), dtype=torch.float32) if sinks is None else torch.empty_like(sinks)


def _fake_fwd(q, k, v, cos, sin, cu_seqlens, scale, interleaved, window=-1, softcap=0.0, sinks=None):
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    n_tokens, n_heads, _ = q.shape
    out = q.new_empty((n_tokens, n_heads, v.shape[2]))
    lse = q.new_empty((n_heads, n_tokens), dtype=_lse_dtype(q.dtype))
    return out, lse


def _fake_bwd(dout, q, k, v, cos, sin, cu_seqlens, out, lse, scale, interleaved, window=-1, softcap=0.0,
              sinks=None):
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _new_dsinks(q, sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, cu_seqlens, scale, interleaved, window, softcap, sinks = inputs
    _require_frozen_tables(cos, sin)
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, cu_seqlens, out, lse, sinks)
    ctx.options = (scale, interleaved, window, softcap)


def _autograd_through(bwd_op):
    """The ``register_autograd`` backward of a fwd op whose backward is the custom op ``bwd_op``."""

    def backward(ctx, dout, _dlse):
        q, k, v, cos, sin, cu_seqlens, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = bwd_op(dout, q, k, v, cos, sin, cu_seqlens, out, lse, *ctx.options, sinks)
        # cos, sin, cu_seqlens, scale, interleaved, window, softcap: no gradient
        return dq, dk, dv, None, None, None, None, None, None, None, None if sinks is None else dsinks

    return backward


# ---------------------------------------------------------------------------------------------
# impl="torch": length buckets + aten CPU flash attention
# ---------------------------------------------------------------------------------------------

# A document joins the bucket of a longer one (padded to its length L) while the padded score cells
# it adds, L^2 - len^2, stay within a quarter of L^2 or within 256 cells. The 256-cell slack puts
# every document of <= 16 tokens into one bucket: for those the per-call overhead dominates.
_BUCKET_WASTE = 0.25
_BUCKET_SLACK_CELLS = 256


def _bucket_floor(length: int) -> int:
    """Shortest document that may be padded to ``length`` in one bucket."""
    rest = length * length - max(int(length * length * _BUCKET_WASTE), _BUCKET_SLACK_CELLS)
    return 1 if rest <= 1 else math.isqrt(rest - 1) + 1  # ceil(sqrt(rest))


def _plan_buckets(cu_seqlens: torch.Tensor, n_tokens: int):
    """Group documents of similar length into right-padded batches.

    Returns ``(shapes, slot_token, token_slot, pad_slots)``: ``shapes`` lists (documents, padded
    length L) per bucket; the buckets' (documents, L) slots are laid end to end, P slots in all;
    ``slot_token`` (P,) int64 is the token in each slot (``n_tokens`` for padding), ``token_slot``
    (T,) int64 the slot of each token and ``pad_slots`` the padding slots. Empty documents get no
    slot. Reads the (CPU) document lengths on the host once.
    """
    bounds = cu_seqlens.to(torch.int64)
    lengths, order = torch.sort(bounds[1:] - bounds[:-1], stable=True)
    starts = bounds[:-1][order]
    host_lengths = lengths.tolist()
    first = bisect.bisect_right(host_lengths, 0)  # skip empty documents
    shapes, slots = [], []
    end = len(host_lengths)
    while end > first:
        padded = host_lengths[end - 1]
        begin = max(first, bisect.bisect_left(host_lengths, _bucket_floor(padded), first, end))
        positions = torch.arange(padded)
        slot = torch.where(positions < lengths[begin:end, None], starts[begin:end, None] + positions, n_tokens)
        slots.append(slot.flatten())
        shapes.append((end - begin, padded))
        end = begin
    slot_token = torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)
    token_slot = torch.empty(n_tokens, dtype=torch.int64)
    real = slot_token < n_tokens
    token_slot[slot_token[real]] = real.nonzero().squeeze(1)
    return shapes, slot_token, token_slot, (~real).nonzero().squeeze(1)


def _pair_views(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the first members of the rotary pairs of ``x[..., :2m]`` and of their partners."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, transpose: bool) -> None:
    """In place on x (N, H, C): ``apply_rotary`` (or, if ``transpose``, its transpose) of x[..., :R].

    cos, sin: (N, R). With pairs (A, B) and the full tables (no assumption that a pair shares an
    angle)::

        rotate:     x_A <- x_A cos_A - x_B sin_A     x_B <- x_B cos_B + x_A sin_B
        transpose:  x_A <- x_A cos_A + x_B sin_B     x_B <- x_B cos_B - x_A sin_A

    Computed in the promoted dtype of x and cos, rounded once to x's dtype, as ``apply_rotary``.
    """
    x_a, x_b = _pair_views(x[..., : cos.shape[-1]], interleaved)
    cos_a, cos_b = _pair_views(cos.unsqueeze(1), interleaved)
    sin_a, sin_b = _pair_views(sin.unsqueeze(1), interleaved)
    a_sin, b_sin = (sin_b, sin_a) if transpose else (sin_a, sin_b)
    sign = 1.0 if transpose else -1.0
    if x.dtype == torch.promote_types(x.dtype, cos.dtype):
        # Only x_a is needed after it is overwritten: one half-size temporary.
        old_a = x_a.clone()
        x_a.mul_(cos_a).addcmul_(x_b, a_sin, value=sign)
        x_b.mul_(cos_b).addcmul_(old_a, b_sin, value=-sign)
    else:
        old_a, old_b = x_a.to(cos.dtype), x_b.to(cos.dtype)
        x_a.copy_(old_a * cos_a + sign * old_b * a_sin)
        x_b.copy_(old_b * cos_b - sign * old_a * b_sin)


def _to_slots(x: torch.Tensor, token_slot: torch.Tensor, pad_slots: torch.Tensor, n_slots: int, width: int):
    """(T, H, C) -> (P, H, width): x scattered into its bucket slots, zero in padding and channels >= C."""
    slots = x.new_empty((n_slots, x.shape[1], width))
    slots[..., : x.shape[2]].index_copy_(0, token_slot, x)
    slots.index_fill_(0, pad_slots, 0)
    if width > x.shape[2]:
        slots[..., x.shape[2] :].zero_()
    return slots


def _rotated_slots(x, cos, sin, interleaved, slot_token, token_slot, pad_slots, width):
    """``_to_slots(apply_rotary(x, cos, sin, interleaved), ...)``, rotating in the slot buffer."""
    slots = _to_slots(x, token_slot, pad_slots, slot_token.shape[0], width)
    table_rows = slot_token.clamp(max=max(x.shape[0] - 1, 0))  # padding rows are zero: any angle works
    _rotate_(slots, cos[table_rows], sin[table_rows], interleaved, transpose=False)
    return slots


def _buckets(slots: torch.Tensor, shapes):
    """Yield each bucket of a (P, H, C) slot tensor as a (documents, H, L, C) view."""
    offset = 0
    for docs, length in shapes:
        yield slots[offset : offset + docs * length].view(docs, length, *slots.shape[1:]).transpose(1, 2)
        offset += docs * length


def _from_buckets(chunks, token_slot: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-bucket (documents, H, L, C) results -> (T, H, channels) in token order (maybe a view)."""
    flat = [c.transpose(1, 2).reshape(-1, c.shape[1], c.shape[3]) for c in chunks]
    return torch.cat(flat)[token_slot][..., :channels]


# Query rows per block of the blocked attention. One block's scores are (documents, Hq, rows,
# min(L, rows + window - 1)): a few MB at training shapes with a window; (documents, Hq, rows, L)
# without one.
_BLOCK_ROWS = 128


def _aten_is_exact(length: int, window: int, softcap: float, sinks: torch.Tensor | None) -> bool:
    """Whether aten's causal CPU flash attention is exact for a bucket of padded length ``length``:
    no softcap, no sinks, and no window shorter than the bucket's documents can be."""
    return softcap == 0.0 and sinks is None and (window == -1 or window >= length)


def _key_start(row_start: int, window: int) -> int:
    """The first key that query rows ``row_start`` and later can see."""
    return 0 if window == -1 else max(0, row_start - window + 1)


def _band(rows: int, row_start: int, key_start: int, key_stop: int, window: int, group: int) -> torch.Tensor:
    """(group * rows, keys) bool: whether query row ``row_start + i`` sees key ``key_start + j``
    (causal, within ``window``); repeated for the ``group`` query heads stacked along the rows."""
    t = torch.arange(row_start, row_start + rows)[:, None]
    s = torch.arange(key_start, key_stop)[None, :]
    visible = s <= t
    if window != -1:
        visible &= t - window < s
    return visible.repeat(group, 1)


def _grouped_rows(x: torch.Tensor, n_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(docs, Hq, m, C) -> (docs, Hkv, G * m, C) in ``dtype``: the G query heads of each kv head
    stacked along the rows, so one matmul against that head's keys serves the group (no K/V copy)."""
    docs, n_heads, rows, channels = x.shape
    return x.to(dtype).reshape(docs, n_kv_heads, n_heads // n_kv_heads * rows, channels)


def _block_scores(q_rows: torch.Tensor, k_keys: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``scale * q . k``, soft-capped if ``softcap > 0``: (docs, Hkv, G * m, n), no mask."""
    z = torch.matmul(q_rows, k_keys.transpose(-1, -2)).mul_(scale)
    if softcap > 0.0:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def _blocked_attention_fwd(q_b, k_b, v_b, scale, window, softcap, sinks):
    """One bucket's attention with any window / softcap / sinks: ``(out_b, lse_b)`` as aten's CPU
    flash attention returns them.

    q_b (docs, Hq, L, C) and k_b, v_b (docs, Hkv, L, C): right-padded documents, q/k rotated;
    sinks (Hq,) or None. Returns out_b (docs, Hq, L, C) in q's dtype and lse_b (docs, Hq, L) in
    the work dtype (fp32; fp64 for fp64), the sink term included. Query rows go ``_BLOCK_ROWS`` at
    a time against keys ``[_key_start(first row), last row]`` only, so work and memory follow
    ``L * min(L, window)``. A block holds every key its rows can see: one exact softmax, no online
    rescaling. Padded rows see real and padded keys (finite scores); their output is dropped.
    """
    docs, n_heads, length, channels = q_b.shape
    n_kv_heads = k_b.shape[1]
    group = n_heads // n_kv_heads
    work = _lse_dtype(q_b.dtype)
    out_b = q_b.new_empty(q_b.shape)
    lse_b = q_b.new_empty((docs, n_heads, length), dtype=work)
    for row_start in range(0, length, _BLOCK_ROWS):
        row_stop = min(row_start + _BLOCK_ROWS, length)
        rows, key_start = row_stop - row_start, _key_start(row_start, window)
        q_rows = _grouped_rows(q_b[:, :, row_start:row_stop], n_kv_heads, work)
        z = _block_scores(q_rows, k_b[:, :, key_start:row_stop].to(work), scale, softcap)
        z.masked_fill_(~_band(rows, row_start, key_start, row_stop, window, group), float("-inf"))
        row_max = z.amax(dim=-1)  # (docs, Hkv, G * m); finite: every row sees its own key
        if sinks is not None:
            sink = sinks.to(work).view(1, n_kv_heads, group, 1).expand(-1, -1, -1, rows).reshape(1, n_kv_heads, -1)
            row_max = torch.maximum(row_max, sink)
        p = z.sub_(row_max[..., None]).exp_()
        row_sum = p.sum(dim=-1)
        if sinks is not None:
            row_sum += torch.exp(sink - row_max)
        out_rows = torch.matmul(p, v_b[:, :, key_start:row_stop].to(work)).div_(row_sum[..., None])
        out_b[:, :, row_start:row_stop] = out_rows.view(docs, n_heads, rows, channels)
        lse_b[:, :, row_start:row_stop] = (row_max + row_sum.log()).view(docs, n_heads, rows)
    return out_b, lse_b


def _blocked_attention_bwd(dout_b, q_b, k_b, v_b, lse_b, delta_b, scale, window, softcap):
    """Backward of ``_blocked_attention_fwd`` for one bucket: ``(dq_b, dk_b, dv_b)`` in q's dtype,
    w.r.t. the rotated q/k.

    dout_b (docs, Hq, L, C); lse_b and delta_b (docs, Hq, L, 1) in the work dtype, delta =
    rowsum(dout * out). Each block recomputes its probabilities from the saved lse (whose sink
    term gives the sink its share implicitly). Padded rows have dout = delta = lse = 0: finite
    probabilities, zero dz, so they add nothing to dk/dv.
    """
    docs, n_heads, length, channels = q_b.shape
    n_kv_heads = k_b.shape[1]
    group = n_heads // n_kv_heads
    work = lse_b.dtype
    dq_b = q_b.new_empty(q_b.shape, dtype=work)
    dk_b = k_b.new_zeros(k_b.shape, dtype=work)
    dv_b = v_b.new_zeros(v_b.shape, dtype=work)
    for row_start in range(0, length, _BLOCK_ROWS):
        row_stop = min(row_start + _BLOCK_ROWS, length)
        rows, key_start = row_stop - row_start, _key_start(row_start, window)
        q_rows, dout_rows, lse_rows, delta_rows = (
            _grouped_rows(x[:, :, row_start:row_stop], n_kv_heads, work) for x in (q_b, dout_b, lse_b, delta_b)
        )
        k_keys, v_keys = (x[:, :, key_start:row_stop].to(work) for x in (k_b, v_b))
        z = _block_scores(q_rows, k_keys, scale, softcap)
        visible = _band(rows, row_start, key_start, row_stop, window, group)
        p = z.masked_fill(~visible, float("-inf")).sub_(lse_rows).exp_()
        dv_b[:, :, key_start:row_stop] += torch.matmul(p.transpose(-1, -2), dout_rows)
        dz = torch.matmul(dout_rows, v_keys.transpose(-1, -2)).sub_(delta_rows).mul_(p)
        if softcap > 0.0:
            dz.mul_(1.0 - (z / softcap).square_())  # d(softcap * tanh(x / softcap)) / dx
        dq_b[:, :, row_start:row_stop] = torch.matmul(dz, k_keys).mul_(scale).view(docs, n_heads, rows, channels)
        dk_b[:, :, key_start:row_stop] += torch.matmul(dz.transpose(-1, -2), q_rows).mul_(scale)
    return dq_b.to(q_b.dtype), dk_b.to(q_b.dtype), dv_b.to(q_b.dtype)


# Windowed attention without softcap or sinks runs aten's CPU flash attention on row blocks with
# a band mask (``_banded_attention_fwd``): its fused kernel is about twice as fast as the blocked
# matmuls above at training shapes (a 3350-token document, window 512, 4/2 heads of 64: 17 ms
# forward and 40 ms backward against 37 and 64). The dtypes whose aten gradients are fp32 or wider
# (the per-block dK/dV are summed over the blocks that see a key: a second rounding only in fp32).
_BANDED_DTYPES = (torch.float32, torch.float64)


def _banded_rows(window: int) -> int:
    """Query rows per block of the banded path: half the window, within [32, 256]. Each block
    computes rows * (rows + window - 1) scores, of which about rows * window are in the band."""
    return min(256, max(32, window // 2))


def _uses_banded(dtype: torch.dtype, window: int, softcap: float, sinks: torch.Tensor | None) -> bool:
    """Whether a bucket whose documents are longer than ``window`` takes the banded aten path."""
    return dtype in _BANDED_DTYPES and window != -1 and softcap == 0.0 and sinks is None


def _band_mask(rows: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, rows + window - 1) additive band: query ``i`` of a block sees keys ``j`` with
    ``i <= j <= i + window - 1`` of the block's keys ``[first row - window + 1, last row]``. A block
    whose first row is ``r < window - 1`` starts its keys at 0 and reads columns from
    ``window - 1 - r`` (``_block_keys``)."""
    i = torch.arange(rows)[:, None]
    j = torch.arange(rows + window - 1)[None, :]
    visible = (j >= i) & (j <= i + window - 1)
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _block_keys(row_start: int, row_stop: int, window: int, band: torch.Tensor):
    """``(key_start, mask)``: the keys ``[key_start, row_stop)`` that query rows ``[row_start,
    row_stop)`` can see and their band mask, a view of ``band``."""
    key_start = _key_start(row_start, window)
    first = window - 1 - (row_start - key_start)
    return key_start, band[: row_stop - row_start, first : first + row_stop - key_start]


def _banded_attention_fwd(q_b, k_b, v_b, scale, window):
    """One bucket's windowed attention (no softcap, no sinks): ``(out_b, lse_b)`` as aten's CPU
    flash attention returns them, from one call of its fused kernel per block of query rows
    against the keys the block can see (``_block_keys``). Each block holds every key its rows
    can see, so each row's softmax and lse are exact as computed."""
    length = q_b.shape[2]
    rows = _banded_rows(window)
    band = _band_mask(rows, window, q_b.dtype)
    out_b = q_b.new_empty(q_b.shape[:3] + v_b.shape[3:])
    lse_b = q_b.new_empty(q_b.shape[:3], dtype=_lse_dtype(q_b.dtype))
    for row_start in range(0, length, rows):
        row_stop = min(row_start + rows, length)
        key_start, mask = _block_keys(row_start, row_stop, window, band)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_b[:, :, row_start:row_stop], k_b[:, :, key_start:row_stop], v_b[:, :, key_start:row_stop],
            0.0, False, attn_mask=mask, scale=scale,
        )
        out_b[:, :, row_start:row_stop] = out
        lse_b[:, :, row_start:row_stop] = lse
    return out_b, lse_b


def _banded_attention_bwd(dout_b, q_b, k_b, v_b, out_b, lse_b, scale, window):
    """Backward of ``_banded_attention_fwd`` for one bucket, block by block with aten's CPU
    flash-attention backward: dQ of a block's rows is complete; dK/dV of a key are the sum over
    the blocks that see it (at most ``1 + ceil((window - 1) / rows)``), added in q's dtype
    (``_BANDED_DTYPES``: fp32 or fp64)."""
    length = q_b.shape[2]
    rows = _banded_rows(window)
    band = _band_mask(rows, window, q_b.dtype)
    dq_b = torch.empty_like(q_b)
    dk_b, dv_b = torch.zeros_like(k_b), torch.zeros_like(v_b)
    for row_start in range(0, length, rows):
        row_stop = min(row_start + rows, length)
        key_start, mask = _block_keys(row_start, row_stop, window, band)
        block = slice(row_start, row_stop)
        keys = slice(key_start, row_stop)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_b[:, :, block], q_b[:, :, block], k_b[:, :, keys], v_b[:, :, keys], out_b[:, :, block],
            lse_b[:, :, block], 0.0, False, attn_mask=mask, scale=scale,
        )
        dq_b[:, :, block] = dq
        dk_b[:, :, keys] += dk
        dv_b[:, :, keys] += dv
    return dq_b, dk_b, dv_b


def _sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``dsinks[h] = -sum_t exp(sinks[h] - lse[h, t]) * delta[h, t]`` in sinks' dtype.

    lse and delta (Hq, T) fp32 (fp64 for fp64), lse with the sink term (so the exponent is the
    sink's probability, at most 1).
    """
    p_sink = torch.exp(sinks.to(lse.dtype)[:, None] - lse)
    return -(p_sink * delta).sum(dim=1).to(sinks.dtype)


def _check_cpu(q: torch.Tensor) -> None:
    if q.device.type != "cpu":
        raise RuntimeError(
            f"graphopt::varlen_attention impl='torch' is the CPU path (got a {q.device.type} tensor); "
            "on CUDA use impl='triton', 'flash_attn' or 'torch_varlen'"
        )


@torch.library.custom_op("graphopt::varlen_attention_torch_fwd", mutates_args=())
def varlen_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    interleaved: bool,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the ``"torch"`` (CPU) implementation: ``(out, lse)``.

    Args as in the module docstring (q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv), cos/sin (T, R),
    cu_seqlens (N+1,) int32, window, softcap, sinks (Hq,) or None). Returns out (T, Hq, Dv) in
    q's dtype and lse (Hq, T), fp32 (fp64 for fp64 inputs), the sink term included.

    Right-padded buckets are exact under causal masking: a real query only sees keys at or
    before it, which are real. Padded query rows are dropped. When Dv != D the narrower of
    q/k and v is zero-padded to max(D, Dv) channels (aten's kernel wants one head dim). Each
    bucket is one call of aten's causal CPU flash attention where that is exact
    (``_aten_is_exact``: always with the default window/softcap/sinks); a window alone in fp32
    or fp64, aten's kernel on blocks of rows with a band mask (``_banded_attention_fwd``); else
    ``_blocked_attention_fwd``.
    """
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    _check_cpu(q)
    n_tokens, n_heads, head_dim = q.shape
    value_dim = v.shape[2]
    shapes, slot_token, token_slot, pad_slots = _plan_buckets(cu_seqlens, n_tokens)
    if not shapes:
        return q.new_empty((0, n_heads, value_dim)), q.new_empty((n_heads, 0), dtype=_lse_dtype(q.dtype))
    width = max(head_dim, value_dim)
    plan = (slot_token, token_slot, pad_slots, width)
    q_slots = _rotated_slots(q, cos, sin, interleaved, *plan)
    k_slots = _rotated_slots(k, cos, sin, interleaved, *plan)
    v_slots = _to_slots(v, token_slot, pad_slots, slot_token.shape[0], width)
    outs, lses = [], []
    for q_b, k_b, v_b in zip(*(_buckets(x, shapes) for x in (q_slots, k_slots, v_slots))):
        if _aten_is_exact(q_b.shape[2], window, softcap, sinks):
            out_b, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_b, k_b, v_b, 0.0, True, scale=scale
            )
        elif _uses_banded(q_b.dtype, window, softcap, sinks):
            out_b, lse_b = _banded_attention_fwd(q_b, k_b, v_b, scale, window)
        else:
            out_b, lse_b = _blocked_attention_fwd(q_b, k_b, v_b, scale, window, softcap, sinks)
        outs.append(out_b)
        lses.append(lse_b.unsqueeze(-1))  # (docs, H, L, 1)
    del q_slots, k_slots, v_slots
    out = _from_buckets(outs, token_slot, value_dim).contiguous()
    lse = _from_buckets(lses, token_slot, 1).squeeze(-1).t().contiguous()
    return out, lse


@torch.library.custom_op("graphopt::varlen_attention_torch_bwd", mutates_args=())
def varlen_attention_torch_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    interleaved: bool,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the ``"torch"`` implementation: ``(dq, dk, dv, dsinks)``, dq/dk w.r.t. the
    unrotated inputs.

    Args: dout (T, Hq, Dv); the forward's inputs; its out (T, Hq, Dv) and lse (Hq, T).
    Returns dq (T, Hq, D), dk (T, Hkv, D), dv (T, Hkv, Dv) in q's dtype, and dsinks (Hq,) in
    sinks' dtype ((0,) fp32 without sinks).

    Bucket by bucket, as the forward chose: aten's CPU flash-attention backward with the saved
    out and lse (whole, or per block with the band: ``_banded_attention_bwd``), or
    ``_blocked_attention_bwd``. Padded slots carry q = out = dout = 0 and lse = 0:
    their probabilities stay finite and their dS is exactly 0, so they add nothing to dK/dV.
    """
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    _check_cpu(q)
    n_tokens, _, head_dim = q.shape
    value_dim = v.shape[2]
    shapes, slot_token, token_slot, pad_slots = _plan_buckets(cu_seqlens, n_tokens)
    # delta = rowsum(dout * out), (T, Hq): for the blocked buckets and the sinks' gradient
    aten_only = _is_plain(window, softcap, sinks) or _uses_banded(q.dtype, window, softcap, sinks)
    delta = None if aten_only else (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    dsinks = _new_dsinks(q, sinks) if sinks is None else _sink_gradient(sinks, lse, delta.t())
    if not shapes:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks
    width = max(head_dim, value_dim)
    n_slots = slot_token.shape[0]
    plan = (slot_token, token_slot, pad_slots, width)
    slots = (
        _to_slots(dout, token_slot, pad_slots, n_slots, width),
        _rotated_slots(q, cos, sin, interleaved, *plan),
        _rotated_slots(k, cos, sin, interleaved, *plan),
        _to_slots(v, token_slot, pad_slots, n_slots, width),
        _to_slots(out, token_slot, pad_slots, n_slots, width),
        _to_slots(lse.t().unsqueeze(-1), token_slot, pad_slots, n_slots, 1),  # (P, Hq, 1)
    )
    if delta is None:
        delta_buckets = itertools.repeat(None)
    else:
        delta_buckets = _buckets(_to_slots(delta.unsqueeze(-1), token_slot, pad_slots, n_slots, 1), shapes)
    dqs, dks, dvs = [], [], []
    for dout_b, q_b, k_b, v_b, out_b, lse_b, delta_b in zip(*(_buckets(x, shapes) for x in slots), delta_buckets):
        if _aten_is_exact(q_b.shape[2], window, softcap, sinks):
            dq_b, dk_b, dv_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout_b, q_b, k_b, v_b, out_b, lse_b.squeeze(-1), 0.0, True, scale=scale
            )
        elif _uses_banded(q_b.dtype, window, softcap, sinks):
            dq_b, dk_b, dv_b = _banded_attention_bwd(dout_b, q_b, k_b, v_b, out_b, lse_b.squeeze(-1), scale, window)
        else:
            dq_b, dk_b, dv_b = _blocked_attention_bwd(dout_b, q_b, k_b, v_b, lse_b, delta_b, scale, window, softcap)
        dqs.append(dq_b)
        dks.append(dk_b)
        dvs.append(dv_b)
    del slots, delta_buckets
    dq = _from_buckets(dqs, token_slot, head_dim)
    dk = _from_buckets(dks, token_slot, head_dim)
    _rotate_(dq, cos, sin, interleaved, transpose=True)
    _rotate_(dk, cos, sin, interleaved, transpose=True)
    return dq.contiguous(), dk.contiguous(), _from_buckets(dvs, token_slot, value_dim).contiguous(), dsinks


varlen_attention_torch_fwd.register_fake(_fake_fwd)
varlen_attention_torch_bwd.register_fake(_fake_bwd)
varlen_attention_torch_fwd.register_autograd(
    _autograd_through(torch.ops.graphopt.varlen_attention_torch_bwd), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# impl="triton": launchers of the kernels in triton_varlen_attention.py
# ---------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(q: torch.Tensor, v: torch.Tensor) -> None:
    torch._check(q.dtype in TRITON_DTYPES, lambda: f"impl='triton' supports fp32/bf16/fp16, got {q.dtype}")
    torch._check(
        q.shape[2] <= TRITON_MAX_HEAD_DIM and v.shape[2] <= TRITON_MAX_HEAD_DIM,
        lambda: f"impl='triton' supports head dims up to {TRITON_MAX_HEAD_DIM}, got D={q.shape[2]}, Dv={v.shape[2]}; "
        "impl='auto' runs larger ones (bf16/fp16) on flash-attn 3 (sm_90), flash-attn 2 or torch's varlen_attn, "
        "impl='torch' (CPU) has no limit",
    )
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "graphopt::varlen_attention impl='triton' runs on CPU tensors only under TRITON_INTERPRET=1 "
            "(tests); use impl='torch' on the CPU"
        )


def _shapes_only(q: torch.Tensor) -> bool:
    """Whether a launcher must stop after allocating its outputs (fake tensors, interpreter only).

    Under ``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the raw interpreted kernel, which
    cannot run on fake tensors. Shape propagation (Dynamo, opcheck's fake-tensor test) then only
    needs the outputs' metadata; tracing for compilation (functional tensors) raises instead of
    silently dropping the kernels. On GPUs ``wrap_triton`` traces the launches and this is False.
    """
    if not _interpreting():
        return False
    if isinstance(q, FunctionalTensor):
        raise RuntimeError(
            "graphopt::varlen_attention impl='triton' cannot be compiled under TRITON_INTERPRET=1 "
            "(wrap_triton cannot trace interpreted kernels); compile it on CUDA, or use impl='torch'"
        )
    return is_fake(q)


def _token_bounds(cu_seqlens: torch.Tensor, n_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_start, seq_end)``, each (T,) int32: the [start, end) of every token's document.

    ``searchsorted(right=True)`` finds the first entry > t, which skips empty documents and the
    padded tail of repeated T. Runs on the device: no host sync, no grid over documents.
    """
    tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    end_index = torch.searchsorted(cu_seqlens, tokens, right=True)
    # index_select rather than indexing: no device guard when traced with fake tensors
    return cu_seqlens.index_select(0, end_index - 1), cu_seqlens.index_select(0, end_index)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _triton_meta(q: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, interleaved: bool) -> dict:
    """Constexpr arguments shared by the kernels (block sizes over channels, flags)."""
    head_dim, rotary_dim = q.shape[2], cos.shape[1]
    return dict(
        INTERLEAVED=interleaved,
        HAS_ROTARY=rotary_dim > 0,
        HAS_PASS=rotary_dim < head_dim,
        IEEE_FP32=q.dtype == torch.float32,
        UPCAST=q.device.type == "cpu" and q.dtype != torch.float32,
        # tl.dot needs every dimension >= 16 on GPUs.
        BLOCK_HALF=max(16, triton.next_power_of_2(max(rotary_dim // 2, 1))),
        BLOCK_PASS=max(16, triton.next_power_of_2(max(head_dim - rotary_dim, 1))),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[2])),
    )


def _triton_options(window: int, softcap: float) -> tuple[tuple, dict]:
    """``(window, softcap_log2)`` scalar arguments and the ``HAS_WINDOW`` / ``HAS_SOFTCAP`` flags."""
    return (window, softcap * LOG2E), dict(HAS_WINDOW=window != -1, HAS_SOFTCAP=softcap > 0.0)


# GPU launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, per input
# precision and per tile width: "narrow" when no channel block (Q/K's rotary pairs and pass-through
# together, V's) is wider than 64, as for D <= 64 with R = D or R = D / 2; "wide" otherwise (D = 80,
# 96, 128; R = 0 at any D). Each fits the shared memory a block can opt in to on sm_80 (163 KB) and
# sm_90 (227 KB) and compiles without register spills for both, except on sm_80 in fp32 (dK/dV with
# R = 0: 8-12 B; dQ at D = 64, R = 32 interleaved, with window and softcap: 8 B) and, for q/k rotated
# before the kernels (R = 0) at D = 64 with Dv = 32 and window + softcap, on sm_90 in fp32 (4-36 B).
# ``tests/ops/test_kernel_resources.py`` compiles every one ahead of time and prints the table
# (docs/benchmarks.md). fp32's IEEE dots run on FMA units with their operands in
# registers, so fp32 tiles are smaller. Chosen to fit, not timed: provisional until measured on a GPU.
_GPU_CONFIGS = {
    ("fwd", "16-bit", "narrow"): (64, 64, 4, 3),
    ("fwd", "16-bit", "wide"): (64, 32, 8, 3),  # 64x64: spills at D = 128 (4 warps) or Dv = 64 (8, sm_80)
    ("dkdv", "16-bit", "narrow"): (16, 64, 8, 3),
    ("dkdv", "16-bit", "wide"): (32, 32, 8, 2),
    ("dq", "16-bit", "narrow"): (64, 32, 4, 3),
    ("dq", "16-bit", "wide"): (32, 32, 8, 3),
    ("fwd", "fp32", "narrow"): (64, 32, 8, 2),
    ("fwd", "fp32", "wide"): (32, 32, 8, 2),  # 64x64, 3 stages: 256 KB of shared memory at D = 128
    ("dkdv", "fp32", "narrow"): (32, 32, 8, 2),
    ("dkdv", "fp32", "wide"): (16, 16, 8, 2),
    ("dq", "fp32", "narrow"): (64, 16, 8, 2),
    ("dq", "fp32", "wide"): (16, 16, 4, 2),
}


def _gpu_config(dtype: torch.dtype, meta: dict, kernel: str) -> tuple[int, int, int, int]:
    """``_GPU_CONFIGS``' (BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("fwd", "dkdv",
    "dq") for ``dtype`` and the channel blocks in ``meta`` (``_triton_meta``'s)."""
    qk_width = (2 * meta["BLOCK_HALF"] if meta["HAS_ROTARY"] else 0) + (meta["BLOCK_PASS"] if meta["HAS_PASS"] else 0)
    width = "narrow" if max(qk_width, meta["BLOCK_DV"]) <= 64 else "wide"
    precision = "fp32" if dtype == torch.float32 else "16-bit"
    return _GPU_CONFIGS[(kernel, precision, width)]


_TILE_TOKENS_AT_LEAST = 16  # tokens of a query tile when it holds several heads: an MMA's rows
# Heads are packed in tiles of at least 64 rows only: at 32 rows the per-row head pointers spill
# (bf16 dQ at D >= 80 on sm_80: 4 B; fp32 forward at D = 128, R = 0 on sm_90: 428 B; compiled ahead
# of time by tests/ops/test_kernel_resources.py), at 64 rows nothing does.
_PACKED_TILE_ROWS_AT_LEAST = 64


def _heads_per_tile(group_size: int, block_m: int) -> int:
    """Query heads of one kv group that a forward or dQ program takes together (``HEADS``): in a
    tile of at least ``_PACKED_TILE_ROWS_AT_LEAST`` rows, the largest power of two dividing
    ``group_size`` that leaves ``block_m // heads`` tokens at least ``_TILE_TOKENS_AT_LEAST``;
    else 1. Each key tile is then loaded and rotated once per ``heads`` heads."""
    heads = 1
    if block_m < _PACKED_TILE_ROWS_AT_LEAST:
        return heads
    while group_size % (2 * heads) == 0 and block_m // (2 * heads) >= _TILE_TOKENS_AT_LEAST:
        heads *= 2
    return heads


def _triton_config(q: torch.Tensor, meta: dict, kernel: str, group_size: int = 1) -> dict:
    """``BLOCK_M``, ``BLOCK_N``, ``num_warps`` and ``num_stages`` of ``kernel`` for ``q``: the GPU
    configuration, or 16x16 under the interpreter, so that small test shapes cross tiles and
    documents. The query-tile kernels ("fwd", "dq") also get ``HEADS`` (``_heads_per_tile`` of
    the kv group's ``group_size`` query heads); under the interpreter two heads of a group
    share a 32-row tile of 16 tokens, so that tests cover head-packed tiles."""
    query_tiles = kernel in ("fwd", "dq")
    if q.device.type == "cpu":
        heads = 2 if query_tiles and group_size % 2 == 0 else 1
        return dict(BLOCK_M=16 * heads, BLOCK_N=16) | (dict(HEADS=heads) if query_tiles else {})
    block_m, block_n, num_warps, num_stages = _gpu_config(q.dtype, meta, kernel)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return config | (dict(HEADS=_heads_per_tile(group_size, block_m)) if query_tiles else {})


def _query_grid(n_tokens: int, n_heads: int, config: dict) -> tuple[int, int]:
    """The forward's and the dQ kernel's grid: (token tiles, groups of ``HEADS`` query heads)."""
    return triton.cdiv(n_tokens, config["BLOCK_M"] // config["HEADS"]), n_heads // config["HEADS"]


@triton_op("graphopt::varlen_attention_triton_fwd", mutates_args=())
def varlen_attention_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    interleaved: bool,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the ``"triton"`` implementation: ``(out, lse)``.

    Args:
        q: (T, Hq, D) fp32/bf16/fp16, D <= 128.
        k: (T, Hkv, D), Hq % Hkv == 0.
        v: (T, Hkv, Dv), Dv <= 128.
        cos, sin: (T, R) fp32 or q's dtype, HF per-token tables (both channels of a rotary pair
            share an angle; the kernel reads it at the pair's first channel), R even, R <= D.
        cu_seqlens: (N+1,) int32 document boundaries (may end in repeated T).
        scale: softmax scale.
        interleaved: pairwise rotary layout instead of rotate_half.
        window: -1, or the number of keys (the diagonal included) each query sees.
        softcap: > 0 caps the scaled scores, ``softcap * tanh(z / softcap)``; 0 disables.
        sinks: None, or (Hq,) fp32 / q's dtype logits joining each row's softmax denominator.

    Returns:
        out: (T, Hq, Dv) in q's dtype.
        lse: (Hq, T) fp32, logsumexp of the (capped) scaled scores over each row's visible keys
            and its head's sink.

    Grid: (cdiv(T, BLOCK_M / HEADS), Hq / HEADS): ``HEADS`` query heads of a kv group per tile
    (``_heads_per_tile``). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    _check_triton(q, v)
    q, k, v, cos, sin = (_unit_last_stride(x) for x in (q, k, v, cos, sin))
    n_tokens, n_heads, head_dim = q.shape
    value_dim = v.shape[2]
    out = q.new_empty((n_tokens, n_heads, value_dim))
    lse = torch.empty((n_heads, n_tokens), dtype=torch.float32, device=q.device)
    seq_start, _ = _token_bounds(cu_seqlens, n_tokens)
    if _shapes_only(q):
        return out, lse
    meta = _triton_meta(q, v, cos, interleaved)
    config = _triton_config(q, meta, "fwd", n_heads // k.shape[1])
    options, flags = _triton_options(window, softcap)
    wrap_triton(varlen_attention_fwd_kernel)[_query_grid(n_tokens, n_heads, config)](
        q, k, v, cos, sin, seq_start, q if sinks is None else sinks, out, lse,  # q: an unread stand-in
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        n_tokens, head_dim, cos.shape[1], value_dim, n_heads // k.shape[1], scale * LOG2E, *options,
        HAS_SINKS=sinks is not None, **flags, **meta, **config,
    )
    return out, lse


@triton_op("graphopt::varlen_attention_triton_bwd", mutates_args=())
def varlen_attention_triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    interleaved: bool,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the ``"triton"`` implementation: ``(dq, dk, dv, dsinks)``, dq/dk w.r.t. the
    unrotated q, k.

    Args:
        dout: (T, Hq, Dv), gradient of ``out``.
        q, k, v, cos, sin, cu_seqlens, scale, interleaved, window, softcap, sinks: as for the
            forward.
        out: (T, Hq, Dv) and lse: (Hq, T) fp32, the forward's outputs.

    Returns:
        dq (T, Hq, D), dk (T, Hkv, D), dv (T, Hkv, Dv), in q's dtype; dsinks (Hq,) in sinks'
        dtype, or (0,) fp32 without sinks.

    Three launches: delta = rowsum(dO * O) (Hq, T) fp32, grid (cdiv(T, BLOCK_M), Hq); dK/dV, grid
    (cdiv(T, BLOCK_N), Hkv); dQ, grid (cdiv(T, BLOCK_M), Hq). The kernels take the sinks only
    through lse; dsinks = -sum_t exp(sink - lse) * delta is a torch reduction over (Hq, T).
    """
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    check_options(q, window, softcap, sinks)
    _check_triton(q, v)
    q, k, v, cos, sin, dout, out = (_unit_last_stride(x) for x in (q, k, v, cos, sin, dout, out))
    lse = lse.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, value_dim = k.shape[1], v.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((n_heads, n_tokens), dtype=torch.float32, device=q.device)
    seq_start, seq_end = _token_bounds(cu_seqlens, n_tokens)
    if _shapes_only(q):
        return dq, dk, dv, _new_dsinks(q, sinks)
    meta = _triton_meta(q, v, cos, interleaved)
    block_m = _triton_config(q, meta, "fwd")["BLOCK_M"]
    wrap_triton(varlen_attention_bwd_preprocess_kernel)[(triton.cdiv(n_tokens, block_m), n_heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), n_tokens, value_dim,
        BLOCK_M=block_m, BLOCK_DV=meta["BLOCK_DV"],
    )
    options, flags = _triton_options(window, softcap)
    sizes = (n_tokens, head_dim, cos.shape[1], value_dim, n_heads // n_kv_heads, scale, scale * LOG2E, *options)
    config = _triton_config(q, meta, "dkdv")
    wrap_triton(varlen_attention_bwd_dkdv_kernel)[(triton.cdiv(n_tokens, config["BLOCK_N"]), n_kv_heads)](
        q, k, v, cos, sin, seq_start, seq_end, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        *sizes, **flags, **meta, **config,
    )
    config = _triton_config(q, meta, "dq", n_heads // n_kv_heads)
    wrap_triton(varlen_attention_bwd_dq_kernel)[_query_grid(n_tokens, n_heads, config)](
        q, k, v, cos, sin, seq_start, dout, lse, delta, dq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        *sizes, **flags, **meta, **config,
    )
    return dq, dk, dv, _new_dsinks(q, sinks) if sinks is None else _sink_gradient(sinks, lse, delta)


varlen_attention_triton_fwd.register_autograd(
    _autograd_through(torch.ops.graphopt.varlen_attention_triton_bwd), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# impl="flash_attn3" / "flash_attn" / "torch_varlen": RoPE in torch, then a library varlen kernel
# ---------------------------------------------------------------------------------------------


def _signature_params(module: str, function: str) -> frozenset[str] | None:
    """The parameter names of ``module.function``, or None when the module does not import (or a
    broken build fails to load its extension)."""
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, OSError):
        return None
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no Python signature: call it with the arguments all versions take
        return frozenset()


@functools.cache
def _flash_attn3_params() -> frozenset[str] | None:
    """FA3's ``flash_attn_interface.flash_attn_varlen_func`` parameters (built from flash-attn's
    ``hopper/``; ``window_size``, ``softcap`` and ``deterministic`` came in over its releases)."""
    return _signature_params("flash_attn_interface", "flash_attn_varlen_func")


@functools.cache
def _flash_attn_params() -> frozenset[str] | None:
    """flash-attn 2's ``flash_attn_varlen_func`` parameters (``window_size`` since 2.3, ``softcap``
    since 2.6)."""
    return _signature_params("flash_attn", "flash_attn_varlen_func")


@functools.cache
def _varlen_attn_params() -> frozenset[str] | None:
    """torch's ``varlen_attn`` parameters (``is_causal`` up to 2.10, then ``window_size``; ``scale``,
    ``enable_gqa``)."""
    return _signature_params("torch.nn.attention.varlen", "varlen_attn")


def _has_torch_varlen() -> bool:
    return _varlen_attn_params() is not None


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None elsewhere or when no GPU is visible (fake CUDA tensors)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _library_window(window: int) -> tuple[int, int]:
    """flash-attn's ``window_size=(left, right)`` for causal attention over ``window`` keys."""
    return (-1, 0) if window == -1 else (window - 1, 0)


def _pad_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (T, H, C) zero-padded to ``width`` channels (C <= width)."""
    return x if x.shape[2] == width else torch.nn.functional.pad(x, (0, width - x.shape[2]))


def _narrowed(out: torch.Tensor, value_dim: int) -> torch.Tensor:
    """The first ``value_dim`` channels of a library's output, contiguous (callers ``view`` it)."""
    return out if out.shape[2] == value_dim else out[..., :value_dim].contiguous()


def _library_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale, interleaved, impl, window, softcap):
    """RoPE once in torch, then the library's causal varlen attention; autograd through both.

    The libraries want one head dim: when D != Dv the narrower of q/k and v is zero-padded to
    max(D, Dv) and the output sliced back, which is exact (zero channels add exact zeros to the
    scores, and padded value channels only make output channels that are dropped).
    """
    check_inputs(q, k, v, cos, sin, cu_seqlens)
    _require_frozen_tables(cos, sin)
    # Per-token tables: positions restart per document because the caller built them that way,
    # so no per-sequence rotary (flash-attn's own assumes positions restart at each cu_seqlens).
    q_rot = apply_rotary(q, cos, sin, interleaved)
    k_rot = apply_rotary(k, cos, sin, interleaved)
    value_dim = v.shape[2]
    width = max(q.shape[2], value_dim)
    q_rot, k_rot, v = (_pad_channels(x, width) for x in (q_rot, k_rot, v))
    deterministic = torch.are_deterministic_algorithms_enabled()
    if impl in ("flash_attn3", "flash_attn"):
        if impl == "flash_attn3":
            from flash_attn_interface import flash_attn_varlen_func

            options = {}
        else:
            from flash_attn import flash_attn_varlen_func

            options = {"dropout_p": 0.0}
        # only what is set, so that older releases get the call they take
        if window != -1:
            options["window_size"] = _library_window(window)
        if softcap > 0.0:
            options["softcap"] = softcap
        if deterministic:
            options["deterministic"] = True
        out = flash_attn_varlen_func(
            q_rot, k_rot, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True,
            **options,
        )
        out = out[0] if isinstance(out, tuple) else out  # FA3's first releases returned (out, lse)
        return _narrowed(out, value_dim)
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_attn_params()
    # torch <= 2.10 takes is_causal (the policy sends windows elsewhere there); later versions
    # take window_size=(-1, 0) for causal.
    kwargs = {"window_size": _library_window(window)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # its fixed scale is 1/sqrt(its head dim): fold ours into q
        q_rot = q_rot * (scale * math.sqrt(width))
    out = varlen_attn(q_rot, k_rot, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return _narrowed(out, value_dim)


# ---------------------------------------------------------------------------------------------
# Which implementation runs a call: one pure policy over the call and the libraries present
# ---------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

LIBRARY_IMPLS = ("flash_attn3", "flash_attn", "torch_varlen")
CUDA_PREFERENCE = ("flash_attn3", "flash_attn", "torch_varlen", "triton")  # the module docstring says why
LIBRARY_DTYPES = (torch.bfloat16, torch.float16)
LIBRARY_MAX_HEAD_DIM = 256
LIBRARY_NAMES = {
    "flash_attn3": "flash-attn 3 (flash_attn_interface)",
    "flash_attn": "flash-attn 2 (flash_attn)",
    "torch_varlen": "torch's varlen_attn",
    "triton": "graphopt's Triton kernel",
}


@dataclasses.dataclass(frozen=True)
class VarlenLibraries:
    """The varlen attention libraries this process can call: each one's parameter names, None when
    it does not import."""

    flash_attn3: frozenset[str] | None = None
    flash_attn: frozenset[str] | None = None
    torch_varlen: frozenset[str] | None = None

    @classmethod
    def detect(cls) -> "VarlenLibraries":
        return cls(_flash_attn3_params(), _flash_attn_params(), _varlen_attn_params())


@dataclasses.dataclass(frozen=True)
class VarlenCall:
    """Everything about one call that the choice of implementation reads."""

    device_type: str
    capability: tuple[int, int] | None  # CUDA (major, minor); None off CUDA
    dtype: torch.dtype
    head_dim: int  # D of q/k
    value_dim: int  # Dv of v
    gqa: bool  # Hq != Hkv
    window: bool
    softcap: bool
    sinks: bool
    deterministic: bool  # torch.are_deterministic_algorithms_enabled()

    @classmethod
    def of(cls, q, k, v, window: int, softcap: float, sinks) -> "VarlenCall":
        return cls(
            q.device.type, _device_capability(q.device), q.dtype, int(q.shape[2]), int(v.shape[2]),
            q.shape[1] != k.shape[1], window != -1, softcap > 0.0, sinks is not None,
            torch.are_deterministic_algorithms_enabled(),
        )


def unsupported(impl: str, call: VarlenCall, libraries: VarlenLibraries) -> str | None:
    """Why ``impl`` ("triton" or a library impl) cannot compute ``call`` on CUDA; None if it can."""
    width = max(call.head_dim, call.value_dim)
    if impl == "triton":
        if call.dtype not in TRITON_DTYPES:
            return f"takes fp32/bf16/fp16, not {call.dtype}"
        if width > TRITON_MAX_HEAD_DIM:
            return f"takes head dims up to {TRITON_MAX_HEAD_DIM}"
        return None
    params = getattr(libraries, impl)
    if params is None:
        return "does not import"
    if impl != "torch_varlen" and params and not {"softmax_scale", "causal"} <= params:
        return "has a signature without softmax_scale/causal"
    if call.sinks:
        return "takes no sinks"
    if call.capability is None:
        return "needs a CUDA GPU"
    if impl == "flash_attn3" and call.capability[0] != 9:
        return f"runs on sm_90 only, not sm_{call.capability[0]}{call.capability[1]}"
    if call.capability < (8, 0):
        return f"needs sm_80 or newer, not sm_{call.capability[0]}{call.capability[1]}"
    if call.dtype not in LIBRARY_DTYPES:
        return f"takes bf16/fp16, not {call.dtype}"
    if width > LIBRARY_MAX_HEAD_DIM:
        return f"takes head dims up to {LIBRARY_MAX_HEAD_DIM}"
    if impl != "flash_attn" and width % 8:  # flash-attn 2's Python wrapper pads to a multiple of 8 itself
        return "takes head dims that are multiples of 8"
    if call.softcap and (impl == "torch_varlen" or "softcap" not in params):
        return "takes no softcap"
    if call.window and "window_size" not in params:
        return "takes no window_size"
    if call.gqa and impl == "torch_varlen" and "enable_gqa" not in params:
        return "takes no enable_gqa"
    if call.deterministic and "deterministic" not in params:
        return "has no deterministic backward"
    return None


def choose_cuda_impl(call: VarlenCall, libraries: VarlenLibraries) -> str:
    """The first implementation of ``CUDA_PREFERENCE`` that computes ``call``; raises (naming why
    each one declines) when none does."""
    reasons = {}
    for impl in CUDA_PREFERENCE:
        reasons[impl] = unsupported(impl, call, libraries)
        if reasons[impl] is None:
            return impl
    raise RuntimeError(f"graphopt::varlen_attention: no CUDA implementation takes {_describe(call)}: " + _reasons(reasons))


def _describe(call: VarlenCall) -> str:
    flags = [name for name in ("window", "softcap", "sinks", "gqa", "deterministic") if getattr(call, name)]
    return f"{call.dtype}, D={call.head_dim}, Dv={call.value_dim}" + "".join(f", {flag}" for flag in flags)


def _reasons(reasons: dict) -> str:
    return "; ".join(f"{LIBRARY_NAMES[impl]} {reason}" for impl, reason in reasons.items())


def _unavailable(impl: str, call: VarlenCall, libraries: VarlenLibraries) -> None:
    """Raise the error of an explicit library impl that does not import or cannot run on this device."""
    install = {"flash_attn3": "build flash-attn's hopper/ package (sm_90)",
               "flash_attn": "pip install flash-attn, CUDA only",
               "torch_varlen": f"not in torch {torch.__version__}; upgrade torch"}[impl]
    if getattr(libraries, impl) is None:
        raise RuntimeError(
            f"graphopt::varlen_attention impl={impl!r} needs {LIBRARY_NAMES[impl]} ({install}); "
            "or use impl='auto' / 'triton' (CUDA) / 'torch' (CPU)"
        )
    if call.device_type != "cuda":
        raise RuntimeError(f"graphopt::varlen_attention impl={impl!r} runs on CUDA only; use impl='torch' on the CPU")


_logged_choices: set = set()


def _log_choice(impl: str, call: VarlenCall, libraries: VarlenLibraries, chosen: str) -> None:
    """DEBUG, once per distinct (requested impl, call, libraries): what runs and why not the others."""
    key = (impl, call, libraries)
    if key in _logged_choices:
        return
    _logged_choices.add(key)
    if impl == "auto":
        passed_over = CUDA_PREFERENCE[: CUDA_PREFERENCE.index(chosen)]
    else:
        passed_over = () if impl == chosen else (impl,)
    why = {other: unsupported(other, call, libraries) for other in passed_over}
    log.debug(
        "varlen_attention impl=%r on %s (sm_%s) -> %r%s", impl, _describe(call),
        "".join(map(str, call.capability or ("?",))), chosen, f" ({_reasons(why)})" if why else "",
    )


def resolve_impl(impl: str, call: VarlenCall, libraries: VarlenLibraries | None = None) -> str:
    """The concrete implementation ``impl`` means for ``call``; raises if none can run it.

    ``"auto"`` is ``"torch"`` off CUDA and ``choose_cuda_impl`` on CUDA. An explicit library impl
    that is not installed, or asked off CUDA, raises; one that cannot compute the call (sinks, a
    softcap ``varlen_attn`` lacks, fp32, ...) resolves to ``"triton"`` where the kernel takes it and
    raises otherwise. An explicit ``"triton"`` on CUDA beyond the kernel (fp64, head dims over 128)
    raises, naming what would take it. ``libraries`` defaults to ``VarlenLibraries.detect()``, read
    only for CUDA calls and library impls.
    """
    if impl not in IMPLS:
        raise ValueError(f"graphopt::varlen_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "triton" and call.device_type != "cuda"):
        return impl
    if impl == "auto" and call.device_type != "cuda":
        return "torch"
    libraries = VarlenLibraries.detect() if libraries is None else libraries
    if impl in LIBRARY_IMPLS:
        _unavailable(impl, call, libraries)
    if impl == "auto":
        chosen = choose_cuda_impl(call, libraries)
    elif unsupported(impl, call, libraries) is None:
        chosen = impl
    elif unsupported("triton", call, libraries) is None:
        chosen = "triton"  # an explicit library impl asked for what only the kernel takes
    else:
        others = {other: unsupported(other, call, libraries) for other in dict.fromkeys((impl, *CUDA_PREFERENCE))}
        raise RuntimeError(
            f"graphopt::varlen_attention impl={impl!r} cannot take {_describe(call)}: {_reasons(others)}"
            + _advice(others)
        )
    _log_choice(impl, call, libraries, chosen)
    return chosen


def _advice(reasons: dict) -> str:
    takers = [impl for impl, reason in reasons.items() if reason is None]
    if takers:
        return f"; impl={takers[0]!r} (or 'auto') takes it"
    return "; cast q/k/v to bf16/fp16 for the libraries, or run impl='torch' on the CPU"


# ---------------------------------------------------------------------------------------------
# impl="triton": RoPE in the tiles, or once before the kernels
# ---------------------------------------------------------------------------------------------

# Cost constants of rotate_before_triton (GPU figures, public or stated assumptions):
ROTATION_FLOPS_PER_HBM_BYTE = 20.0  # fp32 FMA-unit FLOP/s over HBM B/s: H100 SXM 67 TFLOP/s / 3.35 TB/s
TABLE_REREAD_DISCOUNT = 2.0  # a cos/sin byte re-read by a tile (an L2 hit, mostly) costs 1/2 an HBM byte


def _tile_visits(document_length: float, block: int) -> float:
    """How often, on average, one row of a causal document is loaded by the tiles of the other side
    of length ``block`` (each row is seen by the tiles from itself to the document's end)."""
    return max(1.0, (document_length / block + 1.0) / 2.0)


def rotate_before_triton(
    n_heads: int, n_kv_heads: int, head_dim: int, rotary_dim: int, itemsize: int, table_itemsize: int,
    document_length: float, tiles: tuple[int, int, int], heads_per_tile: tuple[int, int] = (1, 1),
) -> bool:
    """Whether rotating q/k once in torch is cheaper than re-rotating them in the kernels' tiles.

    Per token, forward and backward together, in HBM-byte equivalents:

    * once: rotating q and k (read, write, D channels each) plus the cos/sin rows, forward; the
      transpose on dq/dk, backward: ``2 * (2 (Hq + Hkv) D itemsize + 2 R table_itemsize)``;
    * in the tiles: every Q/K row rotation re-reads its cos/sin row (``R table_itemsize`` bytes, at
      ``1 / TABLE_REREAD_DISCOUNT``) and spends 3R fp32 FLOPs (at ``ROTATION_FLOPS_PER_HBM_BYTE``).
      Rotations per token: the forward rotates Q once and each K row once per visiting query tile
      (a tile holds ``heads_per_tile`` heads of a kv group); dK/dV rotates K once, each Q row once
      per visiting key tile, and un-rotates dK; dQ rotates Q once, K per visiting query tile, and
      un-rotates dQ::

          Hq (4 + visits(dkdv keys)) + Hq / h_fwd visits(fwd tokens) + Hq / h_dq visits(dq tokens) + 2 Hkv

      with ``visits(block) = max(1, (document_length / block + 1) / 2)``, ``tiles`` = (forward
      tokens per query tile, dK/dV BLOCK_N, dQ tokens per query tile) and ``heads_per_tile`` =
      (h_fwd, h_dq). Packing h heads in a tile of BLOCK_M rows leaves BLOCK_M / h tokens: long
      documents rotate K as often either way, short ones less often.

    FLOPs of the tensor cores and the unchanged loads of Q/K/V are the same both ways. False for
    ``rotary_dim == 0`` (nothing to rotate).
    """
    if rotary_dim == 0:
        return False
    once = 2 * (2 * (n_heads + n_kv_heads) * head_dim * itemsize + 2 * rotary_dim * table_itemsize)
    fwd_tokens, key_block, dq_tokens = tiles
    fwd_heads, dq_heads = heads_per_tile
    rotations = (
        n_heads * (4 + _tile_visits(document_length, key_block))
        + n_heads / fwd_heads * _tile_visits(document_length, fwd_tokens)
        + n_heads / dq_heads * _tile_visits(document_length, dq_tokens)
        + 2 * n_kv_heads
    )
    per_rotation = rotary_dim * table_itemsize / TABLE_REREAD_DISCOUNT + 3 * rotary_dim / ROTATION_FLOPS_PER_HBM_BYTE
    return rotations * per_rotation > once


def _document_length_bound(max_seqlen) -> float:
    """``max_seqlen`` as a number when it is one; a symbolic size (dynamic shapes) counts as
    unbounded, so that no guard is added: rotating once costs at most one pass, re-rotating
    in the tiles grows with the documents' length."""
    return float(int(max_seqlen)) if is_concrete_int(max_seqlen) else math.inf


def _rotates_before_triton(q, k, v, cos, max_seqlen) -> bool:
    """``rotate_before_triton`` for this call, with the GPU tiles ``_triton_config`` would give."""
    meta = _triton_meta(q, v, cos, False)
    group_size = q.shape[1] // k.shape[1]
    fwd_rows, dq_rows = (_gpu_config(q.dtype, meta, kernel)[0] for kernel in ("fwd", "dq"))
    heads = (_heads_per_tile(group_size, fwd_rows), _heads_per_tile(group_size, dq_rows))
    tiles = (fwd_rows // heads[0], _gpu_config(q.dtype, meta, "dkdv")[1], dq_rows // heads[1])
    return rotate_before_triton(
        q.shape[1], k.shape[1], q.shape[2], cos.shape[1], q.element_size(), cos.element_size(),
        _document_length_bound(max_seqlen), tiles, heads,
    )


def _triton_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale, interleaved, window, softcap, sinks):
    """The ``"triton"`` impl: RoPE in the tiles, or (``_rotates_before_triton``) once in torch with
    R = 0 tables, autograd then taking dq/dk through the rotation's transpose."""
    if _rotates_before_triton(q, k, v, cos, max_seqlen):
        check_inputs(q, k, v, cos, sin, cu_seqlens)
        _require_frozen_tables(cos, sin)
        q, k = apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)
        cos, sin = cos[:, :0], sin[:, :0]
    return torch.ops.graphopt.varlen_attention_triton_fwd(
        q, k, v, cos, sin, cu_seqlens, scale, interleaved, window, softcap, sinks
    )[0]


# ---------------------------------------------------------------------------------------------
# The public op
# ---------------------------------------------------------------------------------------------


def _metadata_only(q: torch.Tensor) -> bool:
    """Whether the op runs only for its output's metadata: plain fake tensors (Dynamo's example
    values, a pass annotating the node it inserted) with no trace recording the decomposition
    (AOTAutograd's functional tensors, make_fx's proxy mode). The output's shape, dtype, device and
    autograd then come from the ``"torch"`` impl's fake, so they never depend on which library
    would run, and no library is called on fake tensors."""
    return is_fake(q) and not isinstance(q, FunctionalTensor) and get_proxy_mode() is None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    interleaved: bool,
    impl: str,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``graphopt::varlen_attention``: causal attention within each packed document, RoPE inside.

    Args:
        q: (T, Hq, D).
        k: (T, Hkv, D), Hq % Hkv == 0 (GQA without repeating K/V).
        v: (T, Hkv, Dv).
        cos, sin: (T, R) fp32 or q's dtype, per-token HF rotary tables; R even, R <= D.
        cu_seqlens: (N+1,) int32 on q's device, may end in repeated T (empty documents).
        max_seqlen: upper bound on a document's length (may be loose, e.g. T).
        scale: softmax scale.
        interleaved: pairwise rotary layout instead of rotate_half.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"flash_attn3"`` | ``"flash_attn"`` |
            ``"torch_varlen"``. ``"auto"`` is ``"torch"`` on the CPU and, on CUDA, the first of
            flash-attn 3, flash-attn 2, torch's ``varlen_attn`` and the Triton kernel that takes
            the call (``choose_cuda_impl``). An explicit library impl becomes ``"triton"`` for a
            call its library cannot take (sinks; softcap with ``varlen_attn``; fp32).
        window: -1 (unlimited), or >= 1: query t sees keys t - window < s <= t of its document
            (transformers' ``sliding_window``, flash-attn's ``window_size=(window - 1, 0)``).
        softcap: > 0 caps the scaled scores Gemma-2 style, ``softcap * tanh(z / softcap)``.
        sinks: None, or (Hq,) fp32 / q's dtype: gpt-oss attention sinks, one logit per query head
            in every row's softmax denominator.

    Returns:
        (T, Hq, Dv) in q's dtype. Differentiable w.r.t. q, k, v (the unrotated inputs) and sinks.

    Raises:
        ValueError: ``window`` not -1 and < 1, ``softcap`` < 0, or an unknown ``impl``.
        RuntimeError: no implementation that ``impl`` allows takes the call (``resolve_impl``).
    """
    check_options(q, window, softcap, sinks)
    impl = resolve_impl(impl, VarlenCall.of(q, k, v, window, softcap, sinks))
    if _metadata_only(q):
        impl = "torch"  # every impl returns the same (T, Hq, Dv) tensor; this fake reads no library
    if impl == "torch":
        args = (q, k, v, cos, sin, cu_seqlens, scale, interleaved, window, softcap, sinks)
        return torch.ops.graphopt.varlen_attention_torch_fwd(*args)[0]
    if impl == "triton":
        return _triton_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale, interleaved, window, softcap, sinks)
    return _library_varlen(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale, interleaved, impl, window, softcap)


torch.library.define(
    "graphopt::varlen_attention",
    torch.library.infer_schema(varlen_attention, mutates_args=()),
)
torch.library.impl("graphopt::varlen_attention", "CompositeImplicitAutograd")(varlen_attention)
