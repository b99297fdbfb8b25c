"""On-disk cache of quantized models (safetensors), keyed by method + parameters + model + dtype,
so the suites of one method quantize once. Only ``QuantizedLinear`` modules are stored, and the
parameters outside them that the method changed (``Method.folded_parameters``: AWQ and SmoothQuant
fold scales into the RMSNorm weights); the rest of the model is the unchanged base model, reloaded
from its own files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qbench.method import class_path, load_class, quantized_modules, set_submodule
from qbench.models import cache_dir
from qbench.records import canonical

FORMAT = 1
PARAMETERS = "parameters.safetensors"  # changed parameters outside the quantized modules (folded scales)


def cache_key(method_desc: dict, model_info: dict, dtype: torch.dtype, extra: dict | None = None) -> str:
    keyed = {"format": FORMAT, "method": method_desc["name"], "params": method_desc["params"],
             "model": model_info["name"], "source": model_info.get("source"), "dtype": str(dtype),
             "extra": extra or {}}
    return hashlib.sha256(canonical(keyed).encode()).hexdigest()[:16]


def entry_dir(key: str, model_name: str, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in f"{model_name}/{label}")
    return cache_dir() / "quantized" / safe / key


def save_quantized(path: Path, model: nn.Module, manifest: dict[str, Any], parameters: list[str] = ()) -> None:
    """Write the quantized modules, and the model's ``parameters`` named, to ``path`` atomically
    (temp dir, then rename)."""
    tensors, modules = {}, {}
    for name, module in quantized_modules(model):
        modules[name] = {"class": class_path(type(module)), "config": module.config()}
        for tname, t in module.stored_tensors().items():
            tensors[f"{name}::{tname}"] = t.detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "quantized.safetensors"))
        if parameters:
            save_file({name: model.get_parameter(name).detach().to("cpu").contiguous() for name in parameters},
                      str(tmp / PARAMETERS))
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "modules": modules}, indent=1, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_quantized(path: Path, model: nn.Module, device: torch.device) -> dict[str, Any] | None:
    """Swap the cached quantized modules into ``model``; return the manifest, or None if no entry."""
    manifest_path, weights = path / "manifest.json", path / "quantized.safetensors"
    if not (manifest_path.is_file() and weights.is_file()):
        return None
    manifest = json.loads(manifest_path.read_text())
    tensors = load_file(str(weights), device=str(device))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module_name, _, tname = key.partition("::")
        grouped.setdefault(module_name, {})[tname] = t
    for name, entry in manifest["modules"].items():
        cls = load_class(entry["class"])
        set_submodule(model, name, cls.from_stored(grouped.get(name, {}), entry["config"]))
    if (path / PARAMETERS).is_file():
        with torch.no_grad():
            for name, tensor in load_file(str(path / PARAMETERS), device=str(device)).items():
                model.get_parameter(name).copy_(tensor)
    return manifest


def quantize_cached(method, model: nn.Module, model_info: dict, dtype: torch.dtype, device: torch.device,
                    calibration_factory: Callable[[], Any] | None, after_quantize: Callable | None = None,
                    use_cache: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model`` with ``method`` or load the cached result. Returns (model, info) where info
    holds quantize time, whether the cache was hit, and the method's own report."""
    desc = method.describe()
    key = cache_key(desc, model_info, dtype)
    path = entry_dir(key, model_info["name"], desc["label"])
    if use_cache and method.cacheable:
        manifest = load_quantized(path, model, device)
        if manifest is not None:
            method.report = manifest.get("method_report", {})
            return model, {"from_cache": True, "cache_dir": str(path), "quantize_s": manifest.get("quantize_s"),
                           "calibration": manifest.get("calibration"), "train": manifest.get("train")}
    calibration = calibration_factory() if (calibration_factory and method.needs_calibration) else None
    start = time.perf_counter()
    model = method.quantize(model, calibration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quantize_s = time.perf_counter() - start
    info: dict[str, Any] = {"from_cache": False, "quantize_s": round(quantize_s, 3),
                            "calibration": calibration.describe() if calibration is not None else None}
    if after_quantize is not None:
        info["train"] = after_quantize(model)
    if use_cache and method.cacheable:
        save_quantized(path, model, {"method": desc, "model": model_info["name"], "dtype": str(dtype),
                                     "quantize_s": info["quantize_s"], "calibration": info["calibration"],
                                     "train": info.get("train"), "method_report": method.report},
                       parameters=list(method.folded_parameters))
        info["cache_dir"] = str(path)
    return model, info
