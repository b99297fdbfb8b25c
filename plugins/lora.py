"""LoRA on a frozen 16-bit base (method ``lora``): the fp16-LoRA baseline of QLoRA.

Adapters attach to the decoder linears (:mod:`qbench.quant.lora`); the train stage, its
parameters and the PEFT-format adapter are shared with ``qlora`` (:mod:`qbench.train.lora`).
"""
from __future__ import annotations

from torch import nn

from qbench import hookimpl
from qbench.quant.lora import LoRALinear, attach_lora
from qbench.train.lora import LoRAFineTuning


class LoRAMethod(LoRAFineTuning):
    name = "lora"
    description = "LoRA adapters on the frozen 16-bit model (the fp16-LoRA baseline of QLoRA), trained in a train stage"

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        return attach_lora(model, v, lambda name, linear, gen: LoRALinear.from_linear(
            linear, v["r"], v["alpha"], v["dropout"], gen))


@hookimpl
def register_methods(register):
    register(LoRAMethod)
