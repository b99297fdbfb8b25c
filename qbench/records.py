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
    """Append one line and make it durable before returning."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


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


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record; a torn or corrupt line is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "cell" in obj:
                yield obj


def latest_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell (a failed cell that later succeeded shows as ok)."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_records(path):
        latest[rec["cell"]] = rec
    return latest
