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
   (:mod:`graphopt.passes.varlen_attention`'s op, RoPE fused);
3. scores the loss on the packed tokens: the targets the padded graph computes (HF's label shift
   included) are gathered at the same positions, so the mean over valid targets, or the sum over
   ``num_items_in_batch``, is the padded graph's (a graph without a loss is unpadded only under
   ``padded_outputs_unused=True``, the promise mask elision needs there too);
4. scatters back to (B, S) what the graph returns per position (the logits, the flat hidden
   states of the fused loss); padded positions hold zeros, unspecified as on the fast path.

Token-wise is proven by meaning, op by op: the pass tracks which dimension of every value is the
batch (``B``), the sequence (``S``) or both merged (``BS``), and accepts an op only when it acts
on each (b, s) position independently: elementwise ops and broadcasts that never meet an
untracked dimension of sequence length, linears and norms over feature dimensions, views that
keep the token dimensions whole, slices that keep them full. SDPA (causal, no mask) and the loss
are the only places positions meet; anything else that mixes positions is a decline that names
the op. The gather and scatter indices, the positions and the document boundaries are computed
on the host from the row lengths the guard already read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

import graphopt.ops.linear_cross_entropy  # noqa: F401 - registers torch.ops.graphopt.linear_cross_entropy
from graphopt import analysis, inspection
from graphopt.passes import PassContext, Variant
from graphopt.runtime import Adapter

# Elementwise (broadcasting) ops of Dynamo's torch-level IR. Casts and copies are elementwise too.
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.exp, torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.abs, torch.where, torch.clamp,
    torch.erf, torch.maximum, torch.minimum, torch.square, torch.reciprocal,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu,
    torch.nn.functional.dropout, torch._C._nn.gelu, torch.nn.functional.tanh, torch.nn.functional.sigmoid,
})
_ELEMENTWISE_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "sin", "cos",
    "abs", "clamp", "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "detach",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__neg__", "__pow__", "square", "reciprocal", "masked_fill",
})
_REDUCTION_METHODS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "norm"})
_REDUCTION_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std})
_NORM_FUNCTIONS = frozenset({torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.layer_norm})


# The packed length is the real-token count rounded up to this (a multiple of the usual kernel
# tile). It is marked dynamic, so the bucket only bounds alignment waste, not compiles.
BUCKET = 16


# Tag of the fused loss's logits output in the unpadded graph: already at padded positions, plus
# one extra row (the bucket's extra tokens) that the getitem reading it cuts off.
_PADDED_ROWS = "padded+1"


class Decline(Exception):
    """The graph cannot be unpadded; the message says why."""


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
        try:
            plan = _Builder.outer(gm, ctx, guard).build()
        except Decline as e:
            ctx.report.decline(self.name, str(e))
            return None
        ctx.adapt(PackTokens(plan.mask_input, plan.input_names))
        ctx.report.rewrite(self.name, "tokens", f"the decoder runs on the real tokens only ({', '.join(plan.rewritten)})")
        return plan.module


def _tag_size(tag: str | None, original, t_node: fx.Node):
    if tag == "B":
        return 1
    if tag in ("S", "BS"):
        return t_node
    return original


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
        self.tags: dict[fx.Node, tuple | list | None] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}  # what the new graph's get_attr nodes read
        self.sdpas: list[fx.Node] = []
        self.attention_calls = 0  # SDPA calls made varlen, in this graph and the bodies it calls
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
        self.tables = _PositionTables(self.gm, sources | position_inputs)
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
        self._run(sources)
        if not self.attention_calls:
            raise Decline("no attention runs on the tokens")
        names = tuple(n.name for n in (self.gather, self.positions, self.cu, self.scatter))
        return UnpadPlan(self._module(), self.mask_input, names, self.rewritten)

    def build_body(self, operand_tags: list, tables, mask: fx.Node) -> tuple[fx.GraphModule, list]:
        """The unpadded body of a checkpoint call whose operands have ``operand_tags``. The body
        takes three more operands: ``gather`` (for the packed length), ``cu_seqlens`` and the
        attention mask (for the padded sizes). Returns the body and its outputs' tags."""
        self.tables = tables
        self.mask_meta = analysis.example_value(mask)
        for node, tags in zip(self.placeholders, operand_tags):
            self.env[node] = self.graph.node_copy(node)
            self.tags[node] = tags
        self.gather = self._new_input("unpad_gather", torch.int64)
        self.cu = self._new_input("unpad_cu_seqlens", torch.int32)
        self.mask = self._new_input("unpad_attention_mask", None)
        self._sizes()
        self._run(set())
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
        from graphopt.passes.varlen_attention import _body_tables

        body = analysis.checkpoint_body(hop)
        inner = _Builder(body, self.ctx, self.B, self.S)
        new_body, out_tags = inner.build_body(
            [self._t(a) for a in hop.args[1:]], _body_tables(hop, self.tables), self.mask
        )
        name = f"{hop.args[0].target}_unpadded"
        self.attrs[name] = new_body
        attr = self.graph.get_attr(name)
        operands = [self._new(a) if isinstance(a, fx.Node) else a for a in hop.args[1:]]
        new = self.graph.call_function(hop.target, (attr, *operands, self.gather, self.cu, self.mask), dict(hop.kwargs))
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
        """Constant nodes holding ``arange(S)`` (HF's default positions), the first of each chain
        (what derives from one follows it): they become the packed positions. Proven by
        evaluating them, on the CPU."""
        deps = analysis.tensor_inputs(self.gm.graph)
        found: set[fx.Node] = set()
        derived: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if any(a in found or a in derived for a in node.all_input_nodes):
                derived.add(node)
                continue
            if node.op in ("placeholder", "output", "get_attr") or deps[node]:
                continue
            val = analysis.example_value(node)
            if not isinstance(val, torch.Tensor) or val.is_floating_point() or val.dtype == torch.bool:
                continue
            shape = _hints(val)
            if shape.count(self.S) != 1 or any(s != 1 for s in shape if s != self.S):
                continue
            try:
                value = analysis.run_function(analysis.extract_function(self.gm, node), {})
            except Exception:  # noqa: BLE001 - a constant that cannot be evaluated is not positions
                continue
            if torch.equal(value.reshape(-1).cpu(), torch.arange(self.S)):
                found.add(node)
        return found

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
        ) and self._t(node.args[0])[node.args[1]] == _PADDED_ROWS:
            item = self.graph.call_function(operator.getitem, (self.env[node.args[0]], node.args[1]))
            total = self.graph.call_function(operator.mul, (self.rows, self.width))
            self.env[node] = self.graph.call_method("narrow", (item, 0, 0, total))
            self.tags[node] = None  # a padded-layout value from here on, like the label path
            return
        tags, args, kwargs = self._rule(node)
        new = self.graph.create_node(node.op, node.target, fx.node.map_arg(args, self._new), fx.node.map_arg(kwargs, self._new), node.name)
        new.meta = dict(node.meta)
        self.env[node] = new
        self.tags[node] = tags

    def _padded_size(self, node: fx.Node) -> fx.Node:
        """A size query of a token tensor answers with the padded graph's size, so code that reads
        it (the label path, an ``arange``) computes what it computed before; shape arguments of
        token ops are rewritten by position instead (see :meth:`_view`)."""
        g = self.graph
        src = node.args[0]
        tags = self._t(src)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        padded = {"B": self.rows, "S": self.width}
        if "BS" in tags:
            padded["BS"] = g.call_function(operator.mul, (self.rows, self.width))

        def one(d: int) -> fx.Node:
            tag = tags[d % len(tags)]
            return padded[tag] if tag else g.call_method("size", (self._new(src), d))

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

    def _rule(self, node: fx.Node):
        """(output tags, args, kwargs) of ``node`` in the unpadded graph; raises Decline when the
        op may mix positions."""
        target, args, kwargs = node.target, node.args, node.kwargs
        method = target if node.op == "call_method" else None
        if method == "dim":
            return None, args, kwargs
        if method in ("new_empty", "new_zeros", "new_ones", "new_full"):
            # a new tensor of explicit sizes (the padded ones, see _padded_size): not a token value;
            # if it meets the tokens later, the broadcast rule sees its shape
            return None, args, kwargs
        if node.op == "call_function" and target is operator.getitem and isinstance(analysis.example_value(args[0]), torch.Tensor):
            return self._getitem(node), args, kwargs
        if node.op == "call_function" and target is operator.getitem:
            return self._tuple_item(node), args, kwargs
        if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or method in _ELEMENTWISE_METHODS:
            return self._broadcast(node, [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Node)]), args, kwargs
        if method in ("view", "reshape") or (node.op == "call_function" and target is torch.reshape):
            return self._view(node)
        if method == "expand":
            return self._expand(node)
        if method == "unflatten":
            tags = self._dims(node)
            d = node.args[1] % len(self._t(node.args[0]))
            sizes = tuple(_tag_size(t, s, self.t_node) for t, s in zip(tags[d : d + len(node.args[2])], node.args[2]))
            return tags, (node.args[0], node.args[1], sizes), node.kwargs
        if method in ("transpose", "permute", "unsqueeze", "squeeze", "flatten") or (
            node.op == "call_function" and target in (torch.transpose, torch.unsqueeze, torch.flatten, torch.permute)
        ):
            return self._dims(node), args, kwargs
        if method in _REDUCTION_METHODS or (node.op == "call_function" and target in _REDUCTION_FUNCTIONS):
            return self._reduction(node), args, kwargs
        if node.op == "call_function" and target in (torch._C._nn.linear, torch.nn.functional.linear):
            x = self._t(args[0])
            if any(self._t(a) for a in (*args[1:], *kwargs.values())):
                self._decline(node, "multiplies two token tensors")
            return x[:-1] + (None,), args, kwargs
        if node.op == "call_function" and target is torch.nn.functional.embedding:
            if self._t(args[1]):
                self._decline(node, "indexes a token tensor")
            return self._t(args[0]) + (None,), args, kwargs
        if node.op == "call_function" and target in _NORM_FUNCTIONS:
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            x = self._t(args[0])
            if any(x[-len(shape):]) or any(self._t(a) for a in (*args[2:], *kwargs.values())):
                self._decline(node, "normalizes over token dimensions")
            return x, args, kwargs
        if method in ("chunk", "split", "repeat_interleave") or (
            node.op == "call_function" and target in (torch.chunk, torch.split, torch.repeat_interleave)
        ):
            return self._along(node), args, kwargs
        if node.op == "call_function" and target in (torch.cat, torch.stack):
            return self._cat(node), args, kwargs
        if analysis.is_sdpa(node):
            return self._sdpa(node), args, kwargs
        if node.op == "call_function" and target is torch.nn.functional.cross_entropy:
            return self._cross_entropy(node)
        if node.op == "call_function" and target is torch.ops.graphopt.linear_cross_entropy.default:
            return self._fused_loss(node)
        self._decline(node, "is not known to act on each token independently" + _custom_op_hint(node))
        return None  # unreachable

    def _broadcast(self, node: fx.Node, inputs: list[fx.Node]) -> tuple:
        out = analysis.example_value(node)
        rank = out.dim() if isinstance(out, torch.Tensor) else 0
        result: list = [None] * rank
        for a in inputs:
            av = analysis.example_value(a)
            if not isinstance(av, torch.Tensor):
                continue
            at = self._t(a) or (None,) * av.dim()
            for k, (tag, size) in enumerate(zip(reversed(at), reversed(_hints(av)))):
                pos = rank - 1 - k
                if tag is not None:
                    if result[pos] not in (None, tag):
                        self._decline(node, "combines different token dimensions")
                    result[pos] = tag
        for a in inputs:  # an untracked operand of sequence length meets the tokens: mixing
            av = analysis.example_value(a)
            if not isinstance(av, torch.Tensor) or self._t(a):
                continue
            for k, size in enumerate(reversed(_hints(av))):
                if result[rank - 1 - k] is not None and size != 1:
                    self._decline(node, f"combines the tokens with {a.name}, a constant of their shape")
        named = [t for t in result if t is not None]
        if len(named) != len(set(named)):
            self._decline(node, "would carry one token dimension twice")
        return tuple(result)

    def _view(self, node: fx.Node):
        src = node.args[0]
        shape = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))) else node.args[1]
        if node.op == "call_function":  # torch.reshape(x, shape)
            shape = node.args[1]
        in_tags = self._t(src)
        in_shape = _hints(analysis.example_value(src))
        out_shape = _hints(analysis.example_value(node))
        out_tags = _view_tags(in_shape, in_tags, out_shape, self.B, self.S)
        if out_tags is None:
            self._decline(node, f"reshapes {tuple(in_shape)} to {tuple(out_shape)} across the token dimensions")
        new_shape = tuple(_tag_size(t, s, self.t_node) for t, s in zip(out_tags, shape))
        if node.op == "call_function":
            return out_tags, (src, new_shape), node.kwargs
        return out_tags, (src, *new_shape), node.kwargs

    def _expand(self, node: fx.Node):
        src = node.args[0]
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        in_tags = self._t(src)
        out_tags = (None,) * (len(sizes) - len(in_tags)) + tuple(in_tags)
        return out_tags, (src, *(_tag_size(t, s, self.t_node) for t, s in zip(out_tags, sizes))), node.kwargs

    def _dims(self, node: fx.Node) -> tuple:
        """transpose / permute / unsqueeze / squeeze / flatten / unflatten: move the tags along."""
        name = node.target if node.op == "call_method" else node.target.__name__
        x = list(self._t(node.args[0]))
        rest = node.args[1:]
        rank = len(x)
        if name == "transpose":
            a, b = (d % rank for d in rest[:2])
            x[a], x[b] = x[b], x[a]
            return tuple(x)
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return tuple(x[d % rank] for d in dims)
        if name == "unsqueeze":
            d = rest[0] % (rank + 1)
            return tuple(x[:d] + [None] + x[d:])
        if name == "squeeze":
            shape = _hints(analysis.example_value(node.args[0]))
            dims = [d % rank for d in (rest if rest else range(rank)) if isinstance(d, int)]
            if not rest:
                dims = [d for d in range(rank) if shape[d] == 1]
            return tuple(t for i, t in enumerate(x) if not (i in dims and shape[i] == 1))
        if name == "flatten":
            start = (rest[0] if rest else 0) % rank
            end = (rest[1] if len(rest) > 1 else -1) % rank
            group = x[start : end + 1]
            shape = _hints(analysis.example_value(node.args[0]))[start : end + 1]
            merged = _merge(group, shape)
            if merged is False:
                self._decline(node, "flattens token and feature dimensions together")
            return tuple(x[:start] + [merged] + x[end + 1 :])
        if name == "unflatten":
            d = rest[0] % rank
            n_new = len(rest[1])
            if x[d] is None:
                return tuple(x[:d] + [None] * n_new + x[d + 1 :])
            out_shape = _hints(analysis.example_value(node))[d : d + n_new]
            if x[d] != "BS" or out_shape != [self.B, self.S]:
                self._decline(node, "splits a token dimension")
            return tuple(x[:d] + ["B", "S"] + x[d + 1 :])
        self._decline(node, "moves dimensions in a way not tracked")
        return ()

    def _getitem(self, node: fx.Node) -> tuple:
        x = self._t(node.args[0])
        shape = _hints(analysis.example_value(node.args[0]))
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        out, dim = [], 0
        for item in index:
            if item is Ellipsis:
                for _ in range(len(shape) - n_real):
                    out.append(x[dim])
                    dim += 1
            elif item is None:
                out.append(None)
            elif isinstance(item, slice):
                if x[dim] is not None:
                    full = all(not isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)) and range(
                        *item.indices(shape[dim])
                    ) == range(shape[dim])
                    if not full:
                        self._decline(node, "slices a token dimension")
                out.append(x[dim])
                dim += 1
            elif isinstance(item, int) and not isinstance(item, bool):
                if x[dim] is not None:
                    self._decline(node, "indexes a token dimension")
                dim += 1
            else:
                self._decline(node, "indexes with a tensor or a symbolic value")
        out.extend(x[dim:])
        return tuple(out)

    def _tuple_item(self, node: fx.Node) -> tuple | None:
        owner, i = node.args
        tags = self.tags.get(owner)
        if isinstance(tags, list):
            return tags[i]
        self._decline(node, "takes an item of a token value")
        return None

    def _reduction(self, node: fx.Node) -> tuple:
        x = self._t(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            self._decline(node, "reduces over all positions")
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(x)
        dims = [d % rank for d in dims]
        if any(x[d] is not None for d in dims):
            self._decline(node, "reduces over a token dimension")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return tuple(None if (i in dims) else t for i, t in enumerate(x)) if keep else tuple(t for i, t in enumerate(x) if i not in dims)

    def _along(self, node: fx.Node):
        """chunk / split / repeat_interleave along a feature dimension: the tags stay."""
        x = self._t(node.args[0])
        name = node.target if node.op == "call_method" else node.target.__name__
        default = 0 if name in ("chunk", "split") else None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", default)
        if dim is None or x[dim % len(x)] is not None or any(self._t(a) for a in node.args[1:]):
            self._decline(node, "cuts or repeats along a token dimension")
        if name == "repeat_interleave":
            return x
        return [x] * len(analysis.example_value(node))

    def _cat(self, node: fx.Node) -> tuple:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        # torch.cat skips 1-D empty tensors (transformers' DynamicCache starts from one): a cat of
        # one real tensor and such empties is that tensor
        tensors = [t for t in node.args[0] if not _legacy_empty(t)] if node.target is torch.cat else node.args[0]
        if node.target is torch.cat and len(tensors) == 1:
            return tuple(self._t(tensors[0]))
        tags = [self._t(t) for t in tensors]
        if any(t != tags[0] for t in tags):
            self._decline(node, "joins token and non-token values")
        base = list(tags[0])
        rank = len(base)
        if node.target is torch.stack:
            d = dim % (rank + 1)
            return tuple(base[:d] + [None] + base[d:])
        if base[dim % rank] is not None:
            self._decline(node, "concatenates along a token dimension")
        return tuple(base)

    def _sdpa(self, node: fx.Node) -> tuple:
        args = analysis.sdpa_arguments(node)
        if args["attn_mask"] is not None or not args["is_causal"]:
            self._decline(node, "is not causal attention without a mask")
        for name in ("query", "key", "value"):
            if self._t(args[name]) != ("B", None, "S", None):
                self._decline(node, f"reads a {name} laid out as {self._t(args[name])}, not (batch, heads, seq, dim)")
        return ("B", None, "S", None)

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
        tags = [None, _PADDED_ROWS if returns_logits else None]
        positional = _LOSS_ARGUMENTS[: len(node.args)]
        return tags, tuple(arguments[name] for name in positional), {k: v for k, v in arguments.items() if k not in positional}

    # -- attention and outputs -------------------------------------------------------------------

    def _varlen(self) -> None:
        """Each SDPA on the tokens becomes per-row varlen attention with RoPE fused, proven on the
        padded graph exactly as the packed-sequence pass proves it."""
        from graphopt.passes.varlen_attention import AttentionMatch, VarlenAttention, _match

        for sdpa in self.sdpas:
            match = _match(self.gm, sdpa, self.tables)
            if isinstance(match, str):
                raise Decline(f"{sdpa.name}: {match}")
            mapped = AttentionMatch(
                sdpa=self.env[sdpa], xq=self.env[match.xq], xk=self.env[match.xk], xv=self.env[match.xv],
                cos=self.env[match.cos], sin=self.env[match.sin], interleaved=match.interleaved,
                fp32_tables=match.fp32_tables, scale=match.scale, region=[self.env[n] for n in match.region],
            )
            VarlenAttention()._rewrite(self.ctx, mapped, self.cu, report=False)
            self.attention_calls += 1
        if self.sdpas:
            self.rewritten.append("attention per row (varlen, RoPE fused)")

    def _output(self, node: fx.Node) -> None:
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
        total = g.call_function(operator.mul, (self.rows, self.width))
        rows = g.call_function(operator.add, (total, 1))
        buf = g.call_method("new_zeros", (flat, (rows, *rest)))
        filled = g.call_method("index_copy", (buf, 0, self.scatter, flat))
        out = g.call_method("narrow", (filled, 0, 0, total))
        if not merged:
            out = g.call_method("view", (out, self.rows, self.width, *rest))
        if order != list(range(len(order))):
            inverse = sorted(range(len(order)), key=order.__getitem__)
            out = g.call_method("permute", (out, *inverse))
        return out


# The fused loss op's arguments in schema order, to read a call's arguments by name.
_LOSS_ARGUMENTS = [a.name for a in torch.ops.graphopt.linear_cross_entropy.default._schema.arguments]


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


def _merge(group: list, shape: list[int]):
    """The tag of dims ``group`` (sizes ``shape``) flattened into one: None, 'BS', a single tag,
    or False when token and feature dims would mix."""
    tagged = [t for t in group if t is not None]
    if not tagged:
        return None
    others = [s for t, s in zip(group, shape) if t is None]
    if any(s != 1 for s in others):
        return False
    if tagged == ["B", "S"]:
        return "BS"
    if len(tagged) == 1:
        return tagged[0]
    return False


def _view_tags(in_shape: list[int], in_tags: tuple, out_shape: list[int], B: int, S: int) -> tuple | None:
    """Tags of a view's output, or None when the view mixes token and feature dimensions.

    Dimensions are grouped greedily by equal products; a group keeps its tag when it maps one
    dim to one dim, merges ('B', 'S') into 'BS' or splits 'BS' into ('B', 'S')."""
    out: list = []
    i = j = 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        # size-1 dims without a tag carry nothing
        if i < n and in_shape[i] == 1 and in_tags[i] is None and not (j < m and out_shape[j] == 1):
            i += 1
            continue
        if j < m and out_shape[j] == 1 and not (i < n and in_shape[i] == 1):
            out.append(None)
            j += 1
            continue
        if i >= n or j >= m:
            return None
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= n:
                    return None
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= m:
                    return None
                gj.append(j)
                pj *= out_shape[j]
        i += 1
        j += 1
        tags = [in_tags[k] for k in gi]
        if not any(tags):
            out.extend([None] * len(gj))
        elif len(gi) == 1 and len(gj) == 1:
            out.append(tags[0])
        elif tags == ["B", "S"] and len(gj) == 1:
            out.append("BS")
        elif tags == ["BS"] and [out_shape[k] for k in gj] == [B, S]:
            out.extend(["B", "S"])
        else:
            return None
    return tuple(out)


class _PositionTables:
    """RoPE-table analysis (see ``varlen_attention._TableAnalysis``) whose sources may be constant
    nodes (HF's default ``arange`` positions) as well as the position inputs: a node is table-only
    when it descends from a source and otherwise reads only float buffers that need no gradient."""

    def __init__(self, gm: fx.GraphModule, sources: set[fx.Node]):
        from graphopt.passes.varlen_attention import _carries_tokens

        deps = analysis.tensor_inputs(gm.graph)
        self.sources = sources
        self.table_only: set[fx.Node] = set(n for n in sources if n.op != "placeholder")
        self.hidden: set[fx.Node] = set()
        reach = set(sources)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if any(a in reach for a in node.all_input_nodes):
                reach.add(node)
            d = deps[node]
            ok = all(p in sources or (_is_float(p) and not analysis.example_value(p).requires_grad) for p in d)
            if ok and node in reach:
                self.table_only.add(node)
            elif d:
                self.hidden.add(node)
        self.token_inputs = {
            p for p in gm.graph.nodes if p.op == "placeholder" and p not in sources and _carries_tokens(p)
        }


def packing_indices(attention_mask: torch.Tensor, lengths: list[int], bucket: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """The unpadded graph's extra inputs for a right-padded ``attention_mask`` (B, S) whose rows
    hold ``lengths`` real tokens (read on the host with the guards), built on the host.
    Returns ``({"gather", "positions", "cu_seqlens", "scatter"}, N real tokens, T packed tokens)``,
    the tensors on the mask's device. T is N rounded up to ``bucket``, at most B * S; the T - N
    extra tokens gather padded positions (first ones first) and form one more document.
    """
    rows, width = attention_mask.shape
    lengths = torch.tensor(lengths, dtype=torch.int64)
    n_real = int(lengths.sum())
    packed = min(rows * width, -(-n_real // bucket) * bucket)
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
