"""Triton's front end (Python AST -> TTIR) for a CUDA target, on kernel launches described in JSON.

``python -m tests.support.triton_frontend`` reads a JSON list of launches from stdin, each
``{"module", "kernel", "signature", "constexprs"}``: the module that defines the ``@triton.jit``
kernel, its name, the argument types (``"*fp32"``, ``"i32"``, ``"fp64"``, ``"constexpr"``...) and
the constexpr values. It lowers each one to TTIR for ``TARGET`` and prints a JSON list with, per
launch, ``{"error": text or null, "fp64_ops": [...]}``: the error if the lowering failed, else the
TTIR operations that compute an fp64 value (the kernels are meant to compute in fp32 at most).

It runs as its own process, started without ``TRITON_INTERPRET``: once ``triton.language`` was
imported with it set, Triton's own ``@triton.jit`` library functions (``tl.sum``, ``tl.zeros``...)
are interpreted functions for the life of that process and cannot be compiled.
"""

import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend

TARGET = GPUTarget("cuda", 90, 32)


def lower_to_ttir(kernel, signature: dict, constexprs: dict):
    """The TTIR module of ``kernel`` for ``TARGET``; raises Triton's CompilationError."""
    backend = make_backend(TARGET)
    options = backend.parse_options({})
    context = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, signature, constexprs)
    codegen_fns = backend.get_codegen_implementation(options)
    return source.make_ir(TARGET, options, codegen_fns, backend.get_module_map(), context)


def fp64_ops(module) -> list[str]:
    """``"op: type"`` for every operation of a TTIR module with an fp64 result."""
    found = []

    def visit(op):
        for i in range(op.get_num_results()):
            result_type = str(op.get_result(i).get_type())
            if "f64" in result_type:
                found.append(f"{op.get_name()}: {result_type}")

    module.walk(visit)
    return found


def compile_launch(launch: dict) -> dict:
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    try:
        module = lower_to_ttir(kernel, launch["signature"], launch["constexprs"])
    except Exception as error:  # reported to the test, which fails with the text
        return {"error": f"{type(error).__name__}: {error}", "fp64_ops": []}
    return {"error": None, "fp64_ops": fp64_ops(module)}


if __name__ == "__main__":
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be lowered to TTIR")
    json.dump([compile_launch(launch) for launch in json.load(sys.stdin)], sys.stdout)
