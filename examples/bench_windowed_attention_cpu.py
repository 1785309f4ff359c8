"""Times graphopt::varlen_attention's CPU path (impl="torch") on packed documents, with and without
a sliding window: forward and backward medians.

    python examples/bench_windowed_attention_cpu.py --lengths 3350 746 --window 512

Defaults: 4 query / 2 kv heads of 64 channels, fp32, no RoPE (R = 0), 5 timed steps after one.
"""

import argparse
import time

import torch

import graphopt.ops.varlen_attention  # noqa: F401  (registers torch.ops.graphopt.varlen_attention)


def time_call(lengths: list[int], heads: int, kv_heads: int, head_dim: int, window: int, steps: int) -> tuple[float, float]:
    """Median forward and backward seconds over ``steps`` calls (after one untimed)."""
    gen = torch.Generator().manual_seed(0)
    n_tokens = sum(lengths)
    q = torch.randn(n_tokens, heads, head_dim, generator=gen).requires_grad_()
    k = torch.randn(n_tokens, kv_heads, head_dim, generator=gen).requires_grad_()
    v = torch.randn(n_tokens, kv_heads, head_dim, generator=gen).requires_grad_()
    no_rope = torch.empty(n_tokens, 0)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    forward, backward = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = torch.ops.graphopt.varlen_attention(
            q, k, v, no_rope, no_rope, cu_seqlens, max(lengths), head_dim**-0.5, False, "torch", window
        )
        middle = time.perf_counter()
        out.sum().backward()
        end = time.perf_counter()
        if step:
            forward.append(middle - start)
            backward.append(end - middle)
    return sorted(forward)[len(forward) // 2], sorted(backward)[len(backward) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[3350, 746], help="document lengths")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for window in (-1, args.window):
        fwd, bwd = time_call(args.lengths, args.heads, args.kv_heads, args.head_dim, window, args.steps)
        label = "no window" if window == -1 else f"window {window}"
        print(f"{label:>12}: forward {fwd * 1e3:.1f} ms, backward {bwd * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
