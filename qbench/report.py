"""Leaderboards from records: pandas reads ``records.jsonl`` and writes markdown, csv, json or html.

One row per model × method; metric columns from every suite; deltas against the FP16 baseline of
the same model in the same run (ppl Δ, memory ratio, speed-up). Error and skipped cells are
shown as such, never dropped.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from qbench.params import QBenchError
from qbench.records import RECORDS, latest_records

BASELINES = ("fp16", "bf16", "fp32")

# (suite, metric) -> column title, in leaderboard order
COLUMNS = [
    ("memory", "bits_per_weight", "bits/weight"),
    ("memory", "bytes_per_weight", "bytes/weight"),
    ("memory", "seed_claim_bytes_per_param", "notes' bytes/param"),
    ("memory", "quantized_layer_bytes", "quantized layers (MiB)"),
    ("memory", "resident_layer_bytes", "resident layers (MiB)"),
    ("memory", "model_bytes", "model (MiB)"),
    ("memory", "peak_memory", "peak mem (MiB)"),
    ("memory", "peak_activation_memory", "forward peak Δ (MiB)"),
    ("perplexity", "ppl", "ppl"),
    ("latency", "prefill_ms_b1", "prefill b1 (ms)"),
    ("latency", "decode_tok_s_b1", "decode b1 (tok/s)"),
    ("fidelity", "kl_mean", "KL mean"),
    ("fidelity", "kl_p99", "KL p99"),
    ("fidelity", "top1_agreement", "top-1 agree"),
]
# columns shown only when the run measured them (older tables keep their shape)
OPTIONAL_COLUMNS = {"KL mean", "KL p99", "top-1 agree", "forward peak Δ (MiB)", "resident layers (MiB)"}
MIB_METRICS = {"quantized_layer_bytes", "resident_layer_bytes", "model_bytes", "peak_memory", "peak_activation_memory"}


def load_frame(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        raise QBenchError(f"no {RECORDS} in {run_dir}; pass the --out directory of a qbench run")
    records = list(latest_records(path).values())
    if not records:
        raise QBenchError(f"{path} has no complete records yet")
    rows = []
    for rec in records:
        row = {
            "model": rec["model"]["name"],
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
            "env": rec.get("env"),
            "kernel_paths": ",".join(rec.get("kernel_paths") or []),
            "finished_at": rec.get("finished_at"),
        }
        for name, metric in (rec.get("metrics") or {}).items():
            row[f"{rec['suite']['name']}.{name}"] = metric.get("value") if isinstance(metric, dict) else metric
        rows.append(row)
    return pd.DataFrame(rows)


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model × method with the headline metrics and deltas against FP16."""
    out_rows = []
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "method": method}
        for suite, metric, title in COLUMNS:
            col = f"{suite}.{metric}"
            values = group[col].dropna() if col in group else pd.Series(dtype=float)
            value = values.iloc[-1] if len(values) else None
            if value is not None and metric in MIB_METRICS:
                value = round(float(value) / 2**20, 2)
            row[title] = value
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
    deltas = {"ppl Δ vs fp16": [], "memory vs fp16": [], "decode speed-up": []}
    for r in board.to_dict("records"):
        base = _baseline_row(board, r["model"])
        deltas["ppl Δ vs fp16"].append(_delta(base, r, "ppl", lambda a, b: round(b - a, 4)))
        deltas["memory vs fp16"].append(_delta(base, r, "quantized layers (MiB)", lambda a, b: round(b / a, 4) if a else None))
        deltas["decode speed-up"].append(_delta(base, r, "decode b1 (tok/s)", lambda a, b: round(b / a, 3) if a else None))
    for name, values in deltas.items():
        board[name] = values
    order = ["model", "method", "bits/weight", "bytes/weight", "notes' bytes/param", "quantized layers (MiB)", "memory vs fp16",
             "resident layers (MiB)", "model (MiB)",
             "peak mem (MiB)", "forward peak Δ (MiB)", "ppl", "ppl Δ vs fp16", "KL mean", "KL p99", "top-1 agree", "prefill b1 (ms)",
             "decode b1 (tok/s)", "decode speed-up", "quantize (s)", "kernels", "status"]
    shown = [c for c in order if c in board.columns and not (c in OPTIONAL_COLUMNS and board[c].isna().all())]
    return board[shown]


def _baseline_row(board: pd.DataFrame, model: str) -> dict | None:
    for name in BASELINES:
        match = board[(board["model"] == model) & (board["method"] == name)]
        if len(match):
            return match.iloc[0].to_dict()
    return None


def _delta(base, row, column, fn):
    if base is None:
        return None
    a, b = base.get(column), row.get(column)
    if a is None or b is None or pd.isna(a) or pd.isna(b):
        return None
    return fn(float(a), float(b))


def context_lines(frame: pd.DataFrame, run_dir: Path) -> list[str]:
    lines = []
    run_json = Path(run_dir) / "run.json"
    if run_json.is_file():
        run = json.loads(run_json.read_text())
        commands = []  # every distinct invocation that added cells to this run directory
        for invocation in run.get("invocations") or []:
            command = " ".join(invocation["argv"])
            if command not in commands:
                commands.append(command)
        lines.extend(f"command: `{command}`" for command in commands)
    protocols = sorted({p for p in frame["protocol"].dropna()})
    if protocols:
        lines.append("perplexity protocol: " + ", ".join(protocols))
    devices = sorted({d for d in frame["device"].dropna()})
    if devices:
        lines.append("device: " + ", ".join(devices))
    envs = frame["env"].dropna().tolist() if "env" in frame else []
    if envs:
        e = envs[-1]
        commit = (e.get("git") or {}).get("commit")
        lines.append(f"versions: python {e.get('python')}, torch {e.get('torch')}, triton {e.get('triton')}, "
                     f"transformers {e.get('transformers')}; qbench commit {commit[:10] if commit else 'unknown'}"
                     + (" (dirty)" if (e.get("git") or {}).get("dirty") else ""))
    finished = sorted(frame["finished_at"].dropna()) if "finished_at" in frame else []
    if finished:
        lines.append(f"recorded: {finished[0]} to {finished[-1]}")
    dtypes = sorted({d for d in frame["dtype"].dropna()})
    if dtypes:
        lines.append("compute dtype: " + ", ".join(dtypes))
    notes = []
    for values in frame["notes"]:
        for n in values or []:
            if n not in notes:
                notes.append(n)
    lines.extend(f"note: {n}" for n in notes)
    return lines


def claim_lines(board: pd.DataFrame) -> list[str]:
    """Verdicts on the notes' (shared/seeds) claims that this run measured."""
    lines = []
    for r in board.to_dict("records"):
        measured, claim = r.get("bytes/weight"), r.get("notes' bytes/param")
        if _present(measured) and _present(claim):
            off = 100 * (measured / claim - 1)
            verdict = "holds" if abs(off) <= 15 else "does not hold"
            lines.append(f"claim '{claim:g} bytes per parameter' for {r['method']} on {r['model']}: measured "
                         f"{measured:.4g} bytes/weight in the quantized layers ({off:+.1f}%): {verdict} (within 15%)")
        delta = r.get("ppl Δ vs fp16")
        if str(r["method"]).startswith("gptq") and _present(delta):
            verdict = "holds" if delta < 0.1 else "does not hold"
            lines.append(f"claim 'GPTQ loses <0.1 perplexity' for {r['method']} on {r['model']}: "
                         f"measured Δ {delta:+.3f}: {verdict}")
    return lines


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and pd.isna(v))


def render(run_dir: Path, fmt: str) -> str:
    frame = load_frame(run_dir)
    board = leaderboard(frame)
    if fmt == "csv":
        return board.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"leaderboard": json.loads(board.to_json(orient="records")),
                           "context": context_lines(frame, run_dir)}, indent=1)
    if fmt == "md":
        shown = board.astype(object).where(board.notna(), None)  # a value not measured is blank, not "nan"
        table = shown.to_markdown(index=False, floatfmt="g", missingval="")
        claims = claim_lines(board)
        text = table + "\n\n" + "\n".join(f"- {line}" for line in context_lines(frame, run_dir)) + "\n"
        if claims:
            text += "\nThe notes' claims, as measured here:\n\n" + "\n".join(f"- {c}" for c in claims) + "\n"
        return text
    if fmt == "html":
        from qbench.report_html import render_html

        return render_html(frame, board, context_lines(frame, run_dir))
    raise QBenchError(f"unknown format {fmt!r}; valid formats: md, csv, json, html")
