"""``perplexity``: the GPTQ evaluation protocol.

Join the split's rows with "\\n\\n", tokenize once, cut into non-overlapping windows of
``seqlen`` tokens (the tail that does not fill a window is dropped), take each window's mean
next-token NLL, and report ``ppl = exp(mean over windows)``. With ``limit`` only the first
``limit`` windows count; the record's protocol says so (``wikitext2/gptq-s2048/first-8``).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from qbench import hookimpl
from qbench.data import encode
from qbench.paired import sample_set_json, window_key
from qbench.params import Param, QBenchError
from qbench.suite import CellContext, Metric, MetricSpec, Suite


def windows(ids: torch.Tensor, seqlen: int, limit: int | None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def window_nlls(model, batch: torch.Tensor, device) -> list[float]:
    """Mean next-token NLL of each window (logits in fp32 so half-precision models are not penalised)."""
    out = []
    for row in batch:
        ids = row.unsqueeze(0).to(device)
        logits = model(ids).logits[0, :-1].float()
        out.append(F.cross_entropy(logits, ids[0, 1:]).item())
    return out


class PerplexitySuite(Suite):
    name = "perplexity"
    fp32_arithmetic = True  # compared with the baseline: no bf16 kernels on a CPU
    description = "Perplexity over non-overlapping windows of the test split (GPTQ protocol)"
    needs_dataset = True
    params = {
        "seqlen": Param(int, 2048, "window length in tokens (capped at the model's limit)",
                        check=lambda v: None if v >= 2 else "must be at least 2"),
        "limit": Param(int, None, "number of windows (default: the run's --limit, else all)",
                       check=lambda v: None if v > 0 else "must be positive"),
    }

    metrics = {
        "ppl": MetricSpec("ppl", higher_is_better=False, vs_baseline="diff", baseline_title="ppl Δ vs fp16",
                          samples="windows", statistic=("exp_ratio", "nll_sum", "tokens")),
        "nll": MetricSpec("NLL (nats/token)", higher_is_better=False, headline=False,
                          samples="windows", statistic=("ratio", "nll_sum", "tokens")),
        "eval_tokens_per_s": MetricSpec("ppl eval (tok/s)", higher_is_better=True, headline=False),
    }

    def check_dataset(self, source, tokens: int, max_length: int) -> str | None:
        """Checked before any cell starts: at least one full window."""
        seqlen = min(self.values["seqlen"], max_length)
        if tokens < seqlen:
            return (f"dataset {source.name} has {tokens} tokens, fewer than one window of {seqlen}; "
                    f"use perplexity:seqlen=N with a smaller N or a longer text")
        return None

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        seqlen = min(self.values["seqlen"], ctx.model_info.get("max_length", self.values["seqlen"]))
        limit = self.values["limit"] if self.values["limit"] is not None else ctx.limit
        ids = encode(ctx.tokenizer, ctx.dataset.text())
        total_windows = ids.numel() // seqlen
        if total_windows == 0:
            raise QBenchError(
                f"dataset {ctx.dataset.name} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                f"use perplexity:seqlen=N with a smaller N"
            )
        batch = windows(ids, seqlen, limit)
        start = time.perf_counter()
        nlls = window_nlls(ctx.model, batch, ctx.device)
        elapsed = time.perf_counter() - start
        if not all(math.isfinite(v) for v in nlls):
            bad = sum(not math.isfinite(v) for v in nlls)
            raise QBenchError(f"non-finite NLL in {bad} windows: the model's outputs are NaN/Inf")
        mean_nll = sum(nlls) / len(nlls)
        protocol = f"{ctx.dataset.name}/gptq-s{seqlen}"
        if len(nlls) < total_windows:
            protocol += f"/first-{len(nlls)}"
        ctx.protocol = protocol
        ctx.extra["windows"] = {"used": len(nlls), "available": total_windows, "tokens": int(ids.numel()),
                                "dropped_tail_tokens": int(ids.numel() - total_windows * seqlen)}
        tokens = seqlen - 1  # predicted tokens per window
        ctx.extra["samples"] = {"windows": sample_set_json(
            window_key(f"{ctx.dataset.name}/gptq-s{seqlen}", ctx.dataset), range(len(nlls)),
            {"nll_sum": [round(v * tokens, 6) for v in nlls], "tokens": [tokens] * len(nlls)})}
        if len(nlls) < total_windows:
            ctx.notes.append(f"perplexity over the first {len(nlls)} of {total_windows} windows (--limit); "
                             f"pass --limit all for the full split")
        return {
            "ppl": Metric(round(math.exp(mean_nll), 4), ""),
            "nll": Metric(round(mean_nll, 6), "nats/token"),
            "windows": Metric(len(nlls), "windows"),
            "eval_tokens_per_s": Metric(round(len(nlls) * seqlen / elapsed, 1), "tokens/s"),
        }


@hookimpl
def register_suites(register):
    register(PerplexitySuite)
