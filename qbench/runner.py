"""The comparison matrix: methods × models × suites → cells → executor → records.jsonl.

Everything is validated before the first cell starts; cells already recorded ``ok`` are skipped,
so rerunning the same command after a kill finishes the run with every cell recorded once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbench import host
from qbench.params import QBenchError, Spec
from qbench.records import RECORDS, append_record, cell_id, environment, latest_records, repair_torn_tail
from qbench.seeds import expand_seed_sweeps

DEFAULT_METHODS = "fp16,int8-absmax,affine:bits=4,group_size=128,nf4"
DEFAULT_SUITES = "memory,latency,perplexity"
DEFAULT_CPU_LIMIT = 4  # perplexity windows on CPU unless --limit says otherwise


@dataclass
class RunConfig:
    methods: list[Spec]
    models: list[str]
    suites: list[Spec]
    dataset: str = "wikitext2"
    data_dir: str | None = None
    out: Path = Path("results/runs/default")
    limit: int | None = None  # None = all windows
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    calibration: str = "c4"
    executor: str = "local"
    trust_remote_code: bool = False
    use_cache: bool = True
    threads: int | None = None
    notes: list[str] = field(default_factory=list)


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".qbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise QBenchError(f"output directory {out} is not writable ({exc.strerror or exc}); pass --out DIR") from None


def check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QBenchError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return
    raise QBenchError(f"--device {device!r} is not supported; use cpu or cuda[:N]")


def plan(config: RunConfig) -> list[dict[str, Any]]:
    """Validate everything and expand the matrix. Raises QBenchError before any cell runs."""
    from qbench.data import check_dataset_name, encode, load_text
    from qbench.models import load_tokenizer, resolve_model

    if not config.methods:
        raise QBenchError("no methods given; e.g. --methods fp16,nf4")
    if not config.suites:
        raise QBenchError("no suites given; e.g. --suites memory,perplexity")
    if config.dtype not in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
        raise QBenchError(f"--dtype {config.dtype!r} is not valid; valid: auto, float32, float16, bfloat16")
    check_device(config.device)
    methods = [host.make_method(s.name, s.params) for s in expand_seed_sweeps(config.methods)]
    suites = [host.make_suite(s.name, s.params) for s in config.suites]
    if not config.models:
        raise QBenchError("no models given; e.g. --models smollm2-135m")
    for model in config.models:
        resolve_model(model)  # fails early: missing package, directory without weights...
    models = config.models
    check_dataset_name(config.dataset)  # a typo fails even where no suite reads the text
    if any(s.needs_dataset for s in suites):  # memory/latency-only runs need no evaluation text (nor `datasets`)
        source = load_text(config.dataset, data_dir=config.data_dir)  # fails early, saying where it looked
        checks = [s for s in suites if s.needs_dataset]
        for model in models if checks else []:
            tokenizer, max_length = load_tokenizer(model, config.trust_remote_code)
            tokens = encode(tokenizer, source.text()).numel()
            for suite in checks:
                problem = suite.check_dataset(source, tokens, max_length)
                if problem:
                    raise QBenchError(problem)
    if any(getattr(m, "needs_calibration", False) for m in methods):
        load_text(config.calibration, data_dir=config.data_dir)
    executors = host.executors()
    if config.executor not in executors:
        raise QBenchError(f"unknown executor {config.executor!r}; valid executors: {', '.join(sorted(executors))}")
    executors[config.executor].check_available()
    check_output_dir(config.out)

    cells = []
    for model in models:
        for method in methods:
            for suite in suites:
                cell = {
                    "method": method.describe(),
                    "model": model,
                    "suite": suite.describe(),
                    "dataset": config.dataset if suite.needs_dataset else None,
                    "limit": config.limit if suite.needs_dataset else None,
                    "device": config.device,
                    "dtype": config.dtype,
                    "seed": config.seed,
                    "calibration": config.calibration if getattr(method, "needs_calibration", False) else None,
                }
                cell["id"] = cell_id(cell)
                cell.update({"out": str(config.out), "data_dir": config.data_dir, "trust_remote_code": config.trust_remote_code,
                             "use_cache": config.use_cache, "threads": config.threads})
                cells.append(cell)
    seen = set()
    unique = [c for c in cells if not (c["id"] in seen or seen.add(c["id"]))]
    return unique


def _write_run_json(config: RunConfig, cells: list[dict], argv: list[str]) -> None:
    path = config.out / "run.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    invocations = previous.get("invocations", [])
    invocations.append({"argv": argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    run = {
        "methods": [str(s) for s in config.methods],
        "models": config.models,
        "suites": [str(s) for s in config.suites],
        "dataset": config.dataset,
        "calibration": config.calibration,
        "limit": config.limit,
        "device": config.device,
        "dtype": config.dtype,
        "seed": config.seed,
        "executor": config.executor,
        "cells": [c["id"] for c in cells],
        "notes": config.notes,
        "invocations": invocations,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, path)


def cell_label(cell: dict) -> str:
    return f"{cell['method']['label']} × {cell['model']} × {cell['suite']['label']}"


class Progress:
    """rich progress on a terminal; plain lines otherwise."""

    def __init__(self, total: int, done: int, parallel: bool = False):
        self.total, self.done = total, done
        self.parallel = parallel  # cells start before earlier ones finish: no index on start lines
        self.started = time.monotonic()
        self.finished_here = 0
        self.rich = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn())
            self.rich.start()
            self.task = self.rich.add_task("cells", total=total, completed=done)

    def start(self, cell: dict) -> None:
        if self.rich:
            self.rich.update(self.task, description=cell_label(cell))
        else:
            where = "[started]" if self.parallel else f"[{self.done + 1}/{self.total}]"
            print(f"{where} {cell_label(cell)} ...", flush=True)

    def finish(self, cell: dict, record: dict) -> None:
        self.done += 1
        self.finished_here += 1
        status = record["status"] + (f": {record.get('message')}" if record["status"] != "ok" else "")
        line = f"[{self.done}/{self.total}] {cell_label(cell)}: {status} ({record['duration_s']:.1f} s)"
        if self.rich:
            self.rich.console.print(line)
            self.rich.update(self.task, completed=self.done)
        else:
            remaining = self.total - self.done
            per = (time.monotonic() - self.started) / max(1, self.finished_here)
            print(line + (f", ETA {per * remaining / 60:.1f} min" if remaining else ""), flush=True)

    def close(self) -> None:
        if self.rich:
            self.rich.stop()


def execute(config: RunConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the matrix. Returns a summary: cells, skipped (already done), failed cell labels."""
    cells = plan(config)
    records_path = config.out / RECORDS
    repair_torn_tail(records_path)
    done = {cid for cid, rec in latest_records(records_path).items() if rec.get("status") in ("ok", "skipped")}
    todo = [c for c in cells if c["id"] not in done]
    log_dir = config.out / "logs"
    executor = host.executors()[config.executor](log_dir=log_dir)
    _write_run_json(config, cells, argv or [])
    log_dir.mkdir(exist_ok=True)
    env = environment(config.device)
    progress = Progress(len(cells), len(cells) - len(todo), parallel=executor.parallel)
    failed: list[str] = []
    starts: dict[str, float] = {}

    def on_start(cell):
        starts[cell["id"]] = time.monotonic()
        progress.start(cell)

    def on_result(cell, result):
        record = make_record(cell, result, env, time.monotonic() - starts.get(cell["id"], time.monotonic()))
        append_record(records_path, record)
        if record["status"] == "error":
            failed.append(f"{cell_label(cell)} ({record.get('message')})")
        progress.finish(cell, record)

    try:
        executor.run(todo, on_start, on_result)
    finally:
        progress.close()
    return {"cells": len(cells), "already_done": len(cells) - len(todo), "ran": len(todo), "failed": failed,
            "records": str(records_path)}


def make_record(cell: dict, result: dict, env: dict, duration: float) -> dict[str, Any]:
    dataset = None
    if cell.get("dataset"):
        dataset = {"name": cell["dataset"], **(result.get("dataset") or {})}
        if result.get("protocol"):
            dataset["protocol"] = result["protocol"]
    record = {
        "cell": cell["id"],
        "status": result.get("status", "error"),
        "method": cell["method"],
        "model": {"name": cell["model"], **{k: v for k, v in (result.get("model_info") or {}).items() if k != "name"}},
        "suite": cell["suite"],
        "dataset": dataset,
        "limit": cell.get("limit"),
        "device": cell["device"],
        "dtype": {"requested": cell["dtype"], "computed": result.get("dtype")},
        "seed": cell["seed"],
        "calibration": cell.get("calibration"),
        "metrics": result.get("metrics", {}),
        "extra": result.get("extra", {}),
        "quantization": result.get("quantization"),
        "method_report": result.get("method_report"),
        "kernel_paths": result.get("kernel_paths"),
        "notes": result.get("notes", []),
        "claims": result.get("claims", []),
        "baseline_claims": result.get("baseline_claims", []),
        "timings": result.get("timings", {}),
        "duration_s": round(duration, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": dict(result.get("env") or env),  # a remote executor reports the worker's environment
    }
    if result.get("torch_threads"):  # what the cell process used (--threads), not the driver's default
        record["env"]["torch_threads"] = result["torch_threads"]
    if record["status"] != "ok":
        record["message"] = result.get("message", "unknown error")
        if result.get("traceback"):
            record["traceback"] = result["traceback"]
    return record
