"""graphopt: a torch.compile backend for training Hugging Face causal LMs.

    model = torch.compile(model, backend="graphopt")

It rewrites the attention mask, attention + RoPE and the LM-head loss of the Dynamo graph, each
rewrite proven on the graph and, where it depends on input values, guarded at run time, then
hands the graph to Inductor. See :func:`explain` for what it did.

Importing graphopt registers the backend and nothing else: it does not import transformers and
does not initialize CUDA. (``backend="graphopt"`` also works without importing it first, through
the ``torch_dynamo_backends`` entry point.)
"""

from __future__ import annotations

import torch
from torch._dynamo.backends import registry as _registry

from graphopt import tracing as _tracing
from graphopt.backend import graphopt_backend
from graphopt.inspection import Report, capture, explain
from graphopt.options import GraphoptOptions

__all__ = ["GraphoptOptions", "Report", "capture", "explain", "graphopt_backend"]
__version__ = "0.1.0"

# When Dynamo loads us through the entry point it registers the backend itself right after the
# import, so registering here too would be a duplicate.
if "graphopt" not in _registry._COMPILER_FNS and _registry._BACKENDS.get("graphopt") is None:
    _registry.register_backend(graphopt_backend, name="graphopt")

# Checkpointed layers of transformers >= 5.25 stay in graphopt's graphs (see graphopt.tracing).
_tracing.install()

# TORCH_LOGS="graphopt" (INFO) or "+graphopt" (DEBUG).
torch._logging._internal.register_log("graphopt", "graphopt")
