"""Train a tiny Llama with transformers' ``Trainer`` and graphopt, then print what graphopt rewrote.

    python examples/train_hf_trainer.py [--steps 8]

Everything is built locally, with no downloads: the model (``graphopt.tiny_models``), a word-level
tokenizer and an in-memory dataset. The one line that turns graphopt on is
``callbacks=[GraphoptCallback()]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer, TrainingArguments

import graphopt
from graphopt.hf import GraphoptCallback
from graphopt.tiny_models import build_tiny_model


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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    model = build_tiny_model("llama")
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    dataset = tiny_texts(args.steps * args.batch, model.config.vocab_size).map(
        lambda batch: tokenizer([text + " </s>" for text in batch["text"]]), batched=True, remove_columns=["text"]
    )
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="graphopt-trainer-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        # Right padding (the tokenizer's default), labels -100 at pads; a fixed multiple keeps one shape.
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=16),
        callbacks=[GraphoptCallback()],
    )
    with graphopt.capture() as report:
        trainer.train()
    print()
    print(report)


if __name__ == "__main__":
    main()
