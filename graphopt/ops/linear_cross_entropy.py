"""Fused LM head + cross-entropy: ``graphopt::linear_cross_entropy``, chunked over tokens.

Shapes and dtypes (N tokens, H hidden size, V vocabulary size)::

    hidden  (N, H)  fp32 | bf16 | fp16
    weight  (V, H)  same dtype as hidden (the LM head / tied embedding)
    target  (N,)    int64, values in [0, V) or ignore_index

Per token ``i``, with every logit upcast to fp32::

    z_i    = F.linear(hidden, weight)[i].float()       matmul in the input dtype, fp32 accumulation
    z_i    = softcap * tanh(z_i / softcap)             only if softcap > 0
    loss_i = logsumexp(z_i) - z_i[target_i]            0 where target_i == ignore_index
    loss_sum = sum_i loss_i                            fp32, 0-dim

The op returns ``(loss_sum, logits)``. ``logits`` is the full (N, V) ``F.linear(hidden, weight)`` in
the input dtype if ``return_logits`` (written chunk by chunk by the matmul the loss uses), else an
empty tensor of shape (0,). Each chunk is ``F.linear`` of its rows: bitwise equal to the full
``F.linear`` wherever the BLAS result does not depend on the row count (fp32 on CPU here; bf16 on
CPU and cuBLAS may pick another kernel for fewer rows and differ in the last bit).
Normalization (``loss_sum / count`` or ``/ num_items_in_batch``) is the caller's, so the op never
reads the count back to the host. With every target ignored, ``loss_sum`` is 0 and the gradients
are 0; the caller's mean is then 0/0 = NaN, as in eager.

Memory model. Tokens are processed ``chunk_size`` at a time. Alive at once, besides the inputs:
one (chunk, V) logits chunk in the input dtype, plus on the ``"torch"`` path up to two (chunk, V)
fp32 work buffers (the upcast and, with softcap, the tanh), plus, when ``compute_grad``,
``grad_hidden`` (N, H) in the input dtype and an fp32 (V, H) ``grad_weight`` accumulator
(cast to the input dtype once at the end). The ``"triton"`` path computes loss and gradient in
place in the logits chunk, so no fp32 chunk exists. ``return_logits`` adds the (N, V) output.
``default_chunk_size`` picks a chunk of about 256 MB of logits work buffers.

Autograd. ``compute_grad=True`` computes ``grad_hidden`` and ``grad_weight`` (d loss_sum / d input)
during the forward, chunk by chunk: per chunk one matmul for the logits, then
``grad_hidden[chunk] = dz @ weight`` and ``grad_weight += dz.T @ hidden[chunk]``, the three matmuls of
an unfused forward + backward. The backward only multiplies them by the incoming 0-dim gradient of
``loss_sum`` (no host read) and, when the caller also differentiates the returned logits, adds
``grad_logits @ weight`` and ``grad_logits.T @ hidden``. ``compute_grad=False`` (inference) skips
the gradient work; reaching its backward raises.

Precision. ``dz`` is stored in the input dtype before its two matmuls, as eager autograd does after
the ``.float()``. ``grad_weight`` is accumulated across chunks in fp32 (bf16/fp16: each chunk's
matmul result, rounded to the input dtype, is added to the fp32 accumulator).

Out-of-range targets (not in ``[0, V)`` and not ``ignore_index``) fail ``torch._assert_async``: a
RuntimeError on CPU, a device-side assert on CUDA, as ``F.cross_entropy`` does.

Ops:
    ``graphopt::linear_cross_entropy``     the public op, (loss_sum, logits); a composite that calls
    ``graphopt::linear_cross_entropy_fwd`` the opaque op that also returns (grad_hidden,
                                           grad_weight), so its ``register_autograd`` can save them.
The public op is ``CompositeImplicitAutograd``: AOTAutograd decomposes it into the ``_fwd`` op, whose
fake impl is its shape function (a composite op takes none of its own).

``impl``: ``"torch"`` is the chunked torch path (CPU, also valid on CUDA); ``"triton"`` runs
``graphopt::cross_entropy_loss_and_grad_`` (a ``triton_op``) on each chunk; ``"auto"`` picks
``"triton"`` on CUDA, ``"torch"`` elsewhere.
"""

import torch
import torch.nn.functional as F

from graphopt.ops.triton_cross_entropy import cross_entropy_loss_and_grad_

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "torch", "triton")

# Bytes of per-chunk logits work buffers default_chunk_size aims for.
_CHUNK_BYTES = 256 * 1024 * 1024


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one chunk's logits work buffers take about 256 MB.

    Counts one (chunk, V) buffer in ``dtype`` (the matmul output) and one in fp32 (the upcast).
    Rounded down to a multiple of 16 rows (matmul-friendly), at least 16, at most ``n_tokens``
    (and at least 1).
    """
    bytes_per_token = vocab * (torch.empty((), dtype=dtype).element_size() + 4)
    chunk = max(16, (_CHUNK_BYTES // bytes_per_token) // 16 * 16)
    return max(1, min(chunk, n_tokens))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    """The definition of correct: the summed loss computed the unfused way, as HF does.

    ``hidden`` (N, H), ``weight`` (V, H), ``target`` (N,) int64. Returns the fp32 0-dim loss sum.
    Materializes the full (N, V) logits (and an fp32 copy).
    """
    logits = F.linear(hidden, weight).float()
    if softcap > 0.0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


def cross_entropy_loss_and_grad_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    compute_grad: bool,
) -> torch.Tensor:
    """Pure-torch twin of ``graphopt::cross_entropy_loss_and_grad_`` (same contract, same in-place write).

    ``logits`` (rows, V) fp32/bf16/fp16; ``target`` (rows,) int64. Returns the (rows,) fp32 per-row
    loss (0 where ignored). When ``compute_grad``, overwrites ``logits`` with
    ``d sum(loss) / d logits`` in its dtype. Works in fp32: for fp32 logits without softcap the
    softmax is computed in place in ``logits``; otherwise one or two fp32 (rows, V) buffers.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    z = logits.float()  # an alias for fp32 logits: only written when compute_grad
    tanh_z = None
    if softcap > 0.0:
        tanh_z = (z / softcap).tanh_()
        z = tanh_z * softcap
    z_target = z.gather(1, safe_target).squeeze(1)
    if not compute_grad:
        lse = torch.logsumexp(z, dim=1)
        return torch.where(valid, lse - z_target, 0.0)
    # One exp pass serves both the logsumexp and the softmax (the softmax is computed in place).
    row_max = z.amax(dim=1, keepdim=True)
    grad = z.sub_(row_max).exp_()
    sum_exp = grad.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    loss = torch.where(valid, lse - z_target, 0.0)
    grad.mul_(valid.unsqueeze(1) / sum_exp)  # softmax, and 0 on ignored rows
    grad.scatter_add_(1, safe_target, valid.to(torch.float32).neg().unsqueeze(1))
    if tanh_z is not None:
        grad.mul_(tanh_z.square_().neg_().add_(1.0))
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)
    return loss


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    softcap: float,
    chunk_size: int,
    impl: str,
) -> None:
    """Shape/dtype/argument checks shared by the real and the fake implementation."""
    torch._check(hidden.dim() == 2, lambda: f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    torch._check(
        hidden.shape[1] == weight.shape[1],
        lambda: f"hidden (N, H) = {tuple(hidden.shape)} and weight (V, H) = {tuple(weight.shape)} disagree on H",
    )
    torch._check(
        target.shape == hidden.shape[:1],
        lambda: f"target must have shape (N,) = ({hidden.shape[0]},), got {tuple(target.shape)}",
    )
    torch._check(
        hidden.dtype in SUPPORTED_DTYPES,
        lambda: f"hidden must be fp32, bf16 or fp16, got {hidden.dtype}",
    )
    torch._check(
        weight.dtype == hidden.dtype,
        lambda: f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}",
    )
    torch._check(target.dtype == torch.int64, lambda: f"target must be int64, got {target.dtype}")
    torch._check(
        hidden.device == weight.device == target.device,
        lambda: f"hidden, weight, target on different devices: {hidden.device}, {weight.device}, {target.device}",
    )
    torch._check(softcap >= 0.0, lambda: f"softcap must be >= 0 (0 disables it), got {softcap}")
    torch._check(chunk_size >= 1, lambda: f"chunk_size must be >= 1, got {chunk_size}")
    torch._check(impl in IMPLS, lambda: f"impl must be one of {IMPLS}, got {impl!r}")


@torch.library.custom_op("graphopt::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    chunk_size: int,
    return_logits: bool,
    compute_grad: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked loss (and gradients) of the LM head; see the module docstring for the math.

    Returns:
        loss_sum: () fp32.
        logits: (N, V) input dtype if ``return_logits``, else (0,).
        grad_hidden: (N, H) input dtype, d loss_sum / d hidden, if ``compute_grad``, else (0,).
        grad_weight: (V, H) input dtype, d loss_sum / d weight, if ``compute_grad``, else (0,).
    """
    _check_inputs(hidden, weight, target, softcap, chunk_size, impl)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    in_range = (target >= 0) & (target < vocab)
    torch._assert_async(
        (in_range | (target == ignore_index)).all(),
        "graphopt::linear_cross_entropy: a target is outside [0, V) and is not ignore_index",
    )
    use_triton = impl == "triton" or (impl == "auto" and hidden.is_cuda)
    loss_step = cross_entropy_loss_and_grad_ if use_triton else cross_entropy_loss_and_grad_torch

    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Outputs must not alias each other, so each absent one is its own (0,) tensor.
    logits = hidden.new_empty((n_tokens, vocab) if return_logits else (0,))
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,))
    grad_weight_acc = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if compute_grad else None
    )
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        hidden_chunk = hidden[start:end]
        if return_logits:
            chunk = torch.mm(hidden_chunk, weight.t(), out=logits[start:end])
            if compute_grad:
                chunk = chunk.clone()  # the returned logits must survive the in-place gradient
        else:
            chunk = torch.mm(hidden_chunk, weight.t())
        loss_sum += loss_step(chunk, target[start:end], ignore_index, softcap, compute_grad).sum()
        if compute_grad:
            # chunk now holds d loss_sum / d logits for these rows.
            torch.mm(chunk, weight, out=grad_hidden[start:end])
            if grad_weight_acc.dtype == chunk.dtype:
                grad_weight_acc.addmm_(chunk.t(), hidden_chunk)
            else:
                grad_weight_acc += torch.mm(chunk.t(), hidden_chunk)
        del chunk
    grad_weight = grad_weight_acc.to(weight.dtype) if compute_grad else weight.new_empty((0,))
    return loss_sum, logits, grad_hidden, grad_weight


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, ignore_index, softcap, chunk_size, return_logits, compute_grad, impl):
    _check_inputs(hidden, weight, target, softcap, chunk_size, impl)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_sum = hidden.new_empty((), dtype=torch.float32)
    logits = hidden.new_empty((n_tokens, vocab) if return_logits else (0,))
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if compute_grad else (0,))
    return loss_sum, logits, grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    hidden, weight, target, ignore_index, _, _, return_logits, compute_grad, _ = inputs
    _, _, grad_hidden, grad_weight = output
    # Unused outputs (grad_hidden, grad_weight, often logits) get None instead of a zero-filled
    # (N, V) or (V, H) tensor.
    ctx.set_materialize_grads(False)
    ctx.compute_grad = compute_grad
    ctx.return_logits = return_logits
    ctx.ignore_index = ignore_index
    saved = (grad_hidden, grad_weight, target) + ((hidden, weight) if return_logits else ())
    ctx.save_for_backward(*saved)


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad * grad_loss`` rounded once to ``grad``'s dtype (grad_loss stays fp32, e.g. 1/count)."""
    return (grad.float() * grad_loss).to(grad.dtype)


def _backward(ctx, grad_loss, grad_logits, _grad_grad_hidden, _grad_grad_weight):
    if not ctx.compute_grad:
        raise RuntimeError(
            "graphopt::linear_cross_entropy was called with compute_grad=False (inference); "
            "call it with compute_grad=True to differentiate it"
        )
    grad_hidden, grad_weight, target, *hidden_weight = ctx.saved_tensors
    d_hidden = d_weight = None
    if grad_loss is not None:
        # All targets ignored: the gradient is exactly 0 whatever grad_loss is, as in eager (where
        # the caller's mean gives grad_loss = 1/0 = inf, and 0 * inf would be NaN).
        any_valid = (target != ctx.ignore_index).any()
        grad_loss = torch.where(any_valid, grad_loss, torch.zeros_like(grad_loss))
        d_hidden = _scale(grad_hidden, grad_loss)
        d_weight = _scale(grad_weight, grad_loss)
    if grad_logits is not None and ctx.return_logits:
        hidden, weight = hidden_weight
        logits_d_hidden, logits_d_weight = torch.ops.graphopt.logits_backward(grad_logits, hidden, weight)
        d_hidden = logits_d_hidden if d_hidden is None else d_hidden + logits_d_hidden
        d_weight = logits_d_weight if d_weight is None else d_weight + logits_d_weight
    return d_hidden, d_weight, None, None, None, None, None, None, None


@torch.library.custom_op("graphopt::logits_backward", mutates_args=())
def logits_backward(
    grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_logits @ weight, grad_logits.T @ hidden)``: the gradient that flows back through the
    returned logits, shapes (N, H) and (V, H).

    Autograd hands a compiled graph a tensor of zeros for an output nobody differentiated, and HF
    returns the logits of every training step. So the op first checks for an all-zero gradient
    (one read of it, one host sync) and then skips the two (N x V x H) matmuls, which would
    otherwise cost as much as the loss's own backward.
    """
    if not bool(grad_logits.any()):
        return hidden.new_zeros(hidden.shape), weight.new_zeros(weight.shape)
    grad_logits = grad_logits.to(hidden.dtype)
    return grad_logits @ weight, grad_logits.t() @ hidden


@logits_backward.register_fake
def _(grad_logits, hidden, weight):
    torch._check(
        grad_logits.shape == (hidden.shape[0], weight.shape[0]),
        lambda: f"grad_logits {tuple(grad_logits.shape)} is not (N, V) = ({hidden.shape[0]}, {weight.shape[0]})",
    )
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


torch.library.register_autograd(
    "graphopt::linear_cross_entropy_fwd", _backward, setup_context=_setup_context
)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    chunk_size: int,
    return_logits: bool,
    compute_grad: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, logits)``: the public op ``graphopt::linear_cross_entropy``.

    Args:
        hidden: (N, H) fp32/bf16/fp16.
        weight: (V, H), same dtype.
        target: (N,) int64 in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value whose token contributes no loss and no gradient.
        softcap: logit soft-capping value (Gemma-2 style), 0 disables.
        chunk_size: tokens per chunk, >= 1 (see ``default_chunk_size``).
        return_logits: also return the (N, V) logits, else an empty (0,) tensor.
        compute_grad: compute gradients during the forward (training); False for inference.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        loss_sum: () fp32, the summed (not averaged) loss.
        logits: (N, V) input dtype, ``F.linear(hidden, weight)``, or (0,).
    """
    loss_sum, logits, _, _ = torch.ops.graphopt.linear_cross_entropy_fwd(
        hidden, weight, target, ignore_index, softcap, chunk_size, return_logits, compute_grad, impl
    )
    return loss_sum, logits


torch.library.define(
    "graphopt::linear_cross_entropy",
    torch.library.infer_schema(linear_cross_entropy, mutates_args=()),
)
torch.library.impl("graphopt::linear_cross_entropy", "CompositeImplicitAutograd")(linear_cross_entropy)
