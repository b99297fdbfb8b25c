"""``--executor ray``: matrix cells as Ray tasks (``pip install 'qbench-quant[ray]'``).

Each cell is one Ray task that asks for what the cell needs (one GPU for a ``cuda`` cell, else
``QBENCH_RAY_CPUS`` CPUs, default 1) and runs the cell exactly as the local executor does: in a
fresh Python process on the worker, so a cell that segfaults or is killed for memory becomes an
error record and the rest go on. The task returns the cell's result, its log text and the
worker's environment (host, device, versions); the driver writes the record to the run's
``records.jsonl`` and the log under ``logs/``, so records, resume and reports are the same as
with ``local``.

Cells of the same method and model run one after another (the first one quantizes and fills the
quantized-model cache, the next ones load it); different methods run in parallel, as far as the
cluster's resources allow. Cells sharing one machine share its cores and memory bandwidth, so
latency figures from parallel cells are noisier than from ``local`` (which runs one at a time);
give latency cells a whole node (``QBENCH_RAY_CPUS``) or use ``local`` for timings.

The driver joins the cluster named by ``RAY_ADDRESS`` when set, else an already initialised Ray
(``ray.init()`` in the calling process), else starts a local Ray instance and stops it at the end.
The workers get the driver's ``QBENCH_*``, ``HF_*``, ``TRITON_*`` and ``PYTHONPATH`` environment
variables.
"""
from __future__ import annotations

import os
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from qbench import hookimpl
from qbench.durable import write_atomic
from qbench.executors import Executor, run_cell_process
from qbench.params import QBenchError

FORWARDED_ENV_PREFIXES = ("QBENCH_", "HF_", "TRITON_", "TRANSFORMERS_")


def _forwarded_env() -> dict[str, str]:
    """What the cells need to find the same data, caches and plugins as the driver."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k == "PYTHONPATH"}


def _cpus_per_cell() -> float:
    raw = os.environ.get("QBENCH_RAY_CPUS", "1")
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise QBenchError(f"QBENCH_RAY_CPUS={raw!r} must be a positive number of CPUs per cell")
    return value


def run_cell_on_worker(cell: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Body of the Ray task: run the cell in a subprocess, return result + log + worker environment."""
    import platform

    from qbench.records import environment

    with tempfile.TemporaryDirectory(prefix="qbench-ray-") as tmp:
        log_path = Path(tmp) / "cell.log"
        result = run_cell_process(cell, log_path, timeout_s)
        log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    env = environment(cell.get("device", "cpu"))
    env["host"] = platform.node()
    return {"result": result, "log": log_text, "env": env}


def group_key(cell: dict[str, Any]) -> tuple:
    """Cells that share a quantized model (same method, model, device, dtype) run in sequence."""
    return (cell["method"]["label"], cell["model"], cell.get("device", "cpu"), cell.get("dtype", "auto"))


class RayExecutor(Executor):
    name = "ray"
    parallel = True

    def __init__(self, log_dir: Path | None = None, timeout_s: float | None = None):
        super().__init__(log_dir, timeout_s)
        self.check_available()
        self.cpus = _cpus_per_cell()

    @classmethod
    def check_available(cls) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise QBenchError("executor ray needs the ray package: pip install 'qbench-quant[ray]' "
                              "(or use --executor local)") from None
        _cpus_per_cell()

    def _resources(self, cell: dict[str, Any]) -> dict[str, float]:
        if str(cell.get("device", "cpu")).startswith("cuda"):
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_gpus": 0, "num_cpus": self.cpus}

    def run(self, cells, on_start, on_result):
        import ray

        if not cells:
            return
        started_here = False
        if not ray.is_initialized():
            # RAY_ADDRESS (if set) is honoured by ray.init itself
            ray.init(runtime_env={"env_vars": _forwarded_env()}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            started_here = True
        try:
            self._run(ray, cells, on_start, on_result)
        finally:
            if started_here:
                ray.shutdown()

    def _check_resources(self, ray, cells) -> None:
        total = ray.cluster_resources()
        wants_gpu = any(self._resources(c)["num_gpus"] for c in cells)
        if wants_gpu and total.get("GPU", 0) < 1:
            raise QBenchError("executor ray: cells ask for a CUDA device but the Ray cluster has no GPU; "
                              "use --device cpu or add GPU nodes")
        if total.get("CPU", 0) < self.cpus:
            raise QBenchError(f"executor ray: QBENCH_RAY_CPUS={self.cpus:g} but the largest offer is "
                              f"{total.get('CPU', 0):g} CPUs; lower QBENCH_RAY_CPUS")

    def _run(self, ray, cells, on_start, on_result) -> None:
        self._check_resources(ray, cells)
        remote = ray.remote(max_retries=0)(run_cell_on_worker)
        env_vars = _forwarded_env()
        queues: dict[tuple, deque] = {}
        for cell in cells:
            queues.setdefault(group_key(cell), deque()).append(cell)
        in_flight: dict[Any, dict[str, Any]] = {}

        def submit(queue: deque) -> None:
            cell = queue.popleft()
            on_start(cell)
            ref = remote.options(**self._resources(cell), runtime_env={"env_vars": env_vars}).remote(
                cell, self.timeout_s)
            in_flight[ref] = cell

        for queue in queues.values():
            submit(queue)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            cell = in_flight.pop(ref)
            try:
                answer = ray.get(ref)
            except Exception as exc:  # the worker itself died (node lost, task killed)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                answer = {"result": {"status": "error", "message": f"ray task failed: {first}"}, "log": "", "env": None}
            if self.log_dir is not None:
                write_atomic(self.log_dir / f"{cell['id']}.log", answer.get("log", ""))
            result = dict(answer["result"])
            if answer.get("env"):
                result["env"] = answer["env"]
            on_result(cell, result)
            queue = queues[group_key(cell)]
            if queue:
                submit(queue)


@hookimpl
def register_executors(register):
    register("ray", RayExecutor)
