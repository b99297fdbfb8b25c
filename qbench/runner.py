"""The comparison matrix: methods × models × suites → cells → executor → records.jsonl.

Everything is validated before the first cell starts; cells already recorded ``ok`` are skipped,
so rerunning the same command after a kill finishes the run with every cell recorded once.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qbench import host
from qbench.durable import write_atomic, write_error
from qbench.lock import hold_run_dir
from qbench.params import QBenchError, Spec
from qbench.records import (
    RECORDS,
    RUN_JSON,
    append_record,
    cell_id,
    environment,
    latest_records,
    malformed_warning,
    read_run_json,
    repair_torn_tail,
    warn,
)
from qbench.seeds import expand_seed_sweeps

DEFAULT_METHODS = "fp16,int8-absmax,affine:bits=4,group_size=128,nf4"
DEFAULT_SUITES = "memory,latency,perplexity"
DEFAULT_CPU_LIMIT = 4  # perplexity windows on CPU unless --limit says otherwise
SCRATCH = ".cells"  # cell processes' scratch space, inside the run directory


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
    limit_is_default: bool = False  # --limit not given: say so where a suite reads text
    wait: bool = False  # wait for another run holding the directory instead of refusing


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
    from qbench.dtypes import DTYPE_NAMES
    from qbench.models import load_tokenizer, resolve_model

    if not config.methods:
        raise QBenchError("no methods given; e.g. --methods fp16,nf4")
    if not config.suites:
        raise QBenchError("no suites given; e.g. --suites memory,perplexity")
    if config.dtype not in ("auto", *DTYPE_NAMES):
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
    for suite in suites:
        problem = suite.check_run(models, config.data_dir)
        if problem:
            raise QBenchError(problem)
    # calibration and training text: a missing one fails the run here, saying where it looked
    for source in sorted({m.data_source(config.calibration) for m in methods if m.needs_calibration or m.can_train}):
        load_text(source, data_dir=config.data_dir)
    executors = host.executors()
    host.check_refused("executors", config.executor)
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
                    "limit": config.limit if suite.needs_dataset or suite.reads_limit else None,
                    "device": config.device,
                    "dtype": config.dtype,
                    "seed": config.seed,
                    "calibration": config.calibration if method.needs_calibration else None,
                }
                cell["id"] = cell_id(cell)
                cell.update({"out": str(config.out), "data_dir": config.data_dir,
                             "trust_remote_code": config.trust_remote_code,
                             "use_cache": config.use_cache, "threads": config.threads})
                cells.append(cell)
    seen = set()
    unique = [c for c in cells if not (c["id"] in seen or seen.add(c["id"]))]
    return unique


def _write_run_json(config: RunConfig, cells: list[dict], argv: list[str], previous: dict | None,
                    notes: list[str]) -> None:
    invocations = list((previous or {}).get("invocations", []))
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
        "notes": notes,
        "invocations": invocations,
    }
    write_atomic(config.out / RUN_JSON, json.dumps(run, indent=1))


def clean_scratch(out: Path) -> Path:
    """The cell processes' scratch folder, emptied of what killed runs left (called with the run
    directory locked, so nothing in it belongs to a live run)."""
    scratch = out / SCRATCH
    if scratch.is_dir():
        shutil.rmtree(scratch, ignore_errors=True)
    return scratch


def cell_label(cell: dict) -> str:
    return f"{cell['method']['label']} × {cell['model']} × {cell['suite']['label']}"


class Progress:
    """rich progress on a terminal; plain lines otherwise. The ETA is the sum of an estimate for
    each remaining cell (see :meth:`estimate`), so a run whose slow suites come later is not
    judged by its first, fast cell."""

    def __init__(self, total: int, done: int, parallel: bool = False, remaining: list[dict] | None = None):
        self.total, self.done = total, done
        self.parallel = parallel  # cells start before earlier ones finish: no index on start lines
        self.pending = {c["id"]: c for c in remaining or []}
        self.finished: list[tuple[dict, float]] = []  # (cell, seconds) of the cells finished in this run
        self.rich = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self.rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[eta]}"))
            self.rich.start()
            self.task = self.rich.add_task("cells", total=total, completed=done, eta="")

    @staticmethod
    def _key(cell: dict) -> tuple[str, str, str]:
        return cell["model"], cell["method"]["label"], cell["suite"]["name"]

    def estimate(self, cell: dict) -> float | None:
        """Seconds ``cell`` should take, from the cells finished so far (None before any): a base
        time for its model × suite, from the other methods' cells, times its method's factor.

        * base: the mean time of that model × suite; where that model has not run that suite yet,
          the suite's mean over all models times the model's factor (how much longer than those
          means its own cells took); where the suite has not run at all, the model's mean, else the
          mean of everything;
        * method factor: how much longer than their base the method's own finished cells took (the
          first cell of a method also quantizes it); 1 before any of them finished.
        """
        if not self.finished:
            return None
        model, method, suite = self._key(cell)
        others = [(k, s) for c, s in self.finished if (k := self._key(c))[1] != method]
        own = [(k, s) for c, s in self.finished if (k := self._key(c))[1] == method]

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        def base(mo: str, su: str) -> float | None:
            for pool in (others, others + own):  # the method's own cells only when no other method has run
                exact = mean([s for (m, _, u), s in pool if (m, u) == (mo, su)])
                if exact is not None:
                    return exact
                suite_mean = mean([s for (_, _, u), s in pool if u == su])
                if suite_mean is not None:
                    factors = [s / means for (m, _, u), s in pool if m == mo
                               and (means := mean([t for (_, _, v), t in pool if v == u]))]
                    return suite_mean * (mean(factors) or 1.0)
            return mean([s for (m, _, _), s in others + own if m == mo]) or mean([s for _, s in others + own])

        ratios = [s / b for (mo, _, su), s in own if (b := base(mo, su))]
        return (base(model, suite) or 0.0) * (mean(ratios) or 1.0)

    def eta_s(self) -> float | None:
        """Seconds left: the estimates of the cells not finished yet (None before the first finishes)."""
        if not self.finished:
            return None
        return sum(self.estimate(c) or 0.0 for c in self.pending.values())

    def start(self, cell: dict) -> None:
        if self.rich:
            self.rich.update(self.task, description=cell_label(cell))
        else:
            where = "[started]" if self.parallel else f"[{self.done + 1}/{self.total}]"
            print(f"{where} {cell_label(cell)} ...", flush=True)

    def finish(self, cell: dict, record: dict) -> None:
        self.done += 1
        self.pending.pop(cell["id"], None)
        self.finished.append((cell, float(record.get("duration_s") or 0.0)))
        status = record["status"] + (f": {record.get('message')}" if record["status"] != "ok" else "")
        line = f"[{self.done}/{self.total}] {cell_label(cell)}: {status} ({record['duration_s']:.1f} s)"
        eta = self.eta_s() if self.pending else None
        eta_text = f"ETA {eta / 60:.1f} min" if eta is not None else ""
        # a suite's warnings about its own numbers (e.g. latency timed on a busy machine), under the cell's line
        warned = "".join(f"\n    warning: {w}" for w in (record.get("extra") or {}).get("warnings") or [])
        if self.rich:
            self.rich.console.print(line + warned, markup=False, highlight=False)
            self.rich.update(self.task, completed=self.done, eta=eta_text)
        else:
            print(line + (f", {eta_text}" if eta_text else "") + warned, flush=True)

    def close(self) -> None:
        if self.rich:
            self.rich.stop()


def execute(config: RunConfig, argv: list[str] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the matrix. Returns a summary: cells, skipped (already done), failed cell labels.
    Everything is checked (plan, the directory's lock, run.json) before ``say`` announces the run."""
    cells = plan(config)
    argv = argv or []
    with hold_run_dir(config.out, " ".join(argv) or "qbench run", wait=config.wait,
                      on_wait=lambda holder: say(f"run directory {config.out} is in use by {holder}; waiting")):
        return _execute_locked(config, cells, argv, say)


def _execute_locked(config: RunConfig, cells: list[dict], argv: list[str],
                    say: Callable[[str], None]) -> dict[str, Any]:
    previous = read_run_json(config.out)  # a corrupt one stops here, before any cell
    notes = list(config.notes)
    if config.limit_is_default and config.limit is not None and any(c.get("limit") is not None for c in cells):
        notes.append(f"CPU default: perplexity over the first {config.limit} windows (accuracy: items per task); "
                     f"--limit all evaluates the full split")
    records_path = config.out / RECORDS
    repair_torn_tail(records_path)
    malformed: list[tuple[int, str]] = []
    recorded = latest_records(records_path, malformed)
    problem = malformed_warning(records_path, malformed)
    if problem:
        warn(problem)
    done = {cid for cid, rec in recorded.items() if rec.get("status") in ("ok", "skipped")}
    todo = [c for c in cells if c["id"] not in done]
    log_dir = config.out / "logs"
    executor = host.executors()[config.executor](log_dir=log_dir)
    executor.scratch_dir = clean_scratch(config.out)
    _write_run_json(config, cells, argv, previous, notes)
    try:
        log_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise write_error(log_dir, exc, "create") from None
    say(f"run directory {config.out}")
    for note in notes:
        say(note)
    env = environment(config.device)
    progress = Progress(len(cells), len(cells) - len(todo), parallel=executor.parallel, remaining=todo)
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
        shutil.rmtree(executor.scratch_dir, ignore_errors=True)
    return {"cells": len(cells), "already_done": len(cells) - len(todo), "ran": len(todo), "failed": failed,
            "records": str(records_path)}


def make_record(cell: dict, result: dict, env: dict, duration: float) -> dict[str, Any]:
    dataset = None
    if cell.get("dataset"):
        dataset = {"name": cell["dataset"], **(result.get("dataset") or {})}
        if result.get("protocol"):
            dataset["protocol"] = result["protocol"]
    elif result.get("protocol"):  # a suite that reads data of its own (accuracy: lm-eval tasks)
        dataset = {"protocol": result["protocol"]}
    record = {
        "cell": cell["id"],
        "status": result.get("status", "error"),
        # which distribution (and version) provided the method and the suite: not part of the cell id
        "method": {**cell["method"], "provided_by": host.provenance("methods", cell["method"]["name"])},
        "model": {"name": cell["model"], **{k: v for k, v in (result.get("model_info") or {}).items() if k != "name"}},
        "suite": {**cell["suite"], "provided_by": host.provenance("suites", cell["suite"]["name"])},
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
    if result.get("git"):  # the commit the cell's process ran, not the one the driver started at
        record["env"]["git"] = result["git"]
    if record["status"] != "ok":
        record["message"] = result.get("message", "unknown error")
        if result.get("traceback"):
            record["traceback"] = result["traceback"]
    return record
