"""Packed sequences: per-document attention with RoPE fused in, and no T×T mask.

Motivated by padding-free training (HF's ``DataCollatorWithFlattening``, TRL's ``padding_free``):
several documents share a row, ``position_ids`` restart for each, and transformers builds a
block-causal (B, 1, S, S) mask that makes SDPA do all S² work. For every SDPA call whose mask
:mod:`graphopt.masks` proved ``packed_causal``::

    q = rope(xq, cos, sin); k = repeat_kv(rope(xk, cos, sin)); v = repeat_kv(xv)
    sdpa(q, k, v, attn_mask=block_causal(position_ids))
        -> graphopt::varlen_attention(xq, xk, xv, cos, sin, cu_seqlens, S, scale, interleaved)

Each piece is proven by probing the subgraph between the unrotated tensors and the SDPA inputs:
the RoPE region must equal ``x[..., :R] * cos + rot(x[..., :R]) * sin`` (half or interleaved
rotation, partial when R < D) for random tables, and the K/V paths must equal a head repeat. The
document boundaries are derived once per graph, on the device and with static shapes, by
:func:`cu_seqlens_from_position_ids`, using the same rule the mask was proven to follow, so the
rewrite is exact for every ``position_ids`` and needs no runtime guard.

Where q and k are not proven RoPE of a projection (a layer without RoPE, a norm after RoPE as in
Llama 4, MLA's ``cat(q_nope, rope(q_pe))``, a RoPE written as complex products), per-document
attention is just as exact, since the mask alone says which keys a query sees: the op then reads
the SDPA's own q and (unrepeated) k/v with empty rotary tables, RoPE not fused, and the report
notes why::

    sdpa(q, k, repeat_kv(xv), attn_mask=block_causal(position_ids))
        -> graphopt::varlen_attention(q, k, xv, empty, empty, cu_seqlens, S, scale, False)

A mask received from an earlier graph (:mod:`graphopt.handoff`) is rewritten the same way in the
``"packed"`` version of the graph (``PassContext.received_as``): the rotary tables are then inputs
too, and the document boundaries arrive as an extra input, computed from the ``position_ids`` the
mask was published with, behind a :class:`~graphopt.handoff.HandedOffPackedGuard`.
"""

from __future__ import annotations

import itertools

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from graphopt import analysis
from graphopt.guards import Guard
from graphopt.handoff import HandedOffPackedGuard, HandedOffWindowGuard
from graphopt.masks import MaskCandidate, MaskKind, _canonical, document_starts
from graphopt.ops.varlen_attention import apply_rotary
from graphopt.passes import PassContext, retire_mask
from graphopt.runtime import Adapter

_MAX_DOMINATOR_TRIES = 8


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch: int, chunk: int | None = None) -> torch.Tensor:
    """Document boundaries of a packed batch, padded to a static length.

    Documents start where :func:`graphopt.masks.document_starts` says. Rows are flattened, so
    T = B * S.

    Args:
        position_ids: (B, S) or (1, S) integer positions.
        batch: B.
        chunk: attention within chunks of this many positions (a ``chunked_*`` mask): each
            document is cut where its position is a multiple of ``chunk``.

    Returns:
        (T + 1,) int32: entry j is the first token of document j, entries past the last document
        are T (empty documents).
    """
    pos = position_ids.expand(batch, -1)
    starts = document_starts(pos, chunk).reshape(-1)
    total = starts.shape[0]
    doc = starts.cumsum(0) - 1
    cu = torch.full((total + 1,), total, dtype=torch.int64, device=pos.device)
    cu = cu.scatter_reduce(0, doc, torch.arange(total, device=pos.device), "amin")
    return cu.to(torch.int32)


@dataclass
class AttentionMatch:
    """An SDPA call proven to be attention over rotated q/k and (repeated) v, or, with ``cos`` and
    ``sin`` None, over its own q and k (RoPE not fused, ``unfused`` says why) and (repeated) v."""

    sdpa: fx.Node
    xq: fx.Node  # (B, Hq, S, D), before RoPE (the SDPA's query when RoPE is not fused)
    xk: fx.Node  # (B, Hkv, S, D), before RoPE and the head repeat (after RoPE when not fused)
    xv: fx.Node  # (B, Hkv, S, Dv)
    cos: fx.Node | None  # (B|1, 1, S, R) rotary tables; None: RoPE not fused
    sin: fx.Node | None
    interleaved: bool
    fp32_tables: bool  # the rotation runs in fp32 on upcast q/k (Cohere): pass the tables as fp32
    scale: float
    region: list[fx.Node]  # nodes that become dead after the rewrite
    unfused: str | None = None  # why RoPE is not fused (a decline reason of the RoPE proof)
    # The tables hold one angle per rotary pair, (B|1, 1, S, R/2) (gpt-oss): the op gets them
    # doubled to the pairs' layout (paired_table).
    paired_tables: bool = False

    @property
    def fused(self) -> bool:
        """Whether RoPE runs inside the op (the rotary tables are known)."""
        return self.cos is not None

    def mapped(self, counterpart: Callable[[fx.Node], fx.Node]) -> AttentionMatch:
        """This match in a copy of its graph: ``counterpart`` gives each node's copy."""
        def table(node: fx.Node | None) -> fx.Node | None:
            return None if node is None else counterpart(node)

        return AttentionMatch(
            sdpa=counterpart(self.sdpa), xq=counterpart(self.xq), xk=counterpart(self.xk), xv=counterpart(self.xv),
            cos=table(self.cos), sin=table(self.sin), interleaved=self.interleaved,
            fp32_tables=self.fp32_tables, scale=self.scale, region=[counterpart(n) for n in self.region],
            unfused=self.unfused, paired_tables=self.paired_tables,
        )


class ReceivedBoundaries(Adapter):
    """The calling convention of the received-packed version of a graph (one that receives its mask
    from an earlier graph and runs attention per document): one more input, the (B*S + 1,) int32
    document boundaries of the received mask, computed once per mask on the device
    (:meth:`graphopt.handoff.MaskFact.cu_seqlens`). The version's guards hold, so the mask is
    known and packed."""

    def __init__(self, mask_index: int, input_name: str):
        self.mask_index = mask_index
        self.input_names = (input_name,)

    def inputs(self, args, host) -> tuple:
        from graphopt import handoff, inspection

        mask = args[self.mask_index]
        inspection.record_runtime("received_packed")
        return (handoff.lookup(mask).cu_seqlens(mask.shape[0]),)


class VarlenAttention:
    name = "varlen_attention"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for cand in ctx.masks(gm):
            if cand.kind == MaskKind.RECEIVED and ctx.received_as == "packed" and ctx.allow_guards:
                self._received(gm, ctx, cand)
            if cand.kind.base != MaskKind.PACKED_CAUSAL:
                continue
            if cand.additive_users:  # eager attention (softcap, sinks): graphopt.passes.eager_attention
                from graphopt.passes.eager_attention import rewrite_packed_eager

                rewrite_packed_eager(gm, ctx, cand)
                continue
            matches = self._matches(ctx, cand, TableAnalysis(gm, {cand.input}))
            if not matches:
                continue
            cus: dict[fx.Graph, fx.Node] = {}  # one boundary computation per graph or body
            for match, checkpoint in matches:
                if match.sdpa.graph not in cus:
                    positions = cand.input if checkpoint is None else analysis.add_checkpoint_operand(checkpoint, cand.input)
                    cus[match.sdpa.graph] = insert_cu_seqlens(positions, match.sdpa, match.xq, cand.chunk)
                rewrite_attention(ctx, match, cus[match.sdpa.graph], window=cand.window, chunk=cand.chunk)
            retire_mask(gm, ctx, cand)

    def _matches(self, ctx: PassContext, cand: MaskCandidate, outer: TableAnalysis) -> list[tuple[AttentionMatch, fx.Node | None]]:
        """The SDPA users of ``cand`` proven rewritable, each with the checkpoint call whose body
        holds it (or None); the others are reported as declines."""
        matches = []
        for sdpa in cand.sdpa_users:
            checkpoint = cand.checkpoints.get(sdpa)
            tables = outer if checkpoint is None else body_tables(checkpoint, outer)
            match = match_attention(sdpa.graph.owning_module, sdpa, tables, allow_unfused=True)
            if isinstance(match, str):
                ctx.report.decline(self.name, f"{sdpa.name}: {match}")
            else:
                matches.append((match, checkpoint))
        return matches

    def _received(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> None:
        """Per-document attention for the SDPA calls (or the eager attention) reading a mask
        received from an earlier graph, with the boundaries as a new trailing input (see the
        module docstring)."""
        if not reads_whole_mask(cand):
            return  # attention reads a corner of the mask: boundaries of the whole would not fit
        tables = TableAnalysis(gm, received_table_sources(gm, cand.input))
        if cand.additive_users:
            self._received_eager(gm, ctx, cand, tables)
            return
        matches = self._matches(ctx, cand, tables)
        if not matches:
            return
        cu = self._boundaries_input(gm, matches[0][0].xq)
        inside: dict[fx.Graph, fx.Node] = {gm.graph: cu}
        for match, checkpoint in matches:
            if match.sdpa.graph not in inside:
                inside[match.sdpa.graph] = analysis.add_checkpoint_operand(checkpoint, cu)
            rewrite_attention(ctx, match, inside[match.sdpa.graph], window=ctx.received_window)
        self._retire_received(gm, ctx, cand, cu, masked_at_most=None)

    def _received_eager(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate, tables: TableAnalysis) -> None:
        """The eager attention reading a received mask (:func:`graphopt.passes.eager_attention.rewrite_received_eager`),
        guarded also on the published mask's masked value."""
        from graphopt.passes.eager_attention import rewrite_received_eager

        if cand.sdpa_users:
            return  # mask elision reports it (in the fast version)
        inside: dict[fx.Graph, fx.Node] = {}  # the boundaries input, and its operand in each checkpoint body

        def boundaries(graph: fx.Graph, before: fx.Node, xq: fx.Node, checkpoint: fx.Node | None) -> fx.Node:
            if not inside:
                inside[gm.graph] = self._boundaries_input(gm, xq)
            if graph not in inside:
                inside[graph] = analysis.add_checkpoint_operand(checkpoint, inside[gm.graph])
            return inside[graph]

        window = ctx.received_window
        into = "per-document attention" if window is None else f"per-document attention with its window of {window}"
        masked_at_most = rewrite_received_eager(ctx, self.name, cand, tables, boundaries, window, into)
        if masked_at_most is not None:
            self._retire_received(gm, ctx, cand, inside[gm.graph], masked_at_most)

    def _retire_received(self, gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate, cu: fx.Node, masked_at_most: float | None) -> None:
        """Guard the rewritten received mask (packed, or windowed in the received-windowed
        version; ``masked_at_most`` for eager attention) and give the graph its boundaries input."""
        from graphopt.passes.mask_elision import proven_length_guard

        mask = cand.input
        index = ctx.placeholder_index(gm, mask)
        window = ctx.received_window
        eager = "" if masked_at_most is None else f", its masked value at most {masked_at_most:g}"
        guards = [Guard(
            name="handed_off_packed",
            fn=HandedOffPackedGuard(masked_at_most),
            input_indices=(index,),
            description=f"{mask.name} was built by an earlier graph as the block-causal mask of its position_ids{eager}",
            params=(masked_at_most,),
        ) if window is None else Guard(
            name="handed_off_window",
            fn=HandedOffWindowGuard(window, ctx.options.padded_outputs_unused, masked_at_most),
            input_indices=(index,),
            description=f"{mask.name} was built by an earlier graph as a mask with a sliding window of {window}{eager}",
            params=(window, ctx.options.padded_outputs_unused, masked_at_most),
        )]
        if cand.seq_symbols:
            guards.append(proven_length_guard(gm, cand))
        retire_mask(gm, ctx, cand, guards)
        ctx.received_rewritten.append(index)
        ctx.adapt(ReceivedBoundaries(index, cu.name))

    @staticmethod
    def _boundaries_input(gm: fx.GraphModule, xq: fx.Node) -> fx.Node:
        """A trailing placeholder for the (B*S + 1,) int32 document boundaries (``xq``: a (B, H,
        S, D) query of the attention they serve)."""
        last = gm.graph.find_nodes(op="placeholder")[-1]
        with gm.graph.inserting_after(last):
            cu = gm.graph.placeholder("handed_off_cu_seqlens")
        q = analysis.example_value(xq)
        with q.fake_mode:
            cu.meta["example_value"] = torch.empty(q.shape[0] * q.shape[2] + 1, dtype=torch.int32, device=q.device)
        return cu


def insert_cu_seqlens(positions: fx.Node, before: fx.Node, xq: fx.Node, chunk: int | None = None) -> fx.Node:
    """A node computing :func:`cu_seqlens_from_position_ids` of ``positions`` for ``xq``'s
    batch (cut into ``chunk``s for a chunked mask), inserted before ``before``: the first
    rewritten attention of its graph, which computes the boundaries once for all its layers."""
    graph = before.graph
    with graph.inserting_before(before):
        batch = graph.call_method("size", (xq, 0))
        cu = graph.call_function(cu_seqlens_from_position_ids, (positions, batch, chunk))
    for node in (batch, cu):
        analysis.annotate(node)
    return cu


def rewrite_attention(
    ctx: PassContext, match: AttentionMatch, cu_seqlens: fx.Node, *, report: bool = True, window: int | None = None,
    chunk: int | None = None,
) -> None:
    """Replace ``match.sdpa`` by ``graphopt::varlen_attention`` of the unrotated q/k/v and the
    rotary tables of ``match`` (RoPE fused, no head repeat), or of its q, k and v with empty
    (B*S, 0) tables when RoPE is not fused, and erase what is left dead of the region.
    ``cu_seqlens``, a node of the SDPA's graph: the int32 document boundaries over the B*S tokens
    flattened (:func:`cu_seqlens_from_position_ids`). With a ``window``, each query sees its last
    ``window`` keys of its document (a sliding mask). ``chunk``, for the report only: the
    boundaries cut the documents into chunks of this many tokens. ``report``: report the rewrite
    (``varlen_attention``, and ``rope_fusion`` or a note saying why RoPE is not fused); a pass
    that reports it as its own passes False."""
    graph = match.sdpa.graph
    new: list[fx.Node] = []

    def call(kind: str, target, *args) -> fx.Node:
        node = getattr(graph, kind)(target, args)
        new.append(node)
        return node

    with graph.inserting_before(match.sdpa):
        batch = call("call_method", "size", match.xq, 0)
        heads = call("call_method", "size", match.xq, 1)
        seq = call("call_method", "size", match.xq, 2)
        value_dim = call("call_method", "size", match.xv, 3)
        flat = []
        for x in (match.xq, match.xk, match.xv):  # (B, H, S, D) -> (B*S, H, D)
            t = call("call_method", "transpose", x, 1, 2)
            flat.append(call("call_method", "flatten", call("call_method", "contiguous", t), 0, 1))
        tables = []
        for table in (match.cos, match.sin) if match.fused else ():  # (B|1, 1, S, R) -> (B*S, R)
            if match.fp32_tables:
                table = call("call_method", "float", table)
            if match.paired_tables:
                table = call("call_function", paired_table, table, match.interleaved)
            expanded = call("call_method", "expand", table, batch, 1, seq, -1)
            tables.append(call("call_method", "flatten", call("call_method", "select", expanded, 1, 0), 0, 1))
        if not match.fused:  # R = 0: the op rotates nothing
            tokens = call("call_method", "size", flat[0], 0)
            empty = call("call_method", "new_zeros", flat[0], (tokens, 0))
            tables = [empty, empty]
        options = () if window is None else (window,)  # the op's window argument (default -1: none)
        out = call(
            "call_function", torch.ops.graphopt.varlen_attention.default,
            *flat, *tables, cu_seqlens, seq, match.scale, match.interleaved, ctx.options.attention_impl, *options,
        )
        shaped = call("call_method", "view", out, batch, seq, heads, value_dim)
        result = call("call_method", "transpose", shaped, 1, 2)
    for node in new:
        analysis.annotate(node)
    match.sdpa.replace_all_uses_with(result)
    graph.erase_node(match.sdpa)
    analysis.erase_dead(graph, match.region)
    if report:  # else the caller (graphopt.passes.unpad, mask elision) reports the rewrite as its own
        _report_rewrite(ctx, match, window, chunk)


def _report_rewrite(ctx: PassContext, match: AttentionMatch, window: int | None, chunk: int | None = None) -> None:
    """``varlen_attention/sdpa_packed[_sliding|_chunked][_unfused]``, and ``rope_fusion/<layout>``
    where RoPE runs inside the op, else a note with the reason it does not."""
    name = match.sdpa.name
    rule, what, into = "sdpa_packed", "block-causal mask", "per-document attention"
    if window is not None:
        rule, what, into = f"{rule}_sliding", f"{what} with a sliding window of {window}", f"{into}, window {window}"
    if chunk is not None:
        rule, what, into = f"{rule}_chunked", f"{what} in chunks of {chunk}", f"{into}, each cut into chunks of {chunk}"
    if match.fused:
        ctx.report.rewrite(VarlenAttention.name, rule, f"{name}: {what} -> {into}")
        layout = "interleaved" if match.interleaved else "half"
        ctx.report.rewrite("rope_fusion", layout, f"{name}: RoPE applied inside varlen_attention")
        return
    ctx.report.rewrite(VarlenAttention.name, f"{rule}_unfused", f"{name}: {what} -> {into} over its own q and k")
    ctx.report.note(
        f"varlen_attention: {name} runs per document with RoPE not fused ({match.unfused}): "
        "q and k enter varlen_attention as the SDPA received them"
    )


class TableAnalysis:
    """Which nodes of ``gm`` are RoPE-table-like, for :func:`match_attention`.

    - ``table_only``: nodes that descend from ``sources`` and otherwise read only float inputs
      that need no gradient (``inv_freq``), never tokens or trainable parameters; sources that
      are not placeholders are table-only too.
    - ``hidden``: the other nodes whose values depend on an input.
    - ``token_inputs``: the placeholders, sources aside, that carry tokens or trainable state
      (int ids, parameters); float buffers such as ``inv_freq`` do not.
    - ``written``: the storages that an in-place op of the graph writes into (DeepSeek-V3 builds
      its key with ``new_empty`` and two ``key[..., a:b].copy_(...)``): a probe of the function
      that computes a node of such a storage would not see the write, so none is probed.

    A node descends from the sources when its value depends on a source placeholder (the
    positions input, or a checkpoint body's placeholders that receive tables). With
    ``by_edges=True`` any path from a source counts, size reads included, and the sources may
    be constant nodes (unpad's: HF's default ``arange`` positions).
    """

    def __init__(self, gm: fx.GraphModule, sources: set[fx.Node], *, by_edges: bool = False):
        deps = analysis.tensor_inputs(gm.graph)
        self.sources = sources
        self.table_only: set[fx.Node] = set(n for n in sources if n.op != "placeholder")
        self.hidden: set[fx.Node] = set()
        reached = set(sources)  # the nodes a path from a source leads to
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if any(a in reached for a in node.all_input_nodes):
                reached.add(node)
            d = deps[node]
            ok = all(p in sources or (_float(p) and not analysis.example_value(p).requires_grad) for p in d)
            descends = node in reached if by_edges else bool(d & sources)
            if ok and descends:
                self.table_only.add(node)
            elif d:
                self.hidden.add(node)
        self.token_inputs = {
            p for p in gm.graph.nodes if p.op == "placeholder" and p not in sources and _carries_tokens(p)
        }
        self.written = {
            storage for n in gm.graph.nodes if analysis.is_mutation(n) and n.args
            for storage in [_storage(n.args[0])] if storage is not None
        }

    def written_in_place(self, nodes: Iterable[fx.Node]) -> bool:
        """Whether an in-place op writes into the storage of one of ``nodes`` (or of a view of it)."""
        return any(_storage(n) in self.written for n in nodes)


def _storage(node) -> StorageWeakRef | None:
    """The storage of ``node``'s tensor value (views share it), or None."""
    val = analysis.example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def body_tables(checkpoint: fx.Node, outer: TableAnalysis) -> TableAnalysis:
    """The table analysis of ``checkpoint``'s body, given ``outer``, its caller's: the body's
    placeholders that receive table-only values or sources of the caller are its sources."""
    body = analysis.checkpoint_body(checkpoint)
    placeholders = body.graph.find_nodes(op="placeholder")
    sources = {p for p, arg in zip(placeholders, checkpoint.args[1:]) if arg in outer.table_only or arg in outer.sources}
    return TableAnalysis(body, sources)


def reads_whole_mask(cand: MaskCandidate) -> bool:
    """Whether attention reads received mask ``cand`` whole (not a corner: the boundaries of the
    whole mask fit only then)."""
    full, read = analysis.example_value(cand.input), analysis.example_value(cand.node)
    return all(_same_size(a, b) for a, b in zip(full.shape[-2:], read.shape[-2:]))


def received_table_sources(gm: fx.GraphModule, mask: fx.Node) -> set[fx.Node]:
    """Where the rotary tables of a graph that receives ``mask`` come from: its float inputs that
    need no gradient, other than the mask (the tables are inputs of such a graph)."""
    return {
        p for p in gm.graph.find_nodes(op="placeholder")
        if p is not mask and _float(p) and not analysis.example_value(p).requires_grad
    }


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and _canonical(a) == _canonical(b)
    return a == b


def _carries_tokens(node: fx.Node) -> bool:
    val = analysis.example_value(node)
    return isinstance(val, torch.Tensor) and (val.requires_grad or not val.is_floating_point())


def _float(node: fx.Node) -> bool:
    val = analysis.example_value(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _dominators(node: fx.Node, tables: TableAnalysis):
    """Hidden-dependent ancestors of ``node`` (nearest first) through which every path from the
    graph's token/parameter inputs to ``node`` passes."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    ancestors = [
        n for n in analysis.backward_slice(node)
        if n in tables.hidden and n is not node and isinstance(analysis.example_value(n), torch.Tensor)
    ]
    ancestors.sort(key=order.__getitem__, reverse=True)
    tried = 0
    for cand in ancestors:
        if tried >= _MAX_DOMINATOR_TRIES:
            return
        if _dominates(cand, node, tables):
            tried += 1
            yield cand


def _dominates(cand: fx.Node, node: fx.Node, tables: TableAnalysis) -> bool:
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen or cur is cand or cur in tables.table_only:
            continue
        seen.add(cur)
        if cur in tables.token_inputs:
            return False
        stack.extend(cur.all_input_nodes)
    return True


def _region_leaves(node: fx.Node, x: fx.Node | set[fx.Node], tables: TableAnalysis) -> tuple[list[fx.Node], list[fx.Node]]:
    """The table-only nodes feeding the region between ``x`` (one node or several) and ``node``,
    and the region."""
    stop = x if isinstance(x, set) else {x}
    leaves, region, stack, seen = [], [], [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen or cur in stop:
            continue
        seen.add(cur)
        if cur in tables.table_only:
            leaves.append(cur)
            continue
        region.append(cur)
        stack.extend(cur.all_input_nodes)
    return list(dict.fromkeys(leaves)), region


def paired_table(table: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """A (..., R/2) table of one angle per rotary pair as the (..., R) table of both members: the
    halves layout ``cat(t, t)``, the interleaved one each angle twice."""
    return table.repeat_interleave(2, dim=-1) if interleaved else torch.cat((table, table), dim=-1)


def _probe_rope(gm, node: fx.Node, x: fx.Node, leaves: list[fx.Node], others: Sequence[fx.Node] = ()):
    """(cos, sin, interleaved, paired) such that node == rope(x, cos, sin), or None; ``paired``:
    the tables hold one angle per pair (:func:`paired_table` makes them the op's). ``others`` are
    further inputs of the region (the key, when one op rotates query and key): ``node`` must not
    depend on them, which two draws of their values check."""
    if len(leaves) != 2 or not isinstance(analysis.example_value(x), torch.Tensor):
        return None
    for leaf in leaves:  # HF's unsqueeze_dim=1 layout: (B|1, 1, S, R)
        lv = analysis.example_value(leaf)
        if not isinstance(lv, torch.Tensor) or lv.dim() != 4 or analysis.hint(lv.shape[1]) != 1:
            return None
    fn = analysis.extract_function(gm, node, stop_at=[x, *others, *leaves])
    gen = torch.Generator().manual_seed(3)

    def draw(n: fx.Node) -> torch.Tensor:
        return torch.randn(analysis.hinted_shape(analysis.example_value(n)), generator=gen)

    x_probe, tables = draw(x), [draw(leaf) for leaf in leaves]
    chosen = {x: x_probe, leaves[0]: tables[0], leaves[1]: tables[1]}
    try:
        out = analysis.run_function(fn, chosen | {o: draw(o) for o in others})
        if others and not torch.equal(out, analysis.run_function(fn, chosen | {o: draw(o) for o in others})):
            return None
    except Exception:
        return None
    rtol = 1e-5 if out.dtype == torch.float32 else 2e-2
    for (ci, si), interleaved, paired in itertools.product(((0, 1), (1, 0)), (False, True), (False, True)):
        cos, sin = tables[ci], tables[si]
        if paired:
            cos, sin = paired_table(cos, interleaved), paired_table(sin, interleaved)
        if cos.shape[-1] > x_probe.shape[-1] or cos.shape[-1] % 2:
            continue
        try:  # apply_rotary is tokens-major: (..., S, H, D) with (..., S, R) tables
            expected = apply_rotary(x_probe.transpose(1, 2), cos[:, 0], sin[:, 0], interleaved).transpose(1, 2)
        except RuntimeError:
            continue
        if expected.shape == out.shape and torch.allclose(out.float(), expected, rtol=rtol, atol=rtol):
            return leaves[ci], leaves[si], interleaved, paired
    return None


def _probe_repeat(gm, node: fx.Node, x: fx.Node, n_rep: int) -> bool:
    fn = analysis.extract_function(gm, node, stop_at=[x])
    if any(i is not x and isinstance(analysis.example_value(i), torch.Tensor) for i in fn.inputs):
        return False
    probe = torch.randn(analysis.hinted_shape(analysis.example_value(x)), generator=torch.Generator().manual_seed(4))
    try:
        out = analysis.run_function(fn, {x: probe})
    except Exception:
        return False
    expected = probe.repeat_interleave(n_rep, dim=1)
    return out.shape == expected.shape and torch.equal(out, expected)


def _unrepeated(gm, node: fx.Node, tables: TableAnalysis, heads: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """The (B, Hkv, S, D) tensor that ``node`` repeats up to ``heads`` heads (``repeat_kv``), or
    ``node`` itself when it is not such a repeat (no GQA, or SDPA's ``enable_gqa``)."""
    val = analysis.example_value(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    node_heads = analysis.hint(val.shape[1])
    for dom in () if tables.written_in_place([node]) else _dominators(node, tables):
        val = analysis.example_value(dom)
        if val.dim() != 4:
            continue
        kv_heads = analysis.hint(val.shape[1])
        if not (0 < kv_heads < node_heads and node_heads % kv_heads == 0):
            continue
        _, region = _region_leaves(node, dom, tables)
        if not tables.written_in_place([dom, *region]) and _probe_repeat(gm, node, dom, node_heads // kv_heads):
            return dom, region
    if heads % node_heads == 0:
        return node, []
    return None


def match_attention(
    gm: fx.GraphModule, sdpa: fx.Node, tables: TableAnalysis, *, allow_unfused: bool = False
) -> AttentionMatch | str:
    """The proof that ``sdpa``, a node of ``gm``, attends over RoPE of q and k and (head-repeated)
    v, found by probing (see the module docstring) with ``tables``, ``gm``'s
    :class:`TableAnalysis`; else why not, a decline reason. Its mask is the caller's to prove.

    With ``allow_unfused``, q and k not proven RoPE of a projection are taken as the SDPA
    receives them (RoPE not fused, the reason in ``unfused``): only the shapes and the head
    repeat of k/v are proven then."""
    args = analysis.sdpa_arguments(sdpa)
    if args["dropout_p"] not in (0, 0.0):
        return "attention dropout is not supported by varlen_attention"
    q, k, v = args["query"], args["key"], args["value"]
    qv = analysis.example_value(q)
    if qv is None or qv.dim() != 4:
        return "query is not (batch, heads, seq, dim)"
    heads, head_dim = analysis.hint(qv.shape[1]), analysis.hint(qv.shape[3])
    scale = args["scale"] if args["scale"] is not None else head_dim**-0.5
    if not isinstance(scale, (int, float)):
        return "the attention scale is not a constant"

    rope_q = _find_rope(gm, q, tables)
    if rope_q is None and not allow_unfused:
        return _NO_ROPE_QUERY
    k_src = _unrepeated(gm, k, tables, heads)
    v_src = _unrepeated(gm, v, tables, heads)
    if k_src is None or v_src is None:
        return "could not prove key/value are a head repeat of projections"
    k_embed, region_k = k_src
    xv, region_v = v_src
    why = _shapes_mismatch(q, k_embed, xv)
    if why is not None:
        return why
    rope = _NO_ROPE_QUERY if rope_q is None else _rope_of_key(gm, rope_q, k_embed, xv, qv, tables)
    if isinstance(rope, str) and not allow_unfused:
        return rope
    if isinstance(rope, str):
        return AttentionMatch(
            sdpa=sdpa, xq=q, xk=k_embed, xv=xv, cos=None, sin=None, interleaved=False, fp32_tables=False,
            scale=float(scale), region=list(dict.fromkeys(region_k + region_v)), unfused=rope,
        )
    xk, cos, sin, interleaved, fp32_math, paired, region_rope = rope
    xq, region_q = rope_q[0], rope_q[4]
    return AttentionMatch(
        sdpa=sdpa, xq=xq, xk=xk, xv=xv, cos=cos, sin=sin, interleaved=interleaved, fp32_tables=fp32_math,
        scale=float(scale), region=list(dict.fromkeys(region_q + region_k + region_rope + region_v)),
        paired_tables=paired,
    )


_NO_ROPE_QUERY = "could not prove the query is RoPE of a projection"


def _rope_of_key(gm, rope_q, k_embed: fx.Node, xv: fx.Node, qv: torch.Tensor, tables: TableAnalysis):
    """(xk, cos, sin, interleaved, fp32_math, paired, region) when ``k_embed`` is RoPE of a
    projection by the query's tables (``rope_q``, :func:`_find_rope`'s), else why not."""
    xq, cos, sin, interleaved, _, fp32_math, paired = rope_q
    rope_k = _find_rope(gm, k_embed, tables)
    if rope_k is None:
        return "could not prove the key is RoPE of a projection"
    xk, cos_k, sin_k, interleaved_k, region_k, fp32_math_k, paired_k = rope_k
    if (cos_k, sin_k, interleaved_k, fp32_math_k, paired_k) != (cos, sin, interleaved, fp32_math, paired):
        return "query and key use different rotary tables"
    if not _dtype(xq) == _dtype(xk) == _dtype(xv):
        return f"query, key and value are {_dtype(xq)}, {_dtype(xk)}, {_dtype(xv)} before RoPE, not one dtype"
    for table in (cos, sin):
        tv = analysis.example_value(table)
        if tv.dim() != 4 or analysis.hint(tv.shape[1]) != 1 or analysis.hint(tv.shape[0]) not in (1, analysis.hint(qv.shape[0])):
            return f"rotary table {table.name} is {tuple(tv.shape)}, not (batch, 1, seq, rotary_dim)"
    return xk, cos, sin, interleaved, fp32_math, paired, region_k


def _shapes_mismatch(q: fx.Node, k: fx.Node, v: fx.Node) -> str | None:
    """Why (B, Hq, S, D) q, (B, Hkv, S, D) k and (B, Hkv, S, Dv) v, with Hkv dividing Hq, do not
    fit varlen_attention, or None when they do."""
    qv, kv, vv = (analysis.example_value(n) for n in (q, k, v))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (kv, vv)):
        return "key/value are not (batch, heads, seq, dim)"
    fits = (
        all(_same_size(a, b) for a, b in zip((*qv.shape[:1], *qv.shape[2:]), (*kv.shape[:1], *kv.shape[2:])))
        and all(_same_size(a, b) for a, b in zip(kv.shape[:3], vv.shape[:3]))
        and analysis.hint(kv.shape[1]) > 0 and analysis.hint(qv.shape[1]) % analysis.hint(kv.shape[1]) == 0
        and qv.dtype == kv.dtype == vv.dtype
    )
    if not fits:
        shapes = ", ".join(str(tuple(t.shape)) for t in (qv, kv, vv))
        dtypes = ", ".join(str(t.dtype) for t in (qv, kv, vv))
        return f"query, key and value are {shapes} ({dtypes}), not (B, Hq, S, D), (B, Hkv, S, D), (B, Hkv, S, Dv) of one dtype"
    return None


def _find_rope(gm, node: fx.Node, tables: TableAnalysis):
    """(x, cos, sin, interleaved, region, fp32_math, paired) with node == rope(x, cos, sin), x
    before any RoPE (``paired``: see :func:`_probe_rope`). ``fp32_math``: the rotation runs on an fp32 upcast of x and is rounded back to x's dtype
    once (Cohere), which the op reproduces when given fp32 tables."""
    for dom in _dominators(node, tables):
        leaves, region = _region_leaves(node, dom, tables)
        if tables.written_in_place([node, dom, *region]):
            continue
        found = _probe_rope(gm, node, dom, leaves)
        if found is not None:
            cos, sin, interleaved, paired = found
            source = dom.args[0] if _is_upcast(dom) else None
            if isinstance(source, fx.Node) and _dtype(source) == _dtype(node) != _dtype(dom):
                return source, cos, sin, interleaved, region + [dom], True, paired
            return dom, cos, sin, interleaved, region, False, paired
    return _find_rope_among_inputs(gm, node, tables)


def _find_rope_among_inputs(gm, node: fx.Node, tables: TableAnalysis):
    """RoPE computed by one op that rotates several tensors (a hub kernel rotating q and k in one
    call, ``q_embed, k_embed = rotary(q, k, cos, sin)``): ``node`` is RoPE of one of the op's
    inputs and does not depend on the others. The op is the nearest ancestor reading several
    token tensors; its region ends at all of them."""
    joint, steps = node, 0
    while steps < _MAX_DOMINATOR_TRIES:
        hidden = list(dict.fromkeys(a for a in joint.all_input_nodes if a in tables.hidden))
        if len(hidden) >= 2:
            break
        if len(hidden) != 1:
            return None
        joint, steps = hidden[0], steps + 1
    else:
        return None
    leaves, region = _region_leaves(node, set(hidden), tables)
    if tables.written_in_place([node, *hidden, *region]):
        return None
    for x in hidden:
        found = _probe_rope(gm, node, x, leaves, others=[o for o in hidden if o is not x])
        if found is not None:
            cos, sin, interleaved, paired = found
            return x, cos, sin, interleaved, region, False, paired
    return None


def _dtype(node: fx.Node):
    return analysis.example_value(node).dtype


def _is_upcast(node: fx.Node) -> bool:
    """``x.float()`` or ``x.to(torch.float32)``."""
    if node.op != "call_method":
        return False
    return node.target == "float" or (node.target == "to" and torch.float32 in (*node.args[1:], *node.kwargs.values()))

