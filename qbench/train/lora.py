"""LoRA on a frozen 16-bit base (method ``lora``), and what ``qlora`` shares with it.

* :class:`LoRALinearBase`: a frozen base linear plus trainable adapters
  ``y = base(x) + (alpha / r) * dropout(x) @ A.T @ B.T`` with ``A: [r, in]``, ``B: [out, r]``
  (PEFT's layout and initialisation: A Kaiming-uniform, B zero, so training starts from the
  base model). Adapters are fp32 whatever the compute dtype, as PEFT does by default
  (``autocast_adapter_dtype``): 16-bit adapters lose small AdamW updates.
* :class:`LoRALinear`: the base is the original weight in the compute dtype (fp16 LoRA).
* :func:`train_lora`: the training loop shared by ``lora`` and ``qlora`` (gradient
  checkpointing, paged AdamW, loss curve, tokens/s, peak memory, held-out loss before/after).
* :func:`save_peft_adapter` / :func:`load_peft_adapter`: adapters in the PEFT format
  (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight``), written to a temporary directory and renamed,
  so a run killed midway never leaves a half-written adapter.

List-valued parameters use ``+`` as separator (``target_modules=q_proj+v_proj``) because ``,``
separates parameters in the ``name:k=v,k=v`` syntax.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbench import hookimpl
from qbench.method import Method, QuantizedLinear, quantizable_linears, set_submodule
from qbench.params import Param, QBenchError
from qbench.suite import Metric

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------
# Modules


class LoRALinearBase(QuantizedLinear):
    """Frozen base + trainable fp32 LoRA adapters. Subclasses implement :meth:`base_forward`,
    :meth:`base_tensors`, :meth:`dequantized_weight` and the base part of ``config``."""

    def _init_lora(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                   device=None, generator: torch.Generator | None = None) -> None:
        self.training = False  # like a loaded model: dropout only once someone calls .train()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = int(r), float(alpha), float(dropout)
        self.scaling = self.alpha / self.r
        a = torch.empty(r, in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # = kaiming_uniform_(a=sqrt(5)), PEFT's default for A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=device))

    # subclasses -------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as the forward pass sees it (for merging and for PEFT comparisons)."""
        raise NotImplementedError

    # shared -----------------------------------------------------------------------------------
    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            return F.dropout(x, self.dropout_p, training=True)
        return x

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        xa = F.linear(self.lora_input(x).to(self.lora_A.dtype), self.lora_A)
        return (F.linear(xa, self.lora_B) * self.scaling).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = "reference"
        return self.base_forward(x) + self.lora_delta(x)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base_tensors(), "lora_A": self.lora_A.data, "lora_B": self.lora_B.data}

    def lora_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "r": self.r, "alpha": self.alpha, "dropout": self.dropout_p}

    def load_lora(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A"])
            self.lora_B.copy_(tensors["lora_B"])

    def base_param_count(self) -> int:
        """Frozen weights this module stands for (the linear's weight and bias)."""
        return self.weight_count + (self.out_features if getattr(self, "bias", None) is not None else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


class LoRALinear(LoRALinearBase):
    """LoRA on the original weight, kept frozen in the compute dtype (fp16/bf16/fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float,
                 dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_lora(in_features, out_features, r, alpha, dropout, weight.device, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    generator: torch.Generator | None = None) -> "LoRALinear":
        return cls(linear.weight, linear.bias, r, alpha, dropout, generator)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def config(self) -> dict[str, Any]:
        return self.lora_config()

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "LoRALinear":
        module = cls(tensors["weight"], tensors.get("bias"), config["r"], config["alpha"], config["dropout"])
        module.load_lora(tensors)
        return module


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinearBase]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinearBase)]


def train_only_adapters(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA A and B matrices."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# Parameters shared by lora and qlora


def _check_rank(r: int) -> str | None:
    return None if r >= 1 else "the LoRA rank must be >= 1 (QLoRA uses 8 to 64)"


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _check_dropout(p: float) -> str | None:
    return None if 0 <= p < 1 else "dropout must lie in [0, 1)"


LORA_PARAMS: dict[str, Param] = {
    "r": Param(int, 16, "LoRA rank (QLoRA: 64 on large models; at most min(in, out) of every target layer)", check=_check_rank),
    "alpha": Param(float, 16.0, "LoRA alpha; the update is scaled by alpha / r", check=_positive),
    "dropout": Param(float, 0.05, "dropout on the LoRA input during training", check=_check_dropout),
    "target_modules": Param(str, "all", "'all' decoder linears (as the QLoRA paper) or module names joined by '+', e.g. q_proj+v_proj"),
    "steps": Param(int, 20, "optimizer steps", check=_positive),
    "batch_size": Param(int, 4, "token windows per step", check=_positive),
    "seqlen": Param(int, 256, "tokens per window", check=_positive),
    "lr": Param(float, 2e-4, "learning rate (constant, as the QLoRA paper)", check=_positive),
    "weight_decay": Param(float, 0.0, "AdamW decoupled weight decay", check=lambda v: None if v >= 0 else "must be >= 0"),
    "max_grad_norm": Param(float, 0.3, "gradient clipping (QLoRA: 0.3); 0 disables", check=lambda v: None if v >= 0 else "must be >= 0"),
    "seed": Param(int, 0, "seed of the adapter initialisation, the data windows and dropout"),
    "gradient_checkpointing": Param(bool, True, "recompute activations in backward (HF non-reentrant checkpointing)"),
    "optimizer": Param(str, "paged", "paged (our paged AdamW), adamw (torch, state on the device) or bnb-paged (bitsandbytes, CUDA)",
                       choices=("paged", "adamw", "bnb-paged")),
    "train_dataset": Param(str, "c4", "text the runner samples training windows from (c4 sample or a dataset name/path)"),
    "eval_windows": Param(int, 8, "held-out windows for the loss before/after training (0: skip)",
                          check=lambda v: None if v >= 0 else "must be >= 0"),
    "adapter_dir": Param(str, None, "save the trained adapter here in PEFT format (default: the runner's output_dir/adapter, else not saved)"),
}


def parse_targets(text: str) -> list[str] | None:
    """``all`` -> None (every decoder linear); ``q_proj+v_proj`` -> ['q_proj', 'v_proj']."""
    if text.strip().lower() == "all":
        return None
    names = [t.strip() for t in text.split("+") if t.strip()]
    if not names:
        raise QBenchError("target_modules is empty; give 'all' or module names joined by '+', e.g. q_proj+v_proj")
    return names


def select_targets(model: nn.Module, target_text: str, r: int) -> list[tuple[str, nn.Module]]:
    """The decoder linears LoRA attaches to, validated against the model (names and rank)."""
    linears = list(quantizable_linears(model))
    short_names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    wanted = parse_targets(target_text)
    if wanted is not None:
        unknown = [w for w in wanted if w not in short_names]
        if unknown:
            raise QBenchError(f"unknown target module {unknown[0]!r}; this model's decoder linears are: "
                              f"{'+'.join(short_names)} (or 'all')")
        linears = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
    for name, module in linears:
        limit = min(module.in_features, module.out_features)
        if r > limit:
            raise QBenchError(f"LoRA rank r={r} is larger than layer {name} ({module.out_features}x{module.in_features}); "
                              f"use r <= {limit}")
    return linears


def attach_lora(model: nn.Module, values: dict[str, Any], make) -> nn.Module:
    """Replace each target linear by ``make(name, linear, generator)``; freeze everything else."""
    targets = select_targets(model, values["target_modules"], values["r"])
    generator = torch.Generator().manual_seed(values["seed"])
    for name, linear in targets:
        set_submodule(model, name, make(name, linear, generator))
    return train_only_adapters(model)


# ---------------------------------------------------------------------------------------------
# Training


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """CUDA max allocated on a GPU; the process's peak resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    return 0, "unavailable"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): total counts the frozen weights quantized modules stand for."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for _, module in model.named_modules():
        if isinstance(module, LoRALinearBase):
            total += module.base_param_count()
        elif isinstance(module, QuantizedLinear):
            total += module.weight_count
    return trainable, total


def model_max_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def check_train_inputs(model: nn.Module, data, values: dict[str, Any]) -> None:
    seqlen, batch = values["seqlen"], values["batch_size"]
    limit = model_max_length(model)
    if limit is not None and seqlen > limit:
        raise QBenchError(f"seqlen={seqlen} is above the model's limit of {limit} tokens; use seqlen <= {limit}")
    ids = getattr(data, "ids", None)
    if isinstance(ids, torch.Tensor) and ids.numel() < batch * seqlen + 1:
        name = getattr(getattr(data, "source", None), "name", "the training dataset")
        raise QBenchError(f"{name} has {ids.numel()} tokens, fewer than one batch of {batch}x{seqlen}; "
                          f"use a larger dataset or a smaller batch_size/seqlen")


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        losses.append(float(model(input_ids=batch, labels=batch).loss) * batch.shape[0])
    model.train(was_training)
    return sum(losses) / windows.shape[0]


def loss_windows(losses: list[float], points: int = 10) -> list[float]:
    """The loss curve as means over ``points`` consecutive windows of steps."""
    size = max(1, math.ceil(len(losses) / points))
    return [sum(losses[i:i + size]) / len(losses[i:i + size]) for i in range(0, len(losses), size)]


def enable_checkpointing(model: nn.Module, on: bool) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        if on:
            raise QBenchError(f"{type(model).__name__} does not support gradient checkpointing; use gradient_checkpointing=false")
        return
    # transformers >= 5.x renamed gradient_checkpointing_* to activation_checkpointing_*.
    # Non-reentrant: works with frozen embeddings (no enable_input_require_grads needed).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def train_lora(model: nn.Module, data, values: dict[str, Any], adapter_dir: str | None = None,
               base_model_name: str = "", extra_metrics: dict[str, Metric] | None = None) -> dict[str, Metric]:
    """Fine-tune the LoRA adapters of ``model`` in place; return the record's metrics."""
    from qbench.plugins.paged_adamw import make_optimizer

    modules = lora_modules(model)
    if not modules:
        raise QBenchError("the model has no LoRA modules to train; quantize it with the lora/qlora method first")
    check_train_inputs(model, data, values)
    steps, batch_size, seqlen, seed = values["steps"], values["batch_size"], values["seqlen"], values["seed"]
    device = next(model.parameters()).device
    windows = data.sample(steps * batch_size, seqlen, seed).to(device)
    held_out = data.sample(values["eval_windows"], seqlen, seed + 1).to(device) if values["eval_windows"] else None

    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(values["optimizer"], params, lr=values["lr"], weight_decay=values["weight_decay"])
    eval_before = mean_loss(model, held_out, batch_size) if held_out is not None else None

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is not None:
        config.use_cache = False
    enable_checkpointing(model, values["gradient_checkpointing"])
    model.train()
    torch.manual_seed(seed)  # dropout masks
    peak_memory_reset(device)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = windows[step * batch_size:(step + 1) * batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise QBenchError(f"training loss became {float(loss)} at step {step}; lower lr (now {values['lr']})")
            loss.backward()
            if values["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, values["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        model.eval()
        enable_checkpointing(model, False)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        for p in params:
            p.grad = None
    peak, peak_kind = peak_memory_bytes(device)
    eval_after = mean_loss(model, held_out, batch_size) if held_out is not None else None

    curve = loss_windows(losses)
    metrics = {
        "trainable_params": Metric(trainable, "params"),
        "trainable_pct": Metric(100.0 * trainable / total, "%"),
        "total_params": Metric(total, "params"),
        "loss_first": Metric(curve[0], "nats/token"),
        "loss_last": Metric(curve[-1], "nats/token"),
        "loss_mean": Metric(sum(losses) / len(losses), "nats/token"),
        "loss_curve": Metric(curve, "nats/token"),
        "tokens_per_s": Metric(steps * batch_size * seqlen / seconds, "tokens/s"),
        "train_seconds": Metric(seconds, "s"),
        "peak_memory_bytes": Metric(peak, f"bytes ({peak_kind})"),
    }
    if hasattr(optimizer, "state_bytes_on_host"):
        metrics["optimizer_state_host_bytes"] = Metric(optimizer.state_bytes_on_host(), "bytes")
    if eval_before is not None:
        metrics["eval_loss_before"] = Metric(eval_before, "nats/token")
        metrics["eval_loss_after"] = Metric(eval_after, "nats/token")
    if extra_metrics:
        metrics.update(extra_metrics)
    if adapter_dir:
        save_peft_adapter(model, adapter_dir, base_model_name)
        metrics["adapter_dir"] = Metric(str(adapter_dir), "path")
    return metrics


# ---------------------------------------------------------------------------------------------
# PEFT format


def _target_short_names(modules) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in modules})


def peft_config(model: nn.Module, base_model_name: str = "") -> dict[str, Any]:
    modules = lora_modules(model)
    if not modules:
        raise QBenchError("the model has no LoRA modules; nothing to save")
    first = modules[0][1]
    for name, m in modules:
        if (m.r, m.alpha, m.dropout_p) != (first.r, first.alpha, first.dropout_p):
            raise QBenchError(f"LoRA module {name} has different r/alpha/dropout from the others; PEFT needs one setting")
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


# ---------------------------------------------------------------------------------------------
# The fp16 LoRA method


class LoRAMethod(Method):
    name = "lora"
    description = "LoRA adapters on the frozen 16-bit model (the fp16-LoRA baseline of QLoRA), trained in a train stage"
    params = dict(LORA_PARAMS)
    cacheable = True
    can_train = True

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        return attach_lora(model, v, lambda name, linear, gen: LoRALinear.from_linear(
            linear, v["r"], v["alpha"], v["dropout"], gen))

    def train(self, model: nn.Module, tokenizer, data, **train_params) -> dict[str, Any]:
        return train_lora(model, data, self.values, adapter_location(self.values, train_params),
                          train_params.get("model_name", ""))


def adapter_location(values: dict[str, Any], train_params: dict[str, Any]) -> str | None:
    if values.get("adapter_dir"):
        return values["adapter_dir"]
    if train_params.get("output_dir"):
        return str(Path(train_params["output_dir"]) / "adapter")
    return None


@hookimpl
def register_methods(register):
    register(LoRAMethod)
