"""Triton kernel: cross-entropy loss of a chunk of logits, and its gradient.

``graphopt::cross_entropy_loss_and_grad`` is the per-chunk step of the Triton path of
``graphopt::linear_cross_entropy``. For each row ``i`` of a chunk of logits ``x`` (one program per
row) it computes, in fp32::

    z      = softcap * tanh(x / softcap)        if softcap > 0, else x (upcast to fp32)
    lse_i  = logsumexp(z_i)                     online (streaming) over BLOCK_V-wide vocabulary blocks
    loss_i = lse_i - z_i[target_i]              0 where target_i == ignore_index
    dz_i   = softmax(z_i) - onehot(target_i)    0 where target_i == ignore_index
    dx_i   = dz_i * (1 - (z_i / softcap)^2)     the softcap derivative, if softcap > 0

and, when a ``grad`` buffer is given, writes ``dx = d sum_i(loss_i) / d x`` into it in the dtype
of ``x``. ``grad`` may be ``x`` itself (in place: the caller does not need the logits afterwards)
or another buffer (the logits are also returned, so they must survive). Storing the gradient in
the logits' dtype is what eager autograd does too: the ``.float()`` before ``F.cross_entropy``
casts its fp32 gradient back to the logits' dtype.

Each row is read twice (max/sum pass, then gradient pass) and written once; nothing chunk-sized is
allocated besides the (rows,) fp32 loss.

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

# Vocabulary columns per block. 4096 fp32 values per row keep registers in budget at 8 warps on
# current GPUs while a 128k vocabulary still takes only 32 streaming steps.
MAX_BLOCK_V = 4096


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
def _cross_entropy_loss_and_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    grad_stride_row,
    target_ptr,
    loss_ptr,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Inductor passes Python floats to user kernels as fp64 scalars (Triton's launcher: fp32); the
    # cast keeps the running max/sum fp32, as their loop-carried type must stay.
    softcap = tl.cast(softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    offsets = tl.arange(0, BLOCK_V)

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

    safe_target = tl.where(valid, target, 0)
    z_target = tl.load(row_ptr + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = _softcap(z_target, softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))

    # Pass 2: d loss / d x into the grad row (possibly the logits row itself).
    if COMPUTE_GRAD:
        grad_row_ptr = grad_ptr + row * grad_stride_row
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            in_row = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            z = x
            if HAS_SOFTCAP:
                z = _softcap(x, softcap)
            grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            grad = tl.where(valid, grad, 0.0)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


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
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    wrap_triton(_cross_entropy_loss_and_grad_kernel)[(rows,)](
        logits,
        logits.stride(0),
        logits if grad is None else grad,
        0 if grad is None else grad.stride(0),
        target,
        loss,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP=softcap > 0.0,
        COMPUTE_GRAD=grad is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
