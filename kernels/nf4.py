"""Blockwise NF4 / FP4 quantization with double quantization of the absmax, bit-compatible with
bitsandbytes 0.50 (``quantize_4bit`` / ``dequantize_4bit``).

The format (all of it matches bitsandbytes' CPU/default path):

* The weight is flattened row-major and cut into blocks of ``blocksize`` values (the last block
  may be shorter; blocks may span rows). ``absmax`` is the fp32 max |w| of each block.
* Full blocks are scaled by ``w * (1 / max(absmax, 1e-38))``, the last partial block by
  ``w / max(absmax, 1e-38)`` (and stores the clamped absmax), then clamped to [-1, 1]. The code
  is the bucket of the sorted code book's fp32 midpoints (a value exactly on a midpoint takes
  the lower code). FP4 codes are then renumbered to bitsandbytes' bit-pattern order.
* Two codes per byte: element ``2i`` in the high nibble, ``2i+1`` in the low nibble; an odd
  element count pads the last low nibble with the code of 0.0.
* Double quantization (``double_quant=True``, bitsandbytes' ``compress_statistics``):
  ``offset = absmax.mean()``; ``absmax - offset`` is quantized to 8 bits in blocks of 256 with
  the signed dynamic map the way bitsandbytes' CPU kernel does it: ``v = x * (1 / max|x|)``,
  clamped to [-1, 1], goes to the 16-bit cell ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` of a
  65536-entry table that holds, for the cell centre ``-1 + 2i/65535``, the nearest map entry
  (the count of map midpoints below it). An all-zero block gets code 0. Stored: uint8 absmax
  codes, one fp32 ``nested_absmax`` per 256 blocks and the fp32 ``offset``.
* Dequantization: ``absmax = nested_map[code8] * nested_absmax + offset`` (fp32, no FMA) and
  ``w = code_book[nibble] * absmax`` in fp32, then cast to the original dtype.

Storage per weight with blocksize 64: 4 + 8/64 + 32/(64*256) = 4.127 bits with double
quantization (plus one fp32 offset per tensor), 4 + 32/64 = 4.5 without. The 16-entry code
books and the 256-entry nested map are shared module constants (``NF4_CODE``, ``FP4_CODE``,
``DYNAMIC_MAP``): 64 + 1024 bytes per process, not per layer (``codebook_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qbench.kernels._triton import HAS_TRITON, INTERPRET, cdiv, triton_can_run
from qbench.params import QBenchError

if HAS_TRITON:
    import triton
    import triton.language as tl

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256

# NormalFloat4 (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], as fp32 (bitsandbytes' table).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit; bias 2) in bit-pattern order, / 12 in fp32.
FP4_CODE = torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0


def _signed_dynamic_map() -> torch.Tensor:
    """The signed dynamic 8-bit map (Dettmers 2015) of bitsandbytes' ``create_dynamic_map``:
    for decades 1e-6 .. 1e0, 2**i midpoints of an even split of [0.1, 1], both signs, plus 0
    and 1; sorted fp32 (the same fp32 arithmetic, so the same bits)."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (i - 6)) * mids
        values += scaled.tolist() + (-scaled).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _signed_dynamic_map()


def code_book(quant_type: str) -> torch.Tensor:
    return {"nf4": NF4_CODE, "fp4": FP4_CODE}[quant_type]


def _bucket_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 fp32 midpoints of the sorted code book, 16 nibbles in sorted order)."""
    code = code_book(quant_type)
    order = torch.argsort(code, stable=True)  # FP4's 0.0 sorts before -0.0: 0.0 gets nibble 0
    values = code[order]
    return (values[:-1] + values[1:]) / 2, order.to(torch.int32)


_TABLES = {qt: _bucket_tables(qt) for qt in QUANT_TYPES}
# Bytes of the shared tables a process keeps (not per layer): 16-entry book + 256-entry nested map.
codebook_bytes = NF4_CODE.numel() * 4 + DYNAMIC_MAP.numel() * 4


_DEVICE_CONSTANTS: dict[tuple[str, str], torch.Tensor] = {}


def _on_device(name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A shared code table on ``device``, copied there once: a host-to-device copy in every forward
    costs a synchronising copy per layer and makes the decode step impossible to capture in a CUDA graph."""
    if device.type == "cpu":
        return table
    key = (name, str(device))
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = table.to(device)
    return _DEVICE_CONSTANTS[key]


@dataclass
class NF4Tensor:
    """A 4-bit blockwise-quantized tensor and its quantization state (bitsandbytes' QuantState).

    ``packed``: uint8 [ceil(numel/2)], two codes a byte (high nibble first).
    ``absmax``: fp32 [blocks], or uint8 codes [blocks] when double quantized.
    ``nested_absmax``: fp32 [ceil(blocks/256)] and ``offset``: fp32 scalar, with double quant.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def code(self) -> torch.Tensor:
        return _on_device(f"code:{self.quant_type}", code_book(self.quant_type), self.device)

    @property
    def nested_code(self) -> torch.Tensor:
        return _on_device("dynamic_map", DYNAMIC_MAP, self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor kept per quantized weight (code books are shared constants, not here)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["offset"] = self.offset
        return out

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the per-tensor state, excluding the shared code books."""
        return 8 * self.storage_bytes() / self.numel

    def to(self, device) -> "NF4Tensor":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return replace(self, packed=moved["packed"], absmax=moved["absmax"],
                       nested_absmax=moved.get("nested_absmax"), offset=moved.get("offset"))


def check_settings(blocksize: int, quant_type: str) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise QBenchError(f"nf4 blocksize={blocksize} is not valid; valid values: "
                          + ", ".join(map(str, VALID_BLOCKSIZES)))
    if quant_type not in QUANT_TYPES:
        raise QBenchError(f"nf4 quant_type={quant_type!r} is not valid; valid values: nf4, fp4")


def _check_weight(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QBenchError(f"nf4 quantizes float32/float16/bfloat16 tensors, got {w.dtype}")
    if w.numel() == 0:
        raise QBenchError("nf4 cannot quantize an empty tensor")
    if not torch.isfinite(w).all():
        raise QBenchError("nf4: the weight contains NaN or Inf values; fix the checkpoint before quantizing")


# ----------------------------------------------------------------------------- references


def _absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.reshape(1)])
        scaled = torch.cat([scaled, flat[full:] / last])
    return absmax, scaled.clamp(-1, 1)


def _dynamic_map_lut() -> torch.Tensor:
    """uint8 [65536]: the dynamic-map code nearest to each cell centre -1 + 2i/65535 (fp32)."""
    midpoints = 0.5 * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
    centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, centres).to(torch.uint8)


DYNAMIC_MAP_LUT = _dynamic_map_lut()


def _quantize_8bit_dynamic_reference(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ``values`` (fp32, 1-D) with the dynamic map, blocks of 256, and their absmax."""
    n = values.numel()
    blocks = cdiv(n, NESTED_BLOCKSIZE)
    padded = values.new_zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32)
    padded[:n] = values
    padded = padded.reshape(blocks, NESTED_BLOCKSIZE)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax)).unsqueeze(1)
    normed = (padded * inv).clamp(-1, 1)
    cell = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncation, as the C cast
    codes = DYNAMIC_MAP_LUT.to(values.device)[cell]
    codes = torch.where((absmax > 0).unsqueeze(1), codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax


def quantize_nf4_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                           quant_type: str = "nf4") -> NF4Tensor:
    """Plain-torch blockwise NF4/FP4 quantization (bitsandbytes' algorithm, see module doc)."""
    check_settings(blocksize, quant_type)
    _check_weight(w)
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _absmax_and_scaled(flat, blocksize)
    bounds, order = (t.to(w.device) for t in _TABLES[quant_type])
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return _with_absmax(packed, absmax, w, blocksize, double_quant, quant_type, _quantize_8bit_dynamic_reference)


def _with_absmax(packed, absmax, w, blocksize, double_quant, quant_type, quantize_8bit) -> NF4Tensor:
    q = NF4Tensor(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype,
                  blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_8bit(absmax - offset)
        q.offset = offset
    return q


def dequantize_absmax_reference(q: NF4Tensor) -> torch.Tensor:
    """The fp32 per-block absmax (undoing the double quantization when there is one)."""
    if not q.double_quant:
        return q.absmax.float()
    block = torch.arange(q.absmax.numel(), device=q.device) // NESTED_BLOCKSIZE
    return q.nested_code[q.absmax.long()] * q.nested_absmax[block] + q.offset


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch dequantization to ``dtype`` (default: the original dtype), original shape."""
    n = q.numel
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = dequantize_absmax_reference(q)
    # Scale block-wise through a [blocks, blocksize] view (no per-element block index): the same
    # fp32 products, several times faster on CPU, where modules run this path every call.
    vals = q.code[codes]
    pad = absmax.numel() * q.blocksize - n
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    values = (vals.view(absmax.numel(), q.blocksize) * absmax[:, None]).reshape(-1)[:n]
    return values.to(dtype or q.dtype).reshape(q.shape)


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _quantize_4bit_kernel(w_ptr, packed_ptr, absmax_ptr, bounds_ptr, order_ptr, n,
                              BLOCKSIZE: tl.constexpr):
        # One program per quantization block; pairs (2i, 2i+1) never straddle a block.
        block = tl.program_id(0)
        start = block.to(tl.int64) * BLOCKSIZE
        pair = tl.arange(0, BLOCKSIZE // 2)
        even = start + 2 * pair
        odd = even + 1
        x0 = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
        x1 = tl.load(w_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x0), axis=0), tl.max(tl.abs(x1), axis=0))
        safe = tl.maximum(absmax, tl.full([], 1e-38, tl.float32))  # a bare 1e-38 is below fp32 normals: fp64
        if start + BLOCKSIZE <= n:
            inv = tl.math.div_rn(tl.full([BLOCKSIZE // 2], 1.0, tl.float32), safe)
            s0 = x0 * inv
            s1 = x1 * inv
            tl.store(absmax_ptr + block, absmax)
        else:  # the last, partial block divides (and keeps the clamped absmax), as bitsandbytes does
            s0 = tl.math.div_rn(x0, tl.full([BLOCKSIZE // 2], 1.0, tl.float32) * safe)
            s1 = tl.math.div_rn(x1, tl.full([BLOCKSIZE // 2], 1.0, tl.float32) * safe)
            tl.store(absmax_ptr + block, safe)
        s0 = tl.minimum(tl.maximum(s0, -1.0), 1.0)
        s1 = tl.minimum(tl.maximum(s1, -1.0), 1.0)
        # Bucket = number of midpoints strictly below the value (a tie takes the lower code).
        b0 = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
        b1 = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
        for j in tl.static_range(15):
            bound = tl.load(bounds_ptr + j)
            b0 += (s0 > bound).to(tl.int32)
            b1 += (s1 > bound).to(tl.int32)
        c0 = tl.load(order_ptr + b0)
        c1 = tl.load(order_ptr + b1)
        byte = ((c0 << 4) | c1).to(tl.uint8)
        tl.store(packed_ptr + start // 2 + pair, byte, mask=even < n)

    @triton.jit
    def _quantize_8bit_dynamic_kernel(x_ptr, codes_ptr, absmax_ptr, lut_ptr, n):
        # One program per 256 values: scale by 1/absmax, look the 16-bit cell up in the table.
        block = tl.program_id(0)
        offs = block * 256 + tl.arange(0, 256)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        absmax = tl.max(tl.abs(x), axis=0)
        tl.store(absmax_ptr + block, absmax)
        nonzero = absmax > 0
        inv = tl.math.div_rn(tl.full([256], 1.0, tl.float32),
                             tl.where(nonzero, absmax, 1.0) + tl.zeros([256], tl.float32))
        normed = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
        cell = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
        codes = tl.load(lut_ptr + cell, mask=mask, other=0)
        codes = tl.where(nonzero, codes, 0)
        tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
                                code_ptr, out_ptr, n, nbytes, BLOCKSIZE: tl.constexpr,
                                DOUBLE_QUANT: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        in_range = byte_idx < nbytes
        byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
        block = (2 * byte_idx) // BLOCKSIZE
        if DOUBLE_QUANT:
            q8 = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(nested_map_ptr + q8) * tl.load(nested_absmax_ptr + block // 256, mask=in_range, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        tl.store(out_ptr + 2 * byte_idx, hi.to(out_ptr.dtype.element_ty), mask=in_range)
        tl.store(out_ptr + 2 * byte_idx + 1, lo.to(out_ptr.dtype.element_ty), mask=in_range & (2 * byte_idx + 1 < n))


def _exact_fp32_options(t: torch.Tensor) -> dict:
    # No fused multiply-add on GPU: the results must be bit-identical to bitsandbytes' fp32 math.
    return {"enable_fp_fusion": False} if t.is_cuda else {}


def _quantize_8bit_dynamic_triton(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.contiguous().float()
    n = values.numel()
    blocks = cdiv(n, NESTED_BLOCKSIZE)
    codes = torch.empty(n, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=values.device)
    _quantize_8bit_dynamic_kernel[(blocks,)](values, codes, absmax, DYNAMIC_MAP_LUT.to(values.device), n,
                                             **_exact_fp32_options(values))
    return codes, absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4") -> NF4Tensor:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) blockwise to NF4 or FP4; returns an
    :class:`NF4Tensor` (packed codes + quantization state). Triton where it can run."""
    check_settings(blocksize, quant_type)
    _check_weight(w)
    if not triton_can_run(w):
        return quantize_nf4_reference(w, blocksize, double_quant, quant_type)
    flat = w.detach().reshape(-1).contiguous()
    if INTERPRET and flat.dtype == torch.bfloat16:
        flat = flat.float()  # exact; the interpreter has no bf16 arithmetic
    n = flat.numel()
    blocks = cdiv(n, blocksize)
    packed = torch.empty(cdiv(n, 2), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    bounds, order = (t.to(w.device) for t in _TABLES[quant_type])
    _quantize_4bit_kernel[(blocks,)](flat, packed, absmax, bounds, order, n, BLOCKSIZE=blocksize,
                                     **_exact_fp32_options(flat))
    return _with_absmax(packed, absmax, w, blocksize, double_quant, quant_type, _quantize_8bit_dynamic_triton)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float tensor of the original shape (``dtype`` defaults to the original dtype)."""
    dtype = dtype or q.dtype
    if not triton_can_run(q.packed):
        return dequantize_nf4_reference(q, dtype)
    n = q.numel
    kernel_dtype = torch.float32 if (INTERPRET and dtype == torch.bfloat16) else dtype
    out = torch.empty(n, dtype=kernel_dtype, device=q.device)
    nbytes = q.packed.numel()
    block_bytes = 1024
    dummy = q.absmax
    _dequantize_4bit_kernel[(cdiv(nbytes, block_bytes),)](
        q.packed, q.absmax, q.nested_absmax if q.double_quant else dummy, q.nested_code,
        q.offset if q.double_quant else dummy, q.code, out, n, nbytes,
        BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, BLOCK_BYTES=block_bytes,
        **_exact_fp32_options(out))
    return out.to(dtype).reshape(q.shape)
