"""``nf4``: 4-bit NormalFloat (or FP4) blockwise quantization with double quantization — the data
type of QLoRA, bit-compatible with bitsandbytes (``quantize_4bit`` / ``dequantize_4bit``).

Parameters: ``blocksize`` (64; 32..4096, powers of two), ``double_quant`` (true),
``quant_type`` (nf4 | fp4), ``compute_dtype`` (auto = the input's dtype | float16 | bfloat16 |
float32). Storage per weight: 4 + 8/64 + 32/(64*256) = 4.127 bits with double quantization at
blocksize 64 (plus one fp32 offset per layer), 4.5 without. The 16-entry code book and the
256-entry nested map are shared constants of :mod:`qbench.kernels.nf4` (1088 bytes per process,
``codebook_bytes``), not per-layer state; :meth:`NF4Linear.total_bytes` adds them for a layer
on its own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.kernels import cpu_nf4
from qbench.kernels._cpu import use_cpu_kernel
from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.nf4 import (QUANT_TYPES, VALID_BLOCKSIZES, NF4Tensor, codebook_bytes, quantize_nf4,
                                quantize_nf4_reference)
from qbench.kernels.nf4_matmul import nf4_linear
from qbench.method import Method, QuantizedLinear, replace_linears
from qbench.params import Param, QBenchError

COMPUTE_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class NF4Linear(QuantizedLinear):
    """A linear layer whose weight is a frozen :class:`NF4Tensor` (packed codes + quant state).

    Forward: Triton fused dequantize-matmul on CUDA; on CPU the packed-code kernel of
    :mod:`qbench.kernels.cpu_nf4` where no gradient is needed, else the torch reference (dequantize
    the layer, then matmul); ``kernel_path`` says which ran. Differentiable w.r.t. the input.
    """

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise QBenchError(f"NF4Linear needs a 2-D weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = (int(s) for s in q.shape)
        self.blocksize = q.blocksize
        self.quant_type = q.quant_type
        self.weight_dtype = q.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("nested_absmax", q.nested_absmax)
        self.register_buffer("offset", q.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel_path = "none"

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def q(self) -> NF4Tensor:
        return NF4Tensor(packed=self.packed, absmax=self.absmax, shape=(self.out_features, self.in_features),
                         dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                         nested_absmax=self.nested_absmax, offset=self.offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        weight = linear.weight.detach()
        # Same bits either way; the reference avoids the (slow) interpreter for whole models on CPU.
        quantize = quantize_nf4 if weight.is_cuda else quantize_nf4_reference
        q = quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        return cls(q, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        xc = x.to(compute)
        if use_cpu_kernel(xc) and cpu_nf4.supports(self.q):
            self.kernel_path = cpu_nf4.kernel_path(xc.shape[:-1].numel())
            bias = None if self.bias is None else self.bias.to(compute)
            return cpu_nf4.nf4_linear_cpu(xc, self.q, bias).to(x.dtype)
        use_triton = use_triton_in_module(xc)
        self.kernel_path = "triton" if use_triton else "reference"
        bias = None if self.bias is None else self.bias.to(compute)
        return nf4_linear(xc, self.q, bias, use_triton=use_triton).to(x.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.q.tensors())
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, shared code books excluded (4.127 at blocksize 64 + double quant)."""
        return 8 * self.storage_bytes() / self.weight_count

    def total_bytes(self) -> int:
        """Stored bytes including a private copy of the code book (and nested map if used)."""
        books = 16 * 4 + (256 * 4 if self.double_quant else 0)
        return self.storage_bytes() + books

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "blocksize": self.blocksize,
                "quant_type": self.quant_type, "double_quant": self.double_quant,
                "dtype": _DTYPE_NAMES[self.weight_dtype],
                "compute_dtype": None if self.compute_dtype is None else _DTYPE_NAMES[self.compute_dtype]}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "NF4Linear":
        q = NF4Tensor(packed=tensors["packed"], absmax=tensors["absmax"],
                      shape=(config["out_features"], config["in_features"]), dtype=getattr(torch, config["dtype"]),
                      blocksize=config["blocksize"], quant_type=config["quant_type"],
                      nested_absmax=tensors.get("nested_absmax"), offset=tensors.get("offset"))
        compute = config.get("compute_dtype")
        return cls(q, tensors.get("bias"), None if compute is None else getattr(torch, compute))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, path={self.kernel_path}")


def _check_blocksize(value: int) -> str | None:
    if value not in VALID_BLOCKSIZES:
        return "must be a power of two from 32 to 4096 (" + ", ".join(map(str, VALID_BLOCKSIZES)) + ")"
    return None


class NF4Method(Method):
    name = "nf4"
    nominal_bits = 4  # the code width, for the notes' bytes-per-parameter table
    description = "4-bit NormalFloat/FP4 blockwise, double-quantized absmax (QLoRA; bit-compatible with bitsandbytes)"
    params = {
        "blocksize": Param(int, 64, "weights per absmax block", check=_check_blocksize),
        "double_quant": Param(bool, True, "quantize the absmax values to 8 bits (blocks of 256)"),
        "quant_type": Param(str, "nf4", "4-bit code book", choices=QUANT_TYPES),
        "compute_dtype": Param(str, "auto", "dtype of the matmul (auto = the input's)", choices=tuple(COMPUTE_DTYPES)),
    }

    @property
    def nominal_bits(self) -> int:
        return 4

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        values = self.values
        compute = COMPUTE_DTYPES[values["compute_dtype"]]

        def make(name: str, linear: nn.Linear) -> NF4Linear:
            try:
                return NF4Linear.from_linear(linear, values["blocksize"], values["double_quant"],
                                             values["quant_type"], compute)
            except QBenchError as exc:
                raise QBenchError(f"{exc} (layer {name})") from None

        return replace_linears(model, make)


@hookimpl
def register_methods(register):
    register(NF4Method)
