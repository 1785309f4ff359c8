"""Fine-tune a tiny Llama with TRL's ``SFTTrainer`` and graphopt, then print what graphopt rewrote.

    python examples/train_trl_sft.py [--layout packing|padding_free|padded] [--steps 8]

Everything is built locally, with no downloads: the model (``graphopt.tiny_models``), a word-level
tokenizer and an in-memory dataset. The one line that turns graphopt on is
``callbacks=[GraphoptCallback()]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import graphopt
from graphopt.hf import GraphoptCallback
from graphopt.tiny_models import build_tiny_model

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


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Words "w0", "w1", ... plus pad, bos, eos (ids 0, 1, 2, as in the tiny model's config)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_texts(n: int, vocab_size: int, seed: int = 0) -> Dataset:
    """``n`` texts of 5 to 14 random words."""
    rng = random.Random(seed)
    lines = [" ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(rng.randint(5, 14))) for _ in range(n)]
    return Dataset.from_dict({"text": lines})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="packing", choices=LAYOUTS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    model = build_tiny_model("llama")
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="graphopt-sft-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # SFTConfig defaults to bf16 autocast, on the CPU too: keep it for GPUs that have bf16.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        # SFTConfig turns activation checkpointing on by default; graphopt does not rewrite inside
        # checkpointed layers yet.
        gradient_checkpointing=False,
        **layout_args(args.layout, args.batch),
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=tiny_texts(4 * args.steps * args.batch, model.config.vocab_size),
        processing_class=tiny_tokenizer(model.config.vocab_size),
        callbacks=[GraphoptCallback()],
    )
    with graphopt.capture() as report:
        trainer.train()
    print()
    print(report)


if __name__ == "__main__":
    main()
