"""The method interface: what a quantization plugin implements.

A method is a class with a ``name``, typed ``params`` and ``quantize(model, calibration)``
that returns the model with :class:`QuantizedLinear` modules in place of the decoder's
``nn.Linear`` layers. Storage is accounted exactly from ``QuantizedLinear.stored_tensors()``.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from qbench.params import Param, QBenchError, label, validate_params


class Method:
    """Base class of a quantization method. Subclasses set ``name``, ``params``, ``description``
    and implement :meth:`quantize`.

    * ``needs_calibration``: ``quantize`` gets a :class:`qbench.data.Calibration` (else None).
    * ``cacheable``: the quantized model is saved to the on-disk cache and reloaded by later cells.
    * ``can_train`` / :meth:`train`: methods that fine-tune (QLoRA) run a train stage first.
    * ``folded_parameters``: full names of parameters outside the quantized modules that
      ``quantize`` changed (scales folded into RMSNorm weights); the cache stores them too.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    needs_calibration: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    can_train: ClassVar[bool] = False
    folded_parameters: tuple[str, ...] = ()

    def __init__(self, **params: Any):
        self.values = validate_params(f"method {self.name}", self.params, params)
        # Anything the method wants in the record (damping retries, compute dtype, timings...).
        self.report: dict[str, Any] = {}
        problem = self.check(self.values)
        if problem:
            raise QBenchError(f"method {self.name}: {problem}")

    def check(self, values: dict[str, Any]) -> str | None:
        """Cross-parameter validation; return a message for the user, or None."""
        return None

    @property
    def label(self) -> str:
        return label(self.name, self.values, self.params)

    @property
    def nominal_bits(self) -> int | None:
        """Bits of the code itself (4 for nf4, 8 for int8...), for the seeds' bytes-per-parameter table."""
        for key in ("bits",):
            if key in self.values:
                return int(self.values[key])
        return None

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        raise NotImplementedError

    def train(self, model: nn.Module, tokenizer, data, **train_params) -> dict[str, Any]:
        """Fine-tune in place; return metrics for the record. Only for ``can_train`` methods."""
        raise QBenchError(f"method {self.name} does not train")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.values), "label": self.label}


class QuantizedLinear(nn.Module):
    """Base of every module that replaces an ``nn.Linear``.

    Subclasses keep all their state in tensors returned by :meth:`stored_tensors` (packed
    weights, scales, zero points, code books, bias) and JSON-able settings in :meth:`config`,
    so the memory suite counts every byte and the cache can rebuild the module with
    :meth:`from_stored`. ``kernel_path`` records which implementation ran last
    ("triton" or "reference").
    """

    in_features: int
    out_features: int
    kernel_path: str = "none"

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "QuantizedLinear":
        raise NotImplementedError

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.kernel_path}"


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers every method quantizes: those inside the decoder blocks.

    Embeddings and ``lm_head`` stay in the compute dtype for every method (as GPTQ, bitsandbytes
    and AWQ do by default), so methods are compared on the same set of layers.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name:
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(model: nn.Module, make, names=None) -> nn.Module:
    """Replace each quantizable ``nn.Linear`` (or only ``names``) by ``make(name, linear)``."""
    for name, linear in list(quantizable_linears(model)):
        if names is None or name in names:
            set_submodule(model, name, make(name, linear))
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            yield name, module


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(path: str) -> type[QuantizedLinear]:
    """Resolve a ``module:Class`` path saved in our own cache; only QuantizedLinear subclasses."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, QuantizedLinear)):
        raise QBenchError(f"cache entry names {path}, which is not a QuantizedLinear class")
    return obj
