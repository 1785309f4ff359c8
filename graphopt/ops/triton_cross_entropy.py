"""Triton kernel: cross-entropy loss of a chunk of logits, and its gradient.

``graphopt::cross_entropy_loss_and_grad`` is the per-chunk step of the Triton path of
``graphopt::linear_cross_entropy``. For each row ``i`` of a chunk of logits ``x`` it computes, in
fp32::

    z      = softcap * tanh(x / softcap)        if softcap > 0, else x (upcast to fp32)
    lse_i  = logsumexp(z_i)                     max and sum of exp, online over BLOCK_V-wide blocks
    loss_i = lse_i - z_i[target_i]              0 where target_i == ignore_index
    dz_i   = softmax(z_i) - onehot(target_i)    0 where target_i == ignore_index
    dx_i   = dz_i * (1 - (z_i / softcap)^2)     the softcap derivative, if softcap > 0

and, when a ``grad`` buffer is given, writes ``dx = d sum_i(loss_i) / d x`` into it in the dtype
of ``x``. ``grad`` may be ``x`` itself (in place: the caller does not need the logits afterwards)
or another buffer (the logits are also returned, so they must survive). Storing the gradient in
the logits' dtype is what eager autograd does too: the ``.float()`` before ``F.cross_entropy``
casts its fp32 gradient back to the logits' dtype.

Passes over a row (``launch_config`` picks them from V):

- V <= ``MAX_BLOCK_V`` (one block holds the row): **one pass**. The row is loaded once, its max,
  sum, loss and gradient come from registers: one read and one write of the row.
- larger V: **two passes** of ``MAX_BLOCK_V``-wide blocks (16 warps, 32 fp32 values a thread):
  pass 1 keeps a running max ``m`` and sum ``d`` (rescaled by ``exp(m_old - m_new)``); pass 2
  re-reads the row to write the gradient. The grid is persistent: ``resident_programs`` programs
  loop over the rows, so only that many rows are between their two passes at a time, and they
  are chosen to fit in L2 (on an H100/H200, 50 MiB: 153 rows of a 128256-entry bf16 vocabulary,
  more than the 132 SMs). Pass 2 then reads L2, not HBM: per row, one HBM read and one write.

Nothing chunk-sized is allocated besides the (rows,) fp32 loss.

The pure-torch reference with the same contract (also the CPU path of the op) is
``graphopt.ops.linear_cross_entropy.cross_entropy_loss_and_grad_torch``.

Targets outside ``[0, V)`` that are not ``ignore_index`` are not checked here; the caller
(``linear_cross_entropy_fwd``) asserts on them before launching.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Vocabulary columns per block: 16384 fp32 values over 16 warps are 32 registers a thread, which
# leaves the 128 a thread may hold at 512 threads room for the exp and the gradient (checked for
# sm_80/sm_90 by tests/ops/test_kernel_resources.py). A vocabulary up to this size is one pass; a
# 128k vocabulary is 8 blocks a pass.
MAX_BLOCK_V = 16384
# The share of L2 the rows between their two passes may fill (the rest serves other traffic).
L2_SHARE = 0.75


@triton.jit
def _softcap(x, softcap):
    """``softcap * tanh(x / softcap)`` from ``exp`` (portable: no libdevice, runs in the interpreter).

    ``tanh(|y|) = (1 - e) / (1 + e)`` with ``e = exp(-2|y|)`` never overflows.
    """
    y = x / softcap
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(y < 0, -t, t)


@triton.jit
def _row_gradient(z, cols, target, lse, valid, softcap, HAS_SOFTCAP: tl.constexpr):
    """``d loss / d x`` of one block of a row from its (softcapped) fp32 logits ``z``."""
    grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
    if HAS_SOFTCAP:
        capped = z / softcap
        grad = grad * (1.0 - capped * capped)
    return tl.where(valid, grad, 0.0)


@triton.jit
def _cross_entropy_loss_and_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    grad_stride_row,
    target_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Inductor passes Python floats to user kernels as fp64 scalars (Triton's launcher: fp32); the
    # cast keeps the running max/sum fp32, as their loop-carried type must stay.
    softcap = tl.cast(softcap, tl.float32)
    offsets = tl.arange(0, BLOCK_V)
    # Persistent grid: program p handles rows p, p + programs, ... (see resident_programs).
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row_offset = tl.cast(row, tl.int64)  # row * stride may pass 2**31
        row_ptr = logits_ptr + row_offset * stride_row
        grad_row_ptr = grad_ptr + row_offset * grad_stride_row
        target = tl.load(target_ptr + row)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)
        if SINGLE_PASS:  # the whole row in one block: read once, from registers after that
            in_row = offsets < n_cols
            z = tl.load(row_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            z_in_row = tl.where(in_row, z, float("-inf"))
            m = tl.max(z_in_row, axis=0)
            lse = m + tl.log(tl.sum(tl.exp(z_in_row - m), axis=0))
            z_target = tl.sum(tl.where(offsets == safe_target, z, 0.0), axis=0)
            tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
            if COMPUTE_GRAD:
                grad = _row_gradient(z, offsets, target, lse, valid, softcap, HAS_SOFTCAP)
                tl.store(grad_row_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
        else:
            # Pass 1: running max m and running sum d of exp(z - m) over vocabulary blocks.
            m = tl.full([], float("-inf"), tl.float32)
            d = tl.full([], 0.0, tl.float32)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                in_row = cols < n_cols
                z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = _softcap(z, softcap)
                z = tl.where(in_row, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)
            z_target = tl.load(row_ptr + safe_target).to(tl.float32)
            if HAS_SOFTCAP:
                z_target = _softcap(z_target, softcap)
            tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
            # Pass 2: d loss / d x into the grad row (possibly the logits row itself), from L2.
            if COMPUTE_GRAD:
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + offsets
                    in_row = cols < n_cols
                    z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        z = _softcap(z, softcap)
                    grad = _row_gradient(z, cols, target, lse, valid, softcap, HAS_SOFTCAP)
                    tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def launch_config(vocab: int) -> dict:
    """``SINGLE_PASS``, ``BLOCK_V`` and ``num_warps`` for rows of ``vocab`` logits.

    One pass when the row fits one ``MAX_BLOCK_V`` block. The block is the row's width rounded up to
    a power of two, at most ``MAX_BLOCK_V``; ``BLOCK_V / 1024`` warps (32 values a thread), between
    4 and 16.
    """
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    num_warps = max(4, min(16, block_v // 1024))
    return dict(SINGLE_PASS=triton.next_power_of_2(vocab) <= MAX_BLOCK_V, BLOCK_V=block_v, num_warps=num_warps)


def resident_programs(rows: int, row_bytes: int, sm_count: int, l2_bytes: int) -> int:
    """Programs of the two-pass kernel's persistent grid: as many rows in flight as fill
    ``L2_SHARE`` of L2 (each program has one row between its passes), at least one per SM (fewer
    would leave SMs idle; a row too long for that many in L2 then re-reads part of it from HBM),
    at most ``rows``.

    H100/H200 (132 SMs, 50 MiB L2), V = 128256 bf16 (250.5 KiB a row): 153 programs, 39.2 MB.
    """
    return max(1, min(rows, max(sm_count, int(l2_bytes * L2_SHARE) // max(1, row_bytes))))


# Where there is no GPU to size the grid for (Triton's interpreter on the CPU, or meta tensors): a
# grid of two programs, so that the interpreter runs the persistent loop over several rows too.
_INTERPRETER_PROGRAMS = 2


def _grid_size(logits: torch.Tensor, single_pass: bool) -> int:
    rows = logits.shape[0]
    if logits.device.type != "cuda":
        return max(1, min(rows, _INTERPRETER_PROGRAMS))
    if single_pass:  # no second pass to keep in L2: one program per row
        return max(1, rows)
    props = torch.cuda.get_device_properties(logits.device)  # cached by torch; no device sync
    row_bytes = logits.shape[1] * logits.element_size()
    return resident_programs(rows, row_bytes, props.multi_processor_count, props.L2_cache_size)


@triton_op("graphopt::cross_entropy_loss_and_grad", mutates_args={"grad"})
def cross_entropy_loss_and_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    grad: torch.Tensor | None,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    """Per-row cross-entropy of ``logits``, and its gradient written into ``grad`` if one is given.

    Args:
        logits: (rows, V) fp32/bf16/fp16, unit stride along V.
        target: (rows,) int64, values in ``[0, V)`` or ``ignore_index`` (not range-checked here).
        grad: None (loss only), or (rows, V) in the dtype of ``logits``, unit stride along V:
            overwritten with ``d sum(loss) / d logits``, 0 on ignored rows. May be ``logits``
            itself, which is then overwritten in place.
        ignore_index: target value whose row has loss 0 and gradient 0.
        softcap: logit soft-capping ``softcap * tanh(x / softcap)`` before the softmax; 0 disables.

    Returns:
        (rows,) fp32 per-row loss, 0 for ignored rows.

    Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D (rows, V), got {logits.dim()}-D")
    torch._check(
        logits.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"logits must be fp32/bf16/fp16, got {logits.dtype}",
    )
    torch._check(logits.stride(1) == 1, lambda: "logits must have unit stride along the vocabulary")
    torch._check(target.dtype == torch.int64, lambda: f"target must be int64, got {target.dtype}")
    torch._check(
        target.shape == logits.shape[:1],
        lambda: f"target shape {tuple(target.shape)} must be ({logits.shape[0]},)",
    )
    torch._check(softcap >= 0.0, lambda: f"softcap must be >= 0, got {softcap}")
    if grad is not None:
        torch._check(
            grad.shape == logits.shape and grad.dtype == logits.dtype and grad.stride(1) == 1,
            lambda: f"grad must be {tuple(logits.shape)} {logits.dtype} with unit stride along V, "
            f"got {tuple(grad.shape)} {grad.dtype} strides {grad.stride()}",
        )
    if logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "graphopt::cross_entropy_loss_and_grad runs on CPU tensors only under TRITON_INTERPRET=1"
        )
    rows, vocab = logits.shape
    loss = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    config = launch_config(vocab)
    wrap_triton(_cross_entropy_loss_and_grad_kernel)[(_grid_size(logits, config["SINGLE_PASS"]),)](
        logits,
        logits.stride(0),
        logits if grad is None else grad,
        0 if grad is None else grad.stride(0),
        target,
        loss,
        rows,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP=softcap > 0.0,
        COMPUTE_GRAD=grad is not None,
        **config,
    )
    return loss
