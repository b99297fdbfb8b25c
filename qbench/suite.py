"""The suite interface: what a measurement plugin implements, what it is handed, and how its
metrics describe themselves to a report.

A suite declares, next to its parameters, a :class:`MetricSpec` for each metric it produces
(``metrics``; a name may hold ``*`` wildcards for metrics named per batch size, per task...). The
cell writes each metric's spec into the record beside its value, so a report builds its columns
from the records alone — a third-party suite's numbers reach the leaderboard without touching
qbench (as lm-evaluation-harness registers a metric with its aggregation and direction).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from qbench.paired import check_statistic
from qbench.params import Param, QBenchError, label, validate_params

AGGREGATES = ("last", "first", "mean", "min", "max")
BASELINE_COMPARISONS = ("diff", "ratio", "percent")


@dataclass(frozen=True)
class Metric:
    """One measured value, with its uncertainty where the suite knows it: ``stderr`` (a standard
    error, e.g. lm-eval's) or ``ci`` (a 95% interval ``(low, high)``, e.g. from a bootstrap or from
    repeats). Reports show them beside the value."""

    value: Any
    unit: str = ""
    stderr: float | None = None
    ci: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"value": self.value, "unit": self.unit}
        if self.stderr is not None:
            out["stderr"] = self.stderr
        if self.ci is not None:
            out["ci"] = [float(self.ci[0]), float(self.ci[1])]
        return out


@dataclass(frozen=True)
class MetricSpec:
    """What a report needs to show a metric.

    * ``title``: the column title; a ``{0}``, ``{1}`` ... in it takes what the name's ``*`` matched.
    * ``higher_is_better``: the direction (None for counts and settings).
    * ``headline``: a column of the leaderboard; other titled metrics appear with ``--columns all``.
    * ``aggregate``: how several values for one row combine (last, first, mean, min, max).
    * ``display_unit``: shown in another unit than recorded (``MiB`` for bytes, ``%`` for a fraction).
    * ``vs_baseline`` + ``baseline_title``: a derived column against the run's baseline row
      (fp16, bf16 or fp32 of the same model): ``diff`` (value − base), ``ratio`` (value / base),
      ``percent`` (100 · value / base, e.g. accuracy recovery).
    * ``samples`` + ``statistic``: the metric is computed from the per-window (per-item) sample set
      of that name the record keeps (``extra.samples``, see :mod:`qbench.paired`), as
      ``statistic = (function, column, ...)`` with function ``mean``, ``ratio`` (Σ a / Σ b) or
      ``exp_ratio`` (exp(Σ a / Σ b)). Reports then give every difference of it between two cells
      over the same windows a paired bootstrap interval. ``{0}`` in ``samples`` takes what the
      name's ``*`` matched (one set per task).
    """

    title: str
    higher_is_better: bool | None = None
    headline: bool = True
    aggregate: str = "last"
    display_unit: str | None = None
    vs_baseline: str | None = None
    baseline_title: str | None = None
    samples: str | None = None
    statistic: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"MetricSpec.aggregate must be one of {AGGREGATES}, not {self.aggregate!r}")
        if self.vs_baseline not in (None, *BASELINE_COMPARISONS):
            raise ValueError(f"MetricSpec.vs_baseline must be one of {BASELINE_COMPARISONS}, not {self.vs_baseline!r}")
        if self.vs_baseline and not self.baseline_title:
            raise ValueError("MetricSpec.vs_baseline needs a baseline_title")
        if (self.samples is None) != (self.statistic is None):
            raise ValueError("MetricSpec.samples and MetricSpec.statistic go together")
        if self.statistic is not None:
            object.__setattr__(self, "statistic", tuple(self.statistic))  # from JSON it is a list
            check_statistic(self.statistic)

    def for_name(self, groups: tuple[str, ...]) -> "MetricSpec":
        """This spec with the wildcard matches of a metric's name put into its titles."""
        if not groups:
            return self
        fill = lambda text: None if text is None else text.format(*groups)  # noqa: E731
        return MetricSpec(**{**asdict(self), "title": fill(self.title), "baseline_title": fill(self.baseline_title),
                             "samples": fill(self.samples)})

    def to_json(self) -> dict[str, Any]:
        defaults = {f.name: f.default for f in fields(self)}
        out = {k: v for k, v in asdict(self).items() if k == "title" or v != defaults[k]}
        if "statistic" in out:
            out["statistic"] = list(out["statistic"])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MetricSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@lru_cache(maxsize=None)
def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + "(.+?)".join(re.escape(part) for part in name.split("*")) + "$")


def _lookup(specs: dict[str, MetricSpec], name: str) -> tuple[int, MetricSpec | None]:
    """(position of the entry in ``specs``, spec) for metric ``name``: an exact entry first, then the
    first wildcard entry that matches; (len(specs), None) when none does."""
    keys = list(specs)
    if name in specs:
        return keys.index(name), specs[name]
    for i, key in enumerate(keys):
        if "*" in key:
            match = _pattern(key).match(name)
            if match:
                return i, specs[key].for_name(match.groups())
    return len(keys), None


def find_spec(specs: dict[str, MetricSpec], name: str) -> MetricSpec | None:
    """The spec of metric ``name`` (exact entry first, then the first wildcard that matches), or None."""
    return _lookup(specs, name)[1]


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
    # How the numbers were taken from the dataset (windows, length...): the record's dataset.protocol.
    protocol: str | None = None
    # The notes' claims this cell checked: {"claim", "measured", "verdict"} each.
    claims: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific record fields (windows, timer…)
    data_dir: str | None = None  # the run's --data-dir, for suites that read data of their own


class Suite:
    """Base class of a measurement suite: ``name``, typed ``params``, ``metrics``, ``measure(ctx)``.

    ``needs_dataset``: the runner resolves ``--dataset`` before the cell starts (and fails the
    whole run early, with one line, when it cannot be found), then asks :meth:`check_dataset`.
    ``reads_limit``: the run's ``--limit`` reaches ``ctx.limit`` (and the cell's identity) even
    though the suite reads no ``--dataset``. :meth:`check_run` is asked of every suite before any
    cell starts (data a suite reads itself, models it cannot run on).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    metrics: ClassVar[dict[str, MetricSpec]] = {}
    needs_dataset: ClassVar[bool] = False
    reads_limit: ClassVar[bool] = False
    # The suite measures the model's quality against a baseline: on a CPU its cells run only kernels
    # with the reference's fp32 arithmetic (qbench.kernels._cpu.fp32_arithmetic), so a kernel's bf16
    # rounding is not counted as the method's error.
    fp32_arithmetic: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.values = validate_params(f"suite {self.name}", self.params, params)

    @property
    def label(self) -> str:
        return label(self.name, self.values, self.params)

    def applies_to(self, method) -> str | None:
        """Return a reason to skip this suite for ``method`` (recorded as status=skipped), or None."""
        return None

    def check_dataset(self, source, tokens: int, max_length: int) -> str | None:
        """Before any cell starts: a message if ``source`` (``tokens`` long for a model whose context
        is ``max_length``) cannot serve this suite, else None. Only called when ``needs_dataset``."""
        return None

    def check_run(self, models: list[str], data_dir: str | None) -> str | None:
        """Before any cell starts: a message if this suite cannot run on ``models`` or cannot find
        data it reads itself (under ``data_dir`` / ``QBENCH_DATA_DIR``), else None."""
        return None

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        raise NotImplementedError

    @classmethod
    def metric_spec(cls, name: str) -> MetricSpec | None:
        """How metric ``name`` is shown (None: kept in the record, never a column)."""
        return find_spec(cls.metrics, name)

    @classmethod
    def in_declared_order(cls, names) -> list[str]:
        """``names`` in the order of the suite's ``metrics`` declaration (the leaderboard's column
        order), undeclared ones last; names matching one wildcard keep their measured order."""
        return sorted(names, key=lambda name: _lookup(cls.metrics, name)[0])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.values), "label": self.label}


__all__ = ["Metric", "MetricSpec", "CellContext", "Suite", "QBenchError", "find_spec"]
