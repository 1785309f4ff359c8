"""Fine-tune a tiny Llama with TRL's ``SFTTrainer`` and graphopt, then print what graphopt rewrote.

    python examples/train_trl_sft.py [--layout packing|padding_free|padded] [--steps 8]

Everything is built locally, with no downloads: the model (``graphopt.tiny_models``), a word-level
tokenizer and an in-memory dataset. The one line that turns graphopt on is
``callbacks=[GraphoptCallback()]``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from trl import SFTConfig, SFTTrainer

import graphopt
from graphopt.hf import GraphoptCallback
from graphopt.tiny_models import build_tiny_model, tiny_texts, tiny_tokenizer

MAX_LENGTH = 16

LAYOUTS = ("packing", "padding_free", "padded")


def layout_args(layout: str, batch: int) -> dict:
    """SFTConfig fields for ``layout``. Padded batches are padded to a fixed multiple so that every
    step has one shape; packing and padding-free flatten the batch into one row of documents, padded
    to ``batch * MAX_LENGTH`` tokens."""
    if layout == "padded":
        return dict(max_length=MAX_LENGTH, pad_to_multiple_of=MAX_LENGTH)
    flat = dict(pad_to_multiple_of=batch * MAX_LENGTH)
    if layout == "packing":
        return dict(packing=True, max_length=MAX_LENGTH, **flat)
    return dict(padding_free=True, max_length=None, **flat)


def train(args, output_dir: str) -> None:
    """Train a tiny Llama with graphopt on; checkpoints and logs go to ``output_dir``."""
    model = build_tiny_model("llama")
    config = SFTConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # SFTConfig defaults to bf16 autocast, on the CPU too: keep it for GPUs that have bf16.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **layout_args(args.layout, args.batch),
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=tiny_texts(4 * args.steps * args.batch, model.config.vocab_size),
        processing_class=tiny_tokenizer(model.config.vocab_size),
        # TRL computes its loss outside the model, so for padded batches graphopt needs your word
        # that padded outputs are unused (TRL's collator sets their labels to -100, and its loss
        # skips them). Packed and padding-free batches need nothing.
        callbacks=[GraphoptCallback(options={"padded_outputs_unused": True} if args.layout == "padded" else None)],
    )
    with graphopt.capture() as report:
        trainer.train()
    print()
    print(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="packing", choices=LAYOUTS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graphopt-sft-") as output_dir:  # removed at the end
        train(args, output_dir)


if __name__ == "__main__":
    main()
