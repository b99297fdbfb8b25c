"""Absmax (symmetric) INT8 quantize and dequantize: per tensor, row-wise, or per block.

``q = round(x * 127 / absmax)`` in fp32 with round half to even (``torch.round``), clamped to
-127..127; ``scale = absmax / 127`` (fp32) and ``x ≈ q * scale``. An all-zero group gets
``scale = 0`` and codes 0, so it decodes to exactly 0 (no division by zero).

Layouts (all on a 2-D view ``[rows, cols]`` of the input, ``cols`` = last dimension):

* per tensor (``dim=None, block_size=None``): one 0-dim fp32 scale;
* row-wise (``dim=-1``): one scale per row, returned with ``keepdim`` shape ``[..., 1]``;
  ``dim=0`` on a 2-D tensor gives one scale per column (shape ``[1, cols]``);
* blockwise (``block_size=B``): blocks of ``B`` consecutive values along the last dimension,
  scale shape ``[..., cdiv(cols, B)]``; the last block of a row is shorter when ``B`` does not
  divide ``cols`` (column ``c`` belongs to block ``c // B``, as in the affine groups).

The same quantize kernel also quantizes activations with a fixed (calibrated) absmax; values
beyond it are clamped to ±127. Launchers check for NaN/±inf (QBenchError) unless told not to
(the activation path of the W8A8 modules, where a host sync per call would cost).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qbench.kernels._round import round_half_even
from qbench.kernels._triton import INTERPRET, cdiv, triton_can_run
from qbench.params import QBenchError

QMAX = 127


def _inverse_scale(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax as one correctly rounded fp32 division, 0 where absmax is 0. (``127 / t`` in
    torch is ``127 * t.reciprocal()``, rounded twice, which would not match the kernels.)"""
    numerator = torch.full_like(absmax, float(QMAX))
    return torch.where(absmax > 0, torch.div(numerator, absmax), torch.zeros_like(absmax))


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "±inf"
        raise QBenchError(f"cannot quantize a {what} containing {bad} values; clean the weights/inputs first")


@triton.jit
def _absmax_quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, fixed_inv_ptr,
    cols, group_size, stride_xr, stride_cr, stride_sr,
    FIXED_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (row, group): absmax of the group, then codes. The loops make long rows
    # (11008 columns) fit in registers on GPU.
    row = tl.program_id(0)
    group = tl.program_id(1)
    start = group * group_size
    end = tl.minimum(start + group_size, cols)
    x_row = x_ptr + row.to(tl.int64) * stride_xr
    c_row = codes_ptr + row.to(tl.int64) * stride_cr
    offs = tl.arange(0, BLOCK)
    if FIXED_SCALE:
        inv = tl.load(fixed_inv_ptr)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            cols_here = off + offs
            v = tl.load(x_row + cols_here, mask=cols_here < end, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        absmax = tl.max(amax, axis=0)
        safe = tl.where(absmax > 0, absmax, 1.0)
        inv = tl.where(absmax > 0, tl.math.div_rn(127.0, safe), 0.0)
        tl.store(scale_ptr + row.to(tl.int64) * stride_sr + group, tl.math.div_rn(absmax, 127.0))
    for off in range(start, end, BLOCK):
        cols_here = off + offs
        mask = cols_here < end
        v = tl.load(x_row + cols_here, mask=mask, other=0.0).to(tl.float32)
        q = round_half_even(v * inv)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(c_row + cols_here, q.to(tl.int8), mask=mask)


@triton.jit
def _absmax_dequantize_kernel(
    codes_ptr, scale_ptr, out_ptr, rows, cols, group_size,
    stride_cr, stride_or, stride_sr, stride_sg,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r64 = r.to(tl.int64)
    q = tl.load(codes_ptr + r64[:, None] * stride_cr + c[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(scale_ptr + r64[:, None] * stride_sr + (c // group_size)[None, :] * stride_sg, mask=mask, other=0.0)
    out = q * s.to(tl.float32)
    tl.store(out_ptr + r64[:, None] * stride_or + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_for(n: int) -> int:
    return min(256 if INTERPRET else 1024, triton.next_power_of_2(max(n, 16)))


def quantize_rows(x2d: torch.Tensor, group_size: int | None = None, fixed_absmax: torch.Tensor | None = None):
    """Launcher on a 2-D tensor: groups of ``group_size`` along each row (None: whole rows), or one
    fixed absmax (a 0-dim fp32 tensor) for everything. Returns (int8 codes, fp32 scale [rows, groups])."""
    rows, cols = x2d.shape
    if not triton_can_run(x2d):
        return _quantize_rows_reference(x2d, group_size, fixed_absmax)
    x2d = x2d.contiguous()
    group_size = cols if group_size is None or group_size >= cols else group_size
    groups = cdiv(cols, group_size)
    codes = torch.empty((rows, cols), dtype=torch.int8, device=x2d.device)
    if fixed_absmax is not None:
        absmax = fixed_absmax.float().reshape(()).to(x2d.device)
        inv = _inverse_scale(absmax).reshape(1)
        scale = (absmax / QMAX).reshape(1, 1)
        groups = 1
        group_size = cols
    else:
        inv = x2d  # unused
        scale = torch.empty((rows, groups), dtype=torch.float32, device=x2d.device)
    if rows == 0 or cols == 0:
        return codes, scale
    _absmax_quantize_kernel[(rows, groups)](
        x2d, codes, scale, inv, cols, group_size, x2d.stride(0), codes.stride(0), scale.stride(0),
        FIXED_SCALE=fixed_absmax is not None, BLOCK=_block_for(group_size),
    )
    return codes, scale


def _quantize_rows_reference(x2d, group_size=None, fixed_absmax=None):
    rows, cols = x2d.shape
    xf = x2d.float()
    if fixed_absmax is not None:
        absmax = fixed_absmax.float().reshape(1, 1).to(x2d.device)
        group_size = max(cols, 1)
    else:
        group_size = cols if group_size is None or group_size >= cols else group_size
        groups = cdiv(cols, group_size)
        if groups == 1 and cols > 0:  # whole rows (per-token activations): no padded copy, same maxima
            absmax = xf.abs().amax(dim=1, keepdim=True)
        else:
            padded = torch.zeros((rows, groups * group_size), dtype=torch.float32, device=x2d.device)
            padded[:, :cols] = xf.abs()
            absmax = padded.view(rows, groups, group_size).amax(dim=-1)
    inv = _inverse_scale(absmax)
    inv_cols = inv.repeat_interleave(group_size, dim=1)[:, :cols] if inv.shape[1] > 1 else inv
    codes = torch.clamp(torch.round(xf * inv_cols), -QMAX, QMAX).to(torch.int8)
    return codes, absmax / QMAX


def _layout(x: torch.Tensor, dim: int | None, block_size: int | None):
    if block_size is not None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise QBenchError(f"absmax block_size={block_size!r} must be a positive integer")
        if dim is not None and dim not in (-1, x.dim() - 1):
            raise QBenchError("absmax blockwise quantization runs along the last dimension; pass dim=None or -1")
        return "block"
    if dim is None:
        return "tensor"
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise QBenchError(f"absmax dim={dim} is out of range for a {x.dim()}-D tensor")
    return "row" if dim % x.dim() == x.dim() - 1 else "other"


def quantize(x: torch.Tensor, dim: int | None = None, block_size: int | None = None, check: bool = True):
    """Absmax INT8: ``(codes int8 shaped like x, fp32 scale)``; see the module docstring for layouts."""
    if check:
        check_finite(x)
    layout = _layout(x, dim, block_size)
    if layout == "tensor":
        absmax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        codes, _ = quantize_rows(x.reshape(1, -1), fixed_absmax=absmax)
        return codes.view(x.shape), absmax / QMAX
    if layout == "other":  # reduce along another dim: move it last, quantize rows, move back
        moved = x.movedim(dim, -1)
        codes, scale = quantize(moved, dim=-1, check=False)
        return codes.movedim(-1, dim).contiguous(), scale.movedim(-1, dim)
    x2d = x.reshape(-1, x.shape[-1])
    codes, scale = quantize_rows(x2d, block_size if layout == "block" else None)
    return codes.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])


def quantize_reference(x: torch.Tensor, dim: int | None = None, block_size: int | None = None):
    """Plain-torch twin of :func:`quantize` (same layouts, same rounding)."""
    check_finite(x)
    layout = _layout(x, dim, block_size)
    xf = x.float()
    if layout == "tensor":
        absmax = xf.abs().amax() if x.numel() else torch.zeros((), device=x.device)
        inv = _inverse_scale(absmax)
        return torch.clamp(torch.round(xf * inv), -QMAX, QMAX).to(torch.int8), absmax / QMAX
    if layout in ("row", "other"):
        absmax = xf.abs().amax(dim=dim, keepdim=True)
        inv = _inverse_scale(absmax)
        return torch.clamp(torch.round(xf * inv), -QMAX, QMAX).to(torch.int8), absmax / QMAX
    codes, scale = _quantize_rows_reference(x.reshape(-1, x.shape[-1]), block_size)
    return codes.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])


def _scale_layout(codes: torch.Tensor, scale: torch.Tensor, block_size: int | None):
    """(group_size, scale row stride, scale group stride) on the [rows, cols] view, or None when
    the scale is broadcast some other way (handled by torch)."""
    cols = codes.shape[-1] if codes.dim() else 1
    if scale.numel() == 1:
        return cols, 0, 0
    if codes.dim() >= 1 and scale.dim() == codes.dim() and scale.shape[:-1] == codes.shape[:-1]:
        groups = scale.shape[-1]
        if groups == 1:
            return cols, 1, 0
        size = block_size if block_size is not None else cdiv(cols, groups)
        if cdiv(cols, size) != groups:
            raise QBenchError(f"absmax scale has {groups} blocks per row, which does not fit rows of {cols} "
                              f"with block_size={size}")
        return size, groups, 1
    return None


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``codes * scale`` in ``dtype`` (fp32 by default)."""
    layout = _scale_layout(codes, scale, block_size)
    if layout is None or not triton_can_run(codes) or codes.numel() == 0:
        return dequantize_reference(codes, scale, block_size, dtype)
    group_size, stride_sr, stride_sg = layout
    codes2d = codes.reshape(-1, codes.shape[-1]).contiguous()
    scale = scale.float().contiguous()
    rows, cols = codes2d.shape
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    block_r, block_c = (16, 64) if INTERPRET else (32, 128)
    grid = (cdiv(rows, block_r), cdiv(cols, block_c))
    _absmax_dequantize_kernel[grid](
        codes2d, scale, out, rows, cols, group_size, codes2d.stride(0), out.stride(0), stride_sr, stride_sg,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out.view(codes.shape)


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, block_size: int | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    scale = scale.float()
    if (scale.numel() > 1 and scale.dim() == codes.dim() and scale.shape[:-1] == codes.shape[:-1]
            and scale.shape[-1] > 1):
        cols = codes.shape[-1]
        size = block_size if block_size is not None else cdiv(cols, scale.shape[-1])
        scale = scale.repeat_interleave(size, dim=-1)[..., :cols]
    return (codes.float() * scale).to(dtype)
