"""Shared pytest setup.

Triton kernels run on CPU tensors through the interpreter when no GPU is present. The variable is
read when kernels are decorated, so it is set here, before any graphopt module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
