"""LoRA fused with the NF4 dequantize-matmul: ``y = x @ Ŵ.T + bias + s * (x_l @ A.T) @ B.T``.

``Ŵ`` [N, K] is the NF4 (or FP4) weight of :mod:`kernels.nf4` (bitsandbytes layout: flat
row-major blocks of ``blocksize`` values, two codes per byte high nibble first, optionally
double-quantized absmax), dequantized tile by tile in registers and never written to memory.
``A`` [R, K] and ``B`` [N, R] are the (fp32) LoRA adapters in PEFT's layout, ``s = alpha / r``,
``x_l`` the LoRA input (``x`` itself, or ``dropout(x)`` while training).

One op per file: the Triton kernels, the launchers, the plain-torch references and the
``autograd.Function`` tying them together:

* forward  — one kernel: the K loop accumulates ``x @ Ŵ.T`` and the small ``x_l @ A.T`` side by
  side; the epilogue adds ``s * xa @ B.T`` (and writes ``xa`` once, for the backward).
  Both NF4 kernels walk K in column pairs (2c, 2c + 1) decoded by ``nf4_matmul._pair_tile``: when
  every weight row holds whole quantization blocks (Llama-shaped layers) a pair is one packed byte
  read once, with one absmax per piece of bytes; otherwise each weight is decoded by its index.
* backward for x — one kernel: the N loop accumulates ``dy @ Ŵ`` and ``dy @ B``; the epilogue
  adds ``s * (dy @ B) @ A`` (when ``x_l`` is ``x``) and writes ``dxa = s * dy @ B`` once.
* backward for A and B — ``dA = dxa.T @ x_l`` and ``dB = s * dy.T @ xa``: one small
  ``L.T @ R`` kernel, launched twice.

The base weight gets no gradient (it is frozen), as in QLoRA.
"""
from __future__ import annotations

import torch

from qbench.kernels._triton import HAS_TRITON, INTERPRET, UPCAST_BF16, cdiv, triton_can_run
from qbench.kernels.nf4 import NF4Tensor, dequantize_nf4_reference
from qbench.kernels.nf4_matmul import piece_bytes
from qbench.params import QBenchError

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qbench.kernels.nf4_matmul import _pair_tile  # defined only where triton imports

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _fwd_columns(x_ptr, xl_ptr, a_ptr, w, cols, offs_m, mask_m, offs_r, mask_r, K, acc, xa,
                     SEPARATE_XL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """Add columns ``cols`` of x (and x_l, A) to ``acc += x @ w.T`` and ``xa += x_l @ A.T``."""
        x_mask = mask_m[:, None] & (cols < K)[None, :]
        x_offs = offs_m.to(tl.int64)[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)  # 16-bit tensor-core dot, fp32 accumulation
        acc = _dot(x, tl.trans(w), acc, IEEE)
        if SEPARATE_XL:
            xl = tl.load(xl_ptr + x_offs, mask=x_mask, other=0.0)
        else:
            xl = x
        a = tl.load(a_ptr + offs_r[:, None] * K + cols[None, :], mask=mask_r[:, None] & (cols < K)[None, :], other=0.0)
        xa = _dot(xl.to(a.dtype), tl.trans(a), xa, IEEE)
        return acc, xa

    @triton.jit
    def _lora_nf4_fwd_kernel(x_ptr, xl_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr,
                             offset_ptr, code_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, xa_ptr, scaling,
                             M, N, K, R,
                             BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SEPARATE_XL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                             ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             PAIRS: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr):
        # The K loop walks column pairs (2c, 2c + 1): with whole quantization blocks per row (ALIGNED)
        # a pair is one packed byte, read once; x, x_l and A are read as their even and odd columns.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for c0 in range(0, (K + 1) // 2, PAIRS):
            col = 2 * (c0 + tl.arange(0, PAIRS))  # even columns; odd ones are col + 1
            w_even, w_odd = _pair_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                       code_ptr, offs_n, mask_n, c0, K, BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, PAIRS, SUB,
                                       ALIGNED)
            acc, xa = _fwd_columns(x_ptr, xl_ptr, a_ptr, w_even, col, offs_m, mask_m, offs_r, mask_r, K, acc, xa,
                                   SEPARATE_XL, UPCAST, IEEE)
            acc, xa = _fwd_columns(x_ptr, xl_ptr, a_ptr, w_odd, col + 1, offs_m, mask_m, offs_r, mask_r, K, acc, xa,
                                   SEPARATE_XL, UPCAST, IEEE)
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        # scale before the cast: a 16-bit tensor times the fp32 scalar would be fp32 again, and tl.dot
        # needs both operands in one dtype
        acc = _dot((xa * scaling).to(b.dtype), tl.trans(b), acc, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
        if pid_n == 0:  # xa is the same for every N tile: one program row keeps it for the backward
            tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=mask_m[:, None] & mask_r[None, :])

    @triton.jit
    def _lora_nf4_bwd_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                code_ptr, a_ptr, b_ptr, dx_ptr, dxa_ptr, scaling, M, N, K, R,
                                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ADD_LORA_DX: tl.constexpr,
                                UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr, SUB: tl.constexpr,
                                BLOCK_R: tl.constexpr):
        # A program owns the column pairs c0 .. c0 + PAIRS of dx (even and odd columns accumulated
        # apart, interleaved at the store) and walks the N rows of the NF4 weight.
        pid_m = tl.program_id(0)
        c0 = tl.program_id(1) * PAIRS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        col = 2 * (c0 + tl.arange(0, PAIRS))  # even columns; odd ones are col + 1
        mask_m = offs_m < M
        mask_r = offs_r < R
        acc_even = tl.zeros((BLOCK_M, PAIRS), dtype=ACC)
        acc_odd = tl.zeros((BLOCK_M, PAIRS), dtype=ACC)
        dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w_even, w_odd = _pair_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                       code_ptr, offs_n, mask_n, c0, K, BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, PAIRS, SUB,
                                       ALIGNED)
            if UPCAST:
                dy = dy.to(tl.float32)
            else:
                w_even = w_even.to(dy.dtype)
                w_odd = w_odd.to(dy.dtype)
            acc_even = _dot(dy, w_even, acc_even, IEEE)
            acc_odd = _dot(dy, w_odd, acc_odd, IEEE)
            b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                        other=0.0)
            dxa = _dot(dy.to(b.dtype), b, dxa, IEEE)
        dxa = dxa * scaling
        if ADD_LORA_DX:
            a_rows = a_ptr + offs_r[:, None] * K
            a_even = tl.load(a_rows + col[None, :], mask=mask_r[:, None] & (col < K)[None, :], other=0.0)
            a_odd = tl.load(a_rows + col[None, :] + 1, mask=mask_r[:, None] & (col + 1 < K)[None, :], other=0.0)
            acc_even = _dot(dxa.to(a_even.dtype), a_even, acc_even, IEEE)
            acc_odd = _dot(dxa.to(a_odd.dtype), a_odd, acc_odd, IEEE)
        dx = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, 2 * PAIRS])  # columns 2c, 2c + 1, ...
        offs_k = 2 * c0 + tl.arange(0, 2 * PAIRS)
        tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_k < K)[None, :])
        if c0 == 0:
            tl.store(dxa_ptr + offs_m[:, None] * R + offs_r[None, :], dxa, mask=mask_m[:, None] & mask_r[None, :])

    @triton.jit
    def _lt_r_kernel(l_ptr, r_ptr, out_ptr, scaling, M, P, Q, IEEE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
        """``out[P, Q] = scaling * L[M, P].T @ R[M, Q]`` in fp32 (fp64 for fp64) (the adapters' gradients)."""
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_p = offs_p < P
        mask_q = offs_q < Q
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            lt = tl.load(l_ptr + offs_m.to(tl.int64)[None, :] * P + offs_p[:, None],
                         mask=mask_m[None, :] & mask_p[:, None], other=0.0)
            r = tl.load(r_ptr + offs_m.to(tl.int64)[:, None] * Q + offs_q[None, :],
                        mask=mask_m[:, None] & mask_q[None, :], other=0.0)
            acc = _dot(lt.to(ACC), r.to(ACC), acc, IEEE)
        tl.store(out_ptr + offs_p[:, None] * Q + offs_q[None, :], acc * scaling, mask=mask_p[:, None] & mask_q[None, :])


def _blocks(rows: int, rank: int, q: NF4Tensor) -> dict[str, int]:
    """Tile sizes; PAIRS column pairs (2 * PAIRS columns of K) per step, SUB bytes per absmax piece."""
    block_r = max(16, triton.next_power_of_2(rank))
    if INTERPRET:  # one small config: the interpreter is slow and cannot autotune
        blocks = {"BLOCK_M": 16, "BLOCK_N": 32, "PAIRS": 16, "BLOCK_R": block_r}
    else:
        blocks = {"BLOCK_M": 16 if rows <= 16 else (32 if rows <= 32 else 64), "BLOCK_N": 64, "PAIRS": 32,
                  "BLOCK_R": block_r, "num_warps": 4, "num_stages": 3}
    return {**blocks, "SUB": piece_bytes(blocks["PAIRS"], q.blocksize)}


def _nf4_args(q: NF4Tensor) -> tuple:
    nested = q.nested_absmax if q.double_quant else q.absmax  # unused pointers without double quant
    offset = q.offset.reshape(1) if q.double_quant else q.absmax
    return q.packed, q.absmax, nested, q.nested_code, offset, q.code.float()


def _flags(q: NF4Tensor, dtype: torch.dtype) -> dict:
    # ALIGNED: every weight row holds whole quantization blocks (every Llama-shaped layer)
    return {"BLOCKSIZE": q.blocksize, "DOUBLE_QUANT": q.double_quant, "ALIGNED": q.shape[1] % q.blocksize == 0,
            "UPCAST": UPCAST_BF16 and dtype == torch.bfloat16,
            "IEEE": dtype in (torch.float32, torch.float64), "ACC": _acc(dtype)}


def _acc(dtype: torch.dtype):
    # fp64 only for gradcheck; everything else accumulates in fp32
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x: torch.Tensor, q: NF4Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bias) -> tuple[int, int, int]:
    if len(q.shape) != 2:
        raise QBenchError(f"lora_nf4_linear: the NF4 weight must be 2-D [out, in], got shape {q.shape}")
    n, k = q.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k:
        raise QBenchError(f"lora_nf4_linear: input has {x.shape[-1]} features, the layer expects {k}")
    if tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r) or r < 1:
        raise QBenchError(f"lora_nf4_linear: LoRA A must be [r, {k}] and B [{n}, r] with r >= 1, "
                          f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise QBenchError(f"lora_nf4_linear: bias must have shape ({n},)")
    return n, k, r


def lora_nf4_linear_reference(x: torch.Tensor, q: NF4Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                              scaling: float, bias: torch.Tensor | None = None,
                              x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch (differentiable in x, A, B): dequantize, matmul in x's dtype, LoRA in A's dtype."""
    _check(x, q, lora_a, lora_b, bias)
    weight = dequantize_nf4_reference(q, torch.float32).to(x.dtype)
    y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    xl = x if x_lora is None else x_lora
    delta = (xl.to(lora_a.dtype) @ lora_a.t()) @ lora_b.t() * scaling
    return y + delta.to(x.dtype)


def _lora_nf4_forward(x2, xl2, q, lora_a, lora_b, scaling, bias):
    m, k = x2.shape
    n, r = lora_b.shape
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    xa = torch.empty(m, r, dtype=torch.float32 if lora_a.dtype != torch.float64 else torch.float64, device=x2.device)
    blocks = _blocks(m, r, q)
    grid = (cdiv(m, blocks["BLOCK_M"]), cdiv(n, blocks["BLOCK_N"]))
    _lora_nf4_fwd_kernel[grid](
        x2, xl2 if xl2 is not None else x2, *_nf4_args(q), lora_a, lora_b,
        bias if bias is not None else lora_b, out, xa, float(scaling), m, n, k, r,
        HAS_BIAS=bias is not None, SEPARATE_XL=xl2 is not None, **_flags(q, x2.dtype), **blocks)
    return out, xa


def _lt_r(left: torch.Tensor, right: torch.Tensor, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    m, p = left.shape
    q_cols = right.shape[1]
    out = torch.empty(p, q_cols, dtype=torch.float32 if out_dtype != torch.float64 else torch.float64,
                      device=left.device)
    size = 32 if INTERPRET else 64
    blocks = {"BLOCK_M": size, "BLOCK_P": size, "BLOCK_Q": size}
    grid = (cdiv(p, blocks["BLOCK_P"]), cdiv(q_cols, blocks["BLOCK_Q"]))
    _lt_r_kernel[grid](left, right, out, float(scaling), m, p, q_cols,
                       IEEE=out_dtype == torch.float64 or left.dtype == torch.float32, ACC=_acc(out_dtype), **blocks)
    return out.to(out_dtype)


class LoRANF4Function(torch.autograd.Function):
    """Triton forward and backward (x, A, B; the NF4 base is frozen). 2-D inputs, contiguous."""

    @staticmethod
    def forward(ctx, x2, xl2, lora_a, lora_b, bias, q, scaling):
        out, xa = _lora_nf4_forward(x2, xl2, q, lora_a, lora_b, scaling, bias)
        ctx.q, ctx.scaling, ctx.has_xl = q, scaling, xl2 is not None
        ctx.save_for_backward(x2 if xl2 is None else xl2, xa, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, dy):
        xl2, xa, lora_a, lora_b = ctx.saved_tensors
        q, scaling = ctx.q, ctx.scaling
        dy = dy.contiguous()
        m, n = dy.shape
        k, r = lora_a.shape[1], lora_a.shape[0]
        dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
        dxa = torch.empty(m, r, dtype=xa.dtype, device=dy.device)
        blocks = _blocks(m, r, q)
        grid = (cdiv(m, blocks["BLOCK_M"]), cdiv(cdiv(k, 2), blocks["PAIRS"]))
        _lora_nf4_bwd_dx_kernel[grid](dy, *_nf4_args(q), lora_a, lora_b, dx, dxa, float(scaling), m, n, k, r,
                                      ADD_LORA_DX=not ctx.has_xl, **_flags(q, dy.dtype), **blocks)
        grad_xl = None
        if ctx.has_xl:  # dropout: the LoRA branch's input gradient goes to x_l, torch's dropout does the rest
            grad_xl = (dxa @ lora_a).to(xl2.dtype)
        grad_a = _lt_r(dxa, xl2, 1.0, lora_a.dtype) if ctx.needs_input_grad[2] else None
        grad_b = _lt_r(dy, xa, scaling, lora_b.dtype) if ctx.needs_input_grad[3] else None
        return dx, grad_xl, grad_a, grad_b, None, None, None  # bias and NF4 base are frozen


def lora_nf4_linear(x: torch.Tensor, q: NF4Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, bias: torch.Tensor | None = None,
                    x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ Ŵ.T + bias + scaling * (x_lora @ A.T) @ B.T`` (``x_lora`` defaults to ``x``),
    differentiable in x, x_lora, A and B. Triton where it can run, the reference elsewhere."""
    n, k, _ = _check(x, q, lora_a, lora_b, bias)
    if not triton_can_run(x):
        return lora_nf4_linear_reference(x, q, lora_a, lora_b, scaling, bias, x_lora)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    xl2 = None if x_lora is None else x_lora.reshape(-1, k).contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n)
    if INTERPRET:  # no bf16 arithmetic in the interpreter; the adapters are small, upcast them (autograd casts back)
        lora_a, lora_b = (t.float() if t.dtype == torch.bfloat16 else t for t in (lora_a, lora_b))
    out = LoRANF4Function.apply(x2, xl2, lora_a.contiguous(), lora_b.contiguous(), bias, q, scaling)
    return out.reshape(*lead, n)
