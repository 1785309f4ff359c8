"""graphopt::linear_cross_entropy against its pure-torch reference (F.linear + F.cross_entropy).

Shapes stay small: the Triton path runs on the ``triton_device`` fixture's device, which is the CPU
in Triton's interpreter where there is no GPU. GPU-sized shapes are in test_cuda_kernels.py.

The op's chunk matmuls and a full ``F.linear`` are different computations (their GEMM blocking may
differ, and does on some CPUs): they are compared with the tolerance table, never bitwise.
"""

import types

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphopt.ops.linear_cross_entropy import (
    _chunked_loss_and_grads,
    attach_logits_grad,
    accumulate_fp32_gemm_,
    cross_entropy_loss_and_grad_torch,
    default_chunk_size,
    gpu_chunk_size,
    linear_cross_entropy_cost,
    linear_cross_entropy_reference,
    roofline_seconds,
)
from graphopt.ops.triton_cross_entropy import MAX_BLOCK_V, launch_config, resident_programs
from tests.support.harness import count_attached_logits_backward
from tests.support.tolerances import tol

IGNORE = -100
op = torch.ops.graphopt.linear_cross_entropy
fwd_op = torch.ops.graphopt.linear_cross_entropy_fwd
kernel_op = torch.ops.graphopt.cross_entropy_loss_and_grad


def make_inputs(n, h, v, dtype=torch.float32, ignore_frac=0.25, seed=0, device="cpu"):
    """hidden (n, h), weight (v, h) with logits of std ~2, target (n,) with ~ignore_frac ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), target.to(device)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def reference_grads(hidden, weight, target, softcap, upcast=False):
    """Loss sum and (grad_hidden, grad_weight) of the reference; ``upcast`` runs it in fp32."""
    h, w = leaves(hidden.float() if upcast else hidden, weight.float() if upcast else weight)
    loss = linear_cross_entropy_reference(h, w, target, IGNORE, softcap)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def op_grads(hidden, weight, target, softcap, chunk_size, impl, logits="none"):
    h, w = leaves(hidden, weight)
    loss, logits = op(h, w, target, IGNORE, softcap, chunk_size, logits, True, impl)
    loss.backward()
    return loss.detach(), h.grad, w.grad, logits.detach()


def assert_matches_reference(got, want, dtype):
    loss, grad_hidden, grad_weight = got[:3]
    ref_loss, ref_grad_hidden, ref_grad_weight = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, **tol(dtype))
    torch.testing.assert_close(grad_hidden.float(), ref_grad_hidden.float(), **tol(dtype, "grad"))
    torch.testing.assert_close(grad_weight.float(), ref_grad_weight.float(), **tol(dtype, "grad"))


# --- torch path --------------------------------------------------------------------------------


@pytest.mark.parametrize("logits", ["none", "detached"])
@pytest.mark.parametrize("chunk_size", [1, 10, 37, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "softcap"])
def test_torch_path_matches_reference(chunk_size, softcap, logits):
    hidden, weight, target = make_inputs(37, 24, 1001)
    got = op_grads(hidden, weight, target, softcap, chunk_size, "torch", logits)
    assert_matches_reference(got, reference_grads(hidden, weight, target, softcap), torch.float32)


@pytest.mark.parametrize("logits", ["none", "differentiable", "detached"])
def test_logits_modes(logits):
    hidden, weight, target = make_inputs(37, 24, 1001)
    loss, _, _, out = op_grads(hidden, weight, target, 0.0, 10, "torch", logits)
    torch.testing.assert_close(loss, reference_grads(hidden, weight, target, 0.0)[0], **tol(torch.float32))
    if logits == "none":
        assert out.shape == (0,)
    else:
        torch.testing.assert_close(out, F.linear(hidden, weight), **tol(torch.float32))
    h, w = leaves(hidden, weight)
    assert op(h, w, target, IGNORE, 0.0, 10, logits, True, "torch")[1].requires_grad == (logits == "differentiable")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_grad_into_logits_and_loss(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(19, 16, 301, device=device)
    probe = torch.randn(19, 301, generator=torch.Generator().manual_seed(1)).to(device)
    count = (target != IGNORE).sum()

    def objective(loss_sum, logits):
        return loss_sum / count + (logits * probe).sum()

    h, w = leaves(hidden, weight)
    objective(*op(h, w, target, IGNORE, 0.0, 7, "differentiable", True, impl)).backward()
    rh, rw = leaves(hidden, weight)
    objective(linear_cross_entropy_reference(rh, rw, target, IGNORE, 0.0), F.linear(rh, rw)).backward()
    torch.testing.assert_close(h.grad, rh.grad, **tol(torch.float32, "grad"))
    torch.testing.assert_close(w.grad, rw.grad, **tol(torch.float32, "grad"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("logits", ["detached", "differentiable"])
def test_logits_written_to_their_rows(impl, logits, triton_device):
    """``logits_rows``: token i's logits land in row ``logits_rows[i]`` of a zeroed
    (``logits_len``, V) output (the unpadded graph's padded positions; a repeated row, here the
    last, takes the bucket's extra tokens), and the gradient through the rows is the gradient of
    that scatter."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(19, 16, 301, device=device)
    rows = torch.cat((torch.randperm(30, generator=torch.Generator().manual_seed(2))[:16], torch.full((3,), 30))).to(device)
    probe = torch.randn(30, 301, generator=torch.Generator().manual_seed(1)).to(device)
    count = (target != IGNORE).sum()
    h, w = leaves(hidden, weight)
    loss_sum, out = op(h, w, target, IGNORE, 0.0, 7, logits, True, impl, logits_rows=rows, logits_len=31)
    assert out.shape == (31, 301)
    rh, rw = leaves(hidden, weight)
    expected = torch.zeros(31, 301, device=device).index_copy(0, rows[:16], F.linear(rh, rw)[:16])
    torch.testing.assert_close(out[:30], expected[:30], **tol(torch.float32))
    if logits == "differentiable":
        (loss_sum / count + (out[:30] * probe).sum()).backward()
        (linear_cross_entropy_reference(rh, rw, target, IGNORE, 0.0) / count + (expected[:30] * probe).sum()).backward()
        torch.testing.assert_close(h.grad, rh.grad, **tol(torch.float32, "grad"))
        torch.testing.assert_close(w.grad, rw.grad, **tol(torch.float32, "grad"))


@pytest.mark.parametrize("through_logits", [True, False], ids=["loss_and_logits", "loss_only"])
def test_attach_logits_grad(monkeypatch, through_logits):
    """Detached logits + attach_logits_grad differentiate like the unfused reference; a loss-only
    backward never runs the attached node."""
    hidden, weight, target = make_inputs(19, 16, 301)
    probe = torch.randn(19, 301, generator=torch.Generator().manual_seed(1))
    count = (target != IGNORE).sum()
    calls = count_attached_logits_backward(monkeypatch)

    def objective(loss_sum, logits):
        return loss_sum / count + ((logits * probe).sum() if through_logits else 0.0)

    h, w = leaves(hidden, weight)
    loss_sum, logits = op(h, w, target, IGNORE, 0.0, 7, "detached", True, "torch")
    assert not logits.requires_grad
    attached = attach_logits_grad(logits.unflatten(0, (1, 19)), h, w).flatten(0, 1)
    # The same buffer, unchanged: attaching the gradient copies and recomputes nothing.
    assert attached.data_ptr() == logits.data_ptr() and torch.equal(attached, logits)
    torch.testing.assert_close(attached, F.linear(hidden, weight), **tol(torch.float32))
    objective(loss_sum, attached).backward()
    rh, rw = leaves(hidden, weight)
    objective(linear_cross_entropy_reference(rh, rw, target, IGNORE, 0.0), F.linear(rh, rw)).backward()
    torch.testing.assert_close(h.grad, rh.grad, **tol(torch.float32, "grad"))
    torch.testing.assert_close(w.grad, rw.grad, **tol(torch.float32, "grad"))
    assert len(calls) == int(through_logits)


def test_attach_logits_grad_frozen_weight():
    hidden, weight, _ = make_inputs(5, 4, 9)
    h = hidden.clone().requires_grad_(True)
    attach_logits_grad(F.linear(hidden, weight), h, weight).sum().backward()
    torch.testing.assert_close(h.grad, torch.ones(5, 9) @ weight)
    assert weight.grad is None


# --- logit_scale: logits * s in the input dtype before the loss (Cohere; 1/s for a divisor) --------


def eager_scaled_step(hidden, weight, target, softcap, logit_scale, probe, divisor=None):
    """Eager autograd of ``F.linear * logit_scale`` (or ``F.linear / divisor``) -> ``.float()`` ->
    softcap -> summed CE, plus ``(logits * probe).sum()`` if a probe is given. Returns (loss_sum,
    grad_hidden, grad_weight, logits); the gradients are None for inputs that do not require grad."""
    logits = F.linear(hidden, weight)
    logits = logits * logit_scale if divisor is None else logits / divisor
    z = logits.float()
    if softcap > 0.0:
        z = softcap * torch.tanh(z / softcap)
    loss_sum = F.cross_entropy(z, target, ignore_index=IGNORE, reduction="sum")
    objective = loss_sum / (target != IGNORE).sum()
    if probe is not None:
        objective = objective + (logits.float() * probe).sum()
    objective.backward()
    return loss_sum.detach(), hidden.grad, weight.grad, logits.detach()


def op_scaled_step(hidden, weight, target, softcap, logit_scale, probe, logits_mode, impl, **features):
    """The same step through the op; ``"detached"`` logits get their gradient from
    ``attach_logits_grad``, as the backend attaches it."""
    loss_sum, logits = op(hidden, weight, target, IGNORE, softcap, 7, logits_mode, True, impl, logit_scale, **features)
    if logits_mode == "detached":
        logits = attach_logits_grad(logits, hidden, weight, logit_scale=logit_scale)
    objective = loss_sum / (target != IGNORE).sum()
    if probe is not None:
        objective = objective + (logits.float() * probe).sum()
    objective.backward()
    return loss_sum.detach(), hidden.grad, weight.grad, logits.detach()


def assert_steps_close(got, want, dtype):
    for name, g, w in zip(("loss_sum", "grad_hidden", "grad_weight", "logits"), got, want):
        assert (g is None) == (w is None), f"{name}: {g} vs {w}"
        if g is not None:
            kind = "grad" if name.startswith("grad") else "fwd"
            torch.testing.assert_close(g.float(), w.float(), **tol(dtype, kind), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("logits_mode", ["none", "differentiable", "detached"])
@pytest.mark.parametrize(
    "logit_scale, divisor", [(0.0625, None), (1 / 0.0625, 0.0625)], ids=["times_0.0625", "divided_by_0.0625"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logit_scale_matches_eager(impl, dtype, logit_scale, divisor, logits_mode, triton_device):
    """Loss, gradients (through the loss and, if returned, through the scaled logits) and the
    returned logits match eager autograd of ``F.linear(h, W) * logit_scale``, or of
    ``F.linear(h, W) / divisor`` (Granite-like) with ``logit_scale = 1 / divisor``."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(19, 16, 301, dtype, device=device)
    probe = None
    if logits_mode != "none":
        probe = torch.randn(19, 301, generator=torch.Generator().manual_seed(1)).to(device)
    want = eager_scaled_step(*leaves(hidden, weight), target, 0.0, logit_scale, probe, divisor)
    got = op_scaled_step(*leaves(hidden, weight), target, 0.0, logit_scale, probe, logits_mode, impl)
    if logits_mode == "none":
        assert got[3].shape == (0,)
        got, want = got[:3], want[:3]
    assert_steps_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logit_scale_with_softcap_matches_eager(impl, dtype, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(19, 16, 301, dtype, device=device)
    want = eager_scaled_step(*leaves(hidden, weight), target, 5.0, 0.25, None)
    got = op_scaled_step(*leaves(hidden, weight), target, 5.0, 0.25, None, "none", impl)
    assert_steps_close(got[:3], want[:3], dtype)


def test_logit_scale_must_be_finite():
    with pytest.raises(RuntimeError, match="logit_scale must be finite"):
        op(*make_inputs(6, 8, 51), IGNORE, 0.0, 4, "none", True, "torch", float("inf"))


# --- compute_grad_weight=False: a frozen LM head (PEFT LoRA) ----------------------------------------


@pytest.mark.parametrize("logits_mode", ["none", "differentiable"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_weight_matches_eager(impl, logits_mode, triton_device):
    """With a frozen weight the hidden gradient is eager's and the weight gets none."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(19, 16, 301, device=device)
    probe = None
    if logits_mode != "none":
        probe = torch.randn(19, 301, generator=torch.Generator().manual_seed(1)).to(device)
    (h,) = leaves(hidden)
    want = eager_scaled_step(h, weight, target, 0.0, 0.5, probe)
    (h,) = leaves(hidden)
    got = op_scaled_step(h, weight, target, 0.0, 0.5, probe, logits_mode, impl, compute_grad_weight=False)
    assert got[2] is None and want[2] is None
    if logits_mode == "none":
        got, want = got[:3], want[:3]
    assert_steps_close(got, want, torch.float32)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor each aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("compute_grad_weight", [True, False])
def test_frozen_weight_skips_the_weight_gradient_work(compute_grad_weight):
    """``compute_grad_weight=False`` allocates no (V, H) accumulator and runs no ``dz.T @ hidden``:
    no aten op of the chunk loop returns a (V, H) tensor (with True, some do), and the saved weight
    gradient the ``_fwd`` op returns is empty."""
    hidden, weight, target = make_inputs(13, 8, 51)
    vocab_by_hidden = tuple(weight.shape)
    with OutputShapes() as recorded:
        outputs = _chunked_loss_and_grads(
            hidden, weight, target, IGNORE, 0.0, 5, True, True, compute_grad_weight, 0.5,
            cross_entropy_loss_and_grad_torch,
        )
    assert (vocab_by_hidden in recorded.shapes) == compute_grad_weight
    *_, grad_weight = fwd_op(hidden, weight, target, IGNORE, 0.0, 5, "none", True, "torch", 0.5, compute_grad_weight)
    assert grad_weight.shape == (vocab_by_hidden if compute_grad_weight else (0,))
    torch.testing.assert_close(grad_weight, outputs[3], **tol(torch.float32, "grad"))
    d_hidden, d_weight = torch.ops.graphopt.logits_backward(
        torch.ones(13, 51), hidden, weight, 0.5, compute_grad_weight
    )
    assert d_weight.shape == (vocab_by_hidden if compute_grad_weight else (0,))
    torch.testing.assert_close(d_hidden, (torch.ones(13, 51) * 0.5) @ weight, **tol(torch.float32, "grad"))


def test_frozen_weight_flag_with_a_trainable_weight_raises():
    h, w = leaves(*make_inputs(6, 8, 51)[:2])
    target = make_inputs(6, 8, 51)[2]
    with pytest.raises(RuntimeError, match="compute_grad_weight=False but the weight requires grad"):
        op(h, w, target, IGNORE, 0.0, 4, "none", True, "torch", compute_grad_weight=False)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_ignored(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, _ = make_inputs(9, 8, 101, device=device)
    target = torch.full((9,), IGNORE, device=device)
    h, w = leaves(hidden, weight)
    loss_sum, _ = op(h, w, target, IGNORE, 0.0, 4, "none", True, impl)
    mean = loss_sum / (target != IGNORE).sum()
    mean.backward()
    assert loss_sum.item() == 0.0
    eager_mean = F.cross_entropy(F.linear(hidden, weight), target, ignore_index=IGNORE)
    assert mean.isnan() and eager_mean.isnan()
    # d mean / d loss_sum = 1/0 = inf, yet the gradients are exactly 0, as in eager.
    assert not h.grad.any() and not w.grad.any()
    rh, rw = leaves(hidden, weight)
    F.cross_entropy(F.linear(rh, rw), target, ignore_index=IGNORE).backward()
    assert not rh.grad.any() and not rw.grad.any()


def test_vocab_above_128k():
    # Chunks of 16 and 8 rows. With fewer than 4 rows an fp32 GEMM may take another BLAS path: on
    # an AMD EPYC with MKL, such a (3, 128256) @ (128256, 16) product sums its dot products with
    # about 100x the error of a larger one (1e-4 relative), the BLAS's rounding, not the op's.
    hidden, weight, target = make_inputs(40, 16, 128256)
    got = op_grads(hidden, weight, target, 0.0, 16, "torch")
    assert_matches_reference(got, reference_grads(hidden, weight, target, 0.0), torch.float32)


def test_compute_grad_false_forward_only():
    hidden, weight, target = make_inputs(13, 8, 51)
    h, w = leaves(hidden, weight)
    loss, logits = op(h, w, target, IGNORE, 0.0, 5, "differentiable", False, "torch")
    torch.testing.assert_close(loss, reference_grads(hidden, weight, target, 0.0)[0], **tol(torch.float32))
    torch.testing.assert_close(logits, F.linear(hidden, weight), **tol(torch.float32))
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_out_of_range_target_raises():
    hidden, weight, target = make_inputs(6, 8, 51)
    target[2] = 51
    with pytest.raises(RuntimeError, match=r"outside \[0, V\)"):
        op(hidden, weight, target, IGNORE, 0.0, 4, "none", True, "torch")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, t: (h, w[:, :-1], t), "disagree on H"),
        (lambda h, w, t: (h, w, t.int()), "target must be int64"),
        (lambda h, w, t: (h, w.double(), t), "weight dtype"),
        (lambda h, w, t: (h, w, t[:-1]), r"target must have shape \(N,\)"),
    ],
    ids=["hidden_size", "target_dtype", "weight_dtype", "target_shape"],
)
def test_invalid_inputs_raise(change, message):
    args = change(*make_inputs(6, 8, 51))
    with pytest.raises(RuntimeError, match=message):
        op(*args, IGNORE, 0.0, 4, "none", True, "torch")
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        op(*(mode.from_tensor(a) for a in args), IGNORE, 0.0, 4, "none", True, "torch")


def test_unknown_logits_mode_raises():
    with pytest.raises(RuntimeError, match="logits must be one of"):
        op(*make_inputs(6, 8, 51), IGNORE, 0.0, 4, "kept", True, "torch")


def test_default_chunk_size():
    chunk = default_chunk_size(100_000, 128256)
    assert chunk == 128 and 128256 * 4 * chunk <= 64 * 2**20
    assert default_chunk_size(5, 128256) == 5
    assert default_chunk_size(10_000, 10**8) == 16
    assert default_chunk_size(10_000, 8000) == 256  # the row cap, not the byte budget (2096 rows)


H100 = types.SimpleNamespace(multi_processor_count=132, total_memory=80 * 2**30)
H200 = types.SimpleNamespace(multi_processor_count=132, total_memory=141 * 10**9)
A100 = types.SimpleNamespace(multi_processor_count=108, total_memory=80 * 2**30)


def test_gpu_chunk_size_at_the_llama3_shape():
    """About 1024 rows at N=16384, H=2048, V=128256 bf16 on an H100 or H200: 16 equal chunks."""
    for props in (H100, H200):
        assert gpu_chunk_size(16384, 2048, 128256, 128256 * 2, props) == 1024
    # 108 SMs want 864 rows (a 128 x 128 grad-hidden tile per SM); the 1024-row floor holds
    assert gpu_chunk_size(16384, 2048, 128256, 128256 * 2, A100) == 1024


@pytest.mark.parametrize(
    "n_tokens, hidden, vocab, row_bytes, props, want",
    [
        (16384, 4096, 128256, 2 * 128256, H100, 1024),  # wide H: the weight-gradient GEMM's floor
        (16384, 1024, 151936, 2 * 151936, H100, 2048),  # narrow H: 2112 rows for 132 tiles, 8 chunks
        (20000, 2048, 128256, 2 * 128256, H100, 1152),  # 19 chunks of 1053 rows -> whole tiles: 18 chunks
        (1000, 2048, 128256, 2 * 128256, H100, 1000),  # fewer tokens than a chunk: one chunk
        (100, 2048, 128256, 2 * 128256, H100, 100),
        # the memory budget: 16 GiB / 64 over 512 KiB rows is 512 rows (32 chunks)
        (16384, 2048, 262144, 2 * 262144, types.SimpleNamespace(multi_processor_count=132, total_memory=16 * 2**30),
         512),
    ],
)
def test_gpu_chunk_size_rule(n_tokens, hidden, vocab, row_bytes, props, want):
    rows = gpu_chunk_size(n_tokens, hidden, vocab, row_bytes, props)
    assert rows == want
    assert rows == n_tokens or rows % 128 == 0
    assert rows * row_bytes <= props.total_memory / 64 * 1.25  # the budget, up to rounding to whole tiles


def test_chunk_size_zero_picks_the_device_default():
    """``chunk_size=0``: the op cuts the chunks itself (on the CPU, ``default_chunk_size``), the same
    computation as passing that size."""
    hidden, weight, target = make_inputs(300, 8, 51)
    assert default_chunk_size(300, 51) == 256
    got = op_grads(hidden, weight, target, 0.0, 0, "torch")
    want = op_grads(hidden, weight, target, 0.0, 256, "torch")
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)


def test_cost_model_at_the_llama3_shape():
    """The module docstring's figures: 25.8 TFLOP, 72.4 GB, 28.2 ms (H200) and 31.4 ms (H100)."""
    phases = linear_cross_entropy_cost(16384, 2048, 128256, 2, 1024)
    assert round(sum(p["flops"] for p in phases) / 1e12, 1) == 25.8
    assert round(sum(p["bytes"] for p in phases) / 1e9, 1) == 72.4
    assert round(roofline_seconds(phases, 990e12, 4.8e12) * 1e3, 1) == 28.2
    assert round(roofline_seconds(phases, 990e12, 3.35e12) * 1e3, 1) == 31.4
    forward_only = linear_cross_entropy_cost(16384, 2048, 128256, 2, 1024, compute_grad=False)
    assert sum(p["flops"] for p in forward_only) * 3 == sum(p["flops"] for p in phases)


# --- Accuracy of the chunked gradients against float64 ----------------------------------------------


def adversarial_inputs(n, h, v, seed=0):
    """bf16 inputs that stress the chunked accumulation: hidden states of large magnitude with a
    common offset (so every chunk adds to the weight gradient with the same sign), 60% ignored rows,
    and near-tie logits (every other weight row a copy of its neighbour, so pairs of logits are equal)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * 4 + 4
    weight = torch.randn(v, h, generator=gen) * (0.5 / h**0.5)
    weight[1::2] = weight[0::2][: v // 2]
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.6] = IGNORE
    return hidden.bfloat16(), weight.bfloat16(), target


def mean_loss_grads(loss_fn, hidden, weight, target, dtype):
    """(mean loss, d hidden, d weight) of ``loss_fn(h, w) -> summed loss`` in ``dtype``."""
    h, w = leaves(hidden.to(dtype), weight.to(dtype))
    loss = loss_fn(h, w) / (target != IGNORE).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def errors_against(got, want):
    """Relative Frobenius and relative max error of each of (loss, d hidden, d weight)."""
    out = []
    for g, w in zip(got, want):
        diff = g.double() - w
        out.append((float(diff.norm() / w.norm()), float(diff.abs().max() / w.abs().max())))
    return out


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.cuda)])
def test_chunked_gradients_keep_eagers_accuracy(impl, seed, triton_device):
    """16 chunks of adversarial bf16 inputs: the loss, d hidden and d weight of the op are within
    1.5x the error of eager (F.linear + .float() + F.cross_entropy in bf16: one GEMM per gradient)
    against float64, in norm and in max. A weight gradient accumulated in bf16 in place (as Liger
    does) is not: the test tells the two apart.

    The Triton path runs on a GPU only: triton 3.9's interpreter truncates fp32 -> bf16 stores
    instead of rounding them to nearest (every bf16 gradient the interpreted kernel writes equals
    its fp32 value truncated), which alone costs about 1.7x eager's error; compiled kernels round
    to nearest. Its agreement with the torch twin is test_kernel_matches_torch_twin's."""
    device = triton_device if impl == "triton" else torch.device("cpu")
    n, h, v, chunk = 16 * 64, 64, 3001, 64
    hidden, weight, target = (t.to(device) for t in adversarial_inputs(n, h, v, seed))

    def reference(hh, ww):
        return F.cross_entropy(F.linear(hh, ww).float(), target, ignore_index=IGNORE, reduction="sum")

    def fused(hh, ww):
        return op(hh, ww, target, IGNORE, 0.0, chunk, "none", True, impl)[0]

    exact = mean_loss_grads(reference, hidden, weight, target, torch.float64)
    eager = errors_against(mean_loss_grads(reference, hidden, weight, target, torch.bfloat16), exact)
    fused_errors = errors_against(mean_loss_grads(fused, hidden, weight, target, torch.bfloat16), exact)
    for name, got, bound in zip(("loss", "d hidden", "d weight"), fused_errors, eager):
        assert got[0] <= 1.5 * bound[0] and got[1] <= 1.5 * bound[1], (name, got, bound)

    def bf16_in_place(acc, a, b, first):  # Liger's accumulation: the running sum rounded per chunk
        acc.copy_(acc.bfloat16().addmm_(a.bfloat16(), b.bfloat16(), beta=0.0 if first else 1.0))

    if impl == "torch":
        *_, grad_weight = _chunked_loss_and_grads(
            hidden, weight, target, IGNORE, 0.0, chunk, False, True, True, 1.0, cross_entropy_loss_and_grad_torch,
            accumulate_=bf16_in_place,
        )
        liger = (grad_weight / (target != IGNORE).sum()).bfloat16()
        liger_error = errors_against([liger], [exact[2]])[0]
        assert liger_error[0] > 1.5 * eager[2][0], (liger_error, eager[2])


def test_fp32_gemm_accumulation_is_the_single_gemm():
    """``accumulate_fp32_gemm_`` over chunks (of bf16 values, upcast as the CPU path does) is one
    GEMM's sum in another order, and its first chunk never reads the accumulator (garbage there)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 16 * 8, generator=gen).bfloat16().float()
    b = torch.randn(16 * 8, 24, generator=gen).bfloat16().float()
    acc = torch.full((40, 24), float("nan"))
    for start in range(0, a.shape[1], 8):
        accumulate_fp32_gemm_(acc, a[:, start:start + 8], b[start:start + 8], start == 0)
    torch.testing.assert_close(acc, a @ b, **tol(torch.float32))


def test_chunk_loop_reads_nothing_back_to_the_host():
    """The chunk loop runs on meta tensors, which hold no values: no ``.item()``, no branch on a
    device value, no ``nonzero`` (on an accelerator, each would be a host sync). The 16-bit weight
    gradient goes through the fp32-output GEMM there, as on CUDA."""
    hidden = torch.empty(40, 16, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(100, 16, dtype=torch.bfloat16, device="meta")
    target = torch.empty(40, dtype=torch.int64, device="meta")
    loss_sum, _, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, target, IGNORE, 0.0, 8, False, True, True, 1.0, cross_entropy_loss_and_grad_torch
    )
    assert grad_weight.dtype == torch.float32 and grad_weight.shape == (100, 16)
    assert grad_hidden.shape == (40, 16) and loss_sum.shape == ()


def test_weight_gradient_without_an_accumulating_fp32_gemm(monkeypatch):
    """A torch whose ``addmm`` refuses an fp32 ``self`` with 16-bit operands (some releases) still
    gets an fp32 weight gradient from the 16-bit GEMM, through ``mm(out_dtype=float32)`` and an add
    (meta tensors: the GEMMs' dtype contract only)."""
    import graphopt.ops.linear_cross_entropy as module

    monkeypatch.setitem(module._FP32_OUT_GEMM, (torch.device("meta"), "addmm"), False)
    acc = torch.empty(100, 16, device="meta")
    a = torch.empty(100, 8, dtype=torch.bfloat16, device="meta")
    b = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    for first in (True, False):
        accumulate_fp32_gemm_(acc, a, b, first)
    assert acc.dtype == torch.float32


def test_launch_config_and_grid():
    assert launch_config(1001) == dict(SINGLE_PASS=True, BLOCK_V=1024, num_warps=4)
    assert launch_config(MAX_BLOCK_V) == dict(SINGLE_PASS=True, BLOCK_V=MAX_BLOCK_V, num_warps=16)
    assert launch_config(128256) == dict(SINGLE_PASS=False, BLOCK_V=MAX_BLOCK_V, num_warps=16)
    l2 = 50 * 2**20
    assert resident_programs(1024, 128256 * 2, 132, l2) == 153  # 39.2 MB of rows in flight
    assert resident_programs(1024, 262144 * 2, 132, l2) == 132  # never fewer programs than SMs
    assert resident_programs(100, 128256 * 2, 132, l2) == 100


# --- Triton kernel (on triton_device: CUDA, or the CPU in the interpreter) ----------------------


# --- Triton kernel (on triton_device: CUDA, or the CPU in the interpreter) ----------------------


@pytest.mark.parametrize("vocab", [1001, 2 * MAX_BLOCK_V + 809], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize("grad", ["separate", "in_place", "none"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_torch_twin(dtype, softcap, grad, vocab, triton_device):
    """The kernel and its torch twin agree on the loss and the gradient, written into a separate
    buffer (the logits are left intact) or in place: a row in one partial block (one pass), and
    three vocabulary blocks, the last one partial (two passes). In the interpreter two programs
    loop over the six rows (the persistent grid)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, vocab, generator=gen) * 3).to(triton_device, dtype)
    target = torch.randint(0, vocab, (6,), generator=gen).to(triton_device)
    target[[1, 4]] = IGNORE
    results = []
    for fn in (kernel_op, cross_entropy_loss_and_grad_torch):
        x = logits.clone()
        out = {"separate": torch.full_like(x, float("nan")), "in_place": x, "none": None}[grad]
        loss = fn(x, target, out, IGNORE, softcap)
        assert loss[[1, 4]].eq(0).all()
        if grad != "in_place":
            assert torch.equal(x, logits)
        if out is not None:
            assert out[[1, 4]].eq(0).all()
        results.append((loss, out))
    (loss, out), (want_loss, want_out) = results
    torch.testing.assert_close(loss, want_loss, **tol(torch.float32))
    if out is not None:
        torch.testing.assert_close(out.float(), want_out.float(), **tol(dtype, "grad"))


def test_torch_twin_gradient_is_eagers():
    """The twin's gradient is d sum(cross_entropy) / d logits computed by eager autograd."""
    logits, target = torch.randn(7, 301) * 4, torch.tensor([0, 300, IGNORE, 5, 5, IGNORE, 17])
    x = logits.clone().requires_grad_(True)
    want_loss = F.cross_entropy(x, target, ignore_index=IGNORE, reduction="none")
    want_loss.sum().backward()
    grad = torch.empty_like(logits)
    loss = cross_entropy_loss_and_grad_torch(logits, target, grad, IGNORE, 0.0)
    # Bitwise: both read the loss from the same aten log_softmax of the same tensor.
    torch.testing.assert_close(loss, want_loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad, x.grad, **tol(torch.float32, "grad"))


@pytest.mark.parametrize("logits", ["none", "detached"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize(
    "impl, dtype",
    [("torch", torch.bfloat16), ("torch", torch.float16), ("triton", torch.float32), ("triton", torch.bfloat16)],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_path_matches_upcast_reference(impl, dtype, softcap, logits, triton_device):
    """Half dtypes on the torch path, and the Triton kernel (interpreted on the CPU), against the
    reference run in fp32: the gradient in place ("none") or into the reused buffer while the
    logits are returned ("detached")."""
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(37, 24, 1001, dtype, device=device)
    got = op_grads(hidden, weight, target, softcap, 10, impl, logits)
    assert got[1].dtype == got[2].dtype == dtype
    want = reference_grads(hidden, weight, target, softcap, upcast=True)
    assert_matches_reference(got, want, dtype)
    if logits == "detached":
        torch.testing.assert_close(got[3].float(), F.linear(hidden, weight).float(), **tol(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("logits", ["none", "detached"])
def test_torch_path_on_cuda_matches_reference(logits):
    """The torch path on an accelerator zeroes ignored rows without a host sync (masked_fill_)."""
    hidden, weight, target = (t.cuda() for t in make_inputs(37, 24, 1001))
    got = op_grads(hidden, weight, target, 5.0, 10, "torch", logits)
    assert_matches_reference(got, reference_grads(hidden, weight, target, 5.0), torch.float32)


def test_triton_path_multiblock_vocab(triton_device):
    hidden, weight, target = make_inputs(5, 8, MAX_BLOCK_V + 3, device=triton_device)
    got = op_grads(hidden, weight, target, 0.0, 2, "triton")
    assert_matches_reference(got, reference_grads(hidden, weight, target, 0.0), torch.float32)


# --- torch.library checks -------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("logits", ["none", "differentiable", "detached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, logits, impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(7, 5, 33, dtype, device=device)
    args = (*leaves(hidden, weight), target, IGNORE, 3.0, 3, logits, True, impl)
    torch.library.opcheck(fwd_op.default, args)
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "features",
    [dict(logit_scale=0.0625), dict(logit_scale=16.0, compute_grad_weight=False)],
    ids=["scaled", "scaled_frozen_weight"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_logit_scale_and_frozen_weight(dtype, features, impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    hidden, weight, target = make_inputs(7, 5, 33, dtype, device=device)
    h, w = leaves(hidden, weight)
    w.requires_grad_(features.get("compute_grad_weight", True))
    for logits in ("none", "differentiable"):
        args = (h, w, target, IGNORE, 3.0, 3, logits, True, impl)
        torch.library.opcheck(fwd_op.default, args, features)
        torch.library.opcheck(op.default, args, features)


def test_opcheck_kernel(triton_device):
    logits = torch.randn(5, 33).to(triton_device)
    target = torch.tensor([0, 32, IGNORE, 7, 7]).to(triton_device)
    # Under the interpreter wrap_triton hands back the interpreted kernel instead of a traceable
    # wrapper, so fake/AOT tracing would run the interpreter on fake tensors.
    test_utils = {} if triton_device.type == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration")}
    for grad in (torch.empty_like(logits), None):
        torch.library.opcheck(kernel_op.default, (logits, target, grad, IGNORE, 3.0), **test_utils)


@pytest.mark.parametrize(
    "features", [{}, dict(logit_scale=0.0625, compute_grad_weight=False)], ids=["plain", "scaled_frozen_weight"]
)
def test_compiled_matches_eager(features):
    hidden, weight, target = make_inputs(10, 8, 33)
    probe = torch.randn(10, 33, generator=torch.Generator().manual_seed(1))
    trainable_weight = features.get("compute_grad_weight", True)

    def step(h, w, t):
        loss_sum, logits = op(h, w, t, IGNORE, 2.0, 4, "differentiable", True, "auto", **features)
        return loss_sum / (t != IGNORE).sum() + (logits * probe).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    h, w = leaves(hidden, weight)
    w.requires_grad_(trainable_weight)
    got = compiled(h, w, target)
    got.backward()
    rh, rw = leaves(hidden, weight)
    rw.requires_grad_(trainable_weight)
    want = step(rh, rw, target)
    want.backward()
    torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(h.grad, rh.grad, **tol(torch.float32, "grad"))
    if trainable_weight:
        torch.testing.assert_close(w.grad, rw.grad, **tol(torch.float32, "grad"))
    else:
        assert w.grad is None and rw.grad is None


@pytest.mark.parametrize("grad", ["zero", "random", "one_nonzero", "nan", "empty"])
def test_logits_backward_skips_all_zero_gradients_exactly(grad):
    g = torch.Generator().manual_seed(0)
    n = 0 if grad == "empty" else 7
    hidden, weight = torch.randn(n, 5, generator=g), torch.randn(11, 5, generator=g)
    grad_logits = torch.randn(n, 11, generator=g) if grad == "random" else torch.zeros(n, 11)
    if grad == "one_nonzero":
        grad_logits[6, 10] = -1e-30
    if grad == "nan":
        grad_logits[3, 4] = float("nan")
    d_hidden, d_weight = torch.ops.graphopt.logits_backward(grad_logits, hidden, weight)
    torch.testing.assert_close(d_hidden, grad_logits @ weight, equal_nan=True)
    torch.testing.assert_close(d_weight, grad_logits.t() @ hidden, equal_nan=True)
    assert d_weight.isnan().any() == (grad == "nan")
    if grad != "nan":  # opcheck compares eager and traced outputs without equal_nan
        torch.library.opcheck(torch.ops.graphopt.logits_backward, (grad_logits, hidden, weight))
