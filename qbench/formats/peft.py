"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (what ``peft`` saves and
loads onto the original model).

:func:`save_peft_adapter` writes to a temporary sibling directory and renames it into place, so a
run killed midway never leaves a half-written adapter.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbench.params import QBenchError
from qbench.quant.lora import lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _target_short_names(modules) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in modules})


def peft_config(model: nn.Module, base_model_name: str = "") -> dict[str, Any]:
    modules = lora_modules(model)
    if not modules:
        raise QBenchError("the model has no LoRA modules; nothing to save")
    first = modules[0][1]
    for name, m in modules:
        if (m.r, m.alpha, m.dropout_p) != (first.r, first.alpha, first.dropout_p):
            raise QBenchError(f"LoRA module {name} has different r/alpha/dropout from the others; "
                              "PEFT needs one setting")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name or None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p,
        "target_modules": _target_short_names(modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "revision": None,
    }


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in lora_modules(model):
        out[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().float().cpu().contiguous()
    return out


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str = "") -> Path:
    """Write the adapter to a temporary sibling directory, then rename it into place."""
    from safetensors.torch import save_file

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = peft_config(model, base_model_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(peft_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if target.exists():  # replace: the old adapter stays whole until the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter into a model that already has LoRA modules of the same shape."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise QBenchError(f"{directory} is not a PEFT adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    modules = dict(lora_modules(model))
    seen = set()
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match or match.group(1) not in modules:
            raise QBenchError(f"adapter key {key!r} does not match a LoRA module of this model")
        module = modules[match.group(1)]
        param = module.lora_A if match.group(2) == "A" else module.lora_B
        if param.shape != value.shape:
            raise QBenchError(f"adapter {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
        seen.add(key)
    missing = [n for n in modules if f"base_model.model.{n}.lora_A.weight" not in seen]
    if missing:
        raise QBenchError(f"adapter has no weights for LoRA module {missing[0]}")
    return model
