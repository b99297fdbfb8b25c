"""QLoRA (method ``qlora``): frozen NF4 + double-quantized base weights, trainable LoRA adapters.

The recipe of Dettmers et al. 2023 as the notes describe it: every decoder linear is quantized
to NF4 with double quantization (:mod:`kernels.nf4`, bitsandbytes' format); LoRA adapters
(fp32, rank ``r``, ``alpha``, ``dropout``) sit on every decoder linear by default or on the
named ``target_modules`` (:class:`qbench.quant.lora.QLoRALinear`), the other decoder linears
stay plain :class:`qbench.quant.nf4.NF4Linear` layers; compute runs in the model's dtype;
gradient checkpointing is on and the optimizer is the paged AdamW
(:mod:`qbench.train.paged_adamw`) by default. After ``train`` the modules keep the NF4 state and
the adapters in ``stored_tensors()``, so the cache rebuilds the fine-tuned model.
"""
from __future__ import annotations

import torch
from torch import nn

from qbench import hookimpl
from qbench.kernels.nf4 import VALID_BLOCKSIZES
from qbench.method import quantizable_linears, set_submodule
from qbench.params import Param
from qbench.quant.lora import QLoRALinear, select_targets, train_only_adapters
from qbench.quant.nf4 import NF4Linear
from qbench.train.lora import LORA_PARAMS, LoRAFineTuning


class QLoRAMethod(LoRAFineTuning):
    name = "qlora"
    nominal_bits = 4  # the code width of the frozen base
    description = ("QLoRA: NF4 + double-quantized frozen base, LoRA adapters fine-tuned with gradient "
                   "checkpointing and a paged AdamW in a train stage")
    params = {
        **LORA_PARAMS,
        "blocksize": Param(int, 64, "NF4 block size (QLoRA: 64)", choices=VALID_BLOCKSIZES),
        "double_quant": Param(bool, True, "quantize the absmax constants to 8 bits (blocks of 256)"),
        "quant_type": Param(str, "nf4", "4-bit data type", choices=("nf4", "fp4")),
        "fused": Param(bool, True, "on CUDA, use the fused Triton LoRA+NF4 kernel (forward and backward)"),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        targets = {name for name, _ in select_targets(model, v["target_modules"], v["r"])}
        generator = torch.Generator().manual_seed(v["seed"])
        for name, linear in list(quantizable_linears(model)):
            if name in targets:
                module = QLoRALinear.from_linear(linear, v["r"], v["alpha"], v["dropout"], v["blocksize"],
                                                 v["double_quant"], v["quant_type"], v["fused"], generator)
            else:
                module = NF4Linear.from_linear(linear, v["blocksize"], v["double_quant"], v["quant_type"])
            set_submodule(model, name, module)
        return train_only_adapters(model)


@hookimpl
def register_methods(register):
    register(QLoRAMethod)
