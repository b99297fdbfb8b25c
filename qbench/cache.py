"""On-disk cache of quantized models (safetensors), keyed by method + parameters + model + dtype,
so the suites of one method quantize once. Only ``QuantizedLinear`` modules are stored: the rest
of the model is the unchanged base model, reloaded from its own files.

An entry checks itself before it is used: the manifest carries the sha256 and size of the weights
file, each module's tensor names, dtypes and shapes, and a checksum of itself. A damaged, truncated,
unreadable or inconsistent entry is discarded and rebuilt (the record says so), never used. The
manifest names each module's class, but only classes that the method's own plugin provides are
instantiated: nothing read from disk decides which code runs.

Parameters outside those modules that the method changed (``Method.folded_parameters``: AWQ and
SmoothQuant fold scales into the RMSNorm weights) are stored in the same file, under
``PARAMETER_PREFIX``, and checked the same way."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qbench.durable import file_sha256
from qbench.method import QuantizedLinear, class_path, quantized_modules, set_submodule
from qbench.paths import cache_dir
from qbench.records import canonical

# 2: checksums in the manifest; 3: the LoRA and NF4 layers moved to qbench.quant, and qlora's train stage
# no longer keeps a dequantized copy of each frozen weight (older entries carry that training's peak memory).
# 4: folded parameters. Entries of an older format are never read: the key differs.
FORMAT = 4
WEIGHTS, MANIFEST = "quantized.safetensors", "manifest.json"
PARAMETER_PREFIX = "@parameter::"  # module names never start with "@"


class BadCacheEntry(Exception):
    """A cache entry that must not be used; the message says why."""


def cache_key(method_desc: dict, model_info: dict, dtype: torch.dtype, extra: dict | None = None) -> str:
    keyed = {"format": FORMAT, "method": method_desc["name"], "params": method_desc["params"],
             "model": model_info["name"], "source": model_info.get("source"), "dtype": str(dtype),
             "extra": extra or {}}
    return hashlib.sha256(canonical(keyed).encode()).hexdigest()[:16]


def entry_dir(key: str, model_name: str, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in f"{model_name}/{label}")
    return cache_dir() / "quantized" / safe / key


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with a checksum of everything else in it (so a lost layer or an edited config shows)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return {**body, "checksum": hashlib.sha256(canonical(body).encode()).hexdigest()}


def _tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def provided_classes(method) -> dict[str, type]:
    """The QuantizedLinear classes a cache entry of ``method`` may name: those the method declares
    (``quantized_classes``), else those its plugin module (or a base class's module) defines or
    imports. Only modules already imported are looked at; nothing is imported."""
    candidates = list(getattr(type(method), "quantized_classes", None) or ())
    for klass in type(method).__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and not klass.__module__.startswith("qbench.method"):
            candidates.extend(vars(module).values())
    return {class_path(c): c for c in candidates
            if isinstance(c, type) and issubclass(c, QuantizedLinear) and c is not QuantizedLinear}


def save_quantized(path: Path, model: nn.Module, manifest: dict[str, Any], parameters: tuple[str, ...] = ()) -> None:
    """Write the quantized modules, and the model's ``parameters`` named, to ``path`` atomically
    (temp dir, then rename), with checksums."""
    tensors, modules = {}, {}
    for name, module in quantized_modules(model):
        stored = module.stored_tensors()
        modules[name] = {"class": class_path(type(module)), "config": module.config(),
                         "tensors": {tname: _tensor_spec(t) for tname, t in stored.items()}}
        for tname, t in stored.items():
            tensors[f"{name}::{tname}"] = t.detach().to("cpu").contiguous()
    folded = {}
    for name in parameters:
        tensors[PARAMETER_PREFIX + name] = model.get_parameter(name).detach().to("cpu").contiguous()
        folded[name] = _tensor_spec(tensors[PARAMETER_PREFIX + name])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        weights = {"file": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size, "sha256": file_sha256(tmp / WEIGHTS)}
        full = json.loads(json.dumps({**manifest, "format": FORMAT, "modules": modules, "parameters": folded,
                                      "weights": weights},
                                     default=str))  # sealed as it will read back
        (tmp / MANIFEST).write_text(json.dumps(seal_manifest(full), indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadCacheEntry(f"its {MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("checksum") != seal_manifest(manifest)["checksum"]:
        raise BadCacheEntry(f"its {MANIFEST} does not match its own checksum (edited or damaged)")
    if not isinstance(manifest.get("modules"), dict) or not isinstance(manifest.get("weights"), dict):
        raise BadCacheEntry(f"its {MANIFEST} lists no modules or weights")
    return manifest


def _check_weights(path: Path, manifest: dict[str, Any]) -> None:
    weights, expected = path / WEIGHTS, manifest["weights"]
    if not weights.is_file():
        raise BadCacheEntry(f"its {WEIGHTS} is missing")
    size = weights.stat().st_size
    if size != expected.get("bytes"):
        raise BadCacheEntry(f"its {WEIGHTS} has {size} bytes, the manifest says {expected.get('bytes')} (truncated?)")
    if file_sha256(weights) != expected.get("sha256"):
        raise BadCacheEntry(f"the checksum of its {WEIGHTS} does not match the manifest (damaged)")


def load_quantized(path: Path, model: nn.Module, device: torch.device, method=None) -> dict[str, Any] | None:
    """Swap the cached quantized modules into ``model``; return the manifest, or None if no entry.
    Raises BadCacheEntry (``model`` untouched) for an entry that must not be used."""
    if not path.exists():
        return None
    if not (path / MANIFEST).is_file():
        raise BadCacheEntry(f"it has no {MANIFEST} (incomplete)")
    manifest = _read_manifest(path)
    _check_weights(path, manifest)
    allowed = provided_classes(method) if method is not None else {}
    for name, entry in manifest["modules"].items():
        if not isinstance(entry, dict) or entry.get("class") not in allowed:
            named = entry.get("class") if isinstance(entry, dict) else entry
            provides = ", ".join(sorted(allowed)) or "none"
            raise BadCacheEntry(f"its manifest names class {named} for {name}, which is not one of the classes "
                                f"method {getattr(method, 'name', '?')} provides ({provides})")
    try:
        tensors = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise BadCacheEntry(f"its {WEIGHTS} is unreadable ({type(exc).__name__}: {exc})") from None
    # safetensors' tensors are views into one buffer at 8-byte offsets; ATen's CPU kernels
    # (torch._weight_int8pack_mm) load with 64-byte alignment and crash (SIGSEGV) on such views
    tensors = {key: t.clone() for key, t in tensors.items()}
    folded = {key.removeprefix(PARAMETER_PREFIX): tensors.pop(key) for key in list(tensors)
              if key.startswith(PARAMETER_PREFIX)}
    expected = manifest.get("parameters") or {}
    if {k: _tensor_spec(t) for k, t in folded.items()} != expected:
        raise BadCacheEntry("its folded parameters are not those its manifest lists")
    for name, t in folded.items():
        try:
            target = model.get_parameter(name)
        except AttributeError:
            target = None
        if target is None or tuple(target.shape) != tuple(t.shape):
            raise BadCacheEntry(f"it changes parameter {name}, which this model has not in that shape")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module_name, _, tname = key.partition("::")
        grouped.setdefault(module_name, {})[tname] = t
    if set(grouped) != set(manifest["modules"]):
        odd = sorted(set(grouped) ^ set(manifest["modules"]))
        raise BadCacheEntry(f"its {WEIGHTS} and manifest disagree on the modules ({', '.join(odd[:3])})")
    built = {}
    for name, entry in manifest["modules"].items():
        specs = {tname: _tensor_spec(t) for tname, t in grouped[name].items()}
        if specs != entry.get("tensors"):
            raise BadCacheEntry(f"the tensors of {name} are not those its manifest lists")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise BadCacheEntry(f"it replaces {name}, which is not a linear layer of this model")
        try:
            built[name] = allowed[entry["class"]].from_stored(grouped[name], entry["config"])
        except Exception as exc:
            raise BadCacheEntry(f"{name} could not be rebuilt from it ({type(exc).__name__}: {exc})") from None
    for name, module in built.items():  # only once every module is good
        set_submodule(model, name, module)
    with torch.no_grad():
        for name, t in folded.items():
            model.get_parameter(name).copy_(t)
    return manifest


def quantize_cached(method, model: nn.Module, model_info: dict, dtype: torch.dtype, device: torch.device,
                    calibration_factory: Callable[[], Any] | None, train: Callable | None = None,
                    use_cache: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model`` with ``method``, then run ``train(model)`` (the train stage of methods that
    fine-tune; its metrics go under ``info["train"]``), or load the cached result of both. Returns
    (model, info) where info holds quantize time, whether the cache was hit, and the method's own report."""
    desc = method.describe()
    key = cache_key(desc, model_info, dtype)
    path = entry_dir(key, model_info["name"], desc["label"])
    discarded = None
    if use_cache and method.cacheable:
        try:
            manifest = load_quantized(path, model, device, method)
        except BadCacheEntry as exc:
            discarded = f"cached quantized model {path} discarded and rebuilt: {exc}"
            shutil.rmtree(path, ignore_errors=True)
            manifest = None
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
    if discarded:
        info["cache_discarded"] = discarded
    if train is not None:
        info["train"] = train(model)
    if use_cache and method.cacheable:
        try:
            save_quantized(path, model, {"method": desc, "model": model_info["name"], "dtype": str(dtype),
                                         "quantize_s": info["quantize_s"], "calibration": info["calibration"],
                                         "train": info.get("train"), "method_report": method.report},
                           parameters=tuple(method.folded_parameters))
            info["cache_dir"] = str(path)
        except OSError as exc:  # a full cache disk costs a re-quantization later, not this cell
            info["cache_not_saved"] = f"{path}: {exc.strerror or exc}"
    return model, info
