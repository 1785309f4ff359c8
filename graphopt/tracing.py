"""How Dynamo traces what graphopt compiles: one narrow allowance, and why a step was split.

**The allowance.** transformers 5.25 wraps the forward of most attention classes (Llama, Qwen3,
Mistral, Gemma2 and about 110 more) in kernels' ``use_kernelized_func`` wrapper. Every call sets
kernels' ``_ACTIVE_KERNEL_FUNCS`` (a ``CompileableContextVar``) and resets it in a ``finally``;
under compile, ``set`` and ``reset`` write two attributes of that module-level object. Inside the
higher-order op of ``torch.utils.checkpoint`` Dynamo refuses any write to an object from outside
the checkpointed body ("HOP: Unsafe side effect"), and every checkpointed layer falls out of the
graph: a 2-layer step becomes 5 graphs, none holding attention, and graphopt rewrites nothing.

:func:`install` lets Dynamo record exactly those writes, and only while it traces a frame for
``backend="graphopt"`` inside a checkpointed body. Why that cannot change a number:

- ``set`` is followed by ``reset`` in a ``finally``: after each layer call the object holds what
  it held before (``tests/test_tracing.py`` checks it after compiled steps);
- what the body reads from the object (which forward of the RoPE function to call) is decided
  while tracing; the tensors the body computes are the traced body graph, and the backward's
  recomputation runs that same graph. Eager checkpointing would replay the ``set``/``reset`` pair
  during recomputation, whose net effect is again nothing.

The same allowance covers transformers' output-capturing hooks (``output_router_logits=True``, the
router logits of an MoE model's auxiliary loss; hidden states, attentions): inside a checkpointed
layer they append the layer's output to a list of the model-level collector. The collector is
active only during the model's forward, so eager checkpointing's recomputation in the backward
appends nothing: not replaying the append is what eager does. A tensor written to an outer list
must leave the body, so graphopt's checkpointed bodies are traced as under
``skip_fwd_side_effects_in_bwd_under_checkpoint`` (the body's intermediates become its outputs),
while every other write to outer state is still refused as by default.

Dynamo applies the recorded writes once, after the graph, as it does for writes outside a
higher-order op. Other compiles (``backend="inductor"``, a user's own backend) trace exactly as
before: the allowance checks the backend of the frame being traced.
``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``, which would allow every side
effect in every compile, is left alone.

**Splits.** When Dynamo still breaks a step into several graphs, :func:`new_graph_breaks` returns
the reasons it recorded since graphopt last looked, and :func:`advice` what fixes the known ones;
the backend notes them in the graph's report and warns once per cause.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import logging
import os
import threading

import torch

log = logging.getLogger("graphopt")

# How many checkpointed bodies graphopt is tracing with their side effects turned on (per thread).
_checkpoints = threading.local()
# Why install() could not hook Dynamo (None: installed, or not tried yet).
install_failure: str | None = None
_breaks_seen: collections.Counter = collections.Counter()
_warned_causes: set[str] = set()


def install() -> None:
    """Let Dynamo record kernels' context-variable writes and transformers' output captures inside
    checkpointed bodies of graphopt's compiles (see the module docstring). Idempotent; on a torch whose Dynamo lacks the hook point,
    records why in :data:`install_failure` and changes nothing."""
    global install_failure
    try:
        from torch._dynamo.side_effects import SideEffects

        original = SideEffects.check_allowed_side_effect
    except (ImportError, AttributeError) as e:
        install_failure = f"torch {torch.__version__}: Dynamo's SideEffects.check_allowed_side_effect is missing ({e})"
        return
    if getattr(original, "_graphopt_allowance", False):
        return

    @functools.wraps(original)
    def check_allowed_side_effect(self, item):
        if not _tracing_checkpoint_for_graphopt(self):
            return original(self, item)
        if _is_kernels_context_var(item) or _is_output_capture(self, item):
            record = getattr(self, "_maybe_record_side_effect", None)  # newer torch: note the body has a side effect
            if record is not None:
                record(item)
            return True
        if not getattr(_checkpoints, "depth", 0):  # the user's own flag, or no body of graphopt's
            return original(self, item)
        tracer = self.output_graph_weakref().current_tx.output.current_tracer
        # graphopt turned the body's side effects on for the two writes above only: any other write
        # is refused exactly as Dynamo refuses it by default
        allowed, tracer.allow_side_effects_in_hop = tracer.allow_side_effects_in_hop, False
        try:
            return original(self, item)
        finally:
            tracer.allow_side_effects_in_hop = allowed

    check_allowed_side_effect._graphopt_allowance = True
    SideEffects.check_allowed_side_effect = check_allowed_side_effect
    _install_checkpoint_outputs()


def _install_checkpoint_outputs() -> None:
    """In graphopt's compiles, trace checkpointed bodies as Dynamo does under
    ``skip_fwd_side_effects_in_bwd_under_checkpoint``: a tensor a body writes to an outer object
    (transformers' output collector) becomes an output of the body, so the graph can read it. The
    writes allowed stay the two of :func:`install` (any other is refused as by default); the user's
    own setting of that flag is left to Dynamo."""
    global install_failure
    try:
        from torch._dynamo.variables.higher_order_ops import CheckpointHigherOrderVariable, dynamo_allow_side_effects_in_hop

        original = CheckpointHigherOrderVariable._call_function
    except (ImportError, AttributeError) as e:
        install_failure = f"torch {torch.__version__}: Dynamo's checkpoint variable is not the one graphopt knows ({e})"
        return
    if getattr(original, "_graphopt_allowance", False):
        return
    del dynamo_allow_side_effects_in_hop  # only checked to exist: the flag below is what enters it

    @functools.wraps(original)
    def _call_function(self, tx, args, kwargs):
        if self.allow_side_effects or not is_graphopt(getattr(tx.output, "compiler_fn", None)):
            return original(self, tx, args, kwargs)
        self.allow_side_effects = True
        _checkpoints.depth = getattr(_checkpoints, "depth", 0) + 1
        try:
            return original(self, tx, args, kwargs)
        finally:
            self.allow_side_effects = False
            _checkpoints.depth -= 1

    _call_function._graphopt_allowance = True
    CheckpointHigherOrderVariable._call_function = _call_function


def _is_kernels_context_var(item) -> bool:
    """Whether Dynamo's ``item`` stands for an instance of kernels' ``CompileableContextVar``."""
    from torch._dynamo.variables.user_defined import UserDefinedObjectVariable

    if not isinstance(item, UserDefinedObjectVariable):  # other trackers compute .value on access
        return False
    cls = type(item.value)
    return cls.__name__ == "CompileableContextVar" and cls.__module__.split(".")[0] == "kernels"


# transformers' output-capturing hooks (``utils/output_capturing.py``): the functions that append a
# layer's output (router logits, hidden states, attentions) to the model-level collector's lists.
_OUTPUT_CAPTURE_FUNCTIONS = frozenset({"output_capturing_hook", "append_hidden_state"})


def _is_output_capture(side_effects, item) -> bool:
    """Whether Dynamo's ``item`` is a list that transformers' output-capturing hook appends to (the
    frame being traced is that hook, in transformers' ``output_capturing`` module)."""
    from torch._dynamo.variables.lists import ListVariable

    output_graph = side_effects.output_graph_weakref()
    if output_graph is None or type(item) is not ListVariable:
        return False
    code = getattr(output_graph.current_tx, "f_code", None)
    if code is None or code.co_name not in _OUTPUT_CAPTURE_FUNCTIONS:
        return False
    return os.path.normpath(code.co_filename).endswith(os.path.join("transformers", "utils", "output_capturing.py"))


def _tracing_checkpoint_for_graphopt(side_effects) -> bool:
    output_graph = side_effects.output_graph_weakref()
    if output_graph is None:
        return False
    tracer = output_graph.current_tx.output.current_tracer
    in_checkpoint = getattr(tracer, "under_activation_checkpoint", False) or "checkpoint" in str(
        getattr(tracer, "description", "")
    )
    return in_checkpoint and is_graphopt(getattr(output_graph, "compiler_fn", None))


def is_graphopt(compiler_fn) -> bool:
    """Whether the backend Dynamo compiles with is graphopt's, through the wrappers torch puts
    around it (``torch.compile``'s, the debug wrapper, the DDP optimizer)."""
    from graphopt.backend import graphopt_backend

    queue, seen = [compiler_fn], set()
    while queue:
        fn = queue.pop()
        if fn is None or id(fn) in seen or len(seen) > 16:
            continue
        if fn is graphopt_backend:
            return True
        seen.add(id(fn))
        for attr in ("_torchdynamo_orig_backend", "compiler_fn", "backend_compile_fn", "__wrapped__", "func", "__self__"):
            queue.append(getattr(fn, attr, None))
    return False


# ---------------------------------------------------------------------------------------------------
# Why a step was split


def new_graph_breaks() -> list[str]:
    """The graph-break reasons Dynamo recorded since the last call (first line of each)."""
    from torch._dynamo.utils import counters

    now = collections.Counter(counters["graph_break"])
    fresh = now - _breaks_seen
    _breaks_seen.update(fresh)
    return [reason.splitlines()[0].strip() for reason in fresh]


_ADVICE = {
    "HOP: Unsafe side effect": (
        "a checkpointed layer writes Python state outside its body, so Dynamo runs every checkpointed "
        "layer eagerly and graphopt rewrites none of them ({versions}; {allowance}). Fix: turn "
        "activation checkpointing off, or set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = "
        "True if that state need not be written again during recomputation (process-wide)"
    ),
    "Unsupported context manager": (
        "if this is transformers' output-capturing lock (the first call of a model that records outputs, "
        "e.g. with output_router_logits=True, installs hooks under a threading.Lock), Dynamo runs that "
        "forward eagerly for good and the loss lands in another graph; fix: call "
        "graphopt.hf.install_output_hooks(model) before the first compiled call (GraphoptCallback does)"
    ),
    "Logger": (
        "a logging call (transformers' warning_once with use_cache=True under checkpointing) splits the "
        "step; fix: pass use_cache=False, or use graphopt.hf.GraphoptCallback, or add "
        "logging.Logger.warning_once to torch._dynamo.config.ignore_logger_methods"
    ),
}


def advice(reason: str) -> str | None:
    """What fixes a known graph-break cause, or None."""
    for key, text in _ADVICE.items():
        if key in reason:
            allowance = (
                f"graphopt's allowance for kernels' wrapper is not installed: {install_failure}"
                if install_failure is not None
                else "graphopt allows only the writes of kernels' use_kernelized_func wrapper and of "
                "transformers' output-capturing hooks, and this is another"
            )
            return text.format(versions=versions_line(), allowance=allowance)
    return None


def warn_once(reason: str) -> None:
    """Warn once per known cause that Dynamo split a graphopt compile."""
    for key in _ADVICE:
        if key in reason and key not in _warned_causes:
            _warned_causes.add(key)
            log.warning("graphopt: Dynamo split the compiled step (%s): %s", reason, advice(reason))


def versions_line() -> str:
    """``torch X, transformers Y, kernels Z`` as installed (``-`` where absent)."""
    parts = [f"torch {torch.__version__}"]
    for name in ("transformers", "kernels"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} -")
    return ", ".join(parts)


OLDEST_TRANSFORMERS = (5, 19)  # pyproject's lower bound, tested by CI's oldest-versions job
_version_checked = False


def unsupported_versions() -> str | None:
    """Why the transformers in this process is one graphopt does not support, or None. Read from the
    module already imported (graphopt never imports transformers for this)."""
    import sys

    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None)
    if version is None:
        return None
    try:
        release = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if release >= OLDEST_TRANSFORMERS:
        return None
    oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
    return (
        f"transformers {version} is older than graphopt supports ({oldest}): its RoPE tables are built "
        f"with a matmul, so padded batches are not unpadded. Fix: pip install -U 'transformers>={oldest}'"
    )


def warn_unsupported_versions_once() -> str | None:
    """:func:`unsupported_versions`, warned once per process; returns it for the report."""
    global _version_checked
    problem = unsupported_versions()
    if problem is not None and not _version_checked:
        log.warning("graphopt: %s", problem)
    _version_checked = True
    return problem
