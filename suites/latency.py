"""``latency``: prefill time for a prompt of ``prompt_len`` tokens and greedy decode speed for
``new_tokens`` tokens with the KV cache, at each batch size; warm-up first, median and p90 over
``repeats``.

**Timing.** On a GPU every region is timed with CUDA events (``torch.cuda.Event``) after the
warm-up runs, on CPU with ``time.perf_counter``. ``compile`` chooses the decode step:
``none`` (eager, the dynamic KV cache), ``torch-compile`` (``torch.compile`` of the step over
transformers' static cache; ``mode="reduce-overhead"`` on a GPU, which replays CUDA graphs) or
``cuda-graphs`` (the step captured once in a ``torch.cuda.CUDAGraph`` and replayed; GPU only).
Prefill is eager in every mode. Compilation and capture happen before the warm-up, never inside
a timed region. The record says which mode ran and the kernel path every quantized layer took in
prefill and in decode (counted per path and per layer shape).

**Speed-ups from paired measurements.** With ``baseline=fp16`` (the default; or bf16, fp32,
none) the cell also builds the baseline model — the same model loader, then the baseline
method's own ``quantize`` — and times it in the same process, interleaved with the method:
repeat ``i`` times method then baseline for even ``i`` and the reverse for odd ``i`` (A B B A
…), so both see the same machine and neither always goes first. Each repeat gives a ratio
``baseline time / method time`` (above 1: the method is faster); the speed-up is the geometric
mean of the ratios with a 95% t-interval on their logarithms (``exp(mean ± t(0.975, n-1) · sd/√n)``;
no interval with one repeat). A drift of the machine's speed between cells minutes apart does
not move it.

**Trust.** Over each batch size's timed repeats the cell records the machine's load
(:mod:`qbench.cpuload`: the other processes' CPU use, the cell's own, steal time, load average)
and the spread of the method's times over repeats (coefficient of variation). The cell's
``latency_trust`` is ``ok`` unless one of these held (then ``noisy: <why>``, and a note):

* other processes used more CPU than the cell left idle, plus ``CONTENTION_SLACK_CORES`` (the
  cell wants ``threads`` cores on CPU, one on a GPU);
* the hypervisor stole more than ``NOISY_STEAL`` of the CPU time;
* the method's prefill or decode times vary by more than ``NOISY_CV`` (stdev / mean) over repeats.

A noisy cell's absolute times are suspect; its paired speed-up is still taken A B B A, and its
interval says how far it can be trusted.
"""
from __future__ import annotations

import gc
import inspect
import math
import statistics
import time
from collections import Counter
from typing import Any, Callable

import torch

from qbench import cpuload, hookimpl
from qbench.params import Param, QBenchError, QBenchSkip
from qbench.suite import CellContext, Metric, MetricSpec, Suite

BASELINES = ("fp16", "bf16", "fp32", "none")
COMPILE_MODES = ("none", "torch-compile", "cuda-graphs")

# The trust rule (see the module doc); README "Latency on a busy machine" shows a flagged cell.
NOISY_CV = 0.10
NOISY_STEAL = 0.05
CONTENTION_SLACK_CORES = 0.25

# Two-sided 95% quantiles of Student's t by degrees of freedom; between entries the smaller df's
# (larger) value is used, so the interval is never narrower than it should be.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


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


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (conservative between table entries)."""
    if df < 1:
        raise ValueError("t975 needs at least one degree of freedom")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def paired_speedup(baseline_s: list[float], method_s: list[float]) -> tuple[float, tuple[float, float] | None]:
    """Geometric mean of ``baseline / method`` over paired repeats and its 95% t-interval on the log
    ratios (None with fewer than two pairs)."""
    logs = [math.log(b / m) for b, m in zip(baseline_s, method_s)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), None
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), (math.exp(mean - half), math.exp(mean + half))


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def coefficient_of_variation(values: list[float]) -> float | None:
    if len(values) < 2 or statistics.fmean(values) <= 0:
        return None
    return statistics.stdev(values) / statistics.fmean(values)


def trust_verdict(load: dict | None, cvs: dict[str, float | None], demand_cores: float) -> tuple[str, list[str]]:
    """("ok" or "noisy: <short why>", the reasons in full) by the rule in the module doc."""
    reasons, short = [], []
    if load:
        spare = max(0.0, load["cpus"] - demand_cores)
        if load["others_cores"] > spare + CONTENTION_SLACK_CORES:
            short.append(f"others used {load['others_cores']:.2f} of {load['cpus']} cores")
            reasons.append(f"other processes used {load['others_cores']:.2f} of the {load['cpus']} cores while it "
                           f"timed (it wanted {demand_cores:g}, so at most {spare + CONTENTION_SLACK_CORES:.2f} "
                           f"could go to others)")
        if load["steal"] > NOISY_STEAL:
            short.append(f"steal {load['steal']:.0%}")
            reasons.append(f"the hypervisor stole {load['steal']:.0%} of the CPU time (limit {NOISY_STEAL:.0%})")
    spread = {k: v for k, v in cvs.items() if v is not None and v > NOISY_CV}
    if spread:
        worst = max(spread, key=spread.get)
        short.append(f"{worst} cv {spread[worst]:.0%}")
        reasons.append("times vary over repeats: " + ", ".join(f"{k} cv {v:.0%}" for k, v in spread.items())
                       + f" (limit {NOISY_CV:.0%})")
    return ("ok" if not short else "noisy: " + "; ".join(short)), reasons


def _merge_load(windows: list[dict]) -> dict | None:
    """The worst of the timed windows (one per batch size): most CPU used by others, most steal."""
    windows = [w for w in windows if w]
    if not windows:
        return None
    return {"cpus": windows[0]["cpus"],
            "others_cores": max(w["others_cores"] for w in windows),
            "own_cores": min(w["own_cores"] for w in windows),
            "steal": max(w["steal"] for w in windows),
            "loadavg_before": windows[0]["loadavg_before"], "loadavg_after": windows[-1]["loadavg_after"]}


# --- transformers' cache argument: `past_key_values` until 5.2x, `cache` after (the old name warns) ----

def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


# --- kernel paths ------------------------------------------------------------------------------------

def kernel_path_snapshot(model) -> dict[str, tuple[str, str]]:
    """{module name: (kernel path it last took, "out x in")} for every module that records one."""
    snap = {}
    for name, module in model.named_modules():
        path = getattr(module, "kernel_path", None)
        if path is not None and hasattr(module, "in_features"):
            snap[name] = (str(path), f"{module.out_features}x{module.in_features}")
    return snap


def summarize_paths(snapshot: dict[str, tuple[str, str]], max_listed: int = 16) -> dict[str, Any]:
    """Counts per path and per layer shape, and the layers whose path differs from the most common
    one of their shape (at most ``max_listed`` named), so a 7B model's record stays small."""
    by_path = Counter(path for path, _ in snapshot.values())
    by_shape: dict[str, Counter] = {}
    for path, shape in snapshot.values():
        by_shape.setdefault(shape, Counter())[path] += 1
    usual = {shape: counts.most_common(1)[0][0] for shape, counts in by_shape.items()}
    odd = [f"{name}: {path}" for name, (path, shape) in snapshot.items() if path != usual[shape]]
    out = {"layers": len(snapshot), "by_path": dict(by_path),
           "by_shape": {shape: dict(counts) for shape, counts in by_shape.items()}}
    if odd:
        out["differing"] = odd[:max_listed] + ([f"... {len(odd) - max_listed} more"] if len(odd) > max_listed else [])
    return out


# --- one model's prefill + decode ----------------------------------------------------------------------

class Timer:
    """Seconds of a region: CUDA events on a GPU (the stream's time, after the work queued before
    it), ``clock`` (``perf_counter``) on CPU."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.cuda = device.type == "cuda"
        self.device, self.clock = device, clock
        self.name = "cuda events" if self.cuda else getattr(clock, "__name__", "clock")

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, result
        start = self.clock()
        result = fn()
        return self.clock() - start, result


class Generation:
    """Greedy generation of one model in one decode mode, for one batch size at a time."""

    def __init__(self, model, mode: str, device: torch.device):
        self.model, self.mode, self.device = model, mode, device
        self.kw = _cache_kwarg(model)
        self.cache = None
        self._dynamic = None
        self.step: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.graph = None

    def _forward(self, ids: torch.Tensor, cache) -> tuple[torch.Tensor, Any]:
        out = self.model(ids, use_cache=True, **({self.kw: cache} if cache is not None else {}))
        return out.logits[:, -1:].argmax(-1), _output_cache(out)

    def prepare(self, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict[str, Any]:
        """Set up the decode step for ``batch`` (static cache, compile, graph capture) and run each
        phase once eagerly; returns the kernel paths of that eager prefill and decode step."""
        if self.mode != "none":
            from transformers import StaticCache

            # room for the prompt, the decoded tokens and the steps run here before timing
            self.cache = StaticCache(config=self.model.config, max_cache_len=prompt_len + new_tokens + 8)
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(self.device)
        with torch.no_grad():
            token = self.prefill(ids)
            prefill_paths = kernel_path_snapshot(self.model)
            token, cache = self._forward(token, self.cache if self.mode != "none" else self._dynamic)
            decode_paths = kernel_path_snapshot(self.model)
            if self.mode == "torch-compile":
                self._compile()
                for _ in range(3):  # compile, then (reduce-overhead) record the CUDA graph: never in a timed run
                    token = self.step(token)
            elif self.mode == "cuda-graphs":
                self._capture(token)
        return {"prefill": summarize_paths(prefill_paths), "decode": summarize_paths(decode_paths)}

    def _eager_step(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token, self.cache)[0]

    def _compile(self) -> None:
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        compiled = torch.compile(self._eager_step, mode=mode, dynamic=False)

        def step(token):
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # each call may overwrite the last one's output
            return compiled(token).clone()

        self.step = step

    def _capture(self, token: torch.Tensor) -> None:
        static_token = token.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up off the default stream, as graph capture requires
            for _ in range(2):
                self._eager_step(static_token)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_token.copy_(self._eager_step(static_token))
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise QBenchError(f"latency:compile=cuda-graphs: capturing the decode step failed ({type(exc).__name__}: "
                              f"{first}); use compile=torch-compile or none") from None
        self.graph, self.static_token = graph, static_token

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            token, self._dynamic = self._forward(ids, None)
            return token
        self.cache.reset()
        return self._forward(ids, self.cache)[0]

    def decode(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        if self.graph is not None:
            self.static_token.copy_(token)
            for _ in range(steps):
                self.graph.replay()
            return self.static_token
        if self.step is not None:
            for _ in range(steps):
                token = self.step(token)
            return token
        cache = self._dynamic if self.mode == "none" else self.cache
        for _ in range(steps):
            token, cache = self._forward(token, cache)
        return token

    @torch.no_grad()
    def timed(self, timer: Timer, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """Seconds of the prefill of ``ids`` and of ``new_tokens`` decode steps after it."""
        prefill_s, token = timer(lambda: self.prefill(ids))
        decode_s, _ = timer(lambda: self.decode(token, new_tokens))
        return prefill_s, decode_s


def time_generation(model, ids: torch.Tensor, new_tokens: int, device: torch.device,
                    clock=time.perf_counter) -> tuple[float, float]:
    """Seconds for one eager prefill of ``ids`` and ``new_tokens`` greedy decode steps after it (the
    suite's :class:`Generation` without a static cache), on ``clock`` where the CPU is timed
    (scripts/bench_cpu_kernels.py may pass ``time.process_time``)."""
    return Generation(model, "none", device).timed(Timer(device, clock), ids, new_tokens)


def _same_method(method, baseline) -> bool:
    return method is not None and method.name == baseline.name and dict(method.values) == dict(baseline.values)


class LatencySuite(Suite):
    name = "latency"
    description = ("Prefill latency and decode tokens/s (median, p90) at several batch sizes; speed-ups paired "
                   "with the baseline in the same process; machine load and a trust flag")
    params = {
        "prompt_len": Param(int, 128, "prompt tokens", check=lambda v: None if v > 0 else "must be positive"),
        "new_tokens": Param(int, 16, "decoded tokens", check=lambda v: None if v > 0 else "must be positive"),
        "batch_sizes": Param(str, "1+4", "batch sizes joined by '+'", check=_check_batch_sizes),
        "repeats": Param(int, 5, "timed repeats (each paired with one of the baseline)",
                         check=lambda v: None if v > 0 else "must be positive"),
        "warmup": Param(int, 1, "untimed warm-up runs", check=lambda v: None if v >= 0 else "must be >= 0"),
        "baseline": Param(str, "fp16", "method timed in the same process, interleaved, for paired speed-ups "
                          "(none: no pairing)", choices=BASELINES),
        "compile": Param(str, "none", "decode step: eager (none), torch.compile over a static cache, or one "
                         "CUDA graph (GPU only)", choices=COMPILE_MODES),
    }

    # Batch 1 is the headline (decode is memory-bound there); other batch sizes with --columns all.
    metrics = {
        "prefill_ms_b1": MetricSpec("prefill b1 (ms)", higher_is_better=False),
        "decode_tok_s_b1": MetricSpec("decode b1 (tok/s)", higher_is_better=True),
        "decode_speedup_b1": MetricSpec("decode speed-up b1 (paired)", higher_is_better=True),
        "latency_trust": MetricSpec("latency trust"),
        "prefill_speedup_b*": MetricSpec("prefill speed-up b{0} (paired)", higher_is_better=True, headline=False),
        "decode_speedup_b*": MetricSpec("decode speed-up b{0} (paired)", higher_is_better=True, headline=False),
        "prefill_ms_b*": MetricSpec("prefill b{0} (ms)", higher_is_better=False, headline=False),
        "decode_tok_s_b*": MetricSpec("decode b{0} (tok/s)", higher_is_better=True, headline=False),
        "prefill_ms_p90_b*": MetricSpec("prefill p90 b{0} (ms)", higher_is_better=False, headline=False),
        "decode_tok_s_p10_b*": MetricSpec("decode p10 b{0} (tok/s)", higher_is_better=True, headline=False),
        "decode_ms_per_step_p90_b*": MetricSpec("decode step p90 b{0} (ms)", higher_is_better=False, headline=False),
        "prefill_cv_b*": MetricSpec("prefill cv b{0} (%)", higher_is_better=False, headline=False, display_unit="%"),
        "decode_cv_b*": MetricSpec("decode cv b{0} (%)", higher_is_better=False, headline=False, display_unit="%"),
        "others_cpu_cores": MetricSpec("others' CPU while timing (cores)", higher_is_better=False, headline=False),
        "own_cpu_share": MetricSpec("cell's CPU share (%)", higher_is_better=True, headline=False, display_unit="%"),
        "cpu_steal": MetricSpec("CPU steal (%)", higher_is_better=False, headline=False, display_unit="%"),
        "loadavg_before": MetricSpec("load avg before", headline=False),
        "loadavg_after": MetricSpec("load avg after", headline=False),
    }

    def _baseline(self, ctx: CellContext):
        """(baseline model or None, why there is none)."""
        from qbench import host
        from qbench.models import load_model, model_spec

        name = self.values["baseline"]
        if name == "none":
            return None, "baseline=none"
        baseline = host.make_method(name, {})
        if _same_method(ctx.method, baseline):
            return None, "the method is the baseline"
        if getattr(baseline, "needs_calibration", False):
            raise QBenchError(f"latency:baseline={name}: a baseline that needs calibration cannot be paired")
        loaded = load_model(model_spec(ctx.model_info), dtype=ctx.dtype, device=ctx.device)
        model = baseline.quantize(loaded.model, None)
        model.eval()
        return model, baseline.label

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        v = self.values
        mode = v["compile"]
        if mode == "cuda-graphs" and ctx.device.type != "cuda":
            raise QBenchSkip("latency:compile=cuda-graphs needs a CUDA device; use compile=torch-compile on CPU")
        vocab = int(getattr(ctx.model.config, "vocab_size", 256))
        gen = torch.Generator().manual_seed(ctx.seed)
        timer = Timer(ctx.device)
        baseline_model, baseline_label = self._baseline(ctx)
        demand = 1.0 if ctx.device.type == "cuda" else float(torch.get_num_threads())
        metrics: dict[str, Metric] = {}
        windows, cvs, paired, paths = [], {}, {}, {}
        for bs in _batch_sizes(v["batch_sizes"]):
            ids = torch.randint(0, vocab, (bs, v["prompt_len"]), generator=gen).to(ctx.device)
            runs = {"method": Generation(ctx.model, mode, ctx.device)}
            if baseline_model is not None:
                runs["baseline"] = Generation(baseline_model, mode, ctx.device)
            for who, run in runs.items():
                phase_paths = run.prepare(bs, v["prompt_len"], v["new_tokens"], vocab)
                if who == "method":
                    paths[f"b{bs}"] = phase_paths
                for _ in range(v["warmup"]):
                    run.timed(timer, ids, v["new_tokens"])
            times = {who: {"prefill": [], "decode": []} for who in runs}
            before = cpuload.sample()
            for r in range(v["repeats"]):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for who in order:
                    p, d = runs[who].timed(timer, ids, v["new_tokens"])
                    times[who]["prefill"].append(p)
                    times[who]["decode"].append(d)
            windows.append(cpuload.between(before, cpuload.sample()))
            prefills, decodes = times["method"]["prefill"], times["method"]["decode"]
            tok_s = [bs * v["new_tokens"] / d for d in decodes]
            metrics[f"prefill_ms_b{bs}"] = Metric(round(1000 * statistics.median(prefills), 3), "ms")
            metrics[f"prefill_ms_p90_b{bs}"] = Metric(round(1000 * _p90(prefills), 3), "ms")
            metrics[f"decode_tok_s_b{bs}"] = Metric(round(statistics.median(tok_s), 2), "tokens/s")
            # p90 of the step time is the slow tail: the 10th percentile of throughput.
            metrics[f"decode_tok_s_p10_b{bs}"] = Metric(round(sorted(tok_s)[len(tok_s) // 10], 2), "tokens/s")
            metrics[f"decode_ms_per_step_p90_b{bs}"] = Metric(round(1000 * _p90(decodes) / v["new_tokens"], 3), "ms")
            for phase, values in (("prefill", prefills), ("decode", decodes)):
                cv = coefficient_of_variation(values)
                cvs[f"{phase} b{bs}"] = cv
                if cv is not None:
                    metrics[f"{phase}_cv_b{bs}"] = Metric(round(cv, 4), "fraction")
            if "baseline" in runs:
                paired[f"b{bs}"] = {"baseline_prefill_s": times["baseline"]["prefill"], "method_prefill_s": prefills,
                                    "baseline_decode_s": times["baseline"]["decode"], "method_decode_s": decodes}
                for phase in ("prefill", "decode"):
                    ratio, ci = paired_speedup(times["baseline"][phase], times["method"][phase])
                    metrics[f"{phase}_speedup_b{bs}"] = Metric(
                        _sig(ratio), "x", ci=None if ci is None else (_sig(ci[0]), _sig(ci[1])))
            elif baseline_label == "the method is the baseline":
                for phase in ("prefill", "decode"):
                    metrics[f"{phase}_speedup_b{bs}"] = Metric(1.0, "x")
        del baseline_model
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

        load = _merge_load(windows)
        trust, reasons = trust_verdict(load, cvs, demand)
        metrics["latency_trust"] = Metric(trust, "")
        if load:
            metrics["others_cpu_cores"] = Metric(load["others_cores"], "cores")
            metrics["own_cpu_share"] = Metric(round(min(1.0, load["own_cores"] / demand), 4), "fraction")
            metrics["cpu_steal"] = Metric(load["steal"], "fraction")
            if load["loadavg_before"] is not None:
                metrics["loadavg_before"] = Metric(round(load["loadavg_before"], 2), "")
                metrics["loadavg_after"] = Metric(round(load["loadavg_after"], 2), "")
        if reasons:
            ctx.extra["warnings"] = [f"latency timings are {trust} — absolute times are suspect; "
                                     "the paired speed-up's interval still holds (report: 'latency trust')"]
            ctx.notes.append(f"latency of {ctx.method.label if ctx.method else '?'}: noisy — " + "; ".join(reasons)
                             + "; its absolute times are suspect (the paired speed-up's interval still holds)")
        if v["repeats"] == 1:
            ctx.notes.append("latency: one repeat, so no spread and no interval on the paired speed-up")
        ctx.extra["load"] = {"windows": windows, "demand_cores": demand,
                             "rule": {"noisy_cv": NOISY_CV, "noisy_steal": NOISY_STEAL,
                                      "contention_slack_cores": CONTENTION_SLACK_CORES}}
        ctx.extra["paired"] = {"baseline": baseline_label, "order": "A B B A ... (method first on even repeats)",
                               "interval": "95% t-interval on log ratios", "times": paired}
        ctx.extra["compile"] = mode
        ctx.extra["kernel_paths_by_phase"] = paths
        ctx.extra["kernel_paths"] = sorted({p for per_bs in paths.values() for phase in per_bs.values()
                                            for p in phase["by_path"]})
        ctx.extra["timer"] = f"{timer.name}, {v['warmup']} warm-up run(s) per model and batch size"
        ctx.extra["threads"] = torch.get_num_threads()
        return metrics


@hookimpl
def register_suites(register):
    register(LatencySuite)
