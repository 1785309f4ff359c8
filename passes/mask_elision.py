"""Mask elision: causal attention with no materialized mask.

Motivated by every HF causal LM under ``torch.compile``: transformers cannot skip the mask while
tracing (its check reads tensor values), so each step builds a (B, 1, S, S) mask and SDPA loses its
causal kernels. The mask is found and proven by :mod:`graphopt.masks`; this pass rewrites its users:

- ``causal``: ``sdpa(q, k, v, attn_mask=mask) -> sdpa(q, k, v, is_causal=True)``, no guard;
- ``causal_padding``: the same rewrite, exact for real positions when every row is right-padded and
  no loss term is scored at a padded position; a :func:`~graphopt.guards.right_padding_guard`
  checks that at run time and the original graph runs otherwise. A returned value that is neither
  the loss nor laid out per position (a router's auxiliary loss) must be proven to reduce over
  the tokens only through sums weighted by the attention mask (:func:`graphopt.passes.unpad.prove_token_wise`),
  or the rewrites are undone;
- eager attention (``scores + mask`` into softmax): ``scores + mask -> scores + causal_constant``,
  a ``full(S, S).triu(1)`` holding the mask's own masked value, so real rows see bit-identical
  additive terms and no per-batch padding work is done.

Outputs at padded positions (logits, hidden states, K/V) are unspecified on the fast path.

Across graphs (:mod:`graphopt.handoff`): a proven mask the graph returns is published for the graphs
that receive it (``mask_handoff`` in the report); in a graph that receives a mask and gives it to
SDPA unchanged, ``sdpa(q, k, v, attn_mask=received) -> sdpa(q, k, v, is_causal=True)`` behind a
:class:`~graphopt.handoff.HandedOffMaskGuard`: the mask was published as causal, as causal ∧
padding of a right-padded batch (with no padding at all, or with ``padded_outputs_unused``: such
a graph cannot see the labels), or as the block-causal mask of one document per row.
"""

from __future__ import annotations

import functools
import operator
import threading

import torch
import torch.fx as fx

from graphopt import analysis
from graphopt.guards import Guard, right_padding_guard
from graphopt.handoff import HandedOffMaskGuard
from graphopt.losses import LossInfo, per_position_output
from graphopt.masks import MaskCandidate, MaskKind, _canonical, prove_length
from graphopt.passes import PassContext, RightPadding, Rollback, retire_mask
from graphopt.runtime import Adapter


class PublishMasks(Adapter):
    """After each call, publish a proven mask the graph returns (:mod:`graphopt.handoff`), so the
    graphs that receive it can drop it. A symbolic-size mask is published only at lengths its
    proof covers; a mask the graph received and returns passes its fact on.

    Attributes:
        positions: where the mask stands in the graph's outputs.
        kind: what the mask was proven to be, or ``MaskKind.RECEIVED`` for a mask the graph
            received and returns unchanged (its published fact is passed on).
        input_index: the placeholder index of the mask's source (attention_mask, position_ids or
            the received mask), None for a causal mask of no input.
        proof: for a symbolic-size mask, the ``proven_length`` guard that must hold at the call's
            length for the mask to be what ``kind`` says.
        window: the sliding window of a sliding kind, else None.
        masked_value: an additive mask's value at its masked positions, else None.
    """

    def __init__(
        self,
        positions: list[int],
        kind: MaskKind,
        input_index: int | None,
        proof: Guard | None = None,
        window: int | None = None,
        masked_value: float | None = None,
    ):
        self.positions = positions
        self.kind = kind
        self.input_index = input_index
        self.proof = proof
        self.window = window
        self.masked_value = masked_value

    def after(self, args, outputs: list) -> None:
        from graphopt import handoff

        if self.proof is not None and not all(self.proof.conditions(args).values()):
            return
        source = None if self.input_index is None else args[self.input_index]
        kind, window, masked_value = self.kind, self.window, self.masked_value
        if kind == MaskKind.RECEIVED:
            fact = handoff.lookup(source)
            if fact is None:
                return
            kind, source, window, masked_value = fact.kind, fact.source, fact.window, fact.masked_value
        for position in self.positions:
            handoff.publish(outputs[position], kind, source, window, masked_value)


class MaskElision:
    name = "mask_elision"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Rewrite the users of the provably causal masks in ``gm``; publish the proven masks it
        returns."""
        self._to_prove = None  # (a padded mask, the outputs that may reduce over its positions)
        self._boundaries: dict[tuple[fx.Graph, int | None], fx.Node] = {}  # see _shared_boundaries
        for cand in ctx.masks(gm):
            if cand.kind == MaskKind.UNKNOWN:
                ctx.report.decline(self.name, cand.reason)
                continue
            if cand.exported:
                self._export(gm, ctx, cand)
            if cand.kind == MaskKind.RECEIVED:
                self._received(gm, ctx, cand)
                continue
            if cand.kind.base == MaskKind.PACKED_CAUSAL or not cand.users:
                continue  # the varlen_attention pass owns packed masks
            windowed = None
            if (cand.kind.sliding or cand.kind.chunked) and cand.sdpa_users:
                windowed = self._windowed_matches(gm, ctx, cand)
                if windowed is None:
                    continue
            guards = self._guards(gm, ctx, cand)
            if guards is None:
                continue
            rule = cand.kind.value
            for user in cand.sdpa_users:
                if windowed is not None:
                    self._rewrite_windowed(ctx, windowed[user], cand)
                    continue
                if not self._sdpa_is_square(user, cand):
                    ctx.report.decline(self.name, f"{user.name}: query and key lengths differ")
                    continue
                analysis.set_sdpa_arguments(user, attn_mask=None, is_causal=True)
                ctx.report.rewrite(self.name, f"sdpa_{rule}", f"{user.name}: attn_mask={cand.node.name} -> is_causal=True")
            rows = self._eager_rows(gm, ctx, cand)
            for user in cand.additive_users:
                done = rows(user)
                if isinstance(done, tuple):
                    what, layout = done
                    ctx.report.rewrite(self.name, f"eager_{rule}", f"{user.name}: + {cand.node.name} -> {what}")
                    if layout:
                        ctx.report.rewrite("rope_fusion", layout, f"{user.name}: RoPE applied inside varlen_attention")
                    continue
                self._replace_additive(user, cand)
                what = "causal mask" + (f" of window {cand.window}" if cand.window else "") + (f" in chunks of {cand.chunk}" if cand.chunk else "")
                ctx.report.note(f"mask_elision: {user.name} keeps a constant {what} rather than per-row attention: {done}")
                ctx.report.rewrite(self.name, f"eager_{rule}", f"{user.name}: + {cand.node.name} -> + constant {what}")
            for guard, registered in zip(guards, retire_mask(gm, ctx, cand, guards)):
                if isinstance(guard.fn, _ScoredTargetsGuard):
                    ctx.right_padding = RightPadding(registered, scores_targets=guard.fn.targets is not None)
        if self._to_prove is not None:
            self._prove_weighted(gm, ctx)

    def _eager_rows(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate):
        """For eager attention reading ``cand``: a function of one of its additive users that
        rewrites it to per-row varlen attention (:func:`graphopt.passes.eager_attention.rewrite_eager_rows`,
        each row one document: exact at the real queries of right-padded rows, everywhere without
        padding), returning (what it did, RoPE layout), or why not (the caller then keeps a
        constant mask)."""
        from graphopt.passes.eager_attention import rewrite_eager_rows
        from graphopt.passes.varlen_attention import TableAnalysis, body_tables

        outer = TableAnalysis(gm, self._table_sources(gm, cand), by_edges=True)

        def rewrite(add: fx.Node):
            checkpoint = cand.checkpoints.get(add)
            tables = outer if checkpoint is None else body_tables(checkpoint, outer)
            return rewrite_eager_rows(ctx, cand, add, tables, boundaries)

        def boundaries(graph: fx.Graph, before: fx.Node, xq: fx.Node) -> fx.Node:
            return self._shared_boundaries(before, xq, cand.chunk)

        return rewrite

    @staticmethod
    def _table_sources(gm: fx.GraphModule, cand: MaskCandidate) -> set[fx.Node]:
        """Where the rotary tables of a padded batch come from: HF's default ``arange`` positions
        and the integer inputs (``position_ids``) other than the mask's own."""
        return analysis.arange_constants(gm, cand.seq_len) | {
            p for p in gm.graph.find_nodes(op="placeholder")
            if p is not cand.input and isinstance(analysis.example_value(p), torch.Tensor)
            and not analysis.example_value(p).is_floating_point() and analysis.example_value(p).dtype != torch.bool
        }

    def _shared_boundaries(self, before: fx.Node, xq: fx.Node, chunk: int | None) -> fx.Node:
        """The per-row boundaries (:meth:`_row_boundaries`, or :meth:`_chunk_boundaries` for a
        ``chunk``) for an attention at ``before``: one computation per graph (or checkpoint body),
        shared by its layers, inserted before the first and reused wherever it precedes."""
        key = (before.graph, chunk)
        cu = self._boundaries.get(key)
        if cu is None or not _precedes(cu, before):
            make = self._row_boundaries if chunk is None else functools.partial(self._chunk_boundaries, chunk=chunk)
            cu = self._boundaries[key] = make(before.graph, before, xq)
        return cu

    @staticmethod
    def _chunk_boundaries(graph: fx.Graph, before: fx.Node, xq: fx.Node, chunk: int) -> fx.Node:
        """Each (B, S) row cut into chunks of ``chunk`` tokens from index 0 (a chunked mask on
        right-padded rows), in the (B*S + 1,) layout of
        :func:`graphopt.passes.varlen_attention.cu_seqlens_from_position_ids` (the positions
        ``arange(S)``), inserted before ``before`` and marked :data:`graphopt.analysis.ROW_CHUNKS`."""
        from graphopt.passes.varlen_attention import insert_cu_seqlens

        q = analysis.example_value(xq)
        with graph.inserting_before(before):
            seq = graph.call_method("size", (xq, 2))
            steps = graph.call_function(torch.arange, (seq,), {"device": q.device})
            positions = graph.call_method("unsqueeze", (steps, 0))
        analysis.annotate(seq)
        with q.fake_mode:  # arange of a size: no tensor input to take the fake mode from
            steps.meta["example_value"] = torch.empty(q.shape[2], dtype=torch.int64, device=q.device)
        analysis.annotate(positions)
        cu = insert_cu_seqlens(positions, before, xq, chunk)
        cu.meta[analysis.ROW_CHUNKS] = chunk
        return cu

    @staticmethod
    def _row_boundaries(graph: fx.Graph, before: fx.Node, xq: fx.Node) -> fx.Node:
        """``arange(B + 1) * S`` as int32, each (B, S) row one document, inserted before
        ``before`` and marked :data:`graphopt.analysis.ROWS_AS_DOCUMENTS` (unpadding then gives
        the attention the packed rows)."""
        device = analysis.example_value(xq).device
        with graph.inserting_before(before):
            batch = graph.call_method("size", (xq, 0))
            seq = graph.call_method("size", (xq, 2))
            rows = graph.call_function(operator.add, (batch, 1))
            steps = graph.call_function(torch.arange, (rows,), {"dtype": torch.int32, "device": device})
            cu = graph.call_function(operator.mul, (steps, seq))
        for node in (batch, seq, rows):
            analysis.annotate(node)
        q = analysis.example_value(xq)
        with q.fake_mode:  # arange of a size: no tensor input to take the fake mode from
            steps.meta["example_value"] = torch.empty(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        analysis.annotate(cu)
        cu.meta[analysis.ROWS_AS_DOCUMENTS] = True
        return cu

    def _windowed_matches(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> dict | None:
        """For a sliding mask that SDPA reads: each SDPA call proven to be attention over rotated
        q/k (:func:`graphopt.passes.varlen_attention.match_attention`), keyed by the call. SDPA
        has no window argument, so each becomes windowed per-row attention, or the mask stays for
        all of them: None after recording why."""
        from graphopt.passes.varlen_attention import TableAnalysis, body_tables, match_attention

        outer = TableAnalysis(gm, self._table_sources(gm, cand), by_edges=True)
        found = {}
        for user in cand.sdpa_users:
            why = None if self._sdpa_is_square(user, cand) else "query and key lengths differ"
            if why is None:
                checkpoint = cand.checkpoints.get(user)
                tables = outer if checkpoint is None else body_tables(checkpoint, outer)
                match = match_attention(user.graph.owning_module, user, tables, allow_unfused=True)
                why = match if isinstance(match, str) else None
            if why is not None:
                what = f"a sliding window of {cand.window} tokens" if cand.kind.sliding else f"chunks of {cand.chunk} tokens"
                arg = "window" if cand.kind.sliding else "chunk"
                ctx.report.decline(
                    self.name,
                    f"{cand.node.name}: {what} ({cand.kind}), and SDPA has no {arg} argument; "
                    f"{user.name} cannot run as per-row attention ({why}), so the mask is kept",
                )
                return None
            found[user] = match
        return found

    def _rewrite_windowed(self, ctx: PassContext, match, cand: MaskCandidate) -> None:
        """``match``'s SDPA becomes ``graphopt::varlen_attention`` with each row one document and
        ``cand``'s window, RoPE fused where it is proven. Exact at real positions of a right-padded row (its real
        queries see only real keys within the window); a row without padding is exact everywhere."""
        from graphopt.passes.varlen_attention import rewrite_attention

        cu = self._shared_boundaries(match.sdpa, match.xq, cand.chunk)
        name = match.sdpa.name
        rewrite_attention(ctx, match, cu, report=False, window=cand.window)
        what = f"window {cand.window}" if cand.kind.sliding else f"each row cut into chunks of {cand.chunk}"
        ctx.report.rewrite(
            self.name, f"sdpa_{cand.kind.value}",
            f"{name}: attn_mask={cand.node.name} -> per-row attention with {what} (varlen_attention)",
        )
        if match.fused:
            ctx.report.rewrite("rope_fusion", "interleaved" if match.interleaved else "half", f"{name}: RoPE applied inside varlen_attention")
        else:
            ctx.report.note(f"mask_elision: {name} runs per row with RoPE not fused ({match.unfused})")

    def _export(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> None:
        """Record ``cand``, a mask the graph returns, for publication to the graphs that receive it.
        A chunked mask is not published: the graphs that receive it keep it (their exact masked
        path)."""
        if cand.kind.chunked:
            ctx.report.decline(
                "mask_handoff",
                f"{cand.node.name}: returned to later graphs as a mask in chunks of {cand.chunk}; chunked masks are "
                "not handed off, so the graphs that receive it keep it",
            )
            return
        outputs = gm.graph.output_node().args[0]
        positions = [i for i, out in enumerate(outputs) if out is cand.node]
        source = None if cand.input is None else ctx.placeholder_index(gm, cand.input)
        proof = proven_length_guard(gm, cand) if cand.seq_symbols and cand.kind != MaskKind.RECEIVED else None
        ctx.adapt(PublishMasks(positions, cand.kind, source, proof, cand.window, cand.masked_value))
        if cand.kind.sliding:  # the graphs that receive it build a version for this window
            from graphopt import handoff

            handoff.expect_window(cand.window)
        what = "passed on" if cand.kind == MaskKind.RECEIVED else f"published as {cand.kind.value}"
        if cand.kind.sliding:
            what += f" with its window of {cand.window}"
        ctx.report.rewrite("mask_handoff", "export", f"{cand.node.name}: returned to later graphs, {what}")

    def _received(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> None:
        """Drop a mask received from an earlier graph behind a :class:`HandedOffMaskGuard`: SDPA
        becomes causal, eager attention per-row attention."""
        if cand.additive_users and cand.sdpa_users:
            ctx.report.decline(self.name, f"{cand.input.name}: a received mask read by both SDPA and eager attention is kept")
            return
        if not ctx.allow_guards or ctx.received_as != "causal":
            return  # the exact fallback keeps it; the packed version is varlen attention's
        masked_at_most = None  # SDPA reads the mask as it is
        if cand.additive_users:
            masked_at_most = self._received_eager(gm, ctx, cand)
            if masked_at_most is None:
                return
        elif not self._received_sdpa(ctx, cand):
            return
        promise = ctx.options.padded_outputs_unused
        eager = "" if masked_at_most is None else f", its masked value at most {masked_at_most:g}"
        guards = [
            Guard(
                name="handed_off_mask",
                fn=HandedOffMaskGuard(promise, masked_at_most),
                input_indices=(ctx.placeholder_index(gm, cand.input),),
                description=(
                    f"{cand.input.name} was built by an earlier graph as a causal mask, the mask of a right-padded "
                    + ("batch" if promise else "batch with no padding")
                    + f", or the block-causal mask of one document per row{eager}"
                ),
                params=(promise, masked_at_most),
            )
        ]
        if cand.seq_symbols:
            guards.append(proven_length_guard(gm, cand))
        retire_mask(gm, ctx, cand, guards)
        ctx.received_rewritten.append(ctx.placeholder_index(gm, cand.input))

    def _received_sdpa(self, ctx: PassContext, cand: MaskCandidate) -> list[fx.Node]:
        """``attn_mask=received -> is_causal=True`` for each square SDPA call: the calls rewritten."""
        rewritten = []
        for user in cand.sdpa_users:
            if not self._sdpa_is_square(user, cand):
                ctx.report.decline(self.name, f"{user.name}: query and key lengths differ")
                continue
            analysis.set_sdpa_arguments(user, attn_mask=None, is_causal=True)
            ctx.report.rewrite(self.name, "sdpa_handed_off", f"{user.name}: attn_mask={cand.input.name} (from an earlier graph) -> is_causal=True")
            rewritten.append(user)
        return rewritten

    def _received_eager(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> float | None:
        """Eager attention over a received mask becomes per-row attention (each row one document:
        exact where causal SDPA would be, see :class:`HandedOffMaskGuard`), with its softcap and
        sinks: the masked-value bound of its guard, or None when nothing was rewritten."""
        from graphopt.passes.eager_attention import rewrite_received_eager
        from graphopt.passes.varlen_attention import TableAnalysis, received_table_sources, reads_whole_mask

        if not reads_whole_mask(cand):
            ctx.report.decline(self.name, f"{cand.input.name}: eager attention reads a corner of the received mask; it is kept")
            return None

        def boundaries(graph: fx.Graph, before: fx.Node, xq: fx.Node, checkpoint: fx.Node | None) -> fx.Node:
            return self._row_boundaries(graph, before, xq)

        tables = TableAnalysis(gm, received_table_sources(gm, cand.input))
        return rewrite_received_eager(ctx, self.name, cand, tables, boundaries, None, "per-row attention")

    @staticmethod
    def _sdpa_is_square(node: fx.Node, cand: MaskCandidate) -> bool:
        args = analysis.sdpa_arguments(node)
        q, k = analysis.example_value(args["query"]), analysis.example_value(args["key"])
        return analysis.hint(q.shape[-2]) == analysis.hint(k.shape[-2]) == cand.seq_len

    def _guards(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> list[Guard] | None:
        """The guards the rewrite of ``cand`` needs, or None after recording a decline."""
        guards = []
        if cand.seq_symbols:
            guards.append(proven_length_guard(gm, cand))
        if cand.kind.base == MaskKind.CAUSAL_PADDING:
            why = self._padding_decline(gm, ctx, cand)
            if why is not None:
                if why:
                    ctx.report.decline(self.name, why)
                return None
            if ctx.options.trust_right_padding:
                ctx.report.note("trust_right_padding=True: the right-padding guard is OFF (unsafe)")
            else:
                losses, _ = ctx.losses(gm)
                guards.append(right_padding_guard_for(gm, ctx, cand, losses[0] if losses else None))
        if guards and not ctx.allow_guards:
            return None  # the exact fallback keeps the mask
        if cand.kind.base == MaskKind.CAUSAL_PADDING and self._to_prove is None and ctx.losses(gm)[0]:
            # with a loss, the other outputs must be per position or proven weighted (without
            # one, padded_outputs_unused is the user's promise for all of them)
            reducing = self._reducing_outputs(gm, ctx, cand)
            if reducing:
                self._to_prove = (cand, reducing)
        return guards

    def _padding_decline(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> str | None:
        """Why a causal ∧ padding mask cannot be dropped behind a guard, or None when it can."""
        mask_len = analysis.example_value(cand.input).shape[-1]
        if not cand.seq_symbols and analysis.hint(mask_len) != cand.seq_len:
            return (
                f"{cand.input.name} has {analysis.hint(mask_len)} columns for {cand.seq_len} tokens "
                "(transformers pads or slices it); the mask is kept"
            )
        batch = analysis.hint(analysis.example_value(cand.input).shape[0])
        losses, reasons = ctx.losses(gm)
        if not losses:
            if ctx.options.padded_outputs_unused:
                return None
            why = "; ".join(reasons) or (
                "the graph computes no loss from labels; a loss computed outside the compiled graph, "
                "as TRL's SFTTrainer computes it, cannot be checked"
            )
            return (
                f"{cand.node.name} is causal ∧ padding, but outputs at padded positions may be "
                f"read ({why}). Pass options={{'padded_outputs_unused': True}} if they are not."
            )
        if len(losses) > 1:
            return "the graph computes several losses"
        loss = losses[0]
        if (loss.batch, loss.seq) != (batch, cand.seq_len):
            return "the loss is not computed over the masked positions"
        if loss.divisor_from_activations:
            return f"the loss divisor {loss.divisor.name} is computed from model activations, which may read padded positions"
        return None

    @staticmethod
    def _reducing_outputs(gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> list[fx.Node]:
        """The outputs of ``gm`` that are neither the proven loss nor laid out per position: they
        may reduce over positions (a router's auxiliary loss, the loss it is added to)."""
        losses, _ = ctx.losses(gm)
        batch = analysis.hint(analysis.example_value(cand.input).shape[0])
        return [
            out for out in gm.graph.output_node().all_input_nodes
            if not (losses and out is losses[0].loss_out) and not per_position_output(analysis.example_value(out), batch, cand.seq_len)
        ]

    def _prove_weighted(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Outputs that reduce over positions are kept only when every such reduction is proven
        weighted by the attention mask, zero at padded positions (a router's auxiliary loss: see
        :meth:`graphopt.passes.unpad._Builder._weighted_sum`). The proof is the unpadding pass's:
        every op of the rewritten graph is token-wise, and the only sums over the tokens are of
        padding weights. Otherwise every rewrite of this pass is undone (:class:`Rollback`)."""
        from graphopt.passes.unpad import prove_token_wise

        cand, outputs = self._to_prove
        losses, _ = ctx.losses(gm)
        guard = right_padding_guard_for(gm, ctx, cand, losses[0] if losses else None)
        names = ", ".join(out.name for out in outputs)
        why = prove_token_wise(gm, ctx, guard)
        if why is not None:
            raise Rollback(
                f"the graph returns {names}, which may reduce over padded positions; they are not proven "
                f"weighted by {cand.input.name} ({why}), so the mask is kept"
            )
        ctx.report.note(
            f"mask_elision: {names} reduce over positions only through sums weighted by {cand.input.name} "
            "(zero at padded positions): exact on the fast path"
        )

    @staticmethod
    def _replace_additive(add: fx.Node, cand: MaskCandidate) -> None:
        mask_val = analysis.example_value(cand.node)
        mask = cand.seen_as.get(add, cand.node)
        scores = add.args[1] if add.args[0] is mask else add.args[0]
        masked = cand.masked_value if cand.masked_value is not None else torch.finfo(mask_val.dtype).min
        graph = add.graph
        new = []

        def call(kind: str, target, args, kwargs=None) -> fx.Node:
            new.append(getattr(graph, kind)(target, args, kwargs or {}))
            return new[-1]

        with graph.inserting_before(add):
            size = call("call_method", "size", (scores, -1))
            if cand.chunk is not None:  # masked above the diagonal and outside the query's chunk
                steps = call("call_function", torch.arange, (size,), {"device": mask_val.device})
                chunks = call("call_function", operator.floordiv, (steps, cand.chunk))
                rows = call("call_method", "unsqueeze", (chunks, 1))
                cols = call("call_method", "unsqueeze", (chunks, 0))
                other = call("call_function", operator.ne, (rows, cols))
                ones = call("call_function", torch.ones, ((size, size),), {"dtype": torch.bool, "device": mask_val.device})
                blocked = call("call_function", torch.logical_or, (call("call_method", "triu", (ones, 1)), other))
                zeros = call("call_function", torch.zeros, ((size, size),), {"dtype": mask_val.dtype, "device": mask_val.device})
                constant = call("call_method", "masked_fill", (zeros, blocked, masked))
            elif cand.window is None:  # masked above the diagonal
                full = call("call_function", torch.full, ((size, size), masked), {"dtype": mask_val.dtype, "device": mask_val.device})
                constant = call("call_method", "triu", (full, 1))
            else:  # masked above the diagonal and at or below the window's lower edge
                ones = call("call_function", torch.ones, ((size, size),), {"dtype": torch.bool, "device": mask_val.device})
                blocked = call("call_function", torch.logical_or, (call("call_method", "triu", (ones, 1)), call("call_method", "tril", (ones, -cand.window))))
                zeros = call("call_function", torch.zeros, ((size, size),), {"dtype": mask_val.dtype, "device": mask_val.device})
                constant = call("call_method", "masked_fill", (zeros, blocked, masked))
        add.replace_input_with(mask, constant)
        for node in new:
            analysis.annotate(node)


class _ScoredTargetsGuard:
    """``right_padding_guard`` on the targets a proven loss scores, recomputed from this call's
    inputs by the graph's own label path (so an in-graph transform of the labels is seen)."""

    def __init__(self, loss: LossInfo | None):
        self.targets = None if loss is None else loss.targets.module
        self.ignore_index = -100 if loss is None else loss.ignore_index

    def __call__(self, attention_mask: torch.Tensor, *target_inputs) -> dict[str, torch.Tensor]:
        targets = None
        if self.targets is not None:
            with torch.no_grad():
                targets = self.targets(*target_inputs)
        return right_padding_guard(attention_mask, targets, ignore_index=self.ignore_index)


def right_padding_guard_for(gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate, loss: LossInfo | None) -> Guard:
    """The right-padding guard of ``cand``: its padding input, and the targets ``loss`` scores."""
    target_inputs = [] if loss is None else [ctx.placeholder_index(gm, n) for n in loss.targets.inputs]
    if loss is None:
        detail = ""
    elif loss.labels_transformed:
        detail = f", and the targets the loss scores ({loss.labels.name} as transformed in the graph) are {loss.ignore_index} at padded positions"
    else:
        detail = f", and {loss.labels.name} (shift {loss.shift}) are {loss.ignore_index} at padded positions"
    return Guard(
        name="right_padding",
        fn=_ScoredTargetsGuard(loss),
        input_indices=(ctx.placeholder_index(gm, cand.input), *target_inputs),
        description=f"{cand.input.name} rows are ones then zeros" + detail,
        params=(None, None) if loss is None else (loss.ce.name, loss.ignore_index),
    )


class _LengthProof:
    """The ``proven_length`` guard of a symbolic-size mask: every input size that carried the
    mask's sequence length agrees (``lengths_agree``), and the mask is proven causal at that length
    (``proven_length``). A length longer than any proven is proven when it first arrives, at the
    next power of two (so a run of growing lengths proves a handful of times), on the CPU, once;
    the result is remembered. Reads shapes only, never device data."""

    def __init__(self, cand: MaskCandidate, dims: list[list[int | None]]):
        self.cand = cand
        self.dims = dims
        self.failed_from: int | None = None
        self._lock = threading.Lock()

    def __call__(self, *values) -> dict[str, bool]:
        lengths = {int(v) if d is None else v.shape[d] for v, ds in zip(values, self.dims) for d in ds}
        if len(lengths) > 1:
            return {"lengths_agree": False}
        length = lengths.pop() if lengths else 0
        return {"lengths_agree": True, "proven_length": self._proven(length)}

    def _proven(self, length: int) -> bool:
        with self._lock:
            if length <= self.cand.max_probed_len:
                return True
            if self.failed_from is not None and length >= self.failed_from:
                return False
            target = 1 << (length - 1).bit_length()
            if self.failed_from is not None:
                target = min(target, self.failed_from - 1)
            if target > length:
                if prove_length(self.cand, target):
                    return True
                self.failed_from = target
            if prove_length(self.cand, length):
                return True
            self.failed_from = length
            return False


def proven_length_guard(gm: fx.GraphModule, cand: MaskCandidate) -> Guard:
    """The host-side :class:`_LengthProof` guard of a symbolic-size mask ``cand``."""
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
        name="proven_length",
        fn=_LengthProof(cand, dims),
        input_indices=indices,
        description=(
            f"the sequence length is one length, and {cand.node.name} is proven {cand.kind} at it "
            f"(proven up to {cand.max_probed_len} at compile time; longer lengths are proven on arrival)"
        ),
        params=(cand.node.name,),
    )


def _precedes(node: fx.Node, before: fx.Node) -> bool:
    """Whether ``node`` comes before ``before`` in their graph."""
    if node.graph is not before.graph:
        return False
    cursor = before.prev
    while cursor.op != "root":
        if cursor is node:
            return True
        cursor = cursor.prev
    return False
