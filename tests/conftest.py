"""Shared pytest setup.

Devices are decided here, once, from whether CUDA exists:

- A Triton path's test takes its device from the ``triton_device`` fixture: CUDA where it exists,
  else the CPU, where the kernels run in Triton's interpreter. Without CUDA this file sets
  ``TRITON_INTERPRET=1`` before any graphopt module is imported (``triton.jit`` reads it when a
  kernel is decorated); with CUDA it leaves the variable alone.
- Torch-path tests use CPU tensors (and may also run on CUDA).
- Tests marked ``cuda`` need a GPU: without one they are skipped, with that reason.
  ``pytest -m cuda`` selects them (the GPU check).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# Every HF model's forward runs through the same transformers wrapper function, so Dynamo's
# per-code-object recompile limit (8) counts the graphs of all families and layouts in a session.
# Past it Dynamo silently runs eager, which would make rewrite assertions fail for the wrong reason.
import torch._dynamo  # noqa: E402

torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> torch.device:
    """Where a Triton path's test puts its tensors: CUDA if present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def without_inductor(monkeypatch):
    """graphopt's whole backend (passes, guards, fallbacks) with every Inductor compile replaced by
    the graph's own forward: compiles take seconds. For tests of what graphopt rewrites and what
    the rewritten graphs compute; the Inductor path has tests of its own."""
    from graphopt import backend

    monkeypatch.setattr(backend, "_inductor", lambda mode, options: lambda gm, example_inputs: gm.forward)


@pytest.fixture(autouse=True)
def _aot_eager_for_marked_tests(request, monkeypatch):
    """Tests marked ``aot_eager`` (a whole module, with ``pytestmark``) run graphopt's whole backend
    with Inductor's code generation replaced by ``aot_eager_decomp_partition``: AOTAutograd traces
    each graph graphopt hands on, with Inductor's decompositions and its min-cut partitioner (the
    fake implementations, functionalization and the forward/backward split are exercised as under
    Inductor), and runs the traced graphs with torch's kernels instead of generated C++.

    For tests of what graphopt rewrites and what the rewritten graphs compute, where the C++
    compiles are most of the time on 2 cores. The Inductor path itself is tested by the unmarked
    modules (every rewrite once per attention/RoPE layout in ``test_inductor.py``, the trainers,
    TRL and PEFT in ``test_hf.py``, DDP/FSDP2, the backend, the command line) and, inside a marked
    module, by the tests also marked ``inductor``, each of which compiles its own model."""
    if request.node.get_closest_marker("aot_eager") is None or request.node.get_closest_marker("inductor") is not None:
        return
    from torch._dynamo.backends.debugging import aot_eager_decomp_partition

    from graphopt import backend

    monkeypatch.setattr(backend, "_inductor", lambda mode, options: aot_eager_decomp_partition)


@pytest.fixture(autouse=True, scope="module")
def _forget_aot_eager_graphs(request):
    """After an ``aot_eager`` module, Dynamo forgets its graphs, so that no later module runs one."""
    yield
    if request.node.get_closest_marker("aot_eager") is not None:
        torch._dynamo.reset()
