"""Mask elision: causal attention with no materialized mask.

Motivated by every HF causal LM under ``torch.compile``: transformers cannot skip the mask while
tracing (its check reads tensor values), so each step builds a (B, 1, S, S) mask and SDPA loses its
causal kernels. The mask is found and proven by :mod:`graphopt.masks`; this pass rewrites its users:

- ``causal``: ``sdpa(q, k, v, attn_mask=mask) -> sdpa(q, k, v, is_causal=True)``, no guard;
- ``causal_padding``: the same rewrite, exact for real positions when every row is right-padded and
  no loss term is scored at a padded position; a :func:`~graphopt.guards.right_padding_guard`
  checks that at run time and the original graph runs otherwise;
- eager attention (``scores + mask`` into softmax): ``scores + mask -> scores + causal_constant``,
  a ``full(S, S).triu(1)`` holding the mask's own masked value, so real rows see bit-identical
  additive terms and no per-batch padding work is done.

Outputs at padded positions (logits, hidden states, K/V) are unspecified on the fast path.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from graphopt import analysis
from graphopt.guards import Guard, right_padding_guard
from graphopt.losses import per_position_output
from graphopt.masks import MaskCandidate, _canonical
from graphopt.passes import PassContext


class MaskElision:
    name = "mask_elision"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        """Rewrite the provably causal masks in ``gm``. Returns the number of attention calls
        rewritten."""
        rewritten = 0
        for cand in ctx.masks(gm):
            if cand.kind == "unknown":
                ctx.report.decline(self.name, cand.reason)
                continue
            if cand.kind == "packed_causal":
                continue  # the varlen_attention pass owns packed masks
            if not ctx.options.mask_elision:
                continue
            guards = self._guards(gm, ctx, cand)
            if guards is None:
                continue
            rule = "causal" if cand.kind == "causal" else "causal_padding"
            for user in cand.sdpa_users:
                if not self._sdpa_is_square(user, cand):
                    ctx.report.decline(self.name, f"{user.name}: query and key lengths differ")
                    continue
                analysis.set_sdpa_arguments(user, attn_mask=None, is_causal=True)
                ctx.report.rewrite(self.name, f"sdpa_{rule}", f"{user.name}: attn_mask={cand.node.name} -> is_causal=True")
                rewritten += 1
            for user in cand.additive_users:
                self._replace_additive(gm, user, cand)
                ctx.report.rewrite(self.name, f"eager_{rule}", f"{user.name}: + {cand.node.name} -> + constant causal mask")
                rewritten += 1
            for guard in guards:
                ctx.add_guard(guard).rewrites.append(cand.node.name)
            analysis.erase_dead(gm.graph, cand.slice_nodes)
        return rewritten

    @staticmethod
    def _sdpa_is_square(node: fx.Node, cand: MaskCandidate) -> bool:
        args = analysis.sdpa_arguments(node)
        q, k = analysis.example_value(args["query"]), analysis.example_value(args["key"])
        return analysis.hint(q.shape[-2]) == analysis.hint(k.shape[-2]) == cand.seq_len

    def _guards(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> list[Guard] | None:
        """The guards the rewrite of ``cand`` needs, or None after recording a decline."""
        guards = []
        if cand.seq_symbols:
            guards.append(probed_length_guard(gm, ctx, cand))
        if cand.kind == "causal":
            return guards
        mask_index = ctx.placeholder_index(gm, cand.input)
        batch, seq = (analysis.hint(s) for s in analysis.example_value(cand.input).shape)
        losses, reasons = ctx.losses(gm)
        if ctx.options.trust_right_padding:
            ctx.report.note("trust_right_padding=True: the right-padding guard is OFF (unsafe)")
            return guards
        if not losses:
            if not ctx.options.padded_outputs_unused:
                why = "; ".join(reasons) or "the graph computes no loss from labels"
                ctx.report.decline(
                    self.name,
                    f"{cand.node.name} is causal ∧ padding, but outputs at padded positions may be "
                    f"read ({why}). Pass options={{'padded_outputs_unused': True}} if they are not.",
                )
                return None
            labels_index, shift, ignore_index = None, 0, -100
        else:
            if len(losses) > 1:
                ctx.report.decline(self.name, "the graph computes several losses")
                return None
            loss = losses[0]
            if (loss.batch, loss.seq) != (batch, seq):
                ctx.report.decline(self.name, "the loss is not computed over the masked positions")
                return None
            for out in gm.graph.output_node().all_input_nodes:
                if out is loss.loss_out or per_position_output(analysis.example_value(out), batch, seq):
                    continue
                ctx.report.decline(
                    self.name,
                    f"the graph returns {out.name}, which may reduce over padded positions",
                )
                return None
            labels_index = ctx.placeholder_index(gm, loss.labels)
            shift, ignore_index = loss.shift, loss.ignore_index
        guards.append(
            Guard(
                name="right_padding",
                fn=functools.partial(right_padding_guard, shift=shift, ignore_index=ignore_index),
                input_indices=(mask_index, labels_index),
                description=(
                    f"{cand.input.name} rows are ones then zeros"
                    + ("" if labels_index is None else f", and labels (shift {shift}) are {ignore_index} at padded positions")
                ),
            )
        )
        return guards

    @staticmethod
    def _replace_additive(gm: fx.GraphModule, add: fx.Node, cand: MaskCandidate) -> None:
        mask_val = analysis.example_value(cand.node)
        scores = add.args[1] if add.args[0] is cand.node else add.args[0]
        masked = cand.masked_value if cand.masked_value is not None else torch.finfo(mask_val.dtype).min
        graph = gm.graph
        with graph.inserting_before(add):
            size = graph.call_method("size", (scores, -1))
            full = graph.call_function(
                torch.full, ((size, size), masked), {"dtype": mask_val.dtype, "device": mask_val.device}
            )
            causal = graph.call_method("triu", (full, 1))
        add.replace_input_with(cand.node, causal)
        for node in (size, full, causal):
            analysis.annotate(node)


def probed_length_guard(gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> Guard:
    """A host-side guard: every graph input size that carried the mask's sequence length still
    agrees, and is at most the longest length the mask was proven at. Reads shapes only."""
    where: list[tuple[int, int | None]] = []
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = analysis.example_value(node)
        sizes = [(None, val)] if isinstance(val, torch.SymInt) else list(enumerate(getattr(val, "shape", ())))
        for dim, size in sizes:
            if isinstance(size, torch.SymInt) and _canonical(size) in cand.seq_symbols:
                where.append((index, dim))
    indices = sorted({i for i, _ in where})
    dims = [[d for i, d in where if i == index] for index in indices]
    return Guard(
        name="probed_length",
        fn=functools.partial(_lengths_agree, dims=dims, limit=cand.max_probed_len),
        input_indices=indices,
        description=f"sequence length <= {cand.max_probed_len} (the longest length the mask was proven at)",
    )


def _lengths_agree(*values, dims: list[list[int | None]], limit: int) -> dict[str, bool]:
    lengths = {int(v) if d is None else v.shape[d] for v, ds in zip(values, dims) for d in ds}
    return {"probed_length": len(lengths) <= 1 and all(n <= limit for n in lengths)}
