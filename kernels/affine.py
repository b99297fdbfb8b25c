"""Affine (zero-point) quantize / dequantize in groups along each row, and dense sub-byte packing.

The grid is exactly the GPTQ-reference min-max grid of :mod:`qbench.kernels.minmax_grid` (range
widened to contain 0, all-zero groups get [-1, 1], ``scale = (xmax - xmin) / (2**bits - 1)``,
``zero = round(-xmin / scale)``, ``q = clamp(round(x / scale) + zero, 0, 2**bits - 1)``,
``x ≈ scale * (q - zero)``; round half to even; all in fp32), so ``affine`` with bits=4 is the
round-to-nearest baseline of GPTQ. The Triton kernel reproduces it bit for bit (correctly
rounded divisions, :func:`round_half_even`).

Groups: column ``c`` of a row belongs to group ``c // group_size`` (GPTQ's assignment); when
``group_size`` does not divide the row, the last group is shorter (576 columns with group 128:
4 groups of 128 and one of 64). ``group_size=-1`` (or >= the row) is one group per row.

Packing (:func:`pack_codes`): each row is a little-endian bit stream of ``bits``-bit codes, code
``j`` in bits ``[j*bits, (j+1)*bits)`` of the row, bit ``i`` of the stream being bit ``i % 8`` of
byte ``i // 8``; the row is padded to whole bytes only. So 4-bit codes are two per byte (code
``2j`` in the low nibble), 8-bit codes are plain bytes, and 3-bit codes are dense (8 codes in 3
bytes), some straddling two bytes. The same format packs zero points (one per group).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qbench.kernels._round import round_half_even
from qbench.kernels._triton import INTERPRET, cdiv, triton_can_run
from qbench.kernels.minmax_grid import dequantize_from_grid, minmax_scale_zero, quantize_to_grid
from qbench.params import QBenchError


def check_bits_group(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise QBenchError(f"affine bits={bits!r} is not valid; valid values: 2, 3, 4, 5, 6, 7, 8")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise QBenchError(f"affine group_size={group_size!r} is not valid; "
                          "use -1 (one group per row) or a positive size")


def effective_group_size(cols: int, group_size: int) -> int:
    return cols if group_size == -1 or group_size >= cols else group_size


def num_groups(cols: int, group_size: int) -> int:
    return cdiv(cols, effective_group_size(cols, group_size)) if cols else 0


def _check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "±inf"
        raise QBenchError(f"cannot quantize a tensor containing {bad} values; clean the weights first")


@triton.jit
def _affine_quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, cols, group_size, groups,
    stride_xr, stride_cr,
    MAXQ: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    group = tl.program_id(1)
    start = group * group_size
    end = tl.minimum(start + group_size, cols)
    x_row = x_ptr + row.to(tl.int64) * stride_xr
    c_row = codes_ptr + row.to(tl.int64) * stride_cr
    offs = tl.arange(0, BLOCK)
    # Zero-initialised running min/max: the grid's range always contains 0 anyway.
    run_min = tl.zeros([BLOCK], dtype=tl.float32)
    run_max = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + offs
        v = tl.load(x_row + idx, mask=idx < end, other=0.0).to(tl.float32)
        run_min = tl.minimum(run_min, v)
        run_max = tl.maximum(run_max, v)
    xmin = tl.min(run_min, axis=0)
    xmax = tl.max(run_max, axis=0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = tl.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = tl.where(empty, -1.0, xmin)
    xmax = tl.where(empty, 1.0, xmax)
    scale = tl.math.div_rn(xmax - xmin, MAXQ * 1.0)
    if SYM:
        zero = (MAXQ + 1) / 2 + 0.0 * scale
    else:
        zero = round_half_even(tl.math.div_rn(-xmin, scale))
    tl.store(scale_ptr + row.to(tl.int64) * groups + group, scale)
    tl.store(zero_ptr + row.to(tl.int64) * groups + group, zero.to(tl.uint8))
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        v = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(v, scale)) + zero
        q = tl.minimum(tl.maximum(q, 0.0), MAXQ * 1.0)
        tl.store(c_row + idx, q.to(tl.uint8), mask=mask)


@triton.jit
def _affine_dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr, rows, cols, group_size, groups,
    stride_cr, stride_or,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r64 = r.to(tl.int64)
    q = tl.load(codes_ptr + r64[:, None] * stride_cr + c[None, :], mask=mask, other=0).to(tl.float32)
    g = r64[:, None] * groups + (c // group_size)[None, :]
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + g, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + r64[:, None] * stride_or + c[None, :], (s * (q - z)).to(out_ptr.dtype.element_ty), mask=mask)


def _block_for(n: int) -> int:
    return min(256 if INTERPRET else 1024, triton.next_power_of_2(max(n, 16)))


def quantize(x: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False):
    """Affine codes of ``x`` (viewed ``[rows, cols]``, groups along the last dimension).

    Returns ``(codes uint8 [..., cols] in 0..2**bits-1 (unpacked), scales fp32 [..., groups],
    zeros uint8 [..., groups])``."""
    check_bits_group(bits, group_size)
    _check_finite(x)
    if x.dim() == 0:
        raise QBenchError("affine quantize needs at least a 1-D tensor")
    if not triton_can_run(x) or x.numel() == 0:
        return quantize_reference(x, bits, group_size, sym)
    cols = x.shape[-1]
    x2d = x.reshape(-1, cols).contiguous()
    rows = x2d.shape[0]
    size = effective_group_size(cols, group_size)
    groups = cdiv(cols, size)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    zeros = torch.empty((rows, groups), dtype=torch.uint8, device=x.device)
    _affine_quantize_kernel[(rows, groups)](
        x2d, codes, scales, zeros, cols, size, groups, x2d.stride(0), codes.stride(0),
        MAXQ=2**bits - 1, SYM=bool(sym), BLOCK=_block_for(size),
    )
    lead = x.shape[:-1]
    return codes.view(*lead, cols), scales.view(*lead, groups), zeros.view(*lead, groups)


def quantize_reference(x: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False):
    """Plain torch, through :mod:`qbench.kernels.minmax_grid` itself."""
    check_bits_group(bits, group_size)
    _check_finite(x)
    cols = x.shape[-1]
    x2d = x.reshape(-1, cols).float()
    rows = x2d.shape[0]
    size = effective_group_size(cols, group_size)
    groups = cdiv(cols, size) if cols else 0
    padded = torch.zeros((rows, groups * size), dtype=torch.float32, device=x.device)
    padded[:, :cols] = x2d  # zero padding never changes a range that already contains 0
    grouped = padded.view(rows, groups, size)
    scale, zero = minmax_scale_zero(grouped, bits, sym)
    codes = quantize_to_grid(grouped, scale, zero, bits).view(rows, groups * size)[:, :cols]
    lead = x.shape[:-1]
    return (codes.to(torch.uint8).reshape(*lead, cols), scale.view(*lead, groups),
            zero.to(torch.uint8).view(*lead, groups))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize` on unpacked codes: ``scale * (q - zero)`` per group.

    ``group_size`` defaults to ``cdiv(cols, groups)``, which is the size whenever the groups
    came from :func:`quantize` with a size that is unambiguous; pass it to be explicit."""
    cols = codes.shape[-1]
    groups = scales.shape[-1]
    size = group_size if group_size not in (None, -1) else cdiv(cols, max(groups, 1))
    size = min(size, max(cols, 1))
    if groups != (cdiv(cols, size) if cols else 0):
        raise QBenchError(f"affine dequantize: {groups} groups per row do not fit {cols} columns "
                          f"with group_size={size}")
    if not triton_can_run(codes) or codes.numel() == 0:
        return dequantize_reference(codes, scales, zeros, size, dtype)
    codes2d = codes.reshape(-1, cols).contiguous()
    rows = codes2d.shape[0]
    scales2d = scales.reshape(rows, groups).float().contiguous()
    zeros2d = zeros.reshape(rows, groups).contiguous()
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    block_r, block_c = (16, 64) if INTERPRET else (32, 128)
    _affine_dequantize_kernel[(cdiv(rows, block_r), cdiv(cols, block_c))](
        codes2d, scales2d, zeros2d, out, rows, cols, size, groups, codes2d.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out.view(codes.shape)


def dequantize_reference(codes, scales, zeros, group_size: int | None = None, dtype=torch.float32):
    cols = codes.shape[-1]
    groups = scales.shape[-1]
    size = group_size if group_size not in (None, -1) else cdiv(cols, max(groups, 1))
    size = min(size, max(cols, 1))
    scale_cols = scales.float().repeat_interleave(size, dim=-1)[..., :cols]
    zero_cols = zeros.float().repeat_interleave(size, dim=-1)[..., :cols]
    return dequantize_from_grid(codes.float(), scale_cols, zero_cols).to(dtype)


# ---- dense packing (torch; done once at quantization time, unpacked inside the matmul kernels)

def packed_row_bytes(cols: int, bits: int) -> int:
    return cdiv(cols * bits, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` codes in 0..2**bits-1 → ``[rows, cdiv(cols*bits, 8)]`` uint8 bit streams."""
    check_bits_group(bits, -1)
    rows, cols = codes.shape
    nbytes = packed_row_bytes(cols, bits)
    values = codes.to(torch.int32)
    if bool((values < 0).any()) or bool((values >= 2**bits).any()):
        raise QBenchError(f"pack_codes: codes must lie in 0..{2**bits - 1}")
    bitpos = torch.arange(cols, device=codes.device) * bits
    byte, shift = (bitpos // 8).expand(rows, cols), bitpos % 8
    shifted = values << shift.to(torch.int32)  # at most 15 bits: the code's low byte and what spills into the next
    out = torch.zeros((rows, nbytes + 1), dtype=torch.int32, device=codes.device)
    out.scatter_add_(1, byte, shifted & 0xFF)  # bits are disjoint, so adding is OR-ing
    out.scatter_add_(1, byte + 1, shifted >> 8)
    return out[:, :nbytes].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[rows, cols]`` uint8 codes."""
    rows = packed.shape[0]
    if 8 % bits == 0:
        # Codes never straddle a byte (2, 4, 8 bits): shifts alone, no gather (the CPU hot path).
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)
    bitpos = torch.arange(cols, device=packed.device) * bits
    byte, shift = bitpos // 8, bitpos % 8
    stream = torch.cat([packed.to(torch.int32), torch.zeros((rows, 1), dtype=torch.int32, device=packed.device)], 1)
    pair = stream[:, byte] | (stream[:, byte + 1] << 8)
    return ((pair >> shift) & (2**bits - 1)).to(torch.uint8)
