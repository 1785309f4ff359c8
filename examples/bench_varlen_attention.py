"""Benchmark packed-document causal attention with RoPE, forward and forward + backward.

One step attends T packed tokens split into documents of random length (uniform in
``--doc-len-range``, the last one truncated), with RoPE from per-document positions. Times are
medians of ``--repeats`` timed steps after ``--warmup`` untimed ones; the speed-up is against the
baseline. TFLOP/s counts the useful causal FLOPs only: ``2 Hq (D + Dv) sum_j len_j (len_j + 1) / 2``
forward, 2.5 times that backward (flash-attention's convention), whatever a kernel computes beyond.
Each graphopt variant's row names the implementation that ran (``impl``): what ``"auto"`` chose, or
what an explicit impl resolved to, with ``rope once`` / ``rope in tiles`` for the Triton kernel.

Variants:
    sdpa_mask     baseline: apply_rotary on q and k, then SDPA (enable_gqa) with an explicit (T, T)
                  block-causal bool mask, the shape of what HF runs for packed sequences (the mask
                  is built once, outside the timed step, which flatters the baseline)
    auto          torch.ops.graphopt.varlen_attention, impl="auto" (what the passes call)
    torch         the same, impl="torch" (CPU only)
    triton        the same, impl="triton" (CUDA only)
    flash_attn3   the same, impl="flash_attn3" (CUDA sm_90, when flash_attn_interface imports)
    flash_attn    the same, impl="flash_attn" (CUDA, when flash-attn imports)
    torch_varlen  the same, impl="torch_varlen" (CUDA, when torch.nn.attention.varlen exists)
    varlen_attn   anchor: torch's varlen_attn called directly on q, k, v (attention alone, no
                  RoPE; K/V repeated inside the step when this torch's varlen_attn has no
                  enable_gqa) (CUDA, when torch.nn.attention.varlen exists)

Variants that cannot run here are listed as not available and skipped.

Examples (on the CPU the defaults shrink to --tokens 4096)::

    python examples/bench_varlen_attention.py --device cpu
    python examples/bench_varlen_attention.py --device cuda --tokens 32768 --heads 16 --kv-heads 4 --head-dim 128
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphopt.ops.varlen_attention as varlen_module  # noqa: E402
from graphopt.ops.varlen_attention import VarlenCall, VarlenLibraries, apply_rotary, resolve_impl  # noqa: E402

VARIANTS = ("sdpa_mask", "auto", "torch", "triton", "flash_attn3", "flash_attn", "torch_varlen", "varlen_attn")
GRAPHOPT_VARIANTS = ("auto", "torch", "triton", "flash_attn3", "flash_attn", "torch_varlen")
LIBRARY_OF = {"flash_attn3": "flash_attn3", "flash_attn": "flash_attn", "torch_varlen": "torch_varlen",
              "varlen_attn": "torch_varlen"}


def available(variant: str, device: str) -> bool:
    if variant == "torch":
        return device == "cpu"
    if variant in ("sdpa_mask", "auto"):
        return True
    if device != "cuda":
        return False
    return variant not in LIBRARY_OF or getattr(VarlenLibraries.detect(), LIBRARY_OF[variant]) is not None


def impl_that_runs(variant: str, inputs: dict) -> str | None:
    """The implementation a graphopt variant runs on these inputs (None for the others)."""
    if variant not in GRAPHOPT_VARIANTS:
        return None
    q, k, v, cos = inputs["q"], inputs["k"], inputs["v"], inputs["cos"]
    impl = resolve_impl(variant, VarlenCall.of(q, k, v, -1, 0.0, None))
    if impl == "triton":
        once = varlen_module._rotates_before_triton(q, k, v, cos, max(inputs["lengths"]))
        impl += " (rope once)" if once else " (rope in tiles)"
    return impl


def causal_tflop(lengths: list[int], args: argparse.Namespace) -> float:
    """Useful forward TFLOP of one step: QK^T and PV over each document's causal pairs."""
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 2 * args.heads * (args.head_dim + args.head_dim) * pairs / 1e12


def make_inputs(args: argparse.Namespace) -> dict:
    """Packed q/k/v (T, H, D), rotary tables (T, R), cu_seqlens (N+1,) and document lengths."""
    generator = torch.Generator().manual_seed(0)
    low, high = args.doc_len_range
    lengths = []
    while sum(lengths) < args.tokens:
        lengths.append(min(int(torch.randint(low, high + 1, (), generator=generator)), args.tokens - sum(lengths)))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    rotary_dim = args.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    device, dtype = args.device, getattr(torch, args.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    return dict(
        q=randn(args.tokens, args.heads, args.head_dim),
        k=randn(args.tokens, args.kv_heads, args.head_dim),
        v=randn(args.tokens, args.kv_heads, args.head_dim),
        cos=emb.cos().to(device),
        sin=emb.sin().to(device),
        cu_seqlens=cu_seqlens.to(device),
        lengths=lengths,
    )


def attention_fn(variant: str, inputs: dict, args: argparse.Namespace):
    """A function of (q, k, v) returning the (T, Hq, D) attention output for ``variant``."""
    cos, sin, cu_seqlens = inputs["cos"], inputs["sin"], inputs["cu_seqlens"]
    scale = args.head_dim**-0.5
    max_seqlen = max(inputs["lengths"])
    if variant == "sdpa_mask":
        doc = torch.repeat_interleave(
            torch.arange(len(inputs["lengths"])), torch.tensor(inputs["lengths"])
        ).to(args.device)
        positions = torch.arange(args.tokens, device=args.device)
        mask = (doc[:, None] == doc[None, :]) & (positions[None, :] <= positions[:, None])

        def sdpa_mask(q, k, v):
            q_rot = apply_rotary(q, cos, sin, False).transpose(0, 1).unsqueeze(0)
            k_rot = apply_rotary(k, cos, sin, False).transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                q_rot, k_rot, v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
            )
            return out.squeeze(0).transpose(0, 1)

        return sdpa_mask
    if variant == "varlen_attn":
        return _varlen_attn_anchor(inputs, args, max_seqlen)

    def graphopt_op(q, k, v):
        return torch.ops.graphopt.varlen_attention(q, k, v, cos, sin, cu_seqlens, max_seqlen, scale, False, variant)

    return graphopt_op


def _varlen_attn_anchor(inputs: dict, args: argparse.Namespace, max_seqlen: int):
    """torch's varlen_attn on the (q, k) it is given, as a user without graphopt would call it."""
    from torch.nn.attention.varlen import varlen_attn

    params = varlen_module._varlen_attn_params()
    # torch <= 2.10 takes is_causal, later versions window_size=(-1, 0) for causal
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = args.head_dim**-0.5
    has_gqa = "enable_gqa" in params
    groups = args.heads // args.kv_heads
    cu_seqlens = inputs["cu_seqlens"]

    def anchor(q, k, v):
        if has_gqa:
            kwargs["enable_gqa"] = groups > 1
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)

    return anchor


def time_ms(step, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(variant: str, inputs: dict, args: argparse.Namespace) -> dict:
    fn = attention_fn(variant, inputs, args)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    grad_out = torch.randn_like(q if q.shape[-1] == v.shape[-1] else q[..., : v.shape[-1]])

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    row = dict(
        variant=variant,
        impl=impl_that_runs(variant, inputs),
        fwd_ms=time_ms(forward, args.device, args.warmup, args.repeats),
        fwd_bwd_ms=time_ms(forward_backward, args.device, args.warmup, args.repeats),
    )
    tflop = causal_tflop(inputs["lengths"], args)
    row["fwd_tflops"] = tflop / (row["fwd_ms"] / 1e3)
    row["fwd_bwd_tflops"] = 3.5 * tflop / (row["fwd_bwd_ms"] / 1e3)
    return row


def run_or_error(variant: str, inputs: dict, args: argparse.Namespace) -> dict:
    """:func:`run`, or the variant's error in one line (the other variants still run)."""
    try:
        return run(variant, inputs, args)
    except Exception as e:  # noqa: BLE001 - a benchmark reports a broken variant and goes on
        message = (str(e).strip().splitlines() or [""])[0]
        print(f"{variant}: {type(e).__name__}: {message}", file=sys.stderr)
        return dict(variant=variant, error=f"{type(e).__name__}: {message}"[:300])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 cpu, bf16 cuda)")
    parser.add_argument("--tokens", type=int, default=None, help="packed tokens T (default: 4096 cpu, 32768 cuda)")
    parser.add_argument("--doc-len-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="document lengths, uniform in [MIN, MAX] (default: 32 1024 on cpu, 128 4096 on cuda)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 3 on cpu, 20 on cuda)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    on_cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.tokens = args.tokens or (4096 if on_cpu else 32768)
    args.doc_len_range = args.doc_len_range or ([32, 1024] if on_cpu else [128, 4096])
    args.repeats = args.repeats or (3 if on_cpu else 20)

    inputs = make_inputs(args)
    lengths = inputs["lengths"]
    print(
        f"device={args.device} dtype={args.dtype} T={args.tokens} documents={len(lengths)} "
        f"(len {min(lengths)}..{max(lengths)}) Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    results = [run_or_error(variant, inputs, args) for variant in VARIANTS if available(variant, args.device)]
    base = next((row for row in results if "error" not in row), None)
    print(f"{'variant':<14}{'impl':<24}{'fwd ms':>10}{'speed-up':>10}{'TFLOP/s':>9}{'fwd+bwd ms':>12}"
          f"{'speed-up':>10}{'TFLOP/s':>9}" + (f"   (speed-ups vs {base['variant']})" if base else ""))
    for row in results:
        if "error" in row:
            print(f"{row['variant']:<14}error: {row['error']}")
            continue
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        print(
            f"{row['variant']:<14}{row['impl'] or '-':<24}{row['fwd_ms']:>10.1f}{row['fwd_speedup']:>9.2f}x"
            f"{row['fwd_tflops']:>9.2f}{row['fwd_bwd_ms']:>12.1f}{row['fwd_bwd_speedup']:>9.2f}x"
            f"{row['fwd_bwd_tflops']:>9.2f}"
        )
    skipped = [variant for variant in VARIANTS if not available(variant, args.device)]
    if skipped:
        print(f"not available here: {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config={**vars(args), "documents": len(lengths)}, results=results, not_available=skipped), f, indent=2)
    if any("error" in row for row in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
