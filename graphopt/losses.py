"""Find the causal-LM loss in a Dynamo graph and prove how it reads the hidden states and labels.

The loss subgraph of every HF causal LM is, in meaning::

    logits = hidden @ W.T                      # lm_head (tied or not), hidden (B, S, H)
    logits = logits * scale                    # optional constant (Cohere's logit_scale, a divisor)
    z      = softcap(upcast(logits))           # both optional, elementwise
    target = labels[:, t + shift] or ignore    # the label shift (shift=1), or pre-shifted labels
    loss   = cross_entropy(z.view(-1, V), target.view(-1), ignore_index, reduction)
    loss   = loss / num_items_in_batch         # with reduction="sum" (gradient accumulation)

:func:`find_losses` locates each ``cross_entropy`` call, walks back to the ``linear`` that produces
its input, and proves the two halves by probing: the logits path must be an elementwise map of the
linear's output laid out row-major over (B, S) (so cross-entropy row ``i`` scores query position
``divmod(i, S)``), and the target path must be a function of one integer input. Its slice is kept
(:attr:`LossInfo.targets`) so a runtime guard can evaluate exactly the targets the loss scores, on
each call's own labels: a wrapper that transforms the labels in the graph (``clamp``, a remap) is
then checked on what it produces, never on the input it came from.
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
_PASS_THROUGH_METHODS = frozenset({"float", "to", "view", "reshape", "contiguous", "__truediv__", "__mul__", "__rmul__", "div", "mul", "tanh"})
_PASS_THROUGH_FUNCTIONS = frozenset({operator.truediv, operator.mul, torch.tanh, torch.reshape, torch.div, torch.mul})
# Label values that a pure shift carries through unchanged and a transform (clamp, remap) would not.
_LABEL_PROBE_VALUES = (-100, -1, 0, 1, 2)


@dataclass
class LossInfo:
    """One causal-LM cross-entropy, as proven.

    Attributes:
        ce: the ``cross_entropy`` node.
        linear: the lm_head ``linear`` node; ``hidden`` (B, S, H) and ``weight`` (V, H) its inputs.
        labels: the labels placeholder; ``shift`` the label shift (1: HF's causal shift, 0: labels
            given already shifted), found on ordinary label values.
        targets: the target path as a function of graph inputs (labels, and symbolic sizes), on
            the graph's own devices: ``targets.module(*inputs)`` is the (B*S,) target of each
            cross-entropy row.
        labels_transformed: the target path changes label values (it is not a pure shift on values
            that include ``ignore_index``), e.g. a wrapper's ``labels.clamp(min=0)``.
        ignore_index, reduction, label_smoothing, class_weight: cross_entropy's arguments.
        logit_scale: the constant the logits are multiplied by before the upcast (1.0 when none).
        scaled: the node holding ``linear * logit_scale`` as (B, S, V) (``linear`` when unscaled).
        softcap: final-logit softcapping value (0.0 when absent).
        loss_out: the node the graph returns as the loss (``ce``, or ``ce / num_items``).
        divisor: the ``num_items_in_batch`` value for reduction="sum" (a node or a number), else None.
        divisor_from_activations: the divisor is computed from parameters or attention (it could
            read padded positions), not given to the model.
    """

    ce: fx.Node
    linear: fx.Node
    hidden: fx.Node
    weight: fx.Node
    labels: fx.Node
    shift: int
    targets: analysis.ExtractedFunction
    labels_transformed: bool
    ignore_index: int
    reduction: str
    label_smoothing: float
    class_weight: fx.Node | None
    logit_scale: float
    scaled: fx.Node
    softcap: float
    loss_out: fx.Node
    divisor: fx.Node | object | None
    divisor_from_activations: bool
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

    # 1. Walk back from cross_entropy's input to the lm_head linear. Each op on the way reads one
    # tensor, the previous one, and constants: it treats every position alike, so the probe below
    # can decide its values on a few positions.
    node, chain = logits, []
    while not (node.op == "call_function" and node.target in LINEAR_TARGETS):
        passes = (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS) or (
            node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS
        )
        if not passes:
            return f"the logits reach cross_entropy through {node.name} ({analysis.describe(node)}), not an elementwise map of lm_head"
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and isinstance(analysis.example_value(a), torch.Tensor)]
        if len(tensors) != 1:
            what = "reads no tensor" if not tensors else "also reads " + ", ".join(a.name for a in tensors[1:])
            return f"the logits reach cross_entropy through {node.name} ({analysis.describe(node)}), which {what}"
        chain.append(node)
        node = tensors[0]
    linear = node
    hidden, weight, bias = _linear_arguments(linear)
    if bias is not None:
        return "lm_head has a bias"
    h_val, w_val = analysis.example_value(hidden), analysis.example_value(weight)
    if h_val is None or w_val is None or h_val.dim() != 3 or w_val.dim() != 2:
        return "lm_head input is not (batch, seq, hidden) @ (vocab, hidden)"
    batch, seq = analysis.hint(h_val.shape[0]), analysis.hint(h_val.shape[1])
    vocab = analysis.hint(w_val.shape[0])

    found = _prove_logits_path(gm, logits, linear, chain, batch, seq, vocab)
    if isinstance(found, str):
        return found
    logit_scale, softcap, scaled = found

    # 2. The target path: a function of one integer input, laid out like the logits rows.
    tdeps = deps[target]
    if len(tdeps) != 1:
        return "the cross_entropy target depends on " + (", ".join(n.name for n in tdeps) or "no input")
    labels = next(iter(tdeps))
    if analysis.example_value(labels).is_floating_point():
        return f"the cross_entropy target comes from the float input {labels.name}"
    target_path = analysis.extract_function(gm, target)
    shift = _probe_shift(target_path, labels, batch, seq, args["ignore_index"])
    if shift is None:
        return "the cross_entropy target is not a shift of the labels input"
    transformed = not _is_pure_shift(target_path, labels, batch, seq, shift, args["ignore_index"])
    targets = analysis.extract_function(gm, target, for_probes=False)

    # 3. What the graph returns as the loss.
    loss_out, divisor = ce, None
    if args["reduction"] == "sum":
        users = list(ce.users)
        if len(users) == 1 and _is_div(users[0]) and users[0].args[0] is ce:
            loss_out, divisor = users[0], users[0].args[1]
    cw = args["weight"]
    return LossInfo(
        ce=ce, linear=linear, hidden=hidden, weight=weight, labels=labels, shift=shift, targets=targets,
        labels_transformed=transformed, ignore_index=int(args["ignore_index"]), reduction=args["reduction"],
        label_smoothing=float(args["label_smoothing"]), class_weight=cw, logit_scale=logit_scale,
        scaled=scaled, softcap=softcap, loss_out=loss_out, divisor=divisor,
        divisor_from_activations=isinstance(divisor, fx.Node) and _reads_activations(divisor), batch=batch, seq=seq,
    )


def _linear_arguments(node: fx.Node) -> tuple:
    """``(input, weight, bias)`` of a ``linear`` call, given by position or by keyword."""
    names = ("input", "weight", "bias")
    given = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
    return given.get("input"), given.get("weight"), given.get("bias")


def _is_div(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.truediv, torch.div)) or (
        node.op == "call_method" and node.target in ("div", "__truediv__")
    )


def _reads_activations(node: fx.Node) -> bool:
    """Whether ``node``'s value is computed from parameters or attention (model activations), as
    opposed to inputs given to the model (``num_items_in_batch``, an int or float tensor, on any
    device). Rewrites change activations at padded positions, so a divisor must not read them."""
    for n in analysis.backward_slice(node):
        val = analysis.example_value(n)
        if n.op == "placeholder" and isinstance(val, torch.Tensor) and val.requires_grad:
            return True
        if analysis.is_sdpa(n) or (n.op == "call_function" and n.target in LINEAR_TARGETS):
            return True
    return False


def _scalar_operand(node: fx.Node) -> float | None:
    """The constant of ``x * c``, ``c * x`` or ``x / c`` (as the factor: c or 1/c), else None."""
    operands = [*node.args, *(node.kwargs[k] for k in ("input", "other") if k in node.kwargs)]
    if len(operands) != 2 or set(node.kwargs) - {"input", "other"}:
        return None
    a, b = operands
    if not isinstance(b, (int, float)) and isinstance(a, (int, float)) and not _is_div(node):
        a, b = b, a
    if not isinstance(b, (int, float)) or isinstance(b, bool) or b == 0:
        return None
    return 1.0 / b if _is_div(node) else float(b)


def _prove_logits_path(gm, logits, linear, chain, batch, seq, vocab) -> tuple[float, float, fx.Node] | str:
    """``(logit_scale, softcap, scaled)``: the path linear → cross_entropy input maps z (B, S, V) to
    ``softcap(upcast(z * logit_scale)).view(B*S, V)`` (softcap optional), and ``scaled`` holds
    ``z * logit_scale``. Candidates come from the path's constants; a probe decides."""
    path = list(reversed(chain))  # from the linear's first user to cross_entropy's input
    has_tanh = any(n.target in ("tanh", torch.tanh) for n in path)
    constants = [(n, _scalar_operand(n)) for n in path if _is_div(n) or n.target in (operator.mul, torch.mul, "mul", "__mul__", "__rmul__")]
    constants = [(n, c) for n, c in constants if c is not None]
    candidates = [(1.0, 0.0, linear)]
    for i, (node, factor) in enumerate(constants):
        if not has_tanh or i < len(constants) - 2:  # scaling before a softcap's c * tanh(z / c)
            candidates.append((factor, 0.0, node))
    if has_tanh:
        caps = [1.0 / c for _, c in constants if c > 0] + [c for _, c in constants if c > 0]
        candidates = [(scale, cap, node) for scale, _, node in candidates for cap in caps] + candidates
    fn = analysis.extract_function(gm, logits, stop_at=[linear])
    if any(inp is not linear for inp in fn.inputs if isinstance(analysis.example_value(inp), torch.Tensor)):
        return "the logits path reads other tensors besides lm_head's output"
    # A few positions suffice to see the layout; the full (B, S, V) could be gigabytes.
    batch, seq = min(batch, 2), min(seq, 3)
    z = torch.randn((batch, seq, vocab), generator=torch.Generator().manual_seed(1)) * 8
    try:
        out = analysis.run_function(fn, {linear: z})
    except Exception as e:
        return f"probing the logits path failed: {type(e).__name__}: {e}"
    if out.dtype != torch.float32 or out.shape != (batch * seq, vocab):
        return f"cross_entropy input is {tuple(out.shape)} {out.dtype}, expected fp32 rows of (batch*seq, vocab)"
    for scale, cap, node in candidates:
        expected = z * scale
        if cap:
            expected = cap * torch.tanh(expected / cap)
        if torch.allclose(out, expected.reshape(batch * seq, vocab), rtol=1e-6, atol=1e-6):
            if node is linear or _holds(gm, node, linear, z, z * scale):
                return scale, cap, node
    return "the logits path is not an upcast of lm_head's output (with an optional constant scale and softcapping)"


def _holds(gm, node: fx.Node, linear: fx.Node, z: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``node``, as a function of the linear's output, maps ``z`` to ``expected``."""
    try:
        out = analysis.run_function(analysis.extract_function(gm, node, stop_at=[linear]), {linear: z})
    except Exception:
        return False
    return out.shape == expected.shape and torch.allclose(out.float(), expected, rtol=1e-6, atol=1e-6)


def _probe_shift(fn: analysis.ExtractedFunction, labels, batch, seq, ignore_index) -> int | None:
    """The shift that the target path ``fn`` applies to distinct ordinary label values, or None."""
    probe = torch.arange(batch * seq, dtype=torch.int64).reshape(batch, seq) + 7
    out = _run_targets(fn, labels, probe)
    for shift in (1, 0):
        expected = shift_targets(probe, shift, ignore_index).reshape(-1)
        if out is not None and out.shape == expected.shape and torch.equal(out, expected):
            return shift
    return None


def _is_pure_shift(fn: analysis.ExtractedFunction, labels, batch, seq, shift, ignore_index) -> bool:
    """Whether the target path also carries ``ignore_index``, negatives, 0 and 1 through unchanged."""
    values = torch.tensor((ignore_index, *_LABEL_PROBE_VALUES))
    probe = values[torch.arange(batch * seq) % len(values)].reshape(batch, seq)
    out = _run_targets(fn, labels, probe)
    return out is not None and torch.equal(out, shift_targets(probe, shift, ignore_index).reshape(-1))


def _run_targets(fn: analysis.ExtractedFunction, labels, probe: torch.Tensor) -> torch.Tensor | None:
    try:
        return analysis.run_function(fn, {labels: probe.to(analysis.example_value(labels).dtype)})
    except Exception:
        return None


def per_position_output(value, batch: int, seq: int) -> bool:
    """True when ``value`` is laid out per token: (B, S, ...) or (B, heads, S, ...)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    shape = [analysis.hint(s) for s in value.shape]
    return shape[0] == batch and seq in shape[1:3]

