"""INT8 x INT8 -> INT32 matmul on CPU (W8A8) with the absmax scales in the epilogue.

``torch._int_mm`` (oneDNN; VNNI where the CPU has it) sums the integer products exactly in int32,
reading the weight codes ``[N, K]`` through a transposed view (nothing repacked or held). The
epilogue is :func:`qbench.kernels.int8_matmul.int8_matmul_reference`'s, operation for operation
(int32 sum to fp32, times the activation scale, times the weight scale, plus bias, to the output
dtype), and that reference sums exactly too (in float64), so this path is bit-identical to it.
On torch 2.13 ``_int_mm`` returns garbage for a reduction of width 1 (tested), so such layers keep
the reference (:func:`supports`).
"""
from __future__ import annotations

import torch

from qbench.kernels.int8_matmul import _check, _scale_vector
from qbench.params import QBenchError

KERNEL_PATH = "cpu:int_mm"


def supports(b: torch.Tensor) -> bool:
    """Weight codes ``[N, K]`` on CPU with ``K >= 2``."""
    return b.device.type == "cpu" and b.dim() == 2 and b.shape[1] >= 2


def int8_matmul_cpu(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a`` int8 [..., K] with scale (1 or one per row), ``b`` int8 [N, K] with scale (1 or [N])."""
    _check(a, b)
    if not supports(b):
        raise QBenchError("int8_matmul_cpu needs CPU weight codes at least 2 columns wide; use the reference")
    lead = a.shape[:-1]
    K = a.shape[-1]
    a2d = a.reshape(-1, K).contiguous()
    M, N = a2d.shape[0], b.shape[0]
    sa, _ = _scale_vector(a_scale, M, "activation")
    sb, _ = _scale_vector(b_scale, N, "weight")
    acc = torch._int_mm(a2d, b.t()).float()
    out = acc * sa.reshape(-1, 1) * sb.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).view(*lead, N)
