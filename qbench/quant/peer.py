"""What the peer-library plugins (torchao, optimum-quanto, HQQ) share.

A peer's quantized weight is the library's own object; :class:`PeerTensorLinear` holds it and
lets the library's ``F.linear`` dispatch run the matmul, so every number is the library's. The
memory suite counts the plain tensors the library keeps inside (codes, scales, zero points),
found by unflattening its tensor subclasses. Peer methods are not cached on disk (re-quantizing
is their own fast path and their formats are theirs to serialize).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench.method import QuantizedLinear
from qbench.params import QBenchError


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (some peers are slow or noisy to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plain_tensors(tensor: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The plain tensors inside a (possibly nested) tensor subclass, by attribute path."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return {prefix: tensor}
    names, _ = tensor.__tensor_flatten__()
    out: dict[str, torch.Tensor] = {}
    for name in names:
        out.update(plain_tensors(getattr(tensor, name), f"{prefix}.{name.lstrip('_')}"))
    return out


def check_finite(name: str, linear: nn.Linear, method: str) -> None:
    if not torch.isfinite(linear.weight).all():
        raise QBenchError(f"method {method}: layer {name} has NaN/Inf weights; check the model file")


class PeerTensorLinear(QuantizedLinear):
    """A linear whose weight is a peer library's quantized tensor subclass (``F.linear`` dispatches to it)."""

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                 kernel_path: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.library_path = kernel_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = self.library_path
        return F.linear(x, self.qweight, self.bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = plain_tensors(self.qweight, "weight")
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "path": self.library_path}

    @classmethod
    def from_stored(cls, tensors, config):
        raise QBenchError("peer-library layers are not cached; quantize again")
