"""The tiny model builders and batch layouts: every family trains one eager step, and every layout
holds the invariants the rest of the suite relies on."""

from __future__ import annotations

import pytest
import torch

from graphopt.tiny_models import (
    FAMILIES,
    IGNORE_INDEX,
    LAYOUTS,
    ROTARY_LAYOUT,
    build_tiny_model,
    collate_flattening,
    describe_batch,
    make_batch,
    tiny_config,
)


def _is_ones_then_zeros(mask: torch.Tensor) -> bool:
    return bool((mask.diff(dim=-1) <= 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_one_eager_step(family):
    model = build_tiny_model(family)
    assert model.training and model.config.num_key_value_heads == 2 and model.config.vocab_size == 128
    for layout in ("right", "none"):
        model.zero_grad(set_to_none=True)
        loss = model(**make_batch(layout, seed=1)).loss
        loss.backward()
        assert torch.isfinite(loss), (family, layout)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (family, layout)


def test_weights_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_model("llama", seed=3), build_tiny_model("llama", seed=3), build_tiny_model("llama", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    bf16 = build_tiny_model("llama", seed=3, dtype=torch.bfloat16)
    assert torch.equal(bf16.lm_head.weight, a.lm_head.weight.bfloat16())


def test_family_specific_config():
    assert build_tiny_model("gemma2").config._attn_implementation == "eager"
    assert tiny_config("gemma2").attn_logit_softcapping is not None
    assert set(tiny_config("gemma2").layer_types) == {"full_attention"}
    assert tiny_config("mistral").sliding_window is None
    assert tiny_config("qwen2").sliding_window is None
    assert tiny_config("mistral", sliding_window=4).sliding_window == 4
    assert "sliding_attention" in tiny_config("qwen2", sliding_window=4).layer_types
    assert "sliding_attention" in tiny_config("gemma2", sliding_window=4).layer_types
    assert tiny_config("glm4").rope_parameters["partial_rotary_factor"] == ROTARY_LAYOUT["glm4"]["partial"]
    assert tiny_config("gemma").tie_word_embeddings and not tiny_config("llama").tie_word_embeddings


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_deterministic_int64_and_described(layout):
    a, b = make_batch(layout, seed=5), make_batch(layout, seed=5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.int64 and v.device.type == "cpu" for v in a.values())
    assert ("attention_mask" in a) == (layout not in ("none", "packed"))
    assert ("position_ids" in a) == (layout == "packed")
    assert "targets" in describe_batch(a)


@pytest.mark.parametrize("seed", range(4))
def test_padded_layouts(seed):
    right = make_batch("right", batch=4, seq=16, seed=seed)
    mask = right["attention_mask"]
    assert _is_ones_then_zeros(mask)
    assert (mask.sum(-1) == 16).any() and (mask.sum(-1) < 16).any() and (mask.sum(-1) > 0).all()
    assert torch.equal(right["labels"] == IGNORE_INDEX, mask == 0)

    left = make_batch("left", batch=4, seq=16, seed=seed)
    assert _is_ones_then_zeros(left["attention_mask"].flip(-1))
    assert torch.equal(left["labels"] == IGNORE_INDEX, left["attention_mask"] == 0)
    for r_ids, r_mask, l_ids, l_mask in zip(right["input_ids"], mask, left["input_ids"], left["attention_mask"]):
        assert torch.equal(r_ids[r_mask.bool()], l_ids[l_mask.bool()])  # the same rows, pads moved first

    holes = make_batch("holes", batch=4, seq=16, seed=seed)["attention_mask"]
    inside = (holes[:, 1:-1] == 0).any(-1) & (holes[:, 0] == 1) & (holes[:, -1] == 1)
    assert inside.any() and (holes.sum(-1) == 16).any()

    unmasked = make_batch("pad_labels_unmasked", batch=4, seq=16, seed=seed)
    assert _is_ones_then_zeros(unmasked["attention_mask"]) and (unmasked["attention_mask"] == 0).any()
    assert torch.equal(unmasked["labels"], unmasked["input_ids"])

    all_pad = make_batch("all_pad_row", batch=4, seq=16, seed=seed)
    empty = all_pad["attention_mask"].sum(-1) == 0
    assert _is_ones_then_zeros(all_pad["attention_mask"]) and empty.sum() == 1
    assert (all_pad["labels"][empty] == IGNORE_INDEX).all() and (all_pad["attention_mask"].sum(-1) == 16).any()

    assert torch.equal(make_batch("ones", seed=seed)["attention_mask"], torch.ones(2, 16, dtype=torch.int64))


@pytest.mark.parametrize("batch,seq,seed", [(1, 16, 0), (2, 16, 1), (3, 33, 2), (1, 3, 3), (1, 2, 4)])
def test_packed_matches_hf_collator_and_packed_docs(batch, seq, seed):
    packed = make_batch("packed", batch=batch, seq=seq, seed=seed)
    docs = make_batch("packed_docs", batch=batch, seq=seq, seed=seed)
    assert packed["input_ids"].shape == (batch, seq)
    positions = packed["position_ids"]
    assert (positions[:, 0] == 0).all() and ((positions.diff(dim=-1) == 1) | (positions[:, 1:] == 0)).all()
    lengths = docs["attention_mask"].sum(-1)
    assert _is_ones_then_zeros(docs["attention_mask"]) and int(lengths.sum()) == batch * seq
    if seq >= 3:
        assert (lengths == 1).any()

    documents = [row[m.bool()].tolist() for row, m in zip(docs["input_ids"], docs["attention_mask"])]
    assert [t for doc in documents for t in doc] == packed["input_ids"].flatten().tolist()
    for row in range(batch):  # each packed row is exactly what HF's collator makes of its documents
        row_docs, total = [], 0
        while total < seq:
            row_docs.append(documents.pop(0))
            total += len(row_docs[-1])
        hf = collate_flattening(row_docs)
        for key in ("input_ids", "labels", "position_ids"):
            assert hf[key].tolist() == packed[key][row : row + 1].tolist(), key

    # The same (prefix, target) pairs after HF's shift, so the same mean loss.
    packed_targets = packed["labels"][:, 1:][packed["labels"][:, 1:] != IGNORE_INDEX]
    docs_targets = docs["labels"][:, 1:][docs["labels"][:, 1:] != IGNORE_INDEX]
    assert packed_targets.tolist() == docs_targets.tolist()
    assert len(docs_targets) == int((lengths - 1).sum())


def test_packed_loss_equals_padded_docs_loss():
    model = build_tiny_model("llama")
    packed = make_batch("packed", batch=2, seq=24, seed=7)
    docs = make_batch("packed_docs", batch=2, seq=24, seed=7)
    # A cache object (use_cache=True, the config default) turns off HF's packed-sequence detection.
    torch.testing.assert_close(model(**packed, use_cache=False).loss, model(**docs, use_cache=False).loss)
