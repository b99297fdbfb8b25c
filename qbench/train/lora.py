"""Fine-tuning LoRA adapters, what the ``lora`` and ``qlora`` methods share.

* :data:`LORA_PARAMS` and :class:`LoRAFineTuning`: the parameters, the training data (``train_dataset``)
  and the train stage of both methods; each method plugin adds only its ``quantize``.
* :func:`train_lora`: the training loop (gradient checkpointing, paged AdamW, loss curve, tokens/s,
  peak memory through :class:`qbench.memory.PeakMemory`, held-out loss before/after), saving the
  adapter in the PEFT format (:mod:`qbench.formats.peft`).
* :func:`enable_checkpointing`: Hugging Face's non-reentrant gradient checkpointing on or off.

List-valued parameters use ``+`` as separator (``target_modules=q_proj+v_proj``) because ``,``
separates parameters in the ``name:k=v,k=v`` syntax.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbench.formats.peft import save_peft_adapter
from qbench.memory import PeakMemory
from qbench.method import Method, QuantizedLinear
from qbench.params import Param, QBenchError
from qbench.quant.lora import LoRALinearBase, lora_modules
from qbench.suite import Metric
from qbench.train.paged_adamw import make_optimizer


def _check_rank(r: int) -> str | None:
    return None if r >= 1 else "the LoRA rank must be >= 1 (QLoRA uses 8 to 64)"


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _check_dropout(p: float) -> str | None:
    return None if 0 <= p < 1 else "dropout must lie in [0, 1)"


LORA_PARAMS: dict[str, Param] = {
    "r": Param(int, 16, "LoRA rank (QLoRA: 64 on large models; at most min(in, out) of every target layer)",
               check=_check_rank),
    "alpha": Param(float, 16.0, "LoRA alpha; the update is scaled by alpha / r", check=_positive),
    "dropout": Param(float, 0.05, "dropout on the LoRA input during training", check=_check_dropout),
    "target_modules": Param(str, "all", "'all' decoder linears (as the QLoRA paper) or module names joined by '+', "
                                        "e.g. q_proj+v_proj"),
    "steps": Param(int, 20, "optimizer steps", check=_positive),
    "batch_size": Param(int, 4, "token windows per step", check=_positive),
    "seqlen": Param(int, 256, "tokens per window", check=_positive),
    "lr": Param(float, 2e-4, "learning rate (constant, as the QLoRA paper)", check=_positive),
    "weight_decay": Param(float, 0.0, "AdamW decoupled weight decay", check=_non_negative),
    "max_grad_norm": Param(float, 0.3, "gradient clipping (QLoRA: 0.3); 0 disables", check=_non_negative),
    "seed": Param(int, 0, "seed of the adapter initialisation, the data windows and dropout"),
    "gradient_checkpointing": Param(bool, True, "recompute activations in backward (HF non-reentrant checkpointing)"),
    "optimizer": Param(str, "paged", "paged (our paged AdamW), adamw (torch, state on the device) "
                                     "or bnb-paged (bitsandbytes, CUDA)",
                       choices=("paged", "adamw", "bnb-paged")),
    "train_dataset": Param(str, "c4", "text the training windows are drawn from (c4 sample or a dataset name/path)"),
    "eval_windows": Param(int, 8, "held-out windows for the loss before/after training (0: skip)",
                          check=_non_negative),
    "adapter_dir": Param(str, None, "save the trained adapter here in PEFT format "
                                    "(default: the runner's output_dir/adapter, else not saved)"),
}


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
            raise QBenchError(f"{type(model).__name__} does not support gradient checkpointing; "
                              "use gradient_checkpointing=false")
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
               base_model_name: str = "") -> dict[str, Metric]:
    """Fine-tune the LoRA adapters of ``model`` in place; return the record's metrics."""
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
    losses: list[float] = []
    try:
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            for step in range(steps):
                batch = windows[step * batch_size:(step + 1) * batch_size]
                loss = model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise QBenchError(f"training loss became {float(loss)} at step {step}; "
                                      f"lower lr (now {values['lr']})")
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
    }
    if memory.peak is not None:
        metrics["peak_memory_bytes"] = Metric(memory.peak, f"bytes ({memory.kind})")
    if hasattr(optimizer, "state_bytes_on_host"):
        metrics["optimizer_state_host_bytes"] = Metric(optimizer.state_bytes_on_host(), "bytes")
    if eval_before is not None:
        metrics["eval_loss_before"] = Metric(eval_before, "nats/token")
        metrics["eval_loss_after"] = Metric(eval_after, "nats/token")
    if adapter_dir:
        save_peft_adapter(model, adapter_dir, base_model_name)
        metrics["adapter_dir"] = Metric(str(adapter_dir), "path")
    return metrics


class LoRAFineTuning(Method):
    """What ``lora`` and ``qlora`` share: their parameters, the text they train on and the train stage.
    Subclasses set ``name``, ``description`` and implement ``quantize`` (attach adapters)."""

    params = dict(LORA_PARAMS)
    can_train = True

    def data_source(self, default: str) -> str:
        return self.values["train_dataset"] or default

    def train(self, model: nn.Module, tokenizer, data, **train_params) -> dict[str, Any]:
        return train_lora(model, data, self.values, adapter_location(self.values, train_params),
                          train_params.get("model_name", ""))


def adapter_location(values: dict[str, Any], train_params: dict[str, Any]) -> str | None:
    if values.get("adapter_dir"):
        return values["adapter_dir"]
    if train_params.get("output_dir"):
        return str(Path(train_params["output_dir"]) / "adapter")
    return None
