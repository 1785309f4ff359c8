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

Chunks. ``chunk_size`` tokens at a time; ``chunk_size=0`` lets the op pick per device at run time:
:func:`default_chunk_size` on the CPU (one fp32 (chunk, V) buffer of about 64 MB, at most 256
rows), :func:`gpu_chunk_size` on CUDA (sized for the GEMMs from the SM count and a memory budget:
1024 rows at N=16384, H=2048, V=128256 on an H100/H200).

Memory model. Tokens go through one reused (chunk, V) buffer in the input dtype. When the logits
are not returned, the buffer receives the chunk's logits and then its gradient, in place. When they
are, the matmul writes the chunk's logits straight into the returned tensor and the buffer receives
only the gradient. The ``"torch"`` path adds one fp32 (chunk, V) work buffer for bf16/fp16 inputs
and two for softcap (the upcast and the tanh); fp32 without softcap needs none; the Triton path
needs none. When ``compute_grad``, an fp32 ``grad_hidden`` (N, H) lives too, and, unless
``compute_grad_weight=False``, the fp32 (V, H) weight-gradient accumulator (4 * V * H bytes: 1.05
GB at V=128256, H=2048); the ``_fwd`` op returns both as they are and the backward rounds each
once into the gradient in the input dtype. Extra memory of a bf16 call at that shape on CUDA: the
accumulator 1.05 GB + grad_hidden 134 MB + one 263 MB chunk buffer during the forward; the
accumulator, grad_hidden and the bf16 gradients (525 + 67 MB) at the end of the backward, about
1.8 GB (the 16-bit gradients plus the fp32 accumulators, i.e. 3x the weight gradient, is the
price of eager's accuracy; Liger's 0.69 GB accumulates in bf16). On the CPU, 16-bit inputs add an
fp32 copy of W per call and of each chunk's gradient (torch has no 16-bit GEMM with an fp32
output there). A returned ``logits`` adds the (N, V) output. Nothing of size (V, H) is allocated
per chunk (except on a torch whose ``addmm`` refuses an fp32 ``self`` with 16-bit operands: see
:func:`accumulate_fp32_gemm_`).

Cost model (:func:`linear_cross_entropy_cost`; the Triton path with the weight gradient, no
returned logits), with e bytes per element of the input dtype and ``c = ceil(N / chunk)`` chunks::

    FLOPs   3 GEMMs of 2 N V H                                        (logits, grad_hidden, grad_weight)
    bytes   logits GEMM       c V H e  +  N H e  +  N V e            (W per chunk, hidden, logits written)
            cross-entropy     2 N V e                                (one read, the gradient written; the
                                                                      second pass reads L2)
            grad-hidden GEMM  N V e  +  c V H e  +  N H 4            (grad_hidden written in fp32)
            grad-weight GEMM  N V e  +  N H e  +  (2c - 1) V H 4      (the fp32 accumulator read and written
                                                                      per chunk, the first chunk only writes)
            backward          (V H + N H) (4 + e)                    (both fp32 gradients rounded once)

At N=16384, H=2048, V=128256 bf16, 1024-row chunks (c = 16): 25.8 TFLOP and 72.4 GB, the
grad-weight GEMM's accumulator 32.6 GB of it. :func:`roofline_seconds` (each phase bounded by the
larger of FLOPs / peak and bytes / bandwidth) gives 28.2 ms on an H200 (990 dense bf16 TFLOP/s,
4.8 TB/s) and 31.4 ms on an H100 (3.35 TB/s: its grad-weight GEMM is bandwidth-bound). The design
predicts, with cuBLAS at ~75% of peak on these GEMMs, about 37 ms forward + backward on an H200
(the target is <= 40 ms; not yet measured), and extra memory as above (the gradients, the fp32
accumulator and one chunk buffer). ``examples/bench_linear_cross_entropy.py`` prints these
figures beside the measured time.

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
the input dtype, as eager's backward of ``logits * logit_scale`` does. Both gradient GEMMs write
fp32 (:func:`mm_fp32_`; ``grad_weight`` accumulated across chunks by the GEMM itself,
:func:`accumulate_fp32_gemm_`): exact products of the 16-bit operands, fp32 sums, and one rounding
to the input dtype at the end, after the scaling by the incoming gradient, as eager's single
``dz.T @ hidden`` and ``dz @ weight`` GEMMs accumulate in fp32 and round once. Eager scales dz
before its GEMMs (``dz / count`` rounded to the input dtype), the op after them; and the order of
the fp32 sums differs. fp32 inputs compute exactly what they did before this scheme. Tests bound
the error of the loss and both gradients against float64 by 1.5x eager's, in norm and in max,
over 16 chunks of adversarial bf16 inputs.

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
    """Tokens per chunk on the CPU: one (chunk, V) fp32 buffer of about 64 MB, at most 256 rows.

    Rounded down to a multiple of 16 rows (matmul-friendly), at least 16, at most ``n_tokens``
    (and at least 1). GPUs use :func:`gpu_chunk_size`.
    """
    chunk = min(_MAX_CHUNK_ROWS, max(16, (_CHUNK_BYTES // (4 * vocab)) // 16 * 16))
    return max(1, min(chunk, n_tokens))


# GPU chunks (gpu_chunk_size). The weight-gradient GEMM reads and writes the fp32 (V, H)
# accumulator once per chunk, 8 bytes per element for 2 * rows FLOPs: rows / 4 FLOPs per byte.
# H100/H200 tensor cores need about 990 TFLOP/s / 3.35-4.8 TB/s = 206-296 FLOPs per HBM byte, so
# 1024 rows keep that GEMM compute-bound whatever H is.
_GPU_MIN_ROWS = 1024
# The grad-hidden GEMM (rows, V) @ (V, H) has only rows * H outputs: with at least one 128 x 128
# output tile per SM it occupies every SM without cuBLAS splitting its long V reduction.
_GEMM_TILE_ROWS, _GEMM_TILE_OUTPUTS = 128, 128 * 128
# The chunk buffers' share of device memory, at most.
_GPU_BUFFER_SHARE = 1 / 64


def gpu_chunk_size(n_tokens: int, hidden: int, vocab: int, row_bytes: int, device_properties) -> int:
    """Tokens per chunk on a GPU, from its SM count and memory (a pure function of its arguments).

    Args:
        n_tokens, hidden, vocab: N, H, V of the call.
        row_bytes: bytes the chunk's buffers take per row (V times the bytes per logit of each
            (chunk, V) buffer the path allocates).
        device_properties: anything with ``multi_processor_count`` and ``total_memory`` (bytes),
            e.g. ``torch.cuda.get_device_properties(device)``.

    The rows wanted are the larger of ``_GPU_MIN_ROWS`` (the weight-gradient GEMM stays
    compute-bound) and ``SMs * 128 * 128 / H`` (the grad-hidden GEMM has a 128 x 128 output tile per
    SM), capped so the buffers take at most 1/64 of the device memory (at least 16 rows). The
    tokens are then cut into that many chunks of equal size, rounded up to a multiple of 128 rows
    (whole GEMM tiles; of 16 below 128 rows; never one chunk more), at most ``n_tokens``.

    N=16384, H=2048, V=128256 bf16 on an H100 or H200 (132 SMs): 1056 rows wanted, 16 chunks of
    1024 rows, a 263 MB (1024, V) bf16 buffer.
    """
    fill_rows = -(-device_properties.multi_processor_count * _GEMM_TILE_OUTPUTS // hidden)
    budget_rows = int(device_properties.total_memory * _GPU_BUFFER_SHARE) // max(1, row_bytes)
    rows = max(16, min(max(_GPU_MIN_ROWS, fill_rows), budget_rows))
    n_chunks = -(-n_tokens // rows)
    rows = -(-n_tokens // max(1, n_chunks))
    tile = _GEMM_TILE_ROWS if rows >= _GEMM_TILE_ROWS else 16
    rows = -(-rows // tile) * tile
    return max(1, min(rows, n_tokens))


def auto_chunk_size(
    hidden: torch.Tensor, weight: torch.Tensor, impl: str = "auto", softcap: float = 0.0, scattered: bool = False
) -> int:
    """The chunk size the op picks for ``chunk_size=0``: :func:`gpu_chunk_size` on CUDA (the
    device's properties are cached by torch: no device sync), :func:`default_chunk_size` elsewhere.
    ``scattered``: the logits are returned at ``logits_rows`` (one more (chunk, V) buffer)."""
    use_triton = impl == "triton" or (impl == "auto" and hidden.is_cuda)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    if hidden.device.type != "cuda":
        return default_chunk_size(n_tokens, vocab)
    per_logit = hidden.element_size() * (2 if scattered else 1)
    if not use_triton:  # the torch twin's fp32 work buffers: the upcast, and two for softcap
        per_logit += 4 * ((hidden.dtype != torch.float32) + 2 * (softcap > 0.0))
    return gpu_chunk_size(n_tokens, hidden.shape[1], vocab, vocab * per_logit,
                          torch.cuda.get_device_properties(hidden.device))


def linear_cross_entropy_cost(
    n_tokens: int, hidden: int, vocab: int, element_size: int, chunk_size: int, compute_grad: bool = True
) -> list[dict]:
    """The modelled work of one call of the Triton path, forward + the backward's scaling, per
    phase: ``[{"phase", "flops", "bytes"}, ...]`` (HBM bytes; ``compute_grad_weight`` and no
    returned logits). The formulas are the module docstring's "Cost model"."""
    n, h, v, e = n_tokens, hidden, vocab, element_size
    chunks = -(-n // chunk_size)
    gemm_flops = 2 * n * v * h
    phases = [dict(phase="logits GEMM", flops=gemm_flops, bytes=chunks * v * h * e + n * h * e + n * v * e),
              dict(phase="cross-entropy", flops=0, bytes=(2 if compute_grad else 1) * n * v * e)]
    if compute_grad:
        phases += [
            dict(phase="grad-hidden GEMM", flops=gemm_flops, bytes=n * v * e + chunks * v * h * e + n * h * 4),
            dict(phase="grad-weight GEMM", flops=gemm_flops, bytes=n * v * e + n * h * e + (2 * chunks - 1) * v * h * 4),
            dict(phase="backward scaling", flops=0, bytes=(v * h + n * h) * (4 + e)),
        ]
    return phases


def roofline_seconds(phases: list[dict], flops_per_s: float, bytes_per_s: float) -> float:
    """The time ``phases`` (:func:`linear_cross_entropy_cost`) take at a device's limits: each
    phase as long as the larger of its FLOPs and its bytes take, the phases one after another."""
    return sum(max(p["flops"] / flops_per_s, p["bytes"] / bytes_per_s) for p in phases)


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
    torch._check(chunk_size >= 0, lambda: f"chunk_size must be >= 1, or 0 to pick one per device, got {chunk_size}")
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
        grad_hidden: (N, H) fp32, d loss_sum / d hidden, if ``compute_grad``, else (0,).
        grad_weight: (V, H) fp32, d loss_sum / d weight, if ``compute_grad`` and
            ``compute_grad_weight``, else (0,). The backward rounds both to the input dtype.
    """
    _check_inputs(hidden, weight, target, softcap, chunk_size, logits, impl, logit_scale, logits_rows)
    vocab = weight.shape[0]
    in_range = (target >= 0) & (target < vocab)
    torch._assert_async(
        (in_range | (target == ignore_index)).all(),
        "graphopt::linear_cross_entropy: a target is outside [0, V) and is not ignore_index",
    )
    use_triton = impl == "triton" or (impl == "auto" and hidden.is_cuda)
    if chunk_size == 0:
        chunk_size = auto_chunk_size(hidden, weight, impl, softcap, logits != "none" and logits_rows is not None)
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
    accumulate_=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop of ``graphopt::linear_cross_entropy_fwd`` (same outputs), with the per-chunk
    loss step (:func:`cross_entropy_loss_and_grad_torch` or its Triton twin) chosen by the caller,
    and the weight-gradient accumulation (default :func:`accumulate_fp32_gemm_`) replaceable by
    tests. A plain function, so tests can watch the aten ops it runs.

    On an accelerator it reads nothing back to the host: every branch is on Python values."""
    accumulate_ = accumulate_ or accumulate_fp32_gemm_
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # Outputs must not alias each other, so each absent one is its own (0,) tensor.
    scattered = keep_logits and logits_rows is not None
    if scattered:  # chunks go through their own buffer to their rows of a zeroed output
        out_logits = hidden.new_zeros((logits_len, vocab))
        chunk_out = hidden.new_empty((min(chunk_size, n_tokens), vocab))
    else:
        out_logits = hidden.new_empty((n_tokens, vocab) if keep_logits else (0,))
    # Both gradients in fp32, written by the GEMMs, rounded once in the backward. Where torch has no
    # 16-bit GEMM with an fp32 output (the CPU), the 16-bit operands are upcast exactly: W once per
    # call, each chunk's gradient once for its two GEMMs.
    fp32_out = hidden.dtype == torch.float32 or _gemm_writes_fp32(hidden.device)
    weight32 = weight if fp32_out or not compute_grad else weight.float()
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,), dtype=torch.float32)
    # every element written by the first chunk's GEMM (beta = 0); zeros when there is none
    grad_weight = weight.new_empty(weight.shape if compute_grad_weight else (0,), dtype=torch.float32)
    if compute_grad_weight and n_tokens == 0:
        grad_weight.zero_()
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
            grad = grad if fp32_out else grad.float()
            mm_fp32_(grad_hidden[start:end], grad, weight32)
        if compute_grad_weight:
            accumulate_(grad_weight, grad.t(), hidden_chunk if fp32_out else hidden_chunk.float(), start == 0)
    return loss_sum, out_logits, grad_hidden, grad_weight


def mm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` into fp32 ``out``: fp32 operands, or 16-bit ones through the GEMM with an
    fp32 output (:func:`_gemm_writes_fp32`), fp32 accumulation either way."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def accumulate_fp32_gemm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` if ``first``, else ``acc += a @ b``, accumulated in fp32 ``acc`` by the GEMM
    itself, with no (V, H) temporary.

    fp32 operands (fp32 inputs, or 16-bit ones upcast where torch has no 16-bit GEMM with an fp32
    output, the CPU): ``addmm_``.
    bf16/fp16 operands: cuBLAS with 16-bit inputs and an fp32 C = D (``torch.addmm(...,
    out_dtype=torch.float32, out=acc)``), at the speed of the 16-bit GEMM. Either way the products
    of the 16-bit values are exact and summed in fp32. ``beta = 0`` on the first chunk: ``acc`` may
    hold garbage, which is then never read. A torch whose ``addmm`` refuses the fp32 ``self`` gets
    ``acc += mm(a, b, out_dtype=float32)``: the same sums, through a (V, H) fp32 temporary.
    """
    beta = 0.0 if first else 1.0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif _gemm_writes_fp32(acc.device, "addmm"):
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    elif first:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)
    else:  # a torch whose addmm refuses an fp32 self: the same sums, through a (V, H) fp32 temporary
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))


_FP32_OUT_GEMM: dict = {}


def _gemm_writes_fp32(device: torch.device, op: str = "mm") -> bool:
    """Whether this torch's ``mm`` (``op="mm"``) or ``addmm`` (``"addmm"``, with an fp32 ``self``)
    takes 16-bit operands and writes an fp32 ``out`` on ``device``: ``mm.dtype_out`` /
    ``addmm.dtype_out``, on CUDA and meta, not on the CPU; some releases refuse ``addmm``'s fp32
    ``self``. Probed once per device on 16 x 16 tensors: a refusal raises on the host, no value is
    read back."""
    if (device, op) not in _FP32_OUT_GEMM:
        acc = torch.zeros(16, 16, device=device)
        a = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
        try:
            if op == "mm":
                torch.mm(a, a, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FP32_OUT_GEMM[device, op] = True
        except (RuntimeError, TypeError):
            _FP32_OUT_GEMM[device, op] = False
    return _FP32_OUT_GEMM[device, op]


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
    grad_hidden = hidden.new_empty(hidden.shape if compute_grad else (0,), dtype=torch.float32)
    grad_weight = weight.new_empty(weight.shape if compute_grad and compute_grad_weight else (0,), dtype=torch.float32)
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
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    ctx.scattered = logits_rows is not None and ctx.logits_grad
    saved = (grad_hidden, grad_weight, target) + ((hidden, weight) if ctx.logits_grad else ())
    ctx.save_for_backward(*saved, *((logits_rows,) if ctx.scattered else ()))


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``grad * grad_loss`` (grad_loss stays fp32, e.g. 1/count) rounded once to ``dtype``,
    written straight into the result (no temporary)."""
    return torch.mul(grad, grad_loss, out=grad.new_empty(grad.shape, dtype=dtype))


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
        d_hidden = _scale(grad_hidden, grad_loss, ctx.hidden_dtype)
        d_weight = _scale(grad_weight, grad_loss, ctx.weight_dtype) if ctx.compute_grad_weight else None
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
