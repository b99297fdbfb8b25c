"""The layer of the ``affine`` method (and ``awq``, which stores the same format): zero-point
round-to-nearest codes densely packed, per-group scales and zeros. See :mod:`qbench.plugins.affine`
for the method and its parameters."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench.kernels import affine, cpu_int4
from qbench.kernels._cpu import cpu_kernels_wanted
from qbench.kernels._triton import cdiv, use_triton_in_module
from qbench.kernels.affine import unpack_codes
from qbench.kernels.dequant_matmul import (
    affine_dequant_weight_reference,
    affine_weight_matmul,
    affine_weight_matmul_reference,
)
from qbench.method import QuantizedLinear
from qbench.params import QBenchError
from qbench.quant.int4_cpu import Int4CpuLayout

BITS = (2, 3, 4, 5, 6, 7, 8)


class AffineLinear(Int4CpuLayout, QuantizedLinear):
    _stored_codes_name = "codes"  # replaced in memory by the CPU int4 layout where that is exact

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

    _stored_codes = _codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._hold_stored_codes_for(x)
        args = (x, self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features, self.bias)
        if use_triton_in_module(x):
            self.kernel_path = "triton"
            return affine_weight_matmul(*args)
        y = self._int4_cpu_matmul(x)
        if y is not None:
            return y
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



def storage_bytes(out_features: int, in_features: int, bits: int, group_size: int, sym: bool = False) -> int:
    """Bytes ``AffineLinear`` stores for a bias-free layer (codes + fp16 scales + packed zeros)."""
    groups = affine.num_groups(in_features, group_size)
    zeros = 0 if sym else out_features * cdiv(groups * bits, 8)
    return out_features * cdiv(in_features * bits, 8) + out_features * groups * 2 + zeros
