"""One matrix cell, run in its own process: ``python -m qbench.cell CELL.json RESULT.json``.

load model → method.quantize (or the cache) → [method.train] → suite.measure → result JSON.
The driver turns the result (or the process's death) into a record.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qbench.params import QBenchError, QBenchSkip


def _jsonable_metrics(metrics: dict) -> dict:
    out = {}
    for name, m in (metrics or {}).items():
        out[name] = m.to_json() if hasattr(m, "to_json") else m
    return out


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    import torch

    from qbench import host
    from qbench.cache import quantize_cached
    from qbench.data import Calibration, load_text
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
    loaded = load_model(cell["model"], dtype=dtype, device=device, trust_remote_code=cell.get("trust_remote_code", False))
    timings["load_s"] = round(time.perf_counter() - start, 3)
    data_dir = cell.get("data_dir")

    def calibration_factory():
        name = cell.get("calibration", "c4")
        if "train_dataset" in method.values:
            name = method.values["train_dataset"] or name
        return Calibration(loaded.tokenizer, load_text(name, data_dir=data_dir))

    after = None
    if getattr(method, "can_train", False):
        def after(model):
            out = cell.get("out")
            where = {"output_dir": str(Path(out) / "adapters" / f"{cell['model']}-{method.label}".replace("/", "_"))} if out else {}
            return _jsonable_metrics(method.train(model, loaded.tokenizer, calibration_factory(),
                                                  model_name=loaded.info.get("source", cell["model"]), **where))

    def build():
        fresh = load_model(cell["model"], dtype=dtype, device=device, trust_remote_code=cell.get("trust_remote_code", False))
        model, _ = quantize_cached(method, fresh.model, fresh.info, dtype, device, calibration_factory, after,
                                   use_cache=cell.get("use_cache", True))
        return model

    model, qinfo = quantize_cached(method, loaded.model, loaded.info, dtype, device, calibration_factory, after,
                                   use_cache=cell.get("use_cache", True))
    model.eval()
    dataset = load_text(cell["dataset"], data_dir=data_dir) if suite.needs_dataset else None
    ctx = CellContext(model=model, tokenizer=loaded.tokenizer, model_info=loaded.info, method=method,
                      device=device, dtype=dtype, dataset=dataset, limit=cell.get("limit"), seed=seed,
                      reload_model=build)
    start = time.perf_counter()
    metrics = suite.measure(ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["measure_s"] = round(time.perf_counter() - start, 3)
    paths = kernel_paths(model)
    return {
        "status": "ok",
        "metrics": _jsonable_metrics(metrics),
        "extra": ctx.extra,
        "notes": ctx.notes + ([loaded.info["note"]] if loaded.info.get("note") else []),
        "model_info": loaded.info,
        "quantization": qinfo,
        "method_report": method.report,
        "kernel_paths": paths,
        "dataset": None if dataset is None else {**dataset.describe(), "sha256": dataset.sha256()},
        "dtype": str(dtype).removeprefix("torch."),
        "timings": timings,
    }


def main(argv: list[str]) -> int:
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
                  "message": ("out of memory: " if is_oom else "") + f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  "traceback": traceback.format_exc()[-4000:]}
    result["torch_threads"] = torch.get_num_threads()
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
