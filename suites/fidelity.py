"""``fidelity``: how far the quantized model's next-token distribution is from the unquantized one.

On the same non-overlapping windows the perplexity suite uses (rows joined, tokenized once, cut
into ``seqlen``-token windows, tail dropped), an unquantized FP32 copy of the same model (loaded
again in this process; ``reference=float16`` halves its memory on a GPU) and the quantized model
each predict every next token. Per token:

* KL(P_ref ‖ P_quant) over the full vocabulary — the measure llama.cpp reports beside perplexity,
  more sensitive than perplexity to small differences;
* whether both models put the same token first (top-1 agreement).

Reported: KL mean, median, p99 and max over tokens, top-1 agreement, and both models' perplexity
on those windows. Computed window by window: only one window's logits (of each model) are held
at a time, plus one float per token for the percentiles. Works on any text (``--dataset
my.txt``), since it needs no reference split — only the reference model.

The record keeps, per window, the summed KL, the number of agreeing tokens, the quantized model's
NLL sum and the token count (``extra.samples.windows``), so a report compares two cells over the
same windows with paired intervals (mean KL, agreement and ppl; not the percentiles).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from qbench import hookimpl
from qbench.data import encode
from qbench.dtypes import FLOAT_DTYPES, short_name
from qbench.paired import sample_set_json, window_key
from qbench.params import Param, QBenchError
from qbench.suite import CellContext, Metric, MetricSpec, Suite


def reference_spec(model_info: dict) -> str:
    """The spec that loads the same model again (a local directory by its path, random:DIR by its config)."""
    from qbench.models import model_spec

    return model_spec(model_info)


def load_reference(model_info: dict, device: torch.device, dtype: torch.dtype = torch.float32):
    from qbench.models import load_model

    return load_model(reference_spec(model_info), dtype=dtype, device=device).model


@torch.no_grad()
def compare_window(reference, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One window: per-token KL(ref ‖ quant), per-token top-1 agreement, and each model's summed NLL."""
    ids = ids.unsqueeze(0)
    targets = ids[0, 1:]
    ref_logp = F.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
    quant_logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    # sum_v p_ref(v) * (log p_ref(v) - log p_quant(v)); rounding can make it a hair negative
    kl = F.kl_div(quant_logp, ref_logp, log_target=True, reduction="none").sum(-1).clamp_min(0)
    agree = ref_logp.argmax(-1) == quant_logp.argmax(-1)
    ref_nll = F.nll_loss(ref_logp, targets, reduction="sum").item()
    quant_nll = F.nll_loss(quant_logp, targets, reduction="sum").item()
    return kl.double().cpu(), agree.cpu(), ref_nll, quant_nll


def summarize(kl: torch.Tensor, agree: torch.Tensor, ref_nll: float, quant_nll: float) -> dict[str, Metric]:
    tokens = kl.numel()
    return {
        "kl_mean": Metric(float(kl.mean()), "nats/token"),
        "kl_median": Metric(float(kl.median()), "nats/token"),
        "kl_p99": Metric(float(torch.quantile(kl, 0.99)), "nats/token"),
        "kl_max": Metric(float(kl.max()), "nats/token"),
        "top1_agreement": Metric(round(float(agree.double().mean()), 6), "fraction"),
        "ppl": Metric(round(math.exp(quant_nll / tokens), 4), ""),
        "ppl_reference": Metric(round(math.exp(ref_nll / tokens), 4), ""),
        "tokens": Metric(tokens, "tokens"),
    }


class FidelitySuite(Suite):
    name = "fidelity"
    fp32_arithmetic = True  # compared with the baseline: no bf16 kernels on a CPU
    description = "KL divergence from the unquantized (FP32) model (mean, p99) and top-1 agreement, window by window"
    needs_dataset = True
    params = {
        "seqlen": Param(int, 512, "window length in tokens (capped at the model's limit)",
                        check=lambda v: None if v >= 2 else "must be at least 2"),
        "limit": Param(int, None, "number of windows (default: the run's --limit, else all)",
                       check=lambda v: None if v > 0 else "must be positive"),
        "reference": Param(str, "float32", "dtype of the unquantized reference model (float16 halves its "
                           "memory on a GPU)", choices=tuple(FLOAT_DTYPES)),
    }

    metrics = {
        "kl_mean": MetricSpec("KL mean (nats/token)", higher_is_better=False,
                              samples="windows", statistic=("ratio", "kl_sum", "tokens")),
        "kl_median": MetricSpec("KL median (nats/token)", higher_is_better=False, headline=False),
        "kl_p99": MetricSpec("KL p99 (nats/token)", higher_is_better=False),
        "kl_max": MetricSpec("KL max (nats/token)", higher_is_better=False, headline=False),
        "top1_agreement": MetricSpec("top-1 agree", higher_is_better=True,
                                     samples="windows", statistic=("ratio", "top1_agree", "tokens")),
        "ppl": MetricSpec("ppl (fidelity windows)", higher_is_better=False,
                          samples="windows", statistic=("exp_ratio", "nll_sum", "tokens")),
        "ppl_reference": MetricSpec("reference ppl (fidelity windows)", higher_is_better=False, headline=False),
        "eval_tokens_per_s": MetricSpec("fidelity eval (tok/s)", higher_is_better=True, headline=False),
    }

    def check_dataset(self, source, tokens: int, max_length: int) -> str | None:
        seqlen = min(self.values["seqlen"], max_length)
        if tokens < seqlen:
            return (f"dataset {source.name} has {tokens} tokens, fewer than one window of {seqlen}; "
                    f"use fidelity:seqlen=N with a smaller N or a longer text")
        return None

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        seqlen = min(self.values["seqlen"], ctx.model_info.get("max_length", self.values["seqlen"]))
        limit = self.values["limit"] if self.values["limit"] is not None else ctx.limit
        ids = encode(ctx.tokenizer, ctx.dataset.text())
        available = ids.numel() // seqlen
        if available == 0:
            raise QBenchError(f"dataset {ctx.dataset.name} has {ids.numel()} tokens, fewer than one window of "
                              f"{seqlen}; use fidelity:seqlen=N with a smaller N")
        used = available if limit is None else min(available, limit)
        ref_name = self.values["reference"]
        reference = load_reference(ctx.model_info, ctx.device, FLOAT_DTYPES[ref_name])
        kls, agrees, ref_nll, quant_nll, per_window_nll = [], [], 0.0, 0.0, []
        start = time.perf_counter()
        for w in range(used):
            window = ids[w * seqlen:(w + 1) * seqlen].to(ctx.device)
            kl, agree, r, q = compare_window(reference, ctx.model, window)
            kls.append(kl)
            agrees.append(agree)
            ref_nll += r
            quant_nll += q
            per_window_nll.append(q)
        elapsed = time.perf_counter() - start
        del reference
        kl, agree = torch.cat(kls), torch.cat(agrees)
        if not (torch.isfinite(kl).all() and math.isfinite(quant_nll)):
            raise QBenchError(f"non-finite KL in {int((~torch.isfinite(kl)).sum())} tokens: "
                              f"the quantized model's outputs are NaN/Inf")
        protocol = windows_protocol = f"{ctx.dataset.name}/fidelity-s{seqlen}-vs-{short_name(ref_name)}"
        if used < available:
            protocol += f"/first-{used}"
            ctx.notes.append(f"fidelity over the first {used} of {available} windows (--limit); "
                             f"pass --limit all for the whole text")
        ctx.protocol = protocol
        ctx.extra["samples"] = {"windows": sample_set_json(
            window_key(windows_protocol, ctx.dataset), range(used),
            {"kl_sum": [round(float(k.sum()), 8) for k in kls], "top1_agree": [int(a.sum()) for a in agrees],
             "nll_sum": [round(v, 6) for v in per_window_nll], "tokens": [int(k.numel()) for k in kls]})}
        ctx.extra["reference"] = {"model": reference_spec(ctx.model_info), "dtype": ref_name,
                                  "device": str(ctx.device)}
        ctx.extra["windows"] = {"used": used, "available": available, "tokens": int(ids.numel()),
                                "dropped_tail_tokens": int(ids.numel() - available * seqlen)}
        metrics = summarize(kl, agree, ref_nll, quant_nll)
        metrics["windows"] = Metric(used, "windows")
        metrics["eval_tokens_per_s"] = Metric(round(used * seqlen / elapsed, 1), "tokens/s")
        return metrics


@hookimpl
def register_suites(register):
    register(FidelitySuite)
