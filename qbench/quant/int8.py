"""The layer of the ``int8-absmax`` method (and ``smoothquant``, which stores the same format):
absmax INT8 weight codes with fp32 scales, weight-only (W8A16) or with INT8 activations (W8A8);
and the calibration observer of static activation scales. See :mod:`qbench.plugins.int8_absmax`
for the method and its parameters."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qbench.kernels import absmax, cpu_int8, cpu_int8_matmul
from qbench.kernels._cpu import use_cpu_kernel
from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.dequant_matmul import (
    int8_dequant_weight_reference,
    int8_weight_matmul,
    int8_weight_matmul_reference,
)
from qbench.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from qbench.method import QuantizedLinear
from qbench.params import Param, QBenchError

GRANULARITIES = ("tensor", "channel", "block")
ACTIVATIONS = ("none", "dynamic", "static")
OBSERVERS = ("max", "percentile", "ema")
EMA_CONSTANT = 0.01  # llm-compressor's MinMaxObserver (its default for static activations): averaging_constant

# How a static activation range is observed: the same parameters in int8-absmax and smoothquant.
STATIC_RANGE_PARAMS = {
    "observer": Param(str, "max", "static activation range: max, percentile of |x|, or ema "
                      "(llm-compressor's default: moving average of each window's min/max, constant 0.01)",
                      choices=OBSERVERS),
    "percentile": Param(float, 99.99, "percentile of |x| for observer=percentile",
                        check=lambda v: None if 0 < v <= 100 else "must be in (0, 100]"),
}


def check_static_range(values: dict) -> str | None:
    """The observer parameters only mean something for static activations."""
    if values["observer"] != "max" and values["activations"] != "static":
        return "observer applies to activations=static only"
    return None


class Int8AbsmaxLinear(QuantizedLinear):
    """int8 codes ``[out, in]`` + fp32 scales (0-dim, ``[out]`` or ``[out, blocks]``), optional
    bias, and for static W8A8 the calibrated activation absmax (0-dim fp32)."""

    def __init__(self, in_features: int, out_features: int, granularity: str, block_size: int, activations: str,
                 weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act_absmax: torch.Tensor | None = None):
        super().__init__()
        if granularity not in GRANULARITIES or activations not in ACTIVATIONS:
            raise QBenchError(f"Int8AbsmaxLinear: granularity {granularity!r} / activations {activations!r} not valid")
        if tuple(weight_codes.shape) != (out_features, in_features) or weight_codes.dtype != torch.int8:
            raise QBenchError(f"Int8AbsmaxLinear: weight_codes must be int8 of shape {(out_features, in_features)}")
        if activations == "static" and act_absmax is None:
            raise QBenchError("Int8AbsmaxLinear: activations=static needs the calibrated act_absmax")
        self.in_features, self.out_features = in_features, out_features
        self.granularity, self.block_size, self.activations = granularity, block_size, activations
        self.register_buffer("weight_codes", weight_codes.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_absmax", None if act_absmax is None else act_absmax.float().reshape(()).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str, block_size: int, activations: str,
                    act_absmax: torch.Tensor | None = None) -> "Int8AbsmaxLinear":
        weight = linear.weight.detach()
        absmax.check_finite(weight, "weight")
        # Quantization happens once: Triton where the weights live on a GPU, the reference elsewhere.
        quant = absmax.quantize if use_triton_in_module(weight) else absmax.quantize_reference
        if granularity == "tensor":
            codes, scale = quant(weight)
        elif granularity == "channel":
            codes, scale = quant(weight, dim=-1)
            scale = scale.reshape(-1)
        else:
            codes, scale = quant(weight, block_size=block_size)
        bias = None if linear.bias is None else linear.bias.detach()
        if act_absmax is not None:
            act_absmax = act_absmax.to(weight.device)
        return cls(linear.in_features, linear.out_features, granularity, block_size, activations, codes, scale,
                   bias, act_absmax)

    @property
    def _group_size(self) -> int:
        return self.block_size if self.granularity == "block" else -1

    def dequantized_weight(self) -> torch.Tensor:
        return int8_dequant_weight_reference(self.weight_codes, self.weight_scale, self._group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triton = use_triton_in_module(x)
        # W8A16 rounds activations to bf16; W8A8's integer matmul is exact (runs under fp32_arithmetic)
        cpu = not triton and use_cpu_kernel(x, fp32=self.activations != "none")
        if self.activations == "none":
            if cpu and cpu_int8.supports(self.weight_codes, self.weight_scale):
                self.kernel_path = cpu_int8.kernel_path(x.shape[:-1].numel())
                return cpu_int8.int8_weight_matmul_cpu(x, self.weight_codes, self.weight_scale, self.bias)
            self.kernel_path = "triton" if triton else "reference"
            run = int8_weight_matmul if triton else int8_weight_matmul_reference
            return run(x, self.weight_codes, self.weight_scale, self.bias, self._group_size)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        fixed = self.act_absmax if self.activations == "static" else None
        if triton:
            self.kernel_path = "triton"
            codes, scale = absmax.quantize_rows(x2d, fixed_absmax=fixed)
            y = int8_matmul(codes, scale, self.weight_codes, self.weight_scale, self.bias, x.dtype)
        else:
            codes, scale = absmax._quantize_rows_reference(x2d, fixed_absmax=fixed)
            # the same integer sums, exactly: bit-identical to the reference
            cpu = cpu and cpu_int8_matmul.supports(self.weight_codes)
            self.kernel_path = cpu_int8_matmul.KERNEL_PATH if cpu else "reference"
            run = cpu_int8_matmul.int8_matmul_cpu if cpu else int8_matmul_reference
            y = run(codes, scale, self.weight_codes, self.weight_scale, self.bias, x.dtype)
        return y.view(*lead, self.out_features)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight_codes": self.weight_codes, "weight_scale": self.weight_scale}
        if self.bias is not None:
            tensors["bias"] = self.bias
        if self.act_absmax is not None:
            tensors["act_absmax"] = self.act_absmax
        return tensors

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "granularity": self.granularity,
                "block_size": self.block_size, "activations": self.activations}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "Int8AbsmaxLinear":
        return cls(config["in_features"], config["out_features"], config["granularity"], config["block_size"],
                   config["activations"], tensors["weight_codes"], tensors["weight_scale"], tensors.get("bias"),
                   tensors.get("act_absmax"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, activations={self.activations}"


def observe_activation_absmax(model: nn.Module, windows: torch.Tensor, names: list[str], observer: str,
                              percentile: float) -> dict[str, torch.Tensor]:
    """Run ``windows`` ([n, seqlen] token ids) through ``model`` one at a time and return, per
    linear ``name``, the absmax of its input: max over windows (``max``), the mean over windows
    of each window's ``percentile``-th percentile of |x| (``percentile``), or llm-compressor's
    default static observer (``ema``): the first window's min and max, each moved by 1% toward
    every later window's, and the larger magnitude of the two."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name):
        def hook(module, inputs, output):
            if observer == "ema":
                signed = inputs[0].detach().float()
                seen[name].append(torch.stack([signed.min(), signed.max()]))
                return
            values = inputs[0].detach().float().abs().flatten()
            if observer == "max":
                seen[name].append(values.max())
            else:
                rank = min(values.numel(), max(1, math.ceil(percentile / 100.0 * values.numel())))
                seen[name].append(values.kthvalue(rank).values)
        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for window in windows:
                model(window.reshape(1, -1).to(device))
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, values in seen.items():
        if not values:
            raise QBenchError(f"int8-absmax calibration: layer {name} saw no input; check the model")
        stacked = torch.stack(values)
        if observer == "ema":
            low_high = stacked[0]
            for window in stacked[1:]:
                low_high = low_high + EMA_CONSTANT * (window - low_high)
            result[name] = low_high.abs().max().cpu()
        else:
            result[name] = (stacked.max() if observer == "max" else stacked.mean()).cpu()
    return result
