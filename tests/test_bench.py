"""The benchmark's batches, models and its --vary-length bookkeeping (nothing here compiles a model)."""

from __future__ import annotations

import torch

from graphopt.bench import IGNORE_INDEX, PAD_ID, build_model, make_batch, parse_args, summarize_vary


def test_left_layout_is_the_padded_preset_with_the_pads_first():
    right, left = (make_batch(parse_args(["--config", "padded", "--layout", layout]), 0) for layout in ("right", "left"))
    assert left["input_ids"].shape == right["input_ids"].shape == (2, 2048)
    assert torch.equal(left["attention_mask"].sum(-1), right["attention_mask"].sum(-1))  # rows of 2048 and 1024
    padded_row = left["attention_mask"][1]
    assert padded_row[:1024].eq(0).all() and padded_row[1024:].eq(1).all()
    pads = left["attention_mask"] == 0
    assert left["labels"][pads].eq(IGNORE_INDEX).all() and left["input_ids"][pads].eq(PAD_ID).all()
    assert left["labels"][~pads].ne(IGNORE_INDEX).all()


def test_the_moe_preset_builds_qwen3_moe_with_eight_experts_of_two():
    args = parse_args(["--config", "moe-padded-50", "--seq", "32", "--hidden", "64", "--layers", "1"])
    model = build_model(args)
    assert model.config.model_type == "qwen3_moe" and (model.config.num_experts, model.config.num_experts_per_tok) == (8, 2)
    assert model.config.moe_intermediate_size == args.intermediate // 4
    batch = make_batch(args, 0)
    assert torch.isfinite(model(**batch).loss)


def test_a_preset_target_is_dropped_for_another_layout():
    assert parse_args(["--config", "padded"]).target == {"speedup": 1.2}
    assert parse_args(["--config", "padded", "--layout", "left"]).target == {}


def test_vary_length_draws_seeded_right_padded_lengths_rounded_up():
    args = parse_args(["--vary-length", "--min-len", "16", "--max-len", "4096", "--pad-to-multiple-of", "64"])
    assert (args.steps, args.warmup, args.seq) == (100, 0, 4096)
    batches = [make_batch(args, i) for i in range(20)]
    seqs = [b["input_ids"].shape[1] for b in batches]
    assert all(s % 64 == 0 and 64 <= s <= 4096 for s in seqs) and len(set(seqs)) > 10
    assert seqs == [make_batch(args, i)["input_ids"].shape[1] for i in range(20)]  # seeded
    for b in batches:
        mask = b["attention_mask"]
        assert torch.equal(mask, mask.sort(dim=-1, descending=True).values)  # ones, then zeros
        assert b["labels"][mask == 0].eq(IGNORE_INDEX).all()
        longest, shortest = mask.sum(-1).tolist()
        assert b["input_ids"].shape[1] - 64 < longest and shortest == round(longest / 2)  # 25% of the drawn length


def _vary_result(backend, seconds, compiles, paths):
    steps = [dict(seq=64 * (i + 1), seconds=s, loss=10.0, compiled=i < compiles, path=p)
             for i, (s, p) in enumerate(zip(seconds, paths))]
    return dict(backend=backend, weight_checksum=1.0, total_s=sum(seconds), steps=steps, first_loss=10.0,
                peak_mb=1.0, dynamo_graphs=compiles, inductor_compiles=compiles, graph_breaks=0)


def test_vary_length_summary_counts_fast_paths_compiles_and_wall_time():
    args = parse_args(["--vary-length", "--steps", "4"])
    results = {
        "eager": _vary_result("eager", [1, 1, 1, 1], 0, [None] * 4),
        "inductor": _vary_result("inductor", [10, 8, 1, 1], 2, [None] * 4),
        "graphopt": _vary_result("graphopt", [9, 7, 1, 3], 3, ["fast_path", "fast_path", "fast_path", "fallback"]),
    }
    summary = summarize_vary(args, results)
    g = results["graphopt"]
    assert g["fast_path_fraction"] == 0.75 and g["extra_compiles_vs_inductor"] == 1
    assert g["wall_speedup_vs_inductor"] == 20 / 20 and g["median_step_s_without_compile"] == 3
    assert list(summary["target"].values()) == [False, True, False]
    assert summary["losses_agree"] and summary["weights_identical"]


def test_uneven_rows_keep_the_real_token_count_and_flatten_to_the_same_loss():
    """padded-50's rows: one full row, the others uneven, half the tokens padding in every batch;
    the flattened layout holds the same documents, and HF's loss on it is the padded batch's."""
    from graphopt.tiny_models import build_model, llama_config

    args = parse_args(["--config", "padded-50", "--seq", "64", "--hidden", "64", "--vocab", "300"])
    counts = set()
    for index in range(5):
        batch = make_batch(args, index)
        lengths = batch["attention_mask"].sum(-1).tolist()
        assert lengths[0] == 64 and min(lengths) >= 1 and len(set(lengths)) > 1
        counts.add(sum(lengths))
    assert counts == {128}  # 50% of 4 x 64, in every batch: the flattened layout keeps one shape
    flat_args = parse_args(["--config", "padded-50", "--seq", "64", "--hidden", "64", "--vocab", "300", "--layout", "flattened"])
    padded, flat = make_batch(args, 0), make_batch(flat_args, 0)
    assert flat["input_ids"].shape == (1, 128) and "attention_mask" not in flat
    assert flat["position_ids"][0, 64:64 + 5].tolist() == list(range(5))
    model = build_model(llama_config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=128, vocab_size=300))
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_flat = model(**flat, use_cache=False).loss
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-5, atol=1e-5)


def test_the_guard_timer_times_the_guards_the_dispatch_evaluates():
    """The in-step guard timing wraps what the runtime really calls (it once patched a name the
    backend no longer had, and every graphopt bench run failed)."""
    import torch.fx as fx

    from graphopt import runtime
    from graphopt.bench import GuardTimer
    from graphopt.guards import Guard

    graph = fx.Graph()
    graph.output(graph.placeholder("x"))
    module = fx.GraphModule({}, graph)
    fast = runtime.AdaptedGraph(lambda *args: ["fast"], [], module, 1)
    fallback = runtime.AdaptedGraph(lambda *args: ["fallback"], [], module, 1)
    guard = Guard(name="g", fn=lambda x: {"right_padded": torch.tensor(True)}, input_indices=(0,), description="")
    dispatch = runtime.GuardedDispatch([runtime.Version([guard], fast)], fallback, 0, shapes_only=fast)
    with GuardTimer() as times:
        assert dispatch(torch.ones(2)) == ["fast"]
    assert len(times) == 1 and times[0] > 0
    assert runtime.evaluate_guards.__name__ == "evaluate_guards"  # restored
