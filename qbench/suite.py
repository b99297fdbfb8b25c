"""The suite interface: what a measurement plugin implements, and what it is handed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from qbench.params import Param, QBenchError, label, validate_params


@dataclass(frozen=True)
class Metric:
    value: Any
    unit: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}


@dataclass
class CellContext:
    """Everything a suite may use. Suites never look at which method produced ``model``
    except through ``method`` (e.g. whether it can train)."""

    model: nn.Module
    tokenizer: Any
    model_info: dict[str, Any]
    method: Any  # qbench.method.Method
    device: torch.device
    dtype: torch.dtype
    dataset: Any  # qbench.data.TextSource
    limit: int | None
    seed: int
    # Builds the same quantized model again (from the cache where possible), for suites that
    # need a fresh copy, e.g. to train it.
    reload_model: Callable[[], nn.Module] | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific record fields (protocol…)


class Suite:
    """Base class of a measurement suite: ``name``, typed ``params``, ``measure(ctx)``.

    ``needs_dataset``: the runner resolves ``--dataset`` before the cell starts (and fails the
    whole run early, with one line, when it cannot be found).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    needs_dataset: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.values = validate_params(f"suite {self.name}", self.params, params)

    @property
    def label(self) -> str:
        return label(self.name, self.values, self.params)

    def applies_to(self, method) -> str | None:
        """Return a reason to skip this suite for ``method`` (recorded as status=skipped), or None."""
        return None

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.values), "label": self.label}


__all__ = ["Metric", "CellContext", "Suite", "QBenchError"]
