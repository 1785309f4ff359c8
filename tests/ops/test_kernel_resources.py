"""Every launch configuration of the ops' Triton kernels would load on the GPUs we target, and the
bf16/fp16 ones do not spill registers: checked ahead of time, without a GPU.

How. ``tests/support/triton_aot.py`` (its own process, without ``TRITON_INTERPRET``) records the
launches the launchers make on GPU-shaped ``meta`` inputs (every dtype, head-dim and rotary layout,
window/softcap/sinks flag set and vocabulary it lists), binds each as ``JITFunction.run`` would
(16-byte-aligned pointers, ``tt.divisibility = 16`` on integers divisible by 16, integers equal to
1 as constexprs), compiles it to cubin for sm_90 and sm_80 with Triton's compiler and ptxas, and
reads shared memory from the kernel's metadata and registers and spills from ptxas's ``-v`` log.
It runs once per test session; its table is printed to the terminal.

Fails for a configuration that does not compile, that needs more shared memory than its target
lets a block opt in to, or whose registers leave fewer threads than its ``num_warps`` (those two
would raise ``OutOfResources`` at launch), and for register spills in bf16/fp16 configurations.
fp32 spills are reported, not failed: fp32 is the exactness path, not the fast one.

Not proved: that the kernels run or are right (``test_cuda_kernels.py`` on a GPU), nor anything
for tensors whose pointers or strides are not 16-byte aligned (a different specialization).
Skipped when Triton finds no ptxas.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NO_PTXAS = 3  # triton_aot's exit status when Triton finds no ptxas
KERNELS = ("fwd", "bwd_pre", "dkdv", "dq", "xent")


@pytest.fixture(scope="module")
def report(tmp_path_factory, pytestconfig) -> dict:
    """triton_aot's rows, compiled once per session (in a fresh Triton cache), its table printed."""
    output = tmp_path_factory.mktemp("triton_aot") / "rows.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_aot", "--json", str(output)], capture_output=True, text=True,
        cwd=REPO_ROOT, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=900,
    )
    if result.returncode == NO_PTXAS:
        pytest.skip(f"no ptxas to compile cubins with: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-4000:]
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + result.stdout)  # the table, in CI logs whatever the capture mode
    return json.loads(output.read_text())


def rows_where(report: dict, failing) -> list[str]:
    return [f"{row['target']} {row['config']} ({', '.join(row['cases'])})" for row in report["rows"]
            if row["error"] is None and failing(row)]


def test_every_kernel_dtype_and_target_is_compiled(report):
    compiled = {(row["target"], row["config"].split()[0], row["dtype"]) for row in report["rows"]}
    expected = {(target, kernel, dtype) for target in ("sm_90", "sm_80") for kernel in KERNELS
                for dtype in ("fp32", "bf16", "fp16")}
    assert expected <= compiled, sorted(expected - compiled)


def test_cross_entropy_runs_one_pass_and_two_pass_rows(report):
    """The cross-entropy kernel is compiled in both shapes the launcher picks: a row in one block
    (small vocabularies) and the two-pass loop with the largest block (16 warps)."""
    configs = {row["config"] for row in report["rows"] if row["config"].startswith("xent ")}
    for dtype in ("fp32", "bf16", "fp16"):
        assert any(f"xent {dtype} " in c and "+SINGLE_PASS" in c for c in configs), (dtype, sorted(configs))
        assert any(f"xent {dtype} V16384 w16 " in c and "+SINGLE_PASS" not in c for c in configs), dtype


def test_every_configuration_compiles(report):
    errors = [f"{row['target']} {row['config']}: {row['error']}" for row in report["rows"] if row["error"]]
    assert not errors, "\n\n".join(errors)


def test_shared_memory_fits_each_target(report):
    over = rows_where(report, lambda row: row["shared"] > row["shared_limit"])
    assert not over, "shared memory over the target's opt-in limit:\n" + "\n".join(over)


def test_registers_leave_the_threads_of_a_block(report):
    over = rows_where(report, lambda row: row["registers_per_block"] > 65536)
    assert not over, "registers x threads over 65536 per block:\n" + "\n".join(over)


def test_half_precision_configurations_do_not_spill(report):
    spilling = rows_where(report, lambda row: row["dtype"] != "fp32" and row["spill_stores"] + row["spill_loads"] > 0)
    assert not spilling, "bf16/fp16 configurations spill registers:\n" + "\n".join(spilling)


def test_only_head_dims_beyond_the_kernels_are_refused(report):
    refused = {refusal["case"].split()[1] for refusal in report["refusals"]}
    assert refused <= {"D192/Dv128", "D256"}, refused
