"""graphopt::varlen_attention against its fp64 reference: every impl, forward and backward, with
and without a sliding window, softcapping and attention sinks.

The Triton path runs on the ``triton_device`` fixture's device: CUDA, or the CPU in Triton's
interpreter (tests/conftest.py), so shapes stay small: T <= 64, D <= 32, 16-token tiles (on the
CPU) that cross documents. GPU-sized shapes are in test_cuda_kernels.py.
"""

import importlib.util

import pytest
import torch

import graphopt.ops.varlen_attention as varlen_module
from graphopt.ops.varlen_attention import (
    _has_torch_varlen,
    _plan_buckets,
    apply_rotary,
    varlen_attention_reference,
)
from tests.support.varlen_cases import LONG_OPTION_CASES, OPTION_CASES, leaves, make_case, options
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
    """(out, dq, dk, dv[, dsinks]) of the public op."""
    out = torch.ops.graphopt.varlen_attention(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
        case["q"].shape[0], case["scale"], case["interleaved"], impl, *options(case),
    )
    return (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))


def run_reference(case: dict):
    out = varlen_attention_reference(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
        case["scale"], case["interleaved"], *options(case),
    )
    return (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))


def assert_matches_reference(case: dict, impl: str) -> None:
    dtype = case["q"].dtype
    got, want = run_op(case, impl), run_reference(case)
    torch.testing.assert_close(got[0], want[0], **tol(dtype))
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[1:], want[1:]):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case_name", list(OPTION_CASES) + list(LONG_OPTION_CASES))
def test_torch_impl_with_window_softcap_sinks_matches_reference(case_name, dtype):
    assert_matches_reference(make_case(**(OPTION_CASES | LONG_OPTION_CASES)[case_name], dtype=dtype), "torch")


@pytest.mark.parametrize("case_name", ["window_softcap_sinks", "long_window_softcap_sinks"])
def test_torch_impl_with_window_softcap_sinks_matches_reference_bf16(case_name):
    case = make_case(**(OPTION_CASES | LONG_OPTION_CASES)[case_name], dtype=torch.bfloat16)
    assert_matches_reference(case, "torch")


def test_torch_impl_takes_fp32_sinks_for_low_precision_inputs():
    case = make_case(**OPTION_CASES["sinks"], dtype=torch.bfloat16)
    case["sinks"] = case["sinks"].detach().float().requires_grad_()
    got = run_op(case, "torch")
    assert got[-1].dtype == torch.float32
    assert_matches_reference(case, "torch")


def test_torch_window_wider_than_every_document_is_the_causal_path():
    # aten's causal kernel is exact there, so the op stays on it: bitwise the call without a window.
    case = make_case(**OPTION_CASES["window_wider_than_documents"])
    plain = dict(case, window=-1)
    for got, want in zip(run_op(case, "torch"), run_op(plain, "torch")):
        assert torch.equal(got, want)


def test_torch_blocked_attention_reads_only_the_window_band(monkeypatch):
    # Every block's scores span at most rows + window - 1 keys: memory and work follow
    # len * min(len, window), never len^2.
    key_counts = []
    block_scores = varlen_module._block_scores

    def recording(q_rows, k_keys, scale, softcap):
        key_counts.append(k_keys.shape[2])
        return block_scores(q_rows, k_keys, scale, softcap)

    monkeypatch.setattr(varlen_module, "_block_scores", recording)
    case = make_case([1000, 700], hq=2, hkv=1, d=16, r=16, window=40, softcap=2.0)
    run_op(case, "torch")
    assert key_counts and max(key_counts) <= varlen_module._BLOCK_ROWS + 40 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_window_alone_runs_aten_on_the_band(monkeypatch, dtype):
    # A window without softcap or sinks: aten's fused kernel per block of rows with a band mask,
    # each block against at most rows + window - 1 keys; the blocked matmuls never run.
    spans = []
    block_keys = varlen_module._block_keys

    def recording(row_start, row_stop, window, band):
        key_start, mask = block_keys(row_start, row_stop, window, band)
        spans.append(row_stop - key_start)
        assert mask.shape == (row_stop - row_start, row_stop - key_start)
        return key_start, mask

    def refuse(*args):
        raise AssertionError("the blocked path ran")

    monkeypatch.setattr(varlen_module, "_block_keys", recording)
    monkeypatch.setattr(varlen_module, "_blocked_attention_fwd", refuse)
    monkeypatch.setattr(varlen_module, "_blocked_attention_bwd", refuse)
    case = make_case([1000, 700, 3, 41], hq=4, hkv=2, d=16, r=16, window=40, dtype=dtype)
    assert_matches_reference(case, "torch")
    assert spans and max(spans) <= varlen_module._banded_rows(40) + 40 - 1


@pytest.mark.parametrize(
    "dtype, extra", [(torch.bfloat16, {}), (torch.float32, dict(softcap=2.0)), (torch.float32, dict(sinks=True))],
    ids=["bf16", "softcap", "sinks"],
)
def test_torch_window_with_softcap_sinks_or_bf16_keeps_the_blocked_path(monkeypatch, dtype, extra):
    # aten's kernel takes neither softcap nor sinks, and its per-block bf16 dK/dV would round
    # twice: those windows stay on the blocked matmuls (fp32 work), never the banded path.
    def refuse(*args):
        raise AssertionError("the banded path ran")

    monkeypatch.setattr(varlen_module, "_banded_attention_fwd", refuse)
    monkeypatch.setattr(varlen_module, "_banded_attention_bwd", refuse)
    case = make_case([300, 41], hq=4, hkv=2, d=16, r=16, window=40, dtype=dtype, **extra)
    assert_matches_reference(case, "torch")


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


@pytest.mark.parametrize("case_name", list(OPTION_CASES))
def test_triton_impl_with_window_softcap_sinks_matches_reference(case_name, triton_device):
    assert_matches_reference(make_case(**OPTION_CASES[case_name], device=triton_device), "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_sink_of_minus_infinity_is_no_sink(impl, triton_device):
    case = make_case(**OPTION_CASES["sinks"], device=triton_device if impl == "triton" else "cpu")
    with torch.no_grad():
        case["sinks"][1] = float("-inf")
    got, want = run_op(case, impl), run_reference(case)
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, **tol(torch.float32, "grad"))
    assert got[4][1] == 0 and bool(got[4].isfinite().all())


def test_triton_impl_with_window_softcap_sinks_matches_reference_bf16(triton_device):
    case = make_case(**OPTION_CASES["window_softcap_sinks"], dtype=torch.bfloat16, device=triton_device)
    assert_matches_reference(case, "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_window_skips_keys_and_queries_outside_the_band(impl, triton_device):
    # NaN in the first token's value and the last token's output gradient. Rows (and keys) whose
    # blocks' windows reach neither stay finite only if the loops never load them: a mask alone
    # would multiply the NaN by a zero probability. With query blocks of 16 rows (interpreter) or
    # 128 (torch impl), tokens [block, T - block - window) are that far away.
    device = triton_device if impl == "triton" else "cpu"
    block, window = (16 if impl == "triton" else varlen_module._BLOCK_ROWS), 4
    n_tokens = 4 * block
    case = make_case([n_tokens], hq=2, hkv=1, d=16, r=16, device=device, window=window)
    with torch.no_grad():
        case["v"][0] = float("nan")
    case["grad_out"][-1] = float("nan")
    out, dq, dk, dv = run_op(case, impl)
    middle = slice(block, n_tokens - block - window)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool(x[middle].isfinite().all()), f"{impl}: {name} read a token outside the window band"
    plain = run_op(dict(case, window=-1), impl)
    assert not bool(plain[0][middle].isfinite().all())  # without the window, every row sees token 0


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
    # each new argument on its own
    pytest.param("window_crossing_tiles", torch.float32, True, id="window-fp32-grad"),
    pytest.param("softcap", torch.float32, False, id="softcap-fp32-nograd"),
    pytest.param("sinks", torch.bfloat16, True, id="sinks-bf16-grad"),
]


def _opcheck_case(case_name: str, dtype: torch.dtype, requires_grad: bool, device="cpu") -> dict:
    case = make_case(**(CASES | OPTION_CASES)[case_name], dtype=dtype, device=device)
    for leaf in leaves(case):
        leaf.requires_grad_(requires_grad)
    return case


def _opcheck_forward_and_backward(fwd, bwd, case: dict, **kwargs) -> None:
    """``opcheck`` a forward op on ``case``, then its backward op on the forward's outputs."""
    args = (*_op_inputs(case), case["scale"], case["interleaved"], *options(case))
    torch.library.opcheck(fwd, args, **kwargs)
    with torch.no_grad():
        out, lse = fwd(*args)
    q, k, v, cos, sin, cu_seqlens = _op_inputs(case)
    window, softcap, sinks = options(case)
    torch.library.opcheck(
        bwd,
        (case["grad_out"], q.detach(), k.detach(), v.detach(), cos, sin, cu_seqlens, out, lse,
         case["scale"], case["interleaved"], window, softcap, None if sinks is None else sinks.detach()),
        **kwargs,
    )


@pytest.mark.parametrize("case_name, dtype, requires_grad", OPCHECK_CASES)
def test_opcheck_torch_ops(case_name, dtype, requires_grad):
    case = _opcheck_case(case_name, dtype, requires_grad)
    _opcheck_forward_and_backward(torch.ops.graphopt.varlen_attention_torch_fwd, torch.ops.graphopt.varlen_attention_torch_bwd, case)
    torch.library.opcheck(
        torch.ops.graphopt.varlen_attention,
        (*_op_inputs(case), case["q"].shape[0], case["scale"], case["interleaved"], "torch", *options(case)),
    )


@pytest.mark.parametrize("case_name, dtype, requires_grad", OPCHECK_CASES)
def test_opcheck_triton_ops(case_name, dtype, requires_grad, triton_device):
    # The interpreter cannot be traced by AOTAutograd (wrap_triton hands back the raw interpreted
    # kernel), so on the CPU opcheck skips its compile test; on CUDA it runs all of them.
    on_cuda = triton_device.type == "cuda"
    test_utils = None if on_cuda else ("test_schema", "test_autograd_registration", "test_faketensor")
    case = _opcheck_case(case_name, dtype, requires_grad, triton_device)
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    _opcheck_forward_and_backward(torch.ops.graphopt.varlen_attention_triton_fwd, torch.ops.graphopt.varlen_attention_triton_bwd, case, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _attention_loss(q, k, v, cos, sin, cu_seqlens, max_seqlen: int, impl: str):
    out = torch.ops.graphopt.varlen_attention(q, k, v, cos, sin, cu_seqlens, max_seqlen, 0.25, False, impl)
    return (out * out).sum()


def _sliding_capped_sink_attention_loss(q, k, v, cos, sin, cu_seqlens, max_seqlen: int, impl: str, sinks):
    out = torch.ops.graphopt.varlen_attention(
        q, k, v, cos, sin, cu_seqlens, max_seqlen, 0.25, False, impl, window=5, softcap=2.0, sinks=sinks
    )
    return (out * out).sum()


@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "window_softcap_sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.cuda)])
def test_compiled_matches_eager_with_dynamic_tokens(impl, dtype, with_options):
    device = "cuda" if impl == "triton" else "cpu"
    loss_fn = _sliding_capped_sink_attention_loss if with_options else _attention_loss
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor", dynamic=True)
    for lengths in ([5, 1, 17, 9], [3, 11, 6, 2, 8]):  # two T's: one dynamic graph
        case = make_case(lengths, hq=4, hkv=2, d=16, r=16, dtype=dtype, device=device, sinks=with_options)
        args = (*_op_inputs(case), sum(lengths), impl) + ((case["sinks"],) if with_options else ())
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, leaves(case))
        eager_loss = loss_fn(*args)
        eager_grads = torch.autograd.grad(eager_loss, leaves(case))
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


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(window=0), "window must be -1"), (dict(window=-2), "window must be -1"),
     (dict(softcap=-1.0), "softcap must be >= 0"), (dict(softcap=float("nan")), "softcap must be >= 0")],
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_window_or_softcap_raise_value_errors(impl, overrides, match, triton_device):
    case = make_case([5, 11], hq=2, hkv=1, d=16, r=16, device=triton_device if impl == "triton" else "cpu")
    with pytest.raises(ValueError, match=match):
        run_op(case | overrides, impl)


def test_sinks_of_the_wrong_shape_raise():
    case = make_case([5, 11], hq=4, hkv=2, d=16, r=16)
    with pytest.raises(RuntimeError, match=r"sinks must be \(Hq,\)"):
        run_op(case | dict(sinks=torch.zeros(2, requires_grad=True)), "torch")


def test_library_window_is_flash_attn_window_size():
    # transformers' sliding_window counts the diagonal; flash-attn's left window does not.
    assert varlen_module._library_window(-1) == (-1, 0)
    assert varlen_module._library_window(1) == (0, 0)
    assert varlen_module._library_window(4096) == (4095, 0)


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
