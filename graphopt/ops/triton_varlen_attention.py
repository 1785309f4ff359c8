"""Triton kernels: causal varlen (packed-document) flash attention with RoPE fused into the tile loads,
and optionally a sliding window, logit softcapping and attention sinks.

The kernels of the ``"triton"`` implementation of ``graphopt::varlen_attention``. Their launchers
(``graphopt::varlen_attention_triton_fwd`` / ``_bwd``, ``triton_op`` + ``wrap_triton``), the
contract, the pure-torch reference and the dispatch live in ``graphopt/ops/varlen_attention.py``.

Shapes (T packed tokens, Hq query heads, Hkv kv heads, D = qk head dim, Dv = value head dim,
R = rotary dim, N documents)::

    q           (T, Hq, D)     fp32 | bf16 | fp16, unit stride along D
    k           (T, Hkv, D)    same dtype, Hq % Hkv == 0
    v           (T, Hkv, Dv)   same dtype
    cos, sin    (T, R)         fp32 or q's dtype, per-token HF rotary tables, R even, R <= D
    cu_seqlens  (N+1,)         int32, 0 = cu[0] <= cu[1] <= ... <= cu[N] = T (repeated T = empty docs)
    sinks       (Hq,)          fp32 or q's dtype, one logit per query head (forward only)
    out         (T, Hq, Dv)    q's dtype
    lse         (Hq, T)        fp32, natural-log logsumexp of each query row's (capped) scores and
                               its sink

Grids tile the token stream, never the document list: the forward and the dQ kernel run one program
per query tile of BLOCK_M rows, ``HEADS`` query heads of one kv group times BLOCK_M / HEADS tokens
(``_query_rows``; the launcher packs as many heads as leave 16-token tiles), the dK/dV kernel one
per (BLOCK_N key tokens, kv head). Packing heads keeps the MMA shape while the tiles get shorter in
tokens: less work outside short documents and windows, and each K/V tile is loaded and rotated
once for the ``HEADS`` heads. A tile may span documents; each row finds its document start in
``seq_start`` (T,) and each key its document end in ``seq_end`` (T,), both computed on the device
by ``searchsorted`` on ``cu_seqlens``.
So the padded tail of ``cu_seqlens`` (empty documents) costs nothing, and no host sync happens.
Query row ``t`` attends key ``s`` iff ``seq_start[t] <= s <= t`` (same document and causal) and,
with ``HAS_WINDOW``, ``t - window < s``. A query tile iterates keys from its first token's document
start (or ``first token - window + 1``, whichever is later) to its last token; a key tile iterates
queries from its first key to its last key's document end (or ``last key + window``, whichever is
earlier): work scales with sum(len_j * min(len_j, window)); key blocks wholly outside the band are
never visited.

Options, each a constexpr flag so that plain causal attention compiles to the kernels it always had:
``HAS_SOFTCAP`` caps the scores, ``z = c * tanh(z / c)``, in log2 units (both z and
``c = softcap * log2(e)`` are scaled by log2(e), which leaves the function unchanged), with the
derivative ``1 - (z / c)^2`` applied to dS in the backward. ``HAS_SINKS`` starts each row's
running max at its head's sink and its running sum at 1, so the sink joins the denominator and lse
and nothing else; the backward kernels need no flag, since lse carries the sink, and the sinks'
gradient ``-sum_t exp(sink - lse) * delta`` is a small torch reduction in the launcher.

RoPE in the tiles. Channels are handled as three column groups, so that rotation is elementwise and
un-rotation needs no register shuffle::

    A = first member of each rotary pair   half layout: c in [0, R/2)    interleaved: c = 2i
    B = its partner                        half layout: c + R/2           interleaved: c = 2i + 1
    P = pass-through channels [R, D)       (only when R < D)

    rotate:    y_A = x_A cos - x_B sin      y_B = x_B cos + x_A sin
    un-rotate: g_A' = g_A cos + g_B sin     g_B' = g_B cos - g_A sin   (the transpose)

with ``cos``/``sin`` read at the A columns: HF tables give both members of a pair the same angle
(``cat(f, f)`` or each frequency repeated twice), which the op's contract requires. Scores are
``q_A k_A^T + q_B k_B^T + q_P k_P^T``. Q/K tiles are rotated in fp32 right after loading, then
rounded to the input dtype for the matmuls; dQ/dK are accumulated per group in fp32 and un-rotated
before the single store, so rotated Q/K and rotated dQ/dK never touch global memory. That costs a
re-rotation of every Q/K tile each time a program loads it (once per query tile of ``HEADS`` heads,
for every tile pair a document's band holds), with cos/sin re-read each time. ``HAS_ROTARY`` is False for R = 0:
no rotary groups at all, every channel in P, so a call whose q/k were rotated once before the
kernels (``varlen_attention.py`` decides when that is cheaper) runs the plain attention kernels.

Backward: a preprocess kernel computes ``delta = rowsum(dO * O)`` (Hq, T) fp32; the dK/dV kernel
owns one key tile of one kv head and loops over the Hq/Hkv query heads of its group (GQA without
repeated K/V and without atomics); the dQ kernel recomputes P per query tile. Two kernels instead of
dQ atomics keep the backward deterministic and need no fp32 (T, Hq, D) scratch buffer.

Block sizes (BLOCK_M x BLOCK_N), num_warps and num_stages are fixed, not autotuned: on GPUs
``_GPU_CONFIGS`` in ``varlen_attention.py`` picks them per kernel, precision and tile width, to fit
sm_80's and sm_90's shared memory and registers (``tests/ops/test_kernel_resources.py``; not yet
timed); 16x16 under ``TRITON_INTERPRET=1``, so that small test shapes exercise multi-tile paths.
fp32 inputs use IEEE fp32 matmuls (no TF32), so fp32 results match the reference tightly.

Float scalar arguments (``scale``, ``qk_scale_log2``, ``softcap_log2``) are cast to fp32 on entry. Triton's launcher
passes a Python float as fp32, but under ``torch.compile`` Inductor re-emits a ``wrap_triton``
kernel with its own signature, where a Python float is an fp64 scalar: without the cast, fp32
blocks multiplied by it become fp64, the forward's loop-carried ``m_i`` changes type and the
kernel fails to compile (``CompilationError``), and the backward silently computes in fp64.
``tests/ops/test_triton_frontend.py`` compiles every launch with both typings.
"""

import triton
import triton.language as tl

from graphopt.ops.triton_cross_entropy import _softcap

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``IEEE_FP32``: fp32 operands multiply in full fp32 (no TF32). ``UPCAST``: operands (already
    rounded to bf16/fp16) are widened to fp32 first; set only under ``TRITON_INTERPRET=1``, whose
    ``tl.dot`` mishandles bf16 operands (triton 3.9). The products are the same either way.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _pair_columns(offs_j, half, INTERLEAVED: tl.constexpr):
    """Channel indices (A, B) of rotary pair ``offs_j``."""
    if INTERLEAVED:
        col_a = 2 * offs_j
        col_b = col_a + 1
    else:
        col_a = offs_j
        col_b = offs_j + half
    return col_a, col_b


@triton.jit
def _load_cols(ptr, stride_t, rows, row_mask, cols, col_mask):
    """(rows, cols) tile of a (T, ...) tensor as fp32, 0 outside the masks."""
    offsets = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_rotated_pair(x_ptr, stride_t, rows, row_mask, cos_ptr, sin_ptr, stride_cos, stride_sin,
                       col_a, col_b, pair_mask):
    """(y_A, y_B): the rotated A and B column groups of a (rows, pairs) tile, fp32."""
    x_a = _load_cols(x_ptr, stride_t, rows, row_mask, col_a, pair_mask)
    x_b = _load_cols(x_ptr, stride_t, rows, row_mask, col_b, pair_mask)
    cos = _load_cols(cos_ptr, stride_cos, rows, row_mask, col_a, pair_mask)
    sin = _load_cols(sin_ptr, stride_sin, rows, row_mask, col_a, pair_mask)
    return x_a * cos - x_b * sin, x_b * cos + x_a * sin


@triton.jit
def _store_unrotated(out_ptr, stride_t, rows, row_mask, cos_ptr, sin_ptr, stride_cos, stride_sin,
                     col_a, col_b, pair_mask, g_a, g_b, g_p, cols_p, pass_mask, HAS_ROTARY: tl.constexpr,
                     HAS_PASS: tl.constexpr):
    """Store the gradient w.r.t. the unrotated input: un-rotate (g_A, g_B), pass g_P through."""
    dtype = out_ptr.dtype.element_ty
    base = out_ptr + rows.to(tl.int64)[:, None] * stride_t
    if HAS_ROTARY:
        cos = _load_cols(cos_ptr, stride_cos, rows, row_mask, col_a, pair_mask)
        sin = _load_cols(sin_ptr, stride_sin, rows, row_mask, col_a, pair_mask)
        mask = row_mask[:, None] & pair_mask[None, :]
        tl.store(base + col_a[None, :], (g_a * cos + g_b * sin).to(dtype), mask=mask)
        tl.store(base + col_b[None, :], (g_b * cos - g_a * sin).to(dtype), mask=mask)
    if HAS_PASS:
        tl.store(base + cols_p[None, :], g_p.to(dtype), mask=row_mask[:, None] & pass_mask[None, :])


@triton.jit
def _scores_log2(s, qk_scale_log2, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products -> scaled (and capped) scores in log2 units."""
    if HAS_SOFTCAP:
        return _softcap(s * qk_scale_log2, softcap_log2)
    else:
        return s * qk_scale_log2


@triton.jit
def _query_rows(n_tokens, group_size, BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """The rows of a query-tile program of the forward and dQ kernels: ``HEADS`` query heads of
    one kv group (program axis 1 numbers the groups of ``HEADS`` heads) for ``BLOCK_M // HEADS``
    tokens (axis 0), head-major: row ``r`` is token ``first + r % (BLOCK_M // HEADS)`` of head
    ``HEADS * pid + r // (BLOCK_M // HEADS)``. Each key tile is then loaded and rotated once for
    the ``HEADS`` heads. Returns (token per row, head per row, kv head, first token, end token)."""
    tokens: tl.constexpr = BLOCK_M // HEADS
    rows = tl.arange(0, BLOCK_M)
    first = tl.program_id(0) * tokens
    head = tl.program_id(1) * HEADS + rows // tokens
    kv_head = tl.program_id(1) * HEADS // group_size
    return first + rows % tokens, head, kv_head, first, tl.minimum(first + tokens, n_tokens)


@triton.jit
def _visible(query, query_start, key, window, HAS_WINDOW: tl.constexpr):
    """Whether ``query`` (its document starting at ``query_start``) sees ``key``; the arguments are
    broadcast against each other ((rows, 1) against (1, keys), or transposed)."""
    attend = (key >= query_start) & (key <= query)
    if HAS_WINDOW:
        attend = attend & (key > query - window)
    return attend


@triton.jit
def varlen_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, seq_start_ptr, sinks_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_sin, stride_ot, stride_oh,
    n_tokens, head_dim, rotary_dim, value_dim, group_size, qk_scale_log2, window, softcap_log2,
    INTERLEAVED: tl.constexpr, HAS_ROTARY: tl.constexpr, HAS_PASS: tl.constexpr, IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEADS: tl.constexpr,
):
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)  # fp64 under Inductor: see the module docstring
    softcap_log2 = tl.cast(softcap_log2, tl.float32)
    offs_m, head, kv_head, first, hi = _query_rows(n_tokens, group_size, BLOCK_M, HEADS)
    dtype = q_ptr.dtype.element_ty

    m_mask = offs_m < n_tokens
    row_start = tl.load(seq_start_ptr + offs_m, mask=m_mask, other=0)
    lo = tl.load(seq_start_ptr + first)  # seq_start is non-decreasing: the tile's minimum
    if HAS_WINDOW:
        lo = tl.maximum(lo, first - window + 1)  # the first token's oldest visible key

    half = rotary_dim // 2
    offs_j = tl.arange(0, BLOCK_HALF)
    pair_mask = offs_j < half
    col_a, col_b = _pair_columns(offs_j, half, INTERLEAVED)
    cols_p = rotary_dim + tl.arange(0, BLOCK_PASS)
    pass_mask = cols_p < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < value_dim

    q_head = q_ptr + (head * stride_qh)[:, None]  # each row's head
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    if HAS_ROTARY:
        q_a, q_b = _load_rotated_pair(q_head, stride_qt, offs_m, m_mask, cos_ptr, sin_ptr, stride_cos,
                                      stride_sin, col_a, col_b, pair_mask)
        q_a = q_a.to(dtype)
        q_b = q_b.to(dtype)
    if HAS_PASS:
        q_p = _load_cols(q_head, stride_qt, offs_m, m_mask, cols_p, pass_mask).to(dtype)

    # A finite initial max keeps exp2(m_old - m_new) at 1, not NaN, for rows whose first key
    # blocks are all masked (they belong to a later document of the tile). A sink is such a
    # start: max = sink (kept finite for a sink of -inf), sum = exp2(sink - max), 1 or 0.
    if HAS_SINKS:
        sink = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        m_i = tl.maximum(sink, -1.0e30)
        l_i = tl.exp2(sink - m_i)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_ROTARY:
            k_a, k_b = _load_rotated_pair(k_head, stride_kt, offs_n, n_mask, cos_ptr, sin_ptr, stride_cos,
                                          stride_sin, col_a, col_b, pair_mask)
            s = _dot(q_a, tl.trans(k_a.to(dtype)), s, IEEE_FP32, UPCAST)
            s = _dot(q_b, tl.trans(k_b.to(dtype)), s, IEEE_FP32, UPCAST)
        if HAS_PASS:
            k_p = _load_cols(k_head, stride_kt, offs_n, n_mask, cols_p, pass_mask).to(dtype)
            s = _dot(q_p, tl.trans(k_p), s, IEEE_FP32, UPCAST)
        attend = _visible(offs_m[:, None], row_start[:, None], offs_n[None, :], window, HAS_WINDOW)
        s = tl.where(attend, _scores_log2(s, qk_scale_log2, softcap_log2, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cols(v_head, stride_vt, offs_n, n_mask, offs_dv, dv_mask).to(dtype)
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], IEEE_FP32, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past T have l_i == 0; they are not stored
    out = acc / l_safe[:, None]
    out_offsets = offs_m.to(tl.int64)[:, None] * stride_ot + (head * stride_oh)[:, None] + offs_dv[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
    lse = (m_i + tl.log2(l_safe)) / LOG2E
    tl.store(lse_ptr + head * n_tokens + offs_m, lse, mask=m_mask)


@triton.jit
def varlen_attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh, n_tokens, value_dim,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[h, t] = sum_e dO[t, h, e] * O[t, h, e] in fp32."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tokens
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < value_dim
    out = _load_cols(out_ptr + head * stride_oh, stride_ot, offs_m, m_mask, offs_dv, dv_mask)
    dout = _load_cols(dout_ptr + head * stride_doh, stride_dot, offs_m, m_mask, offs_dv, dv_mask)
    tl.store(delta_ptr + head * n_tokens + offs_m, tl.sum(out * dout, 1), mask=m_mask)


@triton.jit
def varlen_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, seq_start_ptr, seq_end_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_tokens, head_dim, rotary_dim, value_dim, group_size, scale, qk_scale_log2, window, softcap_log2,
    INTERLEAVED: tl.constexpr, HAS_ROTARY: tl.constexpr, HAS_PASS: tl.constexpr, IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # fp64 under Inductor: see the module docstring
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)
    softcap_log2 = tl.cast(softcap_log2, tl.float32)
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty

    n_first = pid_n * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    n_last = tl.minimum(n_first + BLOCK_N, n_tokens) - 1
    q_hi = tl.load(seq_end_ptr + n_last)  # seq_end is non-decreasing: the tile's maximum
    if HAS_WINDOW:
        q_hi = tl.minimum(q_hi, n_last + window)  # past the last key's newest viewer

    half = rotary_dim // 2
    offs_j = tl.arange(0, BLOCK_HALF)
    pair_mask = offs_j < half
    col_a, col_b = _pair_columns(offs_j, half, INTERLEAVED)
    cols_p = rotary_dim + tl.arange(0, BLOCK_PASS)
    pass_mask = cols_p < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < value_dim

    if HAS_ROTARY:
        k_a, k_b = _load_rotated_pair(k_ptr + kv_head * stride_kh, stride_kt, offs_n, n_mask, cos_ptr, sin_ptr,
                                      stride_cos, stride_sin, col_a, col_b, pair_mask)
        k_a = k_a.to(dtype)
        k_b = k_b.to(dtype)
        dk_a = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
        dk_b = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    if HAS_PASS:
        k_p = _load_cols(k_ptr + kv_head * stride_kh, stride_kt, offs_n, n_mask, cols_p, pass_mask).to(dtype)
        dk_p = tl.zeros([BLOCK_N, BLOCK_PASS], tl.float32)
    v = _load_cols(v_ptr + kv_head * stride_vh, stride_vt, offs_n, n_mask, offs_dv, dv_mask).to(dtype)

    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, group_size):
        head = kv_head * group_size + g
        q_head = q_ptr + head * stride_qh
        for start_m in range(n_first, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < q_hi
            s_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            if HAS_ROTARY:
                q_a, q_b = _load_rotated_pair(q_head, stride_qt, offs_m, m_mask, cos_ptr, sin_ptr, stride_cos,
                                              stride_sin, col_a, col_b, pair_mask)
                q_a = q_a.to(dtype)
                q_b = q_b.to(dtype)
                s_t = _dot(k_a, tl.trans(q_a), s_t, IEEE_FP32, UPCAST)
                s_t = _dot(k_b, tl.trans(q_b), s_t, IEEE_FP32, UPCAST)
            if HAS_PASS:
                q_p = _load_cols(q_head, stride_qt, offs_m, m_mask, cols_p, pass_mask).to(dtype)
                s_t = _dot(k_p, tl.trans(q_p), s_t, IEEE_FP32, UPCAST)
            row_start = tl.load(seq_start_ptr + offs_m, mask=m_mask, other=n_tokens)
            lse = tl.load(lse_ptr + head * n_tokens + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(delta_ptr + head * n_tokens + offs_m, mask=m_mask, other=0.0)
            attend = _visible(offs_m[None, :], row_start[None, :], offs_n[:, None], window, HAS_WINDOW)
            z_t = _scores_log2(s_t, qk_scale_log2, softcap_log2, HAS_SOFTCAP)
            p_t = tl.exp2(tl.where(attend, z_t - lse[None, :] * LOG2E, float("-inf")))
            dout = _load_cols(dout_ptr + head * stride_doh, stride_dot, offs_m, m_mask, offs_dv, dv_mask).to(dtype)
            dv = _dot(p_t.to(dtype), dout, dv, IEEE_FP32, UPCAST)
            dp_t = _dot(v, tl.trans(dout), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE_FP32, UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                capped = z_t / softcap_log2
                ds_t = ds_t * (1.0 - capped * capped)
            ds_t = ds_t.to(dtype)
            if HAS_ROTARY:
                dk_a = _dot(ds_t, q_a, dk_a, IEEE_FP32, UPCAST)
                dk_b = _dot(ds_t, q_b, dk_b, IEEE_FP32, UPCAST)
            if HAS_PASS:
                dk_p = _dot(ds_t, q_p, dk_p, IEEE_FP32, UPCAST)

    if not HAS_PASS:
        dk_p = dk_a  # unused placeholder: _store_unrotated skips the pass group
    if not HAS_ROTARY:
        dk_a = dk_p  # unused placeholders: _store_unrotated skips the rotary groups
        dk_b = dk_p
    _store_unrotated(dk_ptr + kv_head * stride_dkh, stride_dkt, offs_n, n_mask, cos_ptr, sin_ptr, stride_cos,
                     stride_sin, col_a, col_b, pair_mask, dk_a * scale, dk_b * scale, dk_p * scale, cols_p,
                     pass_mask, HAS_ROTARY, HAS_PASS)
    dv_offsets = offs_n.to(tl.int64)[:, None] * stride_dvt + kv_head * stride_dvh + offs_dv[None, :]
    tl.store(dv_ptr + dv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=n_mask[:, None] & dv_mask[None, :])


@triton.jit
def varlen_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, seq_start_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    n_tokens, head_dim, rotary_dim, value_dim, group_size, scale, qk_scale_log2, window, softcap_log2,
    INTERLEAVED: tl.constexpr, HAS_ROTARY: tl.constexpr, HAS_PASS: tl.constexpr, IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_DV: tl.constexpr, HEADS: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # fp64 under Inductor: see the module docstring
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)
    softcap_log2 = tl.cast(softcap_log2, tl.float32)
    offs_m, head, kv_head, first, hi = _query_rows(n_tokens, group_size, BLOCK_M, HEADS)
    dtype = q_ptr.dtype.element_ty

    m_mask = offs_m < n_tokens
    row_start = tl.load(seq_start_ptr + offs_m, mask=m_mask, other=0)
    lo = tl.load(seq_start_ptr + first)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first - window + 1)

    half = rotary_dim // 2
    offs_j = tl.arange(0, BLOCK_HALF)
    pair_mask = offs_j < half
    col_a, col_b = _pair_columns(offs_j, half, INTERLEAVED)
    cols_p = rotary_dim + tl.arange(0, BLOCK_PASS)
    pass_mask = cols_p < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < value_dim

    q_head = q_ptr + (head * stride_qh)[:, None]  # each row's head
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    if HAS_ROTARY:
        q_a, q_b = _load_rotated_pair(q_head, stride_qt, offs_m, m_mask, cos_ptr, sin_ptr, stride_cos,
                                      stride_sin, col_a, col_b, pair_mask)
        q_a = q_a.to(dtype)
        q_b = q_b.to(dtype)
    if HAS_PASS:
        q_p = _load_cols(q_head, stride_qt, offs_m, m_mask, cols_p, pass_mask).to(dtype)
        dq_p = tl.zeros([BLOCK_M, BLOCK_PASS], tl.float32)
    dout = _load_cols(dout_ptr + (head * stride_doh)[:, None], stride_dot, offs_m, m_mask, offs_dv, dv_mask).to(dtype)
    lse_log2 = tl.load(lse_ptr + head * n_tokens + offs_m, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + head * n_tokens + offs_m, mask=m_mask, other=0.0)

    if HAS_ROTARY:
        dq_a = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
        dq_b = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_ROTARY:
            k_a, k_b = _load_rotated_pair(k_head, stride_kt, offs_n, n_mask, cos_ptr, sin_ptr, stride_cos,
                                          stride_sin, col_a, col_b, pair_mask)
            k_a = k_a.to(dtype)
            k_b = k_b.to(dtype)
            s = _dot(q_a, tl.trans(k_a), s, IEEE_FP32, UPCAST)
            s = _dot(q_b, tl.trans(k_b), s, IEEE_FP32, UPCAST)
        if HAS_PASS:
            k_p = _load_cols(k_head, stride_kt, offs_n, n_mask, cols_p, pass_mask).to(dtype)
            s = _dot(q_p, tl.trans(k_p), s, IEEE_FP32, UPCAST)
        attend = _visible(offs_m[:, None], row_start[:, None], offs_n[None, :], window, HAS_WINDOW)
        z = _scores_log2(s, qk_scale_log2, softcap_log2, HAS_SOFTCAP)
        p = tl.exp2(tl.where(attend, z - lse_log2[:, None], float("-inf")))
        v = _load_cols(v_head, stride_vt, offs_n, n_mask, offs_dv, dv_mask).to(dtype)
        dp = _dot(dout, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE_FP32, UPCAST)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            capped = z / softcap_log2
            ds = ds * (1.0 - capped * capped)
        ds = ds.to(dtype)
        if HAS_ROTARY:
            dq_a = _dot(ds, k_a, dq_a, IEEE_FP32, UPCAST)
            dq_b = _dot(ds, k_b, dq_b, IEEE_FP32, UPCAST)
        if HAS_PASS:
            dq_p = _dot(ds, k_p, dq_p, IEEE_FP32, UPCAST)

    if not HAS_PASS:
        dq_p = dq_a  # unused placeholder: _store_unrotated skips the pass group
    if not HAS_ROTARY:
        dq_a = dq_p  # unused placeholders: _store_unrotated skips the rotary groups
        dq_b = dq_p
    _store_unrotated(dq_ptr + (head * stride_dqh)[:, None], stride_dqt, offs_m, m_mask, cos_ptr, sin_ptr, stride_cos,
                     stride_sin, col_a, col_b, pair_mask, dq_a * scale, dq_b * scale, dq_p * scale, cols_p,
                     pass_mask, HAS_ROTARY, HAS_PASS)
