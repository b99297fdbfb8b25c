"""INT8 weight-only matmul on CPU (W8A16): ``y = x @ (codes * scale).T + bias`` with ATen's
``torch._weight_int8pack_mm``, which reads the int8 codes ``[N, K]`` as stored (no repacking,
nothing extra held) and decodes them in registers.

ATen vectorizes that kernel for bfloat16 activations only (fp32 and fp16 inputs take a scalar
loop, slower than the reference), so the activations are rounded to bf16, the products are
summed in fp32 and the sum is rounded to bf16; the per-channel (or per-tensor) fp32 scale and
the bias are applied after, in fp32, so the scale is never rounded to bf16. The result differs
from the fp32 reference by those two bf16 roundings: per output at most
``2**-8 * (|x| @ |W|.T) + 2**-8 * |y|`` (each rounding is within 2**-9 relative), about 0.25%
RMS of the output in practice. From :data:`BF16_GEMM_MIN_ROWS` input rows on (prefill), where the
CPU multiplies bf16 natively, the codes are converted to bf16 (exactly: they are small integers)
for oneDNN's bf16 GEMM instead, with the same roundings (``cpu:int8-bf16gemm``). Per-block scales
(``granularity=block``) have no such kernel and stay on the reference, and so do rows whose
width is not a multiple of 16: ATen's kernel steps
through K 16 at a time with no tail, and on torch 2.13 other widths give wrong sums or crash
(``K=53``, ``K=100``; tested). Every Llama-shaped layer has such widths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qbench.kernels._cpu import bf16_gemm_fast
from qbench.params import QBenchError

KERNEL_PATH = "cpu:int8pack-bf16"
BF16_GEMM_PATH = "cpu:int8-bf16gemm"
BF16_GEMM_MIN_ROWS = 32  # from here on codes -> bf16 + oneDNN's bf16 GEMM beat the int8 kernel (AVX512-BF16)


ROW_MULTIPLE = 16  # the kernel's step along K


def supports(codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """One scale per output channel or per tensor, rows a multiple of 16 wide, on CPU: what
    ``_weight_int8pack_mm`` computes correctly."""
    return (codes.device.type == "cpu" and codes.dim() == 2 and codes.shape[1] % ROW_MULTIPLE == 0
            and scale.numel() in (1, codes.shape[0]))


def kernel_path(rows: int) -> str:
    """What :func:`int8_weight_matmul_cpu` runs for ``rows`` input rows."""
    return BF16_GEMM_PATH if rows >= BF16_GEMM_MIN_ROWS and bf16_gemm_fast() else KERNEL_PATH


_UNITS: dict[int, torch.Tensor] = {}


def _unit_scales(n: int) -> torch.Tensor:
    """bf16 ones for the kernel's own scale argument (one tensor per width, made once)."""
    if n not in _UNITS:
        _UNITS[n] = torch.ones(n, dtype=torch.bfloat16)
    return _UNITS[n]


def int8_weight_matmul_cpu(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (codes * scale).T + bias`` for int8 ``codes [N, K]`` and an fp32 scale (0-dim, [N] or [N, 1])."""
    N, K = codes.shape
    if x.shape[-1] != K:
        raise QBenchError(f"input has {x.shape[-1]} features, the layer expects {K}")
    if not supports(codes, scale):
        raise QBenchError("int8_weight_matmul_cpu needs one scale per output channel or per tensor and rows a "
                          f"multiple of {ROW_MULTIPLE} wide, on CPU; use the reference")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    if kernel_path(x2d.shape[0]) == BF16_GEMM_PATH:  # int8 codes are exact in bf16
        y = F.linear(x2d, codes.to(torch.bfloat16))
    else:
        y = torch._weight_int8pack_mm(x2d, codes.contiguous(), _unit_scales(N))
    y = torch.mul(y, scale.float().reshape(-1))  # the real scale, in fp32 (bf16 * fp32 -> fp32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, N)


def int8_weight_matmul_cpu_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The arithmetic of :func:`int8_weight_matmul_cpu` in plain torch: bf16-rounded activations,
    fp32 sums rounded to bf16, then scale and bias in fp32 (equal up to the summation order)."""
    N, K = codes.shape
    x2d = x.reshape(-1, K).to(torch.bfloat16).float()
    y = (x2d @ codes.float().T).to(torch.bfloat16).float() * scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], N)
