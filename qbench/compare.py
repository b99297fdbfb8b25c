"""``qbench compare RUN_A RUN_B``: what changed between two runs, for regression tracking — and
``qbench compare RUN --methods A,B``: one method against another within a run.

Cells are matched by method label (by today's defaults, as the leaderboard shows it) × model ×
suite label (the last record of each cell in each run; with ``--methods``, method A's cell against
method B's of the same model and suite). For
matched cells: status changes, and every metric's value in A and B with the difference (B − A), the
relative change, a 95% interval of the difference and a verdict — B *better*, *worse* or
*indistinguishable* (the interval contains 0), by the metric's direction. The interval is a paired
bootstrap over windows (items) where both records keep per-window samples of the same windows
(:mod:`qbench.paired`), a normal interval from both standard errors where they only carry those;
metrics with neither get no interval and no verdict. Cells present in only one run are listed, never
dropped; cells whose protocol (dataset, windows) differs are flagged, since their numbers are not
comparable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qbench.paired import (
    BOOTSTRAP_SEED,
    RESAMPLES,
    Interval,
    PairingError,
    SampleSet,
    describe_method,
    normal_interval,
    paired_bootstrap,
)
from qbench.params import QBenchError
from qbench.records import load_latest
from qbench.suite import MetricSpec

Key = tuple[str, str, str]  # (model, method label, suite label)


def _cells(run_dir: Path) -> dict[Key, dict[str, Any]]:
    from qbench import host

    cells: dict[Key, dict[str, Any]] = {}
    for rec in load_latest(run_dir).values():
        # the label by today's defaults: a run made before a default changed pairs by what ran
        key = (rec["model"]["name"], host.current_label(rec["method"]),
               rec["suite"].get("label", rec["suite"]["name"]))
        # Two records of the same labels (e.g. other --limit) — keep the later one.
        if key not in cells or str(rec.get("finished_at", "")) >= str(cells[key].get("finished_at", "")):
            cells[key] = rec
    return cells


def _number(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(v)


def _protocol(rec: dict) -> str | None:
    return (rec.get("dataset") or {}).get("protocol")


def _spec(rec: dict, name: str) -> MetricSpec | None:
    metric = (rec.get("metrics") or {}).get(name)
    if isinstance(metric, dict) and metric.get("title"):
        return MetricSpec.from_json(metric)
    from qbench import host

    suite = host.suites().get(rec["suite"]["name"])
    return suite.metric_spec(name) if suite is not None else None


def _samples(rec: dict, spec: MetricSpec | None) -> SampleSet | None:
    if spec is None or not spec.samples:
        return None
    data = ((rec.get("extra") or {}).get("samples") or {}).get(spec.samples)
    return SampleSet.from_json(data) if data else None


def _stderr(metric: Any) -> float | None:
    return _number(metric.get("stderr")) if isinstance(metric, dict) else None


def metric_interval(ra: dict, rb: dict, name: str, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[Interval | None, str | None]:
    """The 95% interval of metric ``name`` in ``rb`` minus in ``ra``: paired bootstrap over the windows
    both keep samples of, else normal from both stderrs. (None, why) when there is none."""
    spec = _spec(rb, name) or _spec(ra, name)
    sa, sb = _samples(ra, spec), _samples(rb, spec)
    if sa is not None and sb is not None:
        try:
            return paired_bootstrap(sb, sa, spec.statistic, "diff", resamples, seed, what_a="B", what_b="A"), None
        except PairingError as exc:
            return None, str(exc)
    ma, mb = (ra.get("metrics") or {}).get(name), (rb.get("metrics") or {}).get(name)
    va, vb, ea, eb = _number(ma), _number(mb), _stderr(ma), _stderr(mb)
    if None not in (va, vb, ea, eb):
        return normal_interval(vb, va, eb, ea), None
    return None, None


def verdict(interval: Interval | None, higher_is_better: bool | None) -> str | None:
    """B against A: better / worse by the metric's direction when the interval excludes 0,
    indistinguishable when it contains 0 (different, for a metric without a direction)."""
    if interval is None or interval.low != interval.low:  # no interval, or NaN bounds
        return None
    if not interval.significant:
        return "indistinguishable"
    if higher_is_better is None:
        return "different"
    return "better" if (interval.value > 0) == higher_is_better else "worse"


def _compare_cells(a: dict[Key, dict], b: dict[Key, dict], resamples: int, seed: int) -> dict[str, Any]:
    rows, status_changes, protocol_changes = [], [], []
    for key in sorted(set(a) & set(b)):
        ra, rb = a[key], b[key]
        model, method, suite = key
        if ra["status"] != rb["status"]:
            status_changes.append({"model": model, "method": method, "suite": suite, "a": ra["status"],
                                   "b": rb["status"], "message": rb.get("message") or ra.get("message") or ""})
        if _protocol(ra) != _protocol(rb):
            protocol_changes.append({"model": model, "method": method, "suite": suite,
                                     "a": _protocol(ra), "b": _protocol(rb)})
        ma, mb = ra.get("metrics") or {}, rb.get("metrics") or {}
        for name in sorted(set(ma) | set(mb)):
            va, vb = _number(ma.get(name)), _number(mb.get(name))
            if va is None and vb is None:
                continue
            source = mb.get(name) if isinstance(mb.get(name), dict) else ma.get(name)
            unit = source.get("unit", "") if isinstance(source, dict) else ""
            delta = None if va is None or vb is None else vb - va
            rel = None if delta is None or va == 0 else 100 * delta / abs(va)
            interval, why = (None, None) if delta is None else metric_interval(ra, rb, name, resamples, seed)
            spec = _spec(rb, name) or _spec(ra, name)
            rows.append({"model": model, "method": method, "suite": suite, "metric": name, "unit": unit,
                         "a": va, "b": vb, "delta": delta, "delta_pct": rel,
                         "ci_low": None if interval is None else interval.low,
                         "ci_high": None if interval is None else interval.high,
                         "interval": None if interval is None else interval.method,
                         "verdict": verdict(interval, spec.higher_is_better if spec else None),
                         **({"no_interval": why} if why else {})})
    return {"metrics": rows, "status_changes": status_changes, "protocol_changes": protocol_changes}


def _only(x: dict[Key, dict], y: dict[Key, dict]) -> list[dict]:
    return [{"model": k[0], "method": k[1], "suite": k[2], "status": x[k]["status"]} for k in sorted(set(x) - set(y))]


def compare_runs(run_a: Path, run_b: Path, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """The comparison as data: matched metric rows (with interval and verdict), status changes,
    protocol changes, unmatched cells."""
    a, b = _cells(run_a), _cells(run_b)
    return {"a": str(run_a), "b": str(run_b), "matched": len(set(a) & set(b)),
            **_compare_cells(a, b, resamples, seed), "only_in_a": _only(a, b), "only_in_b": _only(b, a),
            "resamples": resamples, "seed": seed}


def method_labels(texts: str) -> list[str]:
    """The labels of ``--methods`` (the run's own spelling: ``affine:bits=4,group_size=128,gptq``).
    A method not installed here (a peer recorded from its own venv) is taken as written: its
    records are found by their recorded label."""
    from qbench import host
    from qbench.params import parse_specs

    def as_written(spec) -> str:
        params = ",".join(f"{k}={v}" for k, v in spec.params.items())
        return f"{spec.name}:{params}" if params else spec.name

    installed = host.methods()
    return [host.make_method(spec.name, spec.params).label if spec.name in installed else as_written(spec)
            for spec in parse_specs(texts)]


def _method_values(label: str) -> tuple[str, dict[str, Any]] | None:
    """(name, every parameter value as a record writes it) of the method a label names, or None."""
    from qbench import host
    from qbench.params import parse_specs

    try:
        [spec] = parse_specs(label)
        method = host.make_method(spec.name, spec.params)
    except (QBenchError, ValueError):
        return None
    return method.name, json.loads(json.dumps(method.values, default=str))


def _same_method(label: str, wanted: tuple[str, dict[str, Any]] | None, rec: dict[str, Any]) -> bool:
    """By name + parameter values where both are known: a label omits defaults, and defaults change,
    so the same label may name other values in an older record. By label only otherwise. A record
    made before a parameter existed is compared on the parameters it has."""
    params = rec["method"].get("params")
    if wanted is None or not isinstance(params, dict):
        return rec["method"].get("label") == label
    name, values = wanted
    return rec["method"]["name"] == name and set(params) <= set(values) \
        and all(values[k] == v for k, v in params.items())


def compare_methods(run: Path, method_a: str, method_b: str, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Method B against method A within one run: each model × suite both ran, metric by metric."""
    cells = _cells(run)

    def pick(label: str) -> dict[Key, dict[str, Any]]:
        wanted = _method_values(label)  # resolved once per label, not per record
        return {(k[0], f"{method_b} vs {method_a}", k[2]): rec for k, rec in cells.items()
                if _same_method(label, wanted, rec)}

    a, b = pick(method_a), pick(method_b)
    for label, side in ((method_a, a), (method_b, b)):
        if not side:
            have = sorted({k[1] for k in cells})
            raise QBenchError(f"method {label!r} has no cells in {run}; its methods: {', '.join(have)}")
    return {"a": f"{run} {method_a}", "b": f"{run} {method_b}", "matched": len(set(a) & set(b)),
            **_compare_cells(a, b, resamples, seed), "only_in_a": _only(a, b), "only_in_b": _only(b, a),
            "resamples": resamples, "seed": seed}


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "—"
    if pct:
        return f"{v:+.2f}%"
    return f"{v:.6g}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _interval_text(r: dict) -> str:
    if r["ci_low"] is None:
        return "—"
    return f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"


def render_comparison(run_a: Path, run_b: Path | None = None, fmt: str = "md", changed_only: bool = False,
                      methods: list[str] | None = None, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> str:
    """Two runs (``run_b``), or two methods of one run (``methods=[A, B]``), as markdown or JSON."""
    if methods:
        if run_b is not None:
            raise QBenchError("give either two run directories or one with --methods A,B, not both")
        if len(methods) != 2:
            raise QBenchError(f"--methods takes two methods to compare (A,B), got {len(methods)}")
        result = compare_methods(run_a, methods[0], methods[1], resamples, seed)
    elif run_b is None:
        raise QBenchError("compare needs two run directories, or one with --methods A,B")
    else:
        result = compare_runs(run_a, run_b, resamples, seed)
    if changed_only:
        result["metrics"] = [r for r in result["metrics"] if r["delta"] != 0]
    if fmt == "json":
        return json.dumps(result, indent=1) + "\n"
    if fmt != "md":
        raise QBenchError(f"unknown format {fmt!r}; valid formats: md, json")
    out = [f"# qbench compare\n\nA: `{result['a']}`  \nB: `{result['b']}`  \n"
           f"{result['matched']} cells in both {'methods' if methods else 'runs'}, "
           f"{len(result['only_in_a'])} only in A, "
           f"{len(result['only_in_b'])} only in B.\n"]
    verdicts = [r["verdict"] for r in result["metrics"] if r["verdict"]]
    if verdicts:
        counts = ", ".join(f"{v} {verdicts.count(v)}" for v in ("better", "worse", "indistinguishable", "different")
                           if v in verdicts)
        out.append(f"B against A, over the metrics with an interval: {counts}.  \n"
                   + describe_method(result["resamples"], result["seed"]).replace("intervals:", "Intervals:", 1)
                   + ". Metrics without per-window samples or standard errors get no interval (—).\n")
    if result["status_changes"]:
        out.append("## Status changes\n\n" + _md_table(
            ["model", "method", "suite", "A", "B", "message"],
            [[r["model"], r["method"], r["suite"], r["a"], r["b"], r["message"]]
             for r in result["status_changes"]]) + "\n")
    if result["protocol_changes"]:
        out.append("## Protocol changes (numbers not comparable)\n\n" + _md_table(
            ["model", "method", "suite", "A", "B"],
            [[r["model"], r["method"], r["suite"], r["a"] or "—", r["b"] or "—"]
             for r in result["protocol_changes"]]) + "\n")
    if result["metrics"]:
        out.append("## Metrics (Δ = B − A)\n\n" + _md_table(
            ["model", "method", "suite", "metric", "A", "B", "Δ", "Δ %", "95% interval of Δ", "B vs A"],
            [[r["model"], r["method"], r["suite"], r["metric"] + (f" ({r['unit']})" if r["unit"] else ""),
              _fmt(r["a"]), _fmt(r["b"]), "0" if r["delta"] == 0 else _fmt(r["delta"]), _fmt(r["delta_pct"], True),
              _interval_text(r), r["verdict"] or "—"]
             for r in result["metrics"]]) + "\n")
        missing = [f"{r['method']} {r['suite']} {r['metric']}: {r['no_interval']}" for r in result["metrics"]
                   if r.get("no_interval")]
        if missing:
            out.append("No interval:\n\n" + "\n".join(f"- {m}" for m in missing) + "\n")
    for side, name in (("only_in_a", "A"), ("only_in_b", "B")):
        if result[side]:
            out.append(f"## Only in {name}\n\n" + _md_table(
                ["model", "method", "suite", "status"],
                [[r["model"], r["method"], r["suite"], r["status"]] for r in result[side]]) + "\n")
    return "\n".join(out)
