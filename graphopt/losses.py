"""Find the causal-LM loss in a Dynamo graph and prove how it reads the hidden states and labels.

The loss subgraph of every HF causal LM is, in meaning::

    logits = hidden @ W.T                      # lm_head (tied or not), hidden (B, S, H)
    z      = softcap(upcast(logits))           # both optional, elementwise
    target = labels[:, t + shift] or ignore    # the label shift (shift=1), or pre-shifted labels
    loss   = cross_entropy(z.view(-1, V), target.view(-1), ignore_index, reduction)
    loss   = loss / num_items_in_batch         # with reduction="sum" (gradient accumulation)

:func:`find_losses` locates each ``cross_entropy`` call, walks back to the ``linear`` that produces
its input, and proves the two halves by probing: the logits path must be an elementwise map of the
linear's output laid out row-major over (B, S), and the target path must equal the shift of the
labels input by ``shift`` positions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import analysis
from graphopt.guards import shift_targets

CE_TARGETS = (torch.nn.functional.cross_entropy,)
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
CE_ARG_NAMES = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
# Ops allowed between the lm_head linear and cross_entropy's input; they must also pass the probe.
_PASS_THROUGH_METHODS = frozenset({"float", "to", "view", "reshape", "contiguous", "__truediv__", "__mul__", "div", "mul", "tanh"})
_PASS_THROUGH_FUNCTIONS = frozenset({operator.truediv, operator.mul, torch.tanh, torch.reshape, torch.div, torch.mul})


@dataclass
class LossInfo:
    """One causal-LM cross-entropy, as proven.

    Attributes:
        ce: the ``cross_entropy`` node.
        linear: the lm_head ``linear`` node; ``hidden`` (B, S, H) and ``weight`` (V, H) its inputs.
        labels: the labels placeholder; ``shift`` the label shift (1: HF's causal shift, 0: labels
            given already shifted).
        ignore_index, reduction, label_smoothing, class_weight: cross_entropy's arguments.
        softcap: final-logit softcapping value (0.0 when absent).
        loss_out: the node the graph returns as the loss (``ce``, or ``ce / num_items``).
        divisor: the ``num_items_in_batch`` node for reduction="sum", else None.
    """

    ce: fx.Node
    linear: fx.Node
    hidden: fx.Node
    weight: fx.Node
    labels: fx.Node
    shift: int
    ignore_index: int
    reduction: str
    label_smoothing: float
    class_weight: fx.Node | None
    softcap: float
    loss_out: fx.Node
    divisor: fx.Node | object | None
    batch: int
    seq: int


def ce_arguments(node: fx.Node) -> dict:
    args = dict(zip(CE_ARG_NAMES, node.args))
    args.update(node.kwargs)
    for key, value in {"weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0}.items():
        args.setdefault(key, value)
    return args


def find_losses(gm: fx.GraphModule) -> tuple[list[LossInfo], list[str]]:
    """The proven causal-LM losses in ``gm``, and a reason for each cross_entropy that is not one."""
    found, reasons = [], []
    deps = analysis.tensor_inputs(gm.graph)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CE_TARGETS:
            info = _prove(gm, node, deps)
            if isinstance(info, str):
                reasons.append(info)
            else:
                found.append(info)
    return found, reasons


def _prove(gm: fx.GraphModule, ce: fx.Node, deps) -> LossInfo | str:
    args = ce_arguments(ce)
    if args.get("size_average") is not None or args.get("reduce") is not None:
        return "cross_entropy uses the deprecated size_average/reduce arguments"
    if args["reduction"] not in ("mean", "sum"):
        return f"cross_entropy reduction={args['reduction']!r} (per-token losses) is not a scalar loss"
    logits, target = args["input"], args["target"]
    if not isinstance(logits, fx.Node) or not isinstance(target, fx.Node):
        return "cross_entropy inputs are not graph values"

    # 1. Walk back from cross_entropy's input to the lm_head linear.
    node, chain = logits, []
    while not (node.op == "call_function" and node.target in LINEAR_TARGETS):
        passes = (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS) or (
            node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS
        )
        if not passes:
            return f"the logits reach cross_entropy through {node.format_node()}, not an elementwise map of lm_head"
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return "the logits path does not start at a linear layer"
    linear = node
    hidden, weight = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if bias is not None:
        return "lm_head has a bias"
    h_val, w_val = analysis.example_value(hidden), analysis.example_value(weight)
    if h_val is None or w_val is None or h_val.dim() != 3 or w_val.dim() != 2:
        return "lm_head input is not (batch, seq, hidden) @ (vocab, hidden)"
    batch, seq = analysis.hint(h_val.shape[0]), analysis.hint(h_val.shape[1])
    vocab = analysis.hint(w_val.shape[0])

    softcap = _softcap_constant(chain)
    ok = _probe_logits_path(gm, logits, linear, batch, seq, vocab, softcap)
    if ok is not True:
        return ok

    # 2. The target path: a function of one integer input, equal to a label shift.
    tdeps = deps[target]
    if len(tdeps) != 1:
        return "the cross_entropy target depends on " + (", ".join(n.name for n in tdeps) or "no input")
    labels = next(iter(tdeps))
    shift = _probe_shift(gm, target, labels, batch, seq, args["ignore_index"])
    if shift is None:
        return "the cross_entropy target is not a shift of the labels input"

    # 3. What the graph returns as the loss.
    loss_out, divisor = ce, None
    if args["reduction"] == "sum":
        users = list(ce.users)
        if len(users) == 1 and _is_div(users[0]) and users[0].args[0] is ce:
            loss_out, divisor = users[0], users[0].args[1]
        if isinstance(divisor, fx.Node) and any(
            analysis.example_value(d).is_floating_point() for d in deps[divisor]
        ):
            return "the loss divisor depends on float inputs"
    cw = args["weight"]
    return LossInfo(
        ce=ce, linear=linear, hidden=hidden, weight=weight, labels=labels, shift=shift,
        ignore_index=int(args["ignore_index"]), reduction=args["reduction"],
        label_smoothing=float(args["label_smoothing"]), class_weight=cw, softcap=softcap,
        loss_out=loss_out, divisor=divisor, batch=batch, seq=seq,
    )


def _is_div(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.truediv, torch.div)) or (
        node.op == "call_method" and node.target in ("div", "__truediv__")
    )


def _softcap_constant(chain: list[fx.Node]) -> float:
    """The scalar a tanh in the chain is wrapped with (``c * tanh(z / c)``), or 0.0."""
    for node in chain:
        if _is_div(node) and isinstance(node.args[1], (int, float)):
            return float(node.args[1])
    return 0.0


def _probe_logits_path(gm, logits, linear, batch, seq, vocab, softcap) -> bool | str:
    """The path linear → cross_entropy input must map z (B, S, V) to ``f(z).view(B*S, V)`` where
    f is the upcast, with softcapping when ``softcap`` is set."""
    fn = analysis.extract_function(gm, logits, stop_at=[linear])
    if any(inp is not linear for inp in fn.inputs if isinstance(analysis.example_value(inp), torch.Tensor)):
        return "the logits path reads other tensors besides lm_head's output"
    # A few positions suffice to see the layout; the full (B, S, V) could be gigabytes.
    batch, seq = min(batch, 2), min(seq, 3)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((batch, seq, vocab), generator=gen) * 8
    try:
        out = analysis.run_function(fn, {linear: z})
    except Exception as e:
        return f"probing the logits path failed: {type(e).__name__}: {e}"
    expected = z if softcap == 0.0 else softcap * torch.tanh(z / softcap)
    if out.dtype != torch.float32 or out.shape != (batch * seq, vocab):
        return f"cross_entropy input is {tuple(out.shape)} {out.dtype}, expected fp32 rows of (batch*seq, vocab)"
    if not torch.allclose(out, expected.reshape(batch * seq, vocab), rtol=1e-6, atol=1e-6):
        return "the logits path is not an upcast (with optional softcapping) of lm_head's output"
    return True


def _probe_shift(gm, target, labels, batch, seq, ignore_index) -> int | None:
    fn = analysis.extract_function(gm, target)
    probe = torch.arange(batch * seq, dtype=torch.int64).reshape(batch, seq) + 7
    try:
        out = analysis.run_function(fn, {labels: probe})
    except Exception:
        return None

    for shift in (1, 0):
        expected = shift_targets(probe, shift, ignore_index).reshape(-1)
        if out.shape == expected.shape and torch.equal(out, expected):
            return shift
    return None


def per_position_output(value, batch: int, seq: int) -> bool:
    """True when ``value`` is laid out per token: (B, S, ...) or (B, heads, S, ...)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    shape = [analysis.hint(s) for s in value.shape]
    return shape[0] == batch and seq in shape[1:3]

