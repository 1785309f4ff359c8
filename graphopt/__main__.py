"""Command line: ``python -m graphopt explain --family llama --layout right``.

Builds a tiny model of the family locally (no downloads), runs one training step under
``backend="graphopt"`` and prints the report: rewrites, declines, guards, and optionally the
graphs before and after. ``--device cuda --dtype bfloat16`` runs the same step on a GPU with the
model cast to bf16 (integer inputs stay int64).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    from graphopt.tiny_models import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m graphopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="compile one training step of a tiny model and print the report")
    ex.add_argument("--family", default="llama", choices=FAMILIES)
    ex.add_argument("--layout", default="right", help="batch layout (see graphopt.tiny_models.make_batch)")
    ex.add_argument("--batch", type=int, default=2)
    ex.add_argument("--seq", type=int, default=32)
    ex.add_argument("--options", type=json.loads, default=None, help='graphopt/Inductor options as JSON, e.g. \'{"drop_logits": true}\'')
    ex.add_argument("--graphs", action="store_true", help="also print each graph before and after")
    ex.add_argument("--dump-dir", default=None, help="write the report and graphs to this folder")
    ex.add_argument("--eval", action="store_true", help="eval mode, no labels (inference)")
    ex.add_argument("--device", default="cpu", help="where the model and batch live: cpu, cuda or cuda:N")
    ex.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype (weights cast with .to)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import torch

    import graphopt
    from graphopt.tiny_models import build_tiny_model, describe_batch, make_batch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    model = build_tiny_model(args.family, dtype=getattr(torch, args.dtype)).to(args.device)
    batch = make_batch(args.layout, batch=args.batch, seq=args.seq, vocab=model.config.vocab_size)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if args.eval:
        model.eval()
        batch.pop("labels", None)
    options = dict(args.options or {})
    if args.dump_dir:
        options["dump_dir"] = args.dump_dir
    print(f"{args.family} ({args.device}, {args.dtype}): {describe_batch(batch)}", file=sys.stderr)
    start = time.perf_counter()
    with torch.set_grad_enabled(not args.eval):
        report = graphopt.explain(model, options=options or None, **batch)
        if not args.eval and report.result.loss is not None:
            report.result.loss.backward()
    print(f"compiled and ran one step in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(report)
    if args.graphs:
        for i, (before, after) in enumerate(zip(report.graph_code("before"), report.graph_code("after"))):
            print(f"\n===== graph {i}: before =====\n{before}\n===== graph {i}: after =====\n{after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
