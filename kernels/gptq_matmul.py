"""Fused dequantize-matmul over the GPTQ checkpoint layout: ``y = x @ dequant(qweight) + bias``.

One op per file: the Triton kernels (a GEMV path for a single row, a GEMM path with ``tl.dot`` for
more rows), the launcher :func:`gptq_matmul`, and the plain-torch :func:`gptq_matmul_reference`.
The layout is the one in :mod:`kernels.gptq_pack` (2/3/4/8-bit codes packed along the input
dimension, zeros packed along the output dimension, fp16 scales, ``g_idx``). Weights are dequantized
tile by tile in registers and never materialised in memory; ``g_idx`` is read per input column, so
act-order checkpoints (any column-to-group mapping) run on the same kernels.
"""
from __future__ import annotations

import torch

from qbench.kernels._triton import HAS_TRITON, INTERPRET, UPCAST_BF16, cdiv, gemv_group, triton_can_run
from qbench.kernels.gptq_pack import check_bits, dequantize_gptq, packed_rows
from qbench.params import QBenchError

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qbench.kernels._triton import dot_dequantized

    @triton.jit
    def _code_at(ptr, bit, stride_word, other_offset, mask, BITS: tl.constexpr):
        """Codes of ``BITS`` bits at stream positions ``bit`` (words along ``stride_word``)."""
        word = bit >> 5
        shift = (bit & 31).to(tl.uint32)
        lo = tl.load(ptr + word * stride_word + other_offset, mask=mask, other=0).to(tl.uint32, bitcast=True)
        code = (lo >> shift) & ((1 << BITS) - 1)
        if 32 % BITS != 0:  # 3-bit codes may spill into the next word
            spill = (shift + BITS) > 32
            hi = tl.load(ptr + (word + 1) * stride_word + other_offset, mask=mask & spill, other=0)
            hi = hi.to(tl.uint32, bitcast=True)
            up = tl.where(spill, 32 - shift, 0).to(tl.uint32)
            code = code | ((hi << up) & ((1 << BITS) - 1))
        return code.to(tl.int32)

    @triton.jit
    def _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, offs_k, offs_n, mask_k, mask_n,
                      stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                      BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
        """fp32 weight tile ``[BLOCK_K, BLOCK_N]`` (input dim first)."""
        mask = mask_k[:, None] & mask_n[None, :]
        group = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        codes = _code_at(qw_ptr, offs_k[:, None] * BITS, stride_qk, offs_n[None, :] * stride_qn, mask, BITS)
        zeros = _code_at(qz_ptr, offs_n[None, :] * BITS, stride_zn, group[:, None] * stride_zg, mask, BITS)
        scales = tl.load(sc_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        return (codes - zeros - ZERO_OFFSET).to(tl.float32) * scales.to(tl.float32)

    @triton.jit
    def _gptq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, bias_ptr, out_ptr,
                          N, K, stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn,
                          stride_sg, stride_sn, stride_om, stride_on,
                          BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one row of x, BLOCK_N outputs: a weighted column sum, no tensor cores needed
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, offs_k, offs_n, mask_k, mask_n,
                              stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, BITS, ZERO_OFFSET)
            acc += tl.sum(x[:, None] * w, axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gptq_gemv_grouped_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, bias_ptr, out_ptr,
                                  N, K, stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn,
                                  stride_sg, stride_sn, stride_om, stride_on,
                                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x when column k is in group ``k // GROUP`` (``g_idx`` monotonic: no act-order, or
        act-order with static groups, the default) and codes fill whole words (2, 4, 8 bits).

        Each packed word is loaded once (the general kernel loads it once per code it holds) and split
        with shifts; scales and zeros are applied once per group: ``s * (sum(q * x) - z * sum(x))``.
        """
        PER: tl.constexpr = 32 // BITS  # codes in a word, low bits first
        NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups in a tile
        SPAN: tl.constexpr = BLOCK_K // NG
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        words_in_k = (K * BITS + 31) // 32
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            # x past K is 0: the codes that share the last word add nothing
            x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                            mask=(offs_w < words_in_k)[:, None] & mask_n[None, :], other=0)
            words = words.to(tl.uint32, bitcast=True)
            q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            q = tl.reshape(q, [BLOCK_K, BLOCK_N]).to(tl.float32)
            qx = tl.sum(tl.reshape(q * x[:, None], [NG, SPAN, BLOCK_N]), axis=1)
            g = k0 // GROUP + tl.arange(0, NG)
            gmask = (g * GROUP < K)[:, None] & mask_n[None, :]
            s = tl.load(sc_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=gmask, other=0.0)
            z = _code_at(qz_ptr, offs_n[None, :] * BITS, stride_zn, g[:, None] * stride_zg, gmask, BITS)
            xs = tl.sum(tl.reshape(x, [NG, SPAN]), axis=1)
            acc += tl.sum(s.to(tl.float32) * (qx - (z + ZERO_OFFSET).to(tl.float32) * xs[:, None]), axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gptq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, bias_ptr, out_ptr, M_BUCKET,
                          M, N, K, stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn,
                          stride_sg, stride_sn, stride_om, stride_on,
                          BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                          UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, offs_k, offs_n, mask_k, mask_n,
                              stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, BITS, ZERO_OFFSET)
            acc = dot_dequantized(x, w, acc, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # On CUDA the block sizes are autotuned per (N, K, bucket of M); the interpreter gets one config.
    # 8-32 outputs a program as well: with 64-256 a 4096-output layer had 16-64 programs for 132
    # multiprocessors, and the first H200 lease measured 4- and 8-bit equally slow (latency-bound)
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128, 256) for bk in (32, 64, 128) for w in (4,) for s in (2, 3)
    ] + [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
         for bn, bk, w in [(8, 256, 2), (16, 128, 2), (16, 256, 4), (32, 128, 4)]]
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3),
            (64, 64, 32, 4, 3), (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
            (128, 64, 64, 4, 3), (128, 256, 32, 8, 3),
        ]
    ]
    _gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"])(_gptq_gemv_kernel)
    _gemv_grouped_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "BITS", "GROUP"])(
        _gptq_gemv_grouped_kernel)
    _gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_gptq_gemm_kernel)

INTERPRET_GEMV_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 32}
INTERPRET_GEMM_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def _check_layout(x, qweight, qzeros, scales, g_idx, bits, bias) -> tuple[int, int]:
    check_bits(bits)
    if g_idx.dim() != 1 or scales.dim() != 2:
        raise QBenchError("gptq_matmul: g_idx must be 1-D [in_features] and scales 2-D [groups, out_features]")
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    if x.shape[-1] != in_features:
        raise QBenchError(f"gptq_matmul: input has {x.shape[-1]} features, the layer expects {in_features}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or g_idx.dtype != torch.int32:
        raise QBenchError("gptq_matmul: qweight, qzeros and g_idx must be int32")
    if tuple(qweight.shape) != (packed_rows(in_features, bits), out_features):
        raise QBenchError(f"gptq_matmul: qweight has shape {tuple(qweight.shape)}, expected "
                          f"{(packed_rows(in_features, bits), out_features)} for {bits} bits")
    if tuple(qzeros.shape) != (scales.shape[0], packed_rows(out_features, bits)):
        raise QBenchError(f"gptq_matmul: qzeros has shape {tuple(qzeros.shape)}, expected "
                          f"{(scales.shape[0], packed_rows(out_features, bits))}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise QBenchError(f"gptq_matmul: bias must have shape ({out_features},)")
    return in_features, out_features


def gptq_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                          zero_offset: int = 1) -> torch.Tensor:
    """Plain torch: dequantize the whole weight to fp32, matmul in fp32, cast to ``x.dtype``."""
    in_features, out_features = _check_layout(x, qweight, qzeros, scales, g_idx, bits, bias)
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset)  # [K, N]
    y = x.reshape(-1, in_features).float() @ weight
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def contiguous_group(g_idx: torch.Tensor, bits: int, group_size: int) -> int:
    """GROUP for the grouped GEMV when ``g_idx`` is ``k // group_size`` (no act-order, or act-order
    with static groups), codes fill whole words and the group is a power of two of at least 16
    columns (or the whole row); 0 otherwise. Reads ``g_idx`` once: call it when a layer is built."""
    in_features = g_idx.shape[0]
    size = in_features if group_size == -1 or group_size >= in_features else group_size
    if 32 % bits != 0:
        return 0
    if not torch.equal(g_idx.cpu().long(), torch.arange(in_features) // size):
        return 0
    return gemv_group(size, cdiv(in_features, size))


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                zero_offset: int = 1, group: int = 0) -> torch.Tensor:
    """``x @ W + bias`` with ``W`` ([in, out]) dequantized on the fly from the GPTQ layout.

    ``zero_offset`` is 1 for the v1 "gptq" checkpoint format (zeros stored minus one), 0 for
    "gptq_v2". Runs the Triton kernels where :func:`triton_can_run` (the GEMV kernel for a single
    row, the GEMM kernel otherwise) and the torch reference elsewhere. ``group``: what
    :func:`contiguous_group` returned for this layer; nonzero sends single rows to the grouped GEMV.
    """
    if not triton_can_run(x):
        return gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bits, bias, zero_offset)
    in_features, out_features = _check_layout(x, qweight, qzeros, scales, g_idx, bits, bias)
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*x.shape[:-1], out_features)
    bias_arg = bias if bias is not None else scales  # any pointer; unused without HAS_BIAS
    m_bucket = min(triton.next_power_of_2(rows), 256)
    common = (qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
              scales.stride(0), scales.stride(1), out.stride(0), out.stride(1))
    flags = {"BITS": bits, "ZERO_OFFSET": zero_offset, "HAS_BIAS": bias is not None}
    if rows == 1 and group:
        kernel, blocks = ((_gptq_gemv_grouped_kernel, INTERPRET_GEMV_BLOCKS) if INTERPRET
                          else (_gemv_grouped_tuned, {}))

        def grid(meta):
            return (rows, cdiv(out_features, meta["BLOCK_N"]))

        kernel[grid](x2, qweight, qzeros, scales, bias_arg, out, out_features, in_features, x2.stride(0),
                     x2.stride(1), *common, **flags, GROUP=group, **blocks)
    elif rows == 1:
        kernel, blocks = (_gptq_gemv_kernel, INTERPRET_GEMV_BLOCKS) if INTERPRET else (_gemv_tuned, {})

        def grid(meta):
            return (rows, cdiv(out_features, meta["BLOCK_N"]))

        kernel[grid](x2, qweight, qzeros, scales, g_idx, bias_arg, out,
                     out_features, in_features, x2.stride(0), x2.stride(1), *common, **flags, **blocks)
    else:
        kernel, blocks = (_gptq_gemm_kernel, INTERPRET_GEMM_BLOCKS) if INTERPRET else (_gemm_tuned, {})

        def grid(meta):
            return (cdiv(rows, meta["BLOCK_M"]), cdiv(out_features, meta["BLOCK_N"]))

        kernel[grid](x2, qweight, qzeros, scales, g_idx, bias_arg, out, m_bucket,
                     rows, out_features, in_features, x2.stride(0), x2.stride(1), *common, **flags,
                     UPCAST=UPCAST_BF16, **blocks)
    return out.reshape(*x.shape[:-1], out_features)
