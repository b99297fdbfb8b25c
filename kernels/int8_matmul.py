"""INT8 x INT8 -> INT32 GEMM with the absmax scales applied in the epilogue (W8A8).

``y[m, n] = float(sum_k a[m, k] * b[n, k]) * sa[m] * sb[n] + bias[n]``: ``a`` are activation
codes (per-token scales ``sa`` [M] from dynamic quantization, or one static scale), ``b`` the
weight codes ``[N, K]`` (per-channel ``sb`` [N] or one per-tensor scale). The integer sum is
exact (int32 accumulation: |sum| <= K * 127**2 fits for K < 133 000); it is converted to fp32
(round to nearest) and scaled in fp32 in that order, then cast to the output dtype.

The reference computes the integer sum exactly in float64 (exact for these magnitudes), so on
CPU the modules reproduce the real integer scheme without ``torch._int_mm``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qbench.kernels._triton import INTERPRET, triton_can_run
from qbench.params import QBenchError


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, K,
    stride_am, stride_bn, stride_ym, stride_sa, stride_sb,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=mask_m, other=0.0)
    sb = tl.load(sb_ptr + offs_n * stride_sb, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4),
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 128, 4, 3),
        ]
    ]


_TUNED = None


def _kernel():
    global _TUNED
    if INTERPRET:
        return _int8_matmul_kernel
    if _TUNED is None:
        _TUNED = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_int8_matmul_kernel)
    return _TUNED


def _scale_vector(scale: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, int]:
    scale = scale.float().contiguous()
    if scale.numel() == 1:
        return scale.reshape(1), 0
    if scale.numel() != n:
        raise QBenchError(f"int8_matmul: {what} scale has {scale.numel()} values; expected 1 or {n}")
    return scale.reshape(n), 1


def _check(a, b):
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise QBenchError("int8_matmul needs int8 codes for both operands")
    if a.shape[-1] != b.shape[-1]:
        raise QBenchError(f"int8_matmul: inner dimensions differ ({a.shape[-1]} vs {b.shape[-1]})")


def int8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``a`` int8 [..., K] with scale (1 or one per row), ``b`` int8 [N, K] with scale (1 or [N])."""
    _check(a, b)
    if not triton_can_run(a):
        return int8_matmul_reference(a, a_scale, b, b_scale, bias, out_dtype)
    lead = a.shape[:-1]
    K = a.shape[-1]
    a2d = a.reshape(-1, K).contiguous()
    b = b.contiguous()
    M, N = a2d.shape[0], b.shape[0]
    sa, stride_sa = _scale_vector(a_scale, M, "activation")
    sb, stride_sb = _scale_vector(b_scale, N, "weight")
    y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return y.view(*lead, N)
    bias_arg = bias.contiguous() if bias is not None else y
    blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32) if INTERPRET else {}
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _kernel()[grid](a2d, b, sa, sb, bias_arg, y, M, N, K, a2d.stride(0), b.stride(0), y.stride(0),
                    stride_sa, stride_sb, HAS_BIAS=bias is not None, **blocks)
    return y.view(*lead, N)


def int8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float16):
    """Same arithmetic in torch: exact integer sums (float64), then fp32 ``acc * sa * sb + bias``."""
    _check(a, b)
    lead = a.shape[:-1]
    K = a.shape[-1]
    a2d = a.reshape(-1, K)
    M, N = a2d.shape[0], b.shape[0]
    sa, _ = _scale_vector(a_scale, M, "activation")
    sb, _ = _scale_vector(b_scale, N, "weight")
    acc = (a2d.double() @ b.double().T).float()
    out = acc * sa.reshape(-1, 1) * sb.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).view(*lead, N)
