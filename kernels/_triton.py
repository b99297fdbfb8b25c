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

if HAS_TRITON:

    @triton.jit
    def dot_dequantized(a, w, acc, UPCAST: tl.constexpr):
        """``acc + a @ w`` in fp32 for a tile ``w`` of fp32 dequantized weights, as the references compute it.

        fp32 activations (and everything under the interpreter, ``UPCAST``): IEEE fp32 dots (tl.dot's
        default is TF32, which torch's fp32 matmul is not). fp16: one tensor-core dot with ``w`` in
        fp16 (11 significant bits, below the output's own fp16 rounding). bf16: ``w`` split into its
        bf16 value and the bf16 remainder, two tensor-core dots carrying 16 significant bits; one bf16
        dot (8 bits) moved GPTQ outputs by up to 0.25 at |y| ~ 50 on the first H200 lease, and made the
        GEMM path (several rows) disagree with the GEMV path (one row, fp32) on the same token.
        """
        if UPCAST or a.dtype == tl.float32:
            out = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        elif a.dtype == tl.bfloat16:
            high = w.to(tl.bfloat16)
            out = tl.dot(a, high, acc)
            out = tl.dot(a, (w - high.to(tl.float32)).to(tl.bfloat16), out)
        else:
            out = tl.dot(a, w.to(a.dtype), acc)
        return out


ONE_GROUP = 1 << 30  # GROUP of a layer with one group a row: every tile's group index is 0


def gemv_group(size: int, groups: int) -> int:
    """The ``GROUP`` constexpr of the grouped batch-1 GEMVs (affine, GPTQ): the group size when it is
    a power of two of at least 16 columns, ONE_GROUP for one group a row, else 0 (the general GEMV:
    the grouped kernels reshape a tile into groups, which needs power-of-two spans)."""
    if groups == 1:
        return ONE_GROUP
    return size if size >= 16 and size & (size - 1) == 0 else 0


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
