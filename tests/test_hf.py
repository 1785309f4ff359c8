"""graphopt under transformers' ``Trainer`` and TRL's ``SFTTrainer``, turned on by ``GraphoptCallback``.

Each configuration trains a tiny Llama for ``STEPS`` steps twice, from the same seed on the same
data with the same arguments: eagerly, and with the callback. Every step's loss must agree, the
compiled run must show graphopt's rewrites (counts and the rewritten code) and its runtime must
take the fast path on every step. One pair of runs per configuration serves all of its tests:
compiling is the cost on 2 cores, and batches are padded to fixed shapes so each run compiles once.

Everything is local: the model comes from ``graphopt.tiny_models``, the tokenizer is a word-level
tokenizer built here, the datasets are in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

import graphopt  # noqa: E402
from graphopt.hf import GraphoptCallback  # noqa: E402
from graphopt.tiny_models import TINY_DIMS, build_tiny_model, tiny_texts, tiny_tokenizer  # noqa: E402
from tests.support.tolerances import tol  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
BATCH = 4
EVAL_BATCHES = 2
MAX_LENGTH = 16  # texts have at most 14 words + EOS, so nothing is truncated
LAYERS = TINY_DIMS["num_hidden_layers"]

# SGD keeps eager and compiled runs within fp32 tolerance over 10 steps; Adam's first steps divide
# each gradient by its own magnitude, so rounding-level differences in near-zero gradients become
# lr-sized updates. SFTConfig turns on bf16 autocast and activation checkpointing by default:
# bf16 is turned off for the fp32 comparison of tests/support/tolerances.py; checkpointing stays on (TRL's
# default), so the SFT runs check the rewrites inside checkpointed layers.
COMMON_ARGS = dict(
    per_device_train_batch_size=BATCH,
    per_device_eval_batch_size=BATCH,
    max_steps=STEPS,
    optim="sgd",
    learning_rate=0.1,
    lr_scheduler_type="constant",
    seed=0,
    use_cpu=True,
    bf16=False,
    report_to=[],
    disable_tqdm=True,
)

# Each configuration's data layout, and what graphopt must do with it.
#   trainer_padded:   Trainer + DataCollatorForLanguageModeling, right padding to (4, 16).
#   sft_padded:       SFTTrainer's default collator, right padding to (4, 16).
#   sft_padding_free: the batch flattened into one row of documents (position_ids restart at 0),
#                     padded to 64 tokens (a length-1 document per pad token, labels -100).
#   sft_packing:      BFD packing into rows of <= 16 tokens, flattened as above.
#   *_sliding:        the same with a tiny Gemma 3 whose layer 0 slides over a window of 4 tokens,
#                     shorter than most documents (layer 1 attends fully).
#   trainer_padded_moe: the Trainer's padded layout with a tiny Qwen3-MoE (every layer routed, 4
#                     experts, 2 per token) adding the router's auxiliary loss to the loss.
CONFIGS = (
    "trainer_padded", "sft_padded", "sft_padding_free", "sft_packing",
    "trainer_padded_sliding", "sft_padding_free_sliding", "trainer_padded_moe",
)
WINDOW = 4
MODELS = {config: ("gemma3_text", {"sliding_window": WINDOW}) for config in CONFIGS if config.endswith("_sliding")}
MODELS["trainer_padded_moe"] = ("qwen3_moe", {"output_router_logits": True, "router_aux_loss_coef": 0.5})
EXPECTED_REWRITES = {
    "trainer_padded": {"mask_elision": LAYERS, "fused_cross_entropy": 1, "unpad": 1},
    # TRL computes the log-probabilities in its own chunked autograd.Function, which Dynamo cannot
    # trace (a graph break): no LM head or cross-entropy reaches graphopt, so only the mask, under
    # the documented padded_outputs_unused (TRL scores only positions whose label is not -100).
    "sft_padded": {"mask_elision": LAYERS},
    "sft_padding_free": {"varlen_attention": LAYERS, "rope_fusion": LAYERS},
    "sft_packing": {"varlen_attention": LAYERS, "rope_fusion": LAYERS},
    "trainer_padded_sliding": {"mask_elision": LAYERS, "fused_cross_entropy": 1, "unpad": 1},
    "sft_padding_free_sliding": {"varlen_attention": LAYERS, "rope_fusion": LAYERS},
    # the auxiliary loss sums router statistics weighted by the mask: proven the same unpadded
    "trainer_padded_moe": {"mask_elision": LAYERS, "fused_cross_entropy": 1, "unpad": 1},
}
# The windowed rule each sliding configuration must show (its sliding layer's).
EXPECTED_RULES = {
    "trainer_padded_sliding": ("mask_elision", "sdpa_sliding_causal_padding"),
    "sft_padding_free_sliding": ("varlen_attention", "sdpa_packed_sliding"),
}
# Text that each rewrite leaves in the code of the graph that runs.
REWRITTEN_CODE = {
    "mask_elision": "is_causal = True",
    "unpad": "graphopt.varlen_attention",  # the unpadded graph runs per-row varlen attention
    "fused_cross_entropy": "graphopt.linear_cross_entropy",
    "varlen_attention": "graphopt.varlen_attention",
}


def make_model(config: str):
    family, overrides = MODELS.get(config, ("llama", {}))
    return build_tiny_model(family, **overrides)


def make_trainer(config: str, output_dir: Path, callbacks: list) -> Trainer:
    """A fresh tiny model (seed 0; Llama, or ``MODELS``') in the trainer of ``config``, on
    ``STEPS * BATCH`` texts."""
    model = make_model(config)
    config = config.removesuffix("_sliding").removesuffix("_moe")
    if config == "trainer_padded":
        return make_hf_trainer(output_dir, callbacks, model)
    layout = {
        "sft_padded": dict(max_length=MAX_LENGTH, pad_to_multiple_of=MAX_LENGTH),
        "sft_padding_free": dict(padding_free=True, max_length=None, pad_to_multiple_of=BATCH * MAX_LENGTH),
        "sft_packing": dict(packing=True, max_length=MAX_LENGTH, pad_to_multiple_of=BATCH * MAX_LENGTH),
    }[config]
    args = trl.SFTConfig(output_dir=str(output_dir), save_strategy="no", **COMMON_ARGS, **layout)
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=tiny_texts(STEPS * BATCH, seed=0),
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
    )


def make_hf_trainer(output_dir: Path, callbacks: list, model=None) -> Trainer:
    """``Trainer`` with the causal-LM collator (right padding, labels -100 at pads), a checkpoint
    every 5 steps and an evaluation set."""
    tokenizer = tiny_tokenizer()

    def tokenize(batch):
        return tokenizer([text + " </s>" for text in batch["text"]])

    # Activation checkpointing with the tiny config's use_cache=True: transformers then logs a
    # warning_once in every forward, which the callback lets Dynamo skip (a graph break otherwise).
    args = TrainingArguments(
        output_dir=str(output_dir), save_strategy="steps", save_steps=5, gradient_checkpointing=True, **COMMON_ARGS
    )
    return Trainer(
        model=model if model is not None else build_tiny_model("llama"),
        args=args,
        train_dataset=tiny_texts(STEPS * BATCH, seed=0).map(tokenize, batched=True, remove_columns=["text"]),
        eval_dataset=tiny_texts(EVAL_BATCHES * BATCH, seed=1).map(tokenize, batched=True, remove_columns=["text"]),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=MAX_LENGTH),
        callbacks=callbacks,
    )


@dataclass
class Run:
    trainer: Trainer
    losses: list[float]
    report: graphopt.Report


# The callback's options per configuration: README's recommendation for TRL's padded layout.
OPTIONS = {"sft_padded": {"padded_outputs_unused": True}}
# Dynamo settings per configuration (none: each runs with Dynamo's defaults, as a user's does; the
# MoE model's router logits are appended to transformers' output collector inside each checkpointed
# layer, which graphopt lets Dynamo record: graphopt/tracing.py).
DYNAMO_CONFIG: dict[str, dict] = {}


def train(config: str, output_dir: Path, *, compiled: bool) -> Run:
    callbacks = [GraphoptCallback(options=OPTIONS.get(config))] if compiled else []
    trainer = make_trainer(config, output_dir, callbacks)
    losses = record_step_losses(trainer)
    # Dynamo caches graphs per code object: without a reset this run could reuse (and not report)
    # a graph compiled for an earlier configuration.
    torch._dynamo.reset()
    with graphopt.capture() as report, torch._dynamo.config.patch(**DYNAMO_CONFIG.get(config, {})):
        trainer.train()
    return Run(trainer, losses, report)


def record_step_losses(trainer: Trainer) -> list[float]:
    """A list that gains the loss of each training step ``trainer`` runs from now on, in full fp32
    precision (some transformers releases round the logged loss to 4 decimals)."""
    losses = []
    training_step = trainer.training_step

    def recorded(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.append(loss.item())
        return loss

    trainer.training_step = recorded
    return losses


class Runs:
    """The eager and the compiled run of each configuration, trained on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._pairs: dict[str, tuple[Run, Run]] = {}

    def __getitem__(self, config: str) -> tuple[Run, Run]:
        if config not in self._pairs:
            eager = train(config, self.folder / config / "eager", compiled=False)
            self._pairs[config] = eager, train(config, self.folder / config / "graphopt", compiled=True)
        return self._pairs[config]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("hf"))


def assert_losses_equal(compiled: list[float], eager: list[float]) -> None:
    assert len(compiled) == len(eager)
    for step, (c, e) in enumerate(zip(compiled, eager), start=1):
        torch.testing.assert_close(
            torch.tensor(c), torch.tensor(e), **tol(torch.float32), msg=lambda m, step=step: f"step {step}: {m}"
        )


@pytest.mark.parametrize("config", CONFIGS)
def test_every_step_loss_matches_eager(runs, config):
    eager, compiled = runs[config]
    assert len(eager.losses) == STEPS
    assert_losses_equal(compiled.losses, eager.losses)


@pytest.mark.parametrize("config", CONFIGS)
def test_rewrites_fire(runs, config):
    _, compiled = runs[config]
    report = compiled.report
    code = "\n".join(report.graph_code("after"))
    for name, n in EXPECTED_REWRITES[config].items():
        assert report.counts[name] >= n, f"{name}: expected >= {n}\n{report}"
        # with unpadding the graph that runs is the unpadded one: no is_causal SDPA is left in it
        unpadded = name == "mask_elision" and "unpad" in EXPECTED_REWRITES[config]
        if name in REWRITTEN_CODE and not unpadded:
            assert REWRITTEN_CODE[name] in code, f"{name}: {REWRITTEN_CODE[name]!r} not in the rewritten graphs"
    if config in EXPECTED_RULES:  # the sliding layer's window was kept, not dropped to a mask
        assert report.rule_counts[EXPECTED_RULES[config]] >= 1, report
    if config.endswith("_moe"):  # the router's auxiliary loss is in the graph, on the real tokens
        notes = [n for g in report.graphs for n in g.notes]
        assert any("through sums weighted by" in n for n in notes), notes
        assert "scatter_add_" in code and report.rule_counts[("unpad", "tokens")] >= 1, report
    # Activation checkpointing was on (TRL's default; set for the Trainer), and rewritten through.
    assert "tag_activation_checkpoint(" in code


@pytest.mark.parametrize("config", CONFIGS)
def test_every_step_takes_the_fast_path(runs, config):
    _, compiled = runs[config]
    report = compiled.report
    if config in ("trainer_padded", "sft_padded", "trainer_padded_sliding", "trainer_padded_moe"):
        assert any(g.name == "right_padding" for g in report.guards), report
    if config.startswith("trainer_padded"):  # the default padding collator: every step runs unpadded
        assert report.runtime["unpad"] == STEPS, report
    if config == "sft_padded":  # TRL's own loss reads hidden[:, :-1] in the graph: said, not silent
        reasons = [d.reason for g in report.graphs for d in g.declines if d.name == "unpad"]
        assert any("slices a token dimension" in r for r in reasons), report
    assert report.runtime["fast_path"] == STEPS, report
    assert report.runtime["fallback"] == 0, report


def test_checkpoints_keep_the_model_state_dict_keys(runs):
    eager, compiled = runs["trainer_padded"]
    for step in (5, STEPS):
        keys = checkpoint_keys(Path(compiled.trainer.args.output_dir) / f"checkpoint-{step}")
        assert keys == checkpoint_keys(Path(eager.trainer.args.output_dir) / f"checkpoint-{step}")
        assert not any("_orig_mod" in key for key in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(Path(compiled.trainer.args.output_dir) / f"checkpoint-{STEPS}")
    trained = compiled.trainer.model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def checkpoint_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_resume_from_checkpoint_continues_the_run(runs, tmp_path):
    _, compiled = runs["trainer_padded"]
    trainer = make_trainer("trainer_padded", tmp_path, [GraphoptCallback()])
    losses = record_step_losses(trainer)
    with graphopt.capture() as report:
        trainer.train(resume_from_checkpoint=str(Path(compiled.trainer.args.output_dir) / "checkpoint-5"))
    assert_losses_equal(losses, compiled.losses[5:])
    assert report.runtime["fast_path"] == STEPS - 5 and report.runtime["fallback"] == 0, report


def test_evaluate_runs_compiled_and_matches_eager(runs):
    eager, compiled = runs["trainer_padded"]
    with graphopt.capture() as report:
        metrics = compiled.trainer.evaluate()
    torch.testing.assert_close(
        torch.tensor(metrics["eval_loss"]), torch.tensor(eager.trainer.evaluate()["eval_loss"]), **tol(torch.float32)
    )
    assert report.counts["mask_elision"] >= LAYERS and report.counts["fused_cross_entropy"] >= 1, report
    assert report.runtime["fast_path"] == EVAL_BATCHES and report.runtime["fallback"] == 0, report


def test_generate_after_training_matches_eager(runs):
    eager, compiled = runs["trainer_padded"]
    prompt = torch.tensor([[1, 5, 9, 17, 33, 64]])
    expected = eager.trainer.model.eval().generate(prompt, max_new_tokens=4, do_sample=False)
    model = compiled.trainer.model.eval()
    with torch.compiler.set_stance("force_eager"):  # the generation path the callback documents
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), expected)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), expected)


def test_trainer_compile_arguments_are_refused(tmp_path):
    model = build_tiny_model("llama")
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="leave torch_compile"):
        Trainer(model=model, args=args, callbacks=[GraphoptCallback()])


def test_a_compiled_model_is_refused(tmp_path):
    model = torch.compile(build_tiny_model("llama"), backend="graphopt")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="before torch.compile"):
        Trainer(model=model, args=args, callbacks=[GraphoptCallback()])


@pytest.mark.parametrize("setting, expected", [(True, False), (False, False), ("python_reducer", "python_reducer")])
def test_callback_turns_off_dynamos_ddp_split_at_its_default(tmp_path, setting, expected):
    """Under DDP graphopt then sees each step whole (labels included) and splits at the buckets
    itself; a non-default choice of the user is kept."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with torch._dynamo.config.patch(optimize_ddp=setting):
        Trainer(model=build_tiny_model("llama"), args=args, callbacks=[GraphoptCallback()])
        assert torch._dynamo.config.optimize_ddp == expected


def test_unknown_options_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="mask_elision"):
        GraphoptCallback(options={"mask_elison": False})


def test_peft_lora_model_gets_every_rewrite_and_no_lm_head_gradient():
    """A PEFT LoRA model (adapters on q/v, everything else frozen, lm_head included): mask
    elision and the fused loss fire, the loss and every trainable gradient equal eager, and the
    fused loss computes no gradient for the frozen lm_head."""
    peft = pytest.importorskip("peft")
    from graphopt.tiny_models import make_batch
    from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

    model = peft.get_peft_model(
        build_tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    cm = CompiledModel(model)
    batch = make_batch("right", batch=2, seq=16, seed=21)
    eager, compiled, report = cm.step(batch)
    assert_steps_equal(eager, compiled, real_positions=real_positions(batch))
    assert eager.grads and all("lora_" in name for name in eager.grads)
    assert report.counts["mask_elision"] == LAYERS and report.counts["fused_cross_entropy"] == 1, report
    assert report.runtime["fast_path"] == 1
    assert "compute_grad_weight = False" in cm.after_code()
