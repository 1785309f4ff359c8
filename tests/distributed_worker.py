"""One rank of the distributed tests (:mod:`tests.test_distributed`): trains a tiny Llama eagerly and
under ``torch.compile(backend="graphopt")`` on the same data, and writes what it saw as JSON.

    python -m tests.distributed_worker --rank R --world-size 2 --init file:///tmp/x/store --out DIR

For each setup in ``SETUPS`` the rank trains ``STEPS`` SGD steps twice from the same seed: eagerly,
then compiled (with ``graphopt.capture()`` around the compiled run). The batches are right-padded
with ``labels == -100`` at the pads (the batches mask elision's guard accepts), different on each
rank and each step, and of one shape, so each setup compiles once.

- ``ddp``: ``DistributedDataParallel(bucket_cap_mb=1)``. Dynamo's DDPOptimizer splits the graph
  where the gradient buckets end. Its first bucket is at least 1 MB
  (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``; a smaller cap raises "First bucket should be
  smaller/equal to other buckets"), and the tiny model has 0.34 MB of parameters, so the MLPs are
  widened here (``intermediate_size=2048``: 1.5 MB per layer) to give several buckets.
- ``fsdp2``: ``fully_shard`` on each decoder layer and on the root. FSDP2's hooks are wrapped in
  ``torch._dynamo.disable``, so Dynamo graph-breaks around every sharded module.

Output: ``DIR/rank<R>.json`` mapping each setup to its losses (eager and compiled, per step), the
number of AOTAutograd compilations of the compiled run, and graphopt's report: per graph its rewrite
counts, declines and the number of SDPA calls before the passes; runtime dispatch counts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import graphopt
from graphopt.tiny_models import build_tiny_model, make_batch

SETUPS = ("ddp", "fsdp2")
STEPS = 3
BATCH, SEQ = 2, 16
LR = 0.1  # SGD: see tests/test_hf.py on why Adam would amplify rounding differences
INTERMEDIATE_SIZE = 2048
DDP_BUCKET_CAP_MB = 1


def wrap(model: torch.nn.Module, setup: str) -> torch.nn.Module:
    if setup == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=DDP_BUCKET_CAP_MB)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def train(setup: str, rank: int, *, compiled: bool) -> list[float]:
    """``STEPS`` steps of SGD from seed 0; returns this rank's loss at each step."""
    model = wrap(build_tiny_model("llama", intermediate_size=INTERMEDIATE_SIZE), setup)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step_fn = torch.compile(model, backend="graphopt") if compiled else model
    losses = []
    for step in range(STEPS):
        batch = make_batch("right", batch=BATCH, seq=SEQ, seed=100 * step + rank)
        loss = step_fn(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_setup(setup: str, rank: int) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = train(setup, rank, compiled=False)
    aot_before = counters["aot_autograd"]["total"]
    with graphopt.capture() as report:
        compiled = train(setup, rank, compiled=True)
    return {
        "eager_losses": eager,
        "compiled_losses": compiled,
        "aot_compilations": counters["aot_autograd"]["total"] - aot_before,
        "optimize_ddp": str(torch._dynamo.config.optimize_ddp),
        "graphs": [
            {
                "graph_id": g.graph_id,
                "counts": dict(g.counts),
                "declines": [f"{d.name}: {d.reason}" for d in g.declines],
                "sdpa_calls": g.before.count("scaled_dot_product_attention("),
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
    parser.add_argument("--setups", default=",".join(SETUPS))
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
