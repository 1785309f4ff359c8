"""What recognition costs: graphopt's passes on the Dynamo graph of one training step.

    python examples/bench_probing.py --batch 8 --seq 8192 [--dynamic]

Captures the graph of a small Llama's training step (hidden 64, 2 layers, a right-padded batch)
without running it, then times ``graphopt.passes.run_passes`` on it and reports the resident-set
high-water mark the passes add (``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
Linux only). Mask probes dominate: they evaluate the mask's subgraph at the graph's (B, S).
"""

import argparse
import gc

import torch

from graphopt.inspection import GraphReport
from graphopt.options import GraphoptOptions
from graphopt.passes import run_passes
from graphopt.tiny_models import build_model, llama_config


class _Captured(Exception):
    pass


def capture(model, **batch):
    """The Dynamo graph of ``model(**batch)``; the step itself is never run."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def stop(*args):
            raise _Captured

        return stop

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend)(**batch)
    except _Captured:
        pass
    (gm,) = graphs
    return gm


def high_water_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--dynamic", action="store_true", help="mark the sequence dimension dynamic")
    args = parser.parse_args()
    model = build_model(llama_config(hidden_size=64, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=args.seq))
    ids = torch.randint(3, 1000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    mask[1, args.seq // 2 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if args.dynamic:
        for t in (ids, mask, labels):
            torch._dynamo.mark_dynamic(t, 1)
    gm = capture(model, input_ids=ids, attention_mask=mask, labels=labels)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = high_water_kb()
    report = GraphReport(0, gm.code, quiet=True)
    _, ctx = run_passes(gm, GraphoptOptions(), report)
    print(
        f"B={args.batch} S={args.seq} dynamic={args.dynamic}: passes {report.pass_seconds:.2f} s, "
        f"peak RSS +{(high_water_kb() - base) / 1024:.0f} MB; rewrites {dict(report.counts)}; "
        f"guards {[g.name for g in ctx.guards]}"
    )


if __name__ == "__main__":
    main()
