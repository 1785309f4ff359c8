"""Fused LM head + cross-entropy: no full (tokens × vocabulary) logits in fp32, nor their gradient.

Motivated by every HF causal LM's loss (``ForCausalLMLoss``): ``lm_head`` produces (B, S, V)
logits, the loss upcasts them to fp32 and cross-entropy saves a softmax-sized buffer for the
backward, so the largest activations of a 128k-vocabulary step all have V columns. For each loss
:mod:`graphopt.losses` proved::

    ce(softcap((linear(h, W) * scale).float()).view(-1, V), target, ignore_index, reduction)
        -> loss_sum / count(target != ignore_index)        reduction="mean"
        -> loss_sum  (then the graph's / num_items_in_batch) reduction="sum"
    where loss_sum, logits = graphopt::linear_cross_entropy(h.view(-1, H), W, target, ...)

The constant ``scale`` (Cohere's ``logit_scale``, or a divisor) is folded into the op, which then
returns the scaled logits. Under ``torch.autocast`` the op runs in the dtype autocast gives the
linear (hidden and weight are cast to it, as autocast casts them), so the logits it returns have
eager's dtype and the loss is computed in fp32 from them, as HF does. A frozen lm_head (PEFT) gets no
weight gradient: the op then keeps no fp32 (V, H) accumulator and skips that matmul.

The count stays on the device. The logits output keeps its value: the op writes it chunk by chunk
from the matmul the loss uses, unless ``drop_logits=True``, which returns an empty tensor in its
place. Label smoothing and class weights are declined, never approximated.

The returned logits keep their gradient too, in one of two ways:

- ``detached`` (training graphs that return lm_head's output as is, the usual HF case): the op
  returns the logits without a gradient, and the graph also returns the flat hidden states it read.
  The backend then attaches ``d logits / d (hidden, weight)`` outside the compiled graph
  (:func:`graphopt.ops.linear_cross_entropy.attach_logits_grad`), where it runs only if something
  differentiates the logits. Inside the graph AOTAutograd would instead hand every backward a zero
  (N, V) gradient for them, a pass over the largest tensor of the step for nothing.
- ``differentiable`` (anything else: softcapped logits returned, logits read by other graph code,
  an lm_head weight that is no graph input): the op's logits stay differentiable in the graph.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt import analysis
from graphopt.losses import LossInfo
from graphopt.passes import InvalidProgramError, PassContext
from graphopt.runtime import Adapter


class AttachLogits(Adapter):
    """The calling convention of a graph whose fused loss returns the logits detached: the graph
    also returns the (N, H) hidden states the loss read, as its last output. At each call the
    logits get ``d logits / d (hidden, weight)`` as an autograd node of their own
    (:func:`~graphopt.ops.linear_cross_entropy.attach_logits_grad`), and the extra output goes.

    Attributes:
        positions: where the logits stand in the graph's outputs.
        hidden_position: the output the pass appended, holding the hidden states.
        weight_input: the graph input (placeholder index) holding the lm_head weight.
        logit_scale: the constant the logits were multiplied by after the matmul (1.0: none).
    """

    def __init__(self, positions: list[int], hidden_position: int, weight_input: int, logit_scale: float = 1.0):
        from graphopt.ops.linear_cross_entropy import attach_logits_grad  # the op module imports triton

        self.positions = positions
        self.hidden_position = hidden_position
        self.weight_input = weight_input
        self.logit_scale = logit_scale
        self._attach = attach_logits_grad

    def outputs(self, args, outputs: list) -> list:
        scale = {} if self.logit_scale == 1.0 else {"logit_scale": self.logit_scale}
        logits = self._attach(outputs[self.positions[0]], outputs[self.hidden_position], args[self.weight_input], **scale)
        for position in self.positions:
            outputs[position] = logits
        del outputs[self.hidden_position]
        return outputs


class FusedCrossEntropy:
    name = "fused_cross_entropy"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        losses, reasons = ctx.losses(gm)
        for reason in reasons:
            ctx.report.decline(self.name, reason)
        for loss in losses:
            why = self._unsupported(loss)
            if why:
                ctx.report.decline(self.name, why)
                continue
            self._rewrite(gm, ctx, loss)

    @staticmethod
    def _unsupported(loss: LossInfo) -> str:
        if loss.label_smoothing != 0.0:
            return f"label_smoothing={loss.label_smoothing} is not supported by the fused loss"
        if loss.class_weight is not None:
            return "class weights are not supported by the fused loss"
        h, w = analysis.example_value(loss.hidden), analysis.example_value(loss.weight)
        out = analysis.example_value(loss.linear)
        if h.dtype != w.dtype and out.dtype in (h.dtype, w.dtype):
            return f"lm_head runs in {h.dtype} x {w.dtype}; the fused loss needs one float dtype"
        if out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"lm_head runs in {out.dtype}; the fused loss needs fp32, bf16 or fp16"
        target = analysis.example_value(_target(loss))
        if target.dtype not in (torch.int64, torch.uint8):
            raise InvalidProgramError(
                f"cross_entropy's target ({loss.labels.name}) is {target.dtype}: eager raises "
                f"'expected target dtype to be Long or Byte'. Pass int64 labels (labels.long())."
            )
        if target.dtype != torch.int64:
            return f"the cross_entropy target is {target.dtype}; the fused loss takes int64 class indices"
        if loss.scaled is not loss.linear and any(u is not loss.scaled for u in loss.linear.users):
            return "the unscaled lm_head output is used besides the scaled logits"
        return ""

    def _rewrite(self, gm: fx.GraphModule, ctx: PassContext, loss: LossInfo) -> None:
        import graphopt.ops.linear_cross_entropy  # noqa: F401 - registers the op

        graph = gm.graph
        h_val, w_val = analysis.example_value(loss.hidden), analysis.example_value(loss.weight)
        dtype = analysis.example_value(loss.linear).dtype  # autocast's, when it is on
        vocab, hidden_size = (analysis.hint(s) for s in w_val.shape)
        n_tokens = loss.batch * loss.seq
        # 0: the op picks the chunk per call from the device and the shapes (auto_chunk_size: the
        # CPU's 64 MB rule, a GPU's GEMM-sized rule), so a dynamic graph serving larger batches
        # later, or a graph compiled on one device and run on another, gets the right one.
        chunk = ctx.options.cross_entropy_chunk_size
        compute_grad = bool(h_val.requires_grad or w_val.requires_grad)
        extra = {}
        if loss.logit_scale != 1.0:
            extra["logit_scale"] = loss.logit_scale
        if compute_grad and not w_val.requires_grad:
            extra["compute_grad_weight"] = False
        target = _target(loss)

        # The loss path, and where its values escape to other users (the returned logits,
        # possibly scaled or softcapped, usually). Values before the scale are not escapes: the
        # check in _unsupported saw that the scale is lm_head's only user.
        chain = set(analysis.backward_slice(loss.ce.args[0], stop_at=[loss.scaled]))
        escapes = {n: [u for u in n.users if u not in chain and u is not loss.ce] for n in chain}
        escapes = {n: users for n, users in escapes.items() if users}
        keep_logits = bool(escapes) and not ctx.options.drop_logits
        output = graph.find_nodes(op="output")[0]
        detach = keep_logits and compute_grad and _returned_as_is(loss, escapes, output)
        logits_mode = "detached" if detach else "differentiable" if keep_logits else "none"
        logits_bytes = n_tokens * vocab * h_val.element_size()

        new: list[fx.Node] = []

        def call(kind: str, target_, *args, **kwargs) -> fx.Node:
            node = getattr(graph, kind)(target_, args, kwargs)
            new.append(node)
            return node

        # The op goes before the first reader of the logits. The target path depends only on the
        # labels input, so its nodes can move up there too.
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(loss.linear.users, key=order.__getitem__)
        for node in analysis.backward_slice(target):
            if node.op != "placeholder" and order[node] > order[anchor]:
                anchor.prepend(node)
        with graph.inserting_before(anchor):
            flat = call("call_method", "reshape", loss.hidden, -1, hidden_size)
            weight = loss.weight
            if dtype != h_val.dtype:  # autocast: the casts it would make for the linear
                flat = call("call_method", "to", flat, dtype)
            if dtype != w_val.dtype:
                weight = call("call_method", "to", weight, dtype)
            fused = call(
                "call_function", torch.ops.graphopt.linear_cross_entropy.default,
                flat, weight, target, loss.ignore_index, loss.softcap, chunk, logits_mode, compute_grad, "auto",
                **extra,
            )
            loss_sum = call("call_function", operator.getitem, fused, 0)
            if loss.reduction == "mean":
                valid = call("call_method", "ne", target, loss.ignore_index)
                count = call("call_method", "sum", valid)
                value = call("call_function", torch.div, loss_sum, count)
            else:
                value = loss_sum
            if keep_logits:
                logits = call("call_function", operator.getitem, fused, 1)
                batch = call("call_method", "size", loss.hidden, 0)
                seq = call("call_method", "size", loss.hidden, 1)
                replacement = call("call_method", "unflatten", logits, 0, (batch, seq))
            elif escapes:
                empty = call("call_method", "new_empty", loss.hidden, (0,))
        for node in new:
            analysis.annotate(node)
        loss.ce.replace_all_uses_with(value)
        graph.erase_node(loss.ce)
        if keep_logits:  # the op's (scaled) logits feed whatever they fed (upcast, softcap, output)
            loss.scaled.replace_all_uses_with(replacement)
        else:
            for node, users in escapes.items():
                for user in users:
                    user.replace_input_with(node, empty)
        analysis.erase_dead(graph, chain | {loss.scaled, loss.linear})
        if detach:
            outputs = list(output.args[0])
            ctx.adapt(
                AttachLogits(
                    positions=[i for i, node in enumerate(outputs) if node is replacement],
                    hidden_position=len(outputs),
                    weight_input=ctx.placeholder_index(gm, loss.weight),
                    logit_scale=loss.logit_scale,
                )
            )
            output.args = (tuple(outputs) + (flat,),)
        ctx.report.rewrite(
            self.name,
            f"{loss.reduction}{'_scaled' if loss.logit_scale != 1.0 else ''}{'_softcap' if loss.softcap else ''}",
            f"{loss.ce.name}: lm_head + cross_entropy over {n_tokens} tokens x {vocab} vocab, "
            + (f"chunks of {chunk}" if chunk else "chunks sized per device by the op"),
        )
        if keep_logits:
            ctx.report.note(
                f"the graph returns the logits ({_megabytes(logits_bytes)}, their gradient "
                f"{'attached outside the graph' if detach else 'in the graph'}); "
                f"options={{'drop_logits': True}} would not materialize them in training steps"
            )
        elif escapes:
            ctx.report.note(f"drop_logits=True: logits are returned as an empty tensor (saves {_megabytes(logits_bytes)})")


def _target(loss: LossInfo) -> fx.Node:
    return loss.ce.args[1] if len(loss.ce.args) > 1 else loss.ce.kwargs["target"]


def _returned_as_is(loss: LossInfo, escapes: dict, output: fx.Node) -> bool:
    """lm_head's (scaled) output leaves the loss path only as a graph output (a flat one), and the
    weight is a graph input in the dtype the op runs in: then the backend can attach the logits'
    gradient outside the graph."""
    outputs = output.args[0]
    w_val, out = analysis.example_value(loss.weight), analysis.example_value(loss.linear)
    return (
        list(escapes) == [loss.scaled]
        and all(user is output for user in escapes[loss.scaled])
        and w_val.dtype == out.dtype
        and isinstance(outputs, (tuple, list))
        and all(value is None or isinstance(value, fx.Node) for value in outputs)
        and loss.weight.op == "placeholder"
    )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
