"""What users see: explain's report, the dump folder, the CLI and the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import graphopt
from graphopt.tiny_models import build_tiny_model, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_explain_report_has_counts_declines_guards_and_code(tmp_path):
    model = build_tiny_model("llama")
    report = graphopt.explain(model, options={"dump_dir": str(tmp_path)}, **make_batch("right", seq=16))
    assert report.counts["mask_elision"] == 2
    assert [g.name for g in report.guards] == ["right_padding"]
    assert report.result.loss is not None
    (before,), (after,) = report.graph_code("before"), report.graph_code("after")
    # the graph that runs is the unpadded one: packed tokens, per-row varlen attention, no mask
    assert "attn_mask = attention_mask" in before and "attn_mask" not in after
    assert "unpad_gather" in after and "graphopt.varlen_attention" in after
    text = str(report)
    assert "mask_elision x2" in text and "unpad x1" in text and "unpad=1" in text and "right_padding" in text and "fast_path=1" in text
    files = sorted(os.listdir(tmp_path))
    stems = {f.rsplit("_", 1)[0] for f in files}
    assert len(stems) == 1 and len(files) == 3
    data = json.loads((tmp_path / [f for f in files if f.endswith("_report.json")][0]).read_text())
    assert {r["name"] for r in data["rewrites"]} >= {"mask_elision"}


def test_capture_counts_guard_failures():
    compiled = torch.compile(build_tiny_model("llama"), backend="graphopt")
    compiled(**make_batch("right", seq=16))
    with graphopt.capture() as report:
        compiled(**make_batch("left", seq=16))
    assert report.runtime["fallback"] == 1 and report.runtime["failed:right_padded"] == 1


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def test_cli_eval_shows_the_decline_and_torch_logs_show_graphopt():
    result = _cli("explain", "--family", "llama", "--eval", "--seq", "16", env={"TORCH_LOGS": "graphopt"})
    assert result.returncode == 0, result.stderr
    assert "padded_outputs_unused" in result.stdout
    assert "graphopt" in result.stderr and "declined" in result.stderr  # INFO lines on the graphopt logger
