"""Tiny Hugging Face causal LMs and the batches we feed them, built locally from configs.

The tests, the examples, the benchmark and ``python -m graphopt explain`` all build their models and
batches here, so that every family and every padding layout is spelled once. Nothing is downloaded:
configs come from ``AutoConfig.for_model`` and weights from a seeded initialisation.

transformers is imported inside the functions that need it, so that ``import graphopt`` stays lean.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "cohere", "glm4", "smollm3")
# Families whose point is their sliding-window layers, built only with ``sliding_window=W``
# (tests of windowed attention); layer 0 slides, layer 1 attends fully.
WINDOWED_FAMILIES = ("gemma3_text", "cohere2", "exaone4", "gpt_oss")
# Families whose attention is not plain "RoPE then SDPA" (see ``_variant_fields``): DeepSeek-V3's
# multi-head latent attention and Llama 4's NoPE layers, chunked layers and qk norm after RoPE.
VARIANT_FAMILIES = ("deepseek_v3", "llama4_text", "qwen3_moe", "mixtral")

# How each family rotates q/k, read in transformers 5.23 ``models/<family>/modeling_<family>.py``.
#   "half":        rotate_half pairs dim i with dim i + d/2 (slice, neg, cat) and cos/sin are cat((f, f)).
#   "interleaved": rotate_half pairs dims 2i and 2i+1 (x[..., ::2], x[..., 1::2], stack, flatten) and
#                  cos/sin repeat each frequency twice (repeat_interleave).
# "partial" is the fraction of head_dim that is rotated in the tiny config; the rest passes through.
# Cohere also upcasts q/k to fp32 around the rotation. SmolLM3 skips RoPE on every 4th layer (NoPE),
# which never happens with the 2 tiny layers unless a test asks for it (``no_rope_layers=[1, 0]``:
# layer 1 without RoPE). DeepSeek-V3 rotates only the last qk_rope_head_dim channels of each head
# (q = cat(q_nope, rope(q_pe))); Llama 4 rotates adjacent pairs as complex products.
ROTARY_LAYOUT = {
    "llama": {"layout": "half", "partial": 1.0},
    "mistral": {"layout": "half", "partial": 1.0},
    "qwen2": {"layout": "half", "partial": 1.0},
    "qwen3": {"layout": "half", "partial": 1.0},
    "gemma": {"layout": "half", "partial": 1.0},
    "gemma2": {"layout": "half", "partial": 1.0},
    "phi3": {"layout": "half", "partial": 1.0},  # supports partial_rotary_factor, default 1.0
    "cohere": {"layout": "interleaved", "partial": 1.0},
    "glm4": {"layout": "interleaved", "partial": 0.5},  # partial_rotary_factor 0.5 by default
    "smollm3": {"layout": "half", "partial": 1.0},
    "gemma3_text": {"layout": "half", "partial": 1.0},
    "cohere2": {"layout": "interleaved", "partial": 1.0},
    "exaone4": {"layout": "half", "partial": 1.0},
    "gpt_oss": {"layout": "half", "partial": 1.0},
    "deepseek_v3": {"layout": "interleaved", "partial": 8 / 24},  # rope_interleave, qk_rope_head_dim 8 of 24
    "llama4_text": {"layout": "interleaved", "partial": 1.0},
}

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

# Gemma2's reference attention is eager (matmul, softcap, additive mask, softmax, matmul).
_DEFAULT_ATTENTION = {"gemma2": "eager", "gpt_oss": "eager"}  # gpt-oss: eager with sink logits


def _window_fields(family: str, window: int | None, fields: dict) -> dict:
    """Config fields that set the family's sliding window: off when ``window`` is None, else the
    family's own windowed variant (for tests that must decline it)."""
    if family in ("mistral", "phi3"):
        return {"sliding_window": window}  # every layer when set
    if family == "qwen2":
        # Layers >= max_window_layers slide: here layer 0 is full and the others slide.
        return {"use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": 1}
    if family == "gemma2":
        if window is not None:
            return {"sliding_window": window}  # its default layer_types: sliding, full, sliding, ...
        # Gemma2 builds its sliding mask whatever the layer types, so the size stays set (larger
        # than any position) while no layer uses it.
        return {
            "sliding_window": fields["max_position_embeddings"],
            "layer_types": ["full_attention"] * fields["num_hidden_layers"],
        }
    if family == "smollm3":
        # SmolLM3 slides on its NoPE layers only (none by default: pass no_rope_layers too).
        return {} if window is None else {"use_sliding_window": True, "sliding_window": window}
    if family in WINDOWED_FAMILIES:
        if window is None:
            raise ValueError(f"tiny {family} is built with sliding_window=W only")
        experts = {"num_local_experts": 4, "num_experts_per_tok": 2} if family == "gpt_oss" else {}
        return {"sliding_window": window, "layer_types": ["sliding_attention", "full_attention"], **experts}
    if window is not None:
        raise ValueError(f"tiny {family} has no sliding-window variant here")
    return {}


def _variant_fields(family: str) -> dict:
    """Config defaults of the ``VARIANT_FAMILIES``, as small as they build.

    - deepseek_v3: MLA with no q LoRA, a kv latent of 16, per head 16 channels without RoPE and 8
      with (qk head dim 24; its ``head_dim`` is the rotary dim, which sizes the tables) and values
      of 12; as many kv heads as query heads (MLA expands the latent per head); layer 0 dense,
      layer 1 a mixture of 4 routed experts (2 per token).
    - llama4_text: layer 0 with RoPE (as complex products) and the qk L2 norm after it, chunked
      attention over chunks of 8 tokens; layer 1 without RoPE (and without the norm), full
      attention with Llama 4's position-dependent query temperature; 4 experts per layer, 1 per
      token. ``attention_chunk_size=None`` makes both layers full attention.
    - qwen3_moe, mixtral: every layer a mixture of 4 experts, 2 per token (transformers' grouped
      experts), Qwen3-MoE with its qk norm and 32 channels per expert.
    """
    if family == "deepseek_v3":
        return {
            "num_key_value_heads": TINY_DIMS["num_attention_heads"], "q_lora_rank": None, "kv_lora_rank": 16,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "head_dim": 8, "v_head_dim": 12, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
            "moe_intermediate_size": 32,
        }
    if family == "llama4_text":
        return {
            "no_rope_layers": [1, 0], "attention_chunk_size": 8, "num_local_experts": 4, "num_experts_per_tok": 1,
            "intermediate_size_mlp": TINY_DIMS["intermediate_size"],
        }
    if family == "qwen3_moe":
        return {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    if family == "mixtral":
        return {"num_local_experts": 4, "num_experts_per_tok": 2}
    return {}


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with the tiny dimensions of ``TINY_DIMS``.

    Four query heads share two key/value heads (GQA), head_dim is ``hidden_size //
    num_attention_heads`` (16) unless ``head_dim`` is overridden, pad/bos/eos ids are 0/1/2 (inside
    the vocabulary, which Phi3, SmolLM3 and GLM4 need to build), dropout is 0, tie_word_embeddings
    keeps the family's default, and no layer uses a sliding window. ``sliding_window=W`` builds the
    family's windowed variant instead (mistral, phi3: every layer; qwen2: layers >= 1; gemma2 and
    the ``WINDOWED_FAMILIES``: alternate layers, layer 0 sliding; smollm3: its NoPE layers, given
    by ``no_rope_layers``). The ``VARIANT_FAMILIES`` take their defaults from ``_variant_fields``.
    Other ``overrides`` are passed to the config as they are.
    """
    from transformers import AutoConfig

    known = FAMILIES + WINDOWED_FAMILIES + VARIANT_FAMILIES
    if family not in known:
        raise ValueError(f"unknown family {family!r}; expected one of {known}")
    window = overrides.pop("sliding_window", None)
    fields = dict(TINY_DIMS, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    fields["attention_dropout"] = 0.0
    fields.update(_variant_fields(family))
    fields.update(overrides)
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if family == "gemma2":
        # Scores scaled by 1/sqrt(head_dim), as in the real models (the default 256 is their head_dim).
        fields.setdefault("query_pre_attn_scalar", fields["head_dim"])
    for key, value in _window_fields(family, window, fields).items():
        fields.setdefault(key, value)
    return AutoConfig.for_model(family, **fields)


def llama_config(
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 8000,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    **overrides,
):
    """A Llama config at benchmark size (defaults: hidden 256, 4 layers, 4/2 heads, vocab 8000).

    ``intermediate_size`` defaults to ``2 * hidden_size``; head_dim is ``hidden_size //
    num_attention_heads``.
    """
    return tiny_config(
        "llama",
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        **overrides,
    )


def build_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``AutoModelForCausalLM.from_config(config)`` on the CPU, in train mode, with seeded weights.

    Weights are initialised in fp32 under ``seed`` (the global RNG is left untouched) and then cast
    to ``dtype``, so a bf16 model is exactly the cast of the fp32 model with the same seed.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype=dtype).train()


def build_tiny_model(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config_overrides,
):
    """A tiny ``family`` model (see ``tiny_config``), in train mode, with seeded weights.

    ``attn_implementation`` defaults to the family's reference: "eager" for gemma2 (softcapping),
    "sdpa" for the others.
    """
    config = tiny_config(family, **config_overrides)
    attn = attn_implementation or _DEFAULT_ATTENTION.get(family, "sdpa")
    return build_model(config, seed=seed, dtype=dtype, attn_implementation=attn)


# ---------------------------------------------------------------------------------------------------
# Batches

LAYOUTS = (
    "right",
    "left",
    "holes",
    "pad_labels_unmasked",
    "all_pad_row",
    "none",
    "ones",
    "packed",
    "packed_docs",
)
IGNORE_INDEX = -100


def make_batch(
    layout: str,
    *,
    batch: int = 2,
    seq: int = 16,
    vocab: int = 128,
    seed: int = 0,
    pad_fraction: float = 0.25,
    pad_token_id: int = PAD_TOKEN_ID,
) -> dict[str, torch.Tensor]:
    """Model kwargs for one training step, as int64 CPU tensors.

    Real tokens are drawn uniformly from the vocabulary without ``pad_token_id``; padding positions
    hold ``pad_token_id``. HF shifts labels inside the model, so ``labels[:, 0]`` is never a target.

    Keys: ids = input_ids, mask = attention_mask, pos = position_ids. Shapes are (batch, seq) unless
    said otherwise.

    | layout                | keys              | what                                                        |
    | --------------------- | ----------------- | ----------------------------------------------------------- |
    | "right"               | ids, mask, labels | right padding: each mask row is ones then zeros; >= 1 row   |
    |                       |                   | unpadded and >= 1 padded (batch >= 2); about pad_fraction * |
    |                       |                   | batch * seq pads in all; labels = ids, -100 at pads         |
    | "left"                | ids, mask, labels | the rows of "right" (same arguments) with the pads moved    |
    |                       |                   | first (zeros then ones); no pos, so positions are HF's      |
    |                       |                   | default arange, and each padded row's first token is a      |
    |                       |                   | target predicted from a pad                                 |
    | "holes"               | ids, mask, labels | a zero run strictly inside >= 1 row (ones on both sides),   |
    |                       |                   | >= 1 row all ones (seq >= 3); labels -100 where mask is 0   |
    | "pad_labels_unmasked" | ids, mask, labels | "right", but labels = ids everywhere (pads are targets)     |
    | "all_pad_row"         | ids, mask, labels | "right" with one padded row made all padding (mask 0,       |
    |                       |                   | labels -100); >= 1 row stays unpadded                       |
    | "none"                | ids, labels       | no padding and no attention_mask key                        |
    | "ones"                | ids, mask, labels | no padding, an all-ones mask                                |
    | "packed"              | ids, pos, labels  | each row concatenates documents, no mask; pos restart at 0  |
    |                       |                   | per document; labels as DataCollatorWithFlattening (-100 at |
    |                       |                   | each document's first token, then its tokens); one document |
    |                       |                   | per row has length 1 when seq >= 3                          |
    | "packed_docs"         | ids, mask, labels | (n_docs, longest doc): the documents of "packed" (same      |
    |                       |                   | arguments), one per row in order, right padded; labels are  |
    |                       |                   | each document's packed labels, -100 at pads                 |

    "packed" and "packed_docs" with the same arguments hold the same documents, and after HF's shift
    the same (prefix, target) pairs: each document's tokens 1..n-1, each predicted from its own
    prefix. A document boundary in the packed row is never a target (its label is -100), and a
    length-1 document contributes no target in either layout. So HF's mean loss over non-ignored
    labels is the same number for both (up to float summation order), and ``num_items_in_batch`` is
    sum(len(doc) - 1) for both, provided the packed row's attention is split per document.
    transformers splits it from position_ids only when there is no attention_mask and no cache
    object, so call the model with ``use_cache=False`` (the tiny configs keep ``use_cache=True``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    gen = torch.Generator().manual_seed(seed)
    if layout in ("packed", "packed_docs"):
        documents = [doc for _ in range(batch) for doc in _packed_row(seq, vocab, pad_token_id, gen)]
        if layout == "packed":
            return _flatten(documents, batch)
        return _pad_documents(documents, pad_token_id)

    input_ids = _tokens((batch, seq), vocab, pad_token_id, gen)
    if layout in ("none", "ones"):
        out = {"input_ids": input_ids, "labels": input_ids.clone()}
        if layout == "ones":
            out["attention_mask"] = torch.ones_like(input_ids)
        return _ordered(out)

    if batch < 2:
        raise ValueError(f"layout {layout!r} needs batch >= 2 (one unpadded row and one padded row)")
    if layout == "holes":
        if seq < 3:
            raise ValueError("layout 'holes' needs seq >= 3")
        n_masked = _pads_per_row(batch, seq, seq - 2, pad_fraction, gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for row, n in enumerate(n_masked.tolist()):
            if n:
                start = int(torch.randint(1, seq - n, (), generator=gen))
                mask[row, start : start + n] = 0
    else:
        if seq < 2:
            raise ValueError(f"layout {layout!r} needs seq >= 2")
        n_pad = _pads_per_row(batch, seq, seq - 1, pad_fraction, gen)
        if layout == "all_pad_row":
            n_pad[int(torch.argmax(n_pad))] = seq
        mask = (torch.arange(seq) < (seq - n_pad)[:, None]).long()
        if layout == "left":  # the rows of "right", rotated so that the pads come first
            input_ids = torch.stack([row.roll(int(n)) for row, n in zip(input_ids, n_pad)])
            mask = mask.flip(-1)
    input_ids = input_ids.masked_fill(mask == 0, pad_token_id)
    labels = input_ids.clone()
    if layout != "pad_labels_unmasked":
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return _ordered({"input_ids": input_ids, "attention_mask": mask, "labels": labels})


def _ordered(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    return {k: batch[k] for k in keys if k in batch}


def _tokens(shape, vocab: int, pad_token_id: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform token ids in ``[0, vocab)`` that are never ``pad_token_id``."""
    ids = torch.randint(0, vocab - 1, shape, generator=gen, dtype=torch.int64)
    return ids + (ids >= pad_token_id).long()


def _pads_per_row(batch: int, seq: int, cap: int, pad_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Pads per row: ``round(pad_fraction * batch * seq)`` (at least 1) spread at random over all
    rows but one (which stays unpadded), at most ``cap`` per row."""
    full_row = int(torch.randint(0, batch, (), generator=gen))
    padded_rows = [r for r in range(batch) if r != full_row]
    left = min(max(1, round(pad_fraction * batch * seq)), cap * len(padded_rows))
    n_pad = torch.zeros(batch, dtype=torch.int64)
    for i, row in enumerate(padded_rows):
        rows_after = len(padded_rows) - i - 1
        lo, hi = max(0, left - cap * rows_after), min(cap, left)
        n_pad[row] = int(torch.randint(lo, hi + 1, (), generator=gen))
        left -= int(n_pad[row])
    return n_pad


def _packed_row(seq: int, vocab: int, pad_token_id: int, gen: torch.Generator) -> list[list[int]]:
    """Random documents whose lengths sum to ``seq``: a length-1 document at a random place plus
    1 to 3 others when ``seq >= 3``, else a single document."""
    if seq < 3:
        lengths = [seq]
    else:
        rest = seq - 1
        n_other = int(torch.randint(1, min(3, rest) + 1, (), generator=gen))
        cuts = sorted((torch.randperm(rest - 1, generator=gen)[: n_other - 1] + 1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, rest])]
        lengths.insert(int(torch.randint(0, n_other + 1, (), generator=gen)), 1)
    tokens = _tokens((seq,), vocab, pad_token_id, gen).tolist()
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _document_labels(doc: list[int]) -> list[int]:
    # DataCollatorWithFlattening with separator_id=-100: the first token of a document is no target.
    return [IGNORE_INDEX, *doc[1:]]


def _flatten(documents: list[list[int]], rows: int) -> dict[str, torch.Tensor]:
    """What DataCollatorWithFlattening returns for each row's documents, rows stacked."""
    input_ids = [t for doc in documents for t in doc]
    labels = [t for doc in documents for t in _document_labels(doc)]
    position_ids = [i for doc in documents for i in range(len(doc))]
    columns = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return {k: torch.tensor(v, dtype=torch.int64).view(rows, -1) for k, v in columns.items()}


def _pad_documents(documents: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(doc) for doc in documents)
    input_ids = torch.full((len(documents), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(documents), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(documents), width), dtype=torch.int64)
    for row, doc in enumerate(documents):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        labels[row, : len(doc)] = torch.tensor(_document_labels(doc))
        mask[row, : len(doc)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_flattening(documents: list[list[int]]) -> dict[str, torch.Tensor]:
    """HF's own ``DataCollatorWithFlattening`` on token-id lists: one packed row with input_ids,
    labels (-100 at each document's first token) and position_ids, as int64 tensors."""
    from transformers import DataCollatorWithFlattening

    return dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": doc} for doc in documents]))


# ---------------------------------------------------------------------------------------------------
# Text: a tokenizer and a dataset for the Trainer / TRL tests and examples


def tiny_tokenizer(vocab_size: int = TINY_DIMS["vocab_size"]):
    """A word-level ``PreTrainedTokenizerFast`` built locally over the words "w0", "w1", ...:
    pad, bos, eos and unk are ids 0, 1, 2, 3 (pad/bos/eos as in the tiny configs), and the
    vocabulary has ``vocab_size`` entries. No download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_texts(n: int, vocab_size: int = TINY_DIMS["vocab_size"], seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` texts of 5 to 14 random words of :func:`tiny_tokenizer`."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    lines = [" ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(rng.randint(5, 14))) for _ in range(n)]
    return Dataset.from_dict({"text": lines})


def describe_batch(batch: dict[str, torch.Tensor]) -> str:
    """One line: shapes, pad tokens, documents and label targets (after HF's shift)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    n_pad = 0 if mask is None else int((mask == 0).sum())
    if position_ids is not None and mask is None:
        n_docs = int((position_ids.diff(dim=-1) != 1).sum()) + position_ids.shape[0]
    elif mask is not None:
        n_docs = int(mask.any(dim=-1).sum())
    else:
        n_docs = input_ids.shape[0]
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
    parts = [shapes, f"{n_pad} pad", f"{n_docs} docs"]
    if "labels" in batch:
        parts.append(f"{int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())} targets")
    return " | ".join(parts)
