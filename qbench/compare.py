"""``qbench compare RUN_A RUN_B``: what changed between two runs, for regression tracking.

Cells are matched by method label × model × suite label (the last record of each cell in each
run). For matched cells: status changes, and every metric's value in A and B with the difference
(B − A) and the relative change. Cells present in only one run are listed, never dropped; cells
whose protocol (dataset, windows) differs are flagged, since their numbers are not comparable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qbench.params import QBenchError
from qbench.records import load_latest

Key = tuple[str, str, str]  # (model, method label, suite label)


def _cells(run_dir: Path) -> dict[Key, dict[str, Any]]:
    cells: dict[Key, dict[str, Any]] = {}
    for rec in load_latest(run_dir).values():
        key = (rec["model"]["name"], rec["method"].get("label", rec["method"]["name"]),
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


def compare_runs(run_a: Path, run_b: Path) -> dict[str, Any]:
    """The comparison as data: matched metric rows, status changes, protocol changes, unmatched cells."""
    a, b = _cells(run_a), _cells(run_b)
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
            rows.append({"model": model, "method": method, "suite": suite, "metric": name, "unit": unit,
                         "a": va, "b": vb, "delta": delta, "delta_pct": rel})
    only = lambda x, y: [{"model": k[0], "method": k[1], "suite": k[2], "status": x[k]["status"]}  # noqa: E731
                         for k in sorted(set(x) - set(y))]
    return {"a": str(run_a), "b": str(run_b), "matched": len(set(a) & set(b)), "metrics": rows,
            "status_changes": status_changes, "protocol_changes": protocol_changes,
            "only_in_a": only(a, b), "only_in_b": only(b, a)}


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


def render_comparison(run_a: Path, run_b: Path, fmt: str = "md", changed_only: bool = False) -> str:
    result = compare_runs(run_a, run_b)
    if changed_only:
        result["metrics"] = [r for r in result["metrics"] if r["delta"] != 0]
    if fmt == "json":
        return json.dumps(result, indent=1) + "\n"
    if fmt != "md":
        raise QBenchError(f"unknown format {fmt!r}; valid formats: md, json")
    out = [f"# qbench compare\n\nA: `{result['a']}`  \nB: `{result['b']}`  \n"
           f"{result['matched']} cells in both runs, {len(result['only_in_a'])} only in A, "
           f"{len(result['only_in_b'])} only in B.\n"]
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
            ["model", "method", "suite", "metric", "A", "B", "Δ", "Δ %"],
            [[r["model"], r["method"], r["suite"], r["metric"] + (f" ({r['unit']})" if r["unit"] else ""),
              _fmt(r["a"]), _fmt(r["b"]), "0" if r["delta"] == 0 else _fmt(r["delta"]), _fmt(r["delta_pct"], True)]
             for r in result["metrics"]]) + "\n")
    for side, name in (("only_in_a", "A"), ("only_in_b", "B")):
        if result[side]:
            out.append(f"## Only in {name}\n\n" + _md_table(
                ["model", "method", "suite", "status"],
                [[r["model"], r["method"], r["suite"], r["status"]] for r in result[side]]) + "\n")
    return "\n".join(out)
