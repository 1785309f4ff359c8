"""One rank of the distributed tests (:mod:`tests.test_distributed`): trains a tiny Llama eagerly and
under ``torch.compile(backend="graphopt")`` on the same data, and writes what it saw as JSON.

    python -m tests.support.distributed_worker --rank R --world-size 2 --init file:///tmp/x/store --out DIR

For each setup in ``SETUPS`` the rank trains ``STEPS`` SGD steps twice from the same seed: eagerly,
then compiled (with ``graphopt.capture()`` around the compiled run). The batches are right-padded
with ``labels == -100`` at the pads (the batches mask elision's guard accepts), or packed where the
setup says so, different on each rank and each step, and of one shape, so each setup compiles once.

- ``ddp``: ``DistributedDataParallel(bucket_cap_mb=1)``. Dynamo's DDPOptimizer splits the graph
  where the gradient buckets end. Its first bucket is at least 1 MB
  (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``; a smaller cap raises "First bucket should be
  smaller/equal to other buckets"), and the tiny model has 0.34 MB of parameters, so the MLPs are
  widened here (``intermediate_size=2048``: 1.5 MB per layer) to give several buckets. The split
  falls between the layers: the mask is built in the first piece and passed to a later one. The
  pieces cannot see the labels, so the batches are right-padded with ``padded_outputs_unused=True``
  (labels are -100 at the pads).
- ``fsdp2``: ``fully_shard`` on each decoder layer and on the root. FSDP2's hooks are wrapped in
  ``torch._dynamo.disable``, so Dynamo graph-breaks around every sharded module. Padded as ``ddp``.
- ``ddp_packed``, ``fsdp2_packed``: the same splits on packed batches (documents restarting their
  ``position_ids``, no attention mask, no option): the layers receiving the mask run per-document
  attention.
- ``ddp_guarded_piece``: DDP with a 2 MB lm_head and embedding (``vocab_size=8192``), so the split
  falls after the layers: the first piece builds the mask and runs every attention, the second holds
  the loss. With ``padded_outputs_unused=True`` the first piece gets a right-padding guard, and the
  DDPOptimizer calls each compiled piece once with fake tensors while compiling.
- ``ddp_whole_graph``: ``ddp``'s model with ``optimize_ddp=False``: Dynamo hands graphopt the whole
  graph, and graphopt splits the graphs it compiles at DDP's buckets itself, after its passes.
- ``ddp_python_reducer``: ``optimize_ddp="python_reducer"`` with compiled autograd: DDP's reducer
  runs in the compiled backward and the forward is one graph (no split). Runs last, because that
  DDP constructor adds ``torch.nn.parallel.distributed`` to Dynamo's inline list for the process.

Output: ``DIR/rank<R>.json`` mapping each setup to its losses (eager and compiled, per step), the
number of AOTAutograd compilations of the compiled run, and graphopt's report: per graph its rewrite
counts, declines, the number of SDPA calls before the passes and a hash of that code; runtime dispatch counts; and, from
Dynamo's counters, the graph breaks and the frames that failed to compile during the compiled run,
and its wall time (compiling included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import graphopt
from graphopt.tiny_models import build_tiny_model, make_batch

STEPS = 3
BATCH, SEQ = 2, 16
LR = 0.1  # SGD: see tests/test_hf.py on why Adam would amplify rounding differences
DDP_BUCKET_CAP_MB = 1


@dataclass(frozen=True)
class Setup:
    """How one setup wraps, builds and compiles the model (see the module docstring)."""

    wrapper: str  # "ddp" or "fsdp2"
    model: dict  # build_tiny_model overrides
    options: dict = field(default_factory=dict)  # graphopt options
    dynamo: dict = field(default_factory=dict)  # torch._dynamo.config for the compiled run
    layout: str = "right"  # make_batch layout

    @property
    def vocab(self) -> int:
        return self.model.get("vocab_size", 128)


WIDE_MLP = {"intermediate_size": 2048}
PROMISE = {"padded_outputs_unused": True}
SETUPS = {
    "ddp": Setup("ddp", WIDE_MLP, PROMISE),
    "fsdp2": Setup("fsdp2", WIDE_MLP, PROMISE),
    "ddp_packed": Setup("ddp", WIDE_MLP, layout="packed"),
    "fsdp2_packed": Setup("fsdp2", WIDE_MLP, layout="packed"),
    "ddp_guarded_piece": Setup("ddp", {"vocab_size": 8192}, PROMISE),
    "ddp_whole_graph": Setup("ddp", WIDE_MLP, dynamo={"optimize_ddp": False}),
    "ddp_python_reducer": Setup("ddp", WIDE_MLP, dynamo={"optimize_ddp": "python_reducer", "compiled_autograd": True}),
}


def wrap(model: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    if setup.wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=DDP_BUCKET_CAP_MB)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def train(setup: Setup, rank: int, *, compiled: bool) -> list[float]:
    """``STEPS`` steps of SGD from seed 0; returns this rank's loss at each step."""
    model = wrap(build_tiny_model("llama", **setup.model), setup)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step_fn = torch.compile(model, backend="graphopt", options=setup.options) if compiled else model
    losses = []
    for step in range(STEPS):
        batch = make_batch(setup.layout, batch=BATCH, seq=SEQ, vocab=setup.vocab, seed=100 * step + rank)
        loss = step_fn(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_setup(name: str, rank: int) -> dict:
    from torch._dynamo.utils import counters

    setup = SETUPS[name]
    torch._dynamo.reset()
    eager = train(setup, rank, compiled=False)
    before = {key: dict(counters[key]) for key in ("aot_autograd", "frames", "graph_break")}
    start = time.perf_counter()
    with torch._dynamo.config.patch(**setup.dynamo), graphopt.capture() as report:
        compiled = train(setup, rank, compiled=True)
    seconds = time.perf_counter() - start
    frames = {k: v - before["frames"].get(k, 0) for k, v in counters["frames"].items()}
    return {
        "eager_losses": eager,
        "compiled_losses": compiled,
        "compiled_seconds": round(seconds, 1),  # compiling included
        "aot_compilations": counters["aot_autograd"]["total"] - before["aot_autograd"].get("total", 0),
        "failed_frames": frames.get("total", 0) - frames.get("ok", 0),
        "graph_breaks": sorted(
            reason.splitlines()[0] for reason, n in counters["graph_break"].items() if n > before["graph_break"].get(reason, 0)
        ),
        "graphs": [
            {
                "graph_id": g.graph_id,
                "counts": dict(g.counts),
                "declines": [f"{d.name}: {d.reason}" for d in g.declines],
                "sdpa_calls": g.before.count("scaled_dot_product_attention("),
                "code": hashlib.sha1(g.before.encode()).hexdigest()[:12],
                "guards": [guard.name for guard in g.guards],
            }
            for g in report.graphs
        ],
        "counts": dict(report.counts),
        "runtime": dict(report.runtime),
        "summary": str(report),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_method of the process group, e.g. file:///tmp/x/store")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated names from SETUPS, run in order")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch._dynamo.config.recompile_limit = 64  # as tests/conftest.py: never fall back to eager silently
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world_size)
    try:
        results = {setup: run_setup(setup, args.rank) for setup in args.setups.split(",")}
    finally:
        dist.destroy_process_group()
    tmp = args.out / f"rank{args.rank}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, args.out / f"rank{args.rank}.json")


if __name__ == "__main__":
    main()
