"""graphopt's options, and how they are told apart from Inductor's.

``torch.compile(model, backend="graphopt", options={...})`` takes one dict. Keys that name a field of
:class:`GraphoptOptions` configure graphopt; every other key must be an Inductor config key and is
passed through to Inductor. A key that is neither is an error that lists graphopt's keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field

ATTENTION_IMPLS = ("auto", "torch", "triton", "flash_attn3", "flash_attn", "torch_varlen")  # the op's IMPLS


@dataclass(frozen=True)
class GraphoptOptions:
    """What graphopt may rewrite, and how.

    Attributes:
        mask_elision: drop the materialized attention mask when it is provably causal (plain, or
            causal ∧ right padding behind a runtime guard).
        varlen_attention: run packed sequences (``position_ids`` restarting per document, no
            attention mask) as per-document attention with RoPE fused in.
        fused_cross_entropy: compute the LM-head + cross-entropy loss chunk by chunk.
        unpad: when a right-padded training batch passes the right-padding guard, run the whole
            decoder on its real tokens only (each row one document of varlen attention) and
            scatter per-position outputs back; see :mod:`graphopt.passes.unpad`.
        drop_logits: with ``fused_cross_entropy``, do not compute the logits output of a training
            step that computes the loss; the graph returns an empty tensor in their place. Off by
            default because it changes an output.
        padded_outputs_unused: promise that outputs at padded positions are never read. Lets mask
            elision fire on right-padded graphs that compute no loss (inference, custom losses), and
            in graphs that receive a padded batch's mask from an earlier graph (FSDP2, Dynamo's DDP
            split), which cannot see the labels.
        trust_right_padding: UNSAFE. Skip the runtime right-padding check and always take the fast
            path. A left-padded or holed batch then gives wrong results at real positions. Use
            only when your collator guarantees right padding and the guard's cost matters.
        attention_impl: varlen attention implementation, one of ``ATTENTION_IMPLS``.
        cross_entropy_chunk_size: tokens per chunk of the fused loss (0 picks one from the shapes).
        dump_dir: write each graph's report (code before and after, rewrites, declines, guards)
            to this folder. Defaults to ``$GRAPHOPT_DUMP_DIR``.
    """

    mask_elision: bool = True
    varlen_attention: bool = True
    fused_cross_entropy: bool = True
    unpad: bool = True
    drop_logits: bool = False
    padded_outputs_unused: bool = False
    trust_right_padding: bool = False
    attention_impl: str = "auto"
    cross_entropy_chunk_size: int = 0
    dump_dir: str | None = field(default_factory=lambda: os.environ.get("GRAPHOPT_DUMP_DIR") or None)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"bool": bool, "int": int, "str": str}.get(str(f.type))
            if expected is not None and not isinstance(value, expected):
                raise TypeError(
                    f"graphopt option {f.name!r} must be a {expected.__name__}, got {value!r}"
                )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"graphopt option attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}"
            )
        if self.cross_entropy_chunk_size < 0:
            raise ValueError("graphopt option cross_entropy_chunk_size must be >= 0 (0 = automatic)")
        if self.drop_logits and not self.fused_cross_entropy:
            raise ValueError("graphopt option drop_logits=True needs fused_cross_entropy=True")


GRAPHOPT_KEYS = tuple(f.name for f in dataclasses.fields(GraphoptOptions))


def split_options(options: dict | None) -> tuple[GraphoptOptions, dict]:
    """Split a ``torch.compile`` options dict into graphopt's options and Inductor's.

    Raises:
        ValueError: a key is neither a graphopt option nor an Inductor config key.
    """
    ours, theirs = {}, {}
    if not options:
        return GraphoptOptions(), theirs
    from torch._inductor import config as inductor_config

    inductor_keys = set(inductor_config.get_config_copy())
    for key, value in options.items():
        name = key.replace("-", "_")
        if name.startswith("graphopt."):
            name = name[len("graphopt.") :]
            if name not in GRAPHOPT_KEYS:
                raise ValueError(_unknown_key_message(key, GRAPHOPT_KEYS))
        if name in GRAPHOPT_KEYS:
            ours[name] = value
        elif name in inductor_keys:
            theirs[key] = value
        else:
            raise ValueError(_unknown_key_message(key, GRAPHOPT_KEYS + tuple(inductor_keys)))
    return GraphoptOptions(**ours), theirs


def _unknown_key_message(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_").removeprefix("graphopt."), known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (
        f"Unknown option {key!r} for backend='graphopt'.{hint} graphopt's options are "
        f"{', '.join(GRAPHOPT_KEYS)}; any other key must be an Inductor config key "
        f"(torch._inductor.config)."
    )
