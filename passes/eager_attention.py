"""Eager attention of packed batches: per-document attention with its softcap and sinks.

Gemma 2 and gpt-oss run attention as plain ops (transformers' ``eager_attention_forward``)::

    z = cap(scale * q @ k^T) + mask             cap(z) = c * tanh(z / c)      (Gemma 2; none: z)
    p = softmax(z, dim=-1)                      or, with a sink logit per head (gpt-oss):
    p = softmax(cat(z, sinks[h]), dim=-1)[..., :-1]
    out = dropout(p) @ v                        (dropout p = 0, or not training)

For a packed batch the mask is the (B, 1, S, S) additive block-causal mask that
:mod:`graphopt.masks` proved ``packed_causal`` (or ``sliding_packed_causal``), and the whole region
becomes ``graphopt::varlen_attention`` over the document boundaries, with the mask's window, the
softcap and the sinks (:func:`rewrite_packed_eager`)::

    eager(q, k, v, mask) -> graphopt::varlen_attention(xq, xk, xv, cos, sin, cu_seqlens, S, scale,
                                                       interleaved, impl, window, softcap, sinks)

Nothing is read off one release's op sequence. :func:`match_eager_attention` finds the region
between the tensors SDPA would take (q and k after RoPE and the head repeat, v after it) and the
attention output, then proves what it computes by probing: the scores (q and k to the operand
added to the mask) must be ``cap(scale * q @ k^T)`` for random q and k, which also reads the scale
and the cap (in float64); the whole region must equal the formula above on random q, k, v, masks
and sinks. The unrotated q/k and the unrepeated k/v come from the SDPA path's proofs
(:func:`graphopt.passes.varlen_attention.match_attention`); where RoPE cannot be proven the op
takes the rotated q/k with empty (T, 0) rotary tables (RoPE not fused).

Mask elision uses the same proof for padded batches (:func:`rewrite_eager_rows`): each row one
document, behind its right-padding guard, with the boundaries marked for unpadding. A graph that
receives its mask from an earlier graph (split graphs, :mod:`graphopt.handoff`) rewrites its eager
attention the same way (:func:`rewrite_received_eager`): per row in the fast version, per document
(with the window of the version) in the received versions, behind the handoff guards, which also
check that the mask was published with a masked value at most :func:`masked_value_bound`.

A masked entry must be exactly 0 after the softmax (transformers' masked value ``finfo.min``
makes it so; see ``_UNDERFLOW``): then per-document attention is the same sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import analysis
from graphopt.masks import SOFTMAX_TARGETS, MaskCandidate
from graphopt.passes import PassContext, retire_mask
from graphopt.passes.varlen_attention import (
    AttentionMatch,
    TableAnalysis,
    VarlenAttention,
    body_tables,
    insert_cu_seqlens,
    match_attention,
    paired_table,
)

_MAX_STEPS = 8  # ops walked through between the attention's landmarks (scores, softmax, output)
# exp(x) is 0 in float32 for x < -104 (under 1e-47 in float64): a masked score that far under
# its row's max gets probability 0, as outside a document. Capped scores lie within [-c, c], so a
# masked value under -(2c + _UNDERFLOW) always gets there; uncapped, the masked value must be at
# most float16's lowest (transformers' finfo(dtype).min in every dtype), a margin no real score
# spread comes near.
_UNDERFLOW = 110.0
_UNCAPPED_MASKED_AT_MOST = float(torch.finfo(torch.float16).min)
_DROPOUT_TARGETS = (torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default)


@dataclass
class EagerAttention:
    """An eager attention region proven to compute softmax(cap(scale·q·kᵀ) + mask [, sinks])·v.

    Attributes:
        output: the (B, Hq, S, Dv) attention output.
        q, k, v: (B, Hq, S, D|Dv), as SDPA would take them (after RoPE and the head repeat).
        mask: the additive mask the scores are added to.
        scale: the scores' scale; softcap: their cap c (0: none).
        sinks: the (Hq,)-element tensor of per-head sink logits, or None.
        region: the nodes between q/k/v/mask/sinks and ``output`` (dead after the rewrite).
    """

    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node
    scale: float
    softcap: float
    sinks: fx.Node | None
    region: list[fx.Node]


def match_eager_attention(gm: fx.GraphModule, add: fx.Node, mask: fx.Node, masked_value: float | None = None) -> EagerAttention | str:
    """The proof that ``add`` (``scores + mask``, a node of ``gm``) is the mask addition of eager
    attention (see the module docstring); else why not, a decline reason. ``masked_value``: the
    mask's value at masked positions (default: its dtype's lowest), used in the probes."""
    located = _landmarks(add, mask)
    if isinstance(located, str):
        return located
    scores, output, v, pair = located
    for q, k in (pair, pair[::-1]):  # which factor is the query: the one the law holds for
        law = _scores_law(gm, scores, q, k)
        if not isinstance(law, str):
            break
    if isinstance(law, str):
        return law
    scale, softcap = law
    masked = masked_value if masked_value is not None else torch.finfo(analysis.example_value(mask).dtype).min
    if not masked <= (-(2 * softcap + _UNDERFLOW) if softcap else _UNCAPPED_MASKED_AT_MOST):
        return f"the mask's masked value {masked} may leave masked probabilities nonzero"
    fn = analysis.extract_function(gm, output, stop_at=[q, k, v, mask])
    sinks = _sinks(fn, q, k, v, mask)
    if isinstance(sinks, str):
        return sinks
    stops = [q, k, v, mask, *([sinks] if sinks is not None else [])]
    region = [n for n in analysis.backward_slice(output, stops) if n not in stops and n.op != "placeholder"]
    why = _escapes(region, set(stops), output) or _dropout_reason(region)
    why = why or _prove_attention(fn, q, k, v, mask, sinks, scale, softcap, masked)
    if why:
        return why
    return EagerAttention(output=output, q=q, k=k, v=v, mask=mask, scale=scale, softcap=softcap, sinks=sinks, region=region)


def _landmarks(add: fx.Node, mask: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, tuple[fx.Node, fx.Node]] | str:
    """(scores, output, v, (q, k) in either order) of the attention whose scores ``add`` adds
    ``mask`` to, found by the region's structure (its meaning is proven after); else why not."""
    scores = _other_operand(add, mask)
    if scores is None:
        return f"{add.name} does not add the mask to one scores tensor"
    softmax = _softmax_after(add)
    if isinstance(softmax, str):
        return softmax
    found = _output_after(softmax)
    if isinstance(found, str):
        return found
    pair = _query_and_key(scores)
    if isinstance(pair, str):
        return pair
    return scores, found[0], found[1], pair


def _sinks(fn: analysis.ExtractedFunction, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node) -> fx.Node | None | str:
    """The one further tensor the attention region ``fn`` reads, when it has one element per
    query head (the sinks: what it is is proven with the rest), None when it reads none; else
    why not."""
    extra = [i for i in fn.inputs if i not in (q, k, v, mask) and _is_tensor(i)]
    if not extra:
        return None
    qv = analysis.example_value(q)
    heads = analysis.hint(qv.shape[1])
    sv = analysis.example_value(extra[0])
    if len(extra) > 1 or sv.numel() != heads:
        names = ", ".join(f"{n.name} {tuple(analysis.example_value(n).shape)}" for n in extra)
        return f"the attention reads {names} besides q, k, v and the mask, not one logit per head ({heads}) as sinks"
    if sv.dtype not in (torch.float32, qv.dtype):
        return f"the sinks {extra[0].name} are {sv.dtype}, neither float32 nor the query's {qv.dtype}"
    return extra[0]


@dataclass
class ProvenEager:
    """An eager attention user of a mask, proven (``found``) with the SDPA path's proofs of its
    RoPE and head repeat (``source``), and the checkpoint call whose body holds it (or None)."""

    add: fx.Node
    found: EagerAttention
    source: AttentionMatch
    checkpoint: fx.Node | None


def masked_value_bound(softcap: float) -> float:
    """The highest masked value an additive mask may hold for eager attention with cap ``softcap``
    (0: none) to give every masked score probability exactly 0 (see ``_UNDERFLOW``)."""
    return -(2 * softcap + _UNDERFLOW) if softcap else _UNCAPPED_MASKED_AT_MOST


def prove_eager_users(cand: MaskCandidate, outer: TableAnalysis) -> tuple[list[ProvenEager], list[tuple[fx.Node, str]]]:
    """Each eager attention user of ``cand`` (its ``additive_users``, in graph order) proven, or
    with the reason it is not: ``(proven, declined)``. ``outer``: the :class:`TableAnalysis` of
    ``cand``'s graph (a checkpoint body gets its own from it)."""
    proven, declined = [], []
    for add in _in_graph_order(cand.additive_users):
        checkpoint = cand.checkpoints.get(add)
        owner = add.graph.owning_module
        found = match_eager_attention(owner, add, cand.seen_as.get(add, cand.node), cand.masked_value)
        tables = outer if checkpoint is None else body_tables(checkpoint, outer)
        source = found if isinstance(found, str) else _unrotated(owner, found, tables)
        if isinstance(source, str):
            declined.append((add, source))
        else:
            proven.append(ProvenEager(add, found, source, checkpoint))
    return proven, declined


def rewrite_packed_eager(gm: fx.GraphModule, ctx: PassContext, cand: MaskCandidate) -> None:
    """Per-document attention for the eager attention users of packed mask ``cand`` (the
    ``additive_users`` that :mod:`graphopt.masks` found); each one not proven is declined with its
    reason and keeps the mask."""
    proven, declined = prove_eager_users(cand, TableAnalysis(gm, {cand.input}))
    for add, why in declined:
        ctx.report.decline(VarlenAttention.name, f"{add.name}: packed eager attention is kept with its mask: {why}")
    for sdpa in cand.sdpa_users:
        ctx.report.decline(VarlenAttention.name, f"{sdpa.name}: SDPA over a mask that eager attention reads too is not rewritten")
    cus: dict[fx.Graph, fx.Node] = {}  # one boundary computation per graph or body
    for user in proven:
        graph = user.found.output.graph
        if graph not in cus:
            positions = cand.input if user.checkpoint is None else analysis.add_checkpoint_operand(user.checkpoint, cand.input)
            cus[graph] = insert_cu_seqlens(positions, user.found.output, user.source.xq, cand.chunk)
        _call_varlen(ctx, user.found, user.source, cus[graph], cand.window, chunk=cand.chunk)
    retire_mask(gm, ctx, cand)


def rewrite_received_eager(
    ctx: PassContext, pass_name: str, cand: MaskCandidate, tables: TableAnalysis, boundaries, window: int | None, into: str
) -> float | None:
    """Per-document (or per-row) attention for the eager attention users of ``cand``, a mask
    received from an earlier graph: each one proven becomes ``graphopt::varlen_attention`` over
    ``boundaries(graph, before, xq, checkpoint)`` (the caller's (B*S + 1,) boundaries node for that
    graph) with ``window`` and its softcap and sinks, reported as ``<pass_name>/eager_handed_off``
    (``into``: what it became); the others are declined with their reason and keep the mask.
    ``tables``: the graph's :class:`TableAnalysis`. Returns the ``masked_at_most`` of the handoff
    guard the caller registers (the least :func:`masked_value_bound` of the rewritten users), or
    None when none was rewritten."""
    proven, declined = prove_eager_users(cand, tables)
    for add, why in declined:
        ctx.report.decline(pass_name, f"{add.name}: eager attention over the received {cand.input.name} keeps it: {why}")
    for user in proven:
        cu = boundaries(user.found.output.graph, user.found.output, user.source.xq, user.checkpoint)
        _call_varlen(ctx, user.found, user.source, cu, window, report=False)
        name, what = user.add.name, _what(user.found, window)
        ctx.report.rewrite(pass_name, "eager_handed_off", f"{name}: eager attention over {cand.input.name} (from an earlier graph) -> {into} ({what})")
        if user.source.fused:
            ctx.report.rewrite("rope_fusion", _layout(user.source), f"{name}: RoPE applied inside varlen_attention")
        else:
            ctx.report.note(f"{name} runs per document with RoPE not fused ({user.source.unfused})")
    return min((masked_value_bound(user.found.softcap) for user in proven), default=None)


def _what(found: EagerAttention, window: int | None) -> str:
    extras = [f"softcap {found.softcap:g}"] * bool(found.softcap) + ["sinks"] * (found.sinks is not None)
    extras += [f"window {window}"] * (window is not None)
    return "varlen_attention" + "".join(f", {e}" for e in extras)


def _layout(source: AttentionMatch) -> str:
    return ("interleaved" if source.interleaved else "half") if source.fused else ""


def rewrite_eager_rows(ctx: PassContext, cand: MaskCandidate, add: fx.Node, tables: TableAnalysis, boundaries) -> str | tuple[str, str]:
    """Per-row attention, each row of the batch one document, for the eager attention that adds
    the (causal, padded, sliding) mask ``cand`` at ``add``: ``graphopt::varlen_attention`` with
    the mask's window and the attention's softcap and sinks. ``tables``: ``add``'s graph's
    :class:`TableAnalysis` (for the RoPE proof); ``boundaries(graph, before, xq)``: the caller's
    (B*S + 1,) row boundaries node, inserted before ``before``. Mask elision calls it behind its
    guards. Returns (what the rewrite did, its RoPE layout or "" when not fused), else why not."""
    owner = add.graph.owning_module
    found = match_eager_attention(owner, add, cand.seen_as.get(add, cand.node), cand.masked_value)
    source = found if isinstance(found, str) else _unrotated(owner, found, tables)
    if isinstance(source, str):
        return source
    cu = boundaries(found.output.graph, found.output, source.xq)
    _call_varlen(ctx, found, source, cu, cand.window, report=False)
    if not source.fused:
        ctx.report.note(f"mask_elision: {add.name} runs per row with RoPE not fused ({source.unfused})")
    what = _what(found, cand.window) + (f", chunks of {cand.chunk}" if cand.chunk is not None else "")
    return f"per-row attention ({what})", _layout(source)


def _in_graph_order(nodes: list[fx.Node]) -> list[fx.Node]:
    """``nodes`` (of one graph and its checkpoint bodies) in each graph's node order."""
    index: dict[fx.Node, int] = {}
    for graph in dict.fromkeys(n.graph for n in nodes):
        index.update((n, i) for i, n in enumerate(graph.nodes))
    return sorted(nodes, key=index.__getitem__)


def _other_operand(add: fx.Node, mask: fx.Node) -> fx.Node | None:
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if add.kwargs or len(add.args) != 2 or len(operands) != 2 or operands.count(mask) != 1:
        return None
    return operands[0] if operands[1] is mask else operands[1]


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in SOFTMAX_TARGETS) or (node.op == "call_method" and node.target == "softmax")


def _softmax_after(add: fx.Node) -> fx.Node | str:
    """The one softmax that ``add``'s value reaches (through the row-wise ops between them)."""
    seen, frontier, found = {add}, [add], []
    for _ in range(_MAX_STEPS):
        frontier = [u for n in frontier for u in n.users if u not in seen and u.op != "output"]
        seen.update(frontier)
        found += [n for n in frontier if _is_softmax(n)]
        frontier = [n for n in frontier if not _is_softmax(n)]
        if not frontier:
            break
    if len(found) != 1:
        return f"{add.name} reaches {len(found)} softmax calls, not one"
    return found[0]


def _output_after(softmax: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """(the attention output, v): the first op after ``softmax`` that reads one more tensor, the
    values, through a chain of ops that read the probabilities only."""
    node = softmax
    for _ in range(_MAX_STEPS):
        if len(node.users) != 1:
            users = ", ".join(u.name for u in node.users) or "nothing"
            return f"the attention probabilities {node.name} are used by {users}, not by one product with the values"
        user = next(iter(node.users))
        others = [a for a in user.all_input_nodes if a is not node and _is_tensor(a) and not analysis.is_shape_query(a)]
        if len(others) == 1 and _is_tensor(user) and analysis.example_value(user).dim() == 4:
            return user, others[0]
        if others:
            return f"{user.name} reads the attention probabilities and {len(others)} other tensors"
        node = user
    return f"no product of the probabilities {softmax.name} with values within {_MAX_STEPS} ops"


def _query_and_key(scores: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """The two (B, H, S, D) tensors whose product the scores are: the inputs of the nearest op
    above ``scores`` that reads two tensors of their (B, H, ...) size (a scale or cap tensor is
    left to the proof of the scores), each followed up to where it is laid out as SDPA takes it."""
    sv = analysis.example_value(scores)
    if not _is_tensor(scores) or sv.dim() != 4:
        return f"the scores {scores.name} are not (batch, heads, seq, seq)"
    batch, heads, seq = (analysis.hint(s) for s in sv.shape[:3])

    def wide(node: fx.Node) -> bool:
        val = analysis.example_value(node)
        sizes = [analysis.hint(s) for s in val.shape]
        return len(sizes) == 4 and sizes[:2] == [batch, heads] and min(sizes[2:]) > 1

    joint = scores
    for _ in range(_MAX_STEPS):
        inputs = [a for a in _value_inputs(joint) if wide(a)]
        if len(inputs) != 1:
            break
        joint = inputs[0]
    if len(inputs) != 2:
        return f"the scores {scores.name} are not the product of two tensors (found {joint.name} reading {len(inputs)})"
    found = [_sdpa_layout(x, batch, heads, seq) for x in inputs]
    if None in found:
        return f"{joint.name} does not multiply two (batch, {heads} heads, {seq}, dim) tensors"
    return found[0], found[1]


def _sdpa_layout(node: fx.Node, batch: int, heads: int, seq: int) -> fx.Node | None:
    """Walking up from ``node`` (a factor of the scores) through ops of one tensor input: the first
    (batch, heads, seq, D) value (below it: k's transpose), followed further up while its shape and
    dtype stay (q scaled before the product); None when there is none."""
    found = None
    for _ in range(_MAX_STEPS):
        val = analysis.example_value(node)
        layout = _is_tensor(node) and val.dim() == 4 and [analysis.hint(s) for s in val.shape[:3]] == [batch, heads, seq]
        kept = found is not None and (val.shape, val.dtype) == (analysis.example_value(found).shape, analysis.example_value(found).dtype)
        if found is not None and not (layout and kept):
            return found
        if layout:
            found = node
        inputs = _value_inputs(node)
        if len(inputs) != 1 or node.op == "placeholder":
            return found
        node = inputs[0]
    return found


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of ``node`` whose values it reads (not sizes)."""
    return list(dict.fromkeys(a for a in node.all_input_nodes if _is_tensor(a) and not analysis.is_shape_query(a)))


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(analysis.example_value(node), torch.Tensor)


def _scores_law(gm: fx.GraphModule, scores: fx.Node, q: fx.Node, k: fx.Node) -> tuple[float, float] | str:
    """(scale, softcap) with ``scores == cap(scale * q @ kᵀ)`` (softcap 0: no cap), read and
    checked on random float64 q and k; else why not. The cap is read where tanh saturates."""
    fn = analysis.extract_function(gm, scores, stop_at=[q, k])
    others = [i.name for i in fn.inputs if i not in (q, k) and _is_tensor(i)]
    if others:
        return f"the scores depend on {', '.join(others)} besides q and k (a scale or softcap that is not a constant?)"
    gen = torch.Generator().manual_seed(5)
    qp, kp = (torch.randn(analysis.hinted_shape(analysis.example_value(x)), generator=gen, dtype=torch.float64) for x in (q, k))

    def run(factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        out = analysis.run_function(fn, {q: qp * factor, k: kp})
        return out, (qp * factor) @ kp.transpose(-1, -2)

    try:
        small, raw = run(1e-6)
        if small.shape != raw.shape or small.dtype not in (torch.float64, torch.float32):
            return f"the scores {scores.name} are not a float32/float64 function of q @ kᵀ"
        rtol = 1e-9 if small.dtype == torch.float64 else 1e-5  # how closely the probe reads a constant
        small = small.double()
        scale = float((small * raw).sum() / (raw * raw).sum())
        big, raw = run(1e12)
        big = big.double()
        softcap = 0.0 if torch.allclose(big, scale * raw, rtol=1e-5) else float(big.abs().max())
        scale, softcap = (_snap(x, scores, q, k, rtol) for x in (scale, softcap))
        for factor in (1.0, 10.0, 100.0):
            out, raw = run(factor)
            z = scale * raw
            expected = softcap * torch.tanh(z / softcap) if softcap else z
            if not torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())):
                return f"the scores {scores.name} are not cap(scale * q @ kᵀ) of {q.name} and {k.name}"
    except Exception as e:  # noqa: BLE001 - a region that cannot run on the probes proves nothing
        return f"probing the scores {scores.name} failed: {type(e).__name__}: {e}"
    if not (math.isfinite(scale) and scale != 0 and math.isfinite(softcap) and softcap >= 0):
        return f"the scores {scores.name} have scale {scale} and softcap {softcap}"
    return scale, softcap


def _snap(estimate: float, scores: fx.Node, q: fx.Node, k: fx.Node, rtol: float) -> float:
    """``estimate`` as a number (or the reciprocal of one) written in the scores' ops, when one is
    that close: the probe reads the constant, the graph spells it exactly."""
    if estimate == 0:
        return 0.0
    written = set()
    for node in analysis.backward_slice(scores, [q, k]):
        if node in (q, k):
            continue
        for a in (*node.args, *node.kwargs.values()):
            if isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0:
                written |= {float(a), 1.0 / a}
    close = [c for c in written if abs(c - estimate) <= rtol * abs(estimate)]
    return min(close, key=lambda c: abs(c - estimate)) if close else estimate


def _escapes(region: list[fx.Node], stops: set[fx.Node], output: fx.Node) -> str:
    """Why a value of the region (one computed from q, k, v, the mask or the sinks) is also read
    outside it (the scores or probabilities returned, say), or ""."""
    inside, valued = set(region), set(stops)
    for node in region:
        if analysis.is_shape_query(node) or not any(a in valued for a in node.all_input_nodes):
            continue
        valued.add(node)
        if node is output:
            continue
        for user in node.users:
            if user not in inside:
                return f"{node.name}, computed in the attention, is also used by {user.name} ({analysis.describe(user)})"
    return ""


def _dropout_reason(region: list[fx.Node]) -> str:
    """Why a dropout of the region may be active, or ""."""
    for node in region:
        if node.op != "call_function" or node.target not in _DROPOUT_TARGETS:
            continue
        params = dict(zip(("input", "p", "training"), node.args)) | dict(node.kwargs)
        p = params.get("p", 0.5)
        training = params.get("training", params.get("train", True))
        if not isinstance(p, (int, float)) or not isinstance(training, bool):
            return f"the attention dropout {node.name} has a probability or training flag that is not a constant"
        if p != 0 and training:
            return f"attention dropout is active ({node.name}: p={p} in training); varlen_attention has no dropout"
    return ""


def _prove_attention(fn, q, k, v, mask, sinks, scale: float, softcap: float, masked: float) -> str:
    """Why the region ``fn`` is not softmax(cap(scale·q·kᵀ) + mask [, sinks])·v on random inputs
    (one mask of the masked value over random entries, one of random values), or ""."""
    gen = torch.Generator().manual_seed(6)

    def draw(node: fx.Node) -> torch.Tensor:
        val = analysis.example_value(node)
        return torch.randn(analysis.hinted_shape(val), generator=gen).to(val.dtype)

    chosen = {n: draw(n) for n in (q, k, v, *([sinks] if sinks is not None else []))}
    shape, dtype = analysis.hinted_shape(analysis.example_value(mask)), analysis.example_value(mask).dtype
    seq = shape[-1]
    attended = (torch.rand(shape, generator=gen) < 0.5) | torch.eye(seq, dtype=torch.bool)
    masks = [torch.zeros(shape, dtype=dtype).masked_fill(~attended, masked), torch.randn(shape, generator=gen).to(dtype)]
    out_dtype = analysis.example_value(q).dtype
    tol = 1e-4 if out_dtype in (torch.float32, torch.float64) else 3e-2
    for m in masks:
        try:
            out = analysis.run_function(fn, chosen | {mask: m})
            again = analysis.run_function(fn, chosen | {mask: m})
        except Exception as e:  # noqa: BLE001 - a region that cannot run on the probes proves nothing
            return f"probing the attention failed: {type(e).__name__}: {e}"
        if not torch.equal(out, again):
            return "the attention is not deterministic (active dropout?)"
        expected = _reference(chosen[q], chosen[k], chosen[v], m, chosen.get(sinks), scale, softcap)
        if out.shape != expected.shape or not torch.allclose(out.double(), expected, rtol=tol, atol=tol):
            what = "softmax(cap(scale * q @ kᵀ) + mask" + (", sinks)" if sinks is not None else ")") + " @ v"
            return f"the attention is not {what} (a softmax not over the keys?)"
    return ""


def _reference(q, k, v, mask, sinks, scale: float, softcap: float) -> torch.Tensor:
    """softmax(cap(scale·q·kᵀ) + mask [, sink column]) · v in float64."""
    z = scale * (q.double() @ k.double().transpose(-1, -2))
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z + mask.double()
    if sinks is None:
        return torch.softmax(z, -1) @ v.double()
    column = sinks.double().reshape(1, -1, 1, 1).expand(*z.shape[:-1], 1)
    return torch.softmax(torch.cat((z, column), -1), -1)[..., :-1] @ v.double()


def _unrotated(gm: fx.GraphModule, found: EagerAttention, tables: TableAnalysis) -> AttentionMatch | str:
    """The SDPA path's proofs of RoPE and the head repeat (``match_attention``, RoPE fused where
    it is proven, else q and k as they are), run on a temporary SDPA call of ``found``'s q, k, v
    that is erased again; the match's ``sdpa`` is that erased call."""
    graph = found.output.graph
    with graph.inserting_before(found.output):
        probe = graph.call_function(torch._C._nn.scaled_dot_product_attention, (found.q, found.k, found.v), {"scale": found.scale})
    try:
        analysis.annotate(probe)
        return match_attention(gm, probe, tables, allow_unfused=True)
    finally:
        graph.erase_node(probe)


def _call_varlen(
    ctx: PassContext, found: EagerAttention, source: AttentionMatch, cu_seqlens: fx.Node, window: int | None, *,
    report: bool = True, chunk: int | None = None,
) -> None:
    """Replace ``found.output`` by ``graphopt::varlen_attention`` of ``source`` (RoPE fused when it
    has tables, empty (T, 0) tables otherwise) with ``found``'s scale, softcap and sinks and
    ``window``, erase what is left dead of the region, and report the rewrite (unless the caller
    reports it as its own: ``report=False``; ``chunk``: the boundaries cut documents into chunks
    of this many tokens, for the report)."""
    graph = found.output.graph
    new: list[fx.Node] = []

    def call(kind: str, target, *args) -> fx.Node:
        new.append(getattr(graph, kind)(target, args))
        return new[-1]

    with graph.inserting_before(found.output):
        batch, heads, seq = (call("call_method", "size", source.xq, d) for d in range(3))
        value_dim = call("call_method", "size", source.xv, 3)
        flat = []
        for x in (source.xq, source.xk, source.xv):  # (B, H, S, D) -> (B*S, H, D)
            t = call("call_method", "transpose", x, 1, 2)
            flat.append(call("call_method", "flatten", call("call_method", "contiguous", t), 0, 1))
        if not source.fused:  # R = 0: the op rotates nothing
            tokens = call("call_method", "size", flat[0], 0)
            tables = [call("call_method", "new_zeros", flat[0], (tokens, 0))] * 2
        else:
            tables = []
            for table in (source.cos, source.sin):  # (B|1, 1, S, R) -> (B*S, R)
                if source.fp32_tables:
                    table = call("call_method", "float", table)
                if source.paired_tables:
                    table = call("call_function", paired_table, table, source.interleaved)
                expanded = call("call_method", "expand", table, batch, 1, seq, -1)
                tables.append(call("call_method", "flatten", call("call_method", "select", expanded, 1, 0), 0, 1))
        sinks = found.sinks
        if sinks is not None and analysis.example_value(sinks).dim() != 1:
            sinks = call("call_method", "reshape", sinks, -1)
        out = call(
            "call_function", torch.ops.graphopt.varlen_attention.default,
            *flat, *tables, cu_seqlens, seq, found.scale, source.interleaved, ctx.options.attention_impl,
            -1 if window is None else window, found.softcap, sinks,
        )
        shaped = call("call_method", "view", out, batch, seq, heads, value_dim)
        result = call("call_method", "transpose", shaped, 1, 2)
    for node in new:
        analysis.annotate(node)
    name = found.output.name
    found.output.replace_all_uses_with(result)
    analysis.erase_dead(graph, [*found.region, *source.region])
    if report:
        _report(ctx, name, found, source, window, chunk)


def _report(ctx: PassContext, name: str, found: EagerAttention, source: AttentionMatch, window: int | None, chunk: int | None) -> None:
    extras = []
    if found.softcap:
        extras.append(f"softcap {found.softcap:g}")
    if found.sinks is not None:
        extras.append("sinks")
    if window is not None:
        extras.append(f"window {window}")
    if chunk is not None:
        extras.append(f"chunks of {chunk}")
    detail = f"{name}: eager attention over a block-causal mask -> per-document attention"
    if extras:
        detail += f" ({', '.join(extras)})"
    rule = "eager_packed" + ("" if window is None else "_sliding") + ("" if chunk is None else "_chunked") + ("" if source.fused else "_unfused")
    ctx.report.rewrite(VarlenAttention.name, rule, detail)
    if source.fused:
        layout = "interleaved" if source.interleaved else "half"
        ctx.report.rewrite("rope_fusion", layout, f"{name}: RoPE applied inside varlen_attention")
    else:
        ctx.report.note(
            f"varlen_attention: {name} runs per document with RoPE not fused ({source.unfused}): "
            "q and k enter varlen_attention as the eager attention multiplies them"
        )

