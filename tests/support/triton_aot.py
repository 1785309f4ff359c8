"""Ahead-of-time resource check: every launch configuration the ops' Triton kernels can get is
compiled to cubin for sm_90 and sm_80, on a machine without a GPU, and its shared memory,
registers and spills are read.

``python -m tests.support.triton_aot [--json PATH] [--jobs N]`` prints one table row per compiled
kernel and target (and, with ``--json``, writes the rows as a JSON list for
``tests/ops/test_kernel_resources.py``).

Why. A kernel that asks for more shared memory than its GPU lets a block opt in to fails at load
time (``OutOfResources``), and one that spills registers runs slowly. Neither shows in TTIR (what
``triton_frontend.py`` checks) or under ``TRITON_INTERPRET=1``: both are properties of the cubin,
which Triton's compiler and ptxas produce without a GPU.

How.

1. Launches. Each launcher is called on ``meta`` tensors shaped as on a GPU, with ``wrap_triton``
   replaced by a recorder, so that what gets compiled is the launcher's own choice (block sizes,
   ``num_warps``, ``num_stages``, constexpr flags) for every case in ``varlen_cases`` and
   ``cross_entropy_cases``.
2. Specialization. Each launch is bound by the JIT's own code (``create_function_from_signature``
   and ``JITFunction._pack_args``, as ``JITFunction.run`` does in triton 3.9), with every tensor
   passed as a 16-byte-aligned pointer (PyTorch's CUDA allocator aligns blocks to 512 B; views at
   an offset of a multiple of 16 bytes stay aligned). So integers divisible by 16 (strides, T,
   D, V) get ``tt.divisibility = 16``, integers equal to 1 become constexprs, pointers get
   ``tt.divisibility = 16``, as a launch on a GPU would. Launches with the same specialization are
   one kernel and compile once (D = 80, 96 and 128 with full rotary are the same kernel).
3. Compile. ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` down to cubin, with ptxas's
   ``-v`` log captured (``TRITON_DUMP_PTXAS_LOG``) in a fresh cache (``TRITON_ALWAYS_COMPILE``).
   Shared memory is the kernel's ``metadata.shared`` (plus any static ``smem`` ptxas reports);
   registers, spill stores and spill loads come from the log.
4. Limits. What ``CompiledKernel._init_handles`` checks when a kernel is loaded: shared memory
   against ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` of the target (``SHARED_MEMORY_LIMITS``),
   and the threads of a block against those its registers allow (65536 registers per block,
   allocated per warp in units of 256).

It runs as its own process, started without ``TRITON_INTERPRET`` (for the reason given in
``triton_frontend.py``), and compiles in ``--jobs`` worker processes.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import types

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

import graphopt.ops.triton_cross_entropy as cross_entropy_module
import graphopt.ops.varlen_attention as varlen_module
from graphopt.ops.linear_cross_entropy import gpu_chunk_size

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
# cudaDevAttrMaxSharedMemoryPerBlockOptin: H100 227 KB, A100 163 KB (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"). sm_86/sm_89 parts allow only 99 KB.
SHARED_MEMORY_LIMITS = {"sm_90": 232448, "sm_80": 166912}
REGISTERS_PER_BLOCK = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in units of 256
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# ---------------------------------------------------------------------------------------------
# The cases: what a model can hand the launchers
# ---------------------------------------------------------------------------------------------

N_TOKENS = 4096  # a multiple of 16, as packed and padded training batches are


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    """One call of the varlen attention forward + backward (q/k/v in ``dtype``, cos/sin in
    ``table_dtype``, or in q's dtype as HF's rotary modules return them)."""

    dtype: torch.dtype
    d: int
    dv: int
    rotary: int
    interleaved: bool = False
    hq: int = 32
    hkv: int = 8
    window: int = -1
    softcap: float = 0.0
    sinks: bool = False
    table_dtype: torch.dtype | None = None

    @property
    def label(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], f"D{self.d}" + (f"/Dv{self.dv}" if self.dv != self.d else "")]
        parts.append(f"R{self.rotary}" + ("i" if self.interleaved else ""))
        parts.append("mha" if self.hq == self.hkv else f"gqa{self.hq // self.hkv}")
        parts += [flag for flag, on in (("window", self.window != -1), ("softcap", self.softcap > 0.0),
                                        ("sinks", self.sinks)) if on]
        if self.table_dtype is not None:
            parts.append(f"{DTYPE_NAMES[self.table_dtype]}-tables")
        return " ".join(parts)


# (D, Dv, R, interleaved): full rotary per head dim, partial interleaved rotary (GLM, Cohere-like),
# no rotary (R = 0: every channel passes through; also what the Triton path's rotate-once mode
# launches, narrow tiles at D = 64), and D != Dv. D = 192 and 256 are beyond the
# op's TRITON_MAX_HEAD_DIM: they are listed to show that the launcher refuses them.
VARLEN_LAYOUTS = [(64, 64, 64, False), (80, 80, 80, False), (96, 96, 96, False), (128, 128, 128, False),
                  (128, 128, 64, True), (64, 64, 32, True), (128, 128, 0, False), (64, 64, 0, False), (128, 64, 128, False),
                  (192, 128, 64, False), (256, 256, 256, False)]
VARLEN_OPTIONS = [dict(), dict(window=4096, softcap=50.0, sinks=True)]


def varlen_cases() -> list[VarlenCase]:
    cases = []
    for dtype in DTYPE_NAMES:
        for d, dv, rotary, interleaved in VARLEN_LAYOUTS:
            for options in VARLEN_OPTIONS:
                cases.append(VarlenCase(dtype, d, dv, rotary, interleaved, **options))
        cases.append(VarlenCase(dtype, 128, 128, 128, hq=32, hkv=32))  # MHA: group_size 1 is a constexpr
    cases.append(VarlenCase(torch.bfloat16, 128, 128, 128, table_dtype=torch.float32))  # fp32 tables (autocast)
    return cases


@dataclasses.dataclass(frozen=True)
class CrossEntropyCase:
    dtype: torch.dtype
    vocab: int
    softcap: float
    with_grad: bool

    @property
    def label(self) -> str:
        grad = "grad" if self.with_grad else "loss"
        return f"{DTYPE_NAMES[self.dtype]} V{self.vocab} {grad}" + (" softcap" if self.softcap else "")


# Vocabularies: 8000 and 16384 are one pass (a row in one block), the others two (Llama 2, GPT-2,
# Llama 3, Qwen 2, Gemma).
CROSS_ENTROPY_VOCABS = (8000, 16384, 32000, 50257, 128256, 151936, 262144)
# An H100's properties, to cut the chunks as the op does on one (rows only change divisibility).
H100 = dict(multi_processor_count=132, total_memory=80 * 2**30, L2_cache_size=50 * 2**20)


def cross_entropy_cases() -> list[CrossEntropyCase]:
    return [CrossEntropyCase(dtype, vocab, softcap, with_grad) for dtype in DTYPE_NAMES
            for vocab in CROSS_ENTROPY_VOCABS for softcap in (0.0, 30.0) for with_grad in (True, False)]


# ---------------------------------------------------------------------------------------------
# Recording the launches the launchers make
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_launches(*modules):
    """``wrap_triton(kernel)[grid](*args, **kwargs)`` in ``modules`` appends ``(kernel, args,
    kwargs)`` to the yielded list instead of launching."""
    launches = []

    def recorder(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

        return _Grid()

    saved = [module.wrap_triton for module in modules]
    for module in modules:
        module.wrap_triton = recorder
    try:
        yield launches
    finally:
        for module, original in zip(modules, saved):
            module.wrap_triton = original


def meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def record_varlen(case: VarlenCase) -> list:
    """The forward's and the backward's launches for ``case``; raises what the launcher raises."""
    table_dtype = case.table_dtype or case.dtype
    q, k = meta(N_TOKENS, case.hq, case.d, dtype=case.dtype), meta(N_TOKENS, case.hkv, case.d, dtype=case.dtype)
    v = meta(N_TOKENS, case.hkv, case.dv, dtype=case.dtype)
    cos = sin = meta(N_TOKENS, case.rotary, dtype=table_dtype)
    cu_seqlens = torch.empty(9, dtype=torch.int32, device="meta")
    sinks = meta(case.hq, dtype=torch.float32) if case.sinks else None
    args = (q, k, v, cos, sin, cu_seqlens, case.d**-0.5, case.interleaved)
    options = (case.window, case.softcap, sinks)
    with recorded_launches(varlen_module) as launches:
        out, lse = varlen_module.varlen_attention_triton_fwd(*args, *options)
        varlen_module.varlen_attention_triton_bwd(torch.empty_like(out), *args[:6], out, lse, *args[6:], *options)
    return launches


def record_cross_entropy(case: CrossEntropyCase) -> list:
    """The per-chunk launch of ``linear_cross_entropy``'s Triton path (chunks as it cuts them)."""
    rows = gpu_chunk_size(16384, 2048, case.vocab, case.vocab * case.dtype.itemsize, types.SimpleNamespace(**H100))
    logits = meta(rows, case.vocab, dtype=case.dtype)
    target = torch.empty(rows, dtype=torch.int64, device="meta")
    grad = logits if case.with_grad else None  # in place, as the op does when the logits are not kept
    with recorded_launches(cross_entropy_module) as launches:
        cross_entropy_module.cross_entropy_loss_and_grad(logits, target, grad, -100, case.softcap)
    return launches


# ---------------------------------------------------------------------------------------------
# The JIT's specialization of a launch, and its compilation
# ---------------------------------------------------------------------------------------------


def _as_pointer(value):
    """A tensor argument as the JIT sees a 16-byte-aligned one (its dtype; ``data_ptr() == 0``)."""
    return MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value


def jit_specialization(kernel, args: tuple, kwargs: dict, target: GPUTarget) -> dict:
    """``signature``, ``constexprs``, ``attrs`` and ``options`` exactly as ``JITFunction.run``
    builds them for this launch on ``target`` (triton 3.9)."""
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*map(_as_pointer, args), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return dict(signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__)


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def compile_to_cubin(job: dict) -> dict:
    """Compile one specialized kernel for one target (in a worker process); resources or error."""
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    spec = job["spec"]
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by make_cubin
            compiled = triton.compile(ASTSource(kernel, spec["signature"], spec["constexprs"], spec["attrs"]),
                                      target=TARGETS[job["target"]], options=spec["options"])
    except Exception as error:  # reported in the table and failed by the test
        return dict(error=f"{type(error).__name__}: {error}"[:4000])
    text = log.getvalue()
    registers, frame = PTXAS_REGISTERS.search(text), PTXAS_FRAME.search(text)
    if registers is None or frame is None:
        return dict(error=f"no ptxas -v report in the compile log:\n{text[-2000:]}")
    static_smem = sum(int(n) for n in PTXAS_SMEM.findall(text))
    return dict(error=None, shared=compiled.metadata.shared + static_smem, registers=int(registers.group(1)),
                stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)),
                num_warps=compiled.metadata.num_warps, compile_s=round(time.perf_counter() - start, 2))


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------

SHORT_NAMES = {"varlen_attention_fwd_kernel": "fwd", "varlen_attention_bwd_preprocess_kernel": "bwd_pre",
               "varlen_attention_bwd_dkdv_kernel": "dkdv", "varlen_attention_bwd_dq_kernel": "dq",
               "_cross_entropy_loss_and_grad_kernel": "xent"}
LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_HALF", "BLOCK_PASS", "BLOCK_DV", "BLOCK_V", "HEADS")
FLAG_KEYS = ("INTERLEAVED", "HAS_PASS", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_SINKS", "COMPUTE_GRAD", "SINGLE_PASS")


def describe_launch(kernel, args: tuple, kwargs: dict, spec: dict) -> str:
    """``fwd bf16 M64 N64 HALF64 DV128 w4 s3 +HAS_SOFTCAP``: what the launcher chose."""
    first_pointer = next(t for t in spec["signature"].values() if t.startswith("*"))
    parts = [SHORT_NAMES.get(kernel.fn.__name__, kernel.fn.__name__), first_pointer[1:]]
    parts += [f"{key.removeprefix('BLOCK_')}{kwargs[key]}" for key in LAUNCH_KEYS if key in kwargs]
    parts += [f"w{spec['options']['num_warps']}", f"s{spec['options']['num_stages']}"]
    parts += [f"+{key}" for key in FLAG_KEYS if kwargs.get(key)]
    if spec["signature"].get("group_size") == "constexpr":
        parts.append("group=1")
    if spec["signature"].get("cos_ptr", first_pointer) != first_pointer:
        parts.append(f"tables {spec['signature']['cos_ptr'][1:]}")
    return " ".join(parts)


def collect_jobs(targets) -> tuple[list[dict], list[dict]]:
    """(jobs, refusals): one job per distinct (specialization, target), with the cases using it."""
    jobs, refusals = {}, []
    cases = [(case, record_varlen) for case in varlen_cases()]
    cases += [(case, record_cross_entropy) for case in cross_entropy_cases()]
    for case, record in cases:
        try:
            launches = record(case)
        except (RuntimeError, ValueError) as error:  # the op's own checks refuse the shape
            refusals.append(dict(case=case.label, reason=str(error).splitlines()[0]))
            continue
        for kernel, args, kwargs in launches:
            for target in targets:
                spec = jit_specialization(kernel, args, kwargs, TARGETS[target])
                key = repr((kernel.fn.__module__, kernel.fn.__name__, target, spec))
                job = jobs.setdefault(key, dict(
                    module=kernel.fn.__module__, kernel=kernel.fn.__name__, target=target, spec=spec,
                    config=describe_launch(kernel, args, kwargs, spec), dtype=DTYPE_NAMES[case.dtype], cases=[]))
                if case.label not in job["cases"]:
                    job["cases"].append(case.label)
    return list(jobs.values()), refusals


def compile_all(jobs: list[dict], n_jobs: int) -> list[dict]:
    """Every job compiled in ``n_jobs`` spawned processes (a fresh Triton cache, ptxas -v logged)."""
    with tempfile.TemporaryDirectory(prefix="triton_aot_") as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        work = [{key: job[key] for key in ("module", "kernel", "target", "spec")} for job in jobs]
        # the largest kernels first, so that the workers finish together
        order = sorted(range(len(jobs)), key=lambda i: jobs[i]["config"].startswith(("bwd_pre", "xent")))
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip(order, pool.map(compile_to_cubin, [work[i] for i in order])))
    rows = []
    for i, job in enumerate(jobs):
        result = results[i]
        row = dict(target=job["target"], config=job["config"], dtype=job["dtype"], cases=job["cases"], **result)
        row["shared_limit"] = SHARED_MEMORY_LIMITS[job["target"]]
        if result["error"] is None:
            per_warp = -(-result["registers"] * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
            row["registers_per_block"] = per_warp * result["num_warps"]
        rows.append(row)
    return rows


def ptxas_versions() -> dict:
    versions = {}
    for target, tool in (("sm_80", knobs.nvidia.ptxas), ("sm_90", knobs.nvidia.ptxas_blackwell)):
        try:
            versions[target] = f"{tool.path} (release {tool.version})"
        except RuntimeError as error:  # no ptxas found
            versions[target] = None
            print(f"{target}: {error}", file=sys.stderr)
    return versions


def format_table(rows: list[dict], refusals: list[dict]) -> str:
    header = ("target", "config", "smem B", "limit B", "regs", "spill st/ld B", "cases")
    lines = [header]
    for row in sorted(rows, key=lambda r: (r["target"], r["config"])):
        cases = ", ".join(row["cases"][:3]) + (f" (+{len(row['cases']) - 3})" if len(row["cases"]) > 3 else "")
        if row["error"] is not None:
            lines.append((row["target"], row["config"], "ERROR", "", "", "", row["error"].splitlines()[0][:80]))
            continue
        over = " OVER" if row["shared"] > row["shared_limit"] else ""
        regs = f"{row['registers']}" + (" OVER" if row["registers_per_block"] > REGISTERS_PER_BLOCK else "")
        lines.append((row["target"], row["config"], f"{row['shared']}{over}", str(row["shared_limit"]), regs,
                      f"{row['spill_stores']}/{row['spill_loads']}", cases))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    by_reason = {}
    for refusal in refusals:
        by_reason.setdefault(refusal["reason"], []).append(refusal["case"])
    text += [f"refused by the op ({len(cases)} cases, e.g. {cases[0]}): {reason}" for reason, cases in by_reason.items()]
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    arguments = parser.parse_args()
    if knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    versions = ptxas_versions()
    missing = [target for target in arguments.targets if versions[target] is None]
    if missing:
        print(f"no ptxas for {', '.join(missing)}", file=sys.stderr)
        return 3
    jobs, refusals = collect_jobs(arguments.targets)
    rows = compile_all(jobs, max(1, arguments.jobs))
    print(f"triton {triton.__version__}, ptxas: {versions}")
    print(format_table(rows, refusals))
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump(dict(triton=triton.__version__, ptxas=versions, rows=rows, refusals=refusals), file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
