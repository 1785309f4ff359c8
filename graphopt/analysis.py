"""Dataflow facts about Dynamo FX graphs, shared by the passes.

The passes recognize subgraphs by what they compute, not by how a transformers release spells
them. The tools for that live here:

- :func:`tensor_inputs` says which graph inputs a node's *values* depend on. Shape queries
  (``x.size()``, ``x.shape``) carry no value dependence, so a mask built from ``arange(x.size(1))``
  depends on no tensor at all.
- :func:`extract_function` lifts the backward slice of a node into a standalone
  :class:`torch.fx.GraphModule` that can be run on probe values.
- :func:`probe_inputs` builds concrete stand-ins for the slice inputs (hinted sizes for symbolic
  shapes), so a pass can evaluate the slice on values it chooses and compare the result with a
  reference definition.

Probes run on :data:`PROBE_DEVICE` (the CPU), whatever devices the graph names. This module owns that
choice: :func:`extract_function` rewrites every device constant of the slice (``device=`` arguments,
``.to(device)``, ``.cuda()``) to it, and :func:`probe_inputs` / :func:`run_function` put every
argument there. Recognizers build their probe values and references with plain CPU factories, so a
graph traced for CUDA (or with fake CUDA tensors, in tests) is recognized exactly as its CPU twin and
no probe ever compares tensors of two devices.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

PROBE_DEVICE = torch.device("cpu")

_SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "ndimension"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def example_value(node: fx.Node):
    """The fake value Dynamo recorded for ``node`` (``None`` when it recorded none)."""
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def hint(value) -> int:
    """A concrete int for a possibly symbolic size."""
    if isinstance(value, torch.SymInt):
        node = value.node
        if node.hint is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(value)


def hinted_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(hint(s) for s in value.shape)


def is_shape_query(node: fx.Node) -> bool:
    """True for nodes that read only metadata (sizes, dtype) of their input."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _SHAPE_ATTRS
    if node.op == "call_function" and node.target in (
        torch.ops.aten.sym_size.int,
        torch.ops.aten.sym_numel.default,
        torch.ops.aten.sym_stride.int,
    ):
        return True
    return False


def tensor_inputs(graph: fx.Graph) -> dict[fx.Node, frozenset[fx.Node]]:
    """Map every node to the tensor placeholders its *value* depends on.

    Shape queries cut the dependence: ``x.size(1)`` depends on no tensor value. Symbolic-int
    placeholders (Dynamo's ``s0`` inputs) count as no dependence either.
    """
    deps: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            is_tensor = isinstance(example_value(node), torch.Tensor)
            deps[node] = frozenset({node}) if is_tensor else frozenset()
        elif is_shape_query(node):
            deps[node] = frozenset()
        else:
            found: set[fx.Node] = set()
            for inp in node.all_input_nodes:
                found |= deps.get(inp, frozenset())
            deps[node] = frozenset(found)
    return deps


def describe(node: fx.Node) -> str:
    """A short name for what ``node`` is (a graph output, which call), for decline reasons."""
    if node.op == "output":
        return "a graph output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def is_mutation(node: fx.Node) -> bool:
    """True for calls that write into an argument (``x[i] = v``, ``x.add_(y)``, ``out=``)."""
    if node.op == "call_function":
        return node.target is operator.setitem or "out" in node.kwargs
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    return False


def backward_slice(node: fx.Node, stop_at: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """All ancestors of ``node`` (itself included), in graph order, not looking past ``stop_at``.

    In-place writes into a node of the slice (Dynamo keeps ``x[i] = v`` as a ``setitem`` call with
    no users) are part of what the node computes, so they and their own ancestors are included.
    """
    stop = set(stop_at)
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur in stop:
            continue
        stack.extend(cur.all_input_nodes)
        stack.extend(u for u in cur.users if is_mutation(u) and u.args and u.args[0] is cur)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    limit = order[node]
    return [n for n in node.graph.nodes if n in seen and (order[n] <= limit)]


@dataclass
class ExtractedFunction:
    """A node's backward slice as a callable: ``module(*inputs)`` returns the node's value."""

    module: fx.GraphModule
    inputs: list[fx.Node]  # placeholders of the original graph, in call order


def extract_function(
    root: fx.GraphModule, node: fx.Node, stop_at: Iterable[fx.Node] = (), *, for_probes: bool = True
) -> ExtractedFunction:
    """Lift the backward slice of ``node`` into its own GraphModule.

    The new module takes the original placeholders that the slice reaches (tensors and symbolic
    ints alike), plus the ``stop_at`` nodes it reaches, which become inputs instead of being
    computed. It returns the value of ``node``. ``get_attr`` constants resolve against ``root``.
    With ``for_probes`` (the default) it runs on :data:`PROBE_DEVICE`; otherwise it is the graph's
    own computation, on the graph's devices (a runtime guard evaluates it on real inputs).
    """
    stop = set(stop_at)
    nodes = backward_slice(node, stop)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    for n in nodes:
        if n.op == "placeholder" or n in stop:
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            inputs.append(n)
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    if for_probes:
        _retarget_to_probe_device(graph)
    module = fx.GraphModule(root, graph)
    if for_probes:
        _constants_to_probe_device(module)
    return ExtractedFunction(module, inputs)


def _probe_device_of(value):
    """``value`` with every device it names replaced by :data:`PROBE_DEVICE`."""
    if isinstance(value, torch.device):
        return PROBE_DEVICE
    return value


def _retarget_to_probe_device(graph: fx.Graph) -> None:
    """Make a lifted slice run on :data:`PROBE_DEVICE`: device arguments, ``device=`` keywords,
    string devices given to ``.to`` and ``.cuda()`` calls all name it instead."""
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        node.args = fx.node.map_aggregate(node.args, _probe_device_of)
        node.kwargs = fx.node.map_aggregate(node.kwargs, _probe_device_of)
        if isinstance(node.kwargs.get("device"), str):
            node.kwargs = {**node.kwargs, "device": PROBE_DEVICE}
        if node.op == "call_method" and node.target == "to":
            node.args = tuple(PROBE_DEVICE if _names_device(a) else a for a in node.args)
        if node.op == "call_method" and node.target == "cuda":
            node.target, node.args, node.kwargs = "to", (node.args[0], PROBE_DEVICE), {}


def _constants_to_probe_device(module: fx.GraphModule) -> None:
    """Give the slice CPU copies of the tensor constants (``get_attr``) it reads from elsewhere."""
    for node in module.graph.find_nodes(op="get_attr"):
        owner_path, _, name = node.target.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = getattr(owner, name, None)
        if isinstance(value, torch.Tensor) and value.device != PROBE_DEVICE and value.device.type != "meta":
            delattr(owner, name)  # it may be registered as a parameter or buffer of the copy
            setattr(owner, name, value.detach().to(PROBE_DEVICE))


def _names_device(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        torch.device(value)
    except RuntimeError:
        return False
    return True


def probe_inputs(
    inputs: Iterable[fx.Node], chosen: dict[fx.Node, object] | None = None
) -> list[object]:
    """Concrete arguments for an extracted slice.

    Inputs named in ``chosen`` get the given value (moved to :data:`PROBE_DEVICE`). Other tensors
    get zeros of their hinted shape there (a slice only reads their shape, or the caller would have
    chosen them); symbolic ints get their hint.
    """
    chosen = chosen or {}
    args = []
    for inp in inputs:
        if inp in chosen:
            value = chosen[inp]
            args.append(value.to(PROBE_DEVICE) if isinstance(value, torch.Tensor) else value)
            continue
        val = example_value(inp)
        if isinstance(val, torch.Tensor):
            args.append(torch.zeros(hinted_shape(val), dtype=val.dtype, device=PROBE_DEVICE))
        elif isinstance(val, (torch.SymInt, int)):
            args.append(hint(val))
        else:
            args.append(val)
    return args


def run_function(fn: ExtractedFunction, chosen: dict[fx.Node, object]):
    """Evaluate an extracted slice with ``chosen`` placeholder values (no autograd)."""
    with torch.no_grad():
        return fn.module(*probe_inputs(fn.inputs, chosen))


def erase_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> int:
    """Erase the ``candidates`` that no longer have users, transitively. Returns how many.

    Unlike ``Graph.eliminate_dead_code`` this touches nothing outside ``candidates``, so stateful
    calls such as ``torch._C._set_grad_enabled`` elsewhere in a Dynamo graph stay in place.
    """
    pending = [n for n in candidates if n.op not in ("placeholder", "output")]
    erased = 0
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.remove(n)
                erased += 1
                changed = True
    return erased


_IN_PLACE_FUNCTIONS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
})


def _may_write(node: fx.Node) -> bool:
    """Whether ``node`` may have an effect besides its value: FX's impure nodes, in-place ops
    (``copy_``, ``x[i] = v``, ``+=``), ``out=`` calls, mutating ops, higher-order ops."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return node.target in _IN_PLACE_FUNCTIONS  # operator.and_ is not in place, operator.iand is
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return True
    if "out" in node.kwargs or isinstance(node.target, torch._ops.HigherOrderOperator):
        return True
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def erase_unused(graph: fx.Graph) -> int:
    """Erase the nodes whose values nothing reads and that have no other effect (see
    ``_may_write``), transitively; returns how many. Unlike ``Graph.eliminate_dead_code``, a write
    into a buffer (``buf = x.new_empty(...); buf[..., :d].copy_(y)``, DeepSeek-V3's keys) and the
    values it reads stay."""
    return erase_dead(graph, [n for n in graph.nodes if not _may_write(n)])


# ``node.meta`` key a pass sets on the document boundaries it builds for
# ``graphopt::varlen_attention`` when each (B, S) row is one document (``cu = arange(B + 1) * S``,
# mask elision's windowed rewrite of a right-padded batch): later passes (unpad) may then give
# that attention other boundaries with the same meaning, each row's real tokens one document.
ROWS_AS_DOCUMENTS = "graphopt_rows_as_documents"
# The same for boundaries that cut each (B, S) row into chunks of ``meta[ROW_CHUNKS]`` tokens from
# index 0 (a chunked mask on right-padded rows): the same meaning over the packed tokens is each
# row's real tokens cut into chunks from its first one.
ROW_CHUNKS = "graphopt_row_chunks"


def annotate(node: fx.Node) -> None:
    """Record ``example_value`` for a node a pass created, by running its target on the fake values
    of its inputs, so later passes see correct metadata."""
    inputs = torch.utils._pytree.tree_leaves([example_value(n) for n in node.all_input_nodes])
    modes = [v.fake_mode for v in inputs if hasattr(v, "fake_mode")]
    if not modes:
        return
    fake_mode = modes[0]
    args = fx.node.map_arg(node.args, example_value)
    kwargs = fx.node.map_arg(node.kwargs, example_value)
    # Computed without autograd (only metadata is wanted); requires_grad follows the inputs.
    with fake_mode, torch.no_grad():
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    if any(getattr(v, "requires_grad", False) for v in inputs):
        for out in torch.utils._pytree.tree_leaves(value):
            if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
                out.requires_grad_(True)
    node.meta["example_value"] = value


# The attention entry points Dynamo records for SDPA.
SDPA_TARGETS: tuple[Callable, ...] = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
)
SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(node: fx.Node) -> dict[str, object]:
    """The arguments of an SDPA call by name, defaults filled in."""
    args = dict(zip(SDPA_ARG_NAMES, node.args))
    args.update(node.kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    for key, value in defaults.items():
        args.setdefault(key, value)
    return args


def set_sdpa_arguments(node: fx.Node, **updates) -> None:
    """Rewrite an SDPA call with keyword arguments, keeping q/k/v positional."""
    args = sdpa_arguments(node)
    args.update(updates)
    node.args = (args.pop("query"), args.pop("key"), args.pop("value"))
    node.kwargs = args


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add)


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "__add__", "add_")
    )


# Activation checkpointing: ``model.gradient_checkpointing_enable()`` puts each decoder layer in a
# ``tag_activation_checkpoint(body, *operands)`` call whose body is a GraphModule attribute of the
# graph; operand i is the body's placeholder i. Masks, RoPE tables and hidden states cross into the
# body as operands, so the passes look through these calls and rewrite inside the bodies.
CHECKPOINT_HOPS = tuple(
    op for op in (getattr(torch.ops.higher_order, "tag_activation_checkpoint", None),) if op is not None
)


def is_checkpoint(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CHECKPOINT_HOPS


def checkpoint_body(hop: fx.Node) -> fx.GraphModule:
    """The body GraphModule that checkpoint call ``hop`` runs."""
    return getattr(hop.graph.owning_module, hop.args[0].target)


def unshare_checkpoint_bodies(gm: fx.GraphModule) -> None:
    """Give every checkpoint call a body of its own (a copy where two calls share one), so that a
    rewrite inside a body changes only the call it is made for."""
    seen: set[str] = set()
    for hop in [n for n in gm.graph.nodes if is_checkpoint(n)]:
        attr = hop.args[0]
        if attr.target not in seen and len(attr.users) == 1:
            seen.add(attr.target)
            continue
        name = _fresh_attribute(gm, attr.target)
        setattr(gm, name, copy_graph_module(getattr(gm, attr.target)))
        with gm.graph.inserting_before(hop):
            own = gm.graph.get_attr(name)
        hop.replace_input_with(attr, own)
        seen.add(name)
        if not attr.users:
            gm.graph.erase_node(attr)


def _fresh_attribute(root: torch.nn.Module, base: str) -> str:
    i = 0
    while hasattr(root, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def body_placeholder(hop: fx.Node, operand: int) -> fx.Node:
    """The placeholder of ``hop``'s body that receives operand ``operand``."""
    return checkpoint_body(hop).graph.find_nodes(op="placeholder")[operand]


def checkpoint_uses(hop: fx.Node, value: fx.Node) -> list[fx.Node]:
    """The body placeholders through which ``value`` enters ``hop``'s body."""
    return [body_placeholder(hop, i) for i, arg in enumerate(hop.args[1:]) if arg is value]


def add_checkpoint_operand(hop: fx.Node, value: fx.Node) -> fx.Node:
    """Pass ``value`` (a node of the outer graph) into ``hop``'s body; returns its new placeholder."""
    body = checkpoint_body(hop)
    last = body.graph.find_nodes(op="placeholder")[-1]
    with body.graph.inserting_after(last):
        placeholder = body.graph.placeholder(f"{value.name}_operand")
    placeholder.meta["example_value"] = example_value(value)
    hop.args = (*hop.args, value)
    return placeholder


def drop_unused_checkpoint_operands(hop: fx.Node) -> None:
    """Remove the operands whose body placeholder no longer has users (and the placeholders)."""
    body = checkpoint_body(hop)
    placeholders = body.graph.find_nodes(op="placeholder")
    keep = [i for i, p in enumerate(placeholders) if p.users]
    for i, p in enumerate(placeholders):
        if not p.users:
            body.graph.erase_node(p)
    hop.args = (hop.args[0], *(hop.args[1 + i] for i in keep))
    body.recompile()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (nodes keep their meta), with ``gm.meta``, whose
    GraphModule attributes (checkpoint bodies) are copies too: rewriting it never touches ``gm``."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    # Dynamo's bookkeeping, which its DDP optimizer reads when it splits a graph.
    for old, copied in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            copied._dynamo_source = old._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for name, child in list(new.named_children()):
        if isinstance(child, fx.GraphModule):
            setattr(new, name, copy_graph_module(child))
    return new


def recompile_all(gm: fx.GraphModule) -> None:
    """Lint and recompile ``gm`` and every GraphModule body it holds."""
    for module in (gm, *(c for c in gm.children() if isinstance(c, fx.GraphModule))):
        module.graph.lint()
        module.recompile()


def arange_constants(gm: fx.GraphModule, length: int) -> set[fx.Node]:
    """The nodes of ``gm`` that depend on no input and hold ``arange(length)`` (HF's default
    positions, ``cache_position``), in any integer dtype and any shape of ``length`` elements with
    every other dimension 1; the first of each chain only (what derives from one follows it).
    Proven by evaluating them, on the CPU."""
    deps = tensor_inputs(gm.graph)
    found: set[fx.Node] = set()
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if any(a in found or a in derived for a in node.all_input_nodes):
            derived.add(node)
            continue
        if node.op in ("placeholder", "output", "get_attr") or deps[node]:
            continue
        val = example_value(node)
        if not isinstance(val, torch.Tensor) or val.is_floating_point() or val.dtype == torch.bool:
            continue
        shape = [hint(s) for s in val.shape]
        if shape.count(length) != 1 or any(s != 1 for s in shape if s != length):
            continue
        try:
            value = run_function(extract_function(gm, node), {})
        except Exception:  # noqa: BLE001 - a constant that cannot be evaluated is not positions
            continue
        if torch.equal(value.reshape(-1).cpu(), torch.arange(length)):
            found.add(node)
    return found
