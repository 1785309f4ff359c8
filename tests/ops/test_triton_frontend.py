"""Every Triton kernel launch of the ops gets through Triton's front end for a CUDA target, with its
arguments typed as eager Triton types them and as Inductor does.

Why. Under ``torch.compile`` Inductor does not call the kernel through Triton's launcher: it emits
the kernel's source (and that of the ``@triton.jit`` helpers it calls) into its own module, with a
signature of its own (``define_user_defined_triton_kernel`` in ``torch/_inductor/codegen/wrapper.py``,
``signature_of`` in ``torch/_inductor/codegen/triton_utils.py``). There a Python float argument is
an **fp64** scalar, where Triton's launcher passes fp32, and an integer equal to 1 is a constexpr.
A kernel that mixes such a scalar into fp32 blocks can compile in eager and fail under Inductor;
Triton raises that ``CompilationError`` while lowering the Python AST to TTIR, before any GPU code
exists, so it is reproducible on a machine without a GPU.

How. Each op is called on ``meta`` tensors shaped as on a GPU, with ``wrap_triton`` replaced by a
recorder, so the launcher runs its real argument and constexpr logic (GPU block sizes, flags per
dtype) and no kernel runs. Each recorded launch is typed both ways and lowered to TTIR for an sm_90
target by ``tests/support/triton_frontend.py``, in a process of its own (one where ``triton.jit``
compiles rather than interprets).

What it proves: the kernels' source, with the constexprs the launchers pass on CUDA and with scalar
arguments typed either way, passes Triton's front end (the stage of the reported failure). It does
not prove that later stages (TTGIR, PTX) succeed or that the results are right; the GPU tests in
``test_cuda_kernels.py`` cover those.
"""

import contextlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import graphopt.ops.triton_cross_entropy as cross_entropy_module
import graphopt.ops.varlen_attention as varlen_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.int32: "*i32", torch.int64: "*i64"}
# How Python floats reach a kernel: fp32 through Triton's launcher (eager), fp64 through Inductor.
FLOAT_TYPES = ("fp32", "fp64")


class LaunchRecorder:
    """Stands in for ``wrap_triton``: ``recorder(kernel)[grid](*args, **kwargs)`` records the launch."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return _Grid()


@contextlib.contextmanager
def recorded_launches(monkeypatch, *modules):
    recorder = LaunchRecorder()
    with monkeypatch.context() as patch:
        for module in modules:
            patch.setattr(module, "wrap_triton", recorder)
        yield recorder.launches


def typed_launch(kernel, args: tuple, kwargs: dict, float_type: str) -> dict:
    """One launch as ``triton_frontend`` reads it: tensors as pointers, integers equal to 1 (and
    None) as constexprs, other integers i32 (i64 beyond its range), floats ``float_type``."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexpr_names = {name for name, annotation in kernel.fn.__annotations__.items() if "constexpr" in str(annotation)}
    values = dict(zip(names, args)) | kwargs  # launch options (num_warps) are not parameters
    signature, constexprs = {}, {}
    for name in names:
        value = values[name]
        if name in constexpr_names or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = float_type
        elif type(value) is int:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            raise TypeError(f"{name}: unexpected launch argument {value!r}")
    return dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, signature=signature, constexprs=constexprs)


def assert_front_end_compiles(launches) -> None:
    """Every launch, typed as eager Triton and as Inductor type it, lowers to TTIR that computes
    nothing in fp64 (a wider scalar must not widen the kernel's arithmetic)."""
    assert launches, "the op launched no kernel"
    typed = [typed_launch(*launch, float_type) for launch in launches for float_type in FLOAT_TYPES]
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_frontend"], input=json.dumps(typed), capture_output=True,
        text=True, cwd=REPO_ROOT, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    failures = []
    for launch, outcome in zip(typed, json.loads(result.stdout)):
        where = f"{launch['kernel']} {launch['signature']} {launch['constexprs']}"
        if outcome["error"] is not None:
            failures.append(f"{where}\n{outcome['error']}")
        elif outcome["fp64_ops"]:
            failures.append(f"{where}\ncomputes in fp64: {sorted(set(outcome['fp64_ops']))}")
    assert not failures, "\n\n".join(failures)


def meta_randn(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# Varlen attention: GPU block sizes need T >= 64 to cover several tiles; D up to 128.
VARLEN_CASES = {
    "gqa_d128_half": dict(hq=16, hkv=4, d=128, r=128, interleaved=False),
    "mha_partial_interleaved": dict(hq=4, hkv=4, d=96, r=32, interleaved=True),
    "mqa_dv_differs": dict(hq=8, hkv=1, d=64, r=64, dv=32, interleaved=False),
    "gqa_window_softcap_sinks": dict(hq=16, hkv=4, d=128, r=128, interleaved=False, window=128, softcap=50.0,
                                     sinks=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_attention_kernels_compile_for_cuda(monkeypatch, dtype):
    launches = []
    for case in VARLEN_CASES.values():
        launches += record_varlen_attention(monkeypatch, case, dtype)
    names = [kernel.fn.__name__ for kernel, _, _ in launches[:4]]
    assert names == ["varlen_attention_fwd_kernel", "varlen_attention_bwd_preprocess_kernel",
                     "varlen_attention_bwd_dkdv_kernel", "varlen_attention_bwd_dq_kernel"]
    assert_front_end_compiles(launches)


def record_varlen_attention(monkeypatch, case: dict, dtype: torch.dtype) -> list:
    """The kernel launches of the Triton forward and backward for CUDA-shaped inputs."""
    n_tokens, hq, hkv, d, r = 300, case["hq"], case["hkv"], case["d"], case["r"]
    dv = case.get("dv", d)
    q, k, v = (meta_randn(n_tokens, h, width, dtype=dtype) for h, width in ((hq, d), (hkv, d), (hkv, dv)))
    cos = sin = meta_randn(n_tokens, r, dtype=torch.float32)
    cu_seqlens = torch.empty(5, dtype=torch.int32, device="meta")
    args = (q, k, v, cos, sin, cu_seqlens, d**-0.5, case["interleaved"])
    sinks = meta_randn(hq, dtype=torch.float32) if case.get("sinks") else None
    options = (case.get("window", -1), case.get("softcap", 0.0), sinks)
    with recorded_launches(monkeypatch, varlen_module) as launches:
        out, lse = varlen_module.varlen_attention_triton_fwd(*args, *options)
        varlen_module.varlen_attention_triton_bwd(torch.empty_like(out), *args[:6], out, lse, *args[6:], *options)
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_kernel_compiles_for_cuda(monkeypatch, dtype):
    logits = meta_randn(128, 128256, dtype=dtype)
    target = torch.empty(128, dtype=torch.int64, device="meta")
    with recorded_launches(monkeypatch, cross_entropy_module) as launches:
        for softcap in (0.0, 30.0):
            for grad in (torch.empty_like(logits), None):
                cross_entropy_module.cross_entropy_loss_and_grad(logits, target, grad, -100, softcap)
    assert len(launches) == 4
    assert_front_end_compiles(launches)
