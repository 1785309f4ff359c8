"""graphopt::varlen_attention against its fp64 reference: every impl, forward and backward.

The Triton path runs on the ``triton_device`` fixture's device: CUDA, or the CPU in Triton's
interpreter (tests/conftest.py), so shapes stay small: T <= 64, D <= 32, 16-token tiles (on the
CPU) that cross documents. GPU-sized shapes are in test_cuda_kernels.py.
"""

import importlib.util

import pytest
import torch

from graphopt.ops.varlen_attention import (
    _has_torch_varlen,
    _plan_buckets,
    apply_rotary,
    varlen_attention_reference,
)
from tests.support.varlen_cases import make_case
from tests.support.tolerances import tol

needs_flash_attn = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package"
)
needs_torch_varlen = pytest.mark.skipif(
    not _has_torch_varlen(), reason="needs torch.nn.attention.varlen.varlen_attn"
)


# Each case: document lengths (0 = empty document), trailing padding of cu_seqlens with T, heads,
# head dims and rotary layout. Shapes keep T <= 64 for the interpreter.
CASES = {
    "gqa_partial_rotary": dict(lengths=[5, 1, 17, 9, 1, 30], hq=4, hkv=2, d=24, r=16),
    "mqa_interleaved": dict(lengths=[20, 3, 25], hq=4, hkv=1, d=16, r=16, interleaved=True),
    "interleaved_partial": dict(lengths=[11, 19, 6], hq=2, hkv=2, d=24, r=8, interleaved=True),
    "many_tiny_documents": dict(lengths=[1 + (i % 4 == 0) for i in range(50)], hq=4, hkv=2, d=16, r=16),
    "single_document": dict(lengths=[48], hq=4, hkv=2, d=32, r=32),
    "length_one_documents": dict(lengths=[1] * 12, hq=2, hkv=1, d=16, r=16),
    "empty_documents_padded": dict(lengths=[3, 0, 7, 0, 20], pad=5, hq=4, hkv=2, d=32, r=16, dv=16),
}


def run_op(case: dict, impl: str):
    """(out, dq, dk, dv) of the public op."""
    out = torch.ops.graphopt.varlen_attention(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
        case["q"].shape[0], case["scale"], case["interleaved"], impl,
    )
    return (out, *torch.autograd.grad(out, (case["q"], case["k"], case["v"]), case["grad_out"]))


def run_reference(case: dict):
    out = varlen_attention_reference(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
        case["scale"], case["interleaved"],
    )
    return (out, *torch.autograd.grad(out, (case["q"], case["k"], case["v"]), case["grad_out"]))


def assert_matches_reference(case: dict, impl: str) -> None:
    dtype = case["q"].dtype
    got, want = run_op(case, impl), run_reference(case)
    torch.testing.assert_close(got[0], want[0], **tol(dtype))
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        torch.testing.assert_close(g, w, **tol(dtype, "grad"), msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# impl="torch"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case_name", list(CASES))
def test_torch_impl_matches_reference(case_name, dtype):
    assert_matches_reference(make_case(**CASES[case_name], dtype=dtype), "torch")


@pytest.mark.parametrize("case_name", ["gqa_partial_rotary", "mqa_interleaved", "empty_documents_padded"])
def test_torch_impl_matches_reference_bf16(case_name):
    assert_matches_reference(make_case(**CASES[case_name], dtype=torch.bfloat16), "torch")


def test_auto_is_torch_on_cpu():
    case = make_case(**CASES["gqa_partial_rotary"])
    for got, want in zip(run_op(case, "auto"), run_op(case, "torch")):
        assert torch.equal(got, want)


def test_buckets_cover_every_token_once_with_bounded_padding():
    generator = torch.Generator().manual_seed(0)
    tiny = torch.randint(1, 17, (300,), generator=generator)
    lengths = torch.cat([tiny, torch.randint(17, 300, (40,), generator=generator)])
    lengths[::7] = 0  # empty documents in the middle
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    n_tokens = int(cu_seqlens[-1])
    shapes, slot_token, token_slot, pad_slots = _plan_buckets(cu_seqlens, n_tokens)
    assert torch.equal(slot_token[token_slot], torch.arange(n_tokens))
    assert sum(docs * length for docs, length in shapes) == slot_token.numel()
    assert bool((slot_token[pad_slots] == n_tokens).all())
    assert shapes[-1][1] <= 16 and sum(docs for docs, length in shapes if length <= 16) >= 250  # one tiny bucket
    padded_cost = sum(docs * length**2 for docs, length in shapes)
    real_cost = int((lengths**2).sum())
    assert padded_cost <= 1.34 * real_cost + 256 * len(lengths)


# ---------------------------------------------------------------------------------------------
# impl="triton" (on triton_device: CUDA, or CPU tensors in the interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
def test_triton_impl_matches_reference(case_name, triton_device):
    assert_matches_reference(make_case(**CASES[case_name], device=triton_device), "triton")


@pytest.mark.parametrize("case_name", ["gqa_partial_rotary", "mqa_interleaved"])
def test_triton_impl_matches_reference_bf16(case_name, triton_device):
    # Under the interpreter the kernels widen bf16 matmul operands to fp32 after rounding (its
    # tl.dot mishandles bf16), which leaves the products unchanged.
    assert_matches_reference(make_case(**CASES[case_name], dtype=torch.bfloat16, device=triton_device), "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_strided_inputs_from_a_fused_qkv_projection(impl, triton_device):
    # Phi-3 style: q, k, v are column slices of one (T, (Hq + 2 Hkv) * D) projection.
    device = triton_device if impl == "triton" else "cpu"
    case = make_case([13, 4, 20], hq=4, hkv=2, d=16, r=16, device=device)
    qkv = torch.cat([case[name].detach().flatten(1) for name in ("q", "k", "v")], dim=1).requires_grad_()
    q, k, v = qkv.split([64, 32, 32], dim=1)
    strided = dict(case, q=q.view(-1, 4, 16), k=k.view(-1, 2, 16), v=v.view(-1, 2, 16))
    assert not strided["q"].is_contiguous()
    got = run_op(strided, impl)
    want = run_op(case, impl)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32, "grad"))


# ---------------------------------------------------------------------------------------------
# Documents never see each other
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_changing_one_document_leaves_the_others_bit_identical(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    lengths = [7, 12, 9, 5]  # document 1 shares a 16-token tile with documents 0 and 2
    case = make_case(lengths, hq=4, hkv=2, d=24, r=16, device=device)
    first = run_op(case, impl)
    a_start, a_end = 7, 19
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("q", "k", "v"):
            rows = case[name][a_start:a_end]
            rows.copy_(torch.randn(rows.shape, generator=generator).to(rows.device, rows.dtype) * 3)
    second = run_op(case, impl)
    others = torch.cat([torch.arange(0, a_start), torch.arange(a_end, sum(lengths))]).to(device)
    for name, x, y in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(x[others], y[others]), f"{impl}: {name} of other documents changed"
        assert not torch.equal(x[a_start:a_end], y[a_start:a_end]), f"{impl}: {name} of document A did not change"


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _op_inputs(case: dict) -> tuple:
    return case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"]


OPCHECK_CASES = [
    pytest.param("gqa_partial_rotary", torch.float32, True, id="gqa-partial-fp32-grad"),
    pytest.param("empty_documents_padded", torch.float32, False, id="padded-dv16-fp32-nograd"),
    pytest.param("mqa_interleaved", torch.bfloat16, True, id="mqa-interleaved-bf16-grad"),
]


def _opcheck_forward_and_backward(fwd, bwd, case: dict, **kwargs) -> None:
    """``opcheck`` a forward op on ``case``, then its backward op on the forward's outputs."""
    args = (*_op_inputs(case), case["scale"], case["interleaved"])
    torch.library.opcheck(fwd, args, **kwargs)
    with torch.no_grad():
        out, lse = fwd(*args)
    q, k, v, cos, sin, cu_seqlens = _op_inputs(case)
    torch.library.opcheck(
        bwd,
        (case["grad_out"], q.detach(), k.detach(), v.detach(), cos, sin, cu_seqlens, out, lse,
         case["scale"], case["interleaved"]),
        **kwargs,
    )


@pytest.mark.parametrize("case_name, dtype, requires_grad", OPCHECK_CASES)
def test_opcheck_torch_ops(case_name, dtype, requires_grad):
    case = make_case(**CASES[case_name], dtype=dtype)
    for name in ("q", "k", "v"):
        case[name].requires_grad_(requires_grad)
    _opcheck_forward_and_backward(torch.ops.graphopt.varlen_attention_torch_fwd, torch.ops.graphopt.varlen_attention_torch_bwd, case)
    torch.library.opcheck(
        torch.ops.graphopt.varlen_attention,
        (*_op_inputs(case), case["q"].shape[0], case["scale"], case["interleaved"], "torch"),
    )


@pytest.mark.parametrize("case_name, dtype, requires_grad", OPCHECK_CASES)
def test_opcheck_triton_ops(case_name, dtype, requires_grad, triton_device):
    # The interpreter cannot be traced by AOTAutograd (wrap_triton hands back the raw interpreted
    # kernel), so on the CPU opcheck skips its compile test; on CUDA it runs all of them.
    on_cuda = triton_device.type == "cuda"
    test_utils = None if on_cuda else ("test_schema", "test_autograd_registration", "test_faketensor")
    case = make_case(**CASES[case_name], dtype=dtype, device=triton_device)
    for name in ("q", "k", "v"):
        case[name].requires_grad_(requires_grad)
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    _opcheck_forward_and_backward(torch.ops.graphopt.varlen_attention_triton_fwd, torch.ops.graphopt.varlen_attention_triton_bwd, case, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _attention_loss(q, k, v, cos, sin, cu_seqlens, max_seqlen: int, impl: str):
    out = torch.ops.graphopt.varlen_attention(q, k, v, cos, sin, cu_seqlens, max_seqlen, 0.25, False, impl)
    return (out * out).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.cuda)])
def test_compiled_matches_eager_with_dynamic_tokens(impl, dtype):
    device = "cuda" if impl == "triton" else "cpu"
    torch._dynamo.reset()
    compiled = torch.compile(_attention_loss, fullgraph=True, backend="inductor", dynamic=True)
    for lengths in ([5, 1, 17, 9], [3, 11, 6, 2, 8]):  # two T's: one dynamic graph
        case = make_case(lengths, hq=4, hkv=2, d=16, r=16, dtype=dtype, device=device)
        args = (*_op_inputs(case), sum(lengths), impl)
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, (case["q"], case["k"], case["v"]))
        eager_loss = _attention_loss(*args)
        eager_grads = torch.autograd.grad(eager_loss, (case["q"], case["k"], case["v"]))
        torch.testing.assert_close(loss, eager_loss, **tol(dtype))
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, **tol(dtype, "grad"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton path is interpreted only without CUDA")
def test_compiling_triton_under_the_interpreter_raises_clearly():
    case = make_case([5, 11], hq=2, hkv=1, d=16, r=16)
    compiled = torch.compile(_attention_loss, fullgraph=True, backend="inductor")
    with pytest.raises(Exception, match="cannot be compiled under TRITON_INTERPRET=1"):
        compiled(*_op_inputs(case), 16, "triton")


# ---------------------------------------------------------------------------------------------
# Library impls (CUDA) and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_flash_attn
def test_flash_attn_impl_matches_reference():
    case = make_case(**CASES["gqa_partial_rotary"] | dict(d=32, r=32), dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(case, "flash_attn")


@pytest.mark.cuda
@needs_torch_varlen
def test_torch_varlen_impl_matches_reference():
    case = make_case(**CASES["gqa_partial_rotary"] | dict(d=32, r=32), dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(case, "torch_varlen")


@pytest.mark.cuda
@pytest.mark.parametrize("case_name", list(CASES))
def test_triton_impl_matches_reference_bf16_cuda(case_name):
    assert_matches_reference(make_case(**CASES[case_name], dtype=torch.bfloat16, device="cuda"), "triton")


def test_unavailable_impls_raise_clear_errors():
    case = make_case(**CASES["gqa_partial_rotary"])
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="pip install flash-attn"):
            run_op(case, "flash_attn")
    with pytest.raises(RuntimeError, match="CUDA"):
        run_op(case, "torch_varlen")
    with pytest.raises(ValueError, match="impl must be one of"):
        run_op(case, "cudnn")


def test_rotary_tables_requiring_grad_raise():
    case = make_case(**CASES["gqa_partial_rotary"])
    case["cos"].requires_grad_()
    with pytest.raises(RuntimeError, match="does not differentiate the rotary tables"):
        run_op(case, "torch")


def test_apply_rotary_is_hf_apply_rotary_pos_emb():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    case = make_case([9, 14], hq=4, hkv=2, d=16, r=16, dtype=torch.bfloat16)
    cos, sin = case["cos"].bfloat16(), case["sin"].bfloat16()
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(case["q"], case["k"], cos, sin, unsqueeze_dim=1)
    assert torch.equal(apply_rotary(case["q"], cos, sin, False), q_hf)
    assert torch.equal(apply_rotary(case["k"], cos, sin, False), k_hf)
