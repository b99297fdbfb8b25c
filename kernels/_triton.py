"""What every kernel module needs to know about where Triton can run.

``TRITON_INTERPRET=1`` (set before triton is imported, as tests/conftest.py does) runs the same
``@triton.jit`` kernels on CPU tensors. The interpreter has no bf16 arithmetic, so kernels take
``UPCAST_BF16`` as a constexpr and convert to fp32 inside the kernel when it is set; the code is
the same on GPU and CPU.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a hard dependency, but a broken install should not break the reference paths
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False

# The interpreter cannot do bf16 math; on GPU we keep native bf16 loads and fp32 accumulation anyway.
UPCAST_BF16 = INTERPRET


def triton_can_run(t: torch.Tensor) -> bool:
    """True where a Triton launcher can run on ``t``: a CUDA tensor, or any CPU tensor under the interpreter."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def use_triton_in_module(x: torch.Tensor) -> bool:
    """Quantized modules use Triton on CUDA and the torch reference elsewhere.

    On CPU the interpreter is a correctness tool, far too slow for whole models; the module
    records which path ran in ``kernel_path``.
    """
    return HAS_TRITON and x.is_cuda


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
