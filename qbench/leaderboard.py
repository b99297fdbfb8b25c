"""The leaderboard as a pandas table, from a run's records (``qbench.report`` renders it).

One row per model × method. The columns come from the records themselves: each metric carries its
spec (title, direction, headline or not, aggregation, display unit, comparison against the run's
baseline row — see :class:`qbench.suite.MetricSpec`), so whatever suites ran, built in or not,
show up. Error and skipped cells are shown as such, never dropped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from qbench import host
from qbench.paired import (
    BOOTSTRAP_SEED,
    RESAMPLES,
    Interval,
    PairingError,
    SampleSet,
    normal_interval,
    paired_bootstrap,
)
from qbench.params import QBenchError
from qbench.records import load_latest
from qbench.suite import MetricSpec

BASELINES = ("fp16", "bf16", "fp32")
DISPLAY_UNITS = {("bytes", "MiB"): 2.0**-20, ("bytes", "GiB"): 2.0**-30, ("fraction", "%"): 100.0}
COLUMN_CHOICES = ("headline", "all")
# Suffixes of the frame columns holding a metric's uncertainty, and of the board columns showing it.
STDERR, CI_LOW, CI_HIGH = "#stderr", "#ci_low", "#ci_high"
UNCERTAINTY_TITLES = {STDERR: "{} ±", CI_LOW: "{} CI low", CI_HIGH: "{} CI high"}
SIGNIFICANT = "#significant"  # of a derived column: its interval excludes "no difference"
DERIVED_TITLES = {CI_LOW: "{} CI low", CI_HIGH: "{} CI high", SIGNIFICANT: "{} significant"}
# Columns beside a metric when a method was run with several seeds: mean and spread over the seeds.
SEED_STATS = ("mean", "sd", "min", "max", "n")
SEED_TITLES = {"mean": "{} over seeds", "sd": "{} over seeds sd", "min": "{} over seeds min",
               "max": "{} over seeds max", "n": "{} seeds"}


def _spec_of(rec: dict, name: str, metric: Any) -> MetricSpec | None:
    """A metric's spec as its record carries it; for records written before specs were recorded,
    the installed suite's declaration."""
    if isinstance(metric, dict) and metric.get("title"):
        return MetricSpec.from_json(metric)
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
            "method": host.current_label(rec["method"]),
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
            "samples": (rec.get("extra") or {}).get("samples") or {},
            "seed_group": _seed_group(rec),
            "method_seed": (rec["method"].get("params") or {}).get("seed"),
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


def _seed_group(rec: dict) -> str:
    """The method with every parameter but ``seed``: rows that differ only in the seed share it."""
    params = {k: v for k, v in (rec["method"].get("params") or {}).items() if k != "seed"}
    return json.dumps([rec["method"]["name"], params], sort_keys=True, default=str)


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


def _picked_samples(group: pd.DataFrame, key: str, spec: MetricSpec) -> SampleSet | None:
    """The sample set behind the value ``_aggregate`` picked for ``key`` in ``group`` (one record's),
    or None when the metric has none or its value combines several records."""
    if not spec.samples or key not in group:
        return None
    values = group[key].dropna()
    if not len(values) or (spec.aggregate not in ("first", "last") and len(values) > 1):
        return None
    row = group.loc[values.index[0] if spec.aggregate == "first" else values.index[-1]]
    data = (row["samples"] or {}).get(spec.samples)
    return SampleSet.from_json(data) if data else None


def _interval_vs_baseline(row: dict, base: dict, title: str, spec: MetricSpec, sets: dict, unit_factor: float,
                          resamples: int, seed: int) -> tuple[Interval | None, str | None]:
    """The interval of ``row``'s derived value against ``base`` for metric column ``title``: paired
    bootstrap when both carry samples, normal from both stderrs otherwise. (None, why) when neither."""
    mine, theirs = sets.get((row["model"], row["method"], title)), sets.get((base["model"], base["method"], title))
    if mine is not None and theirs is not None:
        try:
            interval = paired_bootstrap(mine, theirs, spec.statistic, spec.vs_baseline, resamples, seed,
                                        what_a=f"{row['method']} ({title})", what_b=base["method"])
        except PairingError as exc:
            return None, str(exc)
        if spec.vs_baseline == "diff" and unit_factor != 1:
            interval = Interval(interval.value * unit_factor, interval.low * unit_factor, interval.high * unit_factor,
                                0.0, interval.method, interval.n, interval.resamples)
        return interval, None
    stderr = UNCERTAINTY_TITLES[STDERR].format(title)
    if all(_present(r.get(stderr)) and _present(r.get(title)) and not isinstance(r.get(title), str)
           for r in (row, base)):
        return normal_interval(float(row[title]), float(base[title]), float(row[stderr]), float(base[stderr]),
                               spec.vs_baseline), None
    return None, None


def _seed_columns(board: pd.DataFrame, frame: pd.DataFrame, chosen) -> dict[str, dict[str, str]]:
    """Mean, sd, min, max and count over seeds beside each metric whose value moves with the seed, on
    every row of a method run with several seeds (rows differing only in ``seed``). Returns, per
    metric title, the columns added."""
    groups = frame.drop_duplicates(["model", "method"]).set_index(["model", "method"])["seed_group"].to_dict()
    added: dict[str, dict[str, str]] = {}
    members: dict[tuple, list[int]] = {}
    for i, r in enumerate(board.to_dict("records")):
        members.setdefault((r["model"], groups.get((r["model"], r["method"]))), []).append(i)
    swept = [rows for rows in members.values() if len(rows) > 1]
    if not swept:
        return added
    for _, spec, title in chosen:
        if spec.higher_is_better is None or title not in board:
            continue
        stats: dict[int, dict[str, float]] = {}
        for rows in swept:
            values = [float(board.at[i, title]) for i in rows
                      if _present(board.at[i, title]) and not isinstance(board.at[i, title], str)]
            if len(values) < 2:
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            for i in rows:
                stats[i] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}
        if not stats or all(st["sd"] == 0 for st in stats.values()):
            continue  # the same for every seed (storage, bits): nothing to show
        cols = {k: SEED_TITLES[k].format(title) for k in SEED_STATS}
        for k, col in cols.items():
            values = [stats[i][k] if i in stats else None for i in range(len(board))]
            board[col] = pd.array(values, dtype="Int64") if k == "n" else values
        added[title] = cols
    return added


def leaderboard(frame: pd.DataFrame, columns: str = "headline", resamples: int = RESAMPLES,
                seed: int = BOOTSTRAP_SEED, baseline: str | None = None) -> pd.DataFrame:
    """One row per model × method: the metrics the suites declared as columns, each against the
    run's baseline row where its spec asks (with a 95% interval where the rows carry per-window
    samples or standard errors), then quantization time, kernel paths and status; beside a metric,
    its mean and spread over seeds where a method ran with several. A column no row has a value for
    is left out. ``board.attrs``: ``keys`` maps titles to metric keys, ``uncertainty`` / ``derived`` /
    ``seeds`` name the columns holding intervals and seed statistics, ``interval_notes`` says why a
    difference has no interval. ``baseline``: the method label (as the board shows it) the
    differences are against, instead of the run's fp16/bf16/fp32 row (``board.attrs["baseline"]``)."""
    chosen = columns_of(frame, columns)
    units = frame.attrs.get("metric_units", {})
    out_rows = []
    sets: dict[tuple[str, str, str], SampleSet] = {}  # (model, method, title) -> samples behind the value
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "method": method}
        for key, spec, title in chosen:
            values = group[key].dropna() if key in group else pd.Series(dtype=float)
            row[title] = _display(_aggregate(values, spec.aggregate), units.get(key, ""), spec)
            for suffix, value in _uncertainty(group, key, spec.aggregate).items():
                row[UNCERTAINTY_TITLES[suffix].format(title)] = _display(value, units.get(key, ""), spec)
            picked = _picked_samples(group, key, spec)
            if picked is not None:
                sets[(model, method, title)] = picked
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
    if baseline is not None and baseline not in set(board["method"]):
        raise QBenchError(f"--baseline {baseline!r} is not a method of this run; its methods: "
                          + ", ".join(dict.fromkeys(board["method"])))
    seed_cols = _seed_columns(board, frame, chosen)
    # For plots: each row's paired interval of (value − baseline value), per metric with samples.
    diff_intervals: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
    for key, spec, title in chosen:
        if not spec.samples:
            continue
        factor = DISPLAY_UNITS.get((units.get(key, ""), spec.display_unit), 1.0)
        for r in board.to_dict("records"):
            base = baseline_row(board, r["model"], baseline)
            mine, theirs = sets.get((r["model"], r["method"], title)), sets.get((r["model"], (base or {}).get("method"),
                                                                                title))
            if base is None or base["method"] == r["method"] or mine is None or theirs is None:
                continue
            try:
                iv = paired_bootstrap(mine, theirs, spec.statistic, "diff", resamples, seed)
            except PairingError:
                continue
            diff_intervals.setdefault(title, {})[(r["model"], r["method"])] = (iv.low * factor, iv.high * factor)
    order, keys, uncertainty, derived_cols, notes = ["model", "method"], {}, {}, {}, []
    intervals = 0
    for key, spec, title in chosen:
        order.append(title)
        keys[title] = key
        for suffix, template in UNCERTAINTY_TITLES.items():
            if template.format(title) in board.columns:
                order.append(template.format(title))
                uncertainty.setdefault(title, {})[suffix] = template.format(title)
        order.extend(seed_cols.get(title, {}).values())
        if spec.vs_baseline:
            derived = against_title(spec.baseline_title, baseline)
            derived = derived if derived not in keys else f"{derived} [{key}]"
            records = board.to_dict("records")
            board[derived] = [_against((baseline_row(board, r["model"], baseline) or {}).get(title), r[title],
                                       spec.vs_baseline)
                              for r in records]
            order.append(derived)
            keys[derived] = f"{key}:{spec.vs_baseline}"
            factor = DISPLAY_UNITS.get((units.get(key, ""), spec.display_unit), 1.0)
            digits = 2 if spec.vs_baseline == "percent" else 4
            bounds: dict[str, list] = {suffix: [None] * len(records) for suffix in DERIVED_TITLES}
            for i, r in enumerate(records):
                base = baseline_row(board, r["model"], baseline)
                if base is None or base["method"] == r["method"] or board.at[i, derived] is None:
                    continue
                interval, why = _interval_vs_baseline(r, base, title, spec, sets, factor, resamples, seed)
                if why:
                    notes.append(f"no interval for {derived} of {r['method']} on {r['model']}: {why}")
                if interval is None or not math.isfinite(interval.low):
                    continue
                intervals += 1
                bounds[CI_LOW][i], bounds[CI_HIGH][i] = round(interval.low, digits), round(interval.high, digits)
                bounds[SIGNIFICANT][i] = interval.significant
            if any(v is not None for v in bounds[CI_LOW]):
                derived_cols[derived] = {}
                for suffix, template in DERIVED_TITLES.items():
                    board[template.format(derived)] = bounds[suffix]
                    order.append(template.format(derived))
                    derived_cols[derived][suffix] = template.format(derived)
    order += ["quantize (s)", "kernels", "status"]
    metric_titles = set(keys) | {c for cols in uncertainty.values() for c in cols.values()}
    shown = [c for c in order if not (c in metric_titles and board[c].isna().all())]
    board = board[shown]
    board.attrs["keys"] = {t: k for t, k in keys.items() if t in shown}
    # title -> {suffix: column}: the columns holding each shown metric's stderr / CI bounds
    board.attrs["uncertainty"] = {t: {s: c for s, c in cols.items() if c in shown}
                                  for t, cols in uncertainty.items() if t in shown}
    board.attrs["derived"] = {t: cols for t, cols in derived_cols.items() if t in shown}
    board.attrs["seeds"] = {t: cols for t, cols in seed_cols.items() if t in shown}
    board.attrs["interval_notes"] = list(dict.fromkeys(notes))
    board.attrs["intervals"] = {"count": intervals, "resamples": resamples, "seed": seed}
    board.attrs["diff_intervals"] = {t: v for t, v in diff_intervals.items() if t in shown}
    board.attrs["baseline"] = baseline
    return board


def against_title(title: str, baseline: str | None) -> str:
    """A derived column's title with the chosen baseline in place of fp16 ("ppl Δ vs affine:sym=true")."""
    if baseline is None:
        return title
    return title.replace("vs fp16", f"vs {baseline}") if "vs fp16" in title else f"{title} vs {baseline}"


def _plus_minus(value: float, low: float, high: float, signed: bool = True) -> str:
    """"+1.23 ± 0.45": the value and half the interval's width, to the interval's precision (a
    difference carries its sign; a recovery % or a ratio does not)."""
    half, sign = (high - low) / 2, "+" if signed else ""
    if half <= 0:
        return f"{value:{sign}.6g} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(half)))
    return f"{value:{sign}.{decimals}f} ± {half:.{decimals}f}"


def _objects(values: list, frame: pd.DataFrame) -> pd.Series:
    """A column of Python objects: a plain list would turn None into NaN, which prints as "nan"."""
    return pd.Series(values, dtype=object, index=frame.index)


def with_uncertainty_in_cells(board: pd.DataFrame) -> pd.DataFrame:
    """For reading: each value with its uncertainty in one cell ("0.652 ± 0.011", "1.52 [1.41, 1.63]"),
    each difference against the baseline as "Δ ± half-width" ("(n.s.)" when its interval contains no
    difference), each seed mean as "mean ± sd (n seeds)"; the separate columns dropped. Blank where
    nothing was measured."""
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
        shown[title] = _objects(cells, shown)
        drop.extend(cols.values())
    for title, cols in board.attrs.get("derived", {}).items():
        cells, signed = [], board.attrs.get("keys", {}).get(title, "").endswith(":diff")
        for i, value in enumerate(shown[title]):
            low, high = shown[cols[CI_LOW]].iloc[i], shown[cols[CI_HIGH]].iloc[i]
            if value is None or isinstance(value, str) or low is None:
                cells.append(value)
                continue
            cells.append(_plus_minus(float(value), float(low), float(high), signed)
                         + ("" if shown[cols[SIGNIFICANT]].iloc[i] else " (n.s.)"))
        shown[title] = _objects(cells, shown)
        drop.extend(cols.values())
    for title, cols in board.attrs.get("seeds", {}).items():
        mean_col = cols["mean"]
        shown[mean_col] = _objects([None if m is None else f"{m:.4g} ± {sd:.2g} ({int(n)} seeds)"
                                    for m, sd, n in zip(shown[mean_col], shown[cols["sd"]], shown[cols["n"]])], shown)
        drop.extend(c for k, c in cols.items() if k != "mean")
    return shown.drop(columns=drop)


def column_for(board: pd.DataFrame, key: str) -> str | None:
    """The title of the column showing metric ``key`` (``suite.metric`` or ``suite.metric:ratio``...)."""
    for title, k in board.attrs.get("keys", {}).items():
        if k == key:
            return title
    return None


def baseline_row(board: pd.DataFrame, model: str, baseline: str | None = None) -> dict | None:
    """The row differences are against: ``baseline``'s where one is chosen, else fp16/bf16/fp32."""
    for name in (baseline,) if baseline is not None else BASELINES:
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
            compare = claim.get("compare", "diff")
            delta = _against(base.get(title), mine.iloc[0][title], compare)
            if delta is None:
                continue
            holds = delta < claim["below"] if "below" in claim else delta > claim["above"]
            verdict, measured = ("holds" if holds else "does not hold"), f"{delta:+.3f}"
            derived = column_for(board, f"{claim['metric']}:{compare}")
            # the derived columns' intervals are against the fp16 row only when no other baseline was chosen
            cols = board.attrs.get("derived", {}).get(derived or "", {}) if not board.attrs.get("baseline") else {}
            low, high = (mine.iloc[0][cols[CI_LOW]], mine.iloc[0][cols[CI_HIGH]]) if cols else (None, None)
            if _present(low) and _present(high):  # the verdict of the whole interval, not of the point
                measured += f" [{low:+.3f}, {high:+.3f}]"
                inside = claim["below"] if "below" in claim else claim["above"]
                if low <= inside <= high:
                    verdict = "undecided (the 95% interval contains the threshold)"
            lines.append(f"claim '{claim['claim']}' for {method} on {model}: measured Δ {measured}: {verdict}")
    return list(dict.fromkeys(lines))


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))
