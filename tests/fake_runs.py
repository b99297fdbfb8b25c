"""Write small records.jsonl files by hand, for report and compare tests (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20
BYTE_METRICS = ("quantized_layer_bytes", "model_bytes", "peak_memory", "peak_activation_memory")


def record(method: str, suite: str, metrics: dict, status: str = "ok", model: str = "tiny-llama",
           protocol: str | None = None, message: str | None = None, when: str = "2026-01-01T00:00:00") -> dict:
    name = method.split(":")[0]
    rec = {
        "cell": f"{model}|{method}|{suite}",
        "status": status,
        "method": {"name": name, "params": {}, "label": method},
        "model": {"name": model},
        "suite": {"name": suite.split(":")[0], "params": {}, "label": suite},
        "dataset": {"name": "wikitext2", "protocol": protocol} if protocol else None,
        "dtype": {"requested": "auto", "computed": "float32"},
        # No specs, like records written before metrics carried them: the report asks the installed suites.
        "metrics": {k: {"value": v, "unit": "bytes" if k in BYTE_METRICS else ""} for k, v in metrics.items()},
        "quantization": {"quantize_s": 0.5},
        "notes": [],
        "env": {"device": "cpu (test)"},
        "finished_at": when,
    }
    if message:
        rec["message"] = message
    return rec


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "records.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return run_dir


def standard_run(run_dir: Path, nf4_ppl: float = 12.5, with_fidelity: bool = True) -> Path:
    """fp16, int8-absmax and nf4 on tiny-llama, with memory, latency, perplexity (and fidelity)."""
    recs = []
    for method, bits, mib, tok_s, ppl, kl in (("fp16", 16, 8.0, 100.0, 12.0, 0.0),
                                             ("int8-absmax", 8.25, 4.1, 120.0, 12.1, 0.002),
                                             ("nf4", 4.13, 2.06, 140.0, nf4_ppl, 0.03)):
        recs.append(record(method, "memory", {"bits_per_weight": bits, "quantized_layer_bytes": mib * MIB,
                                              "model_bytes": (mib + 1) * MIB}))
        recs.append(record(method, "latency", {"decode_tok_s_b1": tok_s, "prefill_ms_b1": 3.0,
                                               "decode_speedup_b1": tok_s / 100.0, "latency_trust": "ok"}))
        recs.append(record(method, "perplexity:seqlen=64", {"ppl": ppl}, protocol="wikitext2/gptq-s64/first-2"))
        if with_fidelity:
            recs.append(record(method, "fidelity", {"kl_mean": kl, "kl_p99": 5 * kl, "top1_agreement": 1 - 3 * kl},
                               protocol="wikitext2/fidelity-s512-vs-fp32/first-2"))
    return write_run(run_dir, recs)


def with_window_samples(rec: dict, nll_sums, tokens, key: str = "wikitext2/gptq-s64 text:abc", ids=None,
                        set_name: str = "windows") -> dict:
    """``rec`` with per-window samples as the perplexity suite keeps them, and its ppl (and the ppl's spec)
    computed from them: ppl = exp(Σ NLL / Σ tokens)."""
    import math

    ids = list(range(len(nll_sums))) if ids is None else list(ids)
    rec.setdefault("extra", {}).setdefault("samples", {})[set_name] = {
        "key": key, "ids": ids, "values": {"nll_sum": [float(v) for v in nll_sums], "tokens": list(tokens)}}
    rec["metrics"]["ppl"] = {"value": round(math.exp(sum(nll_sums) / sum(tokens)), 4), "unit": "", "title": "ppl",
                             "higher_is_better": False, "vs_baseline": "diff", "baseline_title": "ppl Δ vs fp16",
                             "samples": set_name, "statistic": ["exp_ratio", "nll_sum", "tokens"]}
    return rec
