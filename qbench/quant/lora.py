"""LoRA layers: a frozen base linear plus trainable adapters, and where they attach.

* :class:`LoRALinearBase`: a frozen base linear plus trainable adapters
  ``y = base(x) + (alpha / r) * dropout(x) @ A.T @ B.T`` with ``A: [r, in]``, ``B: [out, r]``
  (PEFT's layout and initialisation: A Kaiming-uniform, B zero, so training starts from the
  base model). Adapters are fp32 whatever the compute dtype, as PEFT does by default
  (``autocast_adapter_dtype``): 16-bit adapters lose small AdamW updates.
* :class:`LoRALinear`: the base is the original weight in the compute dtype (fp16 LoRA).
* :class:`QLoRALinear`: the base is an :class:`~qbench.quant.nf4.NF4Linear` (QLoRA). On CUDA it
  runs :func:`~qbench.kernels.lora_nf4.lora_nf4_linear` (one Triton kernel for
  ``x @ Ŵ.T + s * (x @ A.T) @ B.T``, Triton backward for x, A and B); otherwise the NF4 layer's
  own forward plus the adapters. Either way the backward keeps only the packed base weight.
* :func:`select_targets` / :func:`attach_lora`: the decoder linears adapters attach to
  (``target_modules``: ``all`` or names joined by ``+``), validated against the model.

The methods are plugins (``plugins/lora.py``, ``plugins/qlora.py``); training is
:mod:`qbench.train.lora`, the PEFT file format :mod:`qbench.formats.peft`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.lora_nf4 import lora_nf4_linear
from qbench.kernels.nf4 import NF4Tensor
from qbench.method import QuantizedLinear, quantizable_linears, set_submodule
from qbench.params import QBenchError
from qbench.quant.nf4 import NF4Linear, quantize_weight


class LoRALinearBase(QuantizedLinear):
    """Frozen base + trainable fp32 LoRA adapters. Subclasses implement :meth:`base_forward`,
    :meth:`base_tensors`, :meth:`dequantized_weight` and the base part of ``config``."""

    def _init_lora(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                   device=None, generator: torch.Generator | None = None) -> None:
        self.training = False  # like a loaded model: dropout only once someone calls .train()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = int(r), float(alpha), float(dropout)
        self.scaling = self.alpha / self.r
        a = torch.empty(r, in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # = kaiming_uniform_(a=sqrt(5)), PEFT's default for A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=device))

    # subclasses -------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as the forward pass sees it (for merging and for PEFT comparisons)."""
        raise NotImplementedError

    # shared -----------------------------------------------------------------------------------
    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            return F.dropout(x, self.dropout_p, training=True)
        return x

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        xa = F.linear(self.lora_input(x).to(self.lora_A.dtype), self.lora_A)
        return (F.linear(xa, self.lora_B) * self.scaling).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = "reference"
        return self.base_forward(x) + self.lora_delta(x)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base_tensors(), "lora_A": self.lora_A.data, "lora_B": self.lora_B.data}

    def lora_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "r": self.r, "alpha": self.alpha, "dropout": self.dropout_p}

    def load_lora(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A"])
            self.lora_B.copy_(tensors["lora_B"])

    def base_param_count(self) -> int:
        """Frozen weights this module stands for (the linear's weight and bias)."""
        return self.weight_count + (self.out_features if getattr(self, "bias", None) is not None else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


class LoRALinear(LoRALinearBase):
    """LoRA on the original weight, kept frozen in the compute dtype (fp16/bf16/fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float,
                 dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_lora(in_features, out_features, r, alpha, dropout, weight.device, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    generator: torch.Generator | None = None) -> "LoRALinear":
        return cls(linear.weight, linear.bias, r, alpha, dropout, generator)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def config(self) -> dict[str, Any]:
        return self.lora_config()

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "LoRALinear":
        module = cls(tensors["weight"], tensors.get("bias"), config["r"], config["alpha"], config["dropout"])
        module.load_lora(tensors)
        return module


class QLoRALinear(NF4Linear, LoRALinearBase):
    """Frozen NF4 weight (an :class:`NF4Linear`) + fp32 LoRA adapters."""

    cpu_kernel = False  # the exact path: the weight PEFT and a merge see

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None, r: int, alpha: float, dropout: float = 0.0,
                 fused: bool = True, generator: torch.Generator | None = None):
        super().__init__(q, bias)
        self.fused = fused
        self._init_lora(self.in_features, self.out_features, r, alpha, dropout, q.device, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float, blocksize: int = 64,
                    double_quant: bool = True, quant_type: str = "nf4", fused: bool = True,
                    generator: torch.Generator | None = None) -> "QLoRALinear":
        q = quantize_weight(linear.weight, blocksize, double_quant, quant_type)
        return cls(q, linear.bias, r, alpha, dropout, fused, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton_in_module(x):
            self.kernel_path = "triton"
            x_lora = self.lora_input(x) if (self.training and self.dropout_p > 0) else None
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return lora_nf4_linear(x, self.q, self.lora_A, self.lora_B, self.scaling, bias, x_lora)
        return self.base_forward(x) + self.lora_delta(x)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Linear.forward(self, x)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return NF4Linear.stored_tensors(self)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return LoRALinearBase.stored_tensors(self)

    def config(self) -> dict[str, Any]:
        return {**NF4Linear.config(self), **self.lora_config(), "fused": self.fused}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "QLoRALinear":
        module = cls(cls.nf4_from_stored(tensors, config), tensors.get("bias"), config["r"], config["alpha"],
                     config["dropout"], config.get("fused", True))
        module.load_lora(tensors)
        return module

    def extra_repr(self) -> str:
        return f"{NF4Linear.extra_repr(self)}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinearBase]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinearBase)]


def train_only_adapters(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA A and B matrices."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    return model


def parse_targets(text: str) -> list[str] | None:
    """``all`` -> None (every decoder linear); ``q_proj+v_proj`` -> ['q_proj', 'v_proj']."""
    if text.strip().lower() == "all":
        return None
    names = [t.strip() for t in text.split("+") if t.strip()]
    if not names:
        raise QBenchError("target_modules is empty; give 'all' or module names joined by '+', e.g. q_proj+v_proj")
    return names


def select_targets(model: nn.Module, target_text: str, r: int) -> list[tuple[str, nn.Module]]:
    """The decoder linears LoRA attaches to, validated against the model (names and rank)."""
    linears = list(quantizable_linears(model))
    short_names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    wanted = parse_targets(target_text)
    if wanted is not None:
        unknown = [w for w in wanted if w not in short_names]
        if unknown:
            raise QBenchError(f"unknown target module {unknown[0]!r}; this model's decoder linears are: "
                              f"{'+'.join(short_names)} (or 'all')")
        linears = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
    for name, module in linears:
        limit = min(module.in_features, module.out_features)
        if r > limit:
            raise QBenchError(f"LoRA rank r={r} is larger than layer {name} "
                              f"({module.out_features}x{module.in_features}); use r <= {limit}")
    return linears


def attach_lora(model: nn.Module, values: dict[str, Any], make) -> nn.Module:
    """Replace each target linear by ``make(name, linear, generator)``; freeze everything else."""
    targets = select_targets(model, values["target_modules"], values["r"])
    generator = torch.Generator().manual_seed(values["seed"])
    for name, linear in targets:
        set_submodule(model, name, make(name, linear, generator))
    return train_only_adapters(model)
