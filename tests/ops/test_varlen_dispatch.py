"""Which implementation graphopt::varlen_attention runs, proven on the CPU.

The CUDA policy (``choose_cuda_impl`` / ``resolve_impl``) is a pure function of a ``VarlenCall``
and the ``VarlenLibraries`` present, so it is tested here over a matrix of fake environments:
flash-attn 3 present or absent, flash-attn 2 with and without its newer parameters, torch's
``varlen_attn`` with and without ``window_size`` / ``enable_gqa``, capabilities 7.5 to 10.0,
dtypes, head dims, options. The library call itself (RoPE once, the arguments each release takes,
D != Dv padding) runs against stand-in library functions that compute attention on the CPU. The
Triton path's "RoPE once before the kernels" mode runs in the interpreter (``triton_device``)
against the fp64 reference, and its cost model is checked on the shapes it is meant for.
"""

import logging
import sys
import types

import pytest
import torch

import graphopt.ops.varlen_attention as varlen_module
from graphopt.ops.varlen_attention import (
    VarlenCall,
    VarlenLibraries,
    choose_cuda_impl,
    resolve_impl,
    rotate_before_triton,
    unsupported,
    varlen_attention_reference,
)
from tests.support.tolerances import tol
from tests.support.varlen_cases import OPTION_CASES, leaves, make_case, options

# Parameter sets of the libraries' varlen functions, as releases shipped them (names only).
FA3 = frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q",
                 "seqused_k", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size",
                 "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin",
                 "return_attn_probs"})
FA3_BETA = frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                      "softmax_scale", "causal", "deterministic"})
FA2 = frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                 "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                 "return_attn_probs", "block_table"})
FA2_OLD = frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                     "softmax_scale", "causal", "return_attn_probs"})
TORCH_VARLEN = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale", "window_size",
                          "enable_gqa", "return_aux"})
TORCH_VARLEN_OLD = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal",
                              "return_aux"})

EVERYTHING = VarlenLibraries(flash_attn3=FA3, flash_attn=FA2, torch_varlen=TORCH_VARLEN)
NOTHING = VarlenLibraries()


def call(**overrides) -> VarlenCall:
    """A bf16 D=128 GQA call on an H100 without options, with ``overrides``."""
    fields = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128, value_dim=128, gqa=True,
                  window=False, softcap=False, sinks=False, deterministic=False)
    return VarlenCall(**(fields | overrides))


# (id, libraries, call overrides, the impl "auto" picks)
POLICY = [
    ("h100_everything", EVERYTHING, {}, "flash_attn3"),
    ("h100_fp16", EVERYTHING, dict(dtype=torch.float16), "flash_attn3"),
    ("h100_window_softcap", EVERYTHING, dict(window=True, softcap=True), "flash_attn3"),
    ("h100_mla_192_128", EVERYTHING, dict(head_dim=192, value_dim=128), "flash_attn3"),
    ("h100_d256", EVERYTHING, dict(head_dim=256, value_dim=256), "flash_attn3"),
    ("h100_deterministic", EVERYTHING, dict(deterministic=True), "flash_attn3"),
    ("a100_everything", EVERYTHING, dict(capability=(8, 0)), "flash_attn"),
    ("blackwell_everything", EVERYTHING, dict(capability=(10, 0)), "flash_attn"),
    ("h100_no_fa3", VarlenLibraries(flash_attn=FA2, torch_varlen=TORCH_VARLEN), {}, "flash_attn"),
    ("h100_fa3_beta_window", VarlenLibraries(flash_attn3=FA3_BETA, flash_attn=FA2), dict(window=True), "flash_attn"),
    ("h100_fa3_beta_plain", VarlenLibraries(flash_attn3=FA3_BETA), {}, "flash_attn3"),
    ("old_fa2_window", VarlenLibraries(flash_attn=FA2_OLD, torch_varlen=TORCH_VARLEN), dict(capability=(8, 0), window=True),
     "torch_varlen"),
    ("old_fa2_softcap", VarlenLibraries(flash_attn=FA2_OLD, torch_varlen=TORCH_VARLEN), dict(capability=(8, 0), softcap=True),
     "triton"),
    ("torch_only", VarlenLibraries(torch_varlen=TORCH_VARLEN), {}, "torch_varlen"),
    ("torch_only_window", VarlenLibraries(torch_varlen=TORCH_VARLEN), dict(window=True), "torch_varlen"),
    ("torch_only_softcap", VarlenLibraries(torch_varlen=TORCH_VARLEN), dict(softcap=True), "triton"),
    ("torch_only_mla", VarlenLibraries(torch_varlen=TORCH_VARLEN), dict(head_dim=192, value_dim=128), "torch_varlen"),
    ("torch_only_d100", VarlenLibraries(torch_varlen=TORCH_VARLEN), dict(head_dim=100, value_dim=100), "triton"),
    ("fa2_d100", VarlenLibraries(flash_attn=FA2), dict(head_dim=100, value_dim=100), "flash_attn"),
    ("torch_only_deterministic", VarlenLibraries(torch_varlen=TORCH_VARLEN), dict(deterministic=True), "triton"),
    ("old_torch_window", VarlenLibraries(torch_varlen=TORCH_VARLEN_OLD), dict(window=True), "triton"),
    ("old_torch_gqa", VarlenLibraries(torch_varlen=TORCH_VARLEN_OLD), {}, "triton"),
    ("old_torch_mha", VarlenLibraries(torch_varlen=TORCH_VARLEN_OLD), dict(gqa=False), "torch_varlen"),
    ("sinks_everything", EVERYTHING, dict(sinks=True), "triton"),
    ("fp32_everything", EVERYTHING, dict(dtype=torch.float32), "triton"),
    ("turing_everything", EVERYTHING, dict(capability=(7, 5)), "triton"),
    ("nothing_installed", NOTHING, {}, "triton"),
    ("nothing_installed_d64_window_softcap_sinks", NOTHING,
     dict(head_dim=64, value_dim=64, window=True, softcap=True, sinks=True), "triton"),
]


@pytest.mark.parametrize("libraries, overrides, want", [p[1:] for p in POLICY], ids=[p[0] for p in POLICY])
def test_auto_picks_the_first_implementation_that_takes_the_call(libraries, overrides, want):
    assert choose_cuda_impl(call(**overrides), libraries) == want
    assert resolve_impl("auto", call(**overrides), libraries) == want


def test_the_preference_order_is_fa3_fa2_torch_varlen_triton():
    assert varlen_module.CUDA_PREFERENCE == ("flash_attn3", "flash_attn", "torch_varlen", "triton")
    # each one is chosen exactly when those before it decline
    for index, impl in enumerate(varlen_module.CUDA_PREFERENCE):
        for overrides in (dict(), dict(window=True), dict(capability=(8, 0)), dict(dtype=torch.float32)):
            c = call(**overrides)
            chosen = choose_cuda_impl(c, EVERYTHING) == impl
            declined_before = all(unsupported(i, c, EVERYTHING) for i in varlen_module.CUDA_PREFERENCE[:index])
            assert chosen == (declined_before and unsupported(impl, c, EVERYTHING) is None)


@pytest.mark.parametrize(
    "libraries, overrides, match",
    [(EVERYTHING, dict(head_dim=192, value_dim=128, dtype=torch.float32), "takes bf16/fp16"),
     (EVERYTHING, dict(head_dim=192, value_dim=128, sinks=True), "takes no sinks"),
     (NOTHING, dict(head_dim=192, value_dim=128), "does not import"),
     (EVERYTHING, dict(head_dim=512, value_dim=512), "head dims up to 256"),
     (VarlenLibraries(flash_attn3=FA3), dict(head_dim=192, value_dim=128, capability=(8, 0)), "sm_90 only")],
    ids=["mla_fp32", "mla_sinks", "mla_no_library", "d512", "mla_a100_fa3_only"],
)
def test_no_implementation_raises_naming_each_reason(libraries, overrides, match):
    with pytest.raises(RuntimeError, match=match) as error:
        resolve_impl("auto", call(**overrides), libraries)
    message = str(error.value)
    assert "no CUDA implementation takes" in message
    assert "graphopt's Triton kernel takes head dims up to 128" in message
    for name in ("flash-attn 3", "flash-attn 2", "torch's varlen_attn"):
        assert name in message


# ---------------------------------------------------------------------------------------------
# Explicit impls
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["flash_attn3", "flash_attn", "torch_varlen"])
def test_explicit_library_impls_resolve_to_triton_for_what_only_the_kernel_takes(impl):
    for overrides in (dict(sinks=True), dict(dtype=torch.float32), dict(capability=(7, 5))):
        assert resolve_impl(impl, call(**overrides), EVERYTHING) == "triton"
    assert resolve_impl(impl, call(), EVERYTHING) == impl


def test_explicit_torch_varlen_resolves_to_triton_for_softcap_and_keeps_windows():
    assert resolve_impl("torch_varlen", call(softcap=True), EVERYTHING) == "triton"
    assert resolve_impl("torch_varlen", call(window=True), EVERYTHING) == "torch_varlen"
    assert resolve_impl("torch_varlen", call(window=True), VarlenLibraries(torch_varlen=TORCH_VARLEN_OLD)) == "triton"


def test_explicit_impl_that_nothing_it_allows_takes_raises_with_advice():
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot take .*D=192.*impl='flash_attn3' \(or 'auto'\)"):
        resolve_impl("triton", call(head_dim=192, value_dim=128), EVERYTHING)
    with pytest.raises(RuntimeError, match=r"impl='flash_attn' cannot take torch.float64"):
        resolve_impl("flash_attn", call(dtype=torch.float64), EVERYTHING)
    with pytest.raises(RuntimeError, match="cast q/k/v to bf16/fp16"):
        resolve_impl("flash_attn", call(head_dim=192, value_dim=128, dtype=torch.float32), EVERYTHING)


@pytest.mark.parametrize("impl, match", [("flash_attn3", "hopper"), ("flash_attn", "pip install flash-attn"),
                                         ("torch_varlen", "upgrade torch")])
def test_explicit_library_impls_that_do_not_import_raise(impl, match):
    with pytest.raises(RuntimeError, match=match):
        resolve_impl(impl, call(), NOTHING)


def test_explicit_library_impls_off_cuda_raise():
    cpu = call(device_type="cpu", capability=None)
    for impl in varlen_module.LIBRARY_IMPLS:
        with pytest.raises(RuntimeError, match="runs on CUDA only"):
            resolve_impl(impl, cpu, EVERYTHING)


def test_off_cuda_auto_is_torch_and_reads_no_library(monkeypatch):
    monkeypatch.setattr(VarlenLibraries, "detect", classmethod(lambda cls: pytest.fail("detected libraries on the CPU")))
    for device_type in ("cpu", "meta"):
        assert resolve_impl("auto", call(device_type=device_type, capability=None)) == "torch"
        assert resolve_impl("triton", call(device_type=device_type, capability=None)) == "triton"


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cudnn", call(), EVERYTHING)


# ---------------------------------------------------------------------------------------------
# Detection (faked by monkeypatching the helpers) and the call's key
# ---------------------------------------------------------------------------------------------


def test_detection_reads_the_helpers(monkeypatch):
    monkeypatch.setattr(varlen_module, "_flash_attn3_params", lambda: FA3_BETA)
    monkeypatch.setattr(varlen_module, "_flash_attn_params", lambda: None)
    monkeypatch.setattr(varlen_module, "_varlen_attn_params", lambda: TORCH_VARLEN_OLD)
    assert VarlenLibraries.detect() == VarlenLibraries(FA3_BETA, None, TORCH_VARLEN_OLD)
    assert resolve_impl("auto", call(window=True)) == "triton"
    assert resolve_impl("auto", call()) == "flash_attn3"
    assert resolve_impl("auto", call(capability=(8, 0), gqa=False)) == "torch_varlen"


def test_a_missing_or_broken_library_is_absent():
    assert varlen_module._signature_params("graphopt_no_such_module", "flash_attn_varlen_func") is None
    assert varlen_module._signature_params("math", "no_such_function") is None
    assert varlen_module._signature_params("math", "dist") == frozenset({"p", "q"})


def test_the_call_key_reads_the_tensors_and_the_deterministic_mode():
    case = make_case([5, 11], hq=4, hkv=2, d=16, r=16, dv=8, window=3, softcap=1.0, sinks=True)
    key = VarlenCall.of(case["q"], case["k"], case["v"], 3, 1.0, case["sinks"])
    assert key == VarlenCall("cpu", None, torch.float32, 16, 8, True, True, True, True, False)
    hash(key)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert VarlenCall.of(case["q"], case["k"], case["v"], -1, 0.0, None).deterministic
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_the_choice_is_logged_once_per_distinct_key(monkeypatch, caplog):
    monkeypatch.setattr(varlen_module, "_logged_choices", set())
    with caplog.at_level(logging.DEBUG, logger="graphopt"):
        for _ in range(3):
            resolve_impl("auto", call(), EVERYTHING)
        resolve_impl("auto", call(sinks=True), EVERYTHING)
        resolve_impl("flash_attn", call(sinks=True), EVERYTHING)
    records = [r for r in caplog.records if r.name == "graphopt.ops.varlen_attention"]
    assert len(records) == 3, [r.getMessage() for r in records]
    assert "-> 'flash_attn3'" in records[0].getMessage()
    assert "-> 'triton'" in records[1].getMessage() and "takes no sinks" in records[1].getMessage()
    assert "impl='flash_attn'" in records[2].getMessage()
    assert all(r.levelno == logging.DEBUG for r in records)


# ---------------------------------------------------------------------------------------------
# The library call, against stand-ins that compute attention on the CPU
# ---------------------------------------------------------------------------------------------


def _stand_in(params: frozenset, calls: list, returns_lse: bool = False):
    """A library varlen function with exactly ``params``: records its keyword arguments and
    computes causal per-document attention of the (already rotated) q, k, v in fp64."""

    def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
        assert set(kwargs) <= params, set(kwargs) - params
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and q.shape[2] == v.shape[2]
        calls.append(dict(kwargs, head_dim=q.shape[2]))
        window = -1 if kwargs.get("window_size", (-1, 0))[0] == -1 else kwargs["window_size"][0] + 1
        scale = kwargs.get("softmax_scale", kwargs.get("scale"))
        no_rotary = q.new_empty((q.shape[0], 0), dtype=torch.float32)
        out = varlen_attention_reference(q, k, v, no_rotary, no_rotary, cu_seqlens_q, scale, False, window,
                                         kwargs.get("softcap", 0.0)).contiguous()  # as the libraries return it
        return (out, None) if returns_lse else out

    return attention


def _library_case(**overrides):
    return make_case(**(dict(lengths=[5, 1, 17, 9], hq=4, hkv=2, d=24, r=16) | overrides))


def _run_library(case, impl):
    out = varlen_module._library_varlen(
        case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"], 32, case["scale"],
        case["interleaved"], impl, case["window"], case["softcap"],
    )
    return (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))


def _reference(case):
    out = varlen_attention_reference(case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
                                     case["scale"], case["interleaved"], case["window"], case["softcap"])
    return (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))


def _assert_matches(got, want):
    torch.testing.assert_close(got[0], want[0], **tol(torch.float32))
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, **tol(torch.float32, "grad"))


@pytest.mark.parametrize("impl, module, params", [("flash_attn3", "flash_attn_interface", FA3),
                                                  ("flash_attn", "flash_attn", FA2)])
@pytest.mark.parametrize("overrides", [{}, dict(window=4, softcap=2.0), dict(dv=16), dict(d=16, r=16, dv=24)],
                         ids=["plain", "window_softcap", "dv_narrower", "dv_wider"])
def test_flash_attn_calls_take_rope_once_and_the_options(monkeypatch, impl, module, params, overrides):
    calls = []
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(flash_attn_varlen_func=_stand_in(params, calls, impl == "flash_attn3")))
    case = _library_case(**overrides)
    got = _run_library(case, impl)
    _assert_matches(got, _reference(case))
    assert got[0].is_contiguous() and got[0].shape == (case["q"].shape[0], case["q"].shape[1], case["v"].shape[2])
    (kwargs,) = calls
    assert kwargs["causal"] is True and kwargs["softmax_scale"] == case["scale"]
    assert kwargs["head_dim"] == max(case["q"].shape[2], case["v"].shape[2])
    assert kwargs.get("window_size") == (None if case["window"] == -1 else (case["window"] - 1, 0))
    assert kwargs.get("softcap") == (case["softcap"] or None)
    assert ("dropout_p" in kwargs) == (impl == "flash_attn") and "deterministic" not in kwargs


def test_flash_attn_is_asked_for_a_deterministic_backward_in_deterministic_mode(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_stand_in(FA2, calls)))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        _run_library(_library_case(), "flash_attn")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert calls[0]["deterministic"] is True


@pytest.mark.parametrize("params", [TORCH_VARLEN, TORCH_VARLEN - {"scale"}],
                         ids=["with_scale", "without_scale"])
def test_torch_varlen_call_takes_rope_once_and_its_scale(monkeypatch, params):
    calls = []
    fn = _stand_in(params | {"softmax_scale"}, calls)

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        if "scale" not in kwargs:  # its fixed scale, 1 / sqrt(head dim)
            kwargs["scale"] = query.shape[2] ** -0.5
        if kwargs.pop("enable_gqa", False) is False:
            assert query.shape[1] == key.shape[1]
        kwargs["softmax_scale"] = kwargs.pop("scale")
        return fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", types.SimpleNamespace(varlen_attn=varlen_attn))
    monkeypatch.setattr(varlen_module, "_varlen_attn_params", lambda: params)
    case = _library_case(window=4, dv=16)
    _assert_matches(_run_library(case, "torch_varlen"), _reference(case))
    assert calls[0]["window_size"] == (3, 0)


# ---------------------------------------------------------------------------------------------
# impl="triton": RoPE in the tiles or once before the kernels
# ---------------------------------------------------------------------------------------------


# 16-bit at D = 128 with 4 query heads per kv head: forward tiles of 64 rows hold 4 heads of 16
# tokens, dK/dV tiles 32 keys, dQ tiles 32 rows of one head.
LLAMA_TILES, LLAMA_HEADS = (16, 32, 32), (4, 1)


def test_rotating_once_wins_for_long_documents_and_loses_for_short_small_heads():
    # Llama-3-8B heads (32/8, D = R = 128, bf16, fp32 tables): once, whatever the documents.
    for length in (16, 2048, 32768):
        assert rotate_before_triton(32, 8, 128, 128, 2, 4, length, LLAMA_TILES, LLAMA_HEADS)
    # MHA with 8 heads of 64, bf16 tables: in the tiles for 16-token documents, once for 4096.
    assert not rotate_before_triton(8, 8, 64, 64, 2, 2, 16, (64, 16, 64))
    assert rotate_before_triton(8, 8, 64, 64, 2, 2, 4096, (64, 16, 64))
    assert not rotate_before_triton(32, 8, 128, 0, 2, 4, 32768, LLAMA_TILES, LLAMA_HEADS)  # nothing to rotate


def test_query_tiles_take_several_heads_of_a_kv_group():
    # As many heads of the group as leave 16-token tiles, a power of two dividing the group, in
    # tiles of 64 rows or more (smaller ones spill when packed).
    assert [varlen_module._heads_per_tile(g, 64) for g in (1, 2, 3, 4, 6, 8)] == [1, 2, 1, 4, 2, 4]
    assert [varlen_module._heads_per_tile(4, m) for m in (16, 32, 64, 128)] == [1, 1, 4, 4]
    assert varlen_module._heads_per_tile(8, 128) == 8
    # The interpreter packs two heads of a group in 32 rows (16 tokens), so CPU tests cover it;
    # the dK/dV kernel's key tiles hold one kv head.
    q = torch.empty(8, 4, 16)
    meta = varlen_module._triton_meta(q, q, torch.empty(8, 16), False)
    assert varlen_module._triton_config(q, meta, "fwd", 2) == dict(BLOCK_M=32, BLOCK_N=16, HEADS=2)
    assert varlen_module._triton_config(q, meta, "dq", 1) == dict(BLOCK_M=16, BLOCK_N=16, HEADS=1)
    assert "HEADS" not in varlen_module._triton_config(q, meta, "dkdv", 2)
    assert varlen_module._query_grid(40, 4, dict(BLOCK_M=64, HEADS=4)) == (3, 1)


def test_rotating_once_only_gets_more_attractive_with_length():
    lengths = [1, 16, 64, 100, 512, 1000, 4096, float("inf")]
    for shape in [(8, 8, 64, 64, 2, 2), (4, 1, 32, 16, 4, 4), (16, 4, 128, 64, 2, 4), (2, 2, 16, 16, 4, 4)]:
        decisions = [rotate_before_triton(*shape, length, (64, 16, 64)) for length in lengths]
        assert decisions == sorted(decisions), (shape, decisions)
        assert decisions[-1]


def test_a_symbolic_max_seqlen_counts_as_unbounded():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    symbolic = ShapeEnv().create_unbacked_symint()
    assert varlen_module._document_length_bound(100) == 100.0
    assert varlen_module._document_length_bound(torch.SymInt(symbolic.node.wrap_int(100))) == 100.0
    assert varlen_module._document_length_bound(symbolic) == float("inf")


class _RecordTritonCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the rotary width of every varlen_attention_triton_fwd call."""

    def __init__(self):
        super().__init__()
        self.rotary_dims = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.graphopt.varlen_attention_triton_fwd.default:
            self.rotary_dims.append(args[3].shape[1])
        return func(*args, **(kwargs or {}))


ROTATION_CASES = {
    "gqa_partial_rotary": dict(lengths=[5, 1, 17, 9, 1, 30], hq=4, hkv=2, d=24, r=16),
    "mqa_interleaved": dict(lengths=[20, 3, 25], hq=4, hkv=1, d=16, r=16, interleaved=True),
    "window_softcap_sinks": OPTION_CASES["window_softcap_sinks"],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case_name", list(ROTATION_CASES))
@pytest.mark.parametrize("rotate_first", [True, False], ids=["once", "in_tiles"])
def test_triton_matches_reference_with_rope_once_or_in_the_tiles(monkeypatch, triton_device, case_name, dtype,
                                                                 rotate_first):
    monkeypatch.setattr(varlen_module, "_rotates_before_triton", lambda *args: rotate_first)
    case = make_case(**ROTATION_CASES[case_name], dtype=dtype, device=triton_device)
    recorder = _RecordTritonCalls()
    with recorder:
        out = torch.ops.graphopt.varlen_attention(
            case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"], case["q"].shape[0],
            case["scale"], case["interleaved"], "triton", *options(case),
        )
    got = (out, *torch.autograd.grad(out, leaves(case), case["grad_out"]))
    assert recorder.rotary_dims == [0 if rotate_first else case["cos"].shape[1]]
    ref = varlen_attention_reference(case["q"], case["k"], case["v"], case["cos"], case["sin"], case["cu_seqlens"],
                                     case["scale"], case["interleaved"], *options(case))
    want = (ref, *torch.autograd.grad(ref, leaves(case), case["grad_out"]))
    torch.testing.assert_close(got[0], want[0], **tol(dtype))
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[1:], want[1:]):
        torch.testing.assert_close(g, w, **tol(dtype, "grad"), msg=lambda m, name=name: f"{name}: {m}")


def test_rope_once_is_decided_from_the_gpu_tiles(monkeypatch):
    seen = []
    monkeypatch.setattr(varlen_module, "rotate_before_triton", lambda *args: seen.append(args) or False)
    q = torch.empty(10, 32, 128, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(10, 8, 128, dtype=torch.bfloat16, device="meta")
    cos = torch.empty(10, 128, device="meta")
    varlen_module._rotates_before_triton(q, k, v, cos, 4096)
    assert seen == [(32, 8, 128, 128, 2, 4, 4096.0, LLAMA_TILES, LLAMA_HEADS)]


def test_fake_tensors_get_their_metadata_without_the_chosen_library(monkeypatch):
    # Dynamo's example values and a pass's node annotation run the op on plain fake tensors: the
    # output must not depend on (or call) the library the policy picks.
    monkeypatch.setattr(varlen_module, "resolve_impl", lambda impl, call: "flash_attn")
    monkeypatch.setattr(varlen_module, "_library_varlen", lambda *args: pytest.fail("a library ran on fake tensors"))
    case = make_case([5, 11], hq=4, hkv=2, d=24, r=16, dv=8, sinks=True)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v, sinks = (mode.from_tensor(case[name]) for name in ("q", "k", "v", "sinks"))
        cos, sin, cu_seqlens = (mode.from_tensor(case[name]) for name in ("cos", "sin", "cu_seqlens"))
        out = torch.ops.graphopt.varlen_attention(q, k, v, cos, sin, cu_seqlens, 16, 0.2, False, "auto", sinks=sinks)
    assert out.shape == (16, 4, 8) and out.dtype == torch.float32 and out.is_contiguous() and out.requires_grad
