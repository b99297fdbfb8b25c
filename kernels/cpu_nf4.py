"""NF4 / FP4 matmul on CPU straight from the packed codes: ``y = x @ W.T`` (``kernels/nf4.py`` format).

ATen has no kernel for a 16-value code book, and torch ops cannot decode 4-bit codes fast enough
(a gather per weight: several times slower than the fp16 baseline). So this module carries a
small C kernel (built once per machine by :mod:`qbench.kernels._cpu_cc`, called through ctypes).
Where it cannot be built the modules keep the reference path (``kernel_path = "reference"``).

The packed codes stay the only copy of the weight. Rows must be whole quantization blocks
(``in_features % blocksize == 0``, true of every Llama-shaped layer), else the caller uses the
reference. Two routines:

* ``qbench_nf4_gemv`` (up to :data:`GEMV_MAX_ROWS` input rows: decode, memory-bound): AVX-512 reads
  16 packed bytes at a time, looks the 32 codes up in the code book held in one register
  (``vpermps``), multiplies them with the even and odd input features and sums each quantization
  block before scaling it by its absmax once. fp32 throughout, the sums in another order than the
  reference's: results agree to fp32 rounding (1e-6 of ``|x| @ |W|.T``, tested).
* ``qbench_nf4_decode`` (more rows: prefill, compute-bound): decodes the layer to fp32, ``code *
  absmax`` exactly as :func:`qbench.kernels.nf4.dequantize_nf4_reference` does (bit-identical),
  into a temporary freed after the call. Where the CPU multiplies bf16 natively
  (:func:`qbench.kernels._cpu.bf16_gemm_fast`) that weight and the input are rounded to bf16 for
  oneDNN's bf16 GEMM (fp32 sums; about 4x an fp32 GEMM on AVX512-BF16): ``cpu:nf4-bf16gemm``,
  within ``2**-7 * (|x| @ |W|.T)`` of the reference plus the bf16 output rounding. Otherwise the
  fp32 matmul of the reference, bit-identical (``cpu:nf4-decode``).

Double-quantized absmax values are decoded inside the kernel
(``nested_map[code] * nested_absmax[block // 256] + offset``, multiply then add, no FMA, as the
reference). On CPUs without AVX-512 the same C code is compiled without intrinsics (plain loops).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from qbench.kernels import _cpu_cc
from qbench.kernels._cpu import bf16_gemm_fast
from qbench.kernels.nf4 import (
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    NF4Tensor,
    code_book,
    dequantize_nf4_reference,
)
from qbench.params import QBenchError

GEMV_MAX_ROWS = 4  # input rows the fused kernel handles per pass over the weight

_SOURCE = f"#define NESTED_BLOCKSIZE {NESTED_BLOCKSIZE}\n" + r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* fp32 absmax of block b: stored (fp32) or double-quantized (uint8 code, nested map, nested absmax, offset). */
static inline float block_absmax(int64_t b, const float* absmax_f32, const uint8_t* absmax_u8,
                                 const float* nested_map, const float* nested_absmax, float offset) {
    if (absmax_f32) return absmax_f32[b];
    float v = nested_map[absmax_u8[b]] * nested_absmax[b / NESTED_BLOCKSIZE];
    return v + offset;
}

/* Output n of M <= 4 input rows (M a constant after inlining): sum_k xs[m, k] * code[q(n, k)] * absmax(block).
   Byte i of row n holds element 2i in its high nibble and 2i + 1 in its low nibble; xs holds each input row
   as its even features, then its odd features. */
static inline __attribute__((always_inline)) void gemv_row(
        const float* xs, const int M, int64_t K, const uint8_t* packed, int64_t N, int64_t n, int64_t blocksize,
        const float* code, const float* absmax_f32, const uint8_t* absmax_u8, const float* nested_map,
        const float* nested_absmax, float offset, float* y) {
    const int64_t half = K / 2, blocks_per_row = K / blocksize, bytes_per_block = blocksize / 2;
    const uint8_t* row = packed + n * half;
    float out[4] = {0.f, 0.f, 0.f, 0.f};
#ifdef __AVX512F__
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[4];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; b++) {
        __m512 s_even[4], s_odd[4];
        for (int m = 0; m < M; m++) { s_even[m] = _mm512_setzero_ps(); s_odd[m] = _mm512_setzero_ps(); }
        for (int64_t j = b * bytes_per_block; j < (b + 1) * bytes_per_block; j += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + j)));
            __m512 c_even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            __m512 c_odd = _mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut);
            for (int m = 0; m < M; m++) {
                s_even[m] = _mm512_fmadd_ps(c_even, _mm512_loadu_ps(xs + m * K + j), s_even[m]);
                s_odd[m] = _mm512_fmadd_ps(c_odd, _mm512_loadu_ps(xs + m * K + half + j), s_odd[m]);
            }
        }
        const __m512 scale = _mm512_set1_ps(block_absmax(n * blocks_per_row + b, absmax_f32, absmax_u8,
                                                         nested_map, nested_absmax, offset));
        for (int m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(s_even[m], s_odd[m]), scale, acc[m]);
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int64_t b = 0; b < blocks_per_row; b++) {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t j = b * bytes_per_block; j < (b + 1) * bytes_per_block; j++) {
            const float c_even = code[row[j] >> 4], c_odd = code[row[j] & 15];
            for (int m = 0; m < M; m++) s[m] += c_even * xs[m * K + j] + c_odd * xs[m * K + half + j];
        }
        const float scale = block_absmax(n * blocks_per_row + b, absmax_f32, absmax_u8, nested_map,
                                         nested_absmax, offset);
        for (int m = 0; m < M; m++) out[m] += s[m] * scale;
    }
#endif
    for (int m = 0; m < M; m++) y[m * N + n] = out[m];
}

/* y[m, n] = sum_k x[m, k] * W[n, k] for M <= 4 rows of x, W decoded on the fly (rows of whole blocks). */
void qbench_nf4_gemv(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, int64_t blocksize,
                     const float* code, const float* absmax_f32, const uint8_t* absmax_u8,
                     const float* nested_map, const float* nested_absmax, float offset, float* y, int threads) {
    const int64_t half = K / 2;
    float* xs = (float*)malloc(sizeof(float) * (size_t)(M * K));
    if (!xs) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < half; i++) {
            xs[m * K + i] = x[m * K + 2 * i];
            xs[m * K + half + i] = x[m * K + 2 * i + 1];
        }
#define QBENCH_ROW(rows) gemv_row(xs, rows, K, packed, N, n, blocksize, code, absmax_f32, absmax_u8, nested_map, \
                                  nested_absmax, offset, y)
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        switch (M) {
            case 1: QBENCH_ROW(1); break;
            case 2: QBENCH_ROW(2); break;
            case 3: QBENCH_ROW(3); break;
            default: QBENCH_ROW(4); break;
        }
    }
#undef QBENCH_ROW
    free(xs);
}

/* w[n, k] = code[q(n, k)] * absmax(block), fp32, for N rows of K (rows of whole blocks). */
void qbench_nf4_decode(const uint8_t* packed, int64_t N, int64_t K, int64_t blocksize, const float* code,
                       const float* absmax_f32, const uint8_t* absmax_u8, const float* nested_map,
                       const float* nested_absmax, float offset, float* w, int threads) {
    const int64_t blocks = N * K / blocksize, bytes_per_block = blocksize / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const float a = block_absmax(b, absmax_f32, absmax_u8, nested_map, nested_absmax, offset);
        const uint8_t* src = packed + b * bytes_per_block;
        float* dst = w + b * blocksize;
#ifdef __AVX512F__
        const __m512 lut = _mm512_loadu_ps(code);
        const __m512i low4 = _mm512_set1_epi32(15);
        const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        const __m512 scale = _mm512_set1_ps(a);
        for (int64_t j = 0; j < bytes_per_block; j += 16) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(src + j)));
            __m512 c_even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            __m512 c_odd = _mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut);
            _mm512_storeu_ps(dst + 2 * j, _mm512_mul_ps(_mm512_permutex2var_ps(c_even, first, c_odd), scale));
            _mm512_storeu_ps(dst + 2 * j + 16, _mm512_mul_ps(_mm512_permutex2var_ps(c_even, second, c_odd), scale));
        }
#else
        for (int64_t j = 0; j < bytes_per_block; j++) {
            dst[2 * j] = code[src[j] >> 4] * a;
            dst[2 * j + 1] = code[src[j] & 15] * a;
        }
#endif
    }
}
"""

NAME = "qbench_nf4"


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64  # pointers pass as plain addresses (Tensor.data_ptr())
    lib.qbench_nf4_gemv.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr,
                                    ctypes.c_int]
    lib.qbench_nf4_decode.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.qbench_nf4_gemv.restype = lib.qbench_nf4_decode.restype = None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (once logged) where it cannot be built."""
    return _cpu_cc.build(NAME, _SOURCE, _declare)


def build_error() -> str | None:
    return _cpu_cc.build_error(NAME)


def kernel_path(rows: int = 1) -> str:
    """What :func:`nf4_matmul_cpu` runs for ``rows`` input rows."""
    if rows <= GEMV_MAX_ROWS:
        return "cpu:nf4-avx512" if _cpu_cc.avx512() else "cpu:nf4-c"
    return "cpu:nf4-bf16gemm" if bf16_gemm_fast() else "cpu:nf4-decode"


def supports(q: NF4Tensor) -> bool:
    """Rows of whole quantization blocks, on CPU, with a kernel that built."""
    if len(q.shape) != 2 or q.device.type != "cpu":
        return False
    return int(q.shape[1]) % q.blocksize == 0 and library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_CODE_BOOKS = {quant_type: code_book(quant_type).float().contiguous() for quant_type in QUANT_TYPES}
_NESTED_MAP = DYNAMIC_MAP.float().contiguous()


class _Layer:
    """The kernel's arguments for one layer, converted to ctypes once (they cost more than a small
    layer's matmul when rebuilt on every call). Holds the tensors it points into."""

    def __init__(self, q: NF4Tensor):
        self.N, self.K = (int(s) for s in q.shape)
        self.blocksize = q.blocksize
        self.packed_ptr, self.absmax_ptr = q.packed.data_ptr(), q.absmax.data_ptr()
        if q.double_quant:
            self.held = (q.absmax.contiguous(), q.nested_absmax.float().contiguous())
            state = (None, self.held[0], _NESTED_MAP, self.held[1], float(q.offset))
        else:
            self.held = (q.absmax.float().contiguous(),)
            state = (self.held[0], None, None, None, 0.0)
        absmax_f32, absmax_u8, nested_map, nested_absmax, offset = state
        self.args = (_ptr(_CODE_BOOKS[q.quant_type]), _ptr(absmax_f32), _ptr(absmax_u8), _ptr(nested_map),
                     _ptr(nested_absmax), ctypes.c_float(offset))
        self.packed = self.packed_ptr


def _layer(q: NF4Tensor) -> _Layer:
    lib = library()
    if lib is None or not supports(q):
        raise QBenchError("the NF4 CPU kernel is not available for this layer (rows must be whole quantization "
                          "blocks, and the kernel must build); use the reference path")
    # Kept on the packed tensor itself, so it lives and dies with the layer.
    layer = getattr(q.packed, "_qbench_nf4_cpu", None)
    if layer is None or layer.packed_ptr != q.packed.data_ptr() or layer.absmax_ptr != q.absmax.data_ptr():
        layer = _Layer(q)
        q.packed._qbench_nf4_cpu = layer
    return layer


def nf4_decode_cpu(q: NF4Tensor) -> torch.Tensor:
    """The fp32 weight ``[N, K]``, equal to ``dequantize_nf4_reference(q, torch.float32)`` bit for bit."""
    layer = _layer(q)
    w = torch.empty(layer.N, layer.K, dtype=torch.float32)
    library().qbench_nf4_decode(layer.packed, layer.N, layer.K, layer.blocksize, *layer.args,
                                w.data_ptr(), torch.get_num_threads())
    return w


def nf4_matmul_cpu(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ W.T`` in fp32 (returned in ``x.dtype``) for the packed ``q`` (rows of whole blocks)."""
    layer = _layer(q)
    N, K = layer.N, layer.K
    if x.shape[-1] != K:
        raise QBenchError(f"nf4 matmul: input has {x.shape[-1]} features, the weight {tuple(q.shape)} needs {K}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    rows = x2d.shape[0]
    if rows > GEMV_MAX_ROWS:  # compute-bound: decode once, then the fastest GEMM there is
        w = nf4_decode_cpu(q)
        if bf16_gemm_fast():
            return F.linear(x2d.to(torch.bfloat16), w.to(torch.bfloat16)).to(x.dtype).reshape(*lead, N)
        return (x2d.float() @ w.T).to(x.dtype).reshape(*lead, N)
    x2d = x2d.float().contiguous()
    y = torch.empty(rows, N, dtype=torch.float32)
    if rows:
        library().qbench_nf4_gemv(x2d.data_ptr(), rows, K, layer.packed, N, layer.blocksize, *layer.args,
                                  y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype).reshape(*lead, N)


def nf4_linear_cpu(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` (no autograd: the modules use it only where no gradient is needed)."""
    y = nf4_matmul_cpu(x, q)
    return y if bias is None else y + bias.to(y.dtype)


def nf4_matmul_cpu_reference(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """Plain torch: the weight dequantized to fp32, an fp32 matmul, cast to ``x.dtype``."""
    return (x.float() @ dequantize_nf4_reference(q, torch.float32).T).to(x.dtype)
