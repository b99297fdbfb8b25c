"""Paired uncertainty: per-window (or per-item) samples in records, and bootstrap intervals of the
difference between two cells measured on the same windows.

A suite that evaluates a text window by window (perplexity, fidelity) or an item at a time (an
accuracy task) keeps, next to its headline numbers, a compact *sample set* in the record
(``extra.samples.<set name>``)::

    {"key": "wikitext2/gptq-s2048 text:173c0a3f5e2b",   # what the ids index: protocol + text hash
     "ids": [0, 1, 2, ...],                              # window index (or item id), one per sample
     "values": {"nll_sum": [...], "tokens": [...]}}      # one list per column, aligned with ids

and its metrics say, in their :class:`~qbench.suite.MetricSpec`, which set they come from and how
(``statistic=("exp_ratio", "nll_sum", "tokens")``: ppl = exp(Σ nll / Σ tokens)). Two cells whose
sets have the same key and the same ids can then be compared **paired**: the bootstrap resamples
windows (the same resample for both cells) and recomputes the statistic for each, so the interval
reflects how much the difference depends on which text was evaluated — not a mean of per-window
ratios. Sets that do not index the same windows refuse to pair (:class:`PairingError`), never
silently pair by position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from qbench.params import QBenchError

RESAMPLES = 2000  # bootstrap resamples for every interval a report shows (recorded in its context)
BOOTSTRAP_SEED = 0
LEVEL = 0.95
Z95 = 1.959963984540054  # two-sided 95% normal quantile, for intervals from standard errors


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return num.sum(axis=-1) / den.sum(axis=-1)


def _exp_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.exp(_ratio(num, den))


def _stratified_mean(values: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """The mean over strata of each stratum's mean (mean accuracy over tasks: each task counts once,
    whatever its item count)."""
    means = [(values * (strata == s)).sum(axis=-1) / (strata == s).sum(axis=-1) for s in np.unique(strata)]
    return np.mean(means, axis=0)


# name -> (function of the named columns, number of columns). Each function reduces the last axis,
# so it computes the statistic of one sample ([n]) or of many bootstrap resamples at once ([B, n]).
STATISTICS: dict[str, tuple[Callable[..., np.ndarray], int]] = {
    "mean": (_mean, 1),  # e.g. accuracy = mean of per-item 0/1 correctness
    "ratio": (_ratio, 2),  # Σ a / Σ b, e.g. KL per token = Σ window KL sums / Σ window tokens
    "exp_ratio": (_exp_ratio, 2),  # exp(Σ a / Σ b), e.g. perplexity from window NLL sums and token counts
    # mean over strata of the stratum means, e.g. mean accuracy over tasks from (0/1 result, task index);
    # its bootstrap draws within each stratum, so every resample keeps each task's item count
    "stratified_mean": (_stratified_mean, 2),
}
# How a comparison of two statistics is computed, and the value meaning "no difference".
COMPARISONS: dict[str, tuple[Callable[[Any, Any], Any], float]] = {
    "diff": (lambda a, b: a - b, 0.0),
    "ratio": (lambda a, b: a / b, 1.0),
    "percent": (lambda a, b: 100.0 * a / b, 100.0),
}


def check_statistic(statistic: Sequence[str]) -> None:
    """Raise ValueError unless ``statistic`` is (function name, column, ...) with the right arity."""
    if not statistic or statistic[0] not in STATISTICS:
        raise ValueError(f"statistic must start with one of {tuple(STATISTICS)}, not {tuple(statistic)!r}")
    arity = STATISTICS[statistic[0]][1]
    if len(statistic) - 1 != arity or not all(isinstance(c, str) and c for c in statistic[1:]):
        raise ValueError(f"statistic {statistic[0]!r} takes {arity} column name(s), got {list(statistic[1:])!r}")


class PairingError(QBenchError):
    """Two sample sets that do not index the same windows (or items)."""


@dataclass(frozen=True)
class SampleSet:
    """Per-window (per-item) values of one cell: ``key`` names what the ids index."""

    key: str
    ids: tuple
    values: dict[str, np.ndarray]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SampleSet":
        ids = tuple(data["ids"])
        values = {name: np.asarray(column, dtype=np.float64) for name, column in data["values"].items()}
        for name, column in values.items():
            if column.shape != (len(ids),):
                raise QBenchError(f"sample set {data.get('key')!r}: column {name} has {column.size} values "
                                  f"for {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise QBenchError(f"sample set {data.get('key')!r}: ids repeat")
        return cls(str(data["key"]), ids, values)

    def statistic(self, statistic: Sequence[str]) -> float:
        fn = STATISTICS[statistic[0]][0]
        return float(fn(*(self.column(c) for c in statistic[1:])))

    def column(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise QBenchError(f"sample set {self.key!r} has no column {name!r} (has: {', '.join(self.values)})")
        return self.values[name]


def sample_set_json(key: str, ids: Sequence, values: dict[str, Sequence[float]]) -> dict[str, Any]:
    """The compact record form a suite puts under ``ctx.extra["samples"][<set name>]``."""
    ids = list(ids)
    for name, column in values.items():
        if len(column) != len(ids):
            raise ValueError(f"sample column {name} has {len(column)} values for {len(ids)} ids")
    return {"key": key, "ids": ids, "values": {name: list(column) for name, column in values.items()}}


def window_key(protocol: str, source) -> str:
    """The key of a sample set of windows: the protocol without its window count (``first-N``: the
    ids say which windows) and a hash of the text, so windows of another text never pair."""
    digest = source.sha256() if hasattr(source, "sha256") else None
    return f"{protocol} text:{digest[:12]}" if digest else protocol


def _describe_ids(ids: tuple) -> str:
    if not ids:
        return "no windows"
    if all(isinstance(i, int) for i in ids) and list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{len(ids)} windows ({ids[0]}–{ids[-1]})"
    return f"{len(ids)} ids"


def align(a: SampleSet, b: SampleSet, what_a: str = "A", what_b: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """Index arrays putting ``a`` and ``b`` in the same id order. Raises PairingError (one clear line)
    when they index different texts/protocols or different windows: pairing is checked, never assumed."""
    if a.key != b.key:
        raise PairingError(f"cannot pair {what_a} with {what_b}: their samples index different texts or protocols "
                           f"({a.key!r} vs {b.key!r})")
    if set(a.ids) != set(b.ids):
        raise PairingError(f"cannot pair {what_a} with {what_b}: different windows of {a.key!r} "
                           f"({what_a}: {_describe_ids(a.ids)}, {what_b}: {_describe_ids(b.ids)}); "
                           f"evaluate both with the same --limit")
    position = {i: n for n, i in enumerate(b.ids)}
    return np.arange(len(a.ids)), np.array([position[i] for i in a.ids], dtype=np.int64)


@dataclass(frozen=True)
class Interval:
    """A comparison of two statistics with its 95% interval; ``significant``: the interval excludes
    the no-difference value (0 for a difference, 1 for a ratio, 100 for a percentage)."""

    value: float
    low: float
    high: float
    null: float
    method: str  # "paired bootstrap" or "normal (stderr)"
    n: int | None = None
    resamples: int | None = None

    @property
    def significant(self) -> bool:
        return not (self.low <= self.null <= self.high)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def paired_bootstrap(a: SampleSet, b: SampleSet, statistic: Sequence[str], how: str = "diff",
                     resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, what_a: str = "A",
                     what_b: str = "B") -> Interval:
    """``how``(stat(a), stat(b)) with a 95% percentile interval from a paired bootstrap over the
    windows both sets share: each resample draws windows with replacement, the same draw for both,
    and recomputes the statistic of each from the drawn windows."""
    check_statistic(statistic)
    if how not in COMPARISONS:
        raise QBenchError(f"unknown comparison {how!r}; valid: {', '.join(COMPARISONS)}")
    if resamples < 1:
        raise QBenchError(f"resamples must be at least 1, not {resamples}")
    ia, ib = align(a, b, what_a, what_b)
    fn = STATISTICS[statistic[0]][0]
    cols_a = [a.column(c)[ia] for c in statistic[1:]]
    cols_b = [b.column(c)[ib] for c in statistic[1:]]
    compare, null = COMPARISONS[how]
    value = float(compare(fn(*cols_a), fn(*cols_b)))
    n = len(ia)
    rng = np.random.default_rng(seed)
    if statistic[0] == "stratified_mean":
        draws = _stratified_draws(cols_a[1], resamples, rng)
    else:
        draws = rng.integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = compare(fn(*(c[draws] for c in cols_a)), fn(*(c[draws] for c in cols_b)))
    boot = boot[np.isfinite(boot)]
    if not boot.size:
        return Interval(value, math.nan, math.nan, null, "paired bootstrap", n, resamples)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return Interval(value, float(low), float(high), null, "paired bootstrap", n, resamples)


def _stratified_draws(strata: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] indices drawn with replacement within each stratum (each keeps its size)."""
    parts = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        parts.append(members[rng.integers(0, members.size, size=(resamples, members.size))])
    return np.concatenate(parts, axis=1)


def normal_interval(a: float, b: float, stderr_a: float, stderr_b: float, how: str = "diff") -> Interval:
    """``how``(a, b) with a 95% normal interval from two independent standard errors (lm-eval's
    per-task stderr, say): unpaired, so wider than a paired interval would be. Ratios by the delta
    method."""
    compare, null = COMPARISONS[how]
    value = float(compare(a, b))
    if how == "diff":
        se = math.hypot(stderr_a, stderr_b)
    else:
        if b == 0:
            return Interval(value, math.nan, math.nan, null, "normal (stderr)")
        scale = 100.0 if how == "percent" else 1.0
        se = scale * math.hypot(stderr_a / b, a * stderr_b / b**2)
    return Interval(value, value - Z95 * se, value + Z95 * se, null, "normal (stderr)")


def describe_method(resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> str:
    """The context line a report writes about its intervals."""
    return (f"intervals: 95%, paired bootstrap over the windows (items) both rows were evaluated on, "
            f"{resamples} resamples, seed {seed}, the statistic recomputed from each resample "
            f"(ppl = exp(Σ NLL / Σ tokens)); where only standard errors were recorded, a normal interval "
            f"from both (unpaired). 'Δ ± h': h is half the interval's width (the bounds are in csv/json); "
            f"'(n.s.)': the interval contains no difference")
