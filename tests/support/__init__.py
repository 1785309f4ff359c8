"""Helpers shared by the test files (no tests here); import each module by name, this package
imports nothing itself.

- ``harness``: one training step eager vs compiled (``run_step``, ``Step``), compared on the loss
  and every gradient (``assert_steps_equal``, ``real_positions``); ``CompiledModel`` (one compiled
  model per family kept for a test module); ``compile_step`` and ``explain_split`` (one fresh
  compiled step and why it split); ``enable_checkpointing`` (activation checkpointing under either
  transformers name); ``count_attached_logits_backward``.
- ``tolerances``: the one tolerance table (``tol(dtype, kind)``) for every numerical comparison.
- ``retarget``: Dynamo graphs captured on the CPU (``capture_graphs``) and retargeted to another
  device with fake example values (``retarget``).
- ``mask_graphs``: tiny attention graphs for the mask tests (``capture``, ``qkv``, ``sdpa_with``,
  the shapes ``B, S, H, D``).
- ``varlen_cases``: packed-document inputs for the varlen attention op tests (``make_case``).
- ``stand_in_kernels``: a stand-in Hugging Face hub RoPE kernel and ``kernelize_rope``.
- ``distributed_worker``: one rank of the distributed tests, run as
  ``python -m tests.support.distributed_worker`` by ``tests/test_distributed.py``.
- ``triton_frontend``: Triton's front end (Python AST -> TTIR) for a CUDA target, run as
  ``python -m tests.support.triton_frontend`` by ``tests/ops/test_triton_frontend.py``.
"""
