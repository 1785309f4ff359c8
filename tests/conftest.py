"""Shared pytest setup.

Triton kernels run on CPU tensors through the interpreter when no GPU is present. The variable is
read when kernels are decorated, so it is set here, before any graphopt module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every HF model's forward runs through the same transformers wrapper function, so Dynamo's
# per-code-object recompile limit (8) counts the graphs of all families and layouts in a session.
# Past it Dynamo silently runs eager, which would make rewrite assertions fail for the wrong reason.
import torch._dynamo  # noqa: E402

torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
