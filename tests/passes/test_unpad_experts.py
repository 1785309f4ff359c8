"""Unpadding of mixture-of-experts layers: the expert dispatch is proven token-wise.

Two levels. A white-box harness (:func:`unpadded_body`) runs unpadding's rules over a dispatch
written here, on real values, and runs the graph it builds on the real tokens only: positive
cases match the padded computation at every real token, each negative case changes one property
the proof rests on and must decline, naming it. Then the tiny HF models whose layers route
(Qwen3-MoE and Mixtral's grouped experts; Llama 4's batched experts, checkpointed, at two padded
widths), eager against compiled: loss, every gradient, logits at real positions, the rewrite
fired. gpt-oss's routed layers (grouped experts with biases, beside sliding windows and sinks) are
checked in ``test_sliding_windows.py``, DeepSeek-V3's in ``test_attention_variants.py``, on the
padded graphs those files compile anyway.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import graphopt
from graphopt.tiny_models import build_tiny_model, make_batch
from tests.passes.test_unpad import SEQ, _check_left_padding_falls_back, _check_unpadded, right_batch
from tests.support.harness import (
    CompiledModel,
    assert_steps_equal,
    compile_step,
    enable_checkpointing,
    explain_split,
    real_positions,
)

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

transformers_moe = pytest.importorskip("transformers.integrations.moe")  # registers grouped_mm_fallback

B, S, H, FFN, EXPERTS, K = 2, 8, 24, 24, 4, 2
LENGTHS = [8, 5]  # row 1 right-padded


def grouped_dispatch(x, router, w_up, b_up, w_down, *, grouped_mm=None, variant: str = ""):
    """A token-choice top-k layer as grouped dispatch computes it: picks flattened, sorted by
    expert, rows gathered in that order, one grouped matmul per projection over the counts of the
    sorted keys, the sort undone by its inverse permutation, the picks summed. ``variant`` breaks
    one property the proof needs (see the negative test)."""
    grouped_mm = grouped_mm or torch.ops.transformers.grouped_mm_fallback
    top = torch.topk(torch.nn.functional.linear(x, router), K, dim=-1)
    weights = torch.softmax(top[0], dim=-1).reshape(-1)
    picks = top[1].reshape(-1)
    if variant == "keys-not-expert-indices":
        picks = picks * 1
    ordered = torch.sort(picks, descending=variant == "descending")
    keys, perm = ordered[0], ordered[1]
    rows = x[perm // (K + 1 if variant == "wrong-picks-per-token" else K)]
    if variant == "rows-of-another-sort":
        rows = x[torch.sort(picks, descending=True)[1] // K]
    high = EXPERTS - 2 if variant == "bins-not-one-per-expert" else EXPERTS - 1  # then key 1 lands in bin 2
    offs = torch.cumsum(torch.histc(keys.float(), bins=EXPERTS, min=0, max=high), dim=0, dtype=torch.int32)
    h = grouped_mm(rows, w_up, offs=offs) + b_up[keys]
    y = grouped_mm(torch.nn.functional.silu(h), w_down, offs=offs) * weights[perm].unsqueeze(-1)
    if variant == "positions-as-values":
        y = y * perm.unsqueeze(-1).to(y.dtype)
    if variant == "counts-as-values":
        y = y * offs[0]
    inverse = torch.empty_like(perm)
    inverse[perm] = perm if variant == "inverse-not-arange" else torch.arange(perm.size(0))
    return y[inverse].view(-1, K, H).sum(1)


def batched_dispatch(x, router, w_up, b_up, w_down, *, grouped_mm=None, variant: str = ""):
    """Llama 4's batched experts: every token through every expert (``repeat``), scaled by its
    router score (zero where not picked), one ``bmm`` per projection (a bias per expert added
    here), summed over the experts."""
    logits = torch.nn.functional.linear(x, router)
    top = torch.topk(logits, 1, dim=1)
    scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, top[1], top[0]))
    routed = x.repeat(EXPERTS, 1) * scores.transpose(0, 1).reshape(-1, 1)
    if variant == "experts-over-tokens":
        routed = routed.view(-1, EXPERTS, H).transpose(0, 1)  # tokens split across the expert dim
    else:
        routed = routed.view(EXPERTS, -1, H)
    h = torch.nn.functional.silu(torch.bmm(routed, w_up) + b_up[:, None, :])
    return torch.bmm(h, w_down).reshape(EXPERTS, -1, H).sum(0)


def bind(fn, **options):
    """``fn`` with keyword options bound, as a function of the five tensors."""

    def bound(x, router, w_up, b_up, w_down):
        return fn(x, router, w_up, b_up, w_down, **options)

    return bound


def _weights(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B * S, H, generator=gen)
    router = torch.randn(EXPERTS, H, generator=gen)
    w_up = torch.randn(EXPERTS, H, FFN, generator=gen) / H**0.5
    b_up = torch.randn(EXPERTS, FFN, generator=gen)
    w_down = torch.randn(EXPERTS, FFN, H, generator=gen) / FFN**0.5
    return [t.to(dtype) for t in (x, router, w_up, b_up, w_down)]


def unpadded_body(fn, inputs: list[torch.Tensor]):
    """The unpadded graph unpadding builds for ``fn(*inputs)`` (the first input the merged
    (B*S, H) tokens, the others weights): Dynamo's graph of ``fn``, unpadded by the rules run as on
    a checkpoint body; raises :class:`graphopt.passes.unpad.Decline` as unpadding would.
    Returns (module, output tags); the module takes the inputs, then ``gather``, ``positions``,
    ``cu_seqlens`` and the attention mask."""
    from graphopt.passes.unpad import _Builder

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # one code object (bind's) traced for each case
    torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)(*inputs)
    (gm,) = graphs
    mask = fx.Graph().placeholder("attention_mask")
    mask.meta["example_value"] = torch.ones(B, S, dtype=torch.long)
    operand_tags = [("BS", None)] + [None] * (len(inputs) - 1)
    module, out_tags = _Builder(gm, None, B, S).build_body(operand_tags, None, mask)
    return module, out_tags


def _real_tokens():
    mask = (torch.arange(S) < torch.tensor(LENGTHS)[:, None]).long()
    return mask, mask.reshape(-1).nonzero().squeeze(-1)


@pytest.mark.parametrize(
    "fn, grouped_mm, dtype",
    [
        (grouped_dispatch, None, torch.float32),
        (grouped_dispatch, torch.nn.functional.grouped_mm, torch.bfloat16),
        (batched_dispatch, None, torch.float32),
    ],
    ids=["grouped-transformers-op", "grouped-torch-op-bf16", "batched-llama4"],
)
def test_expert_dispatch_on_the_real_tokens_equals_the_padded_one(fn, grouped_mm, dtype):
    """The unpadded dispatch, run on the real tokens only, gives each of them what the padded
    dispatch gives it: its picks, sort, groups and inverse are those of the tokens present."""
    layer = bind(fn, grouped_mm=grouped_mm)
    inputs = _weights(dtype)
    module, out_tags = unpadded_body(layer, inputs)
    assert out_tags == [("BS", None)]
    mask, real = _real_tokens()
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32)
    (packed,) = module(inputs[0][real], *inputs[1:], real, real % S, cu, mask)
    assert packed.shape == (len(real), H)
    torch.testing.assert_close(packed, layer(*inputs)[real])  # the padded layer, eager
    assert ("torch.sort" in module.code) == (fn is grouped_dispatch) and ("bmm" in module.code) == (fn is batched_dispatch)


@pytest.mark.parametrize(
    "fn, variant, why",
    [
        (grouped_dispatch, "descending", "not one per expert"),
        (grouped_dispatch, "bins-not-one-per-expert", "not one per expert"),
        (grouped_dispatch, "keys-not-expert-indices", r"keys in \[0, None\)"),
        (grouped_dispatch, "rows-of-another-sort", "not in the order its offsets count"),
        (grouped_dispatch, "wrong-picks-per-token", "not the picks per token"),
        (grouped_dispatch, "positions-as-values", "computes with token positions or counts"),
        (grouped_dispatch, "counts-as-values", "computes with token positions or counts"),
        (grouped_dispatch, "inverse-not-arange", "not filled as the inverse"),
        (batched_dispatch, "experts-over-tokens", "across the token dimensions"),
    ],
)
def test_dispatch_that_is_not_token_wise_is_declined(fn, variant, why):
    """Negative: each variant breaks one property the proof rests on (groups in ascending expert
    order, one bin per expert, keys that are expert indices, rows in the order the offsets count,
    positions divided by the picks per token, positions and counts used only to index and group,
    the inverse of the permutation, experts kept apart from tokens): unpadding declines it."""
    from graphopt.passes.unpad import Decline

    with pytest.raises(Decline, match=why):
        unpadded_body(bind(fn, variant=variant), _weights())


# -- the models ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpointed_llama4_expert_layers_are_unpadded_at_varying_lengths():
    """Llama 4's MoE layers (every token through every expert with ``repeat`` and ``bmm``, a shared
    expert beside them) and its NoPE layer's query temperature, inside checkpointed layers; then a
    batch of another padded width, which Dynamo compiles with symbolic sizes (the layer's output
    is ``view``-ed to ``hidden.size()``, a size node rewritten per dimension). Left padding takes
    the exact fallback."""
    torch.manual_seed(0)
    model = build_tiny_model("llama4_text", attention_chunk_size=None)
    enable_checkpointing(model, use_reentrant=False)
    cm = CompiledModel(model)
    report = _check_unpadded(cm, right_batch([SEQ, 18, 7]))
    assert report.rule_counts[("unpad", "tokens")] == 1, report
    code = "\n".join(report.graph_code("after"))
    assert "tag_activation_checkpoint" in code and code.count("torch.ops.graphopt.varlen_attention") == 2
    assert "bmm" in code and "scaled_dot_product_attention" not in code
    report = _check_unpadded(cm, right_batch([30, 31, 2], seq=32, seed=1))
    assert report.rule_counts[("unpad", "tokens")] == 1 and "size()" in "\n".join(report.graph_code("before")), report
    _check_left_padding_falls_back(cm)


AUX_LOSS = dict(output_router_logits=True, router_aux_loss_coef=0.5)  # large, so its gradient counts
AUX_NOTE = "reduce over positions only through sums weighted by l_kwargs_attention_mask_"


def _notes(cm: CompiledModel) -> list[str]:
    return [n for g in cm.compile_reports for n in g.notes]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, dtype, grouped_mm, config",
    [("qwen3_moe", torch.bfloat16, "torch._grouped_mm", {}), ("mixtral", torch.float32, "grouped_mm_fallback", AUX_LOSS)],
    ids=["qwen3_moe-bf16", "mixtral-fp32-aux-loss"],
)
def test_qwen3_moe_and_mixtral_expert_layers_are_unpadded(family, dtype, grouped_mm, config):
    """The MoE families fine-tuned most: every layer routed (4 experts, 2 per token). transformers
    calls torch's grouped matmul for bf16 weights and its own fallback op otherwise: both are
    proven, each here in the graph that really runs. Mixtral also adds the router's auxiliary
    loss (``output_router_logits=True``), summed over the tokens weighted by the mask: the loss,
    and the router's gradient, equal eager's."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model(family, dtype=dtype, **config))
    report = _check_unpadded(cm, right_batch([SEQ, 18, 7]), dtype=dtype)
    assert report.rule_counts[("unpad", "tokens")] == 1, report
    code = cm.after_code()
    assert code.count(grouped_mm) == 4 and code.count("torch.ops.graphopt.varlen_attention") == 2
    assert ("scatter_add_" in code) == bool(config) and any(AUX_NOTE in n for n in _notes(cm)) == bool(config)


@pytest.mark.slow
def test_router_aux_loss_on_the_padded_fast_path_equals_eager():
    """Mask elision alone (unpadding off): the padded positions stay in the batch, and the
    auxiliary loss multiplies their router statistics by the mask's zeros. Loss and every
    gradient equal eager's; the mask is gone from the graph."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("qwen3_moe", **AUX_LOSS), options={"unpad": False})
    batch = right_batch([SEQ, 18, 7])
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step, real_positions=real_positions(batch))
    assert report.runtime["fast_path"] == 1 and not report.runtime["fallback"], report
    assert cm.counts()["mask_elision"] == 2 and any(AUX_NOTE in n for n in _notes(cm)), cm.compile_reports


@pytest.mark.slow
def test_router_aux_loss_over_every_position_keeps_the_mask(monkeypatch):
    """Negative: an auxiliary loss that counts the padded positions too (transformers' own function
    called without the mask, so its ``histc`` counts every token) would change under mask
    elision. Mask elision's rewrites are undone and it declines, naming the op; the run is eager's."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    original = modeling_qwen3_moe.load_balancing_loss_func

    def unmasked(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        return original(gate_logits, num_experts, top_k, None)

    monkeypatch.setattr(modeling_qwen3_moe, "load_balancing_loss_func", unmasked)
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model("qwen3_moe", **AUX_LOSS))
    batch = right_batch([SEQ, 18, 7])
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step)
    assert not cm.counts()["mask_elision"] and not cm.counts()["unpad"] and not report.guards, report
    declines = [d.reason for g in cm.compile_reports for d in g.declines if d.name == "mask_elision"]
    assert any("not proven weighted by l_kwargs_attention_mask_" in d and "histc" in d for d in declines), declines


# -- a router's auxiliary loss -------------------------------------------------------------------
#
# transformers' ``load_balancing_loss_func`` (31 families share it: Mixtral, Qwen2/3-MoE, gpt-oss,
# ...) sums router statistics over the tokens, weighted by the attention mask. Such a sum is the
# same over the padded batch and over the real tokens, so it is proven like any token-wise op.


def _unweighted_probs(logits, mask):  # divided by the real-token count, but summed over every token
    return torch.softmax(logits, dim=-1).sum(0).sum() / mask.sum()


def _weighted_mean(logits, mask):
    return (torch.softmax(logits, dim=-1) * mask.reshape(-1, 1).float()).mean(0).sum()


def _per_row_sum(logits, mask):
    return (torch.softmax(logits, dim=-1).view(B, S, EXPERTS) * mask[..., None].float()).sum(1).sum()


def _unweighted_counts(logits, mask):
    picks = torch.topk(logits, K, dim=-1)[1].reshape(-1)
    return torch.zeros(EXPERTS).scatter_add_(0, picks, torch.ones_like(picks, dtype=torch.float32)).sum() / mask.sum()


def _counts_at_computed_indices(logits, mask):
    keys = (torch.softmax(logits, dim=-1)[:, 0] * (EXPERTS - 1)).long()
    return torch.zeros(EXPERTS).scatter_add_(0, keys, mask.reshape(-1).float()).sum()


def _with_aux_loss(aux):
    """A causal attention over (B, S, H) tokens, then a router over them and ``aux(logits, mask)``
    (or transformers' auxiliary loss of two such routers): returns (the tokens, the loss)."""

    def layer(x, attention_mask, router):
        q = x.view(B, S, 1, H).transpose(1, 2)
        h = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(B, S, H)
        logits = torch.nn.functional.linear(h.reshape(-1, H), router)
        if aux is None:
            from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

            return h, load_balancing_loss_func((logits, 2 * logits), EXPERTS, K, attention_mask)
        return h, aux(logits, attention_mask)

    return layer


def unpadded_outer(fn, inputs: dict[str, torch.Tensor]):
    """The unpadded graph unpadding builds for ``fn(**inputs)``, an outer graph whose attention
    mask is ``inputs["attention_mask"]`` (no loss: its outputs are compared by the test), and the
    names of its inputs in order; raises :class:`graphopt.passes.unpad.Decline` as unpadding would."""
    from types import SimpleNamespace

    from graphopt.inspection import GraphReport
    from graphopt.options import GraphoptOptions
    from graphopt.passes import PassContext
    from graphopt.passes.unpad import _Builder

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)(**inputs)
    (gm,) = graphs
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    guard = SimpleNamespace(input_indices=(names.index("l_attention_mask_"),))
    ctx = PassContext(GraphoptOptions(), GraphReport(0, "", quiet=True))
    return _Builder.outer(gm, ctx, guard).build().module, names


@pytest.mark.parametrize("lengths", [[8, 5], [3, 8], [8, 8]], ids=["bucket-extras", "first-row-padded", "no-padding"])
def test_router_aux_loss_over_the_real_tokens_equals_the_padded_one(lengths):
    """transformers' auxiliary loss of two routers, unpadded: on the real tokens only (plus the
    bucket's extra tokens, gathered at padded positions, whose mask is 0) it is the padded
    loss; the attention is per row and the tokens return to their padded rows."""
    from graphopt.passes.unpad import packing_indices

    gen = torch.Generator().manual_seed(0)
    mask = (torch.arange(S) < torch.tensor(lengths)[:, None]).long()
    inputs = {"x": torch.randn(B, S, H, generator=gen), "attention_mask": mask, "router": torch.randn(EXPERTS, H, generator=gen)}
    layer = _with_aux_loss(None)
    module, names = unpadded_outer(layer, inputs)
    extra, n_real, packed = packing_indices(mask, lengths, 16)
    assert (n_real, packed) == (sum(lengths), 16)
    by_name = {f"l_{k}_": v for k, v in inputs.items()}
    h, aux = module(*(by_name[n] for n in names), extra["gather"], extra["positions"], extra["cu_seqlens"], extra["scatter"])
    h_ref, aux_ref = layer(**inputs)
    torch.testing.assert_close(aux, aux_ref)
    torch.testing.assert_close(h[mask.bool()], h_ref[mask.bool()])
    assert "scatter_add_" in module.code and "varlen_attention" in module.code


@pytest.mark.parametrize(
    "aux, why",
    [
        (_unweighted_probs, "only sums over all the tokens of values weighted by the attention mask"),
        (_weighted_mean, "reduces over a token dimension"),
        (_per_row_sum, "only sums over all the tokens of values weighted by the attention mask"),
        (_unweighted_counts, "without weighting them by the attention mask"),
        (_counts_at_computed_indices, "not known to be in its range"),
    ],
    ids=["unweighted-sum", "weighted-mean", "per-row-sum", "unweighted-counts", "counts-at-computed-indices"],
)
def test_router_statistics_that_read_padded_positions_are_declined(aux, why):
    """Negative: a sum over the tokens without the mask's weight, a mean (it divides by the padded
    count), a sum per row (rows are one packed row once unpadded), counts of unweighted picks, and
    weighted counts at indices computed from values (not known to be in range at padded
    positions): each is declined, naming the op."""
    from graphopt.passes.unpad import Decline

    gen = torch.Generator().manual_seed(0)
    mask = (torch.arange(S) < torch.tensor(LENGTHS)[:, None]).long()
    inputs = {"x": torch.randn(B, S, H, generator=gen), "attention_mask": mask, "router": torch.randn(EXPERTS, H, generator=gen)}
    with pytest.raises(Decline, match=why):
        unpadded_outer(_with_aux_loss(aux), inputs)


def test_output_hooks_are_installed_before_compiling():
    """transformers installs its output-capturing hooks on the first call that records router
    logits, under a lock Dynamo cannot trace (a compiled first call then runs the model eagerly
    for good, its loss in another graph). ``install_output_hooks`` installs them beforehand, once,
    on the model whose forward records, and the model's outputs are unchanged."""
    from graphopt.hf import install_output_hooks

    batch = right_batch([SEQ, 18, 7])
    reference = build_tiny_model("qwen3_moe", **AUX_LOSS)(**batch)
    model = build_tiny_model("qwen3_moe", **AUX_LOSS)
    assert install_output_hooks(model) and not install_output_hooks(model)
    assert model.model._output_capturing_hooks_installed
    out = model(**batch)
    assert len(out.router_logits) == len(reference.router_logits) == 2
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)


def test_moe_router_logits_captured_inside_checkpointed_layers_keep_one_graph():
    """transformers' output-capturing hook appends each checkpointed layer's router logits to the
    model's collector (the auxiliary loss reads them): graphopt lets Dynamo record that write, so
    the step is one graph, every rewrite fires and the loss (auxiliary loss included) and every
    gradient equal eager's, with Dynamo's defaults."""
    pytest.importorskip("transformers.utils.output_capturing", reason="this transformers captures outputs elsewhere")
    from graphopt.hf import install_output_hooks

    assert not torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    model = build_tiny_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    enable_checkpointing(model, use_reentrant=False)
    install_output_hooks(model)
    eager, compiled, report = compile_step(model, dict(make_batch("right", seq=16), use_cache=False))
    assert len(report.graphs) == 1 and not report.graph_breaks, explain_split(report)
    for name, n in {"mask_elision": 2, "fused_cross_entropy": 1, "unpad": 1}.items():
        assert report.counts[name] == n, explain_split(report)
    assert "tag_activation_checkpoint" in "\n".join(report.graph_code("after"))
    assert_steps_equal(eager, compiled)


def test_other_writes_inside_checkpointed_bodies_are_still_refused():
    """Negative: a checkpointed body that appends to a list of its caller is not one of the two
    writes graphopt allows: Dynamo refuses it as by default (the step is split), and the result
    is eager's."""
    seen = []

    def body(x):
        y = x.sin()
        seen.append(y)
        return y.cos()

    def step(x):
        return torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False).sum() + seen[-1].sum()

    x = torch.randn(4, requires_grad=True)
    torch._dynamo.reset()
    with graphopt.capture() as report:
        out = torch.compile(step, backend="graphopt")(x)
    assert "HOP: Unsafe side effect" in report.graph_breaks, report.graph_breaks
    seen.clear()
    torch.testing.assert_close(out, step(x.detach()))
