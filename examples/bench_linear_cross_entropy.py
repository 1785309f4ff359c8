"""Benchmark the LM head + cross-entropy, forward + backward: time and peak memory per variant.

Each variant runs in its own subprocess so that its peak memory is its own: ``ru_maxrss`` of the
child on CPU (includes the inputs and the torch import), ``torch.cuda.max_memory_allocated`` on
CUDA. Time is the median of ``--repeats`` timed steps after ``--warmup`` untimed ones; one step is
the mean loss over the (T,) targets and its backward into hidden (T, H) and weight (V, H).

Variants (those that cannot run here are listed as not available and skipped):
    reference           F.linear + .float() + F.cross_entropy(reduction="mean"), as HF does
    reference_compiled  the same under torch.compile (Inductor): what backend="inductor" makes of it
    graphopt_torch      torch.ops.graphopt.linear_cross_entropy, impl="torch"
    graphopt_triton     the same, impl="triton" (CUDA only)
    torch_chunked       F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) (torch >= 2.13)
    liger               Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA, when liger_kernel imports)

Beside each time the table prints the achieved TFLOP/s of the three GEMMs (6 N V H FLOPs, for every
variant), and for the graphopt variants the op's modelled HBM bytes and FLOPs per call (its cost
model, ``graphopt.ops.linear_cross_entropy.linear_cross_entropy_cost``, at the chunk size it used)
and the time that model takes at the device's limits (``roofline_seconds``): "x limit" is the
measured time over that, 1.0 being the limit. The model is the CUDA Triton path's; the torch
path's fp32 work buffers (and, on the CPU, its upcast copies) are not in it. The limits are known for H100 (990 dense bf16
TFLOP/s, 3.35 TB/s) and H200 (990, 4.8 TB/s); ``--peak-tflops``/``--peak-tbs`` give them for other
devices.

Examples::

    python examples/bench_linear_cross_entropy.py --device cpu --dtype float32 \
        --tokens 2048 --hidden 256 --vocab 128256
    python examples/bench_linear_cross_entropy.py --device cuda --tokens 16384 --hidden 2048 \
        --vocab 128256 --repeats 10 --json lce.json
"""

import argparse
import importlib.util
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
VARIANTS = ("reference", "reference_compiled", "graphopt_torch", "graphopt_triton", "torch_chunked", "liger")
IGNORE_INDEX = -100


def _available(variant: str, device: str) -> bool:
    if variant == "graphopt_triton":
        return device == "cuda"
    if variant == "torch_chunked":
        return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    if variant == "liger":
        return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    return True


def _loss_fn(variant: str, args: argparse.Namespace):
    """A function (hidden, weight, target) -> mean loss for ``variant``."""
    if variant in ("reference", "reference_compiled"):
        def reference(h, w, t):
            return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX)

        return reference if variant == "reference" else torch.compile(reference)  # compiled in the warm-up
    if variant in ("graphopt_torch", "graphopt_triton"):
        chunk = args.chunk
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
    if variant == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

        def liger_loss(h, w, t):
            out = liger(w, h, t)  # (weight, input, target); some versions return (loss, extras)
            return out[0] if isinstance(out, tuple) else out

        return liger_loss
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
    args.chunk = 0
    if args.variant.startswith("graphopt_"):
        sys.path.insert(0, REPO_ROOT)
        from graphopt.ops.linear_cross_entropy import auto_chunk_size

        args.chunk = args.chunk_size or auto_chunk_size(hidden, weight, args.variant.removeprefix("graphopt_"))
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
        "chunk_size": args.chunk,
        "device_name": torch.cuda.get_device_name(device) if device == "cuda" else "cpu",
    }


# Dense bf16/fp16 tensor-core FLOP/s and HBM bytes/s, by device name.
DEVICE_LIMITS = {"H100": (990e12, 3.35e12), "H200": (990e12, 4.8e12)}


def device_limits(name: str, args: argparse.Namespace) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the device: ``--peak-tflops``/``--peak-tbs``, else by name, else None."""
    known = next((limits for key, limits in DEVICE_LIMITS.items() if key in name), None)
    if args.peak_tflops and args.peak_tbs:
        return args.peak_tflops * 1e12, args.peak_tbs * 1e12
    return known


def modelled_work(row: dict, args: argparse.Namespace) -> dict:
    """The cost-model columns of a result row: GEMM TFLOP/s for every variant; for graphopt's, the
    op's modelled bytes, FLOPs, the time at the device's limits and the measured time's ratio to it."""
    sys.path.insert(0, REPO_ROOT)
    from graphopt.ops.linear_cross_entropy import linear_cross_entropy_cost, roofline_seconds

    gemm_flops = 6 * args.tokens * args.hidden * args.vocab
    work = {"gemm_tflops_per_s": gemm_flops / row["median_s"] / 1e12}
    if row.get("chunk_size"):
        element_size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        phases = linear_cross_entropy_cost(args.tokens, args.hidden, args.vocab, element_size, row["chunk_size"])
        work.update(model_bytes=sum(p["bytes"] for p in phases), model_flops=sum(p["flops"] for p in phases),
                    model_phases=phases)
        limits = device_limits(row.get("device_name", ""), args)
        if limits is not None:
            work["limit_s"] = roofline_seconds(phases, *limits)
            work["x_limit"] = row["median_s"] / work["limit_s"]
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="graphopt tokens per chunk (0: the op's choice for the device, auto_chunk_size)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense 16-bit TFLOP/s")
    parser.add_argument("--peak-tbs", type=float, default=0.0, help="the device's HBM TB/s")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, action="append",
                        help="run only these variants (repeatable); default: all available")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="print the results as JSON instead of a table; with PATH, print the table and write the JSON there")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.child:  # one variant, in this process
        args.variant = args.variant[0]
        print(json.dumps(run_variant(args)))
        return

    variants = [v for v in (args.variant or VARIANTS) if _available(v, args.device)]
    skipped = [v for v in (args.variant or VARIANTS) if not _available(v, args.device)]
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
            results.append({"variant": variant, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(modelled_work(row, args))
        results.append(row)

    config = dict(device=args.device, dtype=args.dtype, tokens=args.tokens, hidden=args.hidden,
                  vocab=args.vocab, torch=torch.__version__, threads=torch.get_num_threads())
    if args.json == "-":
        print(json.dumps({"config": config, "results": results, "not_available": skipped}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'variant':<19} {'median fwd+bwd':>15} {'peak MB':>9} {'loss':>10} {'GEMM TFLOP/s':>13} "
          f"{'chunk':>6} {'model GB':>9} {'model TFLOP':>12} {'limit ms':>9} {'x limit':>8}")
    for row in results:
        if "error" in row:
            print(f"{row['variant']:<19} error: {row['error']}")
            continue
        line = (f"{row['variant']:<19} {row['median_s'] * 1e3:>12.1f} ms {row['peak_mb']:>9.0f} {row['loss']:>10.5f} "
                f"{row['gemm_tflops_per_s']:>13.3g}")
        if "model_bytes" in row:
            line += f" {row['chunk_size']:>6} {row['model_bytes'] / 1e9:>9.2f} {row['model_flops'] / 1e12:>12.3g}"
            if "limit_s" in row:
                line += f" {row['limit_s'] * 1e3:>9.1f} {row['x_limit']:>8.2f}"
        print(line)
    if skipped:
        print(f"not available here: {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": results, "not_available": skipped}, f, indent=2)
    if any("error" in row for row in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
