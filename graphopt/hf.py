"""graphopt for ``transformers.Trainer`` and the trainers built on it (TRL's ``SFTTrainer``).

One line turns it on::

    from graphopt.hf import GraphoptCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[GraphoptCallback()])

Why a callback and not ``TrainingArguments(torch_compile_backend="graphopt")``: the Trainer hands
that name to accelerate, which accepts only the names of its ``DynamoBackend`` enum
(``ValueError: 'GRAPHOPT' is not a valid DynamoBackend``). Handing the Trainer a
``torch.compile``-d model does not work either: the Trainer reads the forward's signature to pick
dataset columns (an ``OptimizedModule`` has none, so every column is dropped) and saves checkpoints
from its ``state_dict``, whose keys all gain ``_orig_mod.``.

This module imports transformers; ``import graphopt`` does not import it.
"""

from __future__ import annotations

from torch._dynamo.eval_frame import OptimizedModule
from transformers import TrainerCallback

from graphopt.options import split_options


class GraphoptCallback(TrainerCallback):
    """Compile the model a Trainer trains with ``backend="graphopt"``, in place.

    When the Trainer finishes its ``__init__``, the callback calls ``model.compile(backend="graphopt",
    ...)`` on the model it will train (for TRL's ``SFTTrainer``, the model after its PEFT wrapping).
    ``nn.Module.compile`` compiles the module's ``__call__`` and leaves everything else as it was,
    so:

    - checkpoints (``save_model``, ``save_steps``, ``resume_from_checkpoint``) keep the model's own
      state-dict keys, and ``from_pretrained`` loads them;
    - the forward the Trainer calls, and every patch of it (accelerate's autocast wrapper, TRL's
      fused LM head), is what gets compiled: it is looked up on each call;
    - training and evaluation steps both run compiled (in graphs of their own: grad mode and
      ``model.training`` differ). As everywhere with graphopt, outputs at padded positions are
      unspecified on the fast path: let ``compute_metrics`` read the logits only where the labels
      are not -100.

    The callback also lets Dynamo skip transformers' ``logger.warning_once`` calls (for the whole
    process): with activation checkpointing and ``use_cache`` on, one of them would split every
    training step into two graphs and keep the mask (see :func:`_skip_warning_once_in_graphs`).
    And it turns Dynamo's own DDP graph split off (``torch._dynamo.config.optimize_ddp = False``,
    unless set to something else than its default): under DDP, graphopt then sees each training
    step whole, labels included, and splits what it compiles at DDP's gradient buckets itself, so
    communication still overlaps the backward (see :func:`_let_graphopt_split_ddp_graphs`).

    A model kernelized by transformers (``from_pretrained`` does it by default from 5.25 on; on CUDA
    hub kernels then replace RMSNorm and RoPE) gets transformers' own torch code back first
    (:func:`turn_off_hub_kernels`): graphopt proves and fuses those layers itself, and an opaque
    kernel would stop unpadding. The callback logs what it turned off.

    With ``model_init``, the model that ``train()`` builds afresh is not compiled: the callback
    compiles the model the Trainer holds when its ``__init__`` ends.

    ``generate`` also runs through the compiled ``__call__``. graphopt rewrites nothing in those
    graphs (they compute no loss and carry a KV cache), so they are Inductor's code, and decoding
    compiles a few graphs on its first call. To generate eagerly, for example a quick sample after
    training, use ``with torch.compiler.set_stance("force_eager"): model.generate(...)``. To compile
    generation for speed, use transformers' own route: a static cache and
    ``model.generation_config.compile_config`` (see ``transformers.CompileConfig``).

    Args:
        options: graphopt's options and Inductor's, exactly as ``torch.compile(model,
            backend="graphopt", options=...)`` takes them (see :class:`graphopt.GraphoptOptions`).
            Unknown keys raise here, when the callback is built.
        mode: ``torch.compile``'s ``mode`` (passed to Inductor). Not together with ``options``,
            as with ``torch.compile``.
        dynamic: ``torch.compile``'s ``dynamic``. Batches padded to a fixed multiple
            (``pad_to_multiple_of`` in the collator or in TRL's ``SFTConfig``) compile fewer graphs.

    Raises (when the Trainer is built):
        ValueError: ``args.torch_compile`` is set (accelerate would compile the model a second
            time with its own backend), or the model is already a ``torch.compile``-d module.

    What graphopt rewrote, and how often the guarded fast path ran::

        with graphopt.capture() as report:
            trainer.train()
        print(report)
    """

    def __init__(self, options: dict | None = None, *, mode: str | None = None, dynamic: bool | None = None):
        split_options(options)  # unknown keys fail now rather than at the first training step
        self.options = options
        self.mode = mode
        self.dynamic = dynamic

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _check_training_args(args)
        if isinstance(model, OptimizedModule):
            raise ValueError(
                "GraphoptCallback compiles the model itself, in place: pass the Trainer the model "
                "before torch.compile (a compiled module hides the forward's signature from the "
                "Trainer and saves checkpoints under '_orig_mod.' keys)."
            )
        _skip_warning_once_in_graphs()
        _let_graphopt_split_ddp_graphs()
        turn_off_hub_kernels(model)
        install_output_hooks(model)
        model.compile(backend="graphopt", mode=self.mode, options=self.options, dynamic=self.dynamic)
        return control


def install_output_hooks(model) -> bool:
    """Install transformers' output-capturing hooks (>= 5.25) on ``model`` now, before compiling.

    transformers installs them on the first call that records an output (a router's logits with
    ``output_router_logits=True``), under a ``threading.Lock``. Dynamo cannot trace that lock: on a
    first call that is compiled it gives up on the wrapping forward for good, so the model and its
    loss become separate graphs, and mask elision and unpadding cannot see the loss (exact, but no
    faster). Installed beforehand, the check is one attribute read. Returns whether hooks were
    installed; a no-op on transformers without them or on a model whose hooks are in."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return False
    installed = False
    for module in model.modules():  # the models whose forward records outputs, as their first call would
        if _records_outputs(getattr(type(module), "forward", None)) and not getattr(module, "_output_capturing_hooks_installed", False):
            maybe_install_capturing_hooks(module)
            installed = True
    return installed


def _records_outputs(fn) -> bool:
    """``fn`` is, or wraps, transformers' ``capture_outputs`` wrapper (``functools.wraps`` copies
    the names, so the code objects are read)."""
    while fn is not None:
        if "capture_outputs" in getattr(getattr(fn, "__code__", None), "co_qualname", ""):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def turn_off_hub_kernels(model) -> bool:
    """``model.reset_kernels()`` if transformers kernelized ``model`` (``model.use_kernels``), with an
    INFO log line; returns whether it did. Exact: the kernels replace torch code of the same
    function, which is what graphopt then proves and rewrites."""
    import logging

    if not getattr(model, "use_kernels", False) or not hasattr(model, "reset_kernels"):
        return False
    model.reset_kernels()
    logging.getLogger("graphopt").info(
        "GraphoptCallback: turned off the hub kernels transformers installed (model.reset_kernels()); "
        "graphopt proves and fuses RoPE and the norms itself"
    )
    return True


def _skip_warning_once_in_graphs() -> None:
    """Let Dynamo skip transformers' ``logger.warning_once`` instead of breaking the graph there.

    With activation checkpointing and ``use_cache`` on (the default of most configs), every
    training forward calls ``logger.warning_once("`use_cache=True` is incompatible with gradient
    checkpointing ...")``; Dynamo cannot trace it and splits the step in two graphs, the mask in one
    and the loss in the other, and mask elision then cannot check the labels. Skipped in compiled
    code, the warning is not printed there (an eager step prints it).
    """
    import logging

    import torch._dynamo

    warning_once = getattr(logging.Logger, "warning_once", None)  # added to Logger by transformers
    config = torch._dynamo.config
    ignored = getattr(config, "ignore_logger_methods", None)
    if ignored is None:
        ignored = getattr(config, "ignore_logging_functions", None)
    if warning_once is not None and ignored is not None:
        ignored.add(warning_once)


def _let_graphopt_split_ddp_graphs() -> None:
    """Turn Dynamo's DDP graph split off, if it is at its default.

    Dynamo's DDP optimizer splits a step into pieces at gradient-bucket boundaries and hands the
    backend one piece at a time: the labels then reach only the last piece, and for a padded batch
    the pieces that run attention keep the mask. With the split off, graphopt receives the whole
    step, rewrites it, and splits what it compiles with the same ``DDPOptimizer``
    (:func:`graphopt.backend._inductor`). Without DDP the setting has no effect.
    """
    import torch._dynamo

    if torch._dynamo.config.optimize_ddp is True:
        torch._dynamo.config.optimize_ddp = False


def _check_training_args(args) -> None:
    """Raise if ``args`` asks the Trainer to compile the model itself."""
    if args.torch_compile:
        raise ValueError(
            "GraphoptCallback compiles the model with backend='graphopt'; leave torch_compile, "
            "torch_compile_backend and torch_compile_mode unset in the training arguments "
            f"(torch_compile_backend={args.torch_compile_backend!r} would make accelerate compile it "
            "a second time). Pass mode= to GraphoptCallback instead."
        )
