"""graphopt when the training step reaches it as several graphs: DDP's graph split, FSDP2's graph
breaks, and (in one process) a graph break before the loss.

The distributed setups run in 2 CPU processes (gloo), each :mod:`tests.support.distributed_worker`, which
trains a tiny Llama eagerly and compiled on the same data and reports what graphopt did (see its
docstring for each setup):

- ``ddp``: Dynamo's DDPOptimizer splits the graph at gradient-bucket boundaries and calls the backend
  once per piece. The mask is built in the first piece; a later layer gets it as a placeholder.
- ``fsdp2``: ``fully_shard`` hooks are ``torch._dynamo.disable``-d, so the mask is built in a graph of
  its own (``create_causal_mask``), each decoder layer is one graph, and the loss is another.
- ``ddp_packed``, ``fsdp2_packed``: the same splits on packed batches.
- ``ddp_guarded_piece``: the split falls after the layers, and with ``padded_outputs_unused=True`` the
  first piece is guarded; the DDPOptimizer calls it with fake tensors while compiling.
- ``ddp_whole_graph``: ``optimize_ddp=False``: graphopt gets the whole graph, rewrites it, and splits
  what it compiles at DDP's buckets itself (the recommended DDP setup).
- ``ddp_python_reducer``: ``optimize_ddp="python_reducer"`` + compiled autograd: no split.

Every step is exact (losses equal eager's), and on every rank every attention call is rewritten and
every step takes a fast path. Across a split the graph that builds the mask publishes it, and the
graphs that receive it drop it at run time (:mod:`graphopt.handoff`): packed batches run per
document; right-padded ones need ``padded_outputs_unused=True`` (``ddp``, ``fsdp2``), because the
pieces that run attention cannot see the labels (without it they run their exact masked path:
:mod:`tests.test_split_graphs`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphopt.tiny_models import TINY_DIMS, build_tiny_model, make_batch
from tests.support.distributed_worker import SETUPS, STEPS
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions
from tests.support.tolerances import tol

WORLD_SIZE = 2
LAYERS = TINY_DIMS["num_hidden_layers"]
# Setups whose compiled step runs as several graphs (the scenario under test), and how many SDPA
# calls graphopt should receive when each graph is compiled once: FSDP2's decoder layers share one
# graph (one SDPA call), compiled once and called for every layer.
SPLIT_SETUPS = ("ddp", "fsdp2", "ddp_packed", "fsdp2_packed", "ddp_guarded_piece", "ddp_whole_graph")
ATTENTION_CALLS = {
    "ddp": LAYERS, "fsdp2": 1, "ddp_packed": LAYERS, "fsdp2_packed": 1,
    "ddp_guarded_piece": LAYERS, "ddp_whole_graph": LAYERS, "ddp_python_reducer": LAYERS,
}
# Setups in which a graph receives the mask from another, and how many attention layers do.
RECEIVING_LAYERS = {"ddp": None, "fsdp2": LAYERS, "ddp_packed": None, "fsdp2_packed": LAYERS}
LAUNCH_TIMEOUT_S = 600
REPO = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results (see :mod:`tests.support.distributed_worker`), every setup from one launch."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [out / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    procs = []
    for rank, log in enumerate(logs):
        cmd = [
            sys.executable, "-m", "tests.support.distributed_worker",
            "--rank", str(rank), "--world-size", str(WORLD_SIZE),
            "--init", f"file://{out / 'store'}",  # a file store: no port to pick, no port to collide
            "--out", str(out),
        ]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes is None or any(codes):
        tails = "\n".join(f"--- rank {r} ---\n" + log.read_text()[-4000:] for r, log in enumerate(logs))
        pytest.fail(f"distributed workers failed (exit codes {codes}, timeout {LAUNCH_TIMEOUT_S}s):\n{tails}")
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for rank, result in enumerate(results):
        for setup, r in result.items():
            print(f"--- rank {rank}, {setup} ---\n{r['summary']}")
    return results


def _summary(result: dict, rank: int, setup: str) -> str:
    graphs = "\n".join(f"  graph {g['graph_id']}: {g}" for g in result["graphs"])
    return (
        f"rank {rank}, {setup}: compiled run {result['compiled_seconds']}s, "
        f"{result['aot_compilations']} AOT compilations, {result['failed_frames']} frames not compiled, "
        f"graph breaks {result['graph_breaks']}\n"
        f"{result['summary']}\nper graph:\n{graphs}"
    )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_compiled_training_matches_eager(ranks, setup):
    """Every rank's loss at every step equals eager's."""
    for rank, result in enumerate(ranks):
        r = result[setup]
        why = _summary(r, rank, setup)
        if setup in SPLIT_SETUPS:
            assert r["aot_compilations"] >= 2, why  # the scenario: the step runs as several graphs
        torch.testing.assert_close(
            torch.tensor(r["compiled_losses"]), torch.tensor(r["eager_losses"]), **tol(torch.float32),
            msg=lambda m, why=why: f"{m}\n{why}",
        )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_rewrites_on_every_rank(ranks, setup):
    """On every rank: each graph reaches graphopt once, every SDPA call drops its mask (packed:
    runs per document), the loss is fused, and every step takes the fast path."""
    for rank, result in enumerate(ranks):
        r = result[setup]
        why = _summary(r, rank, setup)
        assert sum(g["sdpa_calls"] for g in r["graphs"]) == ATTENTION_CALLS[setup], why
        for g in r["graphs"]:
            rewritten = g["counts"].get("mask_elision", 0) + g["counts"].get("varlen_attention", 0)
            assert rewritten == g["sdpa_calls"], why
        assert r["counts"].get("fused_cross_entropy") == 1, why
        assert r["runtime"].get("fast_path", 0) >= STEPS and not r["runtime"].get("fallback"), why
        if setup == "ddp_whole_graph":  # graphopt sees the labels: the padded batch is unpadded
            assert r["runtime"].get("unpad", 0) >= STEPS, why
        if setup in RECEIVING_LAYERS:  # the mask crossed a graph boundary and was dropped there
            assert r["counts"].get("mask_handoff") == 1, why
            received = "received_packed" if setup.endswith("_packed") else "fast_path"
            layers = RECEIVING_LAYERS[setup]
            assert r["runtime"].get(received, 0) >= STEPS * (layers or 1), why


# One process: gradient checkpointing with use_cache=True makes transformers call
# logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing") inside the
# model's forward, where Dynamo graph-breaks. The mask is built and consumed in the first graph (the
# layers run inside tag_activation_checkpoint); the labels and the loss are in the second, so for a
# padded batch the mask is kept unless padded_outputs_unused=True.


def _checkpointed_step(**options):
    model = build_tiny_model("llama")
    model.gradient_checkpointing_enable()
    model.config.use_cache = True
    batch = make_batch("right")
    # GraphoptCallback (tests/test_hf.py) lets Dynamo skip warning_once for the whole process: undo
    # that here, whichever tests ran before in this process.
    config = torch._dynamo.config
    name = "ignore_logger_methods" if hasattr(config, "ignore_logger_methods") else "ignore_logging_functions"
    with config.patch(**{name: set()}):
        eager, compiled, report = CompiledModel(model, options=options).step(batch)
    assert len(report.graphs) == 2, report  # the graph break at warning_once
    assert report.counts["fused_cross_entropy"] == 1, report
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    return report


@pytest.mark.slow
def test_graph_break_before_loss_keeps_the_mask_and_says_why():
    """Exact, and the mask is kept: this graph cannot check that the labels ignore the pads. The
    decline names the option that drops it."""
    report = _checkpointed_step()
    assert not report.counts["mask_elision"], report
    reasons = [reason for name, reason in report.declines if name == "mask_elision"]
    assert any("padded_outputs_unused" in reason for reason in reasons), report


@pytest.mark.slow
def test_graph_break_before_loss_with_promise_drops_the_mask():
    report = _checkpointed_step(padded_outputs_unused=True)
    assert report.counts["mask_elision"] == LAYERS, report
    assert report.runtime["fast_path"] > 0 and not report.runtime["fallback"], report
