"""QLoRA (method ``qlora``): frozen NF4 + double-quantized base weights, trainable LoRA adapters.

The recipe of Dettmers et al. 2023 as the notes describe it: every decoder linear is quantized
to NF4 with double quantization (:mod:`kernels.nf4`, bitsandbytes' format); LoRA adapters
(fp32, rank ``r``, ``alpha``, ``dropout``) sit on every decoder linear by default or on the
named ``target_modules``; compute runs in the model's 16-bit dtype; gradient checkpointing is
on and the optimizer is the paged AdamW (:mod:`plugins.paged_adamw`) by default.

On CUDA the adapted layers run :func:`kernels.lora_nf4.lora_nf4_linear` (one Triton kernel for
``x @ Ŵ.T + s * (x @ A.T) @ B.T``, Triton backward for x, A and B); elsewhere they dequantize
and use torch (``kernel_path`` says which ran). After ``train`` the modules keep the NF4 state
and the adapters in ``stored_tensors()``, so the cache rebuilds the fine-tuned model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench import hookimpl
from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.lora_nf4 import lora_nf4_linear
from qbench.kernels.nf4 import (VALID_BLOCKSIZES, NF4Tensor, dequantize_nf4, dequantize_nf4_reference,
                                quantize_nf4, quantize_nf4_reference)
from qbench.method import Method, QuantizedLinear, quantizable_linears, set_submodule
from qbench.params import Param
from qbench.plugins.lora import (LORA_PARAMS, LoRALinearBase, adapter_location,
                                 select_targets, train_lora, train_only_adapters)

def _quantize(w: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str) -> NF4Tensor:
    # Modules use Triton on CUDA only: the interpreter is a correctness tool, far too slow for models.
    fn = quantize_nf4 if use_triton_in_module(w) else quantize_nf4_reference
    return fn(w.detach(), blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)


def _dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (dequantize_nf4 if use_triton_in_module(q.packed) else dequantize_nf4_reference)(q, dtype)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _NF4State(nn.Module):
    """Holds an NF4Tensor's tensors as buffers (so ``.to(device)`` moves them) and rebuilds it."""

    def _set_nf4(self, q: NF4Tensor, bias: torch.Tensor | None) -> None:
        self.shape, self.orig_dtype = tuple(q.shape), q.dtype
        self.blocksize, self.quant_type = q.blocksize, q.quant_type
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("nested_absmax", q.nested_absmax)
        self.register_buffer("offset", q.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(packed=self.packed, absmax=self.absmax, shape=self.shape, dtype=self.orig_dtype,
                         blocksize=self.blocksize, quant_type=self.quant_type,
                         nested_absmax=self.nested_absmax, offset=self.offset)

    def nf4_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.nf4.tensors())
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def nf4_config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": str(self.orig_dtype).removeprefix("torch."),
                "blocksize": self.blocksize, "quant_type": self.quant_type}

    @staticmethod
    def nf4_from(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> NF4Tensor:
        return NF4Tensor(packed=tensors["packed"], absmax=tensors["absmax"], shape=tuple(config["shape"]),
                         dtype=_DTYPES[config["dtype"]], blocksize=config["blocksize"],
                         quant_type=config["quant_type"], nested_absmax=tensors.get("nested_absmax"),
                         offset=tensors.get("offset"))

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize(self.nf4)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _dequantize(self.nf4, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class QLoRALinear(_NF4State, LoRALinearBase):
    """Frozen NF4 weight + fp32 LoRA adapters."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None, r: int, alpha: float, dropout: float = 0.0,
                 fused: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self._set_nf4(q, bias)
        self.fused = fused
        out_features, in_features = q.shape
        self._init_lora(in_features, out_features, r, alpha, dropout, q.device, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float, blocksize: int = 64,
                    double_quant: bool = True, quant_type: str = "nf4", fused: bool = True,
                    generator: torch.Generator | None = None) -> "QLoRALinear":
        q = _quantize(linear.weight, blocksize, double_quant, quant_type)
        return cls(q, linear.bias, r, alpha, dropout, fused, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton_in_module(x):
            self.kernel_path = "triton"
            x_lora = self.lora_input(x) if (self.training and self.dropout_p > 0) else None
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return lora_nf4_linear(x, self.nf4, self.lora_A, self.lora_B, self.scaling, bias, x_lora)
        self.kernel_path = "reference"
        return self.base_forward(x) + self.lora_delta(x)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return self.nf4_tensors()

    def config(self) -> dict[str, Any]:
        return {**self.lora_config(), **self.nf4_config(), "fused": self.fused}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "QLoRALinear":
        module = cls(cls.nf4_from(tensors, config), tensors.get("bias"), config["r"], config["alpha"],
                     config["dropout"], config.get("fused", True))
        module.load_lora(tensors)
        return module


class NF4FrozenLinear(_NF4State, QuantizedLinear):
    """A decoder linear that QLoRA quantizes but gives no adapter (``target_modules`` subset)."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None):
        super().__init__()
        self._set_nf4(q, bias)
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = "reference"
        return self.base_forward(x)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return self.nf4_tensors()

    def config(self) -> dict[str, Any]:
        return {**self.nf4_config(), "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "NF4FrozenLinear":
        return cls(cls.nf4_from(tensors, config), tensors.get("bias"))


class QLoRAMethod(Method):
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
    cacheable = True
    can_train = True

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        targets = {name for name, _ in select_targets(model, v["target_modules"], v["r"])}
        generator = torch.Generator().manual_seed(v["seed"])
        for name, linear in list(quantizable_linears(model)):
            if name in targets:
                module = QLoRALinear.from_linear(linear, v["r"], v["alpha"], v["dropout"], v["blocksize"],
                                                 v["double_quant"], v["quant_type"], v["fused"], generator)
            else:
                q = _quantize(linear.weight, v["blocksize"], v["double_quant"], v["quant_type"])
                module = NF4FrozenLinear(q, linear.bias)
            set_submodule(model, name, module)
        return train_only_adapters(model)

    def train(self, model: nn.Module, tokenizer, data, **train_params) -> dict[str, Any]:
        return train_lora(model, data, self.values, adapter_location(self.values, train_params),
                          train_params.get("model_name", ""))


@hookimpl
def register_methods(register):
    register(QLoRAMethod)
