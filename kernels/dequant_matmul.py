"""Fused dequantize-matmul for weight-only layers: ``y = x @ dequant(W).T + bias``.

The weight never exists in floating point in memory: each tile is decoded in registers.

Weight formats (``W`` is ``[N, K]``: N outputs, K inputs):

* ``int8``: absmax codes, int8 ``[N, K]``; scale fp32, 0-dim (per tensor), ``[N]`` (per
  channel) or ``[N, groups]`` (blocks of ``group_size`` along K). ``w = q * s``. With one
  scale per row (or tensor) the scale is applied once in the epilogue.
* ``affine``: codes packed by :func:`qbench.kernels.affine.pack_codes` (``bits`` 2..8, a
  little-endian bit stream per row), scales ``[N, groups]`` (fp16 or fp32), zero points packed
  the same way (``[N, cdiv(groups*bits, 8)]`` uint8), or none when symmetric (zero =
  2**(bits-1)). ``w = s * (q - z)``; group of column k is ``k // group_size`` (last one shorter).

Two kernels: a GEMV for batch 1 (decode: each program reduces BLOCK_N weight rows against the
one activation row, memory-bound) and a tiled GEMM with ``tl.dot`` for larger batches. fp16 and
bf16 activations meet the decoded weight in their own dtype with fp32 accumulation (bf16 is
upcast to fp32 under the interpreter); fp32 activations use IEEE fp32 dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qbench.kernels._triton import INTERPRET, UPCAST_BF16, cdiv, dot_dequantized, gemv_group, triton_can_run
from qbench.kernels.affine import packed_row_bytes, unpack_codes
from qbench.params import QBenchError

ZERO_NONE, ZERO_CONST, ZERO_PACKED = 0, 1, 2


@triton.jit
def _unpack(ptr, row_off, idx, mask, row_bytes, BITS: tl.constexpr):
    """Codes number ``idx`` of the bit stream rows at ``ptr + row_off`` (int32 in 0..2**BITS-1)."""
    bitpos = idx * BITS
    byte = bitpos // 8
    shift = bitpos % 8
    word = tl.load(ptr + row_off + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # 3, 5, 6, 7 bits: a code may straddle two bytes
        hi = tl.load(ptr + row_off + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0).to(tl.int32)
        word = word | (hi << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _decode_tile(w_ptr, s_ptr, z_ptr, n, k, mask, K, w_row_bytes, z_row_bytes, group_size,
                 stride_sn, stride_sg,
                 INT8: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, SCALE_IN_EPILOGUE: tl.constexpr):
    """Decoded fp32 weights at (n, k) (broadcast index tensors of the same shape)."""
    n64 = n.to(tl.int64)
    if INT8:
        q = tl.load(w_ptr + n64 * K + k, mask=mask, other=0).to(tl.float32)
    else:
        q = _unpack(w_ptr, n64 * w_row_bytes, k, mask, w_row_bytes, BITS).to(tl.float32)
    if SCALE_IN_EPILOGUE:
        return q
    g = k // group_size
    s = tl.load(s_ptr + n64 * stride_sn + g * stride_sg, mask=mask, other=0.0).to(tl.float32)
    if ZERO_MODE == 1:
        q = q - (1 << (BITS - 1))
    elif ZERO_MODE == 2:
        q = q - _unpack(z_ptr, n64 * z_row_bytes, g, mask, z_row_bytes, BITS).to(tl.float32)
    return s * q


@triton.jit
def _epilogue(acc, s_ptr, b_ptr, offs_n, mask_n, stride_sn, SCALE_IN_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if SCALE_IN_EPILOGUE:
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _dequant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym,
    w_row_bytes, z_row_bytes, group_size, stride_sn, stride_sg,
    INT8: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, SCALE_IN_EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        mask = mask_n[:, None] & mask_k[None, :]
        w = _decode_tile(w_ptr, s_ptr, z_ptr, offs_n[:, None], offs_k[None, :], mask, K, w_row_bytes, z_row_bytes,
                         group_size, stride_sn, stride_sg, INT8, BITS, ZERO_MODE, SCALE_IN_EPILOGUE)
        acc += tl.sum(w * x[None, :], axis=1)
    acc = _epilogue(acc, s_ptr, b_ptr, offs_n, mask_n, stride_sn, SCALE_IN_EPILOGUE, HAS_BIAS)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _affine_gemv_grouped_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym,
    w_row_bytes, z_row_bytes, stride_sn, stride_sg,
    BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Batch-1 GEMV for 2-, 4- or 8-bit codes in groups of ``GROUP`` (a power of two) along K.

    The tile's packed bytes are loaded a row of bytes at a time (vector loads: the general kernel
    above loads one byte per code, which the first H200 lease measured at 0.2 TB/s), split into codes
    with shifts, and each group's scale and zero are applied once per group, not per weight:
    ``y += s * (sum(q * x) - z * sum(x))`` over the group.
    """
    PER: tl.constexpr = 8 // BITS  # codes in a byte, low bits first
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups in a tile
    SPAN: tl.constexpr = BLOCK_K // NG
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    shifts = tl.arange(0, PER) * BITS
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # x past K is 0: the codes that share the row's last byte add nothing
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        offs_c = k0 // PER + tl.arange(0, BLOCK_K // PER)
        byte = tl.load(w_ptr + n64[:, None] * w_row_bytes + offs_c[None, :],
                       mask=mask_n[:, None] & (offs_c < w_row_bytes)[None, :], other=0).to(tl.int32)
        q = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q, [BLOCK_N, BLOCK_K]).to(tl.float32)
        qx = tl.sum(tl.reshape(q * x[None, :], [BLOCK_N, NG, SPAN]), axis=2)
        g = k0 // GROUP + tl.arange(0, NG)
        gmask = mask_n[:, None] & (g * GROUP < K)[None, :]
        s = tl.load(s_ptr + n64[:, None] * stride_sn + g[None, :] * stride_sg, mask=gmask, other=0.0).to(tl.float32)
        xs = tl.sum(tl.reshape(x, [NG, SPAN]), axis=1)
        if ZERO_MODE == 1:
            part = qx - (1 << (BITS - 1)) * xs[None, :]
        else:
            z = _unpack(z_ptr, n64[:, None] * z_row_bytes, g[None, :], gmask, z_row_bytes, BITS).to(tl.float32)
            part = qx - z * xs[None, :]
        acc += tl.sum(s * part, axis=1)
    acc = _epilogue(acc, s_ptr, b_ptr, offs_n, mask_n, stride_sn, False, HAS_BIAS)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    w_row_bytes, z_row_bytes, group_size, stride_sn, stride_sg,
    INT8: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr, SCALE_IN_EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _decode_tile(w_ptr, s_ptr, z_ptr, offs_n[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :],
                         K, w_row_bytes, z_row_bytes, group_size, stride_sn, stride_sg,
                         INT8, BITS, ZERO_MODE, SCALE_IN_EPILOGUE)  # [BLOCK_K, BLOCK_N]
        acc = dot_dequantized(a, w, acc, UPCAST)
    acc = _epilogue(acc, s_ptr, b_ptr, offs_n, mask_n, stride_sn, SCALE_IN_EPILOGUE, HAS_BIAS)
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gemm_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
            (128, 128, 32, 8, 3), (128, 64, 64, 4, 4), (16, 128, 128, 4, 3),
        ]
    ]


def _gemv_configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in [(16, 256, 4), (32, 128, 4), (64, 128, 4), (16, 512, 4), (32, 256, 8), (8, 512, 2)]
    ]


_TUNED: dict = {}
INTERPRET_GEMV_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 64}  # the interpreter's fixed blocks (tests swap in the GPU's)


def _kernel(name: str):
    """Interpreter: the plain kernels with fixed small blocks. CUDA: autotuned versions."""
    base = {"gemm": _dequant_gemm_kernel, "gemv": _dequant_gemv_kernel,
            "gemv_grouped": _affine_gemv_grouped_kernel}[name]
    if INTERPRET:
        return base
    if name not in _TUNED:
        configs = _gemm_configs() if name == "gemm" else _gemv_configs()
        key = {"gemm": ["M", "N", "K"], "gemv": ["N", "K"], "gemv_grouped": ["N", "K", "BITS", "GROUP"]}[name]
        _TUNED[name] = triton.autotune(configs=configs, key=key)(base)
    return _TUNED[name]


def _launch(x, w, scale, zeros, bias, *, int8: bool, bits: int, zero_mode: int, group_size: int,
            in_features: int, out_features: int, path: str | None):
    K, N = in_features, out_features
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    M = x2d.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*lead, N)
    size = K if group_size == -1 or group_size >= K else group_size
    groups = cdiv(K, size)
    scale = scale.contiguous()
    if scale.numel() == 1:
        stride_sn, stride_sg = 0, 0
    else:
        scale = scale.reshape(N, -1)
        stride_sn, stride_sg = scale.stride(0), (scale.stride(1) if scale.shape[1] > 1 else 0)
    epilogue = int8 and (scale.numel() == 1 or scale.shape[-1] == 1)
    w_row_bytes = K if int8 else packed_row_bytes(K, bits)
    z_row_bytes = packed_row_bytes(groups, bits)
    zeros = zeros.contiguous() if zeros is not None else w
    bias_arg = bias.contiguous() if bias is not None else y
    common = dict(INT8=int8, BITS=bits, ZERO_MODE=zero_mode, SCALE_IN_EPILOGUE=epilogue, HAS_BIAS=bias is not None)
    args = (w_row_bytes, z_row_bytes, size, stride_sn, stride_sg)
    use_gemv = path == "gemv" or (path is None and M == 1)
    group = 0 if int8 or 8 % bits != 0 else gemv_group(size, groups)  # codes that never straddle a byte
    if use_gemv and group:
        blocks = dict(INTERPRET_GEMV_BLOCKS) if INTERPRET else {}
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
        _kernel("gemv_grouped")[grid](x2d, w, scale, zeros, bias_arg, y, N, K, x2d.stride(0), y.stride(0),
                                      w_row_bytes, z_row_bytes, stride_sn, stride_sg, BITS=bits, ZERO_MODE=zero_mode,
                                      HAS_BIAS=bias is not None, GROUP=group, **blocks)
    elif use_gemv:
        kernel = _kernel("gemv")
        blocks = dict(INTERPRET_GEMV_BLOCKS) if INTERPRET else {}
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
        kernel[grid](x2d, w, scale, zeros, bias_arg, y, N, K, x2d.stride(0), y.stride(0), *args, **common, **blocks)
    else:
        kernel = _kernel("gemm")
        blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32) if INTERPRET else {}
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        kernel[grid](x2d, w, scale, zeros, bias_arg, y, M, N, K, x2d.stride(0), y.stride(0), *args, **common,
                     UPCAST=UPCAST_BF16, **blocks)
    return y.view(*lead, N)


# ---- int8 absmax weights (W8A16)

def _check_x(x, in_features):
    if x.shape[-1] != in_features:
        raise QBenchError(f"input has {x.shape[-1]} features, the layer expects {in_features}")


def int8_dequant_weight_reference(codes: torch.Tensor, scale: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    N, K = codes.shape
    s = scale.float()
    if s.numel() == 1:
        s = s.reshape(1, 1)
    else:
        s = s.reshape(N, -1)
        if s.shape[1] > 1:
            s = s.repeat_interleave(group_size, dim=1)[:, :K]
    return codes.float() * s


def int8_weight_matmul(x, codes, scale, bias=None, group_size: int = -1, path: str | None = None):
    """``x @ (codes * scale).T + bias`` for absmax int8 weights; ``path`` forces "gemv"/"gemm"."""
    N, K = codes.shape
    _check_x(x, K)
    if not triton_can_run(x):
        return int8_weight_matmul_reference(x, codes, scale, bias, group_size)
    return _launch(x, codes.contiguous(), scale.float(), None, bias, int8=True, bits=8, zero_mode=ZERO_NONE,
                   group_size=group_size, in_features=K, out_features=N, path=path)


def int8_weight_matmul_reference(x, codes, scale, bias=None, group_size: int = -1):
    w = int8_dequant_weight_reference(codes, scale, group_size).to(x.dtype)
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- packed affine weights (sub-byte or 8-bit, with groups)

def affine_dequant_weight_reference(packed, scales, zeros_packed, bits: int, group_size: int, in_features: int,
                                    sym: bool = False) -> torch.Tensor:
    N = packed.shape[0]
    K = in_features
    size = K if group_size == -1 or group_size >= K else group_size
    groups = cdiv(K, size)
    q = unpack_codes(packed, bits, K).float()
    if sym or zeros_packed is None:
        z = torch.full((N, groups), float(2 ** (bits - 1)), device=packed.device)
    else:
        z = unpack_codes(zeros_packed, bits, groups).float()
    s = scales.float().reshape(N, groups).repeat_interleave(size, dim=1)[:, :K]
    z = z.repeat_interleave(size, dim=1)[:, :K]
    return s * (q - z)


def affine_weight_matmul(x, packed, scales, zeros_packed, bits: int, group_size: int, in_features: int,
                         bias=None, path: str | None = None):
    """``x @ dequant(W).T + bias`` for packed affine codes; ``zeros_packed=None`` means symmetric."""
    _check_x(x, in_features)
    if not triton_can_run(x):
        return affine_weight_matmul_reference(x, packed, scales, zeros_packed, bits, group_size, in_features, bias)
    zero_mode = ZERO_CONST if zeros_packed is None else ZERO_PACKED
    return _launch(x, packed.contiguous(), scales, zeros_packed, bias, int8=False, bits=bits, zero_mode=zero_mode,
                   group_size=group_size, in_features=in_features, out_features=packed.shape[0], path=path)


def affine_weight_matmul_reference(x, packed, scales, zeros_packed, bits, group_size, in_features, bias=None):
    w = affine_dequant_weight_reference(packed, scales, zeros_packed, bits, group_size, in_features).to(x.dtype)
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
