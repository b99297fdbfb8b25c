"""``latency``: prefill time for a prompt of ``prompt_len`` tokens and decode speed for
``new_tokens`` greedy tokens with the KV cache, at each batch size; warm-up first, median and
p90 over ``repeats``; on a GPU every timed region is bracketed by ``torch.cuda.synchronize()``.
Speed-ups against FP16 are computed by the report from cells of the same run.
"""
from __future__ import annotations

import statistics
import time

import torch

from qbench import hookimpl
from qbench.method import kernel_paths
from qbench.params import Param
from qbench.suite import CellContext, Metric, MetricSpec, Suite


def _batch_sizes(text: str) -> list[int]:
    return [int(x) for x in str(text).split("+")]


def _check_batch_sizes(text: str) -> str | None:
    try:
        sizes = _batch_sizes(text)
    except ValueError:
        return "write batch sizes joined by '+', e.g. 1+8"
    return None if all(s > 0 for s in sizes) else "batch sizes must be positive"


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(model, ids: torch.Tensor, new_tokens: int, device: torch.device,
                    clock=time.perf_counter) -> tuple[float, float]:
    """Seconds for the prefill of ``ids`` and for ``new_tokens`` greedy decode steps after it
    (``clock``: the wall clock; a benchmark on a shared CPU may pass ``time.process_time``)."""
    _sync(device)
    start = clock()
    out = model(ids, use_cache=True)
    _sync(device)
    prefill = clock() - start
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = clock()
    for _ in range(new_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, clock() - start


class LatencySuite(Suite):
    name = "latency"
    description = "Prefill latency and decode tokens/s (median, p90) at several batch sizes"
    params = {
        "prompt_len": Param(int, 128, "prompt tokens", check=lambda v: None if v > 0 else "must be positive"),
        "new_tokens": Param(int, 16, "decoded tokens", check=lambda v: None if v > 0 else "must be positive"),
        "batch_sizes": Param(str, "1+4", "batch sizes joined by '+'", check=_check_batch_sizes),
        "repeats": Param(int, 3, "timed repeats", check=lambda v: None if v > 0 else "must be positive"),
        "warmup": Param(int, 1, "untimed warm-up runs", check=lambda v: None if v >= 0 else "must be >= 0"),
    }

    # Batch 1 is the headline (decode is memory-bound there); other batch sizes with --columns all.
    metrics = {
        "prefill_ms_b1": MetricSpec("prefill b1 (ms)", higher_is_better=False),
        "decode_tok_s_b1": MetricSpec("decode b1 (tok/s)", higher_is_better=True, vs_baseline="ratio",
                                      baseline_title="decode speed-up"),
        "prefill_ms_b*": MetricSpec("prefill b{0} (ms)", higher_is_better=False, headline=False),
        "decode_tok_s_b*": MetricSpec("decode b{0} (tok/s)", higher_is_better=True, headline=False,
                                      vs_baseline="ratio", baseline_title="decode speed-up b{0}"),
        "prefill_ms_p90_b*": MetricSpec("prefill p90 b{0} (ms)", higher_is_better=False, headline=False),
        "decode_tok_s_p10_b*": MetricSpec("decode p10 b{0} (tok/s)", higher_is_better=True, headline=False),
        "decode_ms_per_step_p90_b*": MetricSpec("decode step p90 b{0} (ms)", higher_is_better=False, headline=False),
    }

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        v = self.values
        vocab = int(getattr(ctx.model.config, "vocab_size", 256))
        gen = torch.Generator().manual_seed(ctx.seed)
        metrics: dict[str, Metric] = {}
        for bs in _batch_sizes(v["batch_sizes"]):
            ids = torch.randint(0, vocab, (bs, v["prompt_len"]), generator=gen).to(ctx.device)
            for _ in range(v["warmup"]):
                time_generation(ctx.model, ids, min(4, v["new_tokens"]), ctx.device)
            prefills, decodes = [], []
            for _ in range(v["repeats"]):
                p, d = time_generation(ctx.model, ids, v["new_tokens"], ctx.device)
                prefills.append(p)
                decodes.append(d)
            tok_s = [bs * v["new_tokens"] / d for d in decodes]
            metrics[f"prefill_ms_b{bs}"] = Metric(round(1000 * statistics.median(prefills), 3), "ms")
            metrics[f"prefill_ms_p90_b{bs}"] = Metric(round(1000 * _p90(prefills), 3), "ms")
            metrics[f"decode_tok_s_b{bs}"] = Metric(round(statistics.median(tok_s), 2), "tokens/s")
            # p90 of the step time is the slow tail: the 10th percentile of throughput.
            metrics[f"decode_tok_s_p10_b{bs}"] = Metric(round(sorted(tok_s)[len(tok_s) // 10], 2), "tokens/s")
            metrics[f"decode_ms_per_step_p90_b{bs}"] = Metric(round(1000 * _p90(decodes) / v["new_tokens"], 3), "ms")
        ctx.extra["kernel_paths"] = kernel_paths(ctx.model)
        ctx.extra["timer"] = "perf_counter + cuda.synchronize" if ctx.device.type == "cuda" else "perf_counter"
        ctx.extra["threads"] = torch.get_num_threads()
        return metrics


@hookimpl
def register_suites(register):
    register(LatencySuite)
