"""Method ``affine``: asymmetric (zero-point) round-to-nearest quantization of the weights.

``q = clamp(round(w / S) + Z, 0, 2**bits - 1)``, ``w ≈ S * (q - Z)``, with S and Z from the min
and max of each group of ``group_size`` input columns (``-1``: one group per output row) on the
GPTQ-reference min-max grid (:mod:`qbench.kernels.minmax_grid`), so ``affine:bits=4`` is exactly
the RTN baseline GPTQ is judged against. When ``group_size`` does not divide the row the last
group is shorter (576 columns, group 128: 4 x 128 + 1 x 64), as in GPTQ (column // group_size).

Stored per layer (every byte counts in the memory suite):

* ``codes``: uint8 ``[out, cdiv(in * bits, 8)]``, each row a dense little-endian bit stream
  (two 4-bit codes per byte, eight 3-bit codes per three bytes; see
  :func:`qbench.kernels.affine.pack_codes`);
* ``scales``: fp16 ``[out, groups]`` (computed in fp32 on the grid, stored in fp16 as GPTQ
  checkpoints do);
* ``zeros``: zero points packed the same way at ``bits`` bits, uint8 ``[out, cdiv(groups * bits, 8)]``;
  not stored when ``sym=true`` (the zero is 2**(bits-1) for every group);
* ``bias`` when the layer has one.

On CUDA the layer runs the fused dequantize-matmul (GEMV for batch 1, GEMM otherwise). On CPU a
4-bit layer is converted once (at quantize / load time) to ATen's int4 layout and runs
``torch._weight_int4pack_mm_for_cpu`` (bf16 activations; :mod:`qbench.kernels.cpu_int4`). That
layout (``runtime_tensors``) then holds the codes: the ``codes`` buffer is dropped and rebuilt
exactly from it when ``stored_tensors()`` is asked for (saving, format bytes) or the reference
runs. Other widths and ``QBENCH_CPU_KERNEL=reference`` run the torch reference. ``kernel_path``
records which ran.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.kernels import affine, cpu_int4
from qbench.kernels._cpu import cpu_kernels_wanted, use_cpu_kernel
from qbench.kernels._triton import cdiv, use_triton_in_module
from qbench.kernels.affine import unpack_codes
from qbench.kernels.dequant_matmul import (
    affine_dequant_weight_reference,
    affine_weight_matmul,
    affine_weight_matmul_reference,
)
from qbench.method import Method, QuantizedLinear, replace_linears
from qbench.params import Param, QBenchError

BITS = (2, 3, 4, 5, 6, 7, 8)


class AffineLinear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        affine.check_bits_group(bits, group_size)
        groups = affine.num_groups(in_features, group_size)
        expected = {"codes": (out_features, affine.packed_row_bytes(in_features, bits)),
                    "scales": (out_features, groups)}
        if not sym:
            expected["zeros"] = (out_features, affine.packed_row_bytes(groups, bits))
        for key, tensor in (("codes", codes), ("scales", scales), ("zeros", zeros)):
            if key in expected and (tensor is None or tuple(tensor.shape) != expected[key]):
                shape = None if tensor is None else tuple(tensor.shape)
                raise QBenchError(f"AffineLinear {in_features}->{out_features}, {bits} bits, group {group_size}: "
                                  f"{key} has shape {shape}, expected {expected[key]}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", None if sym else zeros.to(torch.uint8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cpu_pack: cpu_int4.Int4CpuPack | None | bool = None  # False: this layer has no CPU layout
        if cpu_kernels_wanted(self.codes.device):
            self._cpu_int4()  # converted once, at quantize / load time

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, sym: bool) -> "AffineLinear":
        weight = linear.weight.detach()
        quant = affine.quantize if use_triton_in_module(weight) else affine.quantize_reference
        codes, scales, zeros = quant(weight, bits, group_size, sym)
        packed_zeros = None if sym else affine.pack_codes(zeros, bits)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.in_features, linear.out_features, bits, group_size, sym,
                   affine.pack_codes(codes, bits), scales, packed_zeros, bias)

    def dequantized_weight(self) -> torch.Tensor:
        return affine_dequant_weight_reference(self._codes(), self.scales, self.zeros, self.bits, self.group_size,
                                               self.in_features, self.sym)

    def _cpu_int4(self) -> cpu_int4.Int4CpuPack | None:
        """ATen's int4 layout of this layer (4 bits, on CPU), built on first need; None where there is none."""
        if self._cpu_pack is None:
            self._cpu_pack = False
            if self.bits == 4 and self.codes.device.type == "cpu":
                codes = unpack_codes(self.codes, 4, self.in_features)
                groups = self.scales.shape[1]
                zeros = (torch.full_like(self.scales, 8.0) if self.sym else
                         unpack_codes(self.zeros, 4, groups))
                size = affine.effective_group_size(self.in_features, self.group_size)
                self._cpu_pack = cpu_int4.pack_int4_cpu(codes, self.scales, zeros, size) or False
                if self._cpu_pack and cpu_int4.layout() is not None:
                    self.codes = None  # held once, in the kernel's layout; _codes() rebuilds them
        return self._cpu_pack or None

    def _codes(self) -> torch.Tensor:
        """The stored (densely packed) codes, rebuilt from the CPU kernel's layout where only that is held."""
        if self.codes is not None:
            return self.codes
        return affine.pack_codes(cpu_int4.unpack_int4_cpu(self._cpu_pack), 4)

    def runtime_tensors(self) -> dict[str, torch.Tensor]:
        return self._cpu_pack.tensors() if self._cpu_pack else {}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        held = {name: t for name, t in self._buffers.items() if t is not None}
        return {**held, **self.runtime_tensors()}

    def _apply(self, fn, recurse=True):
        if self.codes is None:
            self.codes = self._codes()
        self._cpu_pack = None  # moved or cast: rebuilt from the stored tensors where needed
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes is None and not use_cpu_kernel(x):  # the reference needs the stored codes back
            self.codes = self._codes()
        args = (x, self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features, self.bias)
        if use_triton_in_module(x):
            self.kernel_path = "triton"
            return affine_weight_matmul(*args)
        pack = self._cpu_int4() if use_cpu_kernel(x) else None
        if pack is not None:
            self.kernel_path = cpu_int4.kernel_path(x.shape[:-1].numel())
            return cpu_int4.int4_matmul_cpu(x, pack, self.bias)
        self.kernel_path = "reference"
        return affine_weight_matmul_reference(*args)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"codes": self._codes(), "scales": self.scales}
        if self.zeros is not None:
            tensors["zeros"] = self.zeros
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "AffineLinear":
        return cls(config["in_features"], config["out_features"], config["bits"], config["group_size"], config["sym"],
                   tensors["codes"], tensors["scales"], tensors.get("zeros"), tensors.get("bias"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}"


def _group_size_ok(value: int) -> str | None:
    return None if value == -1 or value > 0 else "must be -1 (one group per output channel) or a positive size"


class Affine(Method):
    name = "affine"
    description = ("Asymmetric zero-point round-to-nearest weight quantization on the GPTQ min-max grid "
                   "(2-8 bits, per channel or grouped), densely packed codes, fused Triton dequantize-matmul")
    params = {
        "bits": Param(int, 4, "bits per weight code", choices=BITS),
        "group_size": Param(int, 128, "input columns per scale/zero group; -1 = one group per output channel",
                            check=_group_size_ok),
        "sym": Param(bool, False, "symmetric grid (zero point fixed at 2**(bits-1), no zeros stored)"),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        return replace_linears(model, lambda name, linear: AffineLinear.from_linear(
            linear, v["bits"], v["group_size"], v["sym"]))


def storage_bytes(out_features: int, in_features: int, bits: int, group_size: int, sym: bool = False) -> int:
    """Bytes ``AffineLinear`` stores for a bias-free layer (codes + fp16 scales + packed zeros)."""
    groups = affine.num_groups(in_features, group_size)
    zeros = 0 if sym else out_features * cdiv(groups * bits, 8)
    return out_features * cdiv(in_features * bits, 8) + out_features * groups * 2 + zeros


@hookimpl
def register_methods(register):
    register(Affine)
