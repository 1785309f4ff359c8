"""Find the attention masks in a Dynamo graph and prove what they are.

transformers builds its masks differently in every release (vmap or broadcasting, bool or additive,
``sdpa_mask`` or ``eager_mask``). graphopt does not match those spellings. It looks for what every
spelling has in common:

1. **Where.** A *mask* is a 4-D ``(b, h, q, kv)`` tensor with ``q == kv`` whose value depends only on
   integer inputs of the graph (the 2-D ``attention_mask``, ``position_ids``) and index arithmetic,
   and that is consumed by attention: as ``attn_mask`` of SDPA, or added to attention scores that
   go into a softmax.
2. **What.** The mask's backward slice is lifted into its own function and evaluated on probe
   inputs chosen here. Its output is compared with reference definitions:

   - ``causal``: ``kv <= q`` (the mask depends on no input);
   - ``causal_padding``: ``kv <= q and attention_mask[b, kv] != 0``;
   - ``packed_causal``: ``kv <= q`` inside the same document, where documents are the maximal runs
     of ``position_ids`` that increase by one (what transformers derives for packed sequences);
   - each of them within a sliding window of W keys (``sliding_*``: ``q - W < kv``), or within
     chunks of C tokens (``chunked_*``, Llama 4's local layers: ``kv // C == q // C``, by index
     in a row, by position in a packed row; a padded one is proven on the rows the right-padding
     guard admits, where every spelling's chunks start at index 0).

   Bool masks must match exactly. Additive masks must be exactly 0 where the reference attends and
   one single value everywhere else.

   A mask the graph *receives* (a 4-D input, built by an earlier graph: see
   :mod:`graphopt.handoff`) is ``received`` when attention reads it exactly as received (its slice
   is the identity, or a leading-corner slice such as transformers' ``mask[..., :kv_len]``). What
   it holds is learnt at run time from the graph that built it. A mask the graph *returns* is
   ``exported`` (:attr:`MaskCandidate.exported`) and still classified.

When sizes are symbolic the slice is also evaluated at other sizes, and the proof covers sequence
lengths up to the largest size probed (``MaskCandidate.max_probed_len``). A mask that is causal at
length L is causal at every shorter length for every deviation masks are built from (a sliding
window or chunk of size W shows as soon as L > W). Longer lengths are proven when they first
arrive (:func:`prove_length`, from the runtime guard), at the next power of two, and remembered.
(So a window or chunk is learnt only when some probed length exceeds it; a graph proven causal
below the chunk fails the proof at a longer length and takes its exact masked path there.)
Anything else (bidirectional attention, masks of several inputs) is reported as ``unknown`` with
the reason.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from graphopt import analysis

SOFTMAX_TARGETS = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
# Sequence lengths at which a symbolic-size mask is also probed (besides its own size).
PROBE_LENGTHS = (1, 2, 5, 64, 300, 1024)


class MaskKind(str, enum.Enum):
    """What probing proved an attention mask to be. ``RECEIVED``: a mask that came from an earlier
    graph and that attention reads unchanged (its kind is what that graph published)."""

    CAUSAL = "causal"
    CAUSAL_PADDING = "causal_padding"
    PACKED_CAUSAL = "packed_causal"
    # The same within a sliding window: a query sees its last ``MaskCandidate.window`` keys,
    # itself included (``q - window < kv <= q``, transformers' ``sliding_window``).
    SLIDING_CAUSAL = "sliding_causal"
    SLIDING_CAUSAL_PADDING = "sliding_causal_padding"
    SLIDING_PACKED_CAUSAL = "sliding_packed_causal"
    # The same within chunks: a query sees the keys of its chunk of ``MaskCandidate.chunk``
    # tokens up to itself (``kv // chunk == q // chunk``, transformers' ``attention_chunk_size``).
    # Chunks count by index in a right-padded row and by position in a packed one.
    CHUNKED_CAUSAL = "chunked_causal"
    CHUNKED_CAUSAL_PADDING = "chunked_causal_padding"
    CHUNKED_PACKED_CAUSAL = "chunked_packed_causal"
    RECEIVED = "received"
    UNKNOWN = "unknown"

    @property
    def unwindowed(self) -> MaskKind:
        """The kind without its sliding window (itself for a kind without one)."""
        return _UNWINDOWED.get(self, self)

    @property
    def sliding(self) -> bool:
        """Whether masks of this kind have a sliding window (:attr:`MaskCandidate.window`)."""
        return self in _UNWINDOWED

    @property
    def windowed(self) -> MaskKind | None:
        """The sliding-window form of this kind (None: there is none)."""
        return _WINDOWED.get(self)

    @property
    def chunked(self) -> bool:
        """Whether masks of this kind attend within chunks (:attr:`MaskCandidate.chunk`)."""
        return self in _UNCHUNKED

    @property
    def in_chunks(self) -> MaskKind | None:
        """The chunked form of this kind (None: there is none)."""
        return _IN_CHUNKS.get(self)

    @property
    def base(self) -> MaskKind:
        """The kind without its window or chunks: causal, causal_padding or packed_causal (itself
        for the others)."""
        return _UNCHUNKED.get(self, self.unwindowed)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{kind}" is the value, as str(kind)


_UNWINDOWED = {
    MaskKind.SLIDING_CAUSAL: MaskKind.CAUSAL,
    MaskKind.SLIDING_CAUSAL_PADDING: MaskKind.CAUSAL_PADDING,
    MaskKind.SLIDING_PACKED_CAUSAL: MaskKind.PACKED_CAUSAL,
}
_UNCHUNKED = {
    MaskKind.CHUNKED_CAUSAL: MaskKind.CAUSAL,
    MaskKind.CHUNKED_CAUSAL_PADDING: MaskKind.CAUSAL_PADDING,
    MaskKind.CHUNKED_PACKED_CAUSAL: MaskKind.PACKED_CAUSAL,
}
_WINDOWED = {base: kind for kind, base in _UNWINDOWED.items()}
_IN_CHUNKS = {base: kind for kind, base in _UNCHUNKED.items()}


@dataclass
class MaskCandidate:
    """An attention mask found in the graph, and what probing proved it to be.

    Attributes:
        node: the mask value consumed by attention.
        kind: what probing proved (:class:`MaskKind`).
        sdpa_users: SDPA calls taking ``node`` as ``attn_mask``.
        additive_users: ``scores + node`` additions feeding a softmax (eager attention).
        checkpoints: for users inside an activation-checkpoint body, the checkpoint call of the
            outer graph that passes the mask into that body.
        seen_as: for those users, the body placeholder through which they read the mask.
        input: the placeholder the mask depends on (``attention_mask`` or ``position_ids``, or
            the received mask).
        exported: the graph returns the mask itself (for the graphs that receive it).
        masked_value: for additive masks, the value at masked positions.
        seq_len: the (hinted) query length; ``seq_symbols`` the symbols of the sizes that equal
            it (query and key lengths, the mask input's length) when shapes are dynamic.
        max_probed_len: the proof holds for sequence lengths up to this.
        window: for the ``sliding_*`` kinds, how many keys a query sees, itself included.
        chunk: for the ``chunked_*`` kinds, the chunk's length in tokens.
        reason: why ``kind`` is ``MaskKind.UNKNOWN``.
        function: the mask's slice as a function, kept to prove it at more lengths later.
    """

    node: fx.Node
    kind: MaskKind = MaskKind.UNKNOWN
    sdpa_users: list[fx.Node] = field(default_factory=list)
    additive_users: list[fx.Node] = field(default_factory=list)
    checkpoints: dict[fx.Node, fx.Node] = field(default_factory=dict)
    seen_as: dict[fx.Node, fx.Node] = field(default_factory=dict)
    input: fx.Node | None = None
    exported: bool = False
    masked_value: float | None = None
    seq_len: int = 0
    seq_symbols: frozenset = frozenset()
    max_probed_len: int = 0
    window: int | None = None
    chunk: int | None = None
    reason: str = ""
    function: analysis.ExtractedFunction | None = None

    @property
    def users(self) -> list[fx.Node]:
        return self.sdpa_users + self.additive_users

    @property
    def slice_nodes(self) -> list[fx.Node]:
        return analysis.backward_slice(self.node)


def _is_index_input(node: fx.Node) -> bool:
    val = analysis.example_value(node)
    return (
        isinstance(val, torch.Tensor)
        and not val.is_floating_point()
        and not val.is_complex()
        and not val.requires_grad
    )


def _is_received_mask(node: fx.Node) -> bool:
    """A 4-D bool or float input without gradient: possibly a mask built by an earlier graph."""
    val = analysis.example_value(node)
    return (
        node.op == "placeholder"
        and isinstance(val, torch.Tensor)
        and val.dim() == 4
        and (val.dtype == torch.bool or val.is_floating_point())
        and not val.requires_grad
    )


def _attention_mask_inputs(gm: fx.GraphModule, deps: dict) -> set[fx.Node]:
    """The placeholders that some SDPA call's ``attn_mask`` depends on, or that an operand of eager
    attention's ``scores + mask`` is a view of (a mask received as it is, or sliced), in ``gm`` or
    in the bodies of its activation checkpoints."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if analysis.is_sdpa(node):
            mask = analysis.sdpa_arguments(node)["attn_mask"]
            if isinstance(mask, fx.Node):
                found |= deps[mask]
        elif analysis.is_add(node) and _feeds_softmax_by_rows(node):
            found |= {p for p in map(_viewed_placeholder, node.args[:2]) if p is not None}
        elif analysis.is_checkpoint(node):
            body = analysis.checkpoint_body(node)
            inner = _attention_mask_inputs(body, analysis.tensor_inputs(body.graph))
            for placeholder, arg in zip(body.graph.find_nodes(op="placeholder"), node.args[1:]):
                if placeholder in inner and isinstance(arg, fx.Node):
                    found |= deps[arg]
    return found


_VIEW_METHODS = frozenset({"view", "reshape", "expand", "to", "contiguous", "unsqueeze", "float"})


def _viewed_placeholder(node) -> fx.Node | None:
    """The placeholder that ``node`` is, or is a slice, view or cast of (one tensor input per
    step), else None."""
    while isinstance(node, fx.Node) and node.op != "placeholder":
        viewing = (node.op == "call_function" and node.target is operator.getitem) or (
            node.op == "call_method" and node.target in _VIEW_METHODS
        )
        if not viewing or sum(isinstance(a, fx.Node) for a in node.args) != 1:
            return None
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in SOFTMAX_TARGETS) or (
        node.op == "call_method" and node.target == "softmax"
    )


def _along_keys(node: fx.Node, dim) -> bool:
    """Whether ``dim`` is the last dimension of ``node``'s (4-D) value: the keys of scores."""
    value = analysis.example_value(node)
    return isinstance(dim, int) and isinstance(value, torch.Tensor) and dim in (-1, value.dim() - 1)


def _dim_argument(node: fx.Node, position: int):
    return node.kwargs["dim"] if "dim" in node.kwargs else (node.args[position] if len(node.args) > position else None)


def _feeds_softmax_by_rows(add: fx.Node) -> bool:
    """Whether every use of ``scores + mask`` ends in a softmax over the keys, through ops that
    treat each query row on its own: concatenation along the keys (gpt-oss's sink logit),
    subtracting the row's max. Then the sum matters only at the query rows it is read at, and a
    mask equal to another at those rows can take its place."""
    chain, frontier, reached = {add}, [add], False
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in chain:
                continue
            if _is_softmax(user) and _along_keys(node, _dim_argument(user, 1)) and user.args[0] is node:
                reached = True
                continue
            if not _row_wise(user, chain):
                return False
            chain.add(user)
            frontier.append(user)
    return reached


def _row_wise(node: fx.Node, chain: set[fx.Node]) -> bool:
    """``node`` computes each query row of the scores from that row alone."""
    if node.op == "call_function" and node.target is torch.cat:
        return _along_keys(node, _dim_argument(node, 1))
    if node.op in ("call_function", "call_method") and node.target in (torch.max, torch.amax, "max", "amax"):
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return keepdim is True and _along_keys(node.args[0], _dim_argument(node, 1))
    if node.op == "call_function" and node.target is getattr and node.args[1] == "values":
        return True
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        return True  # max's values
    if node.op == "call_function" and node.target in (operator.sub, torch.sub) and len(node.args) == 2:
        x, m = node.args
        return x in chain and isinstance(m, fx.Node) and (m in chain or _is_row_max(m, chain))
    return False


def _is_row_max(node: fx.Node, chain: set[fx.Node]) -> bool:
    """``node`` is the max over the keys (kept as a dimension) of a value of ``chain``."""
    if node.op == "call_function" and (node.target is getattr and node.args[1] == "values" or node.target is operator.getitem and node.args[1] == 0):
        node = node.args[0]
    return _row_wise(node, chain) and node.target in (torch.max, torch.amax, "max", "amax") and node.args[0] in chain


def find_masks(gm: fx.GraphModule, memo: dict | None = None) -> list[MaskCandidate]:
    """Every attention mask in ``gm``, classified by probing. Users that are not attention make
    a candidate ``unknown`` (the mask is then left alone).

    ``memo`` (optional) maps a mask's slice, as code, to what probing found, so a copy of the same
    graph (the backend's exact-fallback graph) is not probed twice.
    """
    deps = analysis.tensor_inputs(gm.graph)
    received = {n for n in _attention_mask_inputs(gm, deps) if _is_received_mask(n)}
    index_only = {
        n
        for n in gm.graph.nodes
        if n.op not in ("placeholder", "output")
        and all(_is_index_input(d) or d in received for d in deps[n])
    }
    found = []
    for node in gm.graph.nodes:
        if node not in index_only and node not in received:
            continue
        val = analysis.example_value(node)
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            continue
        if not (val.dtype == torch.bool or val.is_floating_point()):
            continue
        outside = [u for u in node.users if u not in index_only]
        if not outside:
            continue
        cand = MaskCandidate(node)
        for user in outside:
            if user.op == "output":
                cand.exported = True
            elif analysis.is_checkpoint(user):
                for placeholder in analysis.checkpoint_uses(user, node):
                    for inner in placeholder.users:
                        if not _add_attention_user(cand, inner, placeholder):
                            cand.reason = f"inside {user.name}, the mask is used by {inner.name}, which is not attention"
                        cand.checkpoints[inner] = user
                        cand.seen_as[inner] = placeholder
            elif not _add_attention_user(cand, user, node):
                cand.reason = f"the mask is used by {user.name} ({analysis.describe(user)}), which is not attention"
        if not cand.users and not cand.exported and analysis.hint(val.shape[-1]) == 1:
            continue  # one value per query row, no key dimension (Llama 4's query temperature): no mask
        found.append(cand)
    frontier = {c.node for c in found}
    for cand in found:
        if not cand.reason:
            cand.reason = _escapes(cand.node, index_only, frontier)
        if not cand.reason:
            _classify_once(gm, cand, deps[cand.node], {} if memo is None else memo)
    return found


_CLASSIFICATION = ("kind", "input", "masked_value", "seq_len", "seq_symbols", "max_probed_len", "reason")


def _classify_once(gm: fx.GraphModule, cand: MaskCandidate, inputs, memo: dict) -> None:
    key = tuple((n.op, str(n.target), str(n.args), str(n.kwargs), n.name) for n in cand.slice_nodes)
    if key in memo:
        known = memo[key]
        for name in _CLASSIFICATION:
            value = known[name]
            if name == "input" and value is not None:
                value = next(n for n in gm.graph.nodes if n.name == value)
            setattr(cand, name, value)
        cand.function = analysis.extract_function(gm, cand.node)
        return
    _classify(gm, cand, inputs)
    memo[key] = {name: getattr(cand, name) for name in _CLASSIFICATION}
    memo[key]["input"] = None if cand.input is None else cand.input.name


def _add_attention_user(cand: MaskCandidate, user: fx.Node, mask: fx.Node) -> bool:
    """Record ``user`` as an attention use of ``mask`` (SDPA's attn_mask, or scores + mask into a
    softmax); False when it is another kind of use."""
    if analysis.is_sdpa(user) and analysis.sdpa_arguments(user)["attn_mask"] is mask:
        cand.sdpa_users.append(user)
    elif analysis.is_add(user) and _feeds_softmax_by_rows(user):
        cand.additive_users.append(user)
    else:
        return False
    return True


def _escapes(mask: fx.Node, index_only: set[fx.Node], frontier: set[fx.Node]) -> str:
    """Why the mask's value reaches something other than attention through index-only nodes
    (the graph output, or a consumer that is not another mask), or "" when it does not."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen or user in frontier:
                continue
            seen.add(user)
            if user.op == "output":
                if node is mask:  # the mask itself: exported
                    continue
                return f"{node.name}, derived from the mask, is a graph output"
            if user not in index_only:
                if node is not mask:
                    return f"{node.name}, derived from the mask, is used by {user.name} ({analysis.describe(user)})"
                continue
            stack.append(user)
    return ""


def _classify(gm: fx.GraphModule, cand: MaskCandidate, inputs: frozenset[fx.Node]) -> None:
    val = analysis.example_value(cand.node)
    q_len, kv_len = val.shape[-2], val.shape[-1]
    cand.seq_len = analysis.hint(q_len)
    if analysis.hint(kv_len) != cand.seq_len:
        cand.reason = f"query length {q_len} differs from key length {kv_len} (a cache or prefix?)"
        return
    if len(inputs) > 1:
        cand.reason = "the mask depends on several inputs: " + ", ".join(n.name for n in inputs)
        return
    fn = analysis.extract_function(gm, cand.node)
    cand.function = fn
    symbols = set()
    sizes = [q_len, kv_len]
    for inp in fn.inputs:
        ev = analysis.example_value(inp)
        sizes += [ev] if isinstance(ev, torch.SymInt) else list(getattr(ev, "shape", ())[1:])
    for size in sizes:
        if isinstance(size, torch.SymInt) and analysis.hint(size) == cand.seq_len:
            expr = _canonical(size)
            if expr.is_number:  # specialized to this length: nothing to vary
                continue
            if not isinstance(expr, sympy.Symbol):
                cand.reason = f"the sequence length is the expression {expr}, not a plain size"
                return
            symbols.add(expr)
    cand.seq_symbols = frozenset(symbols)
    input_node = next(iter(inputs), None)
    if input_node is not None and _is_received_mask(input_node):
        hypotheses = [MaskKind.RECEIVED]
    else:
        hypotheses = [MaskKind.CAUSAL] if input_node is None else [MaskKind.CAUSAL_PADDING, MaskKind.PACKED_CAUSAL]
    details = []
    for kind in hypotheses:
        ok, detail = _check(fn, cand, input_node, kind, _sizes(cand))
        if ok:
            cand.kind, cand.input = kind, input_node
            cand.max_probed_len = max(_sizes(cand))
            return
        details.append(detail)
    for kind in [k.windowed for k in hypotheses if k.windowed is not None]:
        window = _window_of(fn, cand, input_node, kind)
        if window is None:
            continue
        cand.window = window
        ok, detail = _check(fn, cand, input_node, kind, _sizes(cand))
        if ok:
            cand.kind, cand.input = kind, input_node
            cand.max_probed_len = max(_sizes(cand))
            return
        cand.window = None
        details.append(detail)
    for kind in [k.in_chunks for k in hypotheses if k.in_chunks is not None]:
        chunk = _chunk_of(fn, cand, input_node, kind)
        if chunk is None:
            continue
        cand.chunk = chunk
        ok, detail = _check(fn, cand, input_node, kind, _sizes(cand))
        if ok:
            cand.kind, cand.input = kind, input_node
            cand.max_probed_len = max(_sizes(cand))
            return
        cand.chunk = None
        details.append(detail)
    failures = [d for d in details if d.startswith("probing the mask failed")]
    if failures:  # nothing was learnt about what the mask is
        cand.reason = failures[0]
    elif hypotheses == [MaskKind.RECEIVED]:
        cand.reason = f"the mask received as {input_node.name} is changed before attention reads it: {details[0]}"
    elif input_node is None:
        cand.reason = f"the mask depends on no input and is not causal ({details[0]})"
    else:
        cand.reason = (
            f"the mask built from {input_node.name} is neither causal ∧ padding nor packed "
            f"block-causal, with or without a sliding window or chunks (bidirectional attention?): {'; '.join(details)}"
        )


def _window_of(fn, cand: MaskCandidate, input_node, kind: MaskKind) -> int | None:
    """The sliding window a mask would have if it were ``kind``: how many keys the last query of
    one full row (no padding, one document) sees, at the longest probed length; None when that
    row sees every key (no window shows at this length) or none."""
    seen = _full_row(fn, cand, input_node, kind)
    if seen is None:
        return None
    last = int(seen[-1].sum())
    return last if 0 < last < seen.shape[-1] else None


def _chunk_of(fn, cand: MaskCandidate, input_node, kind: MaskKind) -> int | None:
    """The chunk a mask would have if it were ``kind``: the first query after the first of one
    full row (no padding, one document) that sees only itself, at the longest probed length;
    None when there is none (no chunk shows at this length)."""
    seen = _full_row(fn, cand, input_node, kind)
    if seen is None:
        return None
    alone = (seen.sum(-1) == 1) & seen.diagonal()
    starts = alone[1:].nonzero().flatten()
    return int(starts[0]) + 1 if starts.numel() else None


def _full_row(fn, cand: MaskCandidate, input_node, kind: MaskKind) -> torch.Tensor | None:
    """(L, L) bool: which keys each query of one full row (no padding, positions 0..L-1) sees,
    by the mask's slice, at the longest probed length L; None when the slice cannot run or
    gives no 4-D (.., L, L) mask."""
    length = max(_sizes(cand))
    assignment = {sym: sympy.Integer(length) for sym in cand.seq_symbols}
    chosen: dict = {}
    for inp in fn.inputs:
        ev = analysis.example_value(inp)
        if isinstance(ev, torch.Tensor):
            shape = _shape_under(ev, assignment)
            if inp is input_node:
                row = torch.ones(shape[-1]) if kind.base == MaskKind.CAUSAL_PADDING else torch.arange(shape[-1])
                chosen[inp] = row.expand(shape).to(ev.dtype)
            else:
                chosen[inp] = torch.zeros(shape, dtype=ev.dtype)
        elif isinstance(ev, torch.SymInt):
            chosen[inp] = _size_under(ev, assignment)
    try:
        out = analysis.run_function(fn, chosen)
    except Exception:  # noqa: BLE001 - a slice that cannot run proves nothing (the caller's _check says why)
        return None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[-2:]) != (length, length):
        return None
    row = out[0, 0]
    return row if row.dtype == torch.bool else row == 0


def _sizes(cand: MaskCandidate) -> list[int]:
    """Lengths probed at compile time. Longer ones are proven when they arrive (prove_length)."""
    if not cand.seq_symbols:
        return [cand.seq_len]
    return sorted({cand.seq_len, *PROBE_LENGTHS, max(PROBE_LENGTHS) + 1})


def prove_length(cand: MaskCandidate, length: int) -> bool:
    """Prove a symbolic-size mask, already proven ``cand.kind``, at sequence length ``length``.

    Probes on the CPU, as at compile time; on success raises ``cand.max_probed_len``. Used by the
    runtime guard when a longer sequence than any proven arrives.
    """
    if not cand.seq_symbols or cand.function is None or cand.kind == MaskKind.UNKNOWN:
        return False
    ok, _ = _check(cand.function, cand, cand.input, cand.kind, [length])
    if ok:
        cand.max_probed_len = max(cand.max_probed_len, length)
    return ok


def _check(fn, cand: MaskCandidate, input_node, kind: MaskKind, lengths) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(0)
    masked_values: set[float] = set() if cand.masked_value is None else {cand.masked_value}
    for seq_len in lengths:
        assignment = {sym: sympy.Integer(seq_len) for sym in cand.seq_symbols}
        shapes = {inp: _shape_under(analysis.example_value(inp), assignment) for inp in fn.inputs
                  if isinstance(analysis.example_value(inp), torch.Tensor)}
        n_probes = 1 if input_node is None else _n_probes(kind, shapes[input_node][0])
        for probe in range(n_probes):
            chosen: dict = {}
            ref_input = None
            for inp in fn.inputs:
                ev = analysis.example_value(inp)
                if inp is input_node:
                    ref_input = chosen[inp] = _probe_value(kind, shapes[inp], ev.dtype, probe, gen)
                elif isinstance(ev, torch.Tensor):
                    chosen[inp] = torch.zeros(shapes[inp], dtype=ev.dtype)
                elif isinstance(ev, torch.SymInt):
                    chosen[inp] = _size_under(ev, assignment)
            try:
                out = analysis.run_function(fn, chosen)
                if kind == MaskKind.RECEIVED:
                    ok, detail = _compare_received(out, ref_input)
                else:
                    window, chunk = (cand.window if kind.sliding else None), (cand.chunk if kind.chunked else None)
                    ok, detail = _compare(out, kind, ref_input, seq_len, masked_values, window, chunk)
            except Exception as e:  # a slice that cannot run on the probe proves nothing
                return False, f"probing the mask failed: {type(e).__name__}: {e}"
            if not ok:
                return False, f"{kind} probe at length {seq_len}: {detail}"
    if len(masked_values) > 1:
        return False, f"additive mask uses several masked values {sorted(masked_values)}"
    cand.masked_value = next(iter(masked_values), None)
    return True, ""


def _size_under(value, assignment) -> int:
    if isinstance(value, torch.SymInt) and assignment:
        expr = _canonical(value).xreplace(assignment)
        if expr.free_symbols:  # other symbols (the batch size, say) keep their hints
            env = value.node.shape_env
            hints = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", {})
            expr = expr.xreplace(hints)
        return int(expr)
    return analysis.hint(value)


def _canonical(value: torch.SymInt) -> sympy.Expr:
    """The size's expression with the shape environment's known equalities applied (Dynamo may
    give equal sizes different symbols and record that they are equal)."""
    return value.node.shape_env.replace(value.node.expr)


def _shape_under(value: torch.Tensor, assignment) -> tuple[int, ...]:
    return tuple(_size_under(s, assignment) for s in value.shape)


# Row patterns of the probe inputs. Each probe mixes them across its rows (row r of probe p has
# pattern (p * batch + r) mod len), so a batch of 8 rows sees every pattern in one probe, and a
# second probe draws them again with other random lengths.
_PADDING_PATTERNS = ("right", "left", "holes", "full", "empty")
# A chunked padding mask is proven on the rows its rewrites run on (the right-padding guard admits
# no others). On left-padded rows spellings differ: transformers counts chunks from the first real
# token (``chunked_overlay``'s ``left_padding``), earlier releases from the row's start.
_CHUNKED_PADDING_PATTERNS = ("right", "full", "empty")
_POSITION_PATTERNS = ("restarts", "offsets", "arbitrary")


def _patterns(kind: MaskKind) -> tuple[str, ...]:
    if kind == MaskKind.CHUNKED_CAUSAL_PADDING:
        return _CHUNKED_PADDING_PATTERNS
    return _PADDING_PATTERNS if kind.base == MaskKind.CAUSAL_PADDING else _POSITION_PATTERNS


def _n_probes(kind: MaskKind, batch: int) -> int:
    if kind == MaskKind.RECEIVED:
        return 2
    patterns = _patterns(kind)
    return -(-len(patterns) // max(batch, 1)) + 1


def _probe_value(kind: MaskKind, shape, dtype, probe: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs that separate the hypotheses: right/left padding, holes, full and empty rows for
    padding masks; documents restarting at 0, at offsets, and arbitrary positions for position ids."""
    if kind == MaskKind.RECEIVED:  # any values: attention must read them unchanged
        if dtype == torch.bool:
            return torch.rand(shape, generator=gen) < 0.5
        return torch.randn(shape, generator=gen).to(dtype)
    batch, seq = shape
    patterns = _patterns(kind)
    rows = [_probe_row(patterns[(probe * batch + r) % len(patterns)], seq, gen) for r in range(batch)]
    return torch.stack(rows).to(dtype)


def _probe_row(pattern: str, seq: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.arange(seq)
    if pattern in ("right", "left"):
        n = int(torch.randint(1, seq + 1, (), generator=gen))
        return (idx < n) if pattern == "right" else (idx >= seq - n)
    if pattern == "holes":
        return torch.rand(seq, generator=gen) < 0.6
    if pattern in ("full", "empty"):
        return torch.full((seq,), pattern == "full")
    if pattern == "arbitrary":
        return torch.randint(0, 4, (seq,), generator=gen)
    row: list[int] = []
    while len(row) < seq:  # documents of random lengths, restarting at 0 or at an offset
        n = int(torch.randint(1, max(2, seq // 2) + 1, (1,), generator=gen))
        start = 0 if pattern == "restarts" else int(torch.randint(0, 50, (1,), generator=gen))
        row.extend(range(start, start + n))
    return torch.tensor(row[:seq])


def _reference(
    kind: MaskKind,
    inp: torch.Tensor | None,
    seq_len: int,
    causal: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The hypothesis' mask for probe input ``inp`` (B, S), as (B|1, 1, S, S). ``causal`` may
    pass the (S, S) causal matrix (banded by ``window`` for the sliding kinds) in, when the caller
    computes many references of one length. ``chunk``: the chunk of a chunked kind, by index in a
    row (by position in a packed row). Padded rows are probed only right-padded, full or empty
    (:data:`_CHUNKED_PADDING_PATTERNS`), where every spelling's chunks start at index 0."""
    if causal is None:
        causal = _causal(seq_len, window if kind.sliding else None)
    causal = causal[None, None]  # (1, 1, q, kv)
    base = kind.base
    chunk = chunk if kind.chunked else None
    if base == MaskKind.PACKED_CAUSAL:
        docs = document_ids(inp, chunk)
        return causal & (docs[:, :, None] == docs[:, None, :])[:, None]
    if base == MaskKind.CAUSAL_PADDING:
        padding = padding_to_length(inp, seq_len) != 0
        causal = causal & padding[:, None, None, :]
    if chunk is not None:
        chunks = torch.arange(seq_len) // chunk
        causal = causal & (chunks[:, None] == chunks[None, :])
    return causal


def _causal(seq_len: int, window: int | None) -> torch.Tensor:
    """(S, S): ``kv <= q``, and ``q - window < kv`` when there is a window."""
    idx = torch.arange(seq_len)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal &= idx[:, None] - idx[None, :] < window
    return causal


def padding_to_length(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The (B, length) padding mask transformers reads from a 2-D ``attention_mask`` of another
    length: columns past the end count as padding (zeros), extra columns are dropped."""
    width = attention_mask.shape[-1]
    if width < length:
        return torch.nn.functional.pad(attention_mask, (0, length - width))
    return attention_mask[:, :length]


def document_starts(position_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Where documents start in a packed batch: at each row's first token, and wherever the
    position does not increase by exactly one (transformers' ``find_packed_sequence_indices``
    rule). The one definition of the rule: the mask proof, the document boundaries of
    ``varlen_attention`` and the handoff's one-document check all read it.

    Args:
        position_ids: (B, S) integer positions.
        chunk: for attention within chunks (a ``chunked_*`` mask), also where the position is a
            multiple of ``chunk``: each piece of a document within one chunk is then a document.

    Returns:
        (B, S) bool. Built with ``narrow`` rather than indexing: the same ops, and no device guard
        when it is traced with fake tensors.
    """
    width = position_ids.shape[1]
    step = position_ids.narrow(1, 1, width - 1) - position_ids.narrow(1, 0, width - 1)
    first = torch.ones_like(position_ids.narrow(1, 0, 1), dtype=torch.bool)
    starts = torch.cat((first, step != 1), dim=1)
    if chunk is not None:
        starts = starts | (position_ids % chunk == 0)
    return starts


def document_ids(position_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Document index of each token within its row, from 0 (:func:`document_starts`), (B, S)."""
    return document_starts(position_ids, chunk).cumsum(-1) - 1


def _compare(
    out, kind: MaskKind, inp: torch.Tensor | None, seq_len: int, masked_values: set,
    window: int | None = None, chunk: int | None = None,
) -> tuple[bool, str]:
    """Compare the slice's output with the hypothesis, one batch row at a time (the reference of a
    whole (B, 1, S, S) batch would double the probe's memory)."""
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return False, "the slice did not produce a 4-D tensor"
    if tuple(out.shape[-2:]) != (seq_len, seq_len):
        return False, f"mask shape {tuple(out.shape)} is not (..., {seq_len}, {seq_len})"
    rows = out.shape[0] if inp is None else inp.shape[0]  # a mask of no input may be any batch
    if out.shape[0] not in (1, rows) or out.shape[1] < 1:
        return False, f"shape {tuple(out.shape)} does not broadcast to ({rows}, 1, {seq_len}, {seq_len})"
    causal = _causal(seq_len, window)
    for b in range(rows):
        ref = _reference(kind, None if inp is None else inp[b : b + 1], seq_len, causal, chunk=chunk)[0, 0]
        for h in range(out.shape[1]):
            ok, detail = _compare_row(out[min(b, out.shape[0] - 1), h], ref, masked_values)
            if not ok:
                return False, detail
    return True, ""


def _compare_received(out, received: torch.Tensor) -> tuple[bool, str]:
    """Whether ``out`` is ``received`` as attention reads it: its leading corner of ``out``'s
    shape (a dimension of size 1 may broadcast)."""
    if not isinstance(out, torch.Tensor) or out.dim() != received.dim() or out.dtype != received.dtype:
        return False, "the slice does not return the received mask's dtype and rank"
    corner = []
    for o, r in zip(out.shape, received.shape):
        if o > r and r != 1:
            return False, f"shape {tuple(out.shape)} is not a corner of {tuple(received.shape)}"
        corner.append(slice(0, min(o, r)))
    if not torch.equal(out, received[tuple(corner)].expand(out.shape)):
        return False, "attention does not read the received mask unchanged"
    return True, ""


def _compare_row(out: torch.Tensor, ref: torch.Tensor, masked_values: set) -> tuple[bool, str]:
    if out.dtype == torch.bool:
        if torch.equal(out, ref):
            return True, ""
        return False, f"{int((out != ref).sum())} entries differ"
    if (out[ref] != 0).any():
        return False, "an attended entry of the additive mask is not 0"
    masked = out[~ref]
    if masked.numel():
        values = masked.unique()
        if values.numel() != 1:
            return False, "masked entries hold several values"
        masked_values.add(float(values.item()))
    return True, ""
