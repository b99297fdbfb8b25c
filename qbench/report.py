"""``qbench report``: a run's leaderboard (:mod:`qbench.leaderboard`) as markdown, csv, json or html,
with the context that says what produced it (commands, protocols, device, versions, notes) and
the notes' claims the run measured."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

from qbench.leaderboard import claim_lines, leaderboard, load_frame, with_uncertainty_in_cells
from qbench.paired import BOOTSTRAP_SEED, RESAMPLES, describe_method
from qbench.params import QBenchError
from qbench.records import read_run_json


def context_lines(frame: pd.DataFrame, run_dir: Path) -> list[str]:
    lines = []
    run = read_run_json(Path(run_dir), for_report=True)  # optional: the records suffice
    if run:
        commands = []  # every distinct invocation that added cells to this run directory
        for invocation in run.get("invocations") or []:
            command = " ".join(invocation["argv"])
            if command not in commands:
                commands.append(command)
        lines.extend(f"command: `{command}`" for command in commands)
    protocols = frame.dropna(subset=["protocol"]).groupby("suite", sort=False)["protocol"]
    for suite, values in protocols:
        lines.append(f"{suite} protocol: " + ", ".join(sorted(set(values))))
    devices = sorted({d for d in frame["device"].dropna()})
    if devices:
        lines.append("device: " + ", ".join(devices))
    lines.extend(version_lines(frame))
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


def _versions(env: dict) -> str:
    git = env.get("git") or {}
    commit = git.get("commit")
    return (f"python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}; qbench commit {commit[:10] if commit else 'unknown'}"
            + (" (dirty)" if git.get("dirty") else ""))


def version_lines(frame: pd.DataFrame) -> list[str]:
    """One ``versions:`` line when every record was made by the same code and libraries; else one a
    set, naming its rows (a run resumed over days mixes commits, and the table must say so)."""
    if "env" not in frame:
        return []
    rows: dict[str, list[str]] = {}
    for env, method in zip(frame["env"], frame["method"]):
        if isinstance(env, dict):
            methods = rows.setdefault(_versions(env), [])
            if method not in methods:
                methods.append(method)
    if len(rows) == 1:
        return [f"versions: {next(iter(rows))}"]
    return [f"versions ({', '.join(methods)}): {text}" for text, methods in rows.items()]


def interval_lines(board: pd.DataFrame) -> list[str]:
    """What the intervals on the differences are (method, resamples, seed), what '± over seeds' is,
    and why a difference has no interval where it has none."""
    lines = []
    if board.attrs.get("baseline"):
        lines.append(f"differences against: {board.attrs['baseline']} (the notes' claims stay against fp16)")
    if board.attrs.get("derived"):
        info = board.attrs["intervals"]
        lines.append(describe_method(info["resamples"], info["seed"]))
    if board.attrs.get("seeds"):
        lines.append("'over seeds': mean ± sample standard deviation over the rows that differ only in the "
                     "method's seed (each row keeps its single-seed value; csv/json also have min and max)")
    lines.extend(board.attrs.get("interval_notes", []))
    return lines


def render(run_dir: Path, fmt: str, columns: str = "headline", resamples: int = RESAMPLES,
           seed: int = BOOTSTRAP_SEED, baseline: str | None = None) -> str:
    """The leaderboard of ``run_dir`` in ``fmt`` (md, csv, json, html); ``columns="all"`` adds every
    titled metric, not only the headline ones; ``resamples`` and ``seed`` drive the bootstrap
    intervals of the differences; ``baseline`` a method label to take the differences against
    instead of the run's fp16/bf16/fp32 row."""
    frame = load_frame(run_dir)
    board = leaderboard(frame, columns, resamples=resamples, seed=seed, baseline=baseline)
    context = context_lines(frame, run_dir) + interval_lines(board)
    claims = claim_lines(frame, board)
    if fmt == "csv":
        # Context as leading comment lines: pandas.read_csv(path, comment="#") skips them; text fields
        # are quoted so that a "#" inside one is not taken for a comment.
        header = "".join(f"# {line}\n" for line in context + [f"claim: {c}" for c in claims])
        return header + board.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    if fmt == "json":
        return json.dumps({"leaderboard": json.loads(board.to_json(orient="records")),
                           "context": context, "claims": claims}, indent=1)
    if fmt == "md":
        shown = with_uncertainty_in_cells(board)  # "0.652 ± 0.011"; a value not measured is blank, not "nan"
        table = shown.to_markdown(index=False, floatfmt="g", missingval="")
        text = table + "\n\n" + "\n".join(f"- {line}" for line in context) + "\n"
        if claims:
            text += "\nThe notes' claims, as measured here:\n\n" + "\n".join(f"- {c}" for c in claims) + "\n"
        return text
    if fmt == "html":
        from qbench.report_html import render_html

        return render_html(frame, board, context, claims)
    raise QBenchError(f"unknown format {fmt!r}; valid formats: md, csv, json, html")
