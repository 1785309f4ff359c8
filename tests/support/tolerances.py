"""The one tolerance table for every numerical comparison in the suite.

Keyed by dtype. ``fwd`` compares values (losses, outputs), ``grad`` compares gradients. Eager and
compiled runs differ only in summation order (fused kernels, a different attention kernel), so fp32
tolerances are tight; bf16 ones reflect its 8-bit mantissa.
"""

import torch

TOLERANCES = {
    torch.float32: {"fwd": dict(rtol=1e-5, atol=1e-5), "grad": dict(rtol=1e-4, atol=1e-5)},
    torch.float64: {"fwd": dict(rtol=1e-10, atol=1e-12), "grad": dict(rtol=1e-9, atol=1e-12)},
    torch.bfloat16: {"fwd": dict(rtol=2e-2, atol=2e-2), "grad": dict(rtol=5e-2, atol=5e-2)},
    torch.float16: {"fwd": dict(rtol=5e-3, atol=5e-3), "grad": dict(rtol=1e-2, atol=1e-2)},
}


def tol(dtype: torch.dtype, kind: str = "fwd") -> dict:
    """``rtol``/``atol`` keyword arguments for ``torch.testing.assert_close`` at ``dtype``."""
    return TOLERANCES[dtype][kind]
