"""The min-max quantization grid shared by ``affine`` (round-to-nearest) and ``gptq``.

It is the grid of the GPTQ reference implementation's quantizer, so that affine at 4 bits with
round-to-nearest is exactly the RTN baseline GPTQ is judged against:

* the range of each group always contains 0: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``;
* symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``;
* an all-zero group gets the range [-1, 1] (a finite scale, codes decode to 0 exactly);
* ``scale = (xmax - xmin) / (2**bits - 1)``;
  ``zero = round(-xmin / scale)`` (asymmetric) or ``(2**bits - 1 + 1) / 2`` (symmetric);
* ``q = clamp(round(x / scale) + zero, 0, 2**bits - 1)``; ``x ≈ scale * (q - zero)``.

Rounding is torch.round: round half to even, as in the reference. Plain torch; the Triton
kernels in ``affine.py`` / ``gptq_matmul.py`` reproduce it.
"""
from __future__ import annotations

import torch


def minmax_scale_zero(x: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``x`` (shape [..., n]); returned with shape [..., 1], fp32."""
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``x`` on the grid; broadcasting ``scale``/``zero``."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, maxq)


def dequantize_from_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to the grid and back (what GPTQ's quantize() returns)."""
    return dequantize_from_grid(quantize_to_grid(x, scale, zero, bits), scale, zero)


def group_index(columns: int, group_size: int) -> torch.Tensor:
    """Group of each input column: ``column // group_size`` (the last group is shorter when
    ``group_size`` does not divide ``columns``); ``group_size=-1`` means one group per row."""
    if group_size == -1 or group_size >= columns:
        return torch.zeros(columns, dtype=torch.int32)
    return (torch.arange(columns) // group_size).to(torch.int32)


def mse_scale_zero(x: torch.Tensor, bits: int, sym: bool = False, shrinks: int = 20, max_shrink: float = 0.5,
                   norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``x`` ([rows, n]) with the range clipped where that lowers the
    error: the min-max range shrunk by each factor ``1 - k·max_shrink/shrinks`` (k = 0..shrinks-1),
    keeping per row the factor whose rounding error ``Σ |x − q(x)|^norm`` is smallest (the GPTQ
    reference quantizer's ``mse`` search; it searches 80 factors down to 0.2, we search fewer and
    closer to 1, where the best factor lies for 3–4-bit groups). Factor 1 is the min-max grid, so
    the result is never worse than :func:`minmax_scale_zero` on that error. Returns [rows, 1] each."""
    maxq = 2**bits - 1
    x = x.float()
    base_scale, base_zero = minmax_scale_zero(x, bits, sym)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    factors = 1 - torch.arange(shrinks, dtype=torch.float32, device=x.device)[:, None, None] * (max_shrink / shrinks)
    lo, hi = factors * xmin, factors * xmax  # [shrinks, rows, 1]
    empty = (lo == 0) & (hi == 0)
    scale = torch.where(empty, base_scale, (hi - lo) / maxq)
    zero = base_zero.expand_as(scale) if sym else torch.where(empty, base_zero, torch.round(-lo / scale))
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    err = (scale * (q - zero) - x).abs_().pow_(norm).sum(dim=-1)  # [shrinks, rows]
    best = err.argmin(dim=0)  # ties: the first, i.e. the widest range
    rows = torch.arange(x.shape[0], device=x.device)
    return scale[best, rows], zero[best, rows]
