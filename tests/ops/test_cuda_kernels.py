"""The Triton kernels on a CUDA GPU: against their fp64 references, forward and backward, at shapes
that cross the GPU tiles and at a realistic training shape; and eager against ``torch.compile``.

Every test here is marked ``cuda`` (skipped without a GPU; ``pytest -m cuda`` selects them with
the other CUDA tests). Sized to run in about a minute on an H100 or H200, most of it Triton and
Inductor compiling.

References. The dense varlen reference builds (Hq, T, T) scores, which do not fit at T = 32768, and
the loss reference (N, V) logits; both are computed in fp64 in pieces instead: attention one
document at a time (documents never interact, so this is the block diagonal of the dense
reference), the loss some rows at a time (tokens are independent; the weight gradient is their
sum). ``test_references_in_pieces_equal_the_dense_ones`` checks both against the dense references
on the CPU.

Comparisons use the tolerance table, with its ``atol`` scaled by the reference's largest magnitude
when that is below 1, so that a tensor of small values (a weight gradient of 1e-2) is not compared
with an absolute tolerance as large as its values; never looser than the table.
"""

import pytest
import torch

import graphopt.ops.varlen_attention as varlen_module
from graphopt.ops.linear_cross_entropy import default_chunk_size
from graphopt.ops.triton_cross_entropy import MAX_BLOCK_V
from graphopt.ops.varlen_attention import VarlenCall, VarlenLibraries, choose_cuda_impl, varlen_attention_reference
from tests.support.varlen_cases import leaves, make_case, options
from tests.support.tolerances import tol

IGNORE = -100
CUDA = torch.device("cuda")
varlen_attention = torch.ops.graphopt.varlen_attention
linear_cross_entropy = torch.ops.graphopt.linear_cross_entropy
cross_entropy_loss_and_grad = torch.ops.graphopt.cross_entropy_loss_and_grad


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, kind: str, name: str):
    """``got`` against the fp64 ``want`` with the table's tolerance for ``dtype``; ``atol`` scaled
    by ``min(1, max |want|)``."""
    tolerance = tol(dtype, kind)
    magnitude = min(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tolerance["rtol"], atol=tolerance["atol"] * magnitude,
        msg=lambda message: f"{name}: {message}",
    )


# ---------------------------------------------------------------------------------------------
# Varlen attention
# ---------------------------------------------------------------------------------------------


def varlen_reference_by_document(case: dict) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv[, dsinks]) in fp64 for ``case`` (as ``make_case`` builds it), one document
    at a time; the sinks' gradient is the sum of the documents'."""
    q, k, v = (case[name].detach().double() for name in ("q", "k", "v"))
    window, softcap, sinks = options(case)
    sinks = None if sinks is None else sinks.detach().double()
    results = [q.new_zeros(q.shape[0], q.shape[1], v.shape[2]), torch.zeros_like(q), torch.zeros_like(k),
               torch.zeros_like(v)]
    dsinks = None if sinks is None else torch.zeros_like(sinks)
    bounds = case["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        inputs = [x[start:end].clone().requires_grad_() for x in (q, k, v)]
        document_sinks = None if sinks is None else sinks.clone().requires_grad_()
        one_document = torch.tensor([0, end - start], dtype=torch.int32, device=q.device)
        out = varlen_attention_reference(
            *inputs, case["cos"][start:end], case["sin"][start:end], one_document, case["scale"], case["interleaved"],
            window, softcap, document_sinks,
        )
        differentiable = inputs + ([] if sinks is None else [document_sinks])
        grads = torch.autograd.grad(out, differentiable, case["grad_out"][start:end].double())
        for result, value in zip(results, (out.detach(), *grads[:3])):
            result[start:end] = value
        if sinks is not None:
            dsinks += grads[3]
    return tuple(results) + (() if sinks is None else (dsinks,))


def assert_varlen_matches_reference(case: dict, impl: str = "triton") -> None:
    dtype = case["q"].dtype
    out = varlen_attention(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"], case["q"].shape[0],
        case["scale"], case["interleaved"], impl, *options(case),
    )
    got = (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))
    want = varlen_reference_by_document(case)
    assert len(got) == len(want)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
        assert g.dtype == dtype
        assert_close_to_reference(g, w, dtype, "fwd" if name == "out" else "grad", name)


# Document lengths around the GPU tiles (64 query rows forward and dQ, 32 or 64 keys), so tiles
# start and end inside documents; a padded cu_seqlens tail as the packed-sequence pass builds it.
TILE_CROSSING = {
    "gqa_d128_half": dict(lengths=[1, 63, 64, 65, 127, 129, 5, 33, 200], pad=3, hq=8, hkv=2, d=128, r=128),
    "mqa_partial_interleaved_dv64": dict(lengths=[31, 97, 1, 190, 66], hq=4, hkv=1, d=96, r=32, dv=64,
                                         interleaved=True),
    # windows shorter than, equal to and longer than the 64-row tiles; Gemma-2's softcap of 50
    # would barely bend these scores, so a tighter one; gpt-oss style sinks
    "gqa_window63_softcap_sinks": dict(lengths=[1, 63, 64, 65, 127, 129, 5, 33, 200], pad=3, hq=8, hkv=2, d=128,
                                       r=128, window=63, softcap=5.0, sinks=True),
    "mqa_window64_sinks": dict(lengths=[31, 97, 1, 190, 66], hq=4, hkv=1, d=96, r=32, dv=64, interleaved=True,
                               window=64, sinks=True),
    "gqa_window100_softcap": dict(lengths=[300, 17, 129], hq=8, hkv=2, d=64, r=64, window=100, softcap=5.0),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case_name", list(TILE_CROSSING))
def test_varlen_attention_tile_crossing(case_name, dtype):
    assert_varlen_matches_reference(make_case(**TILE_CROSSING[case_name], dtype=dtype, device=CUDA))


# 14 documents of 516..3890 tokens, 32768 in all; Llama-3-8B-like heads.
REALISTIC_LENGTHS = [516, 3890, 1203, 2950, 3301, 777, 2048, 1999, 3600, 1500, 2711, 3333, 2457, 2483]


@pytest.mark.cuda
def test_varlen_attention_realistic_bf16():
    assert sum(REALISTIC_LENGTHS) == 32768
    case = make_case(REALISTIC_LENGTHS, hq=16, hkv=4, d=128, r=128, dtype=torch.bfloat16, device=CUDA)
    assert_varlen_matches_reference(case)


@pytest.mark.cuda
def test_varlen_attention_realistic_sliding_window_with_sinks_bf16():
    # gpt-oss's sliding layers: a 128-token window and one sink per query head.
    case = make_case(REALISTIC_LENGTHS, hq=16, hkv=4, d=128, r=128, dtype=torch.bfloat16, device=CUDA, window=128,
                     sinks=True)
    assert_varlen_matches_reference(case)


@pytest.mark.cuda
@pytest.mark.parametrize("rotate_first", [True, False], ids=["rope_once", "rope_in_tiles"])
@pytest.mark.parametrize("case_name", ["gqa_d128_half", "mqa_partial_interleaved_dv64"])
def test_varlen_attention_triton_rope_once_or_in_tiles_bf16(monkeypatch, case_name, rotate_first):
    monkeypatch.setattr(varlen_module, "_rotates_before_triton", lambda *args: rotate_first)
    assert_varlen_matches_reference(make_case(**TILE_CROSSING[case_name], dtype=torch.bfloat16, device=CUDA))


# auto on this GPU: whatever the policy picks for the libraries installed here is right.
AUTO_CASES = {
    "gqa_d128": dict(lengths=[1, 63, 64, 65, 127, 129, 5, 33, 200], hq=8, hkv=2, d=128, r=128),
    "gqa_d128_window_softcap": dict(lengths=[300, 17, 129], hq=8, hkv=2, d=128, r=128, window=100, softcap=5.0),
    "mla_d192_dv128": dict(lengths=[300, 17, 129], hq=8, hkv=8, d=192, r=64, dv=128),
    "sinks": dict(lengths=[31, 97, 1, 190, 66], hq=4, hkv=1, d=96, r=32, dv=64, window=64, sinks=True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case_name", list(AUTO_CASES))
def test_varlen_attention_auto_bf16(case_name):
    case = make_case(**AUTO_CASES[case_name], dtype=torch.bfloat16, device=CUDA)
    window, softcap, sinks = options(case)
    key = VarlenCall.of(case["q"], case["k"], case["v"], window, softcap, sinks)
    try:
        chosen = choose_cuda_impl(key, VarlenLibraries.detect())
    except RuntimeError as error:  # nothing installed here takes it: the op must say so too
        with pytest.raises(RuntimeError, match="no CUDA implementation takes"):
            assert_varlen_matches_reference(case, "auto")
        pytest.skip(str(error))
    print(f"{case_name}: impl='auto' -> {chosen!r}")
    assert_varlen_matches_reference(case, "auto")


# ---------------------------------------------------------------------------------------------
# Fused LM head + cross-entropy (the Triton loss kernel inside graphopt::linear_cross_entropy)
# ---------------------------------------------------------------------------------------------


def loss_inputs(n, h, v, dtype, seed=0):
    """hidden (n, h) and weight (v, h) on CUDA with logits of std ~2 and gradients of both of order
    0.1 (neither factor small), target (n,) with ~25% ignored."""
    gen = torch.Generator().manual_seed(seed)
    scale = (2.0 / h**0.5) ** 0.5
    hidden = (torch.randn(n, h, generator=gen) * scale).to(CUDA, dtype)
    weight = (torch.randn(v, h, generator=gen) * scale).to(CUDA, dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.25] = IGNORE
    return hidden, weight, target.to(CUDA)


def loss_reference_by_rows(hidden, weight, target, softcap, logit_scale, keep_logits, rows=1024):
    """(loss_sum, grad_hidden, grad_weight, logits or None) of the summed loss in fp64, ``rows``
    tokens at a time: ``softcap(F.linear(hidden, weight) * logit_scale)`` then cross-entropy, with
    no rounding in between."""
    weight64 = weight.double().requires_grad_()
    loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float64)
    grad_weight = torch.zeros_like(weight64)
    logits = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float64) if keep_logits else None
    for start in range(0, hidden.shape[0], rows):
        block = hidden[start : start + rows].double().requires_grad_()
        z = torch.nn.functional.linear(block, weight64) * logit_scale
        if keep_logits:
            logits[start : start + rows] = z.detach()
        if softcap > 0.0:
            z = softcap * torch.tanh(z / softcap)
        loss = torch.nn.functional.cross_entropy(z, target[start : start + rows], ignore_index=IGNORE, reduction="sum")
        d_block, d_weight = torch.autograd.grad(loss, (block, weight64))
        loss_sum += loss.detach()
        grad_hidden[start : start + rows] = d_block
        grad_weight += d_weight
    return loss_sum, grad_hidden, grad_weight, logits


def assert_loss_matches_reference(n, h, v, dtype, softcap, logit_scale, chunk_size, logits_mode):
    hidden, weight, target = loss_inputs(n, h, v, dtype)
    h_leaf, w_leaf = (x.clone().requires_grad_() for x in (hidden, weight))
    loss_sum, logits = linear_cross_entropy(
        h_leaf, w_leaf, target, IGNORE, softcap, chunk_size, logits_mode, True, "triton", logit_scale
    )
    loss_sum.backward()
    want = loss_reference_by_rows(hidden, weight, target, softcap, logit_scale, logits_mode != "none")
    assert_close_to_reference(loss_sum, want[0], dtype, "fwd", "loss_sum")
    assert_close_to_reference(h_leaf.grad, want[1], dtype, "grad", "grad_hidden")
    assert_close_to_reference(w_leaf.grad, want[2], dtype, "grad", "grad_weight")
    if logits_mode != "none":
        assert_close_to_reference(logits, want[3], dtype, "fwd", "logits")


@pytest.mark.cuda
@pytest.mark.parametrize("logits_mode", ["none", "detached"])
@pytest.mark.parametrize("softcap, logit_scale", [(0.0, 1.0), (30.0, 0.0625)], ids=["plain", "softcap_scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_tile_crossing(dtype, softcap, logit_scale, logits_mode):
    # Three vocabulary blocks (the last partial) and chunks of 64 tokens with a partial last one.
    assert_loss_matches_reference(300, 256, 2 * MAX_BLOCK_V + 809, dtype, softcap, logit_scale, 64, logits_mode)


@pytest.mark.cuda
def test_loss_realistic_bf16():
    n, h, v = 16384, 2048, 128256
    assert_loss_matches_reference(n, h, v, torch.bfloat16, 0.0, 1.0, default_chunk_size(n, v), "none")


# ---------------------------------------------------------------------------------------------
# Eager against torch.compile (Inductor compiles the wrap_triton kernels; dynamic token counts).
# The varlen op's compiled test is test_varlen_attention.py's
# test_compiled_matches_eager_with_dynamic_tokens[triton-*].
# ---------------------------------------------------------------------------------------------


def _loss_and_kernel_step(hidden, weight, target, logits):
    """The fused loss op (scaled, differentiable logits) and the loss kernel op called directly
    with a softcap (Inductor then compiles the kernel itself)."""
    loss_sum, out_logits = linear_cross_entropy(
        hidden, weight, target, IGNORE, 0.0, 64, "differentiable", True, "auto", 0.0625
    )
    grad = torch.empty_like(logits)
    row_loss = cross_entropy_loss_and_grad(logits, target, grad, IGNORE, 30.0)
    return loss_sum / (target != IGNORE).sum() + out_logits.float().square().mean(), row_loss, grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_ops_compiled_match_eager_with_dynamic_tokens(dtype):
    torch._dynamo.reset()
    compiled = torch.compile(_loss_and_kernel_step, fullgraph=True, backend="inductor", dynamic=True)
    for n in (300, 257):  # two token counts: one dynamic graph
        hidden, weight, target = loss_inputs(n, 64, 1000, dtype, seed=n)
        logits = (torch.randn(n, 1000, generator=torch.Generator().manual_seed(n)) * 3).to(CUDA, dtype)
        results = []
        for step in (compiled, _loss_and_kernel_step):
            h, w = (x.clone().requires_grad_() for x in (hidden, weight))
            objective, row_loss, grad = step(h, w, target, logits)
            objective.backward()
            results.append((objective.detach(), row_loss, grad, h.grad, w.grad))
        for name, got, want in zip(("objective", "row_loss", "logits_grad", "grad_hidden", "grad_weight"), *results):
            kind = "fwd" if name in ("objective", "row_loss") else "grad"
            torch.testing.assert_close(got, want, **tol(dtype, kind), msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The references in pieces (CPU, runs everywhere)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option_kwargs", [{}, dict(window=6, softcap=3.0, sinks=True)], ids=["plain", "options"])
def test_references_in_pieces_equal_the_dense_ones(option_kwargs):
    case = make_case([5, 1, 17, 9, 30], pad=2, hq=4, hkv=2, d=24, r=16, dtype=torch.float64, **option_kwargs)
    dense = varlen_attention_reference(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"], case["scale"], False,
        *options(case),
    )
    dense = (dense, *torch.autograd.grad(dense, leaves(case), case["grad_out"]))
    pieces = varlen_reference_by_document(case)
    assert len(pieces) == len(dense)
    for name, piece, whole in zip(("out", "dq", "dk", "dv", "dsinks"), pieces, dense):
        torch.testing.assert_close(piece, whole, **tol(torch.float64, "grad"), msg=lambda m, name=name: f"{name}: {m}")

    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=gen, dtype=torch.float64), torch.randn(50, 16, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 50, (37,), generator=gen)
    target[::5] = IGNORE
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = torch.nn.functional.linear(h, w) * 0.5
    loss = torch.nn.functional.cross_entropy(3.0 * torch.tanh(logits / 3.0), target, ignore_index=IGNORE, reduction="sum")
    whole = (loss, *torch.autograd.grad(loss, (h, w)), logits)
    pieces = loss_reference_by_rows(hidden, weight, target, 3.0, 0.5, True, rows=10)
    for name, piece, full in zip(("loss_sum", "grad_hidden", "grad_weight", "logits"), pieces, whole):
        torch.testing.assert_close(piece, full.detach(), **tol(torch.float64, "grad"), msg=lambda m, name=name: f"{name}: {m}")

