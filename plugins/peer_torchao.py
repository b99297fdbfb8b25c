"""torchao as a peer: ``torchao-int8`` and ``torchao-int4`` weight-only (``pip install 'qbench-quant[torchao]'``).

Registered only when torchao is importable. Weights are quantized with torchao's own
``quantize_`` and configs, and the matmul is torchao's (its tensor subclass handles ``F.linear``):

* ``torchao-int8``: ``Int8WeightOnlyConfig`` — int8 codes, one scale per output row.
* ``torchao-int4``: on CUDA ``Int4WeightOnlyConfig`` (tinygemm, bfloat16 only); on CPU torchao's
  int4 weight-only path ``IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(g))``, which
  keeps each 4-bit code in an int8 byte (the memory suite counts those bytes as stored) and, by
  that config's default mapping, is symmetric: one scale a group, no zero point. tinygemm keeps a
  zero point a group too, so the CPU and CUDA rows are not the same quantizer.
"""
from __future__ import annotations

import torch
from torch import nn

from qbench import hookimpl
from qbench.method import Method, replace_linears
from qbench.params import Param, QBenchError, QBenchSkip
from qbench.quant.peer import PeerTensorLinear, check_finite, importable
from qbench.records import distribution_version

GROUP_SIZES = (16, 32, 64, 128, 256)


def _quantize_linear(linear: nn.Linear, config, path: str) -> PeerTensorLinear:
    from torchao.quantization import quantize_

    holder = nn.Sequential(linear)
    quantize_(holder, config)
    weight = holder[0].weight
    return PeerTensorLinear(weight.data if isinstance(weight, nn.Parameter) else weight, linear.bias,
                            linear.in_features, linear.out_features, f"{path} ({type(weight).__name__})")


class _TorchaoMethod(Method):
    def check_layer(self, name: str, linear: nn.Linear) -> None:
        group = self.values.get("group_size")
        if group and linear.in_features % group:
            divisors = [g for g in GROUP_SIZES if linear.in_features % g == 0]
            raise QBenchError(f"method {self.name}: layer {name} has {linear.in_features} input columns, "
                              f"not a multiple of group_size={group} (torchao needs whole groups); use group_size="
                              f"{' or '.join(map(str, divisors)) or 'a divisor of the row width'}")

    def config_for(self, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        param = next(model.parameters())
        config, path = self.config_for(param.device, param.dtype)
        self.report["torchao"] = distribution_version("torchao")
        self.report["config"] = type(config).__name__

        def make(name: str, linear: nn.Linear) -> PeerTensorLinear:
            check_finite(name, linear, self.name)
            self.check_layer(name, linear)
            return _quantize_linear(linear, config, path)

        return replace_linears(model, make)


class TorchaoInt8(_TorchaoMethod):
    name = "torchao-int8"
    description = "torchao int8 weight-only (Int8WeightOnlyConfig: per-row scales) — peer library"
    cacheable = False

    @property
    def nominal_bits(self) -> int:
        return 8

    def config_for(self, device, dtype):
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(), "torchao-int8wo"


class TorchaoInt4(_TorchaoMethod):
    name = "torchao-int4"
    description = ("torchao int4 weight-only, groups of group_size (tinygemm on CUDA, int8-held codes on CPU) "
                   "— peer library")
    cacheable = False
    # torchao's own default group is 128; 64 is the largest that divides the demo model's 576-wide rows
    params = {"group_size": Param(int, 64, "input columns sharing a scale (must divide every layer's input width)",
                                  choices=GROUP_SIZES)}

    @property
    def nominal_bits(self) -> int:
        return 4

    def config_for(self, device, dtype):
        group = self.values["group_size"]
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                raise QBenchSkip("torchao-int4 on CUDA (Int4WeightOnlyConfig, tinygemm) needs bfloat16; "
                                 "run with --dtype bfloat16")
            from torchao.quantization import Int4WeightOnlyConfig

            config = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
            return config, "torchao-int4-tinygemm"
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)), "torchao-intx-int4"


@hookimpl
def register_methods(register):
    if importable("torchao"):
        register(TorchaoInt8)
        register(TorchaoInt4)
