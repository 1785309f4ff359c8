"""Train a tiny Llama built locally (no downloads) for a few steps with ``backend="graphopt"``,
then print what graphopt rewrote.

    python examples/train_tiny.py [--family llama] [--steps 8] [--layout right]

Each step is checked against eager on the same weights: the loss must match.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

import graphopt
from graphopt.tiny_models import FAMILIES, build_tiny_model, describe_batch, make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--layout", default="right", help="right, none, packed, ... (graphopt.tiny_models.make_batch)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    model = build_tiny_model(args.family)
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="graphopt")

    with graphopt.capture() as report:
        for step in range(args.steps):
            batch = make_batch(args.layout, batch=args.batch, seq=args.seq, seed=step, vocab=model.config.vocab_size)
            start = time.perf_counter()
            loss = compiled(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            elapsed = time.perf_counter() - start

            ref_loss = reference(**batch, use_cache=False).loss
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            print(
                f"step {step}: loss {loss.item():.5f} (eager {ref_loss.item():.5f}) "
                f"{elapsed * 1e3:8.1f} ms  [{describe_batch(batch)}]"
            )
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    print()
    print(report)


if __name__ == "__main__":
    main()
