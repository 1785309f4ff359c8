"""Padding-free training from padded batches: the decoder runs on the real tokens only.

Motivated by every padded SFT batch: after mask elision a right-padded batch no longer builds a
mask, but every linear, norm, MLP and attention still runs on the pad tokens. When the
right-padding guard holds, graphopt knows where the real tokens are: row ``b`` holds its
``L_b`` real tokens first. This pass builds a second version of the rewritten graph that

1. gathers the real tokens of every row into one packed row of ``T`` tokens at the graph's entry
   (every (B, S) token input: ``input_ids``, ``position_ids``, ``inputs_embeds``), each row one
   document; ``T`` is the real-token count rounded up to a bucket, the extra tokens form a
   document of their own whose targets are ignored;
2. runs every token-wise op on (1, T) instead of (B, S) (shape arguments are rewritten where they
   name the batch or sequence dimension), RoPE at each token's own position (0..L_b - 1, exactly
   the positions of the padded graph), and attention as per-document causal varlen attention
   (:mod:`graphopt.passes.varlen_attention`'s op, RoPE fused where it is proven); a sliding-window layer, which mask
   elision already runs as that op with each padded row one document, keeps its window and takes
   the packed boundaries; a chunked layer (rows cut into chunks) takes the packed rows cut into
   the same chunks;
3. scores the loss on the packed tokens: the targets the padded graph computes (HF's label shift
   included) are gathered at the same positions, so the mean over valid targets, or the sum over
   ``num_items_in_batch``, is the padded graph's (a graph without a loss is unpadded only under
   ``padded_outputs_unused=True``, the promise mask elision needs there too);
4. scatters back to (B, S) what the graph returns per position (the logits, the flat hidden
   states of the fused loss); padded positions hold zeros, unspecified as on the fast path.

Token-wise is proven by meaning, op by op: the pass tracks which dimension of every value is the
batch (``B``), the sequence (``S``) or both merged (``BS``), and accepts an op only when it acts
on each (b, s) position independently: elementwise ops and broadcasts that never meet an
untracked dimension of a token size, linears and norms over feature dimensions, views that
keep the token dimensions whole, slices that keep them full, a new buffer whose slices are filled
with token values by ``copy_`` (it takes their tags), a size-1 dimension expanded to the batch or
sequence size (copies of one value, so that token dimension). Mixture-of-experts dispatch is
tracked through its permutation: a router's ``topk`` over the experts, the picks flattened
(``BS*k``), sorted by expert (the sort's indices are *positions*, tagged :class:`IndexValues`, used
only to index), a grouped matmul whose offsets are the counts of the sorted keys
(:class:`GroupCounts`), the inverse permutation, and the picks summed; Llama 4's batched experts
repeat the tokens once per expert (``k*BS``) for ``bmm``. A router's auxiliary loss sums over the
tokens, but only values multiplied by the attention mask (*padding weights*, zero at padded
positions and at the bucket's extra tokens), which gives the same sum over both layouts; the mask
is gathered like a token input for it. SDPA (causal, no mask), the loss and those weighted sums
are the only places positions meet; anything else that mixes positions is a decline that names
the op (the ops accepted: ``_METHOD_RULES`` and ``_FUNCTION_RULES``; the tags of their outputs:
:mod:`graphopt.passes.dimension_tags`). The gather and scatter indices, the positions and the
document boundaries are computed on the host from the row lengths the guard already read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

import graphopt.ops.linear_cross_entropy  # noqa: F401 - registers torch.ops.graphopt.linear_cross_entropy
import graphopt.ops.varlen_attention  # noqa: F401 - registers torch.ops.graphopt.varlen_attention
from graphopt import analysis, inspection
from graphopt.passes import PassContext, Variant, dimension_tags
from graphopt.passes.varlen_attention import TableAnalysis, body_tables, match_attention, paired_table, rewrite_attention
from graphopt.runtime import Adapter

# Elementwise (broadcasting) ops of Dynamo's torch-level IR. Casts and copies are elementwise too.
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.exp, torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.abs, torch.where, torch.clamp,
    torch.erf, torch.maximum, torch.minimum, torch.square, torch.reciprocal, torch.floor, torch.log1p,
    operator.floordiv, torch.floor_divide, operator.invert, torch.logical_not, torch.ones_like, torch.zeros_like, torch.full_like, torch.polar,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu,
    torch.nn.functional.dropout, torch._C._nn.gelu, torch.nn.functional.tanh, torch.nn.functional.sigmoid,
})
_ELEMENTWISE_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "sin", "cos",
    "abs", "clamp", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__neg__", "__pow__", "square", "reciprocal", "masked_fill", "bool", "int", "long", "__invert__",
    "logical_not",
})
_REDUCTION_METHODS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "norm"})
_REDUCTION_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std})
_NORM_FUNCTIONS = frozenset({torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.layer_norm})


# The packed length is the real-token count rounded up to this (a multiple of the usual kernel
# tile). It is marked dynamic, so the bucket only bounds alignment waste, not compiles.
BUCKET = 16


class Decline(Exception):
    """The graph cannot be unpadded; the message says why."""


@dataclass(frozen=True)
class IndexValues:
    """Tags of a tensor whose *values* are positions along the token dimension tagged ``into``
    (a sort's permutation, ``perm // k``, the inverse permutation); its own dimensions are tagged
    ``dims``. Its values differ between the padded and the unpadded graph, so it may only index
    that dimension (:meth:`_Builder._positional`); ``permutation``: it holds each position once."""

    dims: tuple
    into: str
    permutation: bool


@dataclass(frozen=True)
class GroupCounts:
    """Tags of the per-expert counts (``histc``) or their running sum (``cumsum``) of the keys of
    the sort ``perm``: the group boundaries of the rows that sort ordered. Not a token value and
    not the same in both graphs, so it may only be the offsets of a grouped matmul of those rows."""

    perm: str
    experts: int
    cumulative: bool


_POSITIONAL = (IndexValues, GroupCounts)


@dataclass
class UnpadPlan:
    """What :class:`_Builder` built: the unpadded graph and what its calling convention needs.

    The module takes the graph's own inputs followed by ``gather`` (T,) int64 flat indices into
    (B*S) of the packed tokens, ``positions`` (T,) int64, ``cu_seqlens`` (B+2,) int32 and
    ``scatter`` (T,) int64 (``gather`` with the bucket's extra tokens sent to row B*S, a row the
    scatter drops); ``input_names`` are those four placeholders' names.
    """

    module: fx.GraphModule
    mask_input: int  # index of the attention_mask argument
    input_names: tuple[str, ...]
    rewritten: list[str] = field(default_factory=list)


class PackTokens(Adapter):
    """The calling convention of the unpadded graph: at each call, the packing indices of the
    right-padded batch (:func:`packing_indices`) are built on the host from the row lengths, read
    with the guards, and passed as the graph's four extra inputs. The packed length is marked
    dynamic, so batches of other real-token counts reuse the compilation."""

    def __init__(self, mask_input: int, input_names: tuple[str, ...], bucket: int = BUCKET):
        self.mask_input = mask_input
        self.input_names = input_names
        self.bucket = bucket

    def reads(self, args) -> torch.Tensor:
        """The real-token count of each row, on the device."""
        return (args[self.mask_input] != 0).sum(-1)

    def inputs(self, args, host: list[int] | None) -> tuple:
        mask = args[self.mask_input]
        extra, n_real, packed = packing_indices(mask, host, self.bucket)
        for name in ("gather", "positions", "scatter"):
            torch._dynamo.maybe_mark_dynamic(extra[name], 0)
        inspection.record_runtime("unpad")
        inspection.record_runtime("unpad_tokens_saved", mask.numel() - packed)
        inspection.record_runtime("unpad_bucket_waste", packed - n_real)
        return extra["gather"], extra["positions"], extra["cu_seqlens"], extra["scatter"]


class Unpad:
    name = "unpad"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule | None:
        """The unpadded version of ``gm`` when it can be built (it replaces ``gm`` in the fast
        version of the graph; the exact fallback runs the padded graph), else None."""
        if ctx.variant is not Variant.FAST or ctx.right_padding is None:
            return None  # only the fast graph is unpadded, and only a padded batch's
        guard = ctx.right_padding.guard
        if not ctx.right_padding.scores_targets and not ctx.options.padded_outputs_unused:
            return None  # no loss says which outputs matter (mask elision declined it too)
        from graphopt.passes.mask_elision import PublishMasks

        if ctx.adapters_of(PublishMasks):
            ctx.report.decline(self.name, "the graph returns its attention mask to later graphs; the padded layout is kept")
            return None
        # What nothing reads (a mask no layer uses: all of Gemma 3's layers slide, yet
        # transformers builds the full mask too) would be tracked, and declined, for nothing.
        # Writes into buffers stay (analysis.erase_unused).
        if analysis.erase_unused(gm.graph):
            gm.recompile()
        try:
            plan = _Builder.outer(gm, ctx, guard).build()
        except Decline as e:
            ctx.report.decline(self.name, str(e))
            return None
        ctx.adapt(PackTokens(plan.mask_input, plan.input_names))
        ctx.report.rewrite(self.name, "tokens", f"the decoder runs on the real tokens only ({', '.join(plan.rewritten)})")
        return plan.module


def prove_token_wise(gm: fx.GraphModule, ctx: PassContext, guard) -> str | None:
    """Why ``gm``, a graph mask elision rewrote behind the right-padding ``guard``, is not proven
    token-wise, or None when it is: each op acts on each position alone, attention is causal, and
    the only sums over the tokens are of padding weights (:meth:`_Builder._weighted_sum`). Then
    every value the graph returns that is not laid out per token is the same as with the mask,
    up to the order of additions. The proof builds the unpadded graph and drops it."""
    if analysis.erase_unused(gm.graph):
        gm.recompile()
    try:
        _Builder.outer(gm, ctx, guard).build()
    except Decline as e:
        return str(e)
    return None


def _hints(value: torch.Tensor) -> list[int]:
    return [analysis.hint(s) for s in value.shape]


class _Builder:
    """Builds the unpadded version of a graph (the outer graph, or a checkpoint body of it)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, batch: int, seq: int, *, mask_input: int | None = None, label_inputs=frozenset()):
        """``mask_input``: the attention mask's placeholder index in the outer graph; None builds
        a checkpoint body (:meth:`build_body`), whose packed values go back to its caller."""
        self.gm = gm
        self.ctx = ctx
        self.B, self.S = batch, seq
        self.is_body = mask_input is None
        self.mask_input = mask_input
        self.label_inputs = set(label_inputs)
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # The new graph's packing inputs and sizes (set by build / build_body, then _sizes).
        self.tables = None
        self.mask = self.gather = self.positions = self.cu = self.scatter = None
        self.t_node = self.rows = self.width = None
        self.mask_meta = None  # a body's view of the outer attention mask
        self.out_tags: list = []  # a body's output tags, for its caller
        self.tags: dict[fx.Node, tuple | list | IndexValues | GroupCounts | None] = {}
        self.sorts: dict[str, dict] = {}  # tag of a sorted dimension -> what its sort sorted
        # Token values that are exactly 0 at every position that is not a real token, in both
        # graphs: the attention mask, its casts and reshapes, and products with them. A sum over
        # the tokens of one is the same in both graphs (:meth:`_weighted_sum`).
        self.weights: set[fx.Node] = set()
        self.multiples: dict[int, fx.Node] = {}  # k -> the node of k times the packed length
        self.unscatter: tuple[fx.Node, fx.Node] | None = None  # see _unscatter
        self.env: dict[fx.Node, fx.Node] = {}
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}  # what the new graph's get_attr nodes read
        self.sdpas: list[fx.Node] = []
        self.attention_calls = 0  # SDPA calls made varlen, in this graph and the bodies it calls
        self.chunk_cu: dict[int, fx.Node] = {}  # chunk -> this graph's packed boundaries cut into chunks
        self.rewritten: list[str] = []

    @classmethod
    def outer(cls, gm: fx.GraphModule, ctx: PassContext, guard) -> _Builder:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        mask = analysis.example_value(placeholders[guard.input_indices[0]])
        if mask.dim() != 2:
            raise Decline("the attention mask is not (batch, seq)")
        batch, seq = _hints(mask)
        if batch < 2 or seq < 2:
            raise Decline(
                f"a ({batch}, {seq}) batch: a dimension of 1 cannot be told from a broadcast, "
                "so the token dimensions cannot be tracked"
            )
        label_inputs = {placeholders[i] for i in guard.input_indices[1:]}
        return cls(gm, ctx, batch, seq, mask_input=guard.input_indices[0], label_inputs=label_inputs)

    # -- entry -----------------------------------------------------------------------------------

    def build(self) -> UnpadPlan:
        """The unpadded outer graph: its inputs are the graph's own plus ``gather``,
        ``positions``, ``cu_seqlens`` and ``scatter`` (see :class:`UnpadPlan`)."""
        sources = self._position_sources()
        position_inputs = {p for p in self.placeholders if self._is_token_input(p) and not _is_float(p)}
        self.tables = TableAnalysis(self.gm, sources | position_inputs, by_edges=True)
        for node in self.placeholders:
            self.env[node] = self.graph.node_copy(node)
            self.tags[node] = None
        self.mask = self.env[self.placeholders[self.mask_input]]
        self.gather = self._new_input("unpad_gather", torch.int64)
        self.positions = self._new_input("unpad_positions", torch.int64)
        self.cu = self._new_input("unpad_cu_seqlens", torch.int32)
        self.scatter = self._new_input("unpad_scatter", torch.int64)
        self._sizes()
        for node in self.placeholders:
            if self._is_token_input(node):
                self.env[node] = self._gather_input(node)
                self.tags[node] = ("B", "S") + (None,) * (analysis.example_value(node).dim() - 2)
                self.rewritten.append(f"{node.name} gathered")
        mask_input = self.placeholders[self.mask_input]
        if mask_input.users:  # read by the graph (a router's auxiliary loss): a padding weight
            self.env[mask_input] = self._gather_input(mask_input)
            self.tags[mask_input] = ("B", "S")
            self.weights.add(mask_input)
        self._run(sources)
        if not self.attention_calls:
            raise Decline("no attention runs on the tokens")
        names = tuple(n.name for n in (self.gather, self.positions, self.cu, self.scatter))
        return UnpadPlan(self._module(), self.mask_input, names, self.rewritten)

    def build_body(self, operand_tags: list, tables, mask: fx.Node) -> tuple[fx.GraphModule, list]:
        """The unpadded body of a checkpoint call whose operands have ``operand_tags``. The body
        takes four more operands: ``gather`` (for the packed length), ``positions`` (for its own
        ``arange(S)`` constants, as the outer graph's), ``cu_seqlens`` and the attention mask (for
        the padded sizes). Returns the body and its outputs' tags."""
        self.tables = tables
        self.mask_meta = analysis.example_value(mask)
        for node, tags in zip(self.placeholders, operand_tags):
            self.env[node] = self.graph.node_copy(node)
            self.tags[node] = tags
        self.gather = self._new_input("unpad_gather", torch.int64)
        self.positions = self._new_input("unpad_positions", torch.int64)
        self.cu = self._new_input("unpad_cu_seqlens", torch.int32)
        self.mask = self._new_input("unpad_attention_mask", None)
        self._sizes()
        self._run(self._position_sources())
        return self._module(), self.out_tags

    def _sizes(self) -> None:
        self.t_node = self.graph.call_method("size", (self.gather, 0))
        self.rows = self.graph.call_method("size", (self.mask, 0))
        self.width = self.graph.call_method("size", (self.mask, 1))

    def _run(self, sources: set[fx.Node]) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                self._output(node)
            elif node in sources:
                self.env[node] = self._positions_like(node)
                self.tags[node] = self._sequence_tags(node)
                self.rewritten.append("positions per row")
            elif node.op == "get_attr":
                self.env[node] = self.graph.node_copy(node)
                self.attrs[node.target] = getattr(self.gm, node.target)
                self.tags[node] = None
            elif analysis.is_checkpoint(node) and any(self._t(a) for a in node.args[1:]):
                self._checkpoint(node)
            else:
                self._copy(node)
                if analysis.is_sdpa(node) and self.tags.get(node):
                    self.sdpas.append(node)
        self._varlen()

    def _module(self) -> fx.GraphModule:
        for node in self.graph.find_nodes(op="get_attr"):  # bodies replaced by unpadded ones
            if not node.users:
                self.graph.erase_node(node)
        used = {n.target for n in self.graph.find_nodes(op="get_attr")}
        module = fx.GraphModule({k: v for k, v in self.attrs.items() if k in used}, self.graph)
        self.graph.lint()
        module.recompile()
        return module

    def _checkpoint(self, hop: fx.Node) -> None:
        """A checkpointed layer: its body is unpadded too, and gets the packing operands."""
        if any(isinstance(self._t(a), _POSITIONAL) or self._sorted(self._t(a)) for a in hop.args[1:]):
            self._decline(hop, "passes token positions, counts or sorted rows into a checkpointed body")
        body = analysis.checkpoint_body(hop)
        inner = _Builder(body, self.ctx, self.B, self.S)
        new_body, out_tags = inner.build_body(
            [self._t(a) for a in hop.args[1:]], body_tables(hop, self.tables), self.mask
        )
        name = f"{hop.args[0].target}_unpadded"
        self.attrs[name] = new_body
        attr = self.graph.get_attr(name)
        operands = [self._new(a) if isinstance(a, fx.Node) else a for a in hop.args[1:]]
        new = self.graph.call_function(hop.target, (attr, *operands, self.gather, self.positions, self.cu, self.mask), dict(hop.kwargs))
        new.meta = dict(hop.meta)
        self.env[hop] = new
        self.tags[hop] = out_tags
        self.attention_calls += inner.attention_calls
        self.rewritten.extend(r for r in inner.rewritten if r not in self.rewritten)

    # -- inputs ----------------------------------------------------------------------------------

    def _new_input(self, name: str, dtype) -> fx.Node:
        """A placeholder after the graph's own (so the arguments are theirs + these), with a
        padded-shape example value like the other nodes' (passes read example values)."""
        node = self.graph.placeholder(name)
        mask = self.mask_meta if self.is_body else analysis.example_value(self.placeholders[self.mask_input])
        if dtype is None:
            node.meta["example_value"] = mask
            return node
        fake = getattr(mask, "fake_mode", None)
        if fake is not None:
            with fake:
                node.meta["example_value"] = torch.empty(self.B * self.S, dtype=dtype, device=mask.device)
        return node

    def _is_token_input(self, node: fx.Node) -> bool:
        val = analysis.example_value(node)
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return False
        if node is self.placeholders[self.mask_input] or node in self.label_inputs:
            return False
        return _hints(val)[:2] == [self.B, self.S]

    def _gather_input(self, node: fx.Node) -> fx.Node:
        g = self.graph
        flat = g.call_method("flatten", (self.env[node], 0, 1))
        picked = g.call_method("index_select", (flat, 0, self.gather))
        return g.call_method("unsqueeze", (picked, 0))

    def _position_sources(self) -> set[fx.Node]:
        """Constant nodes holding ``arange(S)`` (HF's default positions), the first of each chain:
        they become the packed positions (:func:`graphopt.analysis.arange_constants`)."""
        return analysis.arange_constants(self.gm, self.S)

    def _positions_like(self, node: fx.Node) -> fx.Node:
        shape = _hints(analysis.example_value(node))
        dtype = analysis.example_value(node).dtype
        sizes = [self.t_node if s == self.S else 1 for s in shape]
        pos = self.graph.call_method("to", (self.positions, dtype))
        return self.graph.call_method("view", (pos, *sizes))

    def _sequence_tags(self, node: fx.Node) -> tuple:
        return tuple("S" if s == self.S else None for s in _hints(analysis.example_value(node)))

    # -- ops -------------------------------------------------------------------------------------

    def _copy(self, node: fx.Node) -> None:
        tagged = [a for a in node.all_input_nodes if self.tags.get(a)]
        if not tagged:  # parameters, constants, the label path: unchanged
            self.env[node] = self.graph.node_copy(node, lambda x: self.env[x])
            self.tags[node] = None
            return
        if _is_size_query(node):
            self.env[node] = self._padded_size(node)
            self.tags[node] = None
            return
        if node.op == "call_function" and node.target is operator.getitem and self._t(node.args[0]) and isinstance(
            self._t(node.args[0]), list
        ) and self._t(node.args[0])[node.args[1]] == dimension_tags.PADDED_ROWS:
            item = self.graph.call_function(operator.getitem, (self.env[node.args[0]], node.args[1]))
            total = self.graph.call_function(operator.mul, (self.rows, self.width))
            self.env[node] = self.graph.call_method("narrow", (item, 0, 0, total))
            self.tags[node] = None  # a padded-layout value from here on, like the label path
            return
        if any(isinstance(self.tags.get(a), _POSITIONAL) for a in node.all_input_nodes):
            tags, args, kwargs = self._positional(node)
        else:
            tags, args, kwargs = self._rule(node)
        new = self.graph.create_node(node.op, node.target, fx.node.map_arg(args, self._new), fx.node.map_arg(kwargs, self._new), node.name)
        new.meta = dict(node.meta)
        self.env[node] = new
        self.tags[node] = tags
        if isinstance(tags, tuple) and any(tags) and self._keeps_weight(node):
            self.weights.add(node)

    def _padded_size(self, node: fx.Node) -> fx.Node:
        """A size query of a token tensor answers with the padded graph's size, so code that reads
        it (the label path, an ``arange``) computes what it computed before; shape arguments of
        token ops are rewritten by position instead (see :meth:`_view`)."""
        g = self.graph
        src = node.args[0]
        tags = self._t(src)
        if isinstance(tags, GroupCounts):
            self._decline(node, "reads the size of counts of tokens per expert")
        tags = tags.dims if isinstance(tags, IndexValues) else tags
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")

        def one(d: int) -> fx.Node:
            tag = self._source(tags[d % len(tags)])
            if tag is None:
                return g.call_method("size", (self._new(src), d))
            if tag in ("B", "S"):
                return self.rows if tag == "B" else self.width
            total = g.call_function(operator.mul, (self.rows, self.width))
            k = dimension_tags.repeats(tag)
            return total if k == 1 else g.call_function(operator.mul, (total, k))

        if dim is None:
            return g.call_function(torch.Size, ([one(d) for d in range(len(tags))],))
        return one(dim)

    def _new(self, node: fx.Node) -> fx.Node:
        """``node``'s counterpart in the unpadded graph (nodes already there map to themselves)."""
        return node if node.graph is self.graph else self.env[node]

    def _t(self, node) -> tuple | None:
        return self.tags.get(node) if isinstance(node, fx.Node) else None

    def _decline(self, node: fx.Node, why: str):
        raise Decline(f"{node.name} ({analysis.describe(node)}) {why}")

    def _sorted(self, tags) -> bool:
        return isinstance(tags, tuple) and any(t in self.sorts for t in tags)

    def _source(self, tag):
        """The token dimension a sorted dimension reorders (itself for the others)."""
        return self.sorts[tag]["source"] if tag in self.sorts else tag

    def _size(self, tag, size):
        """A size argument of a dimension tagged ``tag`` in the unpadded graph
        (:func:`graphopt.passes.dimension_tags.tag_size`)."""
        return dimension_tags.tag_size(self._source(tag), size, self._packed)

    def _packed(self, k: int) -> fx.Node:
        """The packed length times ``k`` (one node per ``k``)."""
        if k == 1:
            return self.t_node
        if k not in self.multiples:
            self.multiples[k] = self.graph.call_function(operator.mul, (self.t_node, k))
        return self.multiples[k]

    def _rule(self, node: fx.Node):
        """(output tags, args, kwargs) of ``node`` in the unpadded graph, by its op's rule
        (:data:`_METHOD_RULES`, :data:`_FUNCTION_RULES`); raises Decline when the op may mix
        positions, or has no rule."""
        rule = _RULES.get(node.op, {}).get(node.target)
        if rule is None:
            self._decline(node, "is not known to act on each token independently" + _custom_op_hint(node))
        try:
            return rule(self, node)
        except dimension_tags.MixesPositions as e:
            why = str(e)
        self._decline(node, why)

    def _untracked(self, node: fx.Node):
        """``x.dim()``, ``x.new_zeros(sizes)``: not a token value (the sizes are the padded ones,
        see :meth:`_padded_size`); if it meets the tokens later, the broadcast rule sees its shape.
        A new buffer that token values are copied into is one (:meth:`_assembled`)."""
        assembled = self._assembled(node)
        if assembled is not None:
            return assembled
        return None, node.args, node.kwargs

    def _assembled(self, node: fx.Node):
        """``buf = x.new_empty(sizes)`` then ``buf[..., a:b].copy_(part)`` for parts that are token
        values (DeepSeek-V3's key: its nope and rope channels written into one buffer): ``buf``
        holds at each position what the parts hold there, so it is a token value with their tags,
        and its sizes are rewritten like a view's. Each write must cover whole token dimensions
        (slices and ``...`` only, cutting feature dimensions) with a part of the slice's own shape
        and tags; anything else declines. None when no token value is copied into ``buf``."""
        if node.op != "call_method" or node.target not in ("new_empty", "new_zeros", "new_ones"):
            return None
        shape = _hints(analysis.example_value(node))
        writes = []
        for view in node.users:
            if view.op != "call_function" or view.target is not operator.getitem or view.args[0] is not node:
                continue
            for write in view.users:
                if write.op == "call_method" and write.target == "copy_" and write.args[0] is view and self._t(write.args[1]):
                    writes.append((view, write))
        if not writes:
            return None
        tags = self._t(writes[0][1].args[1])
        for view, write in writes:
            index = view.args[1] if isinstance(view.args[1], tuple) else (view.args[1],)
            if not all(i is Ellipsis or isinstance(i, slice) for i in index):
                self._decline(write, "writes token values through an index that is not slices")
            if len(tags) != len(shape):
                self._decline(node, "is filled with token values of another rank")
            try:
                cut = dimension_tags.getitem_tags(tags, shape, index)
            except dimension_tags.MixesPositions as e:
                self._decline(write, f"writes token values into a buffer: {e}")
            src = write.args[1]
            if cut != self._t(src) or _hints(analysis.example_value(src)) != _hints(analysis.example_value(view)):
                self._decline(write, "writes token values laid out unlike the slice they fill")
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        new_sizes = tuple(self._size(t, s) for t, s in zip(tags, sizes))
        return tags, (node.args[0], *new_sizes), node.kwargs

    def _copy_into(self, node: fx.Node) -> tuple:
        """``dst.copy_(src)``: a write at each position of ``dst`` of ``src`` at the same position
        (or of a value broadcast along the token dimensions); ``dst`` must be a token value."""
        dst = self._t(node.args[0])
        if not dst:
            self._decline(node, "writes token values into a buffer that is not laid out per token")
        if self._elementwise(node) != dst:
            self._decline(node, "writes values of other positions")
        return dst

    def _item(self, node: fx.Node) -> tuple | None:
        """``x[index]`` of a tensor, or an item of a node returning several values."""
        if isinstance(analysis.example_value(node.args[0]), torch.Tensor):
            return self._getitem(node)
        return self._tuple_item(node)

    def _elementwise(self, node: fx.Node) -> tuple:
        """Elementwise ops, casts and copies: the operands' tags broadcast."""
        out = analysis.example_value(node)
        rank = out.dim() if isinstance(out, torch.Tensor) else 0
        operands = []
        for a in (*node.args, *node.kwargs.values()):
            av = analysis.example_value(a) if isinstance(a, fx.Node) else None
            if isinstance(av, torch.Tensor):
                operands.append((a.name, self._t(a), _hints(av)))
        return dimension_tags.broadcast_tags(operands, rank)

    def _view(self, node: fx.Node):
        src = node.args[0]
        shape = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))) else node.args[1]
        if node.op == "call_function":  # torch.reshape(x, shape)
            shape = node.args[1] if isinstance(node.args[1], (tuple, list)) else (node.args[1],)
        if len(shape) == 1 and isinstance(shape[0], fx.Node) and isinstance(analysis.example_value(shape[0]), (tuple, list)):
            shape = shape[0]  # x.view(y.size()): a torch.Size node
        in_tags = self._t(src)
        in_shape = _hints(analysis.example_value(src))
        out_shape = _hints(analysis.example_value(node))
        out_tags = dimension_tags.view_tags(in_shape, in_tags, out_shape, self.B, self.S)
        if out_tags is None:
            self._decline(node, f"reshapes {tuple(in_shape)} to {tuple(out_shape)} across the token dimensions")
        if isinstance(shape, fx.Node):  # x.view(y.size()): the sizes one by one, the padded ones rewritten
            shape = [self.graph.call_function(operator.getitem, (self._new(shape), i)) for i in range(len(out_tags))]
        new_shape = tuple(self._size(t, s) for t, s in zip(out_tags, shape))
        if node.op == "call_function":
            return out_tags, (src, new_shape), node.kwargs
        return out_tags, (src, *new_shape), node.kwargs

    def _expand(self, node: fx.Node):
        src = node.args[0]
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        out_tags = list(dimension_tags.expand_tags(self._t(src), len(sizes)))
        in_shape = [1] * (len(sizes) - len(self._t(src))) + _hints(analysis.example_value(src))
        for i, size in enumerate(sizes):
            # A broadcast dimension expanded to the size of a token dimension (``x.expand(q.size(0),
            # ...)``) becomes that token dimension: its values are the same at every position.
            if out_tags[i] is None and in_shape[i] == 1 and self._token_size_tag(size) is not None:
                out_tags[i] = self._token_size_tag(size)
        for i, size in enumerate(sizes):
            # Expanded to a literal batch or sequence size that the value lacks (Llama 4's query
            # temperature, (1, S, 1, 1) expanded to (B, S, 1, 1)): copies of one value, so the
            # dimension is that token dimension; the broadcast rule checks what meets it.
            for tag, n in (("B", self.B), ("S", self.S)):
                if out_tags[i] is None and in_shape[i] == 1 and size == n and tag not in out_tags and any(out_tags):
                    out_tags[i] = tag
        out_tags = tuple(out_tags)
        return out_tags, (src, *(self._size(t, s) for t, s in zip(out_tags, sizes))), node.kwargs

    def _token_size_tag(self, size) -> str | None:
        """The tag of the token dimension whose size the size query ``size`` reads, else None."""
        if not (isinstance(size, fx.Node) and _is_size_query(size)) or len(size.args) < 2:
            return None
        tags = self._t(size.args[0])
        dim = size.args[1]
        return tags[dim % len(tags)] if tags and isinstance(dim, int) else None

    def _unflatten(self, node: fx.Node):
        tags = self._dims(node)
        d = node.args[1] % len(self._t(node.args[0]))
        sizes = tuple(self._size(t, s) for t, s in zip(tags[d : d + len(node.args[2])], node.args[2]))
        return tags, (node.args[0], node.args[1], sizes), node.kwargs

    def _dims(self, node: fx.Node) -> tuple:
        """transpose / permute / unsqueeze / squeeze / flatten / unflatten / select: move the tags
        along (select drops its dim, which must not be a token dim)."""
        name = node.target if node.op == "call_method" else node.target.__name__
        if node.kwargs:  # dims given by keyword: read as positions they are not; decline
            self._decline(node, f"moves dimensions given by keyword ({', '.join(node.kwargs)}), which are not tracked")
            return ()
        x = list(self._t(node.args[0]))
        rest = node.args[1:]
        if name == "transpose":
            dim0, dim1 = rest[:2]
            return dimension_tags.transpose_tags(x, dim0, dim1)
        if name == "permute":
            return dimension_tags.permute_tags(x, rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        if name == "unsqueeze":
            return dimension_tags.unsqueeze_tags(x, rest[0])
        if name == "squeeze":
            return dimension_tags.squeeze_tags(x, _hints(analysis.example_value(node.args[0])), rest)
        if name == "flatten":
            start, end = (rest[0] if rest else 0), (rest[1] if len(rest) > 1 else -1)
            return dimension_tags.flatten_tags(x, _hints(analysis.example_value(node.args[0])), start, end)
        if name == "select":  # x.select(dim, i): x[:, ..., i] with the int at dim
            d = rest[0] % len(x)
            return dimension_tags.getitem_tags(x, _hints(analysis.example_value(node.args[0])), (slice(None),) * d + (rest[1],))
        if name == "unflatten":
            d = rest[0] % len(x)
            sizes = _hints(analysis.example_value(node))[d : d + len(rest[1])]
            return dimension_tags.unflatten_tags(x, d, sizes, self.B, self.S)
        self._decline(node, "moves dimensions in a way not tracked")
        return ()

    def _getitem(self, node: fx.Node) -> tuple:
        base, index = node.args
        lookup = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        if isinstance(lookup, fx.Node) and self._t(base) is None:
            # a table that is not a token value read at each token's integer values (an expert's
            # bias at the token's expert): one lookup per position, like an embedding
            at = analysis.example_value(lookup)
            if isinstance(at, torch.Tensor) and not at.is_floating_point() and at.dtype is not torch.bool:
                return tuple(self._t(lookup)) + (None,) * (analysis.example_value(base).dim() - 1)
        shape = _hints(analysis.example_value(base))
        return dimension_tags.getitem_tags(self._t(base), shape, index)

    def _tuple_item(self, node: fx.Node) -> tuple | None:
        owner, i = node.args
        tags = self.tags.get(owner)
        if isinstance(tags, list):
            return tags[i]
        self._decline(node, "takes an item of a token value")
        return None

    def _reduction(self, node: fx.Node) -> tuple | None:
        """A reduction over feature dimensions keeps the token tags; a sum over every token
        dimension of a padding weight is not a token value (:meth:`_weighted_sum`)."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        x = self._t(node.args[0])
        try:
            return dimension_tags.reduction_tags(x, dims, keep)
        except dimension_tags.MixesPositions as e:
            if not _is_sum(node):
                raise
            if not self._weighted_sum(node.args[0], dims):
                raise dimension_tags.MixesPositions(
                    f"{e} (only sums over all the tokens of values weighted by the attention mask, which is "
                    "zero at padded positions, are tracked)"
                ) from None
            return None

    def _weighted_sum(self, operand: fx.Node, dims) -> bool:
        """A sum over every token dimension of ``operand``, a padding weight (:attr:`weights`):
        ``sum(x * mask)`` over the padded batch is the sum of ``x`` over its real tokens, and over
        the packed tokens too (the bucket's extra tokens gathered padded positions, whose mask
        is 0). The same number in both graphs, up to the order of the additions, when ``x`` is
        finite at the positions the mask zeroes, as it is at every position that computes what a
        real token would. A router's auxiliary loss sums this way (transformers'
        ``load_balancing_loss_func`` with an attention mask)."""
        tags = self._t(operand)
        if operand not in self.weights or not tags:
            return False
        rank = len(tags)
        reduced = set(range(rank)) if dims is None else {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
        return all(t is None or i in reduced for i, t in enumerate(tags))

    def _keeps_weight(self, node: fx.Node) -> bool:
        """``node`` is a padding weight (:attr:`weights`) when it casts, reshapes or indexes one
        (the zeros stay at their positions, the tags moving with them), or multiplies by one."""
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
        first = node.args[0] if node.args else None
        if name in _WEIGHT_LAYOUT or node.target in (operator.getitem, torch.reshape, torch.unsqueeze, torch.flatten):
            return first in self.weights
        if node.target in (operator.mul, operator.imul, torch.mul) or name in ("mul", "__mul__", "__rmul__"):
            return any(a in self.weights for a in node.args if isinstance(a, fx.Node))
        return False

    def _scatter_add(self, node: fx.Node):
        """``counts.scatter_add_(0, index, src)`` into a 1-D buffer that is not a token value (a
        router's tokens per expert): a sum over the tokens, so ``src`` must be a padding weight
        laid out as ``index`` (:meth:`_weighted_sum`), and ``index`` a top-k's indices, in the
        buffer's range at every position, so a padded position adds its 0 in range."""
        base, dim, index, src = (tuple(node.args) + (None,) * 4)[:4]
        dim, index, src = (node.kwargs.get(k, v) for k, v in (("dim", dim), ("index", index), ("src", src)))
        buffer = analysis.example_value(base)
        if self._t(base) or buffer.dim() != 1 or dim not in (0, -1):
            self._decline(node, "adds token values into a buffer that is not a 1-D sum over the tokens")
        tags = self._t(index)
        if not tags or len(tags) != 1 or self._t(src) != tags or src not in self.weights:
            self._decline(
                node, "adds token values over the tokens without weighting them by the attention mask, "
                "or laid out unlike their indices",
            )
        experts = _top_k_range(index)
        if experts is None or experts > analysis.hint(buffer.shape[0]):
            self._decline(node, "adds into a buffer at indices not known to be in its range (a top-k's indices are)")
        return None

    def _linear(self, node: fx.Node) -> tuple:
        x = self._t(node.args[0])
        if any(self._t(a) for a in (*node.args[1:], *node.kwargs.values())):
            self._decline(node, "multiplies two token tensors")
        return x[:-1] + (None,)

    def _embedding(self, node: fx.Node) -> tuple:
        if self._t(node.args[1]):
            self._decline(node, "indexes a token tensor")
        return self._t(node.args[0]) + (None,)

    def _norm(self, node: fx.Node) -> tuple:
        args, kwargs = node.args, node.kwargs
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        x = self._t(args[0])
        if any(x[-len(shape):]) or any(self._t(a) for a in (*args[2:], *kwargs.values())):
            self._decline(node, "normalizes over token dimensions")
        return x

    def _along(self, node: fx.Node):
        """chunk / split / repeat_interleave along a feature dimension: the tags stay."""
        x = self._t(node.args[0])
        name = node.target if node.op == "call_method" else node.target.__name__
        default = 0 if name in ("chunk", "split") else None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", default)
        if name == "repeat_interleave" and dim is None and x == ("BS",) and isinstance(node.args[1], int) and set(node.kwargs) <= {"dim"}:
            return (f"BS*{node.args[1]}",)  # each token k times in a row, as a top-k's flattened picks
        if dim is None or x[dim % len(x)] is not None or any(self._t(a) for a in node.args[1:]):
            self._decline(node, "cuts or repeats along a token dimension")
        if name == "repeat_interleave":
            return x
        return [x] * len(analysis.example_value(node))

    def _complex_view(self, node: fx.Node) -> tuple:
        """``view_as_complex`` (the last dimension, of 2 reals, becomes one complex number) and
        ``view_as_real`` (back): the token dimensions stay where they are."""
        x = self._t(node.args[0])
        if node.target is torch.view_as_real:
            return x + (None,)
        if x[-1] is not None:
            self._decline(node, "pairs values along a token dimension")
        return x[:-1]

    def _paired_table(self, node: fx.Node):
        """A rotary table of one angle per pair doubled along its last (feature) dimension."""
        x = self._t(node.args[0])
        if x and x[-1] is not None:
            self._decline(node, "doubles a token dimension")
        return x

    def _cat(self, node: fx.Node) -> tuple:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if node.target is torch.stack:
            return dimension_tags.stack_tags([self._t(t) for t in node.args[0]], dim)
        # torch.cat skips 1-D empty tensors (transformers' DynamicCache starts from one): a cat of
        # one real tensor and such empties is that tensor
        tensors = [t for t in node.args[0] if not _legacy_empty(t)]
        return dimension_tags.cat_tags([self._t(t) for t in tensors], dim)

    def _sdpa(self, node: fx.Node) -> tuple:
        args = analysis.sdpa_arguments(node)
        if args["attn_mask"] is not None or not args["is_causal"]:
            self._decline(node, "is not causal attention without a mask")
        for name in ("query", "key", "value"):
            if self._t(args[name]) != ("B", None, "S", None):
                self._decline(node, f"reads a {name} laid out as {self._t(args[name])}, not (batch, heads, seq, dim)")
        return ("B", None, "S", None)

    def _row_attention(self, node: fx.Node):
        """``graphopt::varlen_attention`` with each padded row one document (mask elision's
        windowed rewrite, marked :data:`graphopt.analysis.ROWS_AS_DOCUMENTS` on its boundaries):
        the same attention over the packed tokens with the packed boundaries, each row's real
        tokens one document. The window, softcap and sinks stay; a real query of a right-padded
        row saw only real keys of its row, so its window holds the same keys either way. Rows cut
        into chunks (:data:`graphopt.analysis.ROW_CHUNKS`) take the packed rows cut into the same
        chunks (:meth:`_chunk_boundaries`)."""
        arguments = dict(zip(_VARLEN_ARGUMENTS, node.args)) | dict(node.kwargs)
        boundaries = arguments["cu_seqlens"]
        chunk = boundaries.meta.get(analysis.ROW_CHUNKS) if isinstance(boundaries, fx.Node) else None
        if not (isinstance(boundaries, fx.Node) and (boundaries.meta.get(analysis.ROWS_AS_DOCUMENTS) or chunk)):
            self._decline(node, "runs per-document attention over boundaries that are not one document per row")
        for name in ("q", "k", "v"):
            if self._t(arguments[name]) != ("BS", None, None):
                self._decline(node, f"reads a {name} laid out as {self._t(arguments[name])}, not (tokens, heads, dim)")
        if analysis.hint(analysis.example_value(arguments["cos"]).shape[-1]) == 0:  # RoPE not fused: (T, 0) tables
            q = self._new(arguments["q"])
            tokens = self.graph.call_method("size", (q, 0))
            arguments["cos"] = arguments["sin"] = self.graph.call_method("new_zeros", (q, (tokens, 0)))
        else:
            for name in ("cos", "sin"):
                if self._t(arguments[name]) != ("BS", None):
                    self._decline(node, f"reads a rotary table {name} laid out as {self._t(arguments[name])}, not (tokens, dim)")
        if self._t(arguments.get("sinks")):
            self._decline(node, "reads attention sinks that depend on token values")
        arguments["cu_seqlens"] = self.cu if chunk is None else self._chunk_boundaries(chunk)
        self.attention_calls += 1
        what = "windowed attention per row (varlen)" if chunk is None else f"attention in chunks of {chunk} per row (varlen)"
        if what not in self.rewritten:
            self.rewritten.append(what)
        positional = _VARLEN_ARGUMENTS[: len(node.args)]
        args = tuple(arguments[name] for name in positional)
        return ("BS", None, None), args, {k: v for k, v in arguments.items() if k not in positional}

    def _chunk_boundaries(self, chunk: int) -> fx.Node:
        """The packed rows cut into chunks of ``chunk`` tokens from each row's first token, the
        boundaries of a layer whose padded rows mask elision cut into chunks from index 0
        (:data:`graphopt.analysis.ROW_CHUNKS`): computed once per graph from the packed positions,
        which count from 0 in each row (and in the bucket's extra tokens), by the packed rule
        (:func:`graphopt.passes.varlen_attention.cu_seqlens_from_position_ids`). A real query of a
        right-padded row at index ``i`` saw the real keys of its row from ``chunk * (i // chunk)``
        to ``i``: the same keys as in its packed chunk."""
        from graphopt.passes.varlen_attention import cu_seqlens_from_position_ids

        if chunk not in self.chunk_cu:
            positions = self.graph.call_method("unsqueeze", (self.positions, 0))
            self.chunk_cu[chunk] = self.graph.call_function(cu_seqlens_from_position_ids, (positions, 1, chunk))
        return self.chunk_cu[chunk]

    def _gathered_targets(self, target: fx.Node) -> fx.Node:
        """The targets at the packed tokens: the padded graph's own targets, gathered. The extra
        tokens of the bucket gather padded positions, whose targets the guard proved ignored."""
        if self._t(target):
            raise Decline("the loss targets are computed from token values")
        tv = analysis.example_value(target)
        if _hints(tv) not in ([self.B * self.S], [self.B, self.S]):
            raise Decline(f"the loss targets are {tuple(_hints(tv))}, not one per token")
        flat = self.graph.call_method("reshape", (self.env[target], -1))
        return self.graph.call_method("index_select", (flat, 0, self.gather))

    def _cross_entropy(self, node: fx.Node):
        from graphopt.losses import ce_arguments

        ce = ce_arguments(node)
        if self._t(ce["input"]) != ("BS", None) or ce.get("weight") is not None:
            self._decline(node, "scores logits not laid out as (tokens, vocab)")
        target = ce["target"]
        gathered = self._gathered_targets(target)
        args, kwargs = tuple(node.args), dict(node.kwargs)
        if len(args) > 1:
            args = (args[0], gathered, *args[2:])
        else:
            kwargs["target"] = gathered
        self.rewritten.append("loss on packed targets")
        return None, args, kwargs

    def _fused_loss(self, node: fx.Node):
        """The fused loss on the packed tokens and their gathered targets. Logits it returns are
        written by the op straight to their padded rows (row B*S takes the bucket's extra tokens
        and is cut off), so no packed (T, V) copy is ever held next to the padded one."""
        arguments = dict(zip(_LOSS_ARGUMENTS, node.args)) | dict(node.kwargs)
        if self._t(arguments["hidden"]) != ("BS", None) or self._t(arguments["weight"]):
            self._decline(node, "reads hidden states not laid out as (tokens, hidden)")
        arguments["target"] = self._gathered_targets(arguments["target"])
        self.rewritten.append("fused loss on packed targets")
        returns_logits = arguments["logits"] != "none"
        if returns_logits:
            total = self.graph.call_function(operator.mul, (self.rows, self.width))
            arguments["logits_rows"] = self.scatter
            arguments["logits_len"] = self.graph.call_function(operator.add, (total, 1))
        tags = [None, dimension_tags.PADDED_ROWS if returns_logits else None]
        positional = _LOSS_ARGUMENTS[: len(node.args)]
        return tags, tuple(arguments[name] for name in positional), {k: v for k, v in arguments.items() if k not in positional}

    # -- mixture-of-experts dispatch -------------------------------------------------------------
    #
    # A router picks each token's experts with a top-k over its expert logits (a feature dim). The
    # grouped dispatch (transformers' grouped_mm experts) then flattens the (tokens, k) picks into
    # one dimension (``BS*k``), sorts it by expert, gathers the rows in that order, runs one grouped
    # matmul whose groups are the counts of the sorted keys, and undoes the sort with the inverse
    # permutation. Each step is a function of each (token, pick) alone once the permutation is
    # tracked as what it is: positions, not values. Llama 4's batched experts repeat the tokens
    # once per expert (``k*BS``) and multiply per expert with ``bmm``.

    def _topk(self, node: fx.Node):
        """``topk`` along a feature dimension (a router's experts): values and indices per token."""
        x = self._t(node.args[0])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        if not isinstance(dim, int) or x[dim % len(x)] is not None:
            self._decline(node, "takes a top-k along a token dimension")
        return [x, x]

    def _sort(self, node: fx.Node):
        """``sort`` within each token's features keeps the tags. A sort of a 1-D merged token
        dimension (experts picked per token, flattened) is a permutation of the tokens: its values
        are tagged by the sort, its indices are positions along the dimension sorted."""
        x = self._t(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
        if not isinstance(dim, int) or not isinstance(descending, bool):
            self._decline(node, "sorts along a dimension that is not a constant")
        if x[dim % len(x)] is None:
            return [x, x]
        if len(x) != 1 or self._source(x[0]) != x[0] or x[0] in ("B", "S"):
            self._decline(node, f"sorts along a token dimension of a value laid out as {x}")
        perm = f"sorted by {node.name}"
        self.sorts[perm] = dict(source=x[0], node=node, ascending=not descending, experts=_top_k_range(node.args[0]))
        return [(perm,), IndexValues((perm,), x[0], permutation=True)]

    def _within_tokens(self, node: fx.Node) -> tuple:
        """``softmax``, ``log_softmax``, ``cumsum`` along a feature dimension: within each token."""
        x = self._t(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int) or x[dim % len(x)] is not None:
            self._decline(node, "normalizes or accumulates along a token dimension")
        return x

    def _gather_features(self, node: fx.Node) -> tuple:
        """``x.gather(dim, index)`` along a feature dimension, the index laid out as ``x``."""
        src, dim, index = (node.args + (None, None))[:3]
        dim = node.kwargs.get("dim", dim)
        index = node.kwargs.get("index", index)
        x = self._t(src)
        if not isinstance(dim, int) or not x or x[dim % len(x)] is not None or self._t(index) != x:
            self._decline(node, "gathers along a token dimension, or with an index laid out unlike its source")
        return x

    def _scatter_features(self, node: fx.Node) -> tuple:
        """``x.scatter_(dim, index, src)`` along a feature dimension: ``x[t][index[t][j]] =
        src[t][j]`` at each token ``t``, so the index, and a tensor ``src``, are laid out as ``x``."""
        x = self._t(node.args[0])
        dim, index = node.args[1], node.args[2]
        src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src", node.kwargs.get("value"))
        if not isinstance(dim, int) or not x or x[dim % len(x)] is not None:
            self._decline(node, "scatters along a token dimension")
        if self._t(index) != x or (isinstance(src, fx.Node) and self._t(src) != x):
            self._decline(node, "scatters with an index or values laid out unlike its target")
        return x

    def _repeat(self, node: fx.Node) -> tuple:
        """``x.repeat(*reps)``: feature dims repeat freely; the merged tokens repeated ``k`` times
        as a whole (``x.repeat(k, 1)``, one run per expert) become ``k*BS``."""
        x = self._t(node.args[0])
        reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if not all(isinstance(r, int) for r in reps) or len(reps) < len(x):
            self._decline(node, "repeats by counts that are not constants")
        out = [None] * (len(reps) - len(x))
        for tag, r in zip(x, reps[len(reps) - len(x) :]):
            if r != 1 and tag is not None and tag != "BS":
                self._decline(node, f"repeats a token dimension tagged {tag}")
            out.append(f"{r}*BS" if r != 1 and tag == "BS" else tag)
        return tuple(out)

    def _bmm(self, node: fx.Node) -> tuple:
        """``bmm(x, w)`` with ``w`` not a token value: each row of ``x`` times its batch's matrix."""
        x = self._t(node.args[0])
        if self._t(node.args[1]) or x[0] is not None or x[2] is not None:
            self._decline(node, "multiplies over a token dimension, or by a token value")
        return (None, x[1], None)

    def _histc(self, node: fx.Node):
        """``histc`` of the keys of a sort of expert indices, one bin per expert: the number of
        rows of each expert, in the order the ascending sort put them."""
        values = node.args[0]
        names = ("bins", "min", "max")
        bins, low, high = (dict(zip(names, (100, 0, 0))) | dict(zip(names, node.args[1:])) | node.kwargs).values()
        tags = self._t(values)
        perm = tags[0] if tags and len(tags) == 1 else None
        if perm not in self.sorts or _through_casts(values) is not self._sort_output(perm, 0):
            self._decline(node, "counts values over the tokens (only the keys of an expert sort are tracked)")
        sort = self.sorts[perm]
        experts = sort["experts"]
        if not sort["ascending"] or experts is None or not _one_bin_per_expert(bins, low, high, experts):
            self._decline(
                node, f"counts sorted keys in bins that are not one per expert (keys in [0, {experts}), "
                f"bins={bins}, min={low}, max={high}, ascending sort: {sort['ascending']})",
            )
        return GroupCounts(perm, experts, cumulative=False), node.args, node.kwargs

    def _sort_output(self, perm: str, item: int) -> fx.Node | None:
        sort = self.sorts[perm]["node"]
        return next((u for u in sort.users if u.target is operator.getitem and u.args[1] == item), None)

    def _positional(self, node: fx.Node):
        """(tags, args, kwargs) of an op reading values that are token positions or counts
        (:class:`IndexValues`, :class:`GroupCounts`): only the dispatch's uses of them are
        tracked; anything else would compute with numbers that differ between the graphs."""
        target = node.target
        index = node.args[1] if target is operator.getitem and len(node.args) == 2 else None
        index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        if isinstance(self._t(index), IndexValues) and isinstance(analysis.example_value(node.args[0]), torch.Tensor):
            return self._rows_at(node)
        if target in (operator.floordiv, torch.floor_divide):
            return self._token_of_pick(node)
        if target is torch.empty_like:
            return self._inverse_buffer(node)
        if target is operator.setitem:
            return self._inverse_write(node)
        if target in (torch.cumsum, "cumsum"):
            return self._offsets(node)
        if _is_grouped_mm(target):
            return self._grouped_mm(node)
        kinds = {type(self.tags[a]).__name__ for a in node.all_input_nodes if isinstance(self.tags.get(a), _POSITIONAL)}
        self._decline(node, f"computes with token positions or counts ({', '.join(sorted(kinds))}) as values; only "
                      "indexing with them and grouping by them are tracked")

    def _rows_at(self, node: fx.Node):
        """``x[index]`` where ``index`` holds positions along ``x``'s first dimension: the rows
        at those positions, laid out as ``index``."""
        base, index = node.args
        index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        at = self._t(index)
        x = self._t(base)
        if not isinstance(at, IndexValues) or not isinstance(x, tuple) or not x or x[0] != at.into:
            self._decline(node, "indexes with token positions of another dimension than the one they index")
        return at.dims + tuple(x[1:]), node.args, node.kwargs

    def _token_of_pick(self, node: fx.Node):
        """``perm // k``: a position along ``BS*k`` (token t's k picks at t*k .. t*k+k-1) divided
        by k is its token's position along ``BS``."""
        at, k = self._t(node.args[0]), node.args[1]
        if not isinstance(at, IndexValues) or not isinstance(k, int) or at.into not in (f"BS*{k}", "BS" if k == 1 else None):
            self._decline(node, "divides token positions by a number that is not the picks per token")
        return IndexValues(at.dims, "BS", permutation=False), node.args, node.kwargs

    def _inverse_buffer(self, node: fx.Node):
        """``inv = empty_like(perm)`` then ``inv[perm] = arange(n)``: the inverse permutation, whose
        values are positions along the sorted dimension, laid out along the dimension sorted.
        Every other use of ``inv`` must index with it, after that write."""
        perm = node.args[0]
        at = self._t(perm)
        writes = [u for u in node.users if u.target is operator.setitem and u.args[0] is node]
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        if not (isinstance(at, IndexValues) and at.permutation and len(at.dims) == 1 and len(writes) == 1
                and writes[0].args[1] is perm and _is_arange_of(writes[0].args[2], analysis.example_value(perm))):
            self._decline(node, "is a buffer of token positions not filled as the inverse of a sort's permutation")
        for user in node.users:
            if user is not writes[0] and not (user.target is operator.getitem and user.args[1] is node and order[user] > order[writes[0]]):
                self._decline(user, "uses an inverse permutation other than to index with it once it is written")
        return IndexValues((at.into,), at.dims[0], permutation=True), node.args, node.kwargs

    def _inverse_write(self, node: fx.Node):
        """``inv[perm] = arange(n)``: ``n`` becomes the packed count (:meth:`_inverse_buffer`)."""
        if not isinstance(self._t(node.args[0]), IndexValues) or not isinstance(self._t(node.args[1]), IndexValues):
            self._decline(node, "writes token positions into a buffer")
        old = node.args[2]
        count = self.graph.call_method("size", (self._new(node.args[1]), 0))
        steps = self.graph.call_function(torch.arange, (count,), dict(old.kwargs))
        return None, (node.args[0], node.args[1], steps), node.kwargs

    def _offsets(self, node: fx.Node):
        """``cumsum`` of the counts per expert: the grouped matmul's group ends."""
        counts = self._t(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        out = analysis.example_value(node)
        if not isinstance(counts, GroupCounts) or counts.cumulative or dim not in (0, -1) or out.is_floating_point():
            self._decline(node, "accumulates counts of tokens other than into integer group offsets")
        return GroupCounts(counts.perm, counts.experts, cumulative=True), node.args, node.kwargs

    def _grouped_mm(self, node: fx.Node):
        """A grouped matmul of rows ordered by an ascending expert sort, whose offsets are the
        running counts of that sort's keys: row ``i`` is multiplied by the weight of its own
        expert (its sorted key), so each (token, pick) row is computed from itself alone."""
        x, weight = node.args[0], node.args[1]
        offs = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
        counts = self._t(offs)
        if not (isinstance(counts, GroupCounts) and counts.cumulative):
            self._decline(node, "groups rows by offsets that are not running counts of their sort's keys")
        if self._t(x) != (counts.perm, None):
            self._decline(node, f"multiplies rows laid out as {self._t(x)}, not in the order its offsets count")
        w = analysis.example_value(weight)
        if self._t(weight) or w.dim() != 3 or analysis.hint(w.shape[0]) != counts.experts or node.kwargs.get("bias") is not None:
            self._decline(node, "multiplies by weights that are not one matrix per expert")
        return (counts.perm, None), node.args, node.kwargs

    # -- attention and outputs -------------------------------------------------------------------

    def _varlen(self) -> None:
        """Each SDPA on the tokens becomes per-row varlen attention, RoPE fused where proven on the
        padded graph exactly as the packed-sequence pass proves it."""
        for sdpa in self.sdpas:
            match = match_attention(self.gm, sdpa, self.tables, allow_unfused=True)
            if isinstance(match, str):
                raise Decline(f"{sdpa.name}: {match}")
            rewrite_attention(self.ctx, match.mapped(lambda n: self.env[n]), self.cu, report=False)
            self.attention_calls += 1
        if self.sdpas:
            self.rewritten.append("attention per row (varlen)")

    def _output(self, node: fx.Node) -> None:
        for value in node.args[0]:
            if isinstance(self._t(value), _POSITIONAL) or self._sorted(self._t(value)):
                raise Decline(f"the graph returns {value.name}, token positions, counts or rows in an expert sort's order")
        if self.is_body:  # packed values go back to the caller
            values = node.args[0]
            self.out_tags = [self._t(v) for v in values]
            self.graph.output(fx.node.map_arg(values, self._new))
            return
        outs = []
        for value in node.args[0]:
            tags = self._t(value)
            if not tags:
                outs.append(fx.node.map_arg(value, lambda x: self.env[x]))
                continue
            outs.append(self._scatter(value, tags))
        self.graph.output(tuple(outs))

    def _unscatter(self) -> tuple[fx.Node, fx.Node]:
        """For each padded position (B*S of them): the packed token it holds (0 for a padded
        position) and whether it holds one. Built once per graph from ``scatter``, whose inverse it
        is. Outputs go back to their padded rows by this gather rather than by ``index_copy`` into
        zeros: torch 2.13's Inductor miscompiled the backward of that scatter beside a router's
        top-k backward (a read of a scatter's buffer fused before the scatter), and the gather's
        backward is an ``index_add`` into the packed rows instead."""
        if self.unscatter is None:
            g = self.graph
            total = g.call_function(operator.mul, (self.rows, self.width))
            slots = g.call_function(operator.add, (total, 1))
            device = analysis.example_value(self.placeholders[self.mask_input]).device
            none = g.call_method("new_full", (self.scatter, (slots,), -1))
            steps = g.call_function(torch.arange, (self.t_node,), {"dtype": torch.int64, "device": device})
            inverse = g.call_method("narrow", (g.call_method("index_copy", (none, 0, self.scatter, steps)), 0, 0, total))
            real = g.call_method("ge", (inverse, 0))
            self.unscatter = (g.call_method("clamp", (inverse,), {"min": 0}), real)
        return self.unscatter

    def _scatter(self, value: fx.Node, tags: tuple) -> fx.Node:
        """A per-position output back at its padded shape ((B, S) dims anywhere, or a merged
        (B*S) dim), with zeros at padded positions."""
        g = self.graph
        shape = _hints(analysis.example_value(value))
        new = self.env[value]
        if "BS" in tags and tags.count(None) == len(tags) - 1:
            order = [tags.index("BS")] + [i for i, t in enumerate(tags) if t is None]
            merged = True
        elif "B" in tags and "S" in tags and tags.count(None) == len(tags) - 2:
            order = [tags.index("B"), tags.index("S")] + [i for i, t in enumerate(tags) if t is None]
            merged = False
        else:
            raise Decline(f"the graph returns {value.name} with token dimensions laid out as {tags}")
        moved = new if order == list(range(len(order))) else g.call_method("permute", (new, *order))
        flat = moved if merged else g.call_method("flatten", (moved, 0, 1))
        rest = [shape[i] for i in order[1 if merged else 2 :]]
        at, real = self._unscatter()
        picked = g.call_method("index_select", (flat, 0, at))
        out = g.call_function(torch.where, (g.call_method("view", (real, -1, *([1] * len(rest)))), picked, 0))
        if not merged:
            out = g.call_method("view", (out, self.rows, self.width, *rest))
        if order != list(range(len(order))):
            inverse = sorted(range(len(order)), key=order.__getitem__)
            out = g.call_method("permute", (out, *inverse))
        return out


def _keeping_args(tags_of):
    """The rule of an op whose arguments stay as they are: ``tags_of`` gives its output tags."""

    def rule(builder: _Builder, node: fx.Node):
        return tags_of(builder, node), node.args, node.kwargs

    return rule


def _rule_table(*families) -> dict:
    """One rule per op, from (ops, rule) families; an op two families name takes the first one's."""
    table: dict = {}
    for ops, rule in families:
        for op in ops:
            table.setdefault(op, rule)
    return table


# The ops unpad accepts, and the rule that tags each one's output (see
# :mod:`graphopt.passes.dimension_tags`): call_method targets by name, call_function targets by
# object. A rule gives the op's (output tags, args, kwargs) in the unpadded graph, or declines when
# the op may mix positions. Never here (``_Builder._copy`` handles them first): ops that read no
# token value, size queries (answered with the padded sizes) and the item of the fused loss that
# holds the padded logits. An op without a rule is a decline that names it.
_METHOD_RULES = _rule_table(
    (("dim", "new_empty", "new_zeros", "new_ones", "new_full"), _Builder._untracked),
    (_ELEMENTWISE_METHODS, _keeping_args(_Builder._elementwise)),  # x.mul(y): the tags broadcast
    (("copy_",), _keeping_args(_Builder._copy_into)),  # into a token value, position by position
    (("view", "reshape"), _Builder._view),  # (B, S, H) -> (B, S, h, d): sizes of B / S rewritten
    (("expand",), _Builder._expand),
    (("unflatten",), _Builder._unflatten),
    (("transpose", "permute", "unsqueeze", "squeeze", "flatten", "select"), _keeping_args(_Builder._dims)),
    (_REDUCTION_METHODS, _keeping_args(_Builder._reduction)),  # over feature dims only
    (("chunk", "split", "repeat_interleave"), _keeping_args(_Builder._along)),  # along feature dims only
    (("add_", "sub_", "mul_", "div_"), _keeping_args(_Builder._copy_into)),  # in place, position by position
    (("topk",), _keeping_args(_Builder._topk)),  # a router's: along the experts
    (("sort",), _keeping_args(_Builder._sort)),  # of the flattened picks: a permutation, tracked
    (("softmax", "log_softmax"), _keeping_args(_Builder._within_tokens)),
    (("gather",), _keeping_args(_Builder._gather_features)),
    (("scatter_", "scatter"), _keeping_args(_Builder._scatter_features)),
    (("repeat",), _keeping_args(_Builder._repeat)),  # the tokens once per expert: k*BS
    (("bmm",), _keeping_args(_Builder._bmm)),
    (("cumsum",), _keeping_args(_Builder._within_tokens)),
    (("histc",), _Builder._histc),  # of an expert sort's keys: its groups (GroupCounts)
    (("scatter_add_", "scatter_add"), _keeping_args(_Builder._scatter_add)),  # weighted counts over the tokens
)
_FUNCTION_RULES = _rule_table(
    ((operator.getitem,), _keeping_args(_Builder._item)),
    (_ELEMENTWISE_FUNCTIONS, _keeping_args(_Builder._elementwise)),
    ((torch.reshape,), _Builder._view),
    ((torch.transpose, torch.unsqueeze, torch.flatten, torch.permute, torch.select), _keeping_args(_Builder._dims)),
    (_REDUCTION_FUNCTIONS, _keeping_args(_Builder._reduction)),
    ((torch._C._nn.linear, torch.nn.functional.linear), _keeping_args(_Builder._linear)),  # weights not token values
    ((torch.nn.functional.embedding,), _keeping_args(_Builder._embedding)),
    (_NORM_FUNCTIONS, _keeping_args(_Builder._norm)),  # over feature dims only
    ((torch.chunk, torch.split, torch.repeat_interleave), _keeping_args(_Builder._along)),
    ((torch.cat, torch.stack), _keeping_args(_Builder._cat)),
    (analysis.SDPA_TARGETS, _keeping_args(_Builder._sdpa)),  # causal, no mask: made varlen (_Builder._varlen)
    ((torch.nn.functional.cross_entropy,), _Builder._cross_entropy),  # on the gathered targets
    ((torch.ops.graphopt.linear_cross_entropy.default,), _Builder._fused_loss),  # on the gathered targets
    ((torch.ops.graphopt.varlen_attention.default,), _Builder._row_attention),  # windowed, one row one document
    ((paired_table,), _keeping_args(_Builder._paired_table)),  # gpt-oss's tables for the op
    ((torch.view_as_complex, torch.view_as_real), _keeping_args(_Builder._complex_view)),  # Llama 4's RoPE
    ((torch.topk,), _keeping_args(_Builder._topk)),
    ((torch.sort,), _keeping_args(_Builder._sort)),
    ((torch.softmax, torch.log_softmax, torch.nn.functional.softmax, torch.nn.functional.log_softmax), _keeping_args(_Builder._within_tokens)),
    ((torch.gather,), _keeping_args(_Builder._gather_features)),
    ((torch.scatter,), _keeping_args(_Builder._scatter_features)),
    ((torch.bmm,), _keeping_args(_Builder._bmm)),
    ((torch.cumsum,), _keeping_args(_Builder._within_tokens)),
    ((torch.histc,), _Builder._histc),
    ((torch.scatter_add,), _keeping_args(_Builder._scatter_add)),
)
_RULES = {"call_method": _METHOD_RULES, "call_function": _FUNCTION_RULES}


# The fused loss op's and the varlen attention op's arguments in schema order, to read a call's
# arguments by name.
_LOSS_ARGUMENTS = [a.name for a in torch.ops.graphopt.linear_cross_entropy.default._schema.arguments]
_VARLEN_ARGUMENTS = [a.name for a in torch.ops.graphopt.varlen_attention.default._schema.arguments]


def _custom_op_hint(node: fx.Node) -> str:
    """For an op of another library's namespace: where such ops come from, and the fix."""
    qualified = getattr(node.target, "_qualified_op_name", None) or getattr(node.target, "__qualname__", "")
    namespace = getattr(node.target, "namespace", None) or (qualified.split("::")[0] if "::" in qualified else None)
    if node.op != "call_function" or namespace in (None, "aten", "prims", "graphopt"):
        return ""
    return (
        f"; it is a custom op ({namespace}), as the hub kernels that transformers >= 5.25 installs "
        "through kernels' kernelize are: call model.reset_kernels() (or load with use_kernels=False) "
        "before compiling to run transformers' own torch code there"
    )


def _top_k_range(keys: fx.Node) -> int | None:
    """``n`` when ``keys`` are the indices of a ``topk`` over a dimension of size ``n`` (so every
    key is in [0, n)), reshaped or cast; else None."""
    node = _through_casts(keys)
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 1):
        return None
    topk = node.args[0]
    if topk.target not in (torch.topk, "topk"):
        return None
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    scores = analysis.example_value(topk.args[0])
    return analysis.hint(scores.shape[dim]) if isinstance(dim, int) else None


# Ops that keep a padding weight's zeros at their positions (:meth:`_Builder._keeps_weight`).
_WEIGHT_LAYOUT = frozenset({
    "to", "float", "double", "half", "bfloat16", "int", "long", "bool", "type_as", "contiguous", "clone", "detach",
    "view", "reshape", "unsqueeze", "flatten", "expand", "repeat_interleave", "squeeze", "transpose", "permute",
})


def _is_sum(node: fx.Node) -> bool:
    return node.target in ("sum", torch.sum)


_CASTS = frozenset({"view", "reshape", "flatten", "contiguous", "to", "float", "int", "long", "double"})


def _through_casts(node: fx.Node) -> fx.Node:
    """``node`` with reshapes and dtype casts (of integers, exact) walked back."""
    while (node.op == "call_method" and node.target in _CASTS) or (node.op == "call_function" and node.target in (torch.reshape, torch.flatten)):
        node = node.args[0]
    return node


def _one_bin_per_expert(bins, low, high, experts: int) -> bool:
    """``histc(keys, bins, low, high)`` counts each integer key in [0, experts) in its own bin,
    bin ``e`` for key ``e`` (checked by running it on every key, in float32 and float64). At most
    1024 experts: the bin of key ``e`` is ``floor(e * bins / (high - low))``, whose distance to the
    next integer (at least 1 / (experts - 1)) then stays far above float32's rounding there, in
    whatever order a device's kernel computes it."""
    if not all(isinstance(v, (int, float)) for v in (bins, low, high)) or bins != experts or not 2 <= experts <= 1024:
        return False
    if low >= high:  # histc then takes the data's own range
        return False
    keys = torch.arange(experts)
    return all(torch.equal(torch.histc(keys.to(dtype), bins, low, high), torch.ones(experts, dtype=dtype))
               for dtype in (torch.float32, torch.float64))


def _is_arange_of(node, perm: torch.Tensor) -> bool:
    """``node`` is ``arange(n)`` (integers 0 .. n-1), ``n`` the length of the 1-D ``perm``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange):
        return False
    args = list(node.args)
    if len(args) == 3 and args[2] == 1:
        args = args[:2]
    if len(args) == 2 and args[0] == 0:
        args = args[1:]
    n = args[0] if len(args) == 1 else None
    if isinstance(n, fx.Node):  # a size read from a value (symbolic, or traced from Python)
        n = analysis.example_value(n)
    value = analysis.example_value(node)
    dtype_ok = isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype is not torch.bool
    return n is not None and dtype_ok and perm.dim() == 1 and analysis.hint(n) == analysis.hint(perm.shape[0]) and set(node.kwargs) <= {"device", "dtype"}


def _is_grouped_mm(target) -> bool:
    """A grouped matmul of row groups given by running offsets: torch's, or transformers' own
    fallback op (same contract: rows ``offs[e-1]:offs[e]`` times ``weight[e]``)."""
    torch_ops = [getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]
    if target in [op for op in torch_ops if op is not None]:
        return True
    name = getattr(target, "_qualified_op_name", None) or (target.name() if isinstance(target, torch._ops.OpOverload) else None)
    return name == "transformers::grouped_mm_fallback"


def _legacy_empty(node) -> bool:
    val = analysis.example_value(node) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and analysis.hint(val.shape[0]) == 0


def _is_size_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target is torch.ops.aten.sym_size.int
    )


def _is_float(node: fx.Node) -> bool:
    val = analysis.example_value(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def packing_indices(attention_mask: torch.Tensor, lengths: list[int], bucket: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """The unpadded graph's extra inputs for a right-padded ``attention_mask`` (B, S) whose rows
    hold ``lengths`` real tokens (read on the host with the guards), built on the host.
    Returns ``({"gather", "positions", "cu_seqlens", "scatter"}, N real tokens, T packed tokens)``,
    the tensors on the mask's device. T is N rounded up to ``bucket`` (one bucket when N is 0), at most B * S; the T - N
    extra tokens gather padded positions (first ones first) and form one more document.
    """
    rows, width = attention_mask.shape
    lengths = torch.tensor(lengths, dtype=torch.int64)
    n_real = int(lengths.sum())
    packed = min(rows * width, max(1, -(-n_real // bucket)) * bucket)  # a batch of padding only: one bucket
    steps = torch.arange(width)
    real = (steps < lengths[:, None]).reshape(-1)
    flat = torch.arange(rows * width)
    extra = packed - n_real
    gather = torch.cat((flat[real], flat[~real][:extra]))
    positions = torch.cat((steps.expand(rows, width).reshape(-1)[real], torch.arange(extra)))
    cu = torch.zeros(rows + 2, dtype=torch.int32)
    cu[1 : rows + 1] = lengths.cumsum(0).to(torch.int32)
    cu[rows + 1] = packed
    scatter = torch.cat((flat[real], torch.full((extra,), rows * width)))
    device = attention_mask.device
    tensors = {"gather": gather, "positions": positions, "cu_seqlens": cu, "scatter": scatter}
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}, n_real, packed
