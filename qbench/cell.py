"""One matrix cell, run in its own process: ``python -m qbench.cell CELL.json RESULT.json``.

load model → method.quantize (→ the train stage, for methods that train; or both from the cache)
→ suite.measure → result JSON.
The driver turns the result (or the process's death) into a record.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qbench.params import QBenchError, QBenchSkip


def _jsonable_metrics(metrics: dict, suite=None) -> dict:
    """Metrics as JSON, each with the spec its suite declares for it (title, direction...), so
    reports need nothing but the record."""
    out = {}
    metrics = metrics or {}
    for name in suite.in_declared_order(metrics) if suite is not None else metrics:
        m = metrics[name]
        out[name] = m.to_json() if hasattr(m, "to_json") else m
        spec = suite.metric_spec(name) if suite is not None else None
        if spec is not None and isinstance(out[name], dict):
            out[name].update(spec.to_json())
    return out


def resolve_dtype(name: str, device: str):
    from qbench.dtypes import dtype_of

    if name == "auto":
        return dtype_of("float16" if device.startswith("cuda") else "float32")
    return dtype_of(name)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    import torch

    from qbench import host
    from qbench.cache import quantize_cached
    from qbench.data import Calibration, load_text
    from qbench.dtypes import dtype_name
    from qbench.kernels._cpu import fp32_arithmetic
    from qbench.method import kernel_paths
    from qbench.models import load_model
    from qbench.suite import CellContext

    timings: dict[str, float] = {}
    seed = int(cell.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device(cell.get("device", "cpu"))
    dtype = resolve_dtype(cell.get("dtype", "auto"), str(device))

    method = host.make_method(cell["method"]["name"], cell["method"]["params"])
    suite = host.make_suite(cell["suite"]["name"], cell["suite"]["params"])
    reason = suite.applies_to(method)
    if reason:
        return {"status": "skipped", "message": reason}

    start = time.perf_counter()
    trust = cell.get("trust_remote_code", False)
    loaded = load_model(cell["model"], dtype=dtype, device=device, trust_remote_code=trust)
    timings["load_s"] = round(time.perf_counter() - start, 3)
    data_dir = cell.get("data_dir")

    def text_windows():
        """Calibration or training windows, drawn from the text the method asks for."""
        source = method.data_source(cell.get("calibration") or "c4")
        return Calibration(loaded.tokenizer, load_text(source, data_dir=data_dir))

    def train_stage(model):
        """Fine-tune the quantized model in place (methods with a train stage); metrics for the record."""
        out = cell.get("out")
        adapters = f"{cell['model']}-{method.label}".replace("/", "_")
        where = {"output_dir": str(Path(out) / "adapters" / adapters)} if out else {}
        return _jsonable_metrics(method.train(model, loaded.tokenizer, text_windows(),
                                              model_name=loaded.info.get("source", cell["model"]), **where))

    def quantized(base_model, base_info):
        """method.quantize (→ train stage), or the cached result of both."""
        return quantize_cached(method, base_model, base_info, dtype, device, text_windows,
                               train=train_stage if method.can_train else None, use_cache=cell.get("use_cache", True))

    def build():
        fresh = load_model(cell["model"], dtype=dtype, device=device, trust_remote_code=trust)
        return quantized(fresh.model, fresh.info)[0]

    model, qinfo = quantized(loaded.model, loaded.info)
    model.eval()
    dataset = load_text(cell["dataset"], data_dir=data_dir) if suite.needs_dataset else None
    ctx = CellContext(model=model, tokenizer=loaded.tokenizer, model_info=loaded.info, method=method,
                      device=device, dtype=dtype, dataset=dataset, limit=cell.get("limit"), seed=seed,
                      reload_model=build, data_dir=data_dir)
    start = time.perf_counter()
    with fp32_arithmetic() if suite.fp32_arithmetic else contextlib.nullcontext():
        metrics = suite.measure(ctx)
    if suite.fp32_arithmetic and device.type == "cpu":
        ctx.extra["cpu_arithmetic"] = "fp32 (kernels that round to bf16 not used)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["measure_s"] = round(time.perf_counter() - start, 3)
    paths = kernel_paths(model)
    return {
        "status": "ok",
        "metrics": _jsonable_metrics(metrics, suite),
        "protocol": ctx.protocol,
        "claims": ctx.claims,
        "baseline_claims": list(method.claims),
        "extra": ctx.extra,
        "notes": ctx.notes + ([loaded.info["note"]] if loaded.info.get("note") else [])
        + [qinfo[k] for k in ("cache_discarded",) if qinfo.get(k)],
        "model_info": loaded.info,
        "quantization": qinfo,
        "method_report": method.report,
        "kernel_paths": paths,
        "dataset": None if dataset is None else {**dataset.describe(), "sha256": dataset.sha256()},
        "dtype": dtype_name(dtype),
        "timings": timings,
    }


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process when the driver that started it is gone. Killing ``qbench run`` (SIGTERM,
    SIGKILL, a closed session) would otherwise leave its cell running alone, holding the cores the
    rerun's cells then share: an orphaned cell once ran beside the rerun for 100 minutes. Its
    result has nowhere to go, and everything it writes on the way is written atomically."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(143)

    threading.Thread(target=watch, name="qbench-exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    exit_with_parent()
    from qbench.records import git_commit

    # The code this process runs is the checkout as it is now, which is not always the one the
    # driver started from (an editable install, a run resumed for hours while commits land).
    code = git_commit()
    cell_path, result_path = Path(argv[0]), Path(argv[1])
    cell = json.loads(cell_path.read_text())
    import torch

    if cell.get("threads"):
        torch.set_num_threads(int(cell["threads"]))
    try:
        result = run_cell(cell)
    except QBenchSkip as exc:
        result = {"status": "skipped", "message": str(exc)}
    except QBenchError as exc:
        result = {"status": "error", "message": str(exc)}
    except MemoryError:
        result = {"status": "error", "message": "out of memory (MemoryError)"}
    except Exception as exc:  # recorded, the other cells go on
        is_oom = "out of memory" in str(exc).lower()
        result = {"status": "error",
                  "message": ("out of memory: " if is_oom else "")
                  + f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  "traceback": traceback.format_exc()[-4000:]}
    result["torch_threads"] = torch.get_num_threads()
    result["git"] = code
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
