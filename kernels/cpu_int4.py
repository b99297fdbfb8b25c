"""4-bit grouped weight-only matmul on CPU with ATen's int4 kernel (``affine`` and ``gptq`` at 4 bits).

``torch._weight_int4pack_mm_for_cpu(x, weight, group, scales_and_zeros)`` computes ``x @ W.T`` with
``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, ``g = k // group`` (read from ATen's CPU
kernel, ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``, and tested here):

* ``weight``: uint8 ``[N, K/2]`` from ``torch._convert_weight_to_int4pack_for_cpu(q)`` (int32 codes
  ``[N, K]`` in 0..15); ATen interleaves the nibbles for its vector width, so the layout is opaque
  and only ATen's converter writes it. Needs ``N % 16 == 0`` and even ``K``.
* ``scales_and_zeros``: ``[K / group, N, 2]`` in the activation dtype; ``zero`` is a float offset
  in weight units, not a code. ``group`` is 32, 64, 128 or 256 and must divide ``K``.
* On x86 only bfloat16 activations are vectorized (fp32 and fp16 run a scalar loop, slower than
  the reference), so activations are rounded to bf16 and the fp32 sums come back as bf16.

Our formats store ``W = s * (q - z)`` with fp16 scales and integer zero points, hence
``scale = bf16(s)`` and ``zero = bf16(bf16(s) * (8 - z))``: ``(q - 8) * scale + zero`` then equals
``bf16(s) * (q - z)`` up to the zero's bf16 rounding (at most ``2**-9 * 8 * s``, i.e. 1/64 of a
quantization step). With the bf16 roundings of the activations and of the output, a result
differs from the fp32 reference by at most ``2**-7 * (|x| @ |W|.T) + 2**-6 * (|x| @ S.T) +
2**-8 * |y|`` (``S``: each weight's scale; tested), about 0.3% RMS in practice.

From :data:`BF16_GEMM_MIN_ROWS` input rows on (prefill), where the CPU multiplies bf16 natively,
a small C routine decodes ATen's layout once per call into the same weights rounded to bf16
(:func:`decode_bf16_t`, exact against the plain-torch decode) for oneDNN's bf16 GEMM
(``cpu:int4-bf16gemm``): the weight's extra bf16 rounding stays within the bound above.

Conversion happens once per layer (:func:`pack_int4_cpu`, at quantize or load time):

* group boundaries: the kernel group is the one of 256/128/64/32 that divides our group size and
  makes the packed layer smallest, so 576-wide rows with groups of 128 (4 x 128 + a last group of
  64) run as 9 kernel groups of 64 with each of our scales repeated, and need no padding; where
  the kernel group does not divide the row, the row is padded with zero columns (the input is
  padded with zeros too, so the result is unchanged);
* GPTQ act-order (``g_idx`` not ascending): the columns are permuted once so that each group is
  contiguous, and each input is permuted the same way per call (as exllama does);
  a ``g_idx`` whose groups are not each ``group_size`` columns has no such layout (None: the
  layer keeps its reference path);
* output rows are padded to a multiple of 16 and the padding is cut from the result.

The packed layer holds about 4.3-4.5 bits per weight (4 for the codes, 32 bits per kernel group and
row for the bf16 scale and zero). It replaces the method's own codes in memory: ATen's layout is a
fixed interleaving of nibbles per block of 64 (AVX-512; 32 on AVX2 and without vectors) output rows,
which :func:`unpack_int4_cpu` inverts exactly, so the modules drop their packed codes after the
conversion and rebuild them only when asked for their stored tensors (saving, the memory suite's
format bytes). Which interleaving this machine's ATen writes is read once by packing a probe
(:func:`layout`); where none of the known ones matches, the modules keep both copies.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qbench.kernels import _cpu_cc
from qbench.kernels._cpu import bf16_gemm_fast
from qbench.kernels._triton import cdiv
from qbench.params import QBenchError

KERNEL_PATH = "cpu:int4pack-bf16"
KERNEL_GROUPS = (256, 128, 64, 32)
OFFSET = 8  # ATen decodes code q as q - 8


@dataclass
class Int4CpuPack:
    """One layer in ATen's CPU int4 layout."""

    weight: torch.Tensor  # uint8 [padded_out, padded_in / 2], ATen's layout
    scales_and_zeros: torch.Tensor  # bf16 [padded_in / group, padded_out, 2]
    group: int  # kernel group size along the input
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None  # int64 [in_features]: input column order (act-order), or None

    @property
    def padded_in(self) -> int:
        return self.weight.shape[1] * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layout holds (the memory suite counts them as resident)."""
        out = {"int4pack_weight": self.weight, "int4pack_scales_and_zeros": self.scales_and_zeros}
        if self.perm is not None:
            out["int4pack_perm"] = self.perm
        return out


def _kernel_group(in_features: int, group_size: int, groups: int, out_features: int) -> int | None:
    """The kernel group that divides our groups (any, for one group per row) and needs the fewest bytes."""
    best, best_bytes = None, None
    for group in KERNEL_GROUPS:
        if groups > 1 and group_size % group:
            continue
        padded = cdiv(in_features, group) * group
        size = out_features * (padded // 2 + padded // group * 4)
        if best_bytes is None or size < best_bytes:
            best, best_bytes = group, size
    return best


def column_order(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, bool]:
    """(permutation making the groups of ``g_idx`` contiguous or None if already so, whether one exists
    with every group ``group_size`` columns wide but the last)."""
    K = g_idx.numel()
    g = g_idx.to(torch.int64).cpu()
    expected = torch.arange(K) // group_size
    if torch.equal(g, expected):
        return None, True
    perm = torch.argsort(g, stable=True)
    return perm, bool(torch.equal(g[perm], expected))


def pack_int4_cpu(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  g_idx: torch.Tensor | None = None) -> Int4CpuPack | None:
    """Convert ``W = scales * (codes - zeros)`` to ATen's CPU int4 layout.

    ``codes``: integers in 0..15, ``[N, K]``; ``scales``/``zeros``: ``[N, G]`` (zero points in code
    units); column ``k`` is in group ``k // group_size`` (``group_size`` = K for one group per row),
    or ``g_idx[k]`` when given. Returns None where no exact layout exists (the caller keeps its
    reference path).
    """
    N, K = codes.shape
    groups = scales.shape[1]
    if scales.shape != (N, groups) or zeros.shape != (N, groups) or K == 0 or N == 0:
        raise QBenchError(f"pack_int4_cpu: codes {tuple(codes.shape)}, scales {tuple(scales.shape)} and zeros "
                          f"{tuple(zeros.shape)} do not describe one layer")
    group_size = K if groups == 1 else group_size
    if cdiv(K, group_size) != groups:
        raise QBenchError(f"pack_int4_cpu: {groups} groups of {group_size} do not cover {K} columns")
    perm = None
    if g_idx is not None and groups > 1:
        perm, ok = column_order(g_idx, group_size)
        if not ok:
            return None
    group = _kernel_group(K, group_size, groups, N)
    if group is None:
        return None
    padded_in, padded_out = cdiv(K, group) * group, cdiv(N, 16) * 16
    q = codes.to(torch.int32).cpu()
    if perm is not None:
        q = q[:, perm]
    q = F.pad(q, (0, padded_in - K, 0, padded_out - N), value=OFFSET)
    weight = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scale = scales.float().cpu().to(torch.bfloat16).float()
    zero = (scale * (OFFSET - zeros.float().cpu())).to(torch.bfloat16).float()
    # kernel group j spans columns [j*group, (j+1)*group), all inside our group (j*group) // group_size
    ours = torch.clamp(torch.arange(padded_in // group) * group // group_size, max=groups - 1)
    pair = torch.stack([scale[:, ours], zero[:, ours]], dim=-1)  # [N, kernel groups, 2]
    pair = F.pad(pair, (0, 0, 0, 0, 0, padded_out - N))
    scales_and_zeros = pair.transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4CpuPack(weight, scales_and_zeros, group, K, N, perm)


# How ATen interleaves rows, by CPU capability: (rows per block, how a full block's bytes pair its rows).
# "halves": byte j of a block's row-slice holds rows j (low nibble) and j + rows/2 (high nibble);
# "pairs": rows 2j and 2j + 1. A last, partial block always pairs (aten/src/ATen/native/cpu/int4mm_kernel.cpp).
LAYOUTS = {"avx512": (64, "halves"), "avx2": (32, "halves"), "plain": (32, "pairs")}
_LAYOUT: list[str | None] = []  # probed once


def _unpack_as(weight: torch.Tensor, block: int, style: str) -> torch.Tensor:
    """int32 codes [padded_out, padded_in] from ATen's bytes, read with one of :data:`LAYOUTS`."""
    rows, half = weight.shape
    cols = 2 * half
    flat = weight.reshape(-1)
    full = rows // block
    parts = []
    if full:
        b = flat[:full * block * half].view(full, cols, block // 2).to(torch.int32)
        lo, hi = b & 15, b >> 4
        joined = torch.cat([lo, hi], dim=2) if style == "halves" else torch.stack([lo, hi], dim=3).flatten(2)
        parts.append(joined.permute(0, 2, 1).reshape(full * block, cols))
    rest = rows - full * block
    if rest:
        b = flat[full * block * half:].view(cols, rest // 2).to(torch.int32)
        parts.append(torch.stack([b & 15, b >> 4], dim=2).flatten(1).T)
    return torch.cat(parts)


def layout() -> str | None:
    """The key of :data:`LAYOUTS` that ATen's converter writes on this machine, or None."""
    if not _LAYOUT:
        probe = torch.randint(0, 16, (64 + 48, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
        found = [name for name, (block, style) in LAYOUTS.items()
                 if torch.equal(_unpack_as(packed, block, style), probe)]
        _LAYOUT.append(found[0] if found else None)
    return _LAYOUT[0]


def unpack_int4_cpu(pack: Int4CpuPack) -> torch.Tensor:
    """The codes ``[N, K]`` (int32, our column order) that :func:`pack_int4_cpu` converted: exact."""
    name = layout()
    if name is None:
        raise QBenchError("unpack_int4_cpu: ATen's int4 layout on this machine is not one this module can read")
    codes = _unpack_as(pack.weight, *LAYOUTS[name])[:pack.out_features, :pack.in_features]
    if pack.perm is None:
        return codes.contiguous()
    ours = torch.empty_like(codes)
    ours[:, pack.perm] = codes
    return ours


# Decoding the layer for oneDNN's bf16 GEMM (compute-bound prefill): C, one pass over ATen's bytes,
# the kernel's own arithmetic ((q - 8) * scale + zero, one fp32 FMA), rounded to bf16 (nearest even),
# written transposed ([padded_in, padded_out]) so that each row-slice of a block is one contiguous run.
_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>

/* 16 rows' weights of one column k, rows from the low (shift 0) or high (shift 4) nibbles of 16 bytes:
   (q - 8) * scale + zero (fp32 FMA, as ATen's kernel), rounded to bf16 (nearest even), stored. */
static inline void decode16(const uint8_t* bytes, int shift, const uint16_t* sz, uint16_t* dst) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)bytes));
    const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(15));
    const __m512i pairs = _mm512_loadu_si512((const void*)sz);  /* 16 x (scale | zero << 16) */
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000u)));
    const __m512 w = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(8.f)), scale, zero);
    __m512i u = _mm512_castps_si512(w);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(u));
}
#endif

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void qbench_int4pack_decode(const uint8_t* packed, int64_t N, int64_t K, int64_t block, int halves,
                            const uint16_t* scales_and_zeros, int64_t group, uint16_t* out, int threads) {
    const int64_t blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < blocks; nb++) {
        const int64_t n0 = nb * block, rows = N - n0 < block ? N - n0 : block, half = rows / 2;
        const int split = halves && rows == block;  /* a last, partial block pairs its rows */
        const uint8_t* src = packed + n0 * (K / 2);
        for (int64_t k = 0; k < K; k++) {
            const uint8_t* bytes = src + k * half;
            const uint16_t* sz = scales_and_zeros + (k / group) * N * 2 + n0 * 2;
            uint16_t* dst = out + k * N + n0;
#ifdef __AVX512F__
            if (split && half % 16 == 0) {
                for (int64_t j = 0; j < half; j += 16) {
                    decode16(bytes + j, 0, sz + 2 * j, dst + j);
                    decode16(bytes + j, 4, sz + 2 * (j + half), dst + j + half);
                }
                continue;
            }
#endif
            for (int64_t j = 0; j < half; j++) {
                const int64_t lo = split ? j : 2 * j, hi = split ? j + half : 2 * j + 1;
                dst[lo] = to_bf16(fmaf((float)(bytes[j] & 15) - 8.f, from_bf16(sz[2 * lo]), from_bf16(sz[2 * lo + 1])));
                dst[hi] = to_bf16(fmaf((float)(bytes[j] >> 4) - 8.f, from_bf16(sz[2 * hi]), from_bf16(sz[2 * hi + 1])));
            }
        }
    }
}
"""
LIBRARY = "qbench_int4"
BF16_GEMM_PATH = "cpu:int4-bf16gemm"
BF16_GEMM_MIN_ROWS = 32  # below, ATen's kernel is faster than decode + bf16 GEMM (measured on AVX512-BF16)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qbench_int4pack_decode.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, i64, ptr, ctypes.c_int]
    lib.qbench_int4pack_decode.restype = None


def _decoder() -> ctypes.CDLL | None:
    return _cpu_cc.build(LIBRARY, _SOURCE, _declare) if layout() is not None else None


def kernel_path(rows: int) -> str:
    """What :func:`int4_matmul_cpu` runs for ``rows`` input rows."""
    if rows >= BF16_GEMM_MIN_ROWS and bf16_gemm_fast() and _decoder() is not None:
        return BF16_GEMM_PATH
    return KERNEL_PATH


def decode_bf16_t(pack: Int4CpuPack) -> torch.Tensor:
    """The weight ATen's kernel computes with, rounded to bf16, transposed: ``[padded_in, padded_out]``."""
    lib = _decoder()
    if lib is None:
        raise QBenchError("int4 decode: the C kernel did not build or ATen's layout is unknown here; "
                          "use the int4 kernel")
    rows, padded_in = pack.weight.shape[0], pack.padded_in
    block, style = LAYOUTS[layout()]
    out = torch.empty(padded_in, rows, dtype=torch.bfloat16)
    lib.qbench_int4pack_decode(pack.weight.data_ptr(), rows, padded_in, block, style == "halves",
                               pack.scales_and_zeros.data_ptr(), pack.group, out.data_ptr(), torch.get_num_threads())
    return out


def int4_matmul_cpu(x: torch.Tensor, pack: Int4CpuPack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with bf16 activations and fp32 sums rounded to bf16: ATen's int4 kernel, or for
    many rows (:func:`kernel_path`) the weight decoded to bf16 once and oneDNN's bf16 GEMM."""
    K, N = pack.in_features, pack.out_features
    if x.shape[-1] != K:
        raise QBenchError(f"input has {x.shape[-1]} features, the layer expects {K}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if pack.perm is not None:
        x2d = x2d.index_select(1, pack.perm)
    xb = x2d.to(torch.bfloat16)
    if pack.padded_in != K:
        xb = F.pad(xb, (0, pack.padded_in - K))
    if kernel_path(xb.shape[0]) == BF16_GEMM_PATH:
        y = torch.mm(xb, decode_bf16_t(pack))
    else:
        y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), pack.weight, pack.group, pack.scales_and_zeros)
    if y.shape[1] != N:
        y = y[:, :N]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, N)


def int4_dequant_weight_cpu_reference(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                      group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` ATen's kernel decodes from :func:`pack_int4_cpu` (plain torch):
    ``(q - 8) * bf16(s) + bf16(bf16(s) * (8 - z))``, one fused multiply-add (exact in float64, then
    rounded once to fp32)."""
    N, K = codes.shape
    if g_idx is None:
        g = torch.arange(K) // (K if scales.shape[1] == 1 else group_size)
    else:
        g = g_idx.to(torch.int64).cpu()
    scale = scales.float().cpu().to(torch.bfloat16).double()
    zero = (scale.float() * (OFFSET - zeros.float().cpu())).to(torch.bfloat16).double()
    return ((codes.double().cpu() - OFFSET) * scale[:, g] + zero[:, g]).float()


def int4_matmul_cpu_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                              group_size: int, g_idx: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The arithmetic of :func:`int4_matmul_cpu` in plain torch (equal up to the summation order)."""
    w = int4_dequant_weight_cpu_reference(codes, scales, zeros, group_size, g_idx)
    y = (x.to(torch.bfloat16).float() @ w.T).to(torch.bfloat16).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
