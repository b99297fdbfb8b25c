"""The leaderboard as a pandas table, from a run's records (``qbench.report`` renders it).

One row per model × method. The columns come from the records themselves: each metric carries its
spec (title, direction, headline or not, aggregation, display unit, comparison against the run's
baseline row — see :class:`qbench.suite.MetricSpec`), so whatever suites ran, built in or not,
show up. Error and skipped cells are shown as such, never dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from qbench.params import QBenchError
from qbench.records import load_latest
from qbench.suite import MetricSpec

BASELINES = ("fp16", "bf16", "fp32")
DISPLAY_UNITS = {("bytes", "MiB"): 2.0**-20, ("bytes", "GiB"): 2.0**-30, ("fraction", "%"): 100.0}
COLUMN_CHOICES = ("headline", "all")
# Suffixes of the frame columns holding a metric's uncertainty, and of the board columns showing it.
STDERR, CI_LOW, CI_HIGH = "#stderr", "#ci_low", "#ci_high"
UNCERTAINTY_TITLES = {STDERR: "{} ±", CI_LOW: "{} CI low", CI_HIGH: "{} CI high"}


def _spec_of(rec: dict, name: str, metric: Any) -> MetricSpec | None:
    """A metric's spec as its record carries it; for records written before specs were recorded,
    the installed suite's declaration."""
    if isinstance(metric, dict) and metric.get("title"):
        return MetricSpec.from_json(metric)
    from qbench import host

    suite = host.suites().get(rec["suite"]["name"])
    return suite.metric_spec(name) if suite is not None else None


def load_frame(run_dir: Path) -> pd.DataFrame:
    """One row per record; metric values in ``suite.metric`` columns. ``frame.attrs`` holds each
    metric's spec and unit (in the order they first appear) for :func:`leaderboard`."""
    records = list(load_latest(run_dir).values())
    rows, specs, units = [], {}, {}
    for rec in records:
        row = {
            "model": rec["model"]["name"],
            "model_kind": rec["model"].get("kind"),
            "method": rec["method"].get("label", rec["method"]["name"]),
            "method_name": rec["method"]["name"],
            "suite": rec["suite"]["name"],
            "suite_label": rec["suite"].get("label", rec["suite"]["name"]),
            "status": rec["status"],
            "message": rec.get("message", ""),
            "protocol": (rec.get("dataset") or {}).get("protocol"),
            "device": rec.get("env", {}).get("device"),
            "dtype": (rec.get("dtype") or {}).get("computed"),
            "quantize_s": (rec.get("quantization") or {}).get("quantize_s"),
            "notes": rec.get("notes", []),
            "claims": rec.get("claims") or [],
            "baseline_claims": rec.get("baseline_claims") or [],
            "env": rec.get("env"),
            "kernel_paths": ",".join(rec.get("kernel_paths") or []),
            "finished_at": rec.get("finished_at"),
        }
        for name, metric in (rec.get("metrics") or {}).items():
            key = f"{rec['suite']['name']}.{name}"
            row[key] = metric.get("value") if isinstance(metric, dict) else metric
            if isinstance(metric, dict) and metric.get("stderr") is not None:
                row[f"{key}{STDERR}"] = metric["stderr"]
            if isinstance(metric, dict) and metric.get("ci") is not None:
                row[f"{key}{CI_LOW}"], row[f"{key}{CI_HIGH}"] = metric["ci"]
            if key not in specs:
                spec = _spec_of(rec, name, metric)
                if spec is not None:
                    specs[key] = spec
                    units[key] = metric.get("unit", "") if isinstance(metric, dict) else ""
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["metric_specs"], frame.attrs["metric_units"] = specs, units
    return frame


def _aggregate(values: pd.Series, how: str):
    if not len(values):
        return None
    if how in ("mean", "min", "max"):
        numbers = pd.to_numeric(values, errors="coerce").dropna()
        if len(numbers) == len(values):
            return float(getattr(numbers, how)())
    return values.iloc[0] if how == "first" else values.iloc[-1]


def _uncertainty(group: pd.DataFrame, key: str, how: str) -> dict[str, float]:
    """The stderr / CI bounds of the value ``_aggregate`` picked for ``key`` in ``group`` (for a mean
    of independent values: the stderr of the mean; CIs are not combined)."""
    out = {}
    values = group[key].dropna() if key in group else pd.Series(dtype=float)
    if not len(values):
        return out
    for suffix in (STDERR, CI_LOW, CI_HIGH):
        col = f"{key}{suffix}"
        if col not in group:
            continue
        if how == "mean" and len(values) > 1:
            errors = group.loc[values.index, col]
            if suffix == STDERR and errors.notna().all():
                out[suffix] = float((errors.astype(float) ** 2).sum() ** 0.5 / len(values))
            continue
        picked = group.loc[values.index[0] if how == "first" else values.index[-1], col]
        if _present(picked):
            out[suffix] = float(picked)
    return out


def _display(value, unit: str, spec: MetricSpec):
    factor = DISPLAY_UNITS.get((unit, spec.display_unit))
    if factor is None or not _present(value) or isinstance(value, str):
        return value
    return round(float(value) * factor, 2)


def _against(base, value, how: str):
    if not (_present(base) and _present(value)) or isinstance(base, str) or isinstance(value, str):
        return None
    base, value = float(base), float(value)
    if how == "diff":
        return round(value - base, 4)
    if base == 0:
        return None
    return round(value / base, 4) if how == "ratio" else round(100 * value / base, 2)


def columns_of(frame: pd.DataFrame, columns: str = "headline") -> list[tuple[str, MetricSpec, str]]:
    """(metric key, spec, title) of each metric column, in the order the metrics first appear
    (so the suites' order on the command line). A title two suites share gets the suite's name."""
    if columns not in COLUMN_CHOICES:
        raise QBenchError(f"unknown column set {columns!r}; valid: {', '.join(COLUMN_CHOICES)}")
    chosen, titles = [], set()
    for key, spec in frame.attrs.get("metric_specs", {}).items():
        if spec.headline or columns == "all":
            title = spec.title if spec.title not in titles else f"{spec.title} [{key.split('.')[0]}]"
            titles.add(title)
            chosen.append((key, spec, title))
    return chosen


def leaderboard(frame: pd.DataFrame, columns: str = "headline") -> pd.DataFrame:
    """One row per model × method: the metrics the suites declared as columns, each against the
    run's baseline row where its spec asks, then quantization time, kernel paths and status.
    A column no row has a value for is left out. ``board.attrs["keys"]`` maps titles to metric keys."""
    chosen = columns_of(frame, columns)
    units = frame.attrs.get("metric_units", {})
    out_rows = []
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "method": method}
        for key, spec, title in chosen:
            values = group[key].dropna() if key in group else pd.Series(dtype=float)
            row[title] = _display(_aggregate(values, spec.aggregate), units.get(key, ""), spec)
            for suffix, value in _uncertainty(group, key, spec.aggregate).items():
                row[UNCERTAINTY_TITLES[suffix].format(title)] = _display(value, units.get(key, ""), spec)
        paths = sorted({p for v in group["kernel_paths"].dropna() for p in v.split(",") if p})
        row["kernels"] = ",".join(paths) or None
        q = group["quantize_s"].dropna()
        row["quantize (s)"] = round(float(q.iloc[0]), 1) if len(q) else None
        problems = [f"{r.suite}: {r.status}" + (f" ({r.message})" if r.message else "")
                    for r in group.itertuples() if r.status != "ok"]
        row["status"] = "ok" if not problems else "; ".join(problems)
        out_rows.append(row)
    board = pd.DataFrame(out_rows)
    if board.empty:
        return board
    order, keys, uncertainty = ["model", "method"], {}, {}
    for key, spec, title in chosen:
        order.append(title)
        keys[title] = key
        for suffix, template in UNCERTAINTY_TITLES.items():
            if template.format(title) in board.columns:
                order.append(template.format(title))
                uncertainty.setdefault(title, {})[suffix] = template.format(title)
        if spec.vs_baseline:
            derived = spec.baseline_title if spec.baseline_title not in keys else f"{spec.baseline_title} [{key}]"
            board[derived] = [_against((baseline_row(board, r["model"]) or {}).get(title), r[title], spec.vs_baseline)
                              for r in board.to_dict("records")]
            order.append(derived)
            keys[derived] = f"{key}:{spec.vs_baseline}"
    order += ["quantize (s)", "kernels", "status"]
    metric_titles = set(keys) | {c for cols in uncertainty.values() for c in cols.values()}
    shown = [c for c in order if not (c in metric_titles and board[c].isna().all())]
    board = board[shown]
    board.attrs["keys"] = {t: k for t, k in keys.items() if t in shown}
    # title -> {suffix: column}: the columns holding each shown metric's stderr / CI bounds
    board.attrs["uncertainty"] = {t: {s: c for s, c in cols.items() if c in shown}
                                  for t, cols in uncertainty.items() if t in shown}
    return board


def with_uncertainty_in_cells(board: pd.DataFrame) -> pd.DataFrame:
    """For reading: each value with its uncertainty in one cell ("0.652 ± 0.011", "1.52 [1.41, 1.63]"),
    the separate uncertainty columns dropped. Blank where nothing was measured."""
    shown = board.astype(object).where(board.notna(), None)
    drop = []
    for title, cols in board.attrs.get("uncertainty", {}).items():
        cells = []
        for i, value in enumerate(shown[title]):
            if value is None or isinstance(value, str):
                cells.append(value)
                continue
            text = f"{value:.6g}"
            if STDERR in cols and shown[cols[STDERR]].iloc[i] is not None:
                text += f" ± {shown[cols[STDERR]].iloc[i]:.2g}"
            if CI_LOW in cols and CI_HIGH in cols and shown[cols[CI_LOW]].iloc[i] is not None:
                text += f" [{shown[cols[CI_LOW]].iloc[i]:.4g}, {shown[cols[CI_HIGH]].iloc[i]:.4g}]"
            cells.append(text)
        shown[title] = cells
        drop.extend(cols.values())
    return shown.drop(columns=drop)


def column_for(board: pd.DataFrame, key: str) -> str | None:
    """The title of the column showing metric ``key`` (``suite.metric`` or ``suite.metric:ratio``...)."""
    for title, k in board.attrs.get("keys", {}).items():
        if k == key:
            return title
    return None


def baseline_row(board: pd.DataFrame, model: str) -> dict | None:
    for name in BASELINES:
        match = board[(board["model"] == model) & (board["method"] == name)]
        if len(match):
            return match.iloc[0].to_dict()
    return None


RANDOM_KINDS = ("random", "tiny")  # models with random weights: the notes' claims are about real ones


def claim_lines(frame: pd.DataFrame, board: pd.DataFrame) -> list[str]:
    """Verdicts on the notes' (shared/seeds) claims that this run measured: those a cell checked
    itself (the record's ``claims``) and those a method states against the baseline
    (``baseline_claims``, e.g. GPTQ's "loses <0.1 perplexity"), checked here against the board.
    None for random-weight models."""
    lines: list[str] = []
    real = frame[~frame["model_kind"].isin(RANDOM_KINDS)] if "model_kind" in frame else frame
    for r in real.itertuples():
        for c in r.claims:
            lines.append(f"claim '{c['claim']}' for {r.method} on {r.model}: {c['measured']}: {c['verdict']}")
    for (model, method), group in real.groupby(["model", "method"], sort=False):
        claims = {c["claim"]: c for values in group["baseline_claims"] for c in values}
        base = baseline_row(board, model)
        for claim in claims.values():
            title = column_for(board, claim["metric"])
            mine = board[(board["model"] == model) & (board["method"] == method)]
            if base is None or title is None or mine.empty:
                continue
            delta = _against(base.get(title), mine.iloc[0][title], claim.get("compare", "diff"))
            if delta is None:
                continue
            holds = delta < claim["below"] if "below" in claim else delta > claim["above"]
            lines.append(f"claim '{claim['claim']}' for {method} on {model}: measured Δ {delta:+.3f}: "
                         f"{'holds' if holds else 'does not hold'}")
    return list(dict.fromkeys(lines))


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))
