"""Durable records: one JSON object per cell appended to ``records.jsonl`` (flushed and fsynced),
the environment that produced it, stable cell ids, and reading back with a torn last line ignored."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

RECORDS = "records.jsonl"
RUN_JSON = "run.json"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id(cell: dict[str, Any]) -> str:
    """Stable id of a cell: what is measured, on what, how — not where the output goes."""
    keys = ("method", "model", "suite", "dataset", "limit", "device", "dtype", "seed", "calibration")
    keyed = {k: cell[k] for k in keys
             if k in cell}
    return hashlib.sha256(canonical(keyed).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def produced_by(command: str) -> str:
    """"Produced by `command` at commit X" (noting uncommitted changes): the provenance line of a
    result file written by a script rather than by ``qbench run``."""
    commit = git_commit()
    dirty = " (uncommitted changes)" if commit.get("dirty") else ""
    return f"Produced by `{command}` at commit {commit.get('commit') or 'unknown'}{dirty}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def distribution_version(distribution: str) -> str | None:
    """The installed version of a distribution (``importlib.metadata``), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch

    env = {
        "python": platform.python_version(),
        "qbench": distribution_version("qbench-quant"),
        "torch": torch.__version__,
        "triton": distribution_version("triton"),
        "transformers": distribution_version("transformers"),
        "datasets": distribution_version("datasets"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_commit(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({env['cpu']})"
    return env


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one line and make it durable before returning; a full disk leaves no torn line."""
    from qbench.durable import append_durably

    append_durably(path, (json.dumps(record, sort_keys=False, default=str) + "\n").encode("utf-8"))


def repair_torn_tail(path: Path) -> bool:
    """Cut a last line that a killed run left half-written (no newline or not JSON). True if cut."""
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data:
        return False
    keep = data
    if not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
    else:
        last = data[:-1].rsplit(b"\n", 1)[-1]
        try:
            json.loads(last)
        except ValueError:
            keep = data[: len(data) - len(last) - 1]
    if keep == data:
        return False
    with open(path, "r+b") as f:
        f.truncate(len(keep))
        f.flush()
        os.fsync(f.fileno())
    return True


def record_problem(obj: Any) -> str | None:
    """What makes ``obj`` unusable as a record (readers need these fields), or None."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    missing = [k for k in ("cell", "status", "method", "model", "suite") if k not in obj]
    if missing:
        return "no " + ", ".join(missing)
    if not isinstance(obj["cell"], str) or obj["status"] not in ("ok", "error", "skipped"):
        return "bad cell or status"
    for part in ("method", "model", "suite"):
        if not (isinstance(obj[part], dict) and isinstance(obj[part].get("name"), str)):
            return f"{part} has no name"
    if not isinstance(obj.get("metrics") or {}, dict):
        return "metrics is not an object"
    return None


def read_records(path: Path, malformed: list[tuple[int, str]] | None = None) -> Iterator[dict[str, Any]]:
    """Every complete, well-formed record. A torn, corrupt or incomplete line is skipped; its line
    number and what is wrong with it go to ``malformed`` when given."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                problem = "not JSON"
            else:
                problem = record_problem(obj)
            if problem is None:
                yield obj
            elif malformed is not None:
                malformed.append((number, problem))


def latest_records(path: Path, malformed: list[tuple[int, str]] | None = None) -> dict[str, dict[str, Any]]:
    """The last record of each cell (a failed cell that later succeeded shows as ok)."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_records(path, malformed):
        latest[rec["cell"]] = rec
    return latest


def warn(message: str) -> None:
    """One warning line on stderr (the user's terminal; stdout may be a report being piped)."""
    import sys

    print(f"qbench: warning: {message}", file=sys.stderr, flush=True)


def malformed_warning(path: Path, malformed: list[tuple[int, str]]) -> str | None:
    """One line for every malformed record of a file, or None."""
    if not malformed:
        return None
    numbers = ", ".join(str(n) for n, _ in malformed[:10]) + (", ..." if len(malformed) > 10 else "")
    reasons = sorted({why for _, why in malformed})
    plural = "s" if len(malformed) > 1 else ""
    return (f"{path}: skipped {len(malformed)} malformed record{plural} (line{plural} {numbers}: "
            f"{'; '.join(reasons[:3])}); their cells count as not recorded")


def load_latest(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest well-formed record of each cell of a run directory, for report and compare: one
    line for what is wrong with the directory (QBenchError), one warning for malformed records."""
    from qbench.params import QBenchError

    run_dir = Path(run_dir)
    path = run_dir / RECORDS
    if run_dir.is_file():
        raise QBenchError(f"{run_dir} is a file, not a run directory; pass the --out directory of a qbench run")
    if not run_dir.is_dir():
        raise QBenchError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        if (run_dir / "run.json").is_file():
            raise QBenchError(f"{run_dir} has no records yet: its run stopped (or is still running) before the "
                              f"first cell finished; rerun its command to finish it")
        raise QBenchError(f"no {RECORDS} in {run_dir}; pass the --out directory of a qbench run")
    malformed: list[tuple[int, str]] = []
    latest = latest_records(path, malformed)
    problem = malformed_warning(path, malformed)
    if problem:
        warn(problem)
    if not latest:
        raise QBenchError(f"{path} has no complete records yet")
    return latest


def read_run_json(run_dir: Path, for_report: bool = False) -> dict[str, Any] | None:
    """``run.json`` of a run directory, or None where there is none. A corrupt one stops a run (one
    line: which file, what to do); a report only warns, since the records carry everything it shows."""
    from qbench.params import QBenchError

    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(run, dict) else f"a JSON {type(run).__name__}, not an object"
        invocations = run.get("invocations", []) if problem is None else []
        if problem is None and not (isinstance(invocations, list) and all(
                isinstance(i, dict) and isinstance(i.get("argv"), list) and all(isinstance(a, str) for a in i["argv"])
                for i in invocations)):
            problem = "its invocations are not a list of {argv, time}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return run
    if for_report:
        warn(f"{path} is unreadable ({problem}); the report leaves out the commands it lists (the records "
             f"are complete); move it away to silence this")
        return None
    raise QBenchError(f"{path} is corrupt ({problem}); move it away (the records in {RECORDS} are kept) "
                      f"and rerun the same command")
