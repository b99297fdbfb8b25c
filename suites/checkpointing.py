"""``checkpointing``: what gradient checkpointing saves and costs, per sequence length and batch.

For methods that train — ``qlora``, ``lora`` (fp16 LoRA) and the float baselines ``fp16`` /
``bf16`` / ``fp32`` (full fine-tuning: every parameter trainable) — one training step (forward +
backward, no optimizer update so every step sees the same weights) runs with and without
Hugging Face's non-reentrant gradient checkpointing, on the same batch with the same seed.

Activation memory, two ways:

* **saved-tensor bytes** (exact, device-independent; :class:`qbench.memory.SavedTensorMeter`):
  the peak over forward *and* backward of the live bytes of tensors saved for backward,
  deduplicated by storage, parameters and buffers excluded, the tensors checkpointing recomputes
  in backward included. Weight *copies* made in the forward (16-bit weights upcast for CPU
  compute) count, because the step really holds them for the backward. If a future torch renames
  checkpoint's recomputation hook the suite says so in the record's notes (and the recompute is
  then not counted).
* **allocator peak** (:class:`qbench.memory.PeakMemory`): CUDA max allocated above the step's
  start on a GPU; on CPU the peak of torch.profiler's memory events (allocations minus frees, in
  time order) during the step.

Step time: ``repeats`` timed steps per mode after ``warmup``, modes alternated (off, on, on, off,
…) so drift hits both; the median ratio gives the overhead. Each configuration gets a verdict on
the notes' claim "saves 50–80% of activation memory at ~20–30% slower training".
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from qbench import hookimpl
from qbench.memory import PeakMemory, SavedTensorMeter
from qbench.params import Param, QBenchError
from qbench.quant.lora import lora_modules
from qbench.suite import CellContext, Metric, MetricSpec, Suite
from qbench.train.lora import enable_checkpointing

FULL_FINETUNE_METHODS = ("fp16", "bf16", "fp32")
CLAIM_TEXT = "gradient checkpointing saves 50–80% of activation memory at ~20–30% slower steps"
CLAIM_SAVED = (50.0, 80.0)
CLAIM_SLOWER = (20.0, 30.0)


def parse_sizes(text: str, what: str) -> list[int]:
    """``"128+512"`` -> [128, 512] (``+`` because ``,`` separates parameters)."""
    try:
        values = [int(t) for t in str(text).split("+") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise QBenchError(f"suite checkpointing: {what}={text!r} must be positive integers joined by '+', e.g. 128+512")
    return values


def _check_sizes(what):
    def check(text):
        try:
            parse_sizes(text, what)
        except QBenchError as exc:
            return str(exc).split(": ", 1)[-1]
        return None
    return check


# --------------------------------------------------------------------------- one training step


def set_trainable(model: nn.Module) -> str:
    """LoRA models train their adapters; other models train every parameter (full fine-tuning)."""
    modules = lora_modules(model)
    for p in model.parameters():
        p.requires_grad_(not modules)
    for _, m in modules:
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return "lora" if modules else "full"


def training_step(model: nn.Module, batch: torch.Tensor, checkpointing: bool, seed: int) -> float:
    enable_checkpointing(model, checkpointing)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # same dropout masks in both modes (checkpoint replays the RNG state)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocator_peak(model, batch, checkpointing, seed, device) -> tuple[int, str]:
    """(bytes, what they are): the allocator's peak above the step's start on CUDA, the peak of torch's
    own live allocations during the step on CPU."""
    for p in model.parameters():
        p.grad = None
    with PeakMemory(device, cpu="allocator") as mem:
        training_step(model, batch, checkpointing, seed)
    return mem.rise, mem.kind


def saved_tensor_peak(model, batch, checkpointing, seed) -> SavedTensorMeter:
    meter = SavedTensorMeter(model)
    with meter.measure():
        training_step(model, batch, checkpointing, seed)
    return meter


def grads_of(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


def verdict(saved_pct: float, slower_pct: float) -> str:
    def where(value, lo, hi):
        return "within" if lo <= value <= hi else ("below" if value < lo else "above")

    return (f"saves {saved_pct:.0f}% of activation memory ({where(saved_pct, *CLAIM_SAVED)} the claimed 50–80%) "
            f"at {slower_pct:+.0f}% step time ({where(slower_pct, *CLAIM_SLOWER)} the claimed ~20–30% slower)")


class CheckpointingSuite(Suite):
    name = "checkpointing"
    description = ("activation memory (saved-tensor bytes incl. recompute, allocator peak) and step time "
                   "of one training step with vs without gradient checkpointing")
    params = {
        "seqlens": Param(str, "128+512", "sequence lengths joined by '+'", check=_check_sizes("seqlens")),
        "batch_sizes": Param(str, "1+4", "batch sizes joined by '+'", check=_check_sizes("batch_sizes")),
        "repeats": Param(int, 5, "timed steps per mode (median)", check=lambda v: None if v >= 1 else "must be >= 1"),
        "warmup": Param(int, 1, "untimed steps per mode first", check=lambda v: None if v >= 0 else "must be >= 0"),
        "allocator": Param(bool, True, "also measure the allocator's peak (torch.profiler on CPU)"),
    }

    # Per configuration ("bs4_seq512."...): the two numbers of the notes' claim are headline columns.
    metrics = {
        "*.saved_pct_saved": MetricSpec("ckpt saves {0} (%)", higher_is_better=True),
        "*.time_overhead_pct": MetricSpec("ckpt slower {0} (%)", higher_is_better=False),
        "*.saved_bytes_without": MetricSpec("saved tensors {0} (MiB)", higher_is_better=False, headline=False,
                                            display_unit="MiB"),
        "*.saved_bytes_with": MetricSpec("saved tensors {0} ckpt (MiB)", higher_is_better=False, headline=False,
                                         display_unit="MiB"),
        "*.alloc_peak_without": MetricSpec("alloc peak {0} (bytes)", higher_is_better=False, headline=False),
        "*.alloc_peak_with": MetricSpec("alloc peak {0} ckpt (bytes)", higher_is_better=False, headline=False),
        "*.alloc_pct_saved": MetricSpec("alloc peak saved {0} (%)", higher_is_better=True, headline=False),
        "*.step_s_without": MetricSpec("step {0} (s)", higher_is_better=False, headline=False),
        "*.step_s_with": MetricSpec("step {0} ckpt (s)", higher_is_better=False, headline=False),
        "*.grad_max_rel_diff": MetricSpec("grad rel diff {0}", higher_is_better=False, headline=False),
        "*.verdict": MetricSpec("verdict {0}", headline=False),
    }

    def applies_to(self, method) -> str | None:
        if method.can_train or method.name in FULL_FINETUNE_METHODS:
            return None
        return (f"checkpointing measures training steps; method {method.name} does not train "
                f"(use qlora, lora or a float baseline: {', '.join(FULL_FINETUNE_METHODS)})")

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        model = ctx.model
        seqlens = parse_sizes(self.values["seqlens"], "seqlens")
        batches = parse_sizes(self.values["batch_sizes"], "batch_sizes")
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max(seqlens) > limit:
            raise QBenchError(f"suite checkpointing: seqlen {max(seqlens)} is above the model's limit of {limit}; "
                              f"use seqlens <= {limit}")
        vocab = getattr(config, "vocab_size", 256)
        device = next(model.parameters()).device
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        use_cache = getattr(config, "use_cache", None)
        if use_cache is not None:
            config.use_cache = False
        mode = set_trainable(model)
        model.train()
        metrics: dict[str, Metric] = {"trainable": Metric(mode, "lora adapters or full fine-tuning")}
        try:
            for batch_size in batches:
                for seqlen in seqlens:
                    gen = torch.Generator().manual_seed(ctx.seed)
                    batch = torch.randint(3, vocab, (batch_size, seqlen), generator=gen).to(device)
                    metrics.update(self._one(model, batch, ctx, device, f"bs{batch_size}_seq{seqlen}"))
        finally:
            enable_checkpointing(model, False)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
            model.train(was_training)
            if use_cache is not None:
                config.use_cache = use_cache
        return metrics

    def _one(self, model, batch, ctx, device, tag) -> dict[str, Metric]:
        seed = ctx.seed
        off = saved_tensor_peak(model, batch, False, seed)
        grads_off = grads_of(model)
        on = saved_tensor_peak(model, batch, True, seed)
        grads_on = grads_of(model)
        if not on.recompute_hooked:
            ctx.notes.append("checkpointing: torch.utils.checkpoint._recomputation_hook not found; "
                             "recomputed activations are not counted in saved-tensor bytes")
        diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(grads_on, grads_off))
        out = {
            f"{tag}.saved_bytes_without": Metric(off.peak, "bytes"),
            f"{tag}.saved_bytes_with": Metric(on.peak, "bytes"),
            f"{tag}.saved_pct_saved": Metric(100.0 * (1 - on.peak / off.peak), "%"),
            f"{tag}.recomputed_tensors": Metric(on.recomputed_tensors, "tensors"),
            f"{tag}.grad_max_rel_diff": Metric(diff, "max |g_on - g_off| / max |g_off|"),
        }
        if self.values["allocator"]:
            peak_off, kind = allocator_peak(model, batch, False, seed, device)
            peak_on, _ = allocator_peak(model, batch, True, seed, device)
            out[f"{tag}.alloc_peak_without"] = Metric(peak_off, f"bytes ({kind})")
            out[f"{tag}.alloc_peak_with"] = Metric(peak_on, f"bytes ({kind})")
            out[f"{tag}.alloc_pct_saved"] = Metric(100.0 * (1 - peak_on / peak_off) if peak_off else 0.0, "%")
        times = {False: [], True: []}
        for _ in range(self.values["warmup"]):
            for mode in (False, True):
                training_step(model, batch, mode, seed)
        for i in range(self.values["repeats"]):
            for mode in ((False, True) if i % 2 == 0 else (True, False)):
                _sync(device)
                start = time.perf_counter()
                training_step(model, batch, mode, seed)
                _sync(device)
                times[mode].append(time.perf_counter() - start)
        t_off, t_on = statistics.median(times[False]), statistics.median(times[True])
        slower = 100.0 * (t_on / t_off - 1)
        out[f"{tag}.step_s_without"] = Metric(t_off, "s")
        out[f"{tag}.step_s_with"] = Metric(t_on, "s")
        out[f"{tag}.time_overhead_pct"] = Metric(slower, "%")
        saved = out[f"{tag}.saved_pct_saved"].value
        out[f"{tag}.verdict"] = Metric(verdict(saved, slower), "")
        holds = CLAIM_SAVED[0] <= saved <= CLAIM_SAVED[1] and CLAIM_SLOWER[0] <= slower <= CLAIM_SLOWER[1]
        ctx.claims.append({"claim": CLAIM_TEXT, "measured": f"{tag}: {verdict(saved, slower)}",
                           "verdict": "holds" if holds else "does not hold"})
        for p in model.parameters():
            p.grad = None
        return out


@hookimpl
def register_suites(register):
    register(CheckpointingSuite)
