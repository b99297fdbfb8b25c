"""Unquantized baselines: ``fp16``, ``bf16`` and ``fp32``.

Every decoder linear is held in the method's dtype. On a GPU the model computes in that dtype.
On CPU, where half-precision matmul is slow (fp16) or emulated, the weights are still *stored*
in half precision (that is what the memory suite counts) and converted to the compute dtype
(fp32) per call — the record says which dtype was computed in. Training through such a layer
(full fine-tuning, the checkpointing suite) converts again in backward instead of keeping the
fp32 copy.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench import hookimpl
from qbench.dtypes import dtype_name, dtype_of
from qbench.method import Method, QuantizedLinear, replace_linears


class UpcastLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with W stored in a narrower dtype than x: the upcast copy of W is made again in
    backward, never kept for it (autograd would otherwise save a full-precision copy of every weight
    per training step — on CPU, where half-precision weights compute in fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (rows.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


class FloatLinear(QuantizedLinear):
    """A linear layer whose weight is stored in ``weight.dtype`` and computed in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel_path = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:  # computing in the stored dtype (GPU)
            return F.linear(x, self.weight, self.bias)
        return UpcastLinearFunction.apply(x, self.weight, self.bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.weight.data}
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    def config(self) -> dict[str, Any]:
        return {"dtype": dtype_name(self.weight.dtype)}

    @classmethod
    def from_stored(cls, tensors, config):
        return cls(tensors["weight"], tensors.get("bias"))


class _FloatBaseline(Method):
    cacheable = False  # a dtype cast is cheaper than a disk round trip

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        dtype = dtype_of(self.name)  # the method's name is the dtype's short name
        device = next(model.parameters()).device
        if device.type == "cuda":
            model = model.to(dtype)  # native half precision end to end
        compute = next(model.parameters()).dtype

        def make(name, linear):
            bias = None if linear.bias is None else linear.bias.data.to(dtype)
            return FloatLinear(linear.weight.data.to(dtype), bias)

        replace_linears(model, make)
        self.report = {"storage_dtype": dtype_name(dtype), "compute_dtype": dtype_name(compute)}
        return model

    @property
    def nominal_bits(self) -> int:
        return torch.finfo(dtype_of(self.name)).bits


class FP16(_FloatBaseline):
    name = "fp16"
    description = "Unquantized baseline, weights in float16"


class BF16(_FloatBaseline):
    name = "bf16"
    description = "Unquantized baseline, weights in bfloat16"


class FP32(_FloatBaseline):
    name = "fp32"
    description = "Unquantized baseline, weights in float32"


@hookimpl
def register_methods(register):
    register(FP16)
    register(BF16)
    register(FP32)
