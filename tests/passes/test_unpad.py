"""Unpadding (issue 10): a right-padded batch runs the decoder on its real tokens only.

Every positive test compares eager on the padded batch with the compiled unpadded step (the loss,
every parameter gradient and the logits at real positions), and asserts that the unpadded graph
ran (``report.runtime["unpad"]``). Every negative test asserts that it did not.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.passes.dimension_tags import view_tags as _view_tags
from graphopt.passes.unpad import packing_indices
from graphopt.tiny_models import FAMILIES, IGNORE_INDEX, PAD_TOKEN_ID, build_tiny_model, make_batch
from tests.support.harness import CompiledModel, assert_steps_equal, real_positions

# graphopt's rewrites, checked without Inductor's C++ code generation (tests/conftest.py)
pytestmark = pytest.mark.aot_eager

SEQ = 24


def right_batch(lengths: list[int], seq: int = SEQ, *, vocab: int = 128, seed: int = 0) -> dict:
    """A right-padded batch whose rows hold ``lengths`` real tokens; labels -100 at pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(PAD_TOKEN_ID + 1, vocab, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD_TOKEN_ID)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(family: str = "llama", **options) -> CompiledModel:
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = CompiledModel(build_tiny_model(family), options=options)
        return cache[key]

    return get


def _check_unpadded(cm: CompiledModel, batch: dict, dtype=torch.float32):
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step, dtype=dtype, real_positions=real_positions(batch))
    assert report.runtime["unpad"] == 1, report
    assert not report.runtime["fallback"], report
    return report


def _check_left_padding_falls_back(cm: CompiledModel):
    """Negative: a left-padded batch on the same graph takes the exact masked fallback, not unpad."""
    left = make_batch("left", batch=3, seq=SEQ, seed=4) | {"use_cache": False}
    eager, step, report = cm.step(left)
    assert_steps_equal(eager, step)
    assert report.runtime["fallback"] == 1 and not report.runtime["unpad"], report


@pytest.mark.slow
@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([SEQ, SEQ, SEQ], id="no-padding"),
        pytest.param([SEQ, 18, 7], id="some-padding"),
        pytest.param([SEQ, 1, 3], id="rows-of-length-1"),
        pytest.param([5, 2, 9], id="mostly-padding"),
    ],
)
def test_llama_unpadded_equals_eager(compiled, lengths):
    report = _check_unpadded(compiled("llama"), right_batch(lengths))
    saved = 3 * SEQ - max(sum(lengths), 0)
    assert report.runtime["unpad_tokens_saved"] + report.runtime["unpad_bucket_waste"] == saved


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "gemma2")])
def test_every_sdpa_family_unpadded_equals_eager(compiled, family):
    cm = compiled(family)
    eager, step, report = cm.step(make_batch("right", batch=3, seq=SEQ, pad_fraction=0.4) | {"use_cache": False})
    assert_steps_equal(eager, step, real_positions=real_positions(make_batch("right", batch=3, seq=SEQ, pad_fraction=0.4)))
    assert cm.counts()["unpad"] == 1
    assert report.runtime["unpad"] == 1, report


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_layers_are_unpadded(reentrant):
    """With activation checkpointing each layer's body is unpadded too, and the recomputation in
    the backward runs the unpadded body."""
    from tests.support.harness import enable_checkpointing

    model = build_tiny_model("llama")
    enable_checkpointing(model, use_reentrant=reentrant)
    cm = CompiledModel(model)
    _check_unpadded(cm, right_batch([SEQ, 10, 4]))
    assert cm.counts()["unpad"] == 1
    assert "tag_activation_checkpoint" in cm.after_code() and "graphopt.varlen_attention" in cm.after_code()


WINDOW = 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mistral", {}),  # every layer sliding
        ("gemma3_text", {}),  # sliding and full
        # every layer sliding: the full mask transformers still builds is left unread
        ("gemma3_text", {"layer_types": ["sliding_attention", "sliding_attention"]}),
    ],
    ids=["mistral", "gemma3", "gemma3-all-sliding"],
)
def test_sliding_window_layers_are_unpadded(family, overrides):
    """Mask elision runs a padded sliding layer as per-row windowed varlen attention; unpadding
    gives that attention the packed boundaries (each row's real tokens one document), so a window
    shorter than the rows still holds the same keys. Left padding takes the exact fallback."""
    torch.manual_seed(0)
    cm = CompiledModel(build_tiny_model(family, sliding_window=WINDOW, **overrides))
    batch = right_batch([SEQ, 18, 7])
    report = _check_unpadded(cm, batch)
    sliding = report.rule_counts[("mask_elision", "sdpa_sliding_causal_padding")]
    assert sliding >= 1, report
    assert report.rule_counts[("unpad", "tokens")] == 1, report
    code = cm.after_code()
    assert code.count("torch.ops.graphopt.varlen_attention") == 2  # both layers, per document
    assert "unpad_cu_seqlens" in code
    _check_left_padding_falls_back(cm)


@pytest.mark.slow
def test_checkpointed_sliding_window_layers_are_unpadded():
    from tests.support.harness import enable_checkpointing

    torch.manual_seed(0)
    model = build_tiny_model("gemma3_text", sliding_window=WINDOW)
    enable_checkpointing(model, use_reentrant=False)
    cm = CompiledModel(model)
    report = _check_unpadded(cm, right_batch([SEQ, 10, 4]))
    assert report.rule_counts[("mask_elision", "sdpa_sliding_causal_padding")] == 1, report
    assert cm.counts()["unpad"] == 1
    assert "tag_activation_checkpoint" in cm.after_code()


@pytest.mark.slow
def test_kv_cache_outputs_are_scattered_back(compiled):
    """With ``use_cache=True`` (most configs' default) the graph also returns every layer's keys
    and values, (B, H, S, D): they come back at padded shape, exact at real positions."""
    cm = compiled("llama")
    batch = right_batch([SEQ, 10, 4]) | {"use_cache": True}
    eager_out = cm.model(**batch)
    with graphopt.capture() as report:
        out = cm.compiled(**batch)
    assert report.runtime["unpad"] == 1, report
    real = batch["attention_mask"].bool()
    for eager_layer, layer in zip(eager_out.past_key_values.layers, out.past_key_values.layers):
        for name in ("keys", "values"):
            expected, got = getattr(eager_layer, name), getattr(layer, name)
            assert got.shape == expected.shape
            torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real])


@pytest.mark.slow
def test_drop_logits_is_unpadded_too(compiled):
    cm = compiled("llama", drop_logits=True)
    batch = right_batch([SEQ, 10, 4])
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step)
    assert step.logits.numel() == 0
    assert report.runtime["unpad"] == 1, report


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "cohere"])  # cohere: RoPE in fp32 on upcast q/k
def test_bf16_unpadded_equals_eager(family):
    cm = CompiledModel(build_tiny_model(family, dtype=torch.bfloat16))
    batch = right_batch([SEQ, 10, 4])
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step, dtype=torch.bfloat16, real_positions=real_positions(batch))
    assert report.runtime["unpad"] == 1, report


@pytest.mark.slow
def test_unfused_loss_is_unpadded_too(compiled):
    _check_unpadded(compiled("llama", fused_cross_entropy=False), right_batch([SEQ, 10, 4]))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["left", "pad_labels_unmasked", "holes"])
def test_batches_the_guard_refuses_take_the_exact_fallback(compiled, layout):
    cm = compiled("llama")
    batch = make_batch(layout, batch=3, seq=SEQ, pad_fraction=0.4) | {"use_cache": False}
    eager, step, report = cm.step(batch)
    assert_steps_equal(eager, step, real_positions=real_positions(batch) if layout != "left" else None)
    assert report.runtime["fallback"] == 1 and not report.runtime["unpad"], report


@pytest.mark.slow
def test_option_off_keeps_the_padded_fast_path(compiled):
    cm = compiled("llama", unpad=False)
    eager, step, report = cm.step(right_batch([SEQ, 10, 4]))
    assert_steps_equal(eager, step, real_positions=real_positions(right_batch([SEQ, 10, 4])))
    assert report.runtime["fast_path"] == 1 and not report.runtime["unpad"], report
    assert cm.counts()["unpad"] == 0 and cm.counts()["mask_elision"] == 2


@pytest.mark.slow
def test_eager_attention_is_unpadded_with_its_softcap_and_window():
    """Gemma 2's eager attention (softcap 50; layer 0 slides over 4 tokens) runs per row as varlen
    attention after mask elision (each row one document), and unpadding gives it the packed rows."""
    cm = CompiledModel(build_tiny_model("gemma2", sliding_window=WINDOW))
    report = _check_unpadded(cm, right_batch([SEQ, 10, 4]))
    assert report.rule_counts[("mask_elision", "eager_causal_padding")] == 1, report
    assert report.rule_counts[("mask_elision", "eager_sliding_causal_padding")] == 1, report
    code = cm.after_code()
    assert code.count("graphopt.varlen_attention") == 2 and "softmax" not in code and "unpad_cu_seqlens" in code


@pytest.mark.slow
@pytest.mark.parametrize("promised", [False, True], ids=["default", "padded_outputs_unused"])
def test_inference_graph_without_loss_is_unpadded_only_when_padded_outputs_are_unused(promised):
    """No loss says which outputs matter: the graph keeps its padded shape (and its mask) unless
    the user promises padded outputs are unused; then it runs unpadded, exact at real positions,
    logits and K/V scattered back."""
    model = build_tiny_model("llama").eval()
    cm = CompiledModel(model, options={"padded_outputs_unused": promised})
    batch = right_batch([SEQ, 10, 4]) | {"use_cache": True}
    del batch["labels"]
    with torch.no_grad():
        eager = model(**batch)
        with graphopt.capture() as report:
            out = cm.compiled(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], eager.logits[real])
    for eager_layer, layer in zip(eager.past_key_values.layers, out.past_key_values.layers):
        torch.testing.assert_close(layer.keys.transpose(1, 2)[real], eager_layer.keys.transpose(1, 2)[real])
    assert report.counts["unpad"] == int(promised) and report.runtime["unpad"] == int(promised), report


@pytest.mark.slow
def test_varying_lengths_compile_a_bounded_number_of_times():
    """20 batches of different padded lengths and row lengths: every step is unpadded and exact,
    and Inductor compiles at most 4 graphs (the outer graph static then dynamic, each with its
    unpadded graph; the packed length is dynamic from the first compile)."""
    from torch._dynamo.utils import counters

    cm = CompiledModel(build_tiny_model("llama"))
    gen = torch.Generator().manual_seed(1)
    before = counters["aot_autograd"]["total"]
    for step in range(20):
        seq = int(torch.randint(8, 40, (), generator=gen))
        lengths = [seq] + [int(torch.randint(1, seq + 1, (), generator=gen)) for _ in range(2)]
        _check_unpadded(cm, right_batch(lengths, seq, seed=step))
    assert counters["aot_autograd"]["total"] - before <= 4, counters["aot_autograd"]


def test_packing_indices_follow_the_rows():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    extra, n_real, packed = packing_indices(mask, [3, 1, 4], bucket=4)
    assert (n_real, packed) == (8, 8)
    assert extra["gather"].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert extra["positions"].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert extra["cu_seqlens"].tolist() == [0, 3, 4, 8, 8]
    assert extra["scatter"].tolist() == extra["gather"].tolist()
    extra, n_real, packed = packing_indices(mask, [3, 1, 4], bucket=5)
    assert (n_real, packed) == (8, 10)
    # the two extra tokens gather the first padded positions, form one more document, and
    # scatter to the dropped row B*S
    assert extra["gather"].tolist()[8:] == [3, 5]
    assert extra["positions"].tolist()[8:] == [0, 1]
    assert extra["cu_seqlens"].tolist() == [0, 3, 4, 8, 10]
    assert extra["scatter"].tolist()[8:] == [12, 12]


@pytest.mark.parametrize(
    "in_shape, in_tags, out_shape, expected",
    [
        ((2, 6, 8), ("B", "S", None), (2, 6, 2, 4), ("B", "S", None, None)),
        ((2, 6, 8), ("B", "S", None), (12, 8), ("BS", None)),
        ((12, 8), ("BS", None), (2, 6, 8), ("B", "S", None)),
        ((2, 6, 8), ("B", "S", None), (2, 48), None),  # tokens and features merged
        ((2, 6, 8), ("B", "S", None), (96,), None),
        ((2, 2, 2, 6, 4), ("B", None, None, "S", None), (2, 4, 6, 4), ("B", None, "S", None)),
        ((1, 6, 8), (None, "S", None), (6, 8), ("S", None)),
    ],
)
def test_view_tags(in_shape, in_tags, out_shape, expected):
    assert _view_tags(list(in_shape), in_tags, list(out_shape), 2, 6) == expected


def test_only_unread_values_without_effects_are_erased_before_unpadding():
    """Unpad first erases what nothing reads (an unused mask), never a write into a buffer whose
    node has no users (DeepSeek-V3 fills its key with copy_ into new_empty)."""
    import torch.fx as fx

    from graphopt import analysis

    def fn(x):
        buf = x.new_empty(4, 6)
        buf[:, :3].copy_(x)
        buf[:, 3:].fill_(0.0).add_(x * 2)  # (mul_(0) of new_empty memory could be NaN)
        unused = (x.sum(-1) <= 3) & (x.amax(-1) > 0)  # noqa: F841
        return buf

    gm = fx.symbolic_trace(fn)
    assert analysis.erase_unused(gm.graph) == 5  # sum, le, amax, gt and the &
    gm.recompile()
    x = torch.randn(4, 3)
    torch.testing.assert_close(gm(x), fn(x), rtol=0, atol=0)
    assert "copy_" in gm.code and "add_" in gm.code and "amax" not in gm.code


def _buffer_builder(fill):
    """A :class:`graphopt.passes.unpad._Builder` over the graph of ``fill(a, b)``, whose inputs
    are tagged (batch, heads, seq, dim) with real example values (B=2, S=24): enough state for its
    ``new_empty`` rule (``_assembled``), which needs no packing inputs."""
    import torch.fx as fx

    from graphopt.passes.unpad import _Builder

    gm = fx.symbolic_trace(fill)
    shapes = {"a": (2, 4, 24, 16), "b": (2, 4, 24, 8)}
    values = {}
    for node in gm.graph.nodes:  # example values of every node, by running it
        if node.op == "placeholder":
            values[node] = torch.randn(shapes[node.target])
        elif node.op != "output":
            args = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = getattr(args[0][0], node.target)(*args[0][1:], **args[1]) if node.op == "call_method" else node.target(*args[0], **args[1])
        node.meta["example_value"] = values.get(node)
    builder = _Builder.__new__(_Builder)
    builder.tags = {n: ("B", None, "S", None) for n in gm.graph.nodes if n.op == "placeholder"}
    builder.t_node = "T"
    builder.sorts, builder.multiples = {}, {}
    (buffer,) = [n for n in gm.graph.nodes if n.target == "new_empty"]
    return builder, buffer


def test_a_buffer_filled_with_token_values_is_a_token_value():
    """MLA's key: nope and rope channels copied into slices of one new buffer. The buffer takes
    their tags and its sizes are rewritten (batch 1, sequence the packed length)."""

    def fill(a, b):
        buf = a.new_empty(2, 4, 24, 24)
        buf[..., :16].copy_(a)
        buf[..., 16:].copy_(b)
        return buf

    builder, buffer = _buffer_builder(fill)
    tags, args, _ = builder._untracked(buffer)
    assert tags == ("B", None, "S", None)
    assert args[1:] == (1, 4, "T", 24)


def _fill_cutting_the_sequence(a, b):
    buf = a.new_empty(2, 4, 48, 16)
    buf[:, :, :24].copy_(a)  # the sequence of two tensors stacked: positions of two rows
    buf[:, :, 24:, :8].copy_(b)
    return buf


def _fill_with_an_int_index(a, b):
    buf = a.new_empty(2, 4, 24, 2, 16)
    buf[..., 0, :].copy_(a)
    return buf


def _fill_with_other_layouts(a, b):
    buf = a.new_empty(2, 4, 24, 24)
    buf[..., :16].copy_(a)
    buf[..., 16:].copy_(b)
    return buf


@pytest.mark.parametrize(
    "fill, tags_b, why",
    [
        (_fill_cutting_the_sequence, ("B", None, "S", None), "slices a token dimension"),
        (_fill_with_an_int_index, ("B", None, "S", None), "index that is not slices"),
        (_fill_with_other_layouts, (None, None, "S", None), "laid out unlike the slice"),
    ],
    ids=["cuts-the-sequence", "int-index", "parts-laid-out-differently"],
)
def test_buffers_filled_across_positions_are_declined(fill, tags_b, why):
    """Negative: a write that cuts a token dimension, goes through an int index, or copies parts
    whose token dimensions differ, is not a per-position fill: unpadding declines it."""
    from graphopt.passes.unpad import Decline

    builder, buffer = _buffer_builder(fill)
    (b,) = [n for n in builder.tags if n.target == "b"]
    builder.tags[b] = tags_b
    with pytest.raises(Decline, match=why):
        builder._untracked(buffer)
