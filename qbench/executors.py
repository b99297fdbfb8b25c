"""Executors run matrix cells. The runner only calls ``Executor.check_available()`` and
``Executor.run(cells, on_start, on_result)``.

``local`` (built in) runs the cells one after another, each in its own Python process, so a cell
that raises, segfaults or is killed for memory becomes an error record and the rest go on. Cells
run one at a time on purpose: two cells sharing the cores would distort each other's timings.
A cluster executor (Ray, ...) registers through the ``register_executors`` hook.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from qbench import hookimpl
from qbench.durable import write_atomic, write_error

ResultCallback = Callable[[dict[str, Any], dict[str, Any]], None]


class Executor:
    name = ""
    parallel = False  # whether cells may run at the same time

    def __init__(self, log_dir: Path | None = None, timeout_s: float | None = None):
        self.log_dir = log_dir
        self.timeout_s = timeout_s
        # where cell processes keep their scratch files: the runner points it inside the run directory
        # (and empties it when it starts), so runs killed with SIGKILL leave nothing behind elsewhere
        self.scratch_dir: Path | None = None

    @classmethod
    def check_available(cls) -> None:
        """Raise QBenchError (one line: what is missing, what to do) if this executor cannot run here."""

    def run(self, cells: list[dict[str, Any]], on_start: Callable[[dict], None], on_result: ResultCallback) -> None:
        """Run every cell; call ``on_start(cell)`` before and ``on_result(cell, result)`` after each.
        ``result`` is the cell's JSON result: status ok|error|skipped, metrics, message..."""
        raise NotImplementedError


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if name == "SIGKILL" else ""
        return f"cell process died with {name}{hint}"
    return f"cell process exited with code {code} without a result"


def run_cell_process(cell: dict[str, Any], log_path: Path | None, timeout_s: float | None,
                     scratch_dir: Path | None = None) -> dict[str, Any]:
    """Run one cell in a fresh interpreter and return its result, or an error result if it died."""
    if scratch_dir is not None:
        try:
            scratch_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(scratch_dir, exc, "create") from None
    try:
        scratch = tempfile.TemporaryDirectory(prefix="qbench-cell-", dir=scratch_dir)
    except OSError as exc:
        raise write_error(scratch_dir or tempfile.gettempdir(), exc, "create a folder in") from None
    with scratch as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        write_atomic(cell_file, json.dumps(cell))
        try:
            log = open(log_path, "w") if log_path else subprocess.DEVNULL
        except OSError as exc:
            raise write_error(log_path, exc, "create") from None
        try:
            proc = subprocess.run([sys.executable, "-m", "qbench.cell", str(cell_file), str(result_file)],
                                  stdout=log, stderr=log, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return {"status": "error", "message": f"cell timed out after {timeout_s:.0f} s"}
        finally:
            if log_path:
                log.close()
        if result_file.is_file():
            try:
                return json.loads(result_file.read_text())
            except ValueError as exc:
                return {"status": "error", "message": f"the cell's result file was unreadable ({exc})",
                        "exit_code": code}
        tail = ""
        if log_path and log_path.is_file():
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1][:300] if lines else ""
        message = describe_exit(code) + (f": {tail}" if tail else "")
        return {"status": "error", "message": message, "exit_code": code}


class LocalExecutor(Executor):
    name = "local"

    def run(self, cells, on_start, on_result):
        for cell in cells:
            on_start(cell)
            log_path = self.log_dir / f"{cell['id']}.log" if self.log_dir else None
            on_result(cell, run_cell_process(cell, log_path, self.timeout_s, self.scratch_dir))


@hookimpl
def register_executors(register):
    register("local", LocalExecutor)
