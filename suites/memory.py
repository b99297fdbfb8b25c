"""``memory``: exact bytes of what each method stores, and measured peak memory.

* quantized-layer bytes: the sum over every ``QuantizedLinear`` of ``stored_tensors()`` (packed
  codes, scales, zero points, code books, bias) — exact, not estimated;
* bits per weight of those layers, and bytes per weight beside the seeds' table
  (FP32 4, FP16 2, INT8 1, 4-bit ≈ 0.5 bytes per parameter);
* resident bytes of those layers: what they hold in memory (``resident_tensors()``), which differs
  from the stored format where a CPU kernel's own layout of the weight, built at load time, holds it;
* whole-model bytes: every parameter and buffer held, kernel layouts included (tied tensors once);
* peak memory of one forward pass (:class:`qbench.memory.PeakMemory`): CUDA max allocated on a GPU,
  process peak RSS (VmHWM, reset through /proc/self/clear_refs) on CPU, and its rise during the pass.
"""
from __future__ import annotations

import os

import torch

from qbench import hookimpl
from qbench.memory import PeakMemory
from qbench.method import QuantizedLinear, quantizable_linears, quantized_modules
from qbench.params import Param
from qbench.suite import CellContext, Metric, MetricSpec, Suite

# The seeds' bytes-per-parameter table, by the bits of the code.
SEED_BYTES_PER_PARAM = {32: 4.0, 16: 2.0, 8: 1.0, 4: 0.5}
CLAIM_TOLERANCE_PCT = 15  # the notes round (4-bit "≈ 0.5"): within 15% of the table counts as holding


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds, each tensor once (tied embeddings share one)."""
    tensors = []
    inside: set[int] = set()  # modules held inside a QuantizedLinear: its stored_tensors() cover them
    for module in model.modules():  # parents come before their children
        if id(module) in inside:
            continue
        if isinstance(module, QuantizedLinear):
            tensors.extend(module.resident_tensors().values())  # stored format and/or a kernel's own layout
            inside.update(id(m) for m in module.modules())
            continue
        tensors.extend(module.parameters(recurse=False))
        tensors.extend(b for b in module.buffers(recurse=False) if b is not None)
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_layer_bytes(model: torch.nn.Module, resident: bool = False) -> tuple[int, int]:
    """(bytes stored, weights represented) over the decoder linears, quantized or not; with
    ``resident``, the bytes held in memory instead (``resident_tensors()``: a CPU kernel's layout)."""
    stored = weights = 0
    for _, q in quantized_modules(model):
        stored += q.resident_bytes() if resident else q.storage_bytes()
        weights += q.weight_count
    for _, linear in quantizable_linears(model):  # layers a method left in float
        stored += sum(p.numel() * p.element_size() for p in linear.parameters())
        weights += linear.weight.numel()
    return stored, weights


class MemorySuite(Suite):
    name = "memory"
    description = "Exact stored bytes, bits per weight, whole-model bytes, peak memory of a forward pass"
    params = {
        "seqlen": Param(int, 512, "tokens in the forward pass whose peak memory is measured",
                        check=lambda v: None if v > 0 else "must be positive"),
    }
    metrics = {
        "bits_per_weight": MetricSpec("bits/weight", higher_is_better=False),
        "bytes_per_weight": MetricSpec("bytes/weight", higher_is_better=False),
        "seed_claim_bytes_per_param": MetricSpec("notes' bytes/param"),
        "overhead_vs_seed_claim": MetricSpec("overhead vs notes (%)", higher_is_better=False, headline=False),
        "quantized_layer_bytes": MetricSpec("quantized layers (MiB)", higher_is_better=False, display_unit="MiB",
                                            vs_baseline="ratio", baseline_title="memory vs fp16"),
        "quantized_weights": MetricSpec("quantized weights", headline=False),
        "resident_layer_bytes": MetricSpec("resident layers (MiB)", higher_is_better=False, display_unit="MiB"),
        "resident_bits_per_weight": MetricSpec("resident bits/weight", higher_is_better=False, headline=False),
        "model_bytes": MetricSpec("model (MiB)", higher_is_better=False, display_unit="MiB"),
        "model_bytes_per_param": MetricSpec("model bytes/param", higher_is_better=False, headline=False),
        "peak_memory": MetricSpec("peak mem (MiB)", higher_is_better=False, display_unit="MiB"),
        "peak_activation_memory": MetricSpec("forward peak Δ (MiB)", higher_is_better=False, display_unit="MiB"),
    }

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        model = ctx.model
        stored, weights = quantized_layer_bytes(model)
        resident, _ = quantized_layer_bytes(model, resident=True)
        total = model_bytes(model)
        bits = 8 * stored / weights if weights else float("nan")
        metrics = {
            "quantized_layer_bytes": Metric(stored, "bytes"),
            "quantized_weights": Metric(weights, "weights"),
            "bits_per_weight": Metric(round(bits, 4), "bits"),
            "bytes_per_weight": Metric(round(bits / 8, 5), "bytes"),
            "resident_layer_bytes": Metric(resident, "bytes"),
            "resident_bits_per_weight": Metric(round(8 * resident / weights, 4) if weights else float("nan"), "bits"),
            "model_bytes": Metric(total, "bytes"),
            "model_bytes_per_param": Metric(round(total / ctx.model_info["params"], 5), "bytes"),
        }
        if resident != stored:
            ctx.notes.append("resident layers: what the quantized layers hold in memory, which differs from the "
                             "stored format (bits/weight) where a CPU kernel's own layout of the weights, built at "
                             "load time, holds them")
        nominal = getattr(ctx.method, "nominal_bits", None)
        if nominal in SEED_BYTES_PER_PARAM:
            claim = SEED_BYTES_PER_PARAM[nominal]
            metrics["seed_claim_bytes_per_param"] = Metric(claim, "bytes")
            off = 100 * (bits / 8 / claim - 1)
            metrics["overhead_vs_seed_claim"] = Metric(round(off, 2), "%")
            if weights:
                holds = abs(off) <= CLAIM_TOLERANCE_PCT
                verdict = f"{'holds' if holds else 'does not hold'} (within {CLAIM_TOLERANCE_PCT}%)"
                ctx.claims.append({"claim": f"{claim:g} bytes per parameter",
                                   "measured": f"{bits / 8:.4g} bytes/weight in the quantized layers ({off:+.1f}%)",
                                   "verdict": verdict})

        seqlen = min(self.values["seqlen"], ctx.model_info.get("max_length", self.values["seqlen"]))
        gen = torch.Generator().manual_seed(ctx.seed)
        vocab = int(getattr(model.config, "vocab_size", 256))
        ids = torch.randint(0, vocab, (1, seqlen), generator=gen).to(ctx.device)
        with PeakMemory(ctx.device) as memory, torch.no_grad():
            model(ids)
        if memory.peak is not None:
            metrics["peak_memory"] = Metric(memory.peak, "bytes")
        if memory.rise is not None:
            metrics["peak_activation_memory"] = Metric(memory.rise, "bytes")
        ctx.extra["peak_memory_kind"] = memory.kind
        if ctx.device.type != "cuda":
            ctx.notes.append("peak mem on CPU is the process's peak resident memory during one forward pass: it also "
                             "holds the libraries a method imports and memory kept from loading or quantizing, so it "
                             "differs between methods for reasons besides their forward pass; forward peak Δ (the "
                             "rise during the pass) is the comparable part")
            if os.environ.get("OMP_NUM_THREADS"):
                ctx.extra["omp_threads"] = os.environ["OMP_NUM_THREADS"]
        ctx.extra["peak_memory_seqlen"] = seqlen
        return metrics


@hookimpl
def register_suites(register):
    register(MemorySuite)
