"""Fused NF4/FP4 dequantize-matmul: ``y = x @ W.T`` and the input gradient ``g @ W`` read the
packed 4-bit codes directly (``kernels/nf4.py`` layout) and never materialise the fp16 weight.

* ``_nf4_gemv_aligned_kernel``: the decode fast path (forward, small batches, every weight row
  made of whole quantization blocks, as in every Llama-shaped layer): packed bytes are read as
  bytes and each block's absmax once, ``code * x`` summed per block before scaling.
* ``_nf4_gemv_kernel``: the other small-batch cases (rows that end mid-block). Each
  program owns ``BLOCK_J`` outputs of one input row and streams the packed weight once, reducing
  in fp32 registers.
* ``_nf4_gemm_aligned_kernel``: larger batches, same condition as the aligned GEMV: each packed
  byte read once, its two nibbles multiplied with the even and odd input columns (two ``tl.dot``
  per step), one absmax load per block piece.
* ``_nf4_grad_input_aligned_kernel``: the input gradient ``g @ W`` (any batch) under the same
  condition: a program owns a strip of packed bytes of every weight row and walks the rows, each
  byte read once and split into the even/odd input features.
* ``_nf4_gemm_kernel``: larger batches otherwise (rows ending mid-block, forward and backward). A
  ``[BLOCK_M, BLOCK_R]`` tile of the input meets a ``[BLOCK_R, BLOCK_J]`` tile of the weight
  dequantized in registers (to the input dtype, as bitsandbytes dequantizes to the compute
  dtype), accumulated with ``tl.dot`` in fp32.

The two general kernels address the weight by its flat row-major index ``r * stride_r + j * stride_j``
(reduction index r, output index j), so the same code serves the forward (r = in feature,
j = out feature) and the backward (r = out feature, j = in feature), and any shape: rows need not
be multiples of the quantization block, and odd rows start mid-byte.

``nf4_linear(x, q, bias)`` is differentiable w.r.t. ``x`` (and ``bias``) and frozen in ``q``:
QLoRA trains adapters through it.
"""
from __future__ import annotations

import os

import torch

from qbench.kernels._triton import HAS_TRITON, INTERPRET, UPCAST_BF16, cdiv, triton_can_run
from qbench.kernels.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qbench.kernels._triton import dot_dequantized

# (BLOCK_J, STEP, num_warps) of the aligned GEMV on a GPU. Few output rows a program (4, 8) give
# 512-1024 programs for 4096 outputs: the first H200 lease measured the 16-64-row configs
# latency-bound at 0.1-0.26 TB/s (256 programs or fewer, each walking all of K); the autotuner picks.
GEMV_ALIGNED_CONFIGS = [(16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 256, 8), (32, 256, 8),
                        (4, 256, 2), (4, 512, 4), (8, 256, 4), (8, 512, 4)]
INTERPRET_GEMV_ALIGNED_BLOCKS = {"BLOCK_J": 8, "STEP": 16}  # the interpreter's (tests swap in the GPU's)

# Batches up to this many rows take the GEMV kernel (one pass over the weight per row).
GEMV_MAX_ROWS = 4


def piece_bytes(step: int, blocksize: int) -> int:
    """Bytes per absmax piece for a step of ``step`` packed bytes: a piece never crosses a
    quantization block (``blocksize // 2`` bytes; both powers of two, so the piece divides it)."""
    return min(step, blocksize // 2)


def nf4_matmul_reference(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ W.T`` with W dequantized (in x's dtype) first; plain torch."""
    return x @ dequantize_nf4_reference(q, x.dtype).t()


def nf4_matmul_grad_input_reference(grad_out: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``grad_out @ W``: the gradient w.r.t. the input of ``x @ W.T``; plain torch."""
    return grad_out @ dequantize_nf4_reference(q, grad_out.dtype)


if HAS_TRITON:

    @triton.jit
    def _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, block, mask,
                     DOUBLE_QUANT: tl.constexpr):
        """The fp32 absmax of quantization blocks ``block`` (undoing double quantization)."""
        # one return after a static if/else: the compiler types every return statement it sees
        if DOUBLE_QUANT:
            q8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_map_ptr + q8) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
            scale = tl.where(mask, scale + tl.load(offset_ptr), 0.0)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _piece_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, offs_j, mask_j, b0, row_bytes,
                      blocks_per_row, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      NPIECE: tl.constexpr, SUB: tl.constexpr):
        """``[BLOCK_J, NPIECE]`` absmax of the pieces of ``SUB`` bytes starting at byte ``b0`` of rows ``offs_j``
        (rows of whole blocks, so a piece lies in one block); 0 past the row or the last output."""
        piece_start = b0 + tl.arange(0, NPIECE) * SUB  # first byte of each piece in the row
        block = offs_j.to(tl.int64)[:, None] * blocks_per_row + (2 * piece_start // BLOCKSIZE)[None, :]
        return _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, block,
                            mask_j[:, None] & (piece_start < row_bytes)[None, :], DOUBLE_QUANT)


    @triton.jit
    def _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr,
                      flat, mask, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """fp32 weights at flat indices ``flat`` (any shape), 0 where ``mask`` is false."""
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 15  # even index: high nibble
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                             DOUBLE_QUANT)
        w = tl.load(code_ptr + nibble) * scale
        return tl.where(mask, w, 0.0)

    @triton.jit
    def _pair_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr, offs_n, mask_n,
                   c0, K, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAIRS: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr):
        """fp32 weights ``W[offs_n, 2c]`` and ``W[offs_n, 2c + 1]`` for the column pairs
        ``c = c0 + arange(PAIRS)`` of a row-major ``[*, K]`` weight: two ``[BLOCK_N, PAIRS]`` tiles,
        0 outside the weight.

        ALIGNED (``K % BLOCKSIZE == 0``, ``c0 % SUB == 0``): pair c of a row is byte c of it (high nibble
        first), loaded once as a byte, and each piece of ``SUB`` bytes takes one absmax. Otherwise every
        weight is decoded from its flat index (rows may start mid-byte, blocks span rows).
        """
        offs_c = c0 + tl.arange(0, PAIRS)
        if ALIGNED:
            NPIECE: tl.constexpr = PAIRS // SUB
            row_bytes = K // 2
            byte = tl.load(packed_ptr + offs_n.to(tl.int64)[:, None] * row_bytes + offs_c[None, :],
                           mask=mask_n[:, None] & (offs_c < row_bytes)[None, :], other=0).to(tl.int32)
            scale = _piece_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, offs_n, mask_n, c0,
                                  row_bytes, K // BLOCKSIZE, BLOCKSIZE, DOUBLE_QUANT, NPIECE, SUB)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, NPIECE, SUB]), [BLOCK_N, PAIRS])
            w_even = tl.load(code_ptr + (byte >> 4)) * scale
            w_odd = tl.load(code_ptr + (byte & 15)) * scale
        else:
            flat = offs_n.to(tl.int64)[:, None] * K + 2 * offs_c[None, :]
            w_even = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr,
                                   flat, mask_n[:, None] & (2 * offs_c < K)[None, :], BLOCKSIZE, DOUBLE_QUANT)
            w_odd = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr,
                                  flat + 1, mask_n[:, None] & (2 * offs_c + 1 < K)[None, :], BLOCKSIZE, DOUBLE_QUANT)
        return w_even, w_odd

    @triton.jit
    def _nf4_gemv_kernel(x_ptr, out_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                         code_ptr, R, J, stride_r, stride_j, stride_xm, stride_om,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
        row = tl.program_id(0)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            x = tl.load(x_ptr + row * stride_xm + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            flat = offs_j.to(tl.int64)[:, None] * stride_j + offs_r.to(tl.int64)[None, :] * stride_r
            w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr,
                              flat, mask_j[:, None] & mask_r[None, :], BLOCKSIZE, DOUBLE_QUANT)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + row * stride_om + offs_j, acc.to(out_ptr.dtype.element_ty), mask=mask_j)

    @triton.jit
    def _nf4_gemv_aligned_kernel(x_ptr, out_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr,
                                 offset_ptr, code_ptr, R, J, stride_xm, stride_om,
                                 BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_J: tl.constexpr,
                                 STEP: tl.constexpr, SUB: tl.constexpr):
        """Forward GEMV when every weight row holds whole quantization blocks (``R % BLOCKSIZE == 0``).

        Each step reads ``STEP`` packed bytes per output row as bytes (two codes each, split into
        the even and odd inputs), sums ``code * x`` over pieces of ``SUB`` bytes that lie in one
        quantization block, and applies that block's absmax once per piece instead of per weight.
        """
        NPIECE: tl.constexpr = STEP // SUB
        row = tl.program_id(0)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        row_bytes = R // 2
        blocks_per_row = R // BLOCKSIZE
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        for b0 in range(0, row_bytes, STEP):
            offs_b = b0 + tl.arange(0, STEP)
            mask_b = offs_b < row_bytes
            byte = tl.load(packed_ptr + offs_j.to(tl.int64)[:, None] * row_bytes + offs_b[None, :],
                           mask=mask_j[:, None] & mask_b[None, :], other=0).to(tl.int32)
            x_even = tl.load(x_ptr + row * stride_xm + 2 * offs_b, mask=mask_b, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + row * stride_xm + 2 * offs_b + 1, mask=mask_b, other=0.0).to(tl.float32)
            part = tl.load(code_ptr + (byte >> 4)) * x_even[None, :] + tl.load(code_ptr + (byte & 15)) * x_odd[None, :]
            sums = tl.sum(tl.reshape(part, [BLOCK_J, NPIECE, SUB]), axis=2)
            scale = _piece_scales(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, offs_j, mask_j, b0,
                                  row_bytes, blocks_per_row, BLOCKSIZE, DOUBLE_QUANT, NPIECE, SUB)
            acc += tl.sum(sums * scale, axis=1)
        tl.store(out_ptr + row * stride_om + offs_j, acc.to(out_ptr.dtype.element_ty), mask=mask_j)

    @triton.jit
    def _nf4_gemm_aligned_kernel(x_ptr, out_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr,
                                 offset_ptr, code_ptr, M, R, J, stride_xm, stride_om,
                                 BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_J: tl.constexpr, STEP: tl.constexpr, SUB: tl.constexpr,
                                 UPCAST_BF16: tl.constexpr):
        """Forward GEMM when every weight row holds whole quantization blocks (``R % BLOCKSIZE == 0``).

        Per step, ``STEP`` packed bytes of ``BLOCK_J`` weight rows are read once; their high and low
        nibbles are the even and odd input columns, each scaled by its block's absmax (one load per
        piece of ``SUB`` bytes) and multiplied with the matching even/odd columns of the input tile.
        """
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_m = offs_m < M
        mask_j = offs_j < J
        row_bytes = R // 2
        acc = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
        for b0 in range(0, row_bytes, STEP):
            offs_b = b0 + tl.arange(0, STEP)
            mask_b = offs_b < row_bytes
            w_even, w_odd = _pair_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                       code_ptr, offs_j, mask_j, b0, R, BLOCKSIZE, DOUBLE_QUANT, BLOCK_J, STEP, SUB,
                                       True)  # [BLOCK_J, STEP]: input columns 2b and 2b + 1
            x_rows = x_ptr + offs_m[:, None] * stride_xm
            mask_x = mask_m[:, None] & mask_b[None, :]
            x_even = tl.load(x_rows + 2 * offs_b[None, :], mask=mask_x, other=0.0)
            x_odd = tl.load(x_rows + 2 * offs_b[None, :] + 1, mask=mask_x, other=0.0)
            acc = dot_dequantized(x_even, tl.trans(w_even), acc, UPCAST_BF16)
            acc = dot_dequantized(x_odd, tl.trans(w_odd), acc, UPCAST_BF16)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_j[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_j[None, :])

    @triton.jit
    def _nf4_grad_input_aligned_kernel(g_ptr, out_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr,
                                       offset_ptr, code_ptr, M, N, K, stride_gm, stride_om,
                                       BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                                       BLOCK_N: tl.constexpr, STEP: tl.constexpr, SUB: tl.constexpr,
                                       UPCAST_BF16: tl.constexpr):
        """``grad_out [M, N] @ W [N, K]`` when every weight row holds whole quantization blocks.

        A program owns ``STEP`` packed bytes of every weight row (input features ``2b`` and ``2b + 1``)
        and walks the ``N`` rows: each byte is read once, its high and low nibbles are the even and
        odd features, scaled once per piece of ``SUB`` bytes; the two accumulators are interleaved
        into contiguous columns at the end.
        """
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b0 = tl.program_id(1) * STEP
        mask_m = offs_m < M
        acc_even = tl.zeros([BLOCK_M, STEP], dtype=tl.float32)
        acc_odd = tl.zeros([BLOCK_M, STEP], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w_even, w_odd = _pair_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                       code_ptr, offs_n, mask_n, b0, K, BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, STEP, SUB,
                                       True)  # [BLOCK_N, STEP]: input features 2b and 2b + 1
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            acc_even = dot_dequantized(g, w_even, acc_even, UPCAST_BF16)
            acc_odd = dot_dequantized(g, w_odd, acc_odd, UPCAST_BF16)
        out = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, 2 * STEP])  # columns 2b, 2b + 1, ...
        offs_k = 2 * b0 + tl.arange(0, 2 * STEP)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_k < K)[None, :])

    @triton.jit
    def _nf4_gemm_kernel(x_ptr, out_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                         code_ptr, M, R, J, stride_r, stride_j, stride_xm, stride_om,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
                         UPCAST_BF16: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_m = offs_m < M
        mask_j = offs_j < J
        acc = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            flat = offs_r.to(tl.int64)[:, None] * stride_r + offs_j.to(tl.int64)[None, :] * stride_j
            w = _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, code_ptr,
                              flat, mask_r[:, None] & mask_j[None, :], BLOCKSIZE, DOUBLE_QUANT)
            acc = dot_dequantized(a, w, acc, UPCAST_BF16)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_j[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_j[None, :])

    _piece = triton.heuristics({"SUB": lambda meta: piece_bytes(meta["STEP"], meta["BLOCKSIZE"])})
    _nf4_gemv_aligned_kernel = _piece(_nf4_gemv_aligned_kernel)
    _nf4_gemm_aligned_kernel = _piece(_nf4_gemm_aligned_kernel)
    _nf4_grad_input_aligned_kernel = _piece(_nf4_grad_input_aligned_kernel)

    if not INTERPRET:  # autotune on GPU; the interpreter gets one fixed config (see _launch)
        _nf4_gemv_aligned_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_J": bj, "STEP": st}, num_warps=w) for bj, st, w in GEMV_ALIGNED_CONFIGS],
            key=["R", "J", "BLOCKSIZE", "DOUBLE_QUANT"])(_nf4_gemv_aligned_kernel)
        _nf4_gemv_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_J": bj, "BLOCK_R": br}, num_warps=w)
                     for bj, br, w in [(16, 256, 4), (32, 256, 4), (64, 128, 4), (16, 512, 8), (32, 512, 8)]],
            key=["R", "J", "BLOCKSIZE", "DOUBLE_QUANT"])(_nf4_gemv_kernel)
        _nf4_gemm_aligned_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_J": bj, "STEP": st}, num_warps=w, num_stages=s)
                     for bm, bj, st, w, s in [(16, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                                              (64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3)]],
            key=["M", "R", "J", "BLOCKSIZE", "DOUBLE_QUANT"])(_nf4_gemm_aligned_kernel)
        _nf4_grad_input_aligned_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "STEP": st}, num_warps=w, num_stages=s)
                     for bm, bn, st, w, s in [(16, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                                              (64, 64, 64, 8, 3), (128, 64, 32, 8, 3), (128, 32, 64, 8, 3)]],
            key=["M", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"])(_nf4_grad_input_aligned_kernel)
        _nf4_gemm_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_J": bj, "BLOCK_R": br}, num_warps=w, num_stages=s)
                     for bm, bj, br, w, s in [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                                              (64, 128, 64, 8, 2), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3)]],
            key=["M", "R", "J", "BLOCKSIZE", "DOUBLE_QUANT"])(_nf4_gemm_kernel)


def _launch(x2d: torch.Tensor, q: NF4Tensor, R: int, J: int, stride_r: int, stride_j: int) -> torch.Tensor:
    """out[m, j] = sum_r x2d[m, r] * W_flat[r * stride_r + j * stride_j] with Triton."""
    M = x2d.shape[0]
    x2d = x2d.contiguous()
    if INTERPRET and x2d.dtype == torch.bfloat16:
        x_in = x2d.float()  # the interpreter has no bf16 arithmetic
        out = torch.empty(M, J, dtype=torch.float32, device=x2d.device)
    else:
        x_in = x2d
        out = torch.empty(M, J, dtype=x2d.dtype, device=x2d.device)
    if M == 0:
        return out.to(x2d.dtype)
    dummy = q.absmax
    state = (q.packed, q.absmax, q.nested_absmax if q.double_quant else dummy, q.nested_code,
             q.offset if q.double_quant else dummy, q.code)
    common = dict(BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant)
    dots = dict(UPCAST_BF16=UPCAST_BF16)  # only the kernels that multiply with tl.dot read it
    # whole quantization blocks in every weight row (every Llama-shaped layer), forward or backward
    aligned = stride_r == 1 and stride_j == R and R % q.blocksize == 0
    aligned_backward = stride_j == 1 and stride_r == J and J % q.blocksize == 0
    if aligned_backward:
        fixed = dict(BLOCK_M=16, BLOCK_N=16, STEP=16) if INTERPRET else {}
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(J // 2, meta["STEP"]))  # noqa: E731
        _nf4_grad_input_aligned_kernel[grid](x_in, out, *state, M, R, J, x_in.stride(0), out.stride(0), **common,
                                             **dots, **fixed)
    elif M <= GEMV_MAX_ROWS and aligned:
        # forward with whole blocks per row: bytes and absmax loaded once (the decode fast path)
        fixed = dict(INTERPRET_GEMV_ALIGNED_BLOCKS) if INTERPRET else {}
        grid = lambda meta: (M, cdiv(J, meta["BLOCK_J"]))  # noqa: E731
        _nf4_gemv_aligned_kernel[grid](x_in, out, *state, R, J, x_in.stride(0), out.stride(0), **common, **fixed)
    elif M <= GEMV_MAX_ROWS:
        fixed = dict(BLOCK_J=16, BLOCK_R=32) if INTERPRET else {}
        grid = lambda meta: (M, cdiv(J, meta["BLOCK_J"]))  # noqa: E731
        _nf4_gemv_kernel[grid](x_in, out, *state, R, J, stride_r, stride_j, x_in.stride(0), out.stride(0),
                               **common, **fixed)
    elif aligned:
        fixed = dict(BLOCK_M=16, BLOCK_J=16, STEP=16) if INTERPRET else {}
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(J, meta["BLOCK_J"]))  # noqa: E731
        _nf4_gemm_aligned_kernel[grid](x_in, out, *state, M, R, J, x_in.stride(0), out.stride(0), **common, **dots,
                                       **fixed)
    else:
        fixed = dict(BLOCK_M=16, BLOCK_J=16, BLOCK_R=32) if INTERPRET else {}
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(J, meta["BLOCK_J"]))  # noqa: E731
        _nf4_gemm_kernel[grid](x_in, out, *state, M, R, J, stride_r, stride_j, x_in.stride(0), out.stride(0),
                               **common, **dots, **fixed)
    return out.to(x2d.dtype)


DEQUANT_MATMUL_PATH = "triton-dequant+torch-matmul"


def dequantize_then_matmul(x: torch.Tensor) -> bool:
    """Whether several rows of fp16 activations on CUDA take the whole-weight path: our dequantize
    kernel writes the fp16 weight, torch's FP16 matmul (cuBLAS) multiplies, as bitsandbytes does above
    batch 1. On the first H200 lease (results/gpu-h200/bench-nf4.md) the dequantize kernel took
    0.06-0.12 ms and FP16 matmul 0.02-0.05 ms at issue 13's shapes, the fused GEMM 0.48-1.95 ms at
    16-128 rows. bf16 and fp32 keep the fused kernels (a bf16 weight keeps 8 bits: see
    dot_dequantized). ``QBENCH_CUDA_GEMM=fused`` keeps them for fp16 too (to measure both)."""
    return (x.is_cuda and x.dtype == torch.float16 and x.shape[:-1].numel() > GEMV_MAX_ROWS
            and os.environ.get("QBENCH_CUDA_GEMM", "dequant") != "fused")


def cuda_kernel_path(x: torch.Tensor) -> str:
    """The path name a module records for activations ``x`` on CUDA."""
    return DEQUANT_MATMUL_PATH if dequantize_then_matmul(x) else "triton"


def _check(x: torch.Tensor, q: NF4Tensor, dim: int, what: str) -> None:
    if len(q.shape) != 2:
        raise ValueError(f"nf4 matmul needs a 2-D quantized weight, got shape {q.shape}")
    if x.shape[-1] != q.shape[dim]:
        raise ValueError(f"nf4 {what}: input has {x.shape[-1]} features, "
                         f"the weight {tuple(q.shape)} needs {q.shape[dim]}")


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``x @ W.T`` for x [..., in_features] and the quantized W [out_features, in_features]."""
    _check(x, q, 1, "matmul")
    if use_triton is None:
        use_triton = triton_can_run(x)
    if not (use_triton and HAS_TRITON):
        return nf4_matmul_reference(x, q)
    out_features, in_features = q.shape
    if dequantize_then_matmul(x):
        return x @ dequantize_nf4(q, torch.float16).t()
    y = _launch(x.reshape(-1, in_features), q, R=in_features, J=out_features, stride_r=1, stride_j=in_features)
    return y.reshape(*x.shape[:-1], out_features)


def nf4_matmul_grad_input(grad_out: torch.Tensor, q: NF4Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``grad_out @ W`` for grad_out [..., out_features]: the input gradient of ``x @ W.T``."""
    _check(grad_out, q, 0, "grad_input")
    if use_triton is None:
        use_triton = triton_can_run(grad_out)
    if not (use_triton and HAS_TRITON):
        return nf4_matmul_grad_input_reference(grad_out, q)
    out_features, in_features = q.shape
    if dequantize_then_matmul(grad_out):
        return grad_out @ dequantize_nf4(q, torch.float16)
    g = _launch(grad_out.reshape(-1, out_features), q, R=out_features, J=in_features,
                stride_r=in_features, stride_j=1)
    return g.reshape(*grad_out.shape[:-1], in_features)


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ W.T + bias with W frozen in NF4; gradients for x (and bias) only."""

    @staticmethod
    def forward(ctx, x, bias, q, use_triton):
        ctx.q = q
        ctx.use_triton = use_triton
        ctx.bias_shape = None if bias is None else bias.shape
        y = nf4_matmul(x, q, use_triton)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul_grad_input(grad_out, ctx.q, ctx.use_triton)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def nf4_linear(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
               use_triton: bool | None = None) -> torch.Tensor:
    """Differentiable ``x @ W.T + bias`` with W the frozen quantized weight ``q``.

    ``use_triton``: None = wherever Triton can run on ``x`` (CUDA, or CPU under the
    interpreter); False = the torch reference (dequantize, then matmul).
    """
    return NF4LinearFunction.apply(x, bias, q, use_triton)
