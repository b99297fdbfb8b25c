"""HQQ (Half-Quadratic Quantization) as a peer: ``hqq`` (``pip install 'qbench-quant[hqq]'``).

Registered only when hqq is importable. Each layer becomes hqq's own ``HQQLinear`` (its
calibration-free optimizer fits the zero points), quantized with ``compute_dtype=float16`` so the
scales and zero points are stored in fp16 as HQQ stores them on a GPU. The layer's weight is
dequantized by hqq's own ``dequantize()`` and multiplied in the activations' dtype (hqq's
PyTorch backend does the same; its fused GPU backends are not used here).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench import hookimpl
from qbench.method import Method, QuantizedLinear, replace_linears
from qbench.params import Param, QBenchError
from qbench.quant.peer import check_finite, importable
from qbench.records import distribution_version


class HQQPeerLinear(QuantizedLinear):
    """hqq's HQQLinear, held as an attribute (not a child module) so only its stored tensors count."""

    def __init__(self, inner, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.__dict__["inner"] = inner  # not registered: hqq manages its own tensors and device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = "hqq-dequantize"
        weight = self.inner.dequantize().to(x.dtype)
        bias = None if self.inner.bias is None else self.inner.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        meta = self.inner.meta
        tensors = {"W_q": self.inner.W_q.data}
        for key in ("scale", "zero", "zero_q", "scale_q"):
            if isinstance(meta.get(key), torch.Tensor):
                tensors[key] = meta[key]
        if self.inner.bias is not None:
            tensors["bias"] = self.inner.bias
        return tensors

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_stored(cls, tensors, config):
        raise QBenchError("hqq layers are not cached; quantize again")


class HQQ(Method):
    name = "hqq"
    description = "HQQ calibration-free 4-bit (or 2/3/8-bit) with optimized zero points, fp16 scales — peer library"
    cacheable = False
    params = {
        "bits": Param(int, 4, "bits per weight", choices=(2, 3, 4, 8)),
        "group_size": Param(int, 64, "weights sharing a scale and zero point", choices=(32, 64, 128)),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=self.values["bits"], group_size=self.values["group_size"])
        device = str(next(model.parameters()).device)
        self.report["hqq"] = distribution_version("hqq")
        self.report["quant_config"] = {k: v for k, v in config["weight_quant_params"].items()}

        def make(name: str, linear: nn.Linear) -> HQQPeerLinear:
            check_finite(name, linear, self.name)
            inner = HQQLinear(linear, config, compute_dtype=torch.float16, device=device)
            return HQQPeerLinear(inner, linear.in_features, linear.out_features)

        return replace_linears(model, make)


@hookimpl
def register_methods(register):
    if importable("hqq"):
        register(HQQ)
