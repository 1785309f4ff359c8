"""Training-step benchmark: eager vs ``backend="inductor"`` vs ``backend="graphopt"`` in one run.

    python -m graphopt.bench --config padded --steps 5 --warmup 1
    python -m graphopt.bench --config padded --layout left     # graphopt's exact fallback vs inductor
    python -m graphopt.bench --vary-length --pad-to-multiple-of 64   # 100 steps, a new length each step
    python examples/benchmark.py --batch 2 --seq 256 --layers 2 --hidden 128 --vocab 2000 --steps 3

A step is forward (HF computes the loss inside ``forward``) + backward + optimizer step (AdamW by
default, ``--optimizer sgd``) of a Llama-style model built locally from a ``LlamaConfig`` (no
downloads). The optimizer step runs eagerly for every backend; only the model is compiled.

Method:

- Each backend runs in its own subprocess, on a freshly built model seeded identically (the parent
  checks that every child saw the same weight checksum), on the same pre-built batches.
- Each child gets a fresh, empty Inductor cache folder, so the first step times a cold compile
  (``--warm-cache`` keeps the user's cache instead).
- Step time is the median of ``--steps`` timed steps after the first (compile) step and ``--warmup``
  untimed ones. Tokens/s divides the real (non-pad) and the total token count by that median.
- Peak memory on the CPU is the resident-set high-water mark: ``ru_maxrss`` of the child just
  before the timed steps (import, model, compile, first steps), then, after resetting the mark
  through ``/proc/self/clear_refs``, ``VmHWM`` over the timed steps alone. On CUDA it is
  ``torch.cuda.max_memory_allocated`` over the same two spans.
- The loss of the first step must agree across backends (same weights, same batch); the table
  shows each backend's difference to eager.
- For graphopt the child also records ``graphopt.capture()``: rewrite counts and runtime dispatch
  counters, and measures the runtime guard's cost three ways (see :func:`_guard_overhead`).

Inductor config keys in ``--options`` are passed to the inductor baseline too, so both compiled
backends run the same Inductor configuration.

``--vary-length`` times a whole training run instead (see :func:`run_vary_worker`): every step draws
a new padded length, so the run pays for Dynamo's recompilations and for graphopt's fallbacks, and
the result is the total wall time, the number of compilations and the fast-path fraction.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# graphopt-flattened: graphopt on the documents of --layout uneven flattened into one row
# (DataCollatorWithFlattening), i.e. its packed path, to compare unpadding with it in one run.
BACKENDS = ("eager", "inductor", "graphopt", "graphopt-flattened")
IGNORE_INDEX = -100
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Presets for --config; explicit flags override them. "target" is what the preset is meant to
# show (checked and printed at the end): graphopt/inductor speed-up and peak-memory ratio.
PRESETS = {
    "padded": dict(
        layout="right", batch=2, seq=2048, pad_fraction=0.25, hidden=256, layers=4, vocab=8000,
        target=dict(speedup=1.2),
    ),
    # Uneven rows as in SFT data: one row of the full length, the others' lengths drawn so that
    # half the tokens are padding. --layout flattened runs the same documents packed in one row.
    "padded-50": dict(
        layout="uneven", batch=4, seq=2048, pad_fraction=0.5, hidden=256, layers=4, vocab=8000,
        target=dict(speedup=2.2),
    ),
    "padded-short": dict(
        layout="right", batch=8, seq=128, pad_fraction=0.25, hidden=256, layers=4, vocab=8000,
        target=dict(),
    ),
    "packed": dict(
        layout="packed", tokens=8192, rows=1, doc_len="512-2048", hidden=256, layers=4, vocab=8000,
        target=dict(speedup=3.0),
    ),
    "loss": dict(
        layout="none", batch=4, seq=512, hidden=256, layers=2, vocab=128256,
        target=dict(speedup=0.95, memory=0.6),
    ),
    # Gemma-3-like: 6 layers, 5 of 6 with a sliding window of 512 tokens, 4096-token rows.
    "sliding-packed": dict(
        family="gemma3", window=512, layout="packed", tokens=4096, rows=1, doc_len="256-4096",
        hidden=256, layers=6, vocab=8000, target=dict(speedup=2.0),
    ),
    "sliding-padded": dict(
        family="gemma3", window=512, layout="right", batch=2, seq=4096, pad_fraction=0.25,
        hidden=256, layers=6, vocab=8000, target=dict(speedup=1.5),
    ),
    # Qwen3-MoE-like: every layer 8 experts, 2 per token; uneven SFT rows, half the tokens padding.
    "moe-padded-50": dict(
        family="qwen3_moe", layout="uneven", batch=4, seq=1024, pad_fraction=0.5, hidden=256, layers=4,
        vocab=8000, target=dict(speedup=1.5),
    ),
}
DEFAULTS = dict(
    family="llama", window=0,
    layout="right", batch=2, seq=256, pad_fraction=0.25, tokens=8192, rows=1, doc_len="512-2048",
    hidden=128, layers=2, heads=0, kv_heads=0, intermediate=0, vocab=2000, steps=5, warmup=1,
)

# --vary-length targets (graphopt vs inductor): fast path on at least this fraction of the steps,
# at most this many more Inductor compilations, and a total wall time this much shorter.
VARY_TARGET = dict(fast_path=0.99, extra_compiles=1, wall_speedup=1.15)

# |loss - eager loss| <= atol + rtol * |eager loss|. fp32 differs only in summation order; the
# atol is looser than the test suite's because a 2048-token step sums over more terms.
LOSS_TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m graphopt.bench",
        description="Training-step benchmark of eager, inductor and graphopt on a local Llama-style model.",
    )
    p.add_argument("--config", choices=sorted(PRESETS), help="preset; explicit flags override it")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--layout", choices=("right", "left", "uneven", "flattened", "none", "packed"),
                   help="right: right-padded rows of different lengths, labels -100 at pads; "
                        "left: the same rows with the pads first (graphopt's guard fails and its "
                        "exact fallback runs); uneven: right-padded, one full row and the others' "
                        "lengths drawn at random (SFT-like); flattened: the documents of 'uneven' "
                        "in one row as DataCollatorWithFlattening builds it; none: no "
                        "attention_mask; packed: documents concatenated, position_ids restarting "
                        "per document, no attention_mask")
    p.add_argument("--batch", type=int, help="rows (right/none layouts)")
    p.add_argument("--seq", type=int, help="sequence length (right/none layouts)")
    p.add_argument("--pad-fraction", type=float, help="fraction of the batch's tokens that are padding (right)")
    p.add_argument("--tokens", type=int, help="total tokens (packed)")
    p.add_argument("--rows", type=int, help="rows the packed tokens are split into (packed)")
    p.add_argument("--doc-len", help="document length range LO-HI (packed), e.g. 512-2048")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int, help="attention heads (default hidden/64, at least 2)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default heads/2: GQA)")
    p.add_argument("--intermediate", type=int, help="MLP size (default Llama's rule: 8/3 hidden, rounded up to 256)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (compile) step")
    p.add_argument("--family", choices=("llama", "gemma3", "qwen3_moe"),
                   help="llama (default); gemma3: Gemma 3's text model, layers sliding except every 6th; "
                        "qwen3_moe: every layer 8 experts, 2 per token, each expert a quarter of --intermediate")
    p.add_argument("--window", type=int, help="gemma3's sliding window (default: none, every layer full)")
    p.add_argument("--aux-loss", type=float, metavar="COEF",
                   help="qwen3_moe: add the router's auxiliary loss with this coefficient (output_router_logits=True)")
    p.add_argument("--split-layers", action="store_true",
                   help="break the compiled step around every decoder layer, as FSDP2's hooks do (a "
                        "torch._dynamo.disable-d no-op hook per layer), for every backend")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="eager,inductor,graphopt",
                   help="comma-separated subset of " + ",".join(BACKENDS) + " (default: the first three)")
    p.add_argument("--options", type=json.loads, default={},
                   help='JSON dict for backend="graphopt" (its Inductor keys also go to the inductor baseline)')
    p.add_argument("--no-guard-overhead", dest="guard_overhead", action="store_false",
                   help="skip the guard-overhead measurement (it compiles graphopt a second time)")
    p.add_argument("--no-guard-step-delta", dest="guard_step_delta", action="store_false",
                   help="measure the guard's cost per call but skip the step delta (no second compile)")
    vary = p.add_argument_group("--vary-length: one training run whose padded length changes every step")
    vary.add_argument("--vary-length", action="store_true",
                      help="--steps (default 100) steps, each of a new right-padded batch whose length is drawn "
                           "from [--min-len, --max-len] (seeded); reports total wall time with compilation, "
                           "compile counts and graphopt's fast-path fraction")
    vary.add_argument("--min-len", type=int, default=16, help="shortest drawn length (--vary-length)")
    vary.add_argument("--max-len", type=int, default=4096, help="longest drawn length (--vary-length)")
    vary.add_argument("--pad-to-multiple-of", type=int, default=1, metavar="N",
                      help="round each batch's length up to a multiple of N, as HF's collators do (--vary-length)")
    p.add_argument("--warm-cache", action="store_true", help="use the existing Inductor cache instead of a fresh one per backend")
    p.add_argument("--json", dest="json_path", help="write every result to this file")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    preset = dict(PRESETS[args.config]) if args.config else {}
    args.target = preset.pop("target", {})
    if args.layout and args.layout != preset.get("layout", args.layout):
        args.target = {}  # a preset's target is for its own layout
    if args.vary_length:
        preset.pop("seq", None)  # the length is drawn per step
        args.steps = 100 if args.steps is None else args.steps
        args.warmup, args.guard_overhead, args.target = 0, False, dict(VARY_TARGET)
        if (args.layout or "right") != "right":
            p.error("--vary-length draws right-padded batches (--layout right)")
        if not 1 <= args.min_len <= args.max_len or args.pad_to_multiple_of < 1:
            p.error("--vary-length needs 1 <= --min-len <= --max-len and --pad-to-multiple-of >= 1")
        args.seq = round_up(args.max_len, args.pad_to_multiple_of)  # the longest batch: sizes the model's positions
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if not args.heads:
        args.heads = max(2, args.hidden // 64)
    if not args.kv_heads:
        args.kv_heads = max(1, args.heads // 2)
    if not args.intermediate:
        args.intermediate = -(-(8 * args.hidden // 3) // 256) * 256
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")
    lo, _, hi = args.doc_len.partition("-")
    args.doc_range = (int(lo), int(hi or lo))
    if "graphopt-flattened" in args.backends and args.layout != "uneven":
        p.error("backend graphopt-flattened flattens the rows of --layout uneven (e.g. --config padded-50)")
    if args.aux_loss is not None and args.family != "qwen3_moe":
        p.error("--aux-loss is the router loss of --family qwen3_moe (e.g. --config moe-padded-50)")
    if args.layout == "packed" and args.tokens % args.rows:
        p.error("--tokens must be divisible by --rows")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


# --------------------------------------------------------------------------------------------
# Model and batches (identical in every child: seeded, built on the CPU, then moved)


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    fields = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, args.tokens // args.rows, 2048),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        use_cache=False,
    )
    if args.family == "gemma3":
        head_dim = args.hidden // args.heads
        sliding = [args.window and (i + 1) % 6 != 0 for i in range(args.layers)]
        config = Gemma3TextConfig(
            **fields, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=args.window or fields["max_position_embeddings"],
            layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        )
    elif args.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            **fields, head_dim=args.hidden // args.heads, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=args.intermediate // 4, decoder_sparse_step=1,
            output_router_logits=args.aux_loss is not None, router_aux_loss_coef=args.aux_loss or 0.0,
        )
    else:
        config = LlamaConfig(**fields)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    from graphopt.hf import install_output_hooks

    install_output_hooks(model)  # as GraphoptCallback does (--aux-loss records router logits)
    if args.split_layers:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(torch._dynamo.disable(_no_op_hook))
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def _no_op_hook(module, args):
    return None


def make_batch(args, index: int) -> dict:
    """Batch number ``index`` of the run, on the CPU. The same in every child."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
    if args.vary_length:
        length = int(torch.randint(args.min_len, args.max_len + 1, (), generator=gen))
        seq = round_up(length, args.pad_to_multiple_of)
        input_ids = torch.randint(3, args.vocab, (args.batch, seq), generator=gen)
        return padded_batch(input_ids, right_padded_lengths(args.batch, length, args.pad_fraction), "right")
    if args.layout == "packed":
        rows, per_row = args.rows, args.tokens // args.rows
        input_ids = torch.randint(3, args.vocab, (rows, per_row), generator=gen)
        position_ids = torch.empty(rows, per_row, dtype=torch.long)
        labels = input_ids.clone()
        lo, hi = args.doc_range
        for r in range(rows):
            start = 0
            while start < per_row:
                n = int(torch.randint(lo, hi + 1, (), generator=gen))
                n = min(n, per_row - start)
                position_ids[r, start : start + n] = torch.arange(n)
                labels[r, start] = IGNORE_INDEX  # as DataCollatorWithFlattening: no target across documents
                start += n
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    input_ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
    if args.layout == "none":
        return {"input_ids": input_ids, "labels": input_ids.clone()}
    if args.layout in ("uneven", "flattened"):
        batch = padded_batch(input_ids, uneven_lengths(args.batch, args.seq, args.pad_fraction, gen), "right")
        return flattened(batch) if args.layout == "flattened" else batch
    return padded_batch(input_ids, right_padded_lengths(args.batch, args.seq, args.pad_fraction), args.layout)


def uneven_lengths(batch: int, seq: int, pad_fraction: float, gen) -> list[int]:
    """Row lengths as in SFT data: one row of ``seq`` tokens (the batch's longest), the others
    drawn at random (a uniform split of the rest), ``pad_fraction`` of all tokens padding."""
    import torch

    if batch == 1:
        return [seq]
    rest = max(batch - 1, round((1 - pad_fraction) * batch * seq) - seq)
    weights = -torch.log(torch.rand(batch - 1, generator=gen))  # normalized: a uniform split (Dirichlet(1))
    # cumulative rounding: the shares sum to exactly ``rest``, so every batch has the same number
    # of real tokens (the flattened layout then keeps one shape)
    bounds = (weights.cumsum(0) / weights.sum() * rest).round().long()
    shares = torch.diff(bounds, prepend=torch.zeros(1, dtype=torch.long)).clamp(1, seq)
    return [seq] + shares.tolist()


def flattened(batch: dict) -> dict:
    """The rows of a right-padded batch as one row of documents, as ``DataCollatorWithFlattening``
    builds it: position_ids restart at 0 per document, each document's first label is -100, no
    attention_mask. HF's loss then scores the same (prefix, target) pairs as on the padded batch."""
    import torch

    real = batch["attention_mask"].bool()
    lengths = real.sum(-1).tolist()
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"][real][None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "labels": labels[real][None],
    }


def padded_batch(input_ids, lengths: list[int], layout: str) -> dict:
    """input_ids, attention_mask and labels for rows holding ``lengths`` real tokens each, padded
    after them (``"right"``) or before them (``"left"``). Pads are token PAD_ID with mask 0 and
    label -100; positions are HF's default (no position_ids)."""
    import torch

    seq = input_ids.shape[1]
    columns, n_real = torch.arange(seq)[None, :], torch.tensor(lengths)[:, None]
    real = columns < n_real if layout == "right" else columns >= seq - n_real
    attention_mask = real.long()
    input_ids = input_ids.masked_fill(~real, PAD_ID)
    labels = input_ids.masked_fill(~real, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def right_padded_lengths(batch: int, seq: int, pad_fraction: float) -> list[int]:
    """Row lengths spread evenly from ``seq`` down to ``seq * (1 - 2 * pad_fraction)``, so that
    rows differ and ``pad_fraction`` of all tokens are padding (e.g. B=2, S=2048: 2048 and 1024)."""
    if batch == 1:
        return [max(1, round(seq * (1 - pad_fraction)))]
    span = 2 * pad_fraction * seq
    return [max(1, min(seq, round(seq - span * i / (batch - 1)))) for i in range(batch)]


def token_counts(batch: dict) -> tuple[int, int]:
    """(real tokens, total tokens) of a batch."""
    total = batch["input_ids"].numel()
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else total), total


# --------------------------------------------------------------------------------------------
# Worker: one backend, in its own process


class Heartbeat:
    """Prints ``label ... N s`` to stderr every ``every`` seconds while the block runs."""

    def __init__(self, label: str, every: float = 15.0):
        self.label, self.every = label, every
        self._stop = threading.Event()

    def __enter__(self):
        self.start = time.perf_counter()
        log(f"{self.label} ...")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.every):
            log(f"{self.label} ... {time.perf_counter() - self.start:.0f} s")

    def __exit__(self, *exc):
        self._stop.set()
        self.elapsed = time.perf_counter() - self.start
        log(f"{self.label}: done in {self.elapsed:.1f} s")


def log(message: str) -> None:
    print(f"[bench {os.environ.get('GRAPHOPT_BENCH_WORKER', 'main')}] {message}", file=sys.stderr, flush=True)


class Memory:
    """Peak memory of this process: resident set on the CPU, allocated memory on CUDA (MB)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def peak_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    def current_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def reset_peak(self) -> bool:
        """Start a new high-water mark; False when the kernel does not allow it."""
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS, Linux >= 4.0
            return True
        except OSError:
            return False

    def window_peak_mb(self) -> float:
        if self.cuda:
            return self.peak_mb()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


class Trainer:
    """A model (compiled or not), its optimizer, and a timed ``step``."""

    def __init__(self, args, backend: str, options: dict):
        import torch

        self.torch, self.device = torch, args.device
        self.model = build_model(args)
        self.checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        params = self.model.parameters()
        self.optimizer = (
            torch.optim.AdamW(params, lr=args.lr) if args.optimizer == "adamw" else torch.optim.SGD(params, lr=args.lr)
        )
        if backend == "eager":
            self.forward = self.model
        else:
            self.forward = torch.compile(self.model, backend=backend, options=options or None)

    def step(self, batch: dict) -> tuple[float, float]:
        """One training step; returns (seconds, loss)."""
        start = time.perf_counter()
        loss = self.forward(**batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss.detach())


def run_worker(args) -> dict:
    import torch

    os.environ["GRAPHOPT_BENCH_WORKER"] = args.worker
    backend = args.worker
    if backend == "graphopt-flattened":
        args.layout, backend = "flattened", "graphopt"
    from graphopt.options import split_options

    _, inductor_options = split_options(args.options)
    options = {"eager": {}, "inductor": inductor_options, "graphopt": args.options}[backend]
    if args.vary_length:
        return run_vary_worker(args, backend, options)
    memory = Memory(args.device)
    n_batches = min(args.warmup + args.steps + 1, 8)
    batches = [{k: v.to(args.device) for k, v in make_batch(args, i).items()} for i in range(n_batches)]
    real, total = token_counts(batches[0])

    trainer = Trainer(args, backend, options)
    result = {"backend": backend, "weight_checksum": trainer.checksum, "real_tokens": real, "total_tokens": total}

    capture = contextlib.nullcontext(None)
    if backend == "graphopt":
        import graphopt

        capture = graphopt.capture()
    guard_timer = GuardTimer() if backend == "graphopt" else contextlib.nullcontext(None)
    torch._dynamo.utils.counters.clear()
    with capture as report, guard_timer as guard_times:
        with Heartbeat(f"{backend}: first step" + (" (compile)" if backend != "eager" else "")):
            first_time, first_loss = trainer.step(batches[0])
        result["first_step_s"] = first_time
        losses = [first_loss]
        for i in range(args.warmup):
            seconds, loss = trainer.step(batches[(1 + i) % n_batches])
            losses.append(loss)
            log(f"{backend}: warm-up {i + 1}/{args.warmup}: {seconds:.3f} s")
        result["peak_mb_to_warmup"] = memory.peak_mb()
        result["mb_before_timed"] = memory.current_mb()
        first_timed_guard = len(guard_times) if guard_times is not None else 0
        window = memory.reset_peak()
        times = []
        for i in range(args.steps):
            seconds, loss = trainer.step(batches[(1 + args.warmup + i) % n_batches])
            times.append(seconds)
            losses.append(loss)
            log(f"{backend}: step {i + 1}/{args.steps}: {seconds:.3f} s (loss {loss:.4f})")
        result["timed_peak_mb"] = memory.window_peak_mb() if window else None
        result["peak_mb"] = max(result["peak_mb_to_warmup"], result["timed_peak_mb"] or 0.0)
    result.update(step_times_s=times, median_step_s=statistics.median(times), losses=losses, first_loss=first_loss)
    result["dynamo"] = {
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
        "inductor_compiles": int(torch._dynamo.utils.counters["aot_autograd"]["total"]),
    }
    if report is not None:
        result["graphopt"] = {
            "counts": dict(report.counts),
            "rule_counts": {f"{n}/{r}": c for (n, r), c in report.rule_counts.items()},
            "runtime": dict(report.runtime),
            "declines": [f"{n}: {r}" for n, r in report.declines],
            "guards": [g.name for g in report.guards],
            "guard_seconds_timed_steps": guard_times[first_timed_guard:],
        }
        if args.guard_overhead:
            result["guard_overhead"] = _guard_overhead(args, trainer, batches, report, guard_times[first_timed_guard:])
    return result


def run_vary_worker(args, backend: str, options: dict) -> dict:
    """``--vary-length``: one training run of ``--steps`` steps, batch ``i`` of padded length drawn
    for step ``i``, timed as a whole: compilation, recompilation and fallbacks included.

    Compilations are counted two ways, from Dynamo's counters: ``dynamo_graphs`` is
    ``counters["stats"]["unique_graphs"]`` (graphs Dynamo captured: the first compile and every
    recompile of the model's frame, plus any frame graphopt compiles for a fallback), and
    ``inductor_compiles`` is ``counters["aot_autograd"]["total"]`` (graphs handed to AOTAutograd,
    which Inductor calls once per forward+backward graph it compiles: graphopt's fast graph and its
    Inductor-compiled fallback each count). A step is a compile step when either count moved.
    For graphopt each step's dispatch (``fast_path`` or ``fallback``) is read from
    ``graphopt.capture()``'s runtime counters.
    """
    import torch

    batches = [{k: v.to(args.device) for k, v in make_batch(args, i).items()} for i in range(args.steps)]
    trainer = Trainer(args, backend, options)
    counters = torch._dynamo.utils.counters
    counters.clear()
    capture = contextlib.nullcontext(None)
    if backend == "graphopt":
        import graphopt

        capture = graphopt.capture()
    steps = []
    with capture as report:
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            steps.append(_vary_step(trainer, batch, counters, report))
            if steps[-1]["compiled"] or (i + 1) % 10 == 0:
                log(f"{backend}: step {i + 1}/{args.steps}: S={steps[-1]['seq']} {steps[-1]['seconds']:.3f} s"
                    + (" (compiled)" if steps[-1]["compiled"] else "") + (f" {steps[-1]['path']}" if steps[-1]["path"] else ""))
        total = time.perf_counter() - start
    result = {"backend": backend, "weight_checksum": trainer.checksum, "total_s": total, "steps": steps,
              "first_loss": steps[0]["loss"], "peak_mb": Memory(args.device).peak_mb(),
              "dynamo_graphs": _compile_counts(counters)[0], "inductor_compiles": _compile_counts(counters)[1],
              "graph_breaks": int(sum(counters["graph_break"].values()))}
    if report is not None:
        result["graphopt"] = {"runtime": dict(report.runtime), "rule_counts": {f"{n}/{r}": c for (n, r), c in report.rule_counts.items()},
                              "declines": [f"{n}: {r}" for n, r in report.declines]}
    return result


def _vary_step(trainer: Trainer, batch: dict, counters, report) -> dict:
    """One step of the --vary-length run: its length, time, loss, whether it compiled, and
    graphopt's dispatch (``"fast_path"``, ``"fallback"``, or None when no guarded graph ran)."""
    compiles, runtime = _compile_counts(counters), dict(report.runtime) if report is not None else {}
    seconds, loss = trainer.step(batch)
    after = dict(report.runtime) if report is not None else {}
    path = next((k for k in ("fallback", "fast_path") if after.get(k, 0) > runtime.get(k, 0)), None)
    return dict(seq=batch["input_ids"].shape[1], seconds=seconds, loss=loss,
                compiled=_compile_counts(counters) != compiles, path=path)


def _compile_counts(counters) -> tuple[int, int]:
    """(Dynamo graphs captured, graphs compiled through AOTAutograd) so far."""
    return int(counters["stats"]["unique_graphs"]), int(counters["aot_autograd"]["total"])


class GuardTimer:
    """Times every call of :func:`graphopt.guards.evaluate_guards` made by the guarded dispatch
    while the block runs (it calls it through :mod:`graphopt.runtime`)."""

    def __enter__(self) -> list[float]:
        import graphopt.runtime as runtime

        self.module, self.original, self.times = runtime, runtime.evaluate_guards, []

        def timed(guards, args, **kwargs):
            start = time.perf_counter()
            result = self.original(guards, args, **kwargs)
            self.times.append(time.perf_counter() - start)
            return result

        runtime.evaluate_guards = timed
        return self.times

    def __exit__(self, *exc):
        self.module.evaluate_guards = self.original


def _guard_overhead(args, trainer: Trainer, batches: list[dict], report, guard_times: list[float]) -> dict:
    """The right-padding guard's cost, three ways:

    - ``instrumented``: median time of ``evaluate_guards`` inside the timed steps (one call per
      guarded graph per step; forward and backward are one graph under AOTAutograd).
    - ``micro``: ``right_padding_guard`` on the attention mask and HF's shifted labels plus the
      host read, on this run's batch, median of 100 calls.
    - ``step_delta``: the same step with ``trust_right_padding=True`` (no guard) on a second model
      compiled in this process, steps interleaved with the default model's (alternating which runs
      first) so both see the same machine load; median of the paired differences. On a shared
      2-core machine this is noise-bound.
    """
    import torch

    import graphopt
    from graphopt.guards import right_padding_guard, shift_targets

    out: dict = {"instrumented_median_us": None, "micro_median_us": None, "step_delta": None}
    if guard_times:
        out["instrumented_median_us"] = statistics.median(guard_times) * 1e6
    batch = batches[0]
    if "attention_mask" in batch:
        try:
            calls = []
            for i in range(110):
                start = time.perf_counter()
                targets = shift_targets(batch["labels"], 1, IGNORE_INDEX)
                conditions = right_padding_guard(batch["attention_mask"], targets, ignore_index=IGNORE_INDEX)
                torch.stack([c.reshape(()) for c in conditions.values()]).tolist()
                if i >= 10:
                    calls.append(time.perf_counter() - start)
            out["micro_median_us"] = statistics.median(calls) * 1e6
        except Exception as e:  # the guard's signature is still moving; report, don't crash
            out["micro_error"] = f"{type(e).__name__}: {e}"
    if not report.guards:
        out["step_delta"] = "skipped: graphopt installed no runtime guard for this run"
        return out
    if args.options.get("trust_right_padding"):
        out["step_delta"] = "skipped: --options already sets trust_right_padding"
        return out
    if not args.guard_step_delta:
        out["step_delta"] = "skipped: --no-guard-step-delta"
        return out
    if report.runtime.get("unpad"):
        out["step_delta"] = (
            "skipped: the guarded steps ran unpadded, which needs the guard (trust_right_padding=True "
            "turns unpadding off), so the delta would not be the guard's cost"
        )
        return out
    trusted = Trainer(args, "graphopt", dict(args.options, trust_right_padding=True))
    with Heartbeat("graphopt (trust_right_padding=True): first step (compile)"):
        trusted.step(batches[0])
    n = len(batches)
    for i in range(args.warmup):
        trusted.step(batches[(1 + i) % n])
    guarded_times, trusted_times = [], []
    with graphopt.capture() as phase:
        for i in range(args.steps):
            b = batches[(1 + args.warmup + i) % n]
            if i % 2 == 0:  # alternate which goes first, so neither always follows the other
                guarded_times.append(trainer.step(b)[0])
                trusted_times.append(trusted.step(b)[0])
            else:
                trusted_times.append(trusted.step(b)[0])
                guarded_times.append(trainer.step(b)[0])
            log(f"guard overhead: pair {i + 1}/{args.steps}: guarded {guarded_times[-1]:.3f} s, trusted {trusted_times[-1]:.3f} s")
    out["step_delta"] = {
        "guarded_median_s": statistics.median(guarded_times),
        "trusted_median_s": statistics.median(trusted_times),
        "guarded_s": guarded_times,
        "trusted_s": trusted_times,
        "guarded_min_s": min(guarded_times),
        "trusted_min_s": min(trusted_times),
        "paired_median_delta_ms": statistics.median(g - t for g, t in zip(guarded_times, trusted_times)) * 1e3,
        "runtime": dict(phase.runtime),
    }
    return out


# --------------------------------------------------------------------------------------------
# Parent: spawn one worker per backend, compare, print


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem_kb / 2**20, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["graphopt_revision"] = _git_revision()
    return info


def _git_revision() -> str:
    """``<short commit>`` of the graphopt checkout, ``+dirty`` when its tree has changes;
    ``$GRAPHOPT_REVISION`` (else "unknown") where there is no git repository."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GRAPHOPT_REVISION", "unknown")
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_parent(args, argv: list[str]) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    info = machine_info(args.device)
    example = make_batch(args, 0)
    real, total = token_counts(example)
    log(f"{describe(args)}; {real} real of {total} tokens; backends {', '.join(args.backends)}")
    results = {}
    for backend in args.backends:
        results[backend] = _spawn(args, argv, backend)
    if args.vary_length:
        summary = summarize_vary(args, results)
        print(format_vary_table(args, info, results, summary))
    else:
        summary = summarize(args, results)
        print(format_table(args, info, results, summary))
    if args.json_path:
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "json_path")}
        with open(args.json_path, "w") as f:
            json.dump({"command": " ".join(["python -m graphopt.bench", *argv]), "machine": info, "config": config,
                       "results": results, "summary": summary}, f, indent=2)
        log(f"results written to {args.json_path}")
    return 0 if summary["losses_agree"] and summary["weights_identical"] and all("error" not in r for r in results.values()) else 1


def _spawn(args, argv: list[str], backend: str) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix=f"graphopt-bench-{backend}-") as tmp:
        if not args.warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor-cache")
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "graphopt.bench", *argv, "--worker", backend, "--worker-out", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        if not os.path.exists(out):
            result = {"backend": backend, "error": f"worker exited with {proc.returncode}"}
        else:
            with open(out) as f:
                result = json.load(f)
        if "error" in result:
            log(f"{backend}: worker failed: {result['error']}")
            return result
    result["wall_s"] = time.perf_counter() - start
    return result


def _compare_first_loss(args, result: dict, ref: dict | None, summary: dict) -> None:
    """Record ``result``'s first-step loss difference to eager's (``ref``), and clear
    ``summary["losses_agree"]`` when it is outside ``LOSS_TOLERANCE``."""
    if ref is None:
        return
    rtol, atol = LOSS_TOLERANCE[args.dtype]
    result["first_loss_abs_diff_vs_eager"] = abs(result["first_loss"] - ref["first_loss"])
    if result["first_loss_abs_diff_vs_eager"] > atol + rtol * abs(ref["first_loss"]):
        summary["losses_agree"] = False


def summarize(args, results: dict) -> dict:
    ok = {b: r for b, r in results.items() if "error" not in r}
    summary = {"losses_agree": True, "weights_identical": len({r["weight_checksum"] for r in ok.values()}) <= 1}
    ref = ok.get("eager")
    for b, r in ok.items():
        r["tokens_per_s_real"] = r["real_tokens"] / r["median_step_s"]
        r["tokens_per_s_total"] = r["total_tokens"] / r["median_step_s"]
        if "inductor" in ok:
            r["speedup_vs_inductor"] = ok["inductor"]["median_step_s"] / r["median_step_s"]
            r["memory_vs_inductor"] = r["peak_mb"] / ok["inductor"]["peak_mb"]
        _compare_first_loss(args, r, ref, summary)
    if ref is not None:
        summary["max_first_loss_abs_diff_vs_eager"] = max(r["first_loss_abs_diff_vs_eager"] for r in ok.values())
    g = ok.get("graphopt")
    if g and "inductor" in ok and args.target:
        checks = {}
        if "speedup" in args.target:
            checks[f"speed-up >= {args.target['speedup']}x"] = g["speedup_vs_inductor"] >= args.target["speedup"]
        if "memory" in args.target:
            checks[f"peak memory <= {args.target['memory']}x"] = g["memory_vs_inductor"] <= args.target["memory"]
        summary["target"] = checks
    return summary


def describe(args) -> str:
    if args.vary_length:
        shape = (f"B={args.batch}, length drawn per step from [{args.min_len}, {args.max_len}]"
                 + (f" rounded up to a multiple of {args.pad_to_multiple_of}" if args.pad_to_multiple_of > 1 else "")
                 + f", right-padded {args.pad_fraction:.0%}")
        steps = f"{args.steps} steps timed as one run (compilation included)"
    elif args.layout == "packed":
        shape = f"packed {args.tokens} tokens in {args.rows} row(s), docs {args.doc_range[0]}-{args.doc_range[1]}"
    elif args.layout in ("right", "left"):
        shape = f"B={args.batch} S={args.seq} {args.layout}-padded {args.pad_fraction:.0%}"
    elif args.layout == "uneven":
        shape = f"B={args.batch} S={args.seq} right-padded {args.pad_fraction:.0%}, uneven rows"
    elif args.layout == "flattened":
        shape = f"the documents of B={args.batch} S={args.seq} uneven rows ({args.pad_fraction:.0%} padding) flattened into one row"
    else:
        shape = f"B={args.batch} S={args.seq} no attention_mask"
    if not args.vary_length:
        steps = f"{args.steps} timed steps after {args.warmup} warm-up"
    return (
        f"{args.config or 'custom'}{' --vary-length' if args.vary_length else ''}: {shape}; "
        f"{_model_name(args)} hidden {args.hidden}, "
        f"{args.layers} layers, {args.heads}/{args.kv_heads} heads, MLP {args.intermediate}, vocab {args.vocab}; "
        f"{args.device} {args.dtype}; {args.optimizer}; {steps}"
    )


def _model_name(args) -> str:
    if args.family == "gemma3":
        return "Gemma 3" + (f" (window {args.window}, 5 of 6 layers)" if args.window else "")
    if args.family == "qwen3_moe" and args.aux_loss is not None:
        return f"Qwen3-MoE (8 experts, 2 per token, router aux loss x{args.aux_loss:g})"
    return {"llama": "Llama", "qwen3_moe": "Qwen3-MoE (8 experts, 2 per token)"}[args.family]


def format_table(args, info: dict, results: dict, summary: dict) -> str:
    mem = "peak MB" if args.device == "cpu" else "peak alloc MB"
    header = ["backend", "median step ms", "min step ms", "first step s", "tok/s real", "tok/s total", "vs inductor",
              mem, "step +MB", "first loss", "|dloss| vs eager"]
    rows = []
    for b, r in results.items():
        if "error" in r:
            rows.append([b, "failed"] + [""] * (len(header) - 2))
            continue
        rows.append([
            b,
            f"{r['median_step_s'] * 1e3:.0f}",
            f"{min(r['step_times_s']) * 1e3:.0f}",
            f"{r['first_step_s']:.1f}",
            f"{r['tokens_per_s_real']:.0f}",
            f"{r['tokens_per_s_total']:.0f}",
            f"{r['speedup_vs_inductor']:.2f}x" if "speedup_vs_inductor" in r else "",
            f"{r['peak_mb']:.0f}",
            f"{r['timed_peak_mb'] - r['mb_before_timed']:.0f}" if r.get("timed_peak_mb") else "n/a",
            f"{r['first_loss']:.6f}",
            f"{r['first_loss_abs_diff_vs_eager']:.2e}" if "first_loss_abs_diff_vs_eager" in r else "",
        ])
    out = [
        "",
        describe(args),
        _machine_line(info),
        "",
        *_markdown(header, rows),
        "",
        f"{mem}: high-water mark of the backend's own process (import, model, compile, steps); step +MB: "
        "peak over the timed steps minus the memory held just before them.",
        "",
        f"weights identical across backends: {summary['weights_identical']}; first-step losses agree: "
        + (f"{summary['losses_agree']} (max |dloss| vs eager {summary['max_first_loss_abs_diff_vs_eager']:.2e})"
           if "max_first_loss_abs_diff_vs_eager" in summary else "n/a (no eager run)"),
    ]
    for b, r in results.items():
        if "error" in r:
            out.append(f"{b} FAILED: {r['error']}")
        if "dynamo" in r and b != "eager":
            out.append(f"{b}: {r['dynamo']['graphs']} graph(s), {r['dynamo']['graph_breaks']} graph break(s)"
                       + (f", {r['dynamo']['inductor_compiles']} Inductor compile(s)" if "inductor_compiles" in r["dynamo"] else ""))
    g = results.get("graphopt", {}).get("graphopt")
    if g:
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(g["rule_counts"].items())) or "none"
        runtime = ", ".join(f"{k}={v}" for k, v in sorted(g["runtime"].items())) or "none"
        out += [f"graphopt rewrites: {counts}", f"graphopt runtime: {runtime}"]
        for d in sorted(set(g["declines"])):
            out.append(f"graphopt declined: {d}")
        overhead = results["graphopt"].get("guard_overhead")
        if overhead:
            out.append("guard overhead:")
            fmt = lambda v: f"{v:.1f} us" if isinstance(v, float) else "n/a"
            out.append(f"  evaluate_guards inside the timed steps (median per call): {fmt(overhead['instrumented_median_us'])}")
            out.append(f"  right_padding_guard + host read on the batch (median of 100): {fmt(overhead['micro_median_us'])}"
                       + (f" [{overhead['micro_error']}]" if "micro_error" in overhead else ""))
            d = overhead["step_delta"]
            if isinstance(d, dict):
                out.append(
                    f"  step, default vs trust_right_padding=True (interleaved): {d['guarded_median_s'] * 1e3:.0f} ms vs "
                    f"{d['trusted_median_s'] * 1e3:.0f} ms (min {d['guarded_min_s'] * 1e3:.0f} vs {d['trusted_min_s'] * 1e3:.0f}), "
                    f"paired median delta {d['paired_median_delta_ms']:+.1f} ms"
                )
            elif d:
                out.append(f"  step delta: {d}")
    for name, met in summary.get("target", {}).items():
        out.append(f"target ({args.config}): graphopt vs inductor {name}: {'MET' if met else 'NOT MET'}")
    return "\n".join(out)


def summarize_vary(args, results: dict) -> dict:
    """Per-backend totals of a --vary-length run, and the targets (graphopt vs inductor)."""
    ok = {b: r for b, r in results.items() if "error" not in r}
    summary = {"losses_agree": True, "weights_identical": len({r["weight_checksum"] for r in ok.values()}) <= 1}
    ref = ok.get("eager")
    for b, r in ok.items():
        steps = r["steps"]
        quiet = [s["seconds"] for s in steps if not s["compiled"]]
        r["compile_steps"] = sum(s["compiled"] for s in steps)
        r["median_step_s_without_compile"] = statistics.median(quiet) if quiet else None
        r["dispatch"] = dict(collections.Counter(str(s["path"]) for s in steps))
        r["fast_path_fraction"] = sum(s["path"] == "fast_path" for s in steps) / len(steps)
        if "inductor" in ok:
            r["wall_speedup_vs_inductor"] = ok["inductor"]["total_s"] / r["total_s"]
            r["extra_compiles_vs_inductor"] = r["inductor_compiles"] - ok["inductor"]["inductor_compiles"]
        _compare_first_loss(args, r, ref, summary)
        if ref is not None:
            r["max_loss_abs_diff_vs_eager"] = max(abs(s["loss"] - e["loss"]) for s, e in zip(steps, ref["steps"]))
    g = ok.get("graphopt")
    if g and "inductor" in ok:
        t = args.target
        summary["target"] = {
            f"fast path on >= {t['fast_path']:.0%} of steps": g["fast_path_fraction"] >= t["fast_path"],
            f"Inductor compilations <= inductor's + {t['extra_compiles']}": g["extra_compiles_vs_inductor"] <= t["extra_compiles"],
            f"total wall time >= {t['wall_speedup']}x faster": g["wall_speedup_vs_inductor"] >= t["wall_speedup"],
        }
    return summary


def format_vary_table(args, info: dict, results: dict, summary: dict) -> str:
    mem = "peak MB" if args.device == "cpu" else "peak alloc MB"
    header = ["backend", "total s", "vs inductor", "first step s", "compile steps", "Dynamo graphs", "Inductor compiles",
              "median step ms (no compile)", "fast path", mem, "first loss", "max |dloss| vs eager"]
    rows = []
    for b, r in results.items():
        if "error" in r:
            rows.append([b, "failed"] + [""] * (len(header) - 2))
            continue
        median = r["median_step_s_without_compile"]
        rows.append([
            b, f"{r['total_s']:.1f}",
            f"{r['wall_speedup_vs_inductor']:.2f}x" if "wall_speedup_vs_inductor" in r else "",
            f"{r['steps'][0]['seconds']:.1f}", str(r["compile_steps"]), str(r["dynamo_graphs"]), str(r["inductor_compiles"]),
            f"{median * 1e3:.0f}" if median is not None else "n/a",
            f"{r['fast_path_fraction']:.0%}" if b == "graphopt" else "",
            f"{r['peak_mb']:.0f}", f"{r['first_loss']:.6f}",
            f"{r['max_loss_abs_diff_vs_eager']:.2e}" if "max_loss_abs_diff_vs_eager" in r else "",
        ])
    seqs = [s["seq"] for s in next((r["steps"] for r in results.values() if "steps" in r), [])]
    out = ["", describe(args), _machine_line(info), "", *_markdown(header, rows), ""]
    if seqs:
        out.append(f"padded lengths S: {min(seqs)}-{max(seqs)}, median {statistics.median(seqs):.0f}, "
                   f"{len(set(seqs))} distinct over {len(seqs)} steps")
    out += [
        "total s: wall time of the whole run, compilation included. Dynamo graphs: counters['stats']['unique_graphs']; "
        "Inductor compiles: counters['aot_autograd']['total'] (one per forward+backward graph compiled, graphopt's "
        "fallback included). compile steps: steps during which either count moved.",
        f"weights identical across backends: {summary['weights_identical']}; first-step losses agree: {summary['losses_agree']}",
    ]
    for b, r in results.items():
        if "error" in r:
            out.append(f"{b} FAILED: {r['error']}")
        elif r["graph_breaks"]:
            out.append(f"{b}: {r['graph_breaks']} graph break(s)")
    out += _vary_dispatch_lines(results.get("graphopt", {}))
    for name, met in summary.get("target", {}).items():
        out.append(f"target (--vary-length): graphopt vs inductor {name}: {'MET' if met else 'NOT MET'}")
    return "\n".join(out)


def _vary_dispatch_lines(r: dict) -> list[str]:
    """Where graphopt took its fast path and where it fell back, by padded length."""
    if "steps" not in r:
        return []
    lines = []
    for path in ("fast_path", "fallback", "None"):
        seqs = [s["seq"] for s in r["steps"] if str(s["path"]) == path]
        if seqs:
            label = "no guarded call" if path == "None" else path
            lines.append(f"graphopt {label}: {len(seqs)} of {len(r['steps'])} steps, S {min(seqs)}-{max(seqs)}")
    g = r.get("graphopt", {})
    if g:
        lines.append("graphopt runtime: " + (", ".join(f"{k}={v}" for k, v in sorted(g["runtime"].items())) or "none"))
        lines.append("graphopt rewrites: " + (", ".join(f"{k} x{v}" for k, v in sorted(g["rule_counts"].items())) or "none"))
        lines += [f"graphopt declined: {d}" for d in sorted(set(g["declines"]))]
    return lines


def _machine_line(info: dict) -> str:
    return (f"{info['date_utc']}; {info['nproc']} CPUs ({info['cpu']}), {info['ram_gb']} GB RAM; "
            f"torch {info['torch']}, transformers {info['transformers']}; graphopt {info['graphopt_revision']}"
            + (f"; {info['gpu']}" if "gpu" in info else ""))


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        try:
            result, status = run_worker(args), 0
        except Exception as e:  # the parent reports it in the table; the traceback goes to stderr
            traceback.print_exc()
            message = str(e).strip().splitlines()
            result = {"backend": args.worker, "error": f"{type(e).__name__}: {message[-1] if message else ''}"[:300]}
            status = 1
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return status
    return run_parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())
