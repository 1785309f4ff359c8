"""Fused LM head + cross-entropy: ``graphopt::linear_cross_entropy``, chunked over tokens.

Shapes and dtypes (N tokens, H hidden size, V vocabulary size)::

    hidden  (N, H)  fp32 | bf16 | fp16
    weight  (V, H)  same dtype as hidden (the LM head / tied embedding)
    target  (N,)    int64, values in [0, V) or ignore_index

Per token ``i``::

    z_i    = F.linear(hidden, weight)[i]               matmul in the input dtype, fp32 accumulation
    z_i    = z_i * logit_scale                         in the input dtype, as eager's tensor * float
                                                       rounds (skipped when logit_scale == 1.0)
    z_i    = z_i.float()
    z_i    = softcap * tanh(z_i / softcap)             only if softcap > 0
    loss_i = -log_softmax(z_i)[target_i]               0 where target_i == ignore_index
    loss_sum = sum_i loss_i                            fp32, 0-dim

``logit_scale`` is a constant some families put between the LM head and the loss (Cohere's
``logits * logit_scale``; a model computing ``logits / s`` is ``logit_scale = 1 / s``: bitwise
eager's quotient when ``s`` is a power of two, otherwise possibly one unit in the last place off).

The op returns ``(loss_sum, logits)``. ``logits`` is selected by the ``logits`` argument
(:data:`LOGITS_MODES`):

- ``"none"``: an empty tensor of shape (0,);
- ``"differentiable"``: the full (N, V) scaled logits ``F.linear(hidden, weight) * logit_scale``
  in the input dtype, written chunk by chunk by the matmul the loss uses; a gradient into them
  flows back to hidden and weight;
- ``"detached"``: the same values, marked non-differentiable. The backend's fused-loss rewrite uses
  this and attaches their gradient outside the compiled graph with :func:`attach_logits_grad`:
  AOTAutograd would otherwise hand every backward a zero (N, V) gradient for them.

Each chunk's logits are ``hidden[chunk] @ weight.T``: the same math as the full ``F.linear``, not
always the same bits, since GEMM blocking may depend on the row count (it does for fp32 on some
CPUs, and cuBLAS may pick another kernel for fewer rows). Normalization (``loss_sum / count`` or
``/ num_items_in_batch``) is the caller's, so the op never reads the count back to the host. With
every target ignored, ``loss_sum`` is 0 and the gradients are 0; the caller's mean is then
0/0 = NaN, as in eager.

Memory model. Tokens are processed ``chunk_size`` at a time through one reused (chunk, V) buffer in
the input dtype. When the logits are not returned, the buffer receives the chunk's logits and then
its gradient, in place. When they are, the matmul writes the chunk's logits straight into the
returned tensor and the buffer receives only the gradient. The
``"torch"`` path adds one fp32 (chunk, V) work buffer for bf16/fp16 inputs and two for softcap (the
upcast and the tanh); fp32 without softcap needs none. When ``compute_grad``, ``grad_hidden`` (N, H)
in the input dtype lives too, and, unless ``compute_grad_weight=False``, an fp32 (V, H)
``grad_weight`` accumulator (cast to the input dtype once at the end). A returned ``logits`` adds
the (N, V) output. ``default_chunk_size`` picks a chunk of about 64 MB per (chunk, V) buffer, at
most 256 rows.

Autograd. ``compute_grad=True`` computes ``grad_hidden`` and ``grad_weight`` (d loss_sum / d input)
during the forward, chunk by chunk: per chunk one matmul for the logits, then
``grad_hidden[chunk] = dz @ weight`` and ``grad_weight += dz.T @ hidden[chunk]``, the three matmuls of
an unfused forward + backward. ``compute_grad_weight=False`` (a frozen LM head, e.g. under PEFT
LoRA) skips the last matmul and the (V, H) accumulator: the ``_fwd`` op then returns an empty
``grad_weight`` and the backward gives the weight no gradient (the weight must not require one).
The backward only multiplies the saved gradients by the incoming 0-dim gradient of ``loss_sum``
(no host read) and, for ``"differentiable"`` logits that the caller also differentiates, adds
``(grad_logits * logit_scale) @ weight`` and its ``.T @ hidden``.
``compute_grad=False`` (inference) skips the gradient work; reaching its backward raises.

Precision. The loss is read from the fp32 ``log_softmax`` as eager's ``cross_entropy`` does, and
``dz = exp(log_softmax) - onehot`` is stored in the input dtype before its two matmuls, as eager
autograd does after the ``.float()``; with a ``logit_scale`` it is then multiplied by the scale in
the input dtype, as eager's backward of ``logits * logit_scale`` does. ``grad_weight`` is
accumulated across chunks in fp32 (bf16/fp16: each chunk's matmul result, rounded to the input
dtype, is added to the fp32 accumulator).

Out-of-range targets (not in ``[0, V)`` and not ``ignore_index``) fail ``torch._assert_async``: a
RuntimeError on CPU, a device-side assert on CUDA, as ``F.cross_entropy`` does.

Ops:
    ``graphopt::linear_cross_entropy``     the public op, (loss_sum, logits); a composite that calls
    ``graphopt::linear_cross_entropy_fwd`` the opaque op that also returns (grad_hidden,
                                           grad_weight), so its ``register_autograd`` can save them.
    ``graphopt::logits_backward``          the gradient through the returned logits (its backward).
The public op is ``CompositeImplicitAutograd``: AOTAutograd decomposes it into the ``_fwd`` op, whose
fake impl is its shape function (a composite op takes none of its own). Both take
``logit_scale: float = 1.0`` and ``compute_grad_weight: bool = True`` after ``impl``.

``impl``: ``"torch"`` is the chunked torch path (CPU, also valid on CUDA); ``"triton"`` runs
``graphopt::cross_entropy_loss_and_grad`` (a ``triton_op``) on each chunk; ``"auto"`` picks
``"triton"`` on CUDA, ``"torch"`` elsewhere.
"""

import math

import torch
import torch.nn.functional as F

from graphopt.ops.triton_cross_entropy import cross_entropy_loss_and_grad

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "torch", "triton")

LOGITS_MODES = ("none", "differentiable", "detached")

# Bytes of one (chunk, V) fp32 buffer that default_chunk_size aims for. Small enough that the
# buffers stay a fraction of the (N, V) logits; large enough (128 rows at a 128k vocabulary) that
# the chunk matmuls run at full speed.
_CHUNK_BYTES = 64 * 1024 * 1024
# Rows per chunk at most, whatever the vocabulary. At small vocabularies the byte budget alone would
# make one chunk of every token, whose buffer is as large as the logits: on the CPU such steps were
# intermittently 20% slower as a whole (padded-short preset, docs/benchmarks.md); 256-row chunks
# were not, and their matmuls are as fast.
_MAX_CHUNK_ROWS = 256


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: one (chunk, V) fp32 buffer of about 64 MB, at most 256 rows.

    Rounded down to a multiple of 16 rows (matmul-friendly), at least 16, at most ``n_tokens``
    (and at least 1).
    """
    chunk = min(_MAX_CHUNK_ROWS, max(16, (_CHUNK_BYTES // (4 * vocab)) // 16 * 16))
    return max(1, min(chunk, n_tokens))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """The definition of correct: the summed loss computed the unfused way, as HF does.

    ``hidden`` (N, H), ``weight`` (V, H), ``target`` (N,) int64. Returns the fp32 0-dim loss sum.
    Materializes the full (N, V) logits (and an fp32 copy).
    """
    logits = F.linear(hidden, weight)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    logits = logits.float()
    if softcap > 0.0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


def cross_entropy_loss_and_grad_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    grad: torch.Tensor | None,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    """Pure-torch twin of ``graphopt::cross_entropy_loss_and_grad`` (same contract).

    ``logits`` (rows, V) fp32/bf16/fp16; ``target`` (rows,) int64; ``grad`` None or (rows, V) in
    the dtype of ``logits``, possibly ``logits`` itself. Returns the (rows,) fp32 per-row loss (0
    where ignored) and writes ``d sum(loss) / d logits`` into ``grad`` (0 on ignored rows).

    Computed as eager's ``F.cross_entropy`` does: an fp32 ``log_softmax``, the loss read at the
    target, and ``exp(log_softmax) - onehot`` as the gradient. For fp32 logits without softcap the
    ``log_softmax`` is written straight into ``grad`` (no other buffer); otherwise into the one
    fp32 temporary the upcast or the softcap needs anyway.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    z = logits.float()  # an alias for fp32 logits, never written then (grad may be another buffer)
    tanh_z = None
    if softcap > 0.0:
        tanh_z = (z / softcap).tanh_()
        z = tanh_z * softcap
    if grad is None:
        loss = torch.logsumexp(z, dim=1) - z.gather(1, safe_target).squeeze(1)
        return torch.where(valid, loss, 0.0)
    log_p = grad if grad.dtype == torch.float32 else z  # z is a temporary here: bf16/fp16 upcast
    torch._log_softmax(z, 1, False, out=log_p)
    loss = torch.where(valid, log_p.gather(1, safe_target).squeeze(1).neg(), 0.0)
    dz = log_p.exp_()  # the softmax
    dz.scatter_add_(1, safe_target, valid.to(dz.dtype).neg().unsqueeze(1))
    if tanh_z is not None:
        dz.mul_(tanh_z.square_().neg_().add_(1.0))
    _zero_rows_(dz, ~valid)
    if dz is not grad:
        grad.copy_(dz)
    return loss


def _zero_rows_(x: torch.Tensor, rows: torch.Tensor) -> None:
    """``x[rows] = 0`` for a bool row mask, with no host sync on an accelerator."""
    if x.device.type == "cpu":
        x.index_fill_(0, rows.nonzero().squeeze(1), 0.0)  # touches only the ignored rows
    else:
        x.masked_fill_(rows.unsqueeze(1), 0.0)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    softcap: float,
    chunk_size: int,
    logits: str,
    impl: str,
    logit_scale: float,
    logits_rows: torch.Tensor | None = None,
) -> None:
    """Shape/dtype/argument checks shared by the real and the fake implementation."""
    if logits_rows is not None:
        torch._check(
            logits_rows.dtype == torch.int64 and logits_rows.shape == hidden.shape[:1],
            lambda: f"logits_rows must be (N,) = ({hidden.shape[0]},) int64, got {tuple(logits_rows.shape)} {logits_rows.dtype}",
        )
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
    torch._check(math.isfinite(logit_scale), lambda: f"logit_scale must be finite, got {logit_scale}")
    torch._check(chunk_size >= 1, lambda: f"chunk_size must be >= 1, got {chunk_size}")
    torch._check(logits in LOGITS_MODES, lambda: f"logits must be one of {LOGITS_MODES}, got {logits!r}")
    torch._check(impl in IMPLS, lambda: f"impl must be one of {IMPLS}, got {impl!r}")


@torch.library.custom_op("graphopt::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    chunk_size: int,
    logits: str,
    compute_grad: bool,
    impl: str,
    logit_scale: float = 1.0,
    compute_grad_weight: bool = True,
    logits_rows: torch.Tensor | None = None,
    logits_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked loss (and gradients) of the LM head; see the module docstring for the math.

    Returns:
        loss_sum: () fp32.
        logits: (N, V) input dtype, the scaled logits, unless ``logits == "none"``, else (0,).
            With ``logits_rows`` (N,) int64: (``logits_len``, V) zeros with token i's logits in
            row ``logits_rows[i]`` (the unpadded graph writes them straight to their padded
            positions; rows may repeat, the last write wins).
        grad_hidden: (N, H) input dtype, d loss_sum / d hidden, if ``compute_grad``, else (0,).
        grad_weight: (V, H) input dtype, d loss_sum / d weight, if ``compute_grad`` and
            ``compute_grad_weight``, else (0,).
    """
    _check_inputs(hidden, weight, target, softcap, chunk_size, logits, impl, logit_scale, logits_rows)
    vocab = weight.shape[0]
    in_range = (target >= 0) & (target < vocab)
    torch._assert_async(
        (in_range | (target == ignore_index)).all(),
        "graphopt::linear_cross_entropy: a target is outside [0, V) and is not ignore_index",
    )
    use_triton = impl == "triton" or (impl == "auto" and hidden.is_cuda)
    return _chunked_loss_and_grads(
        hidden, weight, target, ignore_index, softcap, chunk_size, logits != "none", compute_grad,
        compute_grad and compute_grad_weight, logit_scale,
        cross_entropy_loss_and_grad if use_triton else cross_entropy_loss_and_grad_torch,
        logits_rows if logits != "none" else None, logits_len,
    )


def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    chunk_size: int,
    keep_logits: bool,
    compute_grad: bool,
    compute_grad_weight: bool,
    logit_scale: float,
    loss_step,
    logits_rows: torch.Tensor | None = None,
    logits_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop of ``graphopt::linear_cross_entropy_fwd`` (same outputs), with the per-chunk
    loss step (:func:`cross_entropy_loss_and_grad_torch` or its Triton twin) chosen by the caller.
    A plain function, so tests can watch the aten ops it runs."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Outputs must not alias each other, so each absent one is its own (0,) tensor.
    scattered = keep_logits and logits_rows is not None
    if scattered:  # chunks go through their own buffer to their rows of a zeroed output
        out_logits = hidden.new_zeros((logits_len, vocab))
        chunk_out = hidden.new_empty((min(chunk_size, n_tokens), vocab))
    else:
        out_logits = hidden.new_empty((n_tokens, vocab) if keep_logits else (0,))
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,))
    grad_weight_acc = weight.new_zeros(weight.shape, dtype=torch.float32) if compute_grad_weight else None
    # One (chunk, V) buffer for every chunk, so no chunk allocates (and page-faults) its own: the
    # logits chunk when they are not returned (its gradient then overwrites it in place), else the
    # gradient of the returned logits chunk, which must survive.
    buffer = None
    if compute_grad or not keep_logits:
        buffer = hidden.new_empty((min(chunk_size, n_tokens), vocab))
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        hidden_chunk = hidden[start:end]
        if scattered:
            out = chunk_out[: end - start]
        else:
            out = out_logits[start:end] if keep_logits else buffer[: end - start]
        chunk = torch.mm(hidden_chunk, weight.t(), out=out)
        if logit_scale != 1.0:
            chunk.mul_(logit_scale)  # in the input dtype, as eager's logits * logit_scale
        if scattered:
            out_logits.index_copy_(0, logits_rows[start:end], chunk)
        grad = buffer[: end - start] if compute_grad else None
        loss_sum += loss_step(chunk, target[start:end], grad, ignore_index, softcap).sum()
        if compute_grad:
            if logit_scale != 1.0:
                grad.mul_(logit_scale)  # eager's backward of logits * logit_scale, in the input dtype
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if compute_grad_weight and grad.dtype == torch.float32:
            grad_weight_acc.addmm_(grad.t(), hidden_chunk)
        elif compute_grad_weight:  # rounded to the input dtype per chunk, as eager's backward matmul rounds it
            grad_weight_acc += torch.mm(grad.t(), hidden_chunk)
    grad_weight = grad_weight_acc.to(weight.dtype) if compute_grad_weight else weight.new_empty((0,))
    return loss_sum, out_logits, grad_hidden, grad_weight


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, ignore_index, softcap, chunk_size, logits, compute_grad, impl, logit_scale=1.0,
      compute_grad_weight=True, logits_rows=None, logits_len=0):
    _check_inputs(hidden, weight, target, softcap, chunk_size, logits, impl, logit_scale, logits_rows)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_sum = hidden.new_empty((), dtype=torch.float32)
    if logits == "none":
        out_logits = hidden.new_empty((0,))
    else:
        out_logits = hidden.new_empty((n_tokens if logits_rows is None else logits_len, vocab))
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if compute_grad and compute_grad_weight else (0,))
    return loss_sum, out_logits, grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    (hidden, weight, target, ignore_index, _, _, logits_mode, compute_grad, _, logit_scale, compute_grad_weight,
     logits_rows, _) = inputs
    if compute_grad and not compute_grad_weight and weight.requires_grad:
        raise RuntimeError(
            "graphopt::linear_cross_entropy was called with compute_grad_weight=False but the weight "
            "requires grad; pass compute_grad_weight=True, or freeze the weight (requires_grad=False)"
        )
    _, logits, grad_hidden, grad_weight = output
    # grad_hidden and grad_weight are the op's saved work, not values to differentiate; "none" and
    # "detached" logits get no gradient here either, so AOTAutograd passes them no tangent.
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    if logits_mode != "differentiable":
        ctx.mark_non_differentiable(logits)
    # Differentiable logits nobody differentiated get None instead of a zero-filled (N, V) tensor.
    ctx.set_materialize_grads(False)
    ctx.compute_grad = compute_grad
    ctx.compute_grad_weight = compute_grad_weight
    ctx.logits_grad = logits_mode == "differentiable"
    ctx.ignore_index = ignore_index
    ctx.logit_scale = logit_scale
    ctx.scattered = logits_rows is not None and ctx.logits_grad
    saved = (grad_hidden, grad_weight, target) + ((hidden, weight) if ctx.logits_grad else ())
    ctx.save_for_backward(*saved, *((logits_rows,) if ctx.scattered else ()))


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
    if ctx.scattered:  # the logits' gradient comes at their rows of the padded output
        *hidden_weight, rows = hidden_weight
        if grad_logits is not None:
            grad_logits = grad_logits.index_select(0, rows)
    d_hidden = d_weight = None
    if grad_loss is not None:
        # All targets ignored: the gradient is exactly 0 whatever grad_loss is, as in eager (where
        # the caller's mean gives grad_loss = 1/0 = inf, and 0 * inf would be NaN).
        any_valid = (target != ctx.ignore_index).any()
        grad_loss = torch.where(any_valid, grad_loss, torch.zeros_like(grad_loss))
        d_hidden = _scale(grad_hidden, grad_loss)
        d_weight = _scale(grad_weight, grad_loss) if ctx.compute_grad_weight else None
    if grad_logits is not None and ctx.logits_grad:
        hidden, weight = hidden_weight
        logits_d_hidden, logits_d_weight = torch.ops.graphopt.logits_backward(
            grad_logits, hidden, weight, ctx.logit_scale, ctx.compute_grad_weight
        )
        d_hidden = logits_d_hidden if d_hidden is None else d_hidden + logits_d_hidden
        if ctx.compute_grad_weight:
            d_weight = logits_d_weight if d_weight is None else d_weight + logits_d_weight
    return d_hidden, d_weight, None, None, None, None, None, None, None, None, None, None, None


@torch.library.custom_op("graphopt::logits_backward", mutates_args=())
def logits_backward(
    grad_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    logit_scale: float = 1.0,
    compute_grad_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient that flows back through the returned (scaled) logits: with
    ``g = grad_logits * logit_scale`` in the input dtype, ``(g @ weight, g.T @ hidden)``, shapes
    (N, H) and (V, H); the second is an empty (0,) tensor when ``compute_grad_weight`` is False.

    Autograd hands a compiled graph a tensor of zeros for an output nobody differentiated, and HF
    returns the logits of every training step. So the op first checks for an all-zero gradient
    (one read of it, one host sync) and then skips the two (N x V x H) matmuls, which would
    otherwise cost as much as the loss's own backward. The check is ``aminmax`` (vectorized, about
    3x faster than ``any`` on the CPU); a NaN fails it, so NaN gradients still propagate.
    """
    d_weight_shape = weight.shape if compute_grad_weight else (0,)
    if _all_zero(grad_logits):
        return hidden.new_zeros(hidden.shape), weight.new_zeros(d_weight_shape)
    grad_logits = _unscaled_grad(grad_logits.to(hidden.dtype), logit_scale)
    d_weight = grad_logits.t() @ hidden if compute_grad_weight else weight.new_empty(d_weight_shape)
    return grad_logits @ weight, d_weight


def _unscaled_grad(grad_logits: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The gradient w.r.t. the logits before ``* logit_scale``, rounded as eager's backward of it."""
    return grad_logits if logit_scale == 1.0 else grad_logits * logit_scale


def _all_zero(x: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    low, high = x.aminmax()
    return bool((low == 0) & (high == 0))


@logits_backward.register_fake
def _(grad_logits, hidden, weight, logit_scale=1.0, compute_grad_weight=True):
    torch._check(
        grad_logits.shape == (hidden.shape[0], weight.shape[0]),
        lambda: f"grad_logits {tuple(grad_logits.shape)} is not (N, V) = ({hidden.shape[0]}, {weight.shape[0]})",
    )
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape if compute_grad_weight else (0,))


torch.library.register_autograd(
    "graphopt::linear_cross_entropy_fwd", _backward, setup_context=_setup_context
)


class _AttachLogitsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, hidden, weight, logit_scale):
        ctx.save_for_backward(hidden, weight)
        ctx.logit_scale = logit_scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, weight = ctx.saved_tensors
        grad_logits = grad_logits.reshape(hidden.shape[0], weight.shape[0]).to(hidden.dtype)
        grad_logits = _unscaled_grad(grad_logits, ctx.logit_scale)
        d_hidden = grad_logits @ weight if ctx.needs_input_grad[1] else None
        d_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[2] else None
        return None, d_hidden, d_weight, None


def attach_logits_grad(
    logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, *, logit_scale: float = 1.0
) -> torch.Tensor:
    """``logits`` (a view of it) with the gradient of ``logits = (hidden @ weight.T) * logit_scale``
    attached.

    Args:
        logits: (..., V) values of ``(hidden @ weight.T) * logit_scale`` computed without autograd
            (``"detached"`` logits of the op), N * V elements in row-major token order.
        hidden: (N, H), weight: (V, H), as given to the op.
        logit_scale: the op's ``logit_scale``.

    The gradient is its own autograd node, outside any compiled graph: it runs only when a gradient
    reaches the logits, and then computes ``g = grad * logit_scale`` (in the input dtype, as eager's
    backward of the scaling), ``g @ weight`` and ``g.T @ hidden``. A loss-only backward never runs
    it, and nothing allocates a zero (N, V) gradient for the logits.
    """
    return _AttachLogitsGrad.apply(logits, hidden, weight, logit_scale)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    softcap: float,
    chunk_size: int,
    logits: str,
    compute_grad: bool,
    impl: str,
    logit_scale: float = 1.0,
    compute_grad_weight: bool = True,
    logits_rows: torch.Tensor | None = None,
    logits_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, logits)``: the public op ``graphopt::linear_cross_entropy``.

    Args:
        hidden: (N, H) fp32/bf16/fp16.
        weight: (V, H), same dtype.
        target: (N,) int64 in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value whose token contributes no loss and no gradient.
        softcap: logit soft-capping value (Gemma-2 style), 0 disables.
        chunk_size: tokens per chunk, >= 1 (see ``default_chunk_size``).
        logits: ``"none"`` (an empty (0,) tensor), ``"differentiable"`` or ``"detached"`` (N, V)
            logits; see the module docstring.
        compute_grad: compute gradients during the forward (training); False for inference.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``.
        logit_scale: constant the logits are multiplied by (in the input dtype) before the fp32
            upcast; 1.0 (the default) skips it.
        compute_grad_weight: False for a frozen weight (``requires_grad=False``): no weight
            gradient is computed (no (V, H) accumulator, no ``dz.T @ hidden`` matmul).
        logits_rows, logits_len: with ``logits_rows`` (N,) int64, the logits come back as
            (``logits_len``, V) zeros holding token i's logits in row ``logits_rows[i]``
            (graphopt's unpadded graphs write them to their padded positions this way).

    Returns:
        loss_sum: () fp32, the summed (not averaged) loss.
        logits: (N, V) input dtype, ``F.linear(hidden, weight) * logit_scale``, or (0,).
    """
    loss_sum, out_logits, _, _ = torch.ops.graphopt.linear_cross_entropy_fwd(
        hidden, weight, target, ignore_index, softcap, chunk_size, logits, compute_grad, impl, logit_scale,
        compute_grad_weight, logits_rows, logits_len,
    )
    return loss_sum, out_logits


torch.library.define(
    "graphopt::linear_cross_entropy",
    torch.library.infer_schema(linear_cross_entropy, mutates_args=()),
)
torch.library.impl("graphopt::linear_cross_entropy", "CompositeImplicitAutograd")(linear_cross_entropy)
