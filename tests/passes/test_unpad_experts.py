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

from graphopt.tiny_models import build_tiny_model
from tests.passes.test_unpad import SEQ, _check_left_padding_falls_back, _check_unpadded, right_batch
from tests.support.harness import CompiledModel, enable_checkpointing

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


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, dtype, grouped_mm",
    [("qwen3_moe", torch.bfloat16, "torch._grouped_mm"), ("mixtral", torch.float32, "grouped_mm_fallback")],
    ids=["qwen3_moe-bf16", "mixtral-fp32"],
)
def test_qwen3_moe_and_mixtral_expert_layers_are_unpadded(family, dtype, grouped_mm):
    """The MoE families fine-tuned most: every layer routed (4 experts, 2 per token). transformers
    calls torch's grouped matmul for bf16 weights and its own fallback op otherwise: both are
    proven, each here in the graph that really runs."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model(family, dtype=dtype))
    report = _check_unpadded(cm, right_batch([SEQ, 18, 7]), dtype=dtype)
    assert report.rule_counts[("unpad", "tokens")] == 1, report
    code = cm.after_code()
    assert code.count(grouped_mm) == 4 and code.count("torch.ops.graphopt.varlen_attention") == 2
