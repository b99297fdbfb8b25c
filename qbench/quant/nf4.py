"""The NF4/FP4 linear layer the ``nf4`` and ``qlora`` methods share (and ``qlora``'s adapters build on).

The weight is a frozen :class:`~qbench.kernels.nf4.NF4Tensor` (packed codes + quant state,
bit-compatible with bitsandbytes). The forward is :func:`~qbench.kernels.nf4_matmul.nf4_linear`:
the fused Triton dequantize-matmul on CUDA; on CPU, where no gradient is needed, the packed-code
kernel of :mod:`qbench.kernels.cpu_nf4`; the torch reference elsewhere (``kernel_path`` says
which ran). Its backward (the input gradient; the weight is frozen) keeps only the packed weight
and dequantizes again, on every path, as bitsandbytes' 4-bit matmul does: training through the
layer never holds a full-precision copy of the weight.

Storage per weight: 4 + 8/64 + 32/(64*256) = 4.127 bits with double quantization at blocksize 64
(plus one fp32 offset per layer), 4.5 without. The 16-entry code book and the 256-entry nested
map are shared constants of :mod:`qbench.kernels.nf4` (1088 bytes per process,
``codebook_bytes``), not per-layer state; :meth:`NF4Linear.total_bytes` adds them for a layer on
its own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench.dtypes import dtype_name, dtype_of
from qbench.kernels import cpu_nf4
from qbench.kernels._cpu import use_cpu_kernel
from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference, quantize_nf4, quantize_nf4_reference
from qbench.kernels.nf4_matmul import cuda_kernel_path, nf4_linear
from qbench.method import QuantizedLinear
from qbench.params import QBenchError


def quantize_weight(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> NF4Tensor:
    """The NF4 (or FP4) tensor of a weight: Triton on CUDA, the reference elsewhere (the same bits;
    the interpreter is far too slow for whole models)."""
    quantize = quantize_nf4 if use_triton_in_module(weight) else quantize_nf4_reference
    return quantize(weight.detach(), blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)


class NF4Linear(QuantizedLinear):
    """A linear layer whose weight is a frozen :class:`NF4Tensor`; ``compute_dtype`` (None: the
    input's) is the dtype of the matmul. Differentiable w.r.t. the input."""

    # Inference on CPU (no gradient) runs the packed-code kernel, whose prefill rounds
    # activations to bf16; training stays on the exact path, so a checkpointed recompute and the
    # first pass agree. Layers that carry adapters set this False (merges and PEFT see the same weight).
    cpu_kernel = True

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
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # frozen, like the weight
        self.kernel_path = "none"

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        return cls(quantize_weight(linear.weight, blocksize, double_quant, quant_type), linear.bias, compute_dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def q(self) -> NF4Tensor:
        return NF4Tensor(packed=self.packed, absmax=self.absmax, shape=(self.out_features, self.in_features),
                         dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                         nested_absmax=self.nested_absmax, offset=self.offset)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the matmul sees it (for merging adapters and for comparisons)."""
        return (dequantize_nf4 if use_triton_in_module(self.packed) else dequantize_nf4_reference)(self.q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        xc = x.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        # fp32 under fp32_arithmetic (bf16_gemm_fast() is then False): NF4's kernels qualify
        if self.cpu_kernel and use_cpu_kernel(xc, fp32=True) and cpu_nf4.supports(self.q):
            self.kernel_path = cpu_nf4.kernel_path(xc.shape[:-1].numel())
            return cpu_nf4.nf4_linear_cpu(xc, self.q, bias).to(x.dtype)
        triton = use_triton_in_module(xc)
        self.kernel_path = cuda_kernel_path(xc) if triton else "reference"
        return nf4_linear(xc, self.q, bias, use_triton=triton).to(x.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.q.tensors())
        if self.bias is not None:
            tensors["bias"] = self.bias
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
                "dtype": dtype_name(self.weight_dtype),
                "compute_dtype": None if self.compute_dtype is None else dtype_name(self.compute_dtype)}

    @staticmethod
    def nf4_from_stored(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> NF4Tensor:
        return NF4Tensor(packed=tensors["packed"], absmax=tensors["absmax"],
                         shape=(config["out_features"], config["in_features"]), dtype=dtype_of(config["dtype"]),
                         blocksize=config["blocksize"], quant_type=config["quant_type"],
                         nested_absmax=tensors.get("nested_absmax"), offset=tensors.get("offset"))

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "NF4Linear":
        compute = config.get("compute_dtype")
        return cls(cls.nf4_from_stored(tensors, config), tensors.get("bias"),
                   None if compute is None else dtype_of(compute))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, path={self.kernel_path}")
