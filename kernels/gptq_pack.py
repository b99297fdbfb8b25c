"""Pack and unpack the checkpoint layout GPTQ tools share (GPTQ reference, AutoGPTQ, GPTQModel).

Layout of one quantized linear with ``K`` input and ``N`` output features, ``b`` bits, ``G`` groups:

* ``qweight`` int32 ``[K * b / 32, N]``: the codes of each output column form a little-endian
  bit stream along the input dimension; code ``k`` occupies bits ``b*k .. b*k + b - 1`` of the
  stream, so for 4 bits word ``i`` holds codes ``8i .. 8i+7`` with code ``8i`` in the low nibble.
  At 3 bits some codes straddle two words (32 codes fill exactly 3 words), as in AutoGPTQ.
* ``qzeros`` int32 ``[G, N * b / 32]``: the zero points, packed the same way along the output
  dimension. The "gptq" (v1) checkpoint format stores ``zero - 1`` (masked to ``b`` bits), the
  "gptq_v2" format the zero itself; ``zero_offset`` (1 or 0) says which.
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: group of each input column (``k // group_size``
  without act-order, any mapping with it).

Dequantized weight (transposed, ``[K, N]``): ``W[k, n] = scales[g, n] * (q[k, n] - zero[g, n])``
with ``g = g_idx[k]``.

GPTQ tools require ``K`` (and ``N``) to fill whole words; we pad the stream with zero codes when they
do not (our own tiny test models), and :func:`unpack_rows` trims the padding back.
"""
from __future__ import annotations

import math

import torch

from qbench.params import QBenchError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> offset stored zeros carry


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QBenchError(f"gptq layout: bits={bits} is not supported; valid values: 2, 3, 4, 8")


def codes_per_unit(bits: int) -> int:
    """Smallest number of codes that fill whole int32 words (8 at 4 bits, 32 at 3 bits)."""
    return 32 // math.gcd(bits, 32)


def packed_rows(rows: int, bits: int) -> int:
    unit = codes_per_unit(bits)
    return (rows + unit - 1) // unit * unit * bits // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) to int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[R, C]`` (values in ``[0, 2**bits)``) along dim 0 into int32 ``[R*bits/32, C]``."""
    check_bits(bits)
    if codes.dim() != 2:
        raise QBenchError(f"gptq layout: codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise QBenchError(f"gptq layout: codes must lie in [0, {2**bits - 1}] for {bits} bits")
    total = (rows + 31) // 32 * 32  # work in chunks of 32 codes = ``bits`` whole words, trim after
    if total != rows:
        codes = torch.cat([codes, codes.new_zeros(total - rows, cols)])
    chunks = codes.view(total // 32, 32, cols)
    words = codes.new_zeros(total // 32, bits, cols)
    for k in range(32):
        bit = k * bits
        word, shift = divmod(bit, 32)
        value = chunks[:, k]
        words[:, word] += (value << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits spill into the next word (3-bit codes only)
            words[:, word + 1] += value >> (32 - shift)
    return _to_int32(words.view(-1, cols)[:packed_rows(rows, bits)])


def unpack_rows(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[R*bits/32, C]`` to int32 codes ``[rows, C]``."""
    check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise QBenchError(f"gptq layout: packed words must be a 2-D int32 tensor, "
                          f"got {words.dtype} {tuple(words.shape)}")
    if words.shape[0] != packed_rows(rows, bits):
        raise QBenchError(
            f"gptq layout: {words.shape[0]} packed rows cannot hold {rows} codes of {bits} bits "
            f"(expected {packed_rows(rows, bits)})")
    cols = words.shape[1]
    stream = words.to(torch.int64) & 0xFFFFFFFF
    whole = (words.shape[0] + bits - 1) // bits * bits
    if whole != words.shape[0]:
        stream = torch.cat([stream, stream.new_zeros(whole - words.shape[0], cols)])
    stream = stream.view(-1, bits, cols)
    mask = 2**bits - 1
    codes = []
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        value = stream[:, word] >> shift
        if shift + bits > 32:
            value = value | (stream[:, word + 1] << (32 - shift))
        codes.append(value & mask)
    return torch.stack(codes, dim=1).reshape(-1, cols)[:rows].to(torch.int32)


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[K, N]`` (input dim first, as stored) to ``qweight``."""
    return pack_rows(codes_kn, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros_gn: torch.Tensor, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """Integer zero points ``[G, N]`` to ``qzeros`` (``zero - zero_offset`` masked to ``bits``, as v1 does)."""
    stored = (zeros_gn.to(torch.int64) - zero_offset) & (2**bits - 1)
    return pack_rows(stored.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_offset: int = 1) -> torch.Tensor:
    """``qzeros`` to integer zero points ``[G, N]`` (stored value + ``zero_offset``, as the kernels read them)."""
    return unpack_rows(qzeros.t().contiguous(), bits, out_features).t() + zero_offset


def pack_gptq(codes_kn: torch.Tensor, scales_gn: torch.Tensor, zeros_gn: torch.Tensor, g_idx: torch.Tensor,
              bits: int, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """All four tensors of the layout from integer codes ``[K, N]``, fp scales and integer zeros ``[G, N]``."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QBenchError(f"gptq layout: checkpoint_format={checkpoint_format!r}; valid values: gptq, gptq_v2")
    offset = CHECKPOINT_FORMATS[checkpoint_format]
    if offset and bool((zeros_gn == 0).any()):
        raise QBenchError("gptq layout: a zero point of 0 cannot be stored in the v1 'gptq' format; use gptq_v2")
    return {
        "qweight": pack_qweight(codes_kn, bits),
        "qzeros": pack_qzeros(zeros_gn, bits, offset),
        "scales": scales_gn.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The dequantized weight transposed, ``[K, N]`` in fp32 (plain torch)."""
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_features).float()
    zeros = unpack_qzeros(qzeros, bits, out_features, zero_offset).float()
    g = g_idx.long()
    return scales.float()[g] * (codes - zeros[g])
