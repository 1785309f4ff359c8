"""Loss recognition by meaning (:mod:`graphopt.losses`): each causal-LM loss form is proven with the
fields that say what it computes, each program that is not one is declined with a reason that
names the cause. Graphs are captured with Dynamo and analysed without compiling.

A proven loss is checked against the graph itself: the loss rebuilt from :class:`LossInfo`'s fields
as the module docstring defines it (``cross_entropy(softcap(linear(hidden, weight) * logit_scale),
targets, ...) / divisor``) must equal what the graph returns as the loss, on the traced inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from graphopt import analysis
from graphopt.losses import LossInfo, ce_arguments, find_losses, per_position_output
from tests.support.tolerances import tol

B, S, H, V = 2, 5, 8, 11
IGNORE_INDEX = -100
CLASS_WEIGHT = torch.linspace(0.5, 1.5, V)


@dataclass
class Traced:
    """One Dynamo graph and the inputs it was captured on, in placeholder order."""

    gm: fx.GraphModule
    inputs: list

    def value(self, node: fx.Node):
        """What ``node`` computes on the captured inputs."""
        return self.call(analysis.extract_function(self.gm, node, for_probes=False))

    def call(self, fn: analysis.ExtractedFunction):
        placeholders = self.gm.graph.find_nodes(op="placeholder")
        args = [self.inputs[placeholders.index(p)] for p in fn.inputs]
        with torch.no_grad():
            return fn.module(*(analysis.hint(a) if isinstance(a, torch.SymInt) else a for a in args))

    def returned(self) -> list[fx.Node]:
        (output,) = self.gm.graph.find_nodes(op="output")
        return [n for n in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(n, fx.Node)]


def trace(fn, *args, dynamic: bool = False, **kwargs) -> Traced:
    """The single Dynamo graph of ``fn(*args, **kwargs)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(Traced(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args, **kwargs)
    (traced,) = graphs
    assert len(traced.gm.graph.find_nodes(op="placeholder")) == len(traced.inputs)
    return traced


def loss_inputs(seed: int = 0, batch: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, S, H), lm_head weight (V, H) (logits of a few units, so a softcap of 5 matters),
    labels (B, S) with ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, S, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 2).requires_grad_()
    labels = torch.randint(0, V, (batch, S), generator=gen)
    labels[0, -2:] = IGNORE_INDEX
    return hidden, weight, labels


def causal_shift(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF's target of each position, flattened: the next label, ``ignore_index`` after the last."""
    filler = torch.full((labels.shape[0], 1), ignore_index, dtype=labels.dtype)
    return torch.cat((labels[:, 1:], filler), dim=1).reshape(-1)


def prove(traced: Traced) -> LossInfo:
    """The one loss of ``traced``, proven with no decline."""
    found, reasons = find_losses(traced.gm)
    assert len(found) == 1 and reasons == [], reasons
    return found[0]


def assert_fields_compute_the_loss(traced: Traced, info: LossInfo) -> None:
    """The loss rebuilt from ``info``'s fields equals the loss the graph returns."""
    z = F.linear(traced.value(info.hidden), traced.value(info.weight)) * info.logit_scale
    if info.softcap:
        z = info.softcap * torch.tanh(z / info.softcap)
    loss = F.cross_entropy(
        z.float().reshape(-1, z.shape[-1]),
        traced.call(info.targets),
        weight=None if info.class_weight is None else traced.value(info.class_weight),
        ignore_index=info.ignore_index,
        reduction=info.reduction,
        label_smoothing=info.label_smoothing,
    )
    if info.divisor is not None:
        loss = loss / (traced.value(info.divisor) if isinstance(info.divisor, fx.Node) else info.divisor)
    assert info.loss_out in traced.returned()
    torch.testing.assert_close(loss, traced.value(info.loss_out), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------------
# Proven forms


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hf_causal_lm_loss_is_proven_with_the_label_shift(dynamic):
    """transformers' ForCausalLMLoss: upcast, pad-and-shift the labels, mean over valid targets."""
    inputs = loss_inputs()
    traced = trace(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, V), *inputs, dynamic=dynamic)
    info = prove(traced)
    assert (info.hidden.name, info.weight.name, info.labels.name) == ("l_h_", "l_w_", "l_y_")
    assert all(n.op == "placeholder" for n in (info.hidden, info.weight, info.labels))
    assert info.linear.target in (torch._C._nn.linear, F.linear) and info.scaled is info.linear
    assert (info.shift, info.ignore_index, info.reduction) == (1, IGNORE_INDEX, "mean")
    assert (info.logit_scale, info.softcap, info.label_smoothing) == (1.0, 0.0, 0.0)
    assert info.class_weight is None and info.divisor is None and not info.divisor_from_activations
    assert info.loss_out is info.ce and not info.labels_transformed
    assert (info.batch, info.seq) == (B, S)
    assert torch.equal(traced.call(info.targets), causal_shift(inputs[2]))
    assert_fields_compute_the_loss(traced, info)


with torch.random.fork_rng(devices=[]):  # leaves the global RNG as the other tests find it
    LM_HEAD = torch.nn.Linear(H, V, bias=False)


def unshifted_linear(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1))


def unshifted_keywords(h, w, y):
    return F.cross_entropy(input=F.linear(h, w).float().reshape(-1, V), target=y.reshape(-1))


def unshifted_nn_linear(h, w, y):
    return F.cross_entropy(LM_HEAD(h).float().view(-1, V), y.view(-1))


def hf_shift_labels(h, w, y):
    """ForCausalLMLoss given ``shift_labels`` (already shifted by the data collator)."""
    return ForCausalLMLoss(F.linear(h, w), None, V, shift_labels=y)


@pytest.mark.parametrize(
    "fn", [unshifted_linear, unshifted_keywords, unshifted_nn_linear, hf_shift_labels], ids=lambda f: f.__name__
)
def test_labels_used_as_given_are_shift_0(fn):
    inputs = loss_inputs()
    traced = trace(fn, *inputs)
    info = prove(traced)
    assert info.shift == 0 and info.reduction == "mean" and not info.labels_transformed
    assert info.labels.op == "placeholder" and info.labels.name == "l_y_"
    assert torch.equal(traced.call(info.targets), inputs[2].reshape(-1))
    assert_fields_compute_the_loss(traced, info)


def test_ignore_index_is_read_from_cross_entropy():
    """ForCausalLMLoss(ignore_index=-1): the shift pads with -1 and cross_entropy skips -1."""
    h, w, y = loss_inputs()
    y[y == IGNORE_INDEX] = -1
    traced = trace(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, V, ignore_index=-1), h, w, y)
    info = prove(traced)
    assert info.ignore_index == -1 and info.shift == 1 and not info.labels_transformed
    assert torch.equal(traced.call(info.targets), causal_shift(y, ignore_index=-1))
    assert_fields_compute_the_loss(traced, info)


def test_sum_over_num_items_in_batch_given_as_a_tensor():
    """Gradient accumulation: reduction="sum" divided by the trainer's num_items_in_batch."""
    num_items = torch.tensor(9)

    def fn(h, w, y, n):
        return ForCausalLMLoss(F.linear(h, w), y, V, num_items_in_batch=n)

    traced = trace(fn, *loss_inputs(), num_items)
    info = prove(traced)
    assert info.reduction == "sum" and info.shift == 1
    assert info.loss_out is not info.ce and info.loss_out.args[0] is info.ce
    assert isinstance(info.divisor, fx.Node) and torch.equal(traced.value(info.divisor), num_items)
    assert not info.divisor_from_activations
    assert_fields_compute_the_loss(traced, info)


def test_sum_over_num_items_in_batch_given_as_a_number():
    traced = trace(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, V, num_items_in_batch=9), *loss_inputs())
    info = prove(traced)
    assert info.reduction == "sum" and info.divisor == 9 and not info.divisor_from_activations
    assert info.loss_out.args[0] is info.ce
    assert_fields_compute_the_loss(traced, info)


def test_sum_without_divisor_returns_cross_entropy_itself():
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), reduction="sum")

    traced = trace(fn, *loss_inputs())
    info = prove(traced)
    assert info.reduction == "sum" and info.divisor is None and info.loss_out is info.ce
    assert_fields_compute_the_loss(traced, info)


def valid_label_count(h, w, y):
    return (y[:, 1:] != IGNORE_INDEX).sum()


def weight_norm(h, w, y):
    return w.norm()


def linear_of_labels(h, w, y):
    """A linear layer's output, here of inputs that need no gradient."""
    return F.linear(y.float(), torch.ones(1, S)).abs().sum()


def attention_of_labels(h, w, y):
    q = y.float()[:, None, :, None]
    return F.scaled_dot_product_attention(q, q, q).abs().sum()


@pytest.mark.parametrize(
    "divisor, from_activations",
    [(valid_label_count, False), (weight_norm, True), (linear_of_labels, True), (attention_of_labels, True)],
    ids=["from_labels", "from_a_parameter", "from_a_linear", "from_attention"],
)
def test_divisor_computed_in_the_graph_says_whether_it_reads_activations(divisor, from_activations):
    """A divisor from the labels is given to the model; one from parameters or a linear could read
    positions that a rewrite changes."""

    def fn(h, w, y):
        total = F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), reduction="sum")
        return total / divisor(h, w, y)

    traced = trace(fn, *loss_inputs())
    info = prove(traced)
    assert isinstance(info.divisor, fx.Node) and info.divisor_from_activations is from_activations
    assert_fields_compute_the_loss(traced, info)


@pytest.mark.parametrize(
    "scale_fn, scale",
    [
        (lambda z: z * 0.25, 0.25),  # Cohere's logit_scale
        (lambda z: z / 4.0, 0.25),  # a temperature
        (lambda z: torch.div(z, 2.0), 0.5),
        (lambda z: z.mul(3.0), 3.0),
        (lambda z: z.float() * -1.0, -1.0),  # after the upcast
    ],
    ids=["mul", "truediv", "torch_div", "mul_method", "after_upcast"],
)
def test_constant_logit_scale_is_proven_with_its_value(scale_fn, scale):
    h, w, y = loss_inputs()
    traced = trace(lambda h, w, y: ForCausalLMLoss(scale_fn(F.linear(h, w)), y, V), h, w, y)
    info = prove(traced)
    assert info.logit_scale == pytest.approx(scale, rel=1e-12) and info.softcap == 0.0
    assert info.scaled is not info.linear
    expected = F.linear(h, w).detach() * scale
    torch.testing.assert_close(traced.value(info.scaled).float(), expected, **tol(torch.float32))
    assert_fields_compute_the_loss(traced, info)


def gemma2_softcap(z):
    """Gemma2's final_logit_softcapping: ``cap * tanh(z / cap)`` in three statements."""
    z = z / 5.0
    z = torch.tanh(z)
    return z * 5.0


def method_softcap(z):
    return (z / 5.0).tanh() * 5.0


def scaled_then_softcapped(z):
    return gemma2_softcap(z * 0.5)


@pytest.mark.parametrize(
    "logits_fn, scale, softcap",
    [(gemma2_softcap, 1.0, 5.0), (method_softcap, 1.0, 5.0), (scaled_then_softcapped, 0.5, 5.0)],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_softcapping_is_proven_with_its_cap(logits_fn, scale, softcap):
    traced = trace(lambda h, w, y: ForCausalLMLoss(logits_fn(F.linear(h, w)), y, V), *loss_inputs())
    info = prove(traced)
    assert (info.logit_scale, info.softcap) == (scale, softcap) and info.shift == 1
    assert (info.scaled is info.linear) is (scale == 1.0)
    assert_fields_compute_the_loss(traced, info)


def test_label_smoothing_and_class_weight_are_recorded():
    """Proven as they are (the fused loss declines them itself, from these fields)."""

    def fn(h, w, y):
        logits = F.linear(h, w).float().view(-1, V)
        return F.cross_entropy(logits, y.view(-1), weight=CLASS_WEIGHT, label_smoothing=0.1)

    traced = trace(fn, *loss_inputs())
    info = prove(traced)
    assert info.label_smoothing == pytest.approx(0.1)
    assert info.class_weight is not None and torch.equal(traced.value(info.class_weight), CLASS_WEIGHT)
    assert_fields_compute_the_loss(traced, info)


def test_labels_transformed_in_the_graph_are_marked_and_kept_in_the_target_path():
    """A wrapper's ``labels.clamp(min=0)`` turns ignored labels into class 0: the target path
    computes that on each call's labels, and the loss says the labels are transformed."""
    h, w, y = loss_inputs()
    traced = trace(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y.clamp(min=0), V), h, w, y)
    info = prove(traced)
    assert info.shift == 1 and info.labels_transformed
    assert torch.equal(traced.call(info.targets), causal_shift(y.clamp(min=0)))
    assert_fields_compute_the_loss(traced, info)


def test_each_cross_entropy_is_proven_or_declined_on_its_own():
    """Two cross-entropies on one lm_head: the HF loss is proven, the one on exp(logits) declined."""

    def fn(h, w, y):
        logits = F.linear(h, w)
        return ForCausalLMLoss(logits, y, V) + F.cross_entropy(logits.exp().float().view(-1, V), y.view(-1))

    traced = trace(fn, *loss_inputs())
    (info,), (reason,) = find_losses(traced.gm)
    assert info.shift == 1 and "exp" in reason


def test_a_graph_without_cross_entropy_has_no_loss_and_no_reason():
    traced = trace(lambda h, w: F.linear(h, w).float().logsumexp(-1).mean(), *loss_inputs()[:2])
    assert find_losses(traced.gm) == ([], [])


@pytest.mark.parametrize("family", ["llama", "cohere", "gemma2"])
def test_tiny_hf_model_loss_is_proven(family):
    """The real input: a model's whole training forward. Llama (untied lm_head), Cohere (tied,
    logit_scale) and Gemma2 (tied, final-logit softcapping)."""
    from graphopt.tiny_models import build_tiny_model, make_batch

    model = build_tiny_model(family)
    batch = make_batch("right", batch=2, seq=8, seed=0)
    traced = trace(model, **batch)
    info = prove(traced)
    config = model.config
    assert info.logit_scale == pytest.approx(getattr(config, "logit_scale", None) or 1.0)
    assert info.softcap == (getattr(config, "final_logit_softcapping", None) or 0.0)
    assert (info.shift, info.reduction, info.ignore_index, info.batch, info.seq) == (1, "mean", IGNORE_INDEX, 2, 8)
    assert torch.equal(traced.value(info.weight), model.get_output_embeddings().weight)
    assert info.labels.name.endswith("labels_")
    assert torch.equal(traced.call(info.targets), causal_shift(batch["labels"]))
    assert_fields_compute_the_loss(traced, info)


# ---------------------------------------------------------------------------------------------------
# Declines: no loss proven, and the reason names the cause

FLOAT_SCALE = torch.tensor(2.0)


def bias_head(h, w, y):
    return F.cross_entropy(F.linear(h, w, CLASS_WEIGHT).float().view(-1, V), y.view(-1))


def flat_hidden(h, w, y):
    """lm_head applied to (B*S, H): the rows' positions are not visible."""
    return F.cross_entropy(F.linear(h.reshape(-1, H), w).float(), y.view(-1))


def logits_from_input(h, w, y):
    """The logits are a graph input: there is no lm_head to fuse."""
    return F.cross_entropy(h.view(-1, H), y.view(-1) % H)


def exp_logits(h, w, y):
    return F.cross_entropy(F.linear(h, w).exp().float().view(-1, V), y.view(-1))


def reciprocal_logits(h, w, y):
    return F.cross_entropy((1.0 / F.linear(h, w)).float().view(-1, V), y.view(-1))


def tensor_temperature(h, w, y):
    return F.cross_entropy((F.linear(h, w) / FLOAT_SCALE).float().view(-1, V), y.view(-1))


def rows_of_five_classes(h, w, y):
    """Cross-entropy over groups of 5 logits: its rows are not positions over the vocabulary."""
    return F.cross_entropy(F.linear(h, w).float().reshape(-1, 5), y.repeat(1, 11)[:, :11].reshape(-1) % 5)


def bf16_logits(h, w, y):
    return F.cross_entropy(F.linear(h, w).to(torch.bfloat16).view(-1, V), y.view(-1))


def one_row_per_sequence(h, w, y):
    """Sequence classification over S*V classes: one cross-entropy row per batch row."""
    return F.cross_entropy(F.linear(h, w).float().view(h.shape[0], -1), y[:, 0])


def squared_logits(h, w, y):
    logits = F.linear(h, w)
    return F.cross_entropy((logits * logits).float().view(-1, V), y.view(-1))


def mismatched_softcap(h, w, y):
    """30 * tanh(z / 20) is no softcap: the two constants differ."""
    return F.cross_entropy((torch.tanh(F.linear(h, w) / 20.0) * 30.0).float().view(-1, V), y.view(-1))


def tanh_logits(h, w, y):
    return F.cross_entropy(F.linear(h, w).tanh().float().view(-1, V), y.view(-1))


def floor_divided_logits(h, w, y):
    return F.cross_entropy(torch.div(F.linear(h, w), 2.0, rounding_mode="floor").float().view(-1, V), y.view(-1))


def constant_target(h, w, y):
    zeros = torch.zeros(h.shape[0] * h.shape[1], dtype=torch.long)
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), zeros)


def target_masked_by_attention(h, w, y, am):
    """Labels masked with the attention mask in the graph: the target reads two inputs."""
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), torch.where(am.bool(), y, IGNORE_INDEX).view(-1))


def float_labels(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.long().view(-1))


def shift_by_two(h, w, y):
    targets = F.pad(y, (0, 2), value=IGNORE_INDEX)[:, 2:]
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), targets.reshape(-1))


def shift_padded_with_class_0(h, w, y):
    """The last position is scored against class 0 instead of being ignored."""
    targets = F.pad(y, (0, 1), value=0)[:, 1:]
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), targets.reshape(-1))


def reversed_labels(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.flip(1).reshape(-1))


def _with_attention_mask():
    h, w, y = loss_inputs()
    return h, w, y, torch.ones(B, S, dtype=torch.long)


def _with_float_labels():
    h, w, y = loss_inputs()
    return h, w, y.clamp(min=0).float()


DECLINES = [
    (bias_head, loss_inputs, ["lm_head has a bias"]),
    (flat_hidden, loss_inputs, ["not (batch, seq, hidden) @ (vocab, hidden)"]),
    (logits_from_input, loss_inputs, ["through l_h_", "placeholder", "not an elementwise map of lm_head"]),
    (exp_logits, loss_inputs, ["through exp", "not an elementwise map of lm_head"]),
    (reciprocal_logits, loss_inputs, ["not an upcast of lm_head's output"]),
    (tensor_temperature, loss_inputs, ["through truediv", "which also reads"]),
    (rows_of_five_classes, loss_inputs, ["probing the logits path failed", "[-1, 5]"]),
    (bf16_logits, loss_inputs, ["torch.bfloat16", "expected fp32 rows of (batch*seq, vocab)"]),
    (one_row_per_sequence, loss_inputs, ["(2, 33)", "expected fp32 rows of (batch*seq, vocab)"]),
    (squared_logits, loss_inputs, ["through mul", "which also reads"]),
    (mismatched_softcap, loss_inputs, ["not an upcast of lm_head's output"]),
    (tanh_logits, loss_inputs, ["not an upcast of lm_head's output"]),
    (floor_divided_logits, loss_inputs, ["not an upcast of lm_head's output"]),
    (constant_target, loss_inputs, ["target depends on no input"]),
    (target_masked_by_attention, _with_attention_mask, ["target depends on", "l_am_", "l_y_"]),
    (float_labels, _with_float_labels, ["target comes from the float input l_y_"]),
    (shift_by_two, loss_inputs, ["target is not a shift of the labels input"]),
    (shift_padded_with_class_0, loss_inputs, ["target is not a shift of the labels input"]),
    (reversed_labels, loss_inputs, ["target is not a shift of the labels input"]),
]


@pytest.mark.parametrize("fn, make_inputs, causes", DECLINES, ids=[fn.__name__ for fn, _, _ in DECLINES])
def test_not_a_causal_lm_loss_is_declined_with_its_cause(fn, make_inputs, causes):
    found, reasons = find_losses(trace(fn, *make_inputs()).gm)
    assert found == [] and len(reasons) == 1, reasons
    assert all(cause in reasons[0] for cause in causes), reasons


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("legacy", [{"reduce": True}, {"size_average": False}], ids=["reduce", "size_average"])
def test_deprecated_reduction_arguments_are_declined(legacy):
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), **legacy)

    traced = trace(fn, *loss_inputs())
    found, reasons = find_losses(traced.gm)
    assert found == [] and reasons == ["cross_entropy uses the deprecated size_average/reduce arguments"]


def test_per_token_losses_are_declined():
    def fn(h, w, y):
        per_token = F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), reduction="none")
        return per_token.sum() / 3

    found, reasons = find_losses(trace(fn, *loss_inputs()).gm)
    assert found == [] and reasons == ["cross_entropy reduction='none' (per-token losses) is not a scalar loss"]


def test_target_that_is_not_a_graph_value_is_declined():
    """No tracer makes one; a hand-edited graph with the target baked in as a constant."""
    traced = trace(unshifted_linear, *loss_inputs())
    (ce,) = traced.gm.graph.find_nodes(op="call_function", target=F.cross_entropy)
    ce.update_arg(1, torch.zeros(B * S, dtype=torch.long))
    found, reasons = find_losses(traced.gm)
    assert found == [] and reasons == ["cross_entropy inputs are not graph values"]


# ---------------------------------------------------------------------------------------------------
# Found by these tests (fixed): a constant on the left, keyword arguments, position-dependent maps


@pytest.mark.parametrize(
    "logits_fn, scale, softcap",
    [(lambda z: 2.0 * z, 2.0, 0.0), (lambda z: 5.0 * torch.tanh(z / 5.0), 1.0, 5.0)],
    ids=["scale", "softcap"],
)
def test_constant_on_the_left_is_proven(logits_fn, scale, softcap):
    """``2.0 * logits`` is the same loss as ``logits * 2.0``: the walk to lm_head follows the
    tensor operand, wherever it stands."""
    traced = trace(lambda h, w, y: ForCausalLMLoss(logits_fn(F.linear(h, w)), y, V), *loss_inputs())
    info = prove(traced)
    assert (info.logit_scale, info.softcap) == (scale, softcap)


@pytest.mark.parametrize(
    "fn",
    [
        lambda h, w, y: ForCausalLMLoss(F.linear(input=h, weight=w), y, V),
        lambda h, w, y: ForCausalLMLoss(torch.mul(input=F.linear(h, w), other=0.5), y, V),
        lambda h, w, y: F.cross_entropy(torch.reshape(input=F.linear(h, w).float(), shape=(-1, V)), y.view(-1)),
    ],
    ids=["linear", "mul", "reshape"],
)
def test_keyword_argument_calls_on_the_logits_path_do_not_crash(fn):
    """Dynamo keeps keyword arguments as written; the walk reads them by name."""
    info = prove(trace(fn, *loss_inputs()))
    assert info.linear.target in (torch._C._nn.linear, F.linear)


@pytest.mark.parametrize("dim, kept, batch", [(1, 3, B), (0, 2, 3)], ids=["positions", "batch_rows"])
def test_logits_changed_past_the_probed_positions_are_not_proven(dim, kept, batch):
    """Logits zeroed at positions >= 3 (or batch rows >= 2) are not lm_head's: a fused loss would
    score the real logits there. The probe sees a few positions only, so every op on the path must
    read one tensor and constants (it then treats every position alike): the mask is a second
    tensor, and the loss is declined."""

    def fn(h, w, y):
        logits = F.linear(h, w)
        index = torch.ones_like(logits).cumsum(dim)  # 1, 2, ... along dim
        return F.cross_entropy((logits * (index <= kept)).float().view(-1, V), y.view(-1))

    found, reasons = find_losses(trace(fn, *loss_inputs(batch=batch)).gm)
    assert found == []
    assert len(reasons) == 1 and "which also reads" in reasons[0], reasons


@pytest.mark.xfail(strict=True, reason="the logits path is probed on fewer positions than the sizes it names")
def test_logits_flattened_with_their_static_sizes_are_proven():
    """``reshape(B * S, -1)`` (static sizes, as Dynamo records them) is the same row layout as
    ``view(-1, V)``; it is declined as "probing the logits path failed"."""

    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().reshape(h.shape[0] * h.shape[1], -1), y.view(-1))

    prove(trace(fn, *loss_inputs()))


# ---------------------------------------------------------------------------------------------------
# Helpers other modules use


def test_ce_arguments_names_positional_and_keyword_arguments_and_fills_defaults():
    def fn(x, y):
        return (
            F.cross_entropy(x, y)
            + F.cross_entropy(x, y, CLASS_WEIGHT, None, -1, None, "sum")
            + F.cross_entropy(x, target=y, reduction="sum", label_smoothing=0.2, ignore_index=3)
        )

    traced = trace(fn, torch.randn(B * S, V), torch.randint(0, V, (B * S,)))
    x, y = traced.gm.graph.find_nodes(op="placeholder")[:2]
    calls = traced.gm.graph.find_nodes(op="call_function", target=F.cross_entropy)
    plain, positional, keywords = (ce_arguments(n) for n in calls)
    defaults = {"weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0}
    assert plain == {"input": x, "target": y, **defaults}
    assert positional["weight"] is not None and positional["size_average"] is None and positional["reduce"] is None
    assert (positional["ignore_index"], positional["reduction"], positional["label_smoothing"]) == (-1, "sum", 0.0)
    assert (keywords["input"], keywords["target"], keywords["weight"]) == (x, y, None)
    assert (keywords["ignore_index"], keywords["reduction"], keywords["label_smoothing"]) == (3, "sum", 0.2)


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.empty(B, S, V), True),  # logits
        (torch.empty(B, S), True),  # per-token losses
        (torch.empty(B, 4, S, 3), True),  # attention heads
        (torch.empty(B, 1, S, S), True),
        (torch.empty(B, 1, 1, S), False),  # a broadcast key mask: S is not a query axis
        (torch.empty(S, B, V), False),
        (torch.empty(B + 1, S, V), False),
        (torch.empty(B), False),
        (torch.tensor(1.0), False),
        (None, False),
        ((torch.empty(B, S, V),), False),
    ],
    ids=["logits", "per_token", "heads", "query_mask", "key_mask", "seq_first", "batch", "1d", "scalar", "none", "tuple"],
)
def test_per_position_output(value, expected):
    assert per_position_output(value, B, S) is expected


def test_per_position_output_reads_symbolic_sizes_by_their_hints():
    traced = trace(lambda h, w: F.linear(h, w) * 2, *loss_inputs()[:2], dynamic=True)
    (linear,) = traced.gm.graph.find_nodes(op="call_function", target=torch._C._nn.linear)
    value = analysis.example_value(linear)
    assert isinstance(value.shape[0], torch.SymInt)
    assert per_position_output(value, B, S) and not per_position_output(value, B, S + 1)
