"""Benchmark the LM head + cross-entropy, forward + backward: time and peak memory per variant.

Each variant runs in its own subprocess so that its peak memory is its own: ``ru_maxrss`` of the
child on CPU (includes the inputs and the torch import), ``torch.cuda.max_memory_allocated`` on
CUDA. Time is the median of ``--repeats`` timed steps after ``--warmup`` untimed ones; one step is
the mean loss over the (T,) targets and its backward into hidden (T, H) and weight (V, H).

Variants:
    reference        F.linear + .float() + F.cross_entropy(reduction="mean"), as HF does
    graphopt_torch   torch.ops.graphopt.linear_cross_entropy, impl="torch"
    graphopt_triton  the same, impl="triton" (CUDA only)
    torch_chunked    F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) (torch >= 2.13)

Example (CPU)::

    python examples/bench_linear_cross_entropy.py --device cpu --dtype float32 \
        --tokens 2048 --hidden 256 --vocab 128256
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("reference", "graphopt_torch", "graphopt_triton", "torch_chunked")
IGNORE_INDEX = -100


def _available(variant: str, device: str) -> bool:
    if variant == "graphopt_triton":
        return device == "cuda"
    if variant == "torch_chunked":
        return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    return True


def _loss_fn(variant: str, args: argparse.Namespace):
    """A function (hidden, weight, target) -> mean loss for ``variant``."""
    if variant == "reference":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX)
    if variant in ("graphopt_torch", "graphopt_triton"):
        sys.path.insert(0, REPO_ROOT)
        from graphopt.ops.linear_cross_entropy import default_chunk_size

        chunk = args.chunk_size or default_chunk_size(args.tokens, args.vocab)
        impl = variant.removeprefix("graphopt_")

        def graphopt_loss(h, w, t):
            loss_sum, _ = torch.ops.graphopt.linear_cross_entropy(
                h, w, t, IGNORE_INDEX, 0.0, chunk, "none", True, impl
            )
            return loss_sum / (t != IGNORE_INDEX).sum()  # device-side count: no host sync

        return graphopt_loss
    if variant == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, options=options)
    raise ValueError(f"unknown variant {variant!r}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(args: argparse.Namespace) -> dict:
    """Time one variant in this process; returns its result row."""
    device, dtype = args.device, getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * args.hidden**-0.5).to(device, dtype)
    target = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss_fn = _loss_fn(args.variant, args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, loss = [], None
    for step in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        _sync(device)
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, target)
        loss.backward()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "variant": args.variant,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_mb": peak_mb,
        "peak_kind": "cuda_max_allocated" if device == "cuda" else "ru_maxrss",
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=0, help="graphopt tokens per chunk (0: default_chunk_size)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, action="append",
                        help="run only these variants (repeatable); default: all available")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.child:  # one variant, in this process
        args.variant = args.variant[0]
        print(json.dumps(run_variant(args)))
        return

    variants = [v for v in (args.variant or VARIANTS) if _available(v, args.device)]
    common = [
        "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens),
        "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]
    results = []
    for variant in variants:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, *common],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    config = dict(device=args.device, dtype=args.dtype, tokens=args.tokens, hidden=args.hidden,
                  vocab=args.vocab, torch=torch.__version__, threads=torch.get_num_threads())
    if args.json:
        print(json.dumps({"config": config, "results": results}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'variant':<16} {'median fwd+bwd':>15} {'peak MB':>9} {'loss':>10}")
    for row in results:
        if "error" in row:
            print(f"{row['variant']:<16} error: {row['error']}")
        else:
            print(f"{row['variant']:<16} {row['median_s']:>13.3f} s {row['peak_mb']:>9.0f} {row['loss']:>10.5f}")


if __name__ == "__main__":
    main()
