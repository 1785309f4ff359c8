"""Train a tiny Llama with transformers' ``Trainer`` and graphopt, then print what graphopt rewrote.

    python examples/train_hf_trainer.py [--steps 8]

Everything is built locally, with no downloads: the model (``graphopt.tiny_models``), a word-level
tokenizer and an in-memory dataset. The one line that turns graphopt on is
``callbacks=[GraphoptCallback()]``.
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import graphopt
from graphopt.hf import GraphoptCallback
from graphopt.tiny_models import build_tiny_model, tiny_texts, tiny_tokenizer


def train(args, output_dir: str) -> None:
    """Train a tiny Llama with graphopt on; checkpoints and logs go to ``output_dir``."""
    model = build_tiny_model("llama")
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    dataset = tiny_texts(args.steps * args.batch, model.config.vocab_size).map(
        lambda batch: tokenizer([text + " </s>" for text in batch["text"]]), batched=True, remove_columns=["text"]
    )
    training_args = TrainingArguments(
        output_dir=output_dir,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graphopt-trainer-") as output_dir:  # removed at the end
        train(args, output_dir)


if __name__ == "__main__":
    main()
