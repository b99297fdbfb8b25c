"""The method interface: what a quantization plugin implements.

A method is a class with a ``name``, typed ``params`` and ``quantize(model, calibration)``
that returns the model with :class:`QuantizedLinear` modules in place of the decoder's
``nn.Linear`` layers. Storage is accounted exactly from ``QuantizedLinear.stored_tensors()``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from qbench.params import Param, QBenchError, label, validate_params


class Method:
    """Base class of a quantization method. Subclasses set ``name``, ``params``, ``description``
    and implement :meth:`quantize`. Everything the runner and the cell ask of a method is declared
    here with its default:

    * ``needs_calibration``: ``quantize`` gets a :class:`qbench.data.Calibration` (else None); a
      class attribute, or a property where it depends on the parameters (static int8 activations).
    * :meth:`data_source`: the text calibration (and training) windows are drawn from.
    * ``cacheable``: the quantized model is saved to the on-disk cache and reloaded by later cells.
    * ``can_train`` / :meth:`train`: methods that fine-tune (lora, qlora) have a train stage,
      run once after ``quantize`` and before any suite measures (the cache keeps its result).
    * ``nominal_bits``: the code width, for the notes' bytes-per-parameter table.
    * ``claims``: what the notes say of this method against the unquantized baseline, for the report
      to check, e.g. ``{"claim": "GPTQ loses <0.1 perplexity", "metric": "perplexity.ppl",
      "compare": "diff", "below": 0.1}`` (``compare``: diff, ratio or percent; ``below`` or ``above``).
    * ``folded_parameters``: full names of parameters outside the quantized modules that
      ``quantize`` changed (scales folded into RMSNorm weights); the cache stores them too.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    cacheable: ClassVar[bool] = True
    can_train: ClassVar[bool] = False
    claims: ClassVar[list[dict[str, Any]]] = []
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
    def needs_calibration(self) -> bool:
        return False

    def data_source(self, default: str) -> str:
        """The dataset name or file calibration and training windows come from; ``default`` is the
        run's ``--calibration``. lora and qlora return their ``train_dataset``."""
        return default

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
        """The train stage: fine-tune ``model`` in place on ``data`` (a :class:`qbench.data.Calibration`
        over :meth:`data_source`); return metrics for the record. Only for ``can_train`` methods.
        ``train_params``: ``model_name`` and, where the run has an output directory, ``output_dir``."""
        raise QBenchError(f"method {self.name} does not train")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.values), "label": self.label}


class QuantizedLinear(nn.Module):
    """Base of every module that replaces an ``nn.Linear``.

    Subclasses keep all their state in tensors returned by :meth:`stored_tensors` (packed
    weights, scales, zero points, code books, bias) and JSON-able settings in :meth:`config`,
    so the memory suite counts every byte and the cache can rebuild the module with
    :meth:`from_stored`. A layer may also hold :meth:`runtime_tensors` (a kernel's own layout,
    rebuilt at load time); :meth:`resident_tensors` is what it holds in memory. ``kernel_path``
    records which implementation ran last ("triton", "reference", or a CPU kernel such as
    "cpu:int4pack-bf16"), ``kernel_paths_run`` every one that ran.
    """

    in_features: int
    out_features: int

    @property
    def kernel_path(self) -> str:
        return self.__dict__.get("_kernel_path", "none")

    @kernel_path.setter
    def kernel_path(self, path: str) -> None:
        # every implementation that ran is remembered: a CPU layer may decode with one kernel and
        # prefill with another, and the record should name both
        self.__dict__["_kernel_path"] = path
        if path != "none":
            self.__dict__.setdefault("kernel_paths_run", set()).add(path)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "QuantizedLinear":
        raise NotImplementedError

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def runtime_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors held only to run faster (a CPU kernel's own layout of the weight, built from the
        stored tensors at load time, never saved)."""
        return {}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        """What the layer holds in memory (the memory suite counts these): its stored tensors and its
        runtime tensors. A layer whose runtime layout replaces some stored tensors (rebuilt from it
        when :meth:`stored_tensors` is called) lists only what it holds."""
        return {**self.stored_tensors(), **self.runtime_tensors()}

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.resident_tensors().values())

    @property
    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.kernel_path}"


def kernel_paths(model: nn.Module) -> list[str]:
    """Every implementation the model's layers ran (``kernel_path``: "triton", "reference",
    "cpu:int4pack-bf16", ...), sorted; a layer that has not run yet counts with its current value."""
    paths: set[str] = set()
    for module in model.modules():
        if hasattr(module, "kernel_path"):
            paths |= getattr(module, "kernel_paths_run", None) or {module.kernel_path}
    return sorted(paths)


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
