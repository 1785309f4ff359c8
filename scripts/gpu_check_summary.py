"""Summary of a ``scripts/gpu_check.sh`` run: one markdown table of every step, then each step's key
numbers, read from the logs and JSON files the steps wrote, then the rows that docs/benchmarks.md's
GPU section takes (its "What has run on a GPU" table, and one figure per benchmark result).

    python scripts/gpu_check_summary.py LOG_DIR [--out summary.md]

LOG_DIR holds ``steps.tsv`` (one line per finished step: name, kind, status, exit code, wall
seconds, time limit, command), ``env.json`` (machine and versions) and, per step, ``NAME.log``
plus ``NAME.json`` (benchmarks) or ``NAME.xml`` (pytest's JUnit report). Standard library only, so
it runs in a second even when torch does not import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET


def read_steps(log_dir: str) -> list[dict]:
    path = os.path.join(log_dir, "steps.tsv")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            name, kind, status, rc, wall, limit, command = line.rstrip("\n").split("\t", 6)
            steps.append(dict(name=name, kind=kind, status=status, rc=rc, wall=float(wall), limit=limit, command=command))
    return steps


def _load_json(log_dir: str, name: str) -> dict | None:
    path = os.path.join(log_dir, f"{name}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _log_lines(log_dir: str, name: str) -> list[str]:
    try:
        with open(os.path.join(log_dir, f"{name}.log"), errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# Key numbers per kind of step: (one line for the table, detail lines for below it)


def pytest_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    """Counts from the JUnit report; the names of failed tests below the table."""
    try:
        root = ET.parse(os.path.join(log_dir, f"{step['name']}.xml")).getroot()
    except (OSError, ET.ParseError):
        last = next((l for l in reversed(_log_lines(log_dir, step["name"])) if l.strip()), "no report")
        return last.strip("= "), []
    suites = [root] if root.tag == "testsuite" else list(root)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    total, failed, errors, skipped = count("tests"), count("failures"), count("errors"), count("skipped")
    line = f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, {skipped} skipped"
    detail = []
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:160] if problem.get("message") else ""
            detail.append(f"- FAILED `{case.get('classname')}::{case.get('name')}`: {message}")
    return line, detail


def explain_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    """The report's rewrites and runtime lines; its declines below the table."""
    lines = _log_lines(log_dir, step["name"])
    picked = [l.strip() for l in lines if l.startswith(("rewrites:", "runtime:", "compiled and ran"))]
    declines = []
    if "declined:" in lines:
        for line in lines[lines.index("declined:") + 1 :]:
            if not line.startswith("  "):
                break
            declines.append(f"- declined: {line.strip()}")
    return "; ".join(picked) or "no report", declines


def bench_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    data = _load_json(log_dir, step["name"])
    if not data:
        return "no JSON result", []
    results, summary = data["results"], data["summary"]
    parts, detail = [], []
    for backend, r in results.items():
        if "error" in r:
            parts.append(f"{backend} FAILED")
            detail.append(f"- {backend}: {r['error']}")
            continue
        text = f"{backend} {r['median_step_s'] * 1e3:.1f} ms"
        if backend == "graphopt" and "speedup_vs_inductor" in r:
            text += f" ({r['speedup_vs_inductor']:.2f}x, peak {r['memory_vs_inductor']:.2f}x)"
        parts.append(text)
    g = results.get("graphopt", {}).get("graphopt")
    if g:
        parts.append("runtime " + (", ".join(f"{k}={v}" for k, v in sorted(g["runtime"].items())) or "none"))
    if "max_first_loss_abs_diff_vs_eager" in summary:
        parts.append(f"first-step loss diff vs eager <= {summary['max_first_loss_abs_diff_vs_eager']:.1e}"
                     + ("" if summary["losses_agree"] else " (TOO LARGE)"))
    detail += _bench_table(results)
    for name, met in summary.get("target", {}).items():
        detail.append(f"- target: graphopt vs inductor {name}: {'met' if met else 'NOT met'}")
    overhead = results.get("graphopt", {}).get("guard_overhead") or {}
    if overhead.get("instrumented_median_us") is not None:
        detail.append(f"- guard: {overhead['instrumented_median_us']:.0f} us per call in the steps"
                      + (f", {overhead['micro_median_us']:.0f} us in the microbenchmark" if overhead.get("micro_median_us") else ""))
    return "; ".join(parts), detail


def _bench_table(results: dict) -> list[str]:
    rows = ["| backend | median ms | min ms | first step s | vs inductor | peak MB | step +MB | first loss | graphs / breaks / Inductor compiles |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backend, r in results.items():
        if "error" in r:
            rows.append(f"| {backend} | failed | | | | | | | |")
            continue
        d = r.get("dynamo", {})
        step_mb = f"{r['timed_peak_mb'] - r['mb_before_timed']:.0f}" if r.get("timed_peak_mb") else "n/a"
        rows.append(
            f"| {backend} | {r['median_step_s'] * 1e3:.1f} | {min(r['step_times_s']) * 1e3:.1f} | {r['first_step_s']:.1f} | "
            f"{r.get('speedup_vs_inductor', float('nan')):.2f}x | {r['peak_mb']:.0f} | {step_mb} | {r['first_loss']:.5f} | "
            f"{d.get('graphs', '?')} / {d.get('graph_breaks', '?')} / {d.get('inductor_compiles', '?')} |"
        )
    return ["", *rows, ""]


def _variant_numbers(log_dir: str, step: dict, describe) -> tuple[str, list[str]]:
    """One op benchmark's variants, each as ``describe(result)`` or its failure."""
    data = _load_json(log_dir, step["name"])
    if not data:
        return "no JSON result", []
    parts = [
        f"{r['variant']} FAILED ({r['error'][:80]})" if "error" in r else describe(r) for r in data["results"]
    ]
    if data.get("not_available"):
        parts.append("n/a: " + ", ".join(data["not_available"]))
    return "; ".join(parts), []


def lce_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    return _variant_numbers(log_dir, step, lambda r: f"{r['variant']} {r['median_s'] * 1e3:.1f} ms / {r['peak_mb']:.0f} MB")


def _varlen_variant(r: dict) -> str:
    impl = f" [{r['impl']}]" if r.get("impl") and r["impl"] != r["variant"] else ""
    rate = f", {r['fwd_bwd_tflops']:.1f} TFLOP/s" if "fwd_bwd_tflops" in r else ""
    return (f"{r['variant']}{impl} fwd {r['fwd_ms']:.1f} / fwd+bwd {r['fwd_bwd_ms']:.1f} ms "
            f"({r['fwd_bwd_speedup']:.2f}x{rate})")


def varlen_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    return _variant_numbers(log_dir, step, _varlen_variant)


def env_numbers(log_dir: str, step: dict) -> tuple[str, list[str]]:
    env = _load_json(log_dir, "env") or {}
    keys = ("gpu", "driver", "torch", "triton", "transformers", "liger_kernel")
    return ", ".join(f"{k} {env[k]}" for k in keys if k in env), []


NUMBERS = {"env": env_numbers, "pytest": pytest_numbers, "explain": explain_numbers, "bench": bench_numbers,
           "lce": lce_numbers, "varlen": varlen_numbers}


# ---------------------------------------------------------------------------------------------
# Rows for docs/benchmarks.md


def run_row(env: dict, steps: list[dict]) -> str:
    """The run's row of docs/benchmarks.md's "What has run on a GPU" table (date | card | software
    | graphopt | result)."""
    software = ", ".join(f"{name} {env[key]}" for key, name in (("torch", "torch"), ("triton", "triton"),
                         ("transformers", "transformers"), ("flash_attn", "flash-attn"))
                         if env.get(key) not in (None, "absent"))
    by_status = {}
    for step in steps:
        by_status.setdefault(step["status"], []).append(step["name"])
    result = f"{len(by_status.get('pass', []))} of {len(steps)} steps passed"
    for status in ("fail", "timeout", "skipped", "no tests"):
        if by_status.get(status):
            result += f"; {status}: {', '.join(by_status[status])}"
    date = env.get("date_utc", "?").split(" ")[0]
    return f"| {date} | one {env.get('gpu', '?')} | {software} | commit {env.get('graphopt revision', '?')} | {result} |"


def figure_rows(log_dir: str, steps: list[dict]) -> list[str]:
    """One row per benchmark result (what | shape | time | memory), as the GPU section's figures."""
    rows = []
    for step in steps:
        data = _load_json(log_dir, step["name"]) if step["kind"] in ("bench", "lce", "varlen") else None
        if not data:
            continue
        config = data.get("config", {})
        if step["kind"] == "varlen":
            shape = (f"{config.get('dtype')}, T={config.get('tokens')}, {config.get('heads')} query / "
                     f"{config.get('kv_heads')} KV heads, head dim {config.get('head_dim')}, "
                     f"{config.get('documents')} documents")
            for r in data["results"]:
                what = f"varlen `{r['variant']}`" + (f" ({r['impl']})" if r.get("impl") else "")
                time = "failed" if "error" in r else (
                    f"{r['fwd_bwd_ms']:.2f} ms fwd+bwd ({r.get('fwd_bwd_tflops', float('nan')):.1f} TFLOP/s), "
                    f"{r['fwd_ms']:.2f} ms fwd")
                rows.append(f"| {what} | {shape} | {time} | |")
        elif step["kind"] == "lce":
            shape = ", ".join(f"{k}={config[k]}" for k in ("dtype", "tokens", "hidden", "vocab") if k in config)
            for r in data["results"]:
                time = "failed" if "error" in r else f"{r['median_s'] * 1e3:.1f} ms fwd+bwd"
                memory = "" if "error" in r else f"{r['peak_mb']:.0f} MB peak"
                rows.append(f"| loss `{r['variant']}` | {shape} | {time} | {memory} |")
        else:
            results = data.get("results", {})
            graphopt, inductor = results.get("graphopt", {}), results.get("inductor", {})
            if "median_step_s" not in graphopt or "median_step_s" not in inductor:
                continue
            arguments = step["command"].split("graphopt.bench", 1)[-1].split(" --json")[0].strip()
            rows.append(
                f"| `{step['name'].removeprefix('bench-')}` preset, graphopt vs inductor | `{arguments}` | "
                f"{graphopt['median_step_s'] * 1e3:.1f} vs {inductor['median_step_s'] * 1e3:.1f} ms "
                f"(**{inductor['median_step_s'] / graphopt['median_step_s']:.2f}x**) | "
                f"{graphopt['peak_mb']:.0f} vs {inductor['peak_mb']:.0f} MB peak |"
            )
    return rows


def docs_rows(log_dir: str, env: dict, steps: list[dict]) -> list[str]:
    out = ["## For docs/benchmarks.md", "", "What has run on a GPU:", "",
           "| date | card | software | graphopt | result |", "| --- | --- | --- | --- | --- |", run_row(env, steps), ""]
    figures = figure_rows(log_dir, steps)
    if figures:
        out += ["Figures:", "", "| what | shape | time | memory |", "| --- | --- | --- | --- |", *figures, ""]
    return out


def summarize(log_dir: str) -> str:
    env = _load_json(log_dir, "env") or {}
    steps = read_steps(log_dir)
    out = ["# GPU check", ""]
    if env:
        out += [", ".join(f"{k} {v}" for k, v in env.items()), ""]
    out += ["| step | status | wall s | key numbers |", "| --- | --- | --- | --- |"]
    details = []
    for step in steps:
        key, detail = "", []
        if step["status"] not in ("skipped",):
            try:
                key, detail = NUMBERS.get(step["kind"], lambda *_: ("", []))(log_dir, step)
            except Exception as e:  # a broken log must not hide the other steps
                key = f"(summary error: {type(e).__name__}: {e})"
        status = step["status"] + (f" (rc {step['rc']})" if step["status"] == "fail" else "")
        out.append(f"| {step['name']} | {status} | {step['wall']:.0f} | {key.replace('|', '/')} |")
        if detail or step["status"] in ("fail", "timeout"):
            details += [f"### {step['name']}", "", f"`{step['command']}`", *detail]
            if step["status"] in ("fail", "timeout"):
                tail = [l for l in _log_lines(log_dir, step["name"]) if l.strip()][-8:]
                details += ["", "```", *tail, "```"]
            details.append("")
    total = sum(s["wall"] for s in steps)
    out += ["", f"{len(steps)} steps, {total:.0f} s in all.", ""]
    try:
        rows = docs_rows(log_dir, env, steps)
    except Exception as e:  # a broken result must not hide the step table
        rows = [f"(docs rows not built: {type(e).__name__}: {e})", ""]
    return "\n".join(out + details + rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir")
    parser.add_argument("--out", help="also write the summary to this file")
    args = parser.parse_args(argv)
    text = summarize(args.log_dir)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
