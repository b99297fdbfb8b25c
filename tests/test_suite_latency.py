"""The latency suite: paired speed-ups (interleaved A B B A with the baseline built in the cell, a
95% interval on the log ratios), the machine-load record and the trust rule, kernel paths per
phase, the decode modes (eager, torch.compile; CUDA graphs skip on CPU), and no deprecation noise
from transformers. Timings themselves are never asserted (the test machine is shared)."""
import math
import warnings

import pytest
import torch

from qbench import cpuload, host
from qbench.models import load_model
from qbench.params import QBenchError, QBenchSkip
from qbench.suite import CellContext
from qbench.suites import latency
from qbench.suites.latency import (
    CONTENTION_SLACK_CORES,
    NOISY_CV,
    Generation,
    LatencySuite,
    paired_speedup,
    summarize_paths,
    t975,
    trust_verdict,
)

FAST = {"prompt_len": 8, "new_tokens": 2, "batch_sizes": "1", "repeats": 2, "warmup": 0}


def context(method_name: str, params: dict | None = None) -> CellContext:
    loaded = load_model("tiny-llama")
    method = host.make_method(method_name, params or {})
    model = method.quantize(loaded.model)
    return CellContext(model=model, tokenizer=loaded.tokenizer, model_info=loaded.info, method=method,
                       device=torch.device("cpu"), dtype=torch.float32, dataset=None, limit=None, seed=0)


def test_paired_speedup_is_the_geometric_mean_with_a_t_interval_on_log_ratios():
    base, method = [2.0, 2.2, 1.8, 2.1], [1.0, 1.0, 1.0, 1.1]
    ratio, (low, high) = paired_speedup(base, method)
    logs = [math.log(b / m) for b, m in zip(base, method)]
    mean = sum(logs) / 4
    sd = (sum((x - mean) ** 2 for x in logs) / 3) ** 0.5
    assert ratio == pytest.approx(math.exp(mean))
    assert (low, high) == pytest.approx((math.exp(mean - 3.182 * sd / 2), math.exp(mean + 3.182 * sd / 2)))
    assert low < ratio < high
    # a constant ratio has no spread; one pair has no interval
    ratio, interval = paired_speedup([3.0, 6.0], [1.5, 3.0])
    assert ratio == pytest.approx(2.0) and interval == pytest.approx((2.0, 2.0))
    assert paired_speedup([3.0], [1.0]) == (pytest.approx(3.0), None)


def test_t_quantiles_are_conservative_between_table_entries():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(10) == 2.228
    assert t975(11) == t975(10) and t975(500) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_trust_rule():
    quiet = {"cpus": 2, "others_cores": 0.05, "own_cores": 1.9, "steal": 0.0}
    assert trust_verdict(quiet, {"decode b1": 0.02}, demand_cores=2) == ("ok", [])
    busy = dict(quiet, others_cores=1.2)
    verdict, reasons = trust_verdict(busy, {"decode b1": 0.02}, demand_cores=2)
    assert verdict == "noisy: others used 1.20 of 2 cores" and "1.20 of the 2 cores" in reasons[0]
    # on a GPU the cell wants one core: another process on 1 of 16 cores does not matter
    gpu_box = {"cpus": 16, "others_cores": 1.0, "own_cores": 1.0, "steal": 0.0}
    assert trust_verdict(gpu_box, {}, demand_cores=1)[0] == "ok"
    crowded = dict(gpu_box, others_cores=16 - 1 + CONTENTION_SLACK_CORES + 0.1)
    assert trust_verdict(crowded, {}, demand_cores=1)[0].startswith("noisy")
    verdict, _ = trust_verdict(quiet, {"prefill b1": NOISY_CV / 2, "decode b4": 2 * NOISY_CV}, demand_cores=2)
    assert verdict == "noisy: decode b4 cv 20%"
    assert trust_verdict(dict(quiet, steal=0.2), {}, 2)[0] == "noisy: steal 20%"
    assert trust_verdict(None, {"decode b1": None}, 2) == ("ok", [])  # nothing measured: nothing to flag


def test_cpu_load_window_arithmetic():
    tick = cpuload._TICKS
    a = cpuload.CpuSample(wall=10.0, busy=1000, steal=0, total=4000, own=100, cpus=2, loadavg=1.0)
    # 2 s on 2 CPUs: 4 s of CPU time; we used 1 s of it, others 2.5 s, 0.2 s stolen
    b = cpuload.CpuSample(wall=12.0, busy=1000 + int(3.5 * tick), steal=int(0.2 * tick), total=4000 + 4 * tick,
                          own=100 + tick, cpus=2, loadavg=3.0)
    w = cpuload.between(a, b)
    assert w["own_cores"] == pytest.approx(0.5) and w["others_cores"] == pytest.approx(1.25)
    assert w["steal"] == pytest.approx(0.05) and (w["loadavg_before"], w["loadavg_after"]) == (1.0, 3.0)
    assert cpuload.between(a, None) is None and cpuload.between(b, a) is None


def test_cpu_sample_reads_this_machine():
    s = cpuload.sample()
    if s is None:
        pytest.skip("no /proc here")
    assert s.cpus >= 1 and s.total >= s.busy >= 0 and s.own >= 0


def test_kernel_paths_are_counted_per_path_and_shape():
    snap = {f"layers.{i}.q": ("triton", "64x64") for i in range(3)}
    snap["layers.3.q"] = ("reference", "64x64")
    snap["layers.0.down"] = ("triton", "64x176")
    out = summarize_paths(snap)
    assert out["by_path"] == {"triton": 4, "reference": 1} and out["layers"] == 5
    assert out["by_shape"] == {"64x64": {"triton": 3, "reference": 1}, "64x176": {"triton": 1}}
    assert out["differing"] == ["layers.3.q: reference"]


def test_paired_cell_interleaves_method_and_baseline(monkeypatch):
    calls = []
    real = Generation.timed

    def spy(self, timer, ids, new_tokens):
        calls.append("method" if self.model is ctx.model else "baseline")
        return real(self, timer, ids, new_tokens)

    monkeypatch.setattr(Generation, "timed", spy)
    ctx = context("int8-absmax")
    m = LatencySuite(**{**FAST, "repeats": 4}).measure(ctx)
    assert calls == ["method", "baseline", "baseline", "method", "method", "baseline", "baseline", "method"]
    speedup = m["decode_speedup_b1"]
    assert speedup.unit == "x" and speedup.value > 0 and speedup.ci[0] <= speedup.value <= speedup.ci[1]
    times = ctx.extra["paired"]["times"]["b1"]
    assert len(times["baseline_decode_s"]) == len(times["method_decode_s"]) == 4
    assert ctx.extra["paired"]["baseline"] == "fp16"
    # the same ratio, recomputed from the recorded times
    assert speedup.value == pytest.approx(paired_speedup(times["baseline_decode_s"], times["method_decode_s"])[0],
                                          rel=1e-3)
    assert m["latency_trust"].value == "ok" or m["latency_trust"].value.startswith("noisy: ")
    # a noisy cell warns under its line in `qbench run` (and notes why in the report)
    assert ("warnings" in ctx.extra) == m["latency_trust"].value.startswith("noisy")
    if cpuload.sample() is not None:
        assert 0 <= m["own_cpu_share"].value <= 1 and m["others_cpu_cores"].unit == "cores"
        assert ctx.extra["load"]["windows"][0]["cpus"] >= 1
    paths = ctx.extra["kernel_paths_by_phase"]["b1"]
    assert paths["decode"]["layers"] == 14 and sum(paths["prefill"]["by_path"].values()) == 14


def test_baseline_is_built_by_the_baseline_plugin(monkeypatch):
    built = []
    real = host.make_method

    def spy(name, params):
        built.append(name)
        return real(name, params)

    ctx = context("fp32")
    monkeypatch.setattr(host, "make_method", spy)
    LatencySuite(**FAST, baseline="bf16").measure(ctx)
    assert built == ["bf16"] and ctx.extra["paired"]["baseline"] == "bf16"


def test_the_baseline_itself_and_no_baseline():
    ctx = context("fp16")
    m = LatencySuite(**FAST).measure(ctx)
    assert m["decode_speedup_b1"].value == 1.0 and m["decode_speedup_b1"].ci is None
    assert ctx.extra["paired"]["baseline"] == "the method is the baseline"
    m = LatencySuite(**FAST, baseline="none").measure(context("int8-absmax"))
    assert "decode_speedup_b1" not in m and "decode_tok_s_b1" in m


def test_bad_parameters_are_rejected():
    with pytest.raises(QBenchError, match="baseline"):
        LatencySuite(baseline="int4")
    with pytest.raises(QBenchError, match="compile"):
        LatencySuite(compile="jit")


def test_cuda_graphs_skip_on_cpu_with_the_reason():
    with pytest.raises(QBenchSkip, match="needs a CUDA device"):
        LatencySuite(**FAST, compile="cuda-graphs").measure(context("fp32"))


def test_no_deprecation_warning_from_the_cache_argument():
    ctx = context("fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LatencySuite(**FAST, baseline="none").measure(ctx)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert latency._cache_kwarg(ctx.model) in ("cache", "past_key_values")


@torch.no_grad()
def test_torch_compile_decodes_the_same_tokens_as_eager():
    ctx = context("fp32")
    ids = torch.randint(3, 259, (1, 8), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for mode in ("none", "torch-compile"):
        run = Generation(ctx.model, mode, ctx.device)
        paths = run.prepare(1, 8, 4, 259)
        first = run.prefill(ids)
        steps = [first]
        for _ in range(3):
            steps.append(run.decode(steps[-1], 1))
        tokens[mode] = torch.cat(steps, dim=1)
        assert paths["decode"]["by_path"] == {"torch": 14}
    assert torch.equal(tokens["none"], tokens["torch-compile"])


def test_the_decode_mode_is_used_and_recorded(monkeypatch):
    compiled = []
    # the suite's plumbing only: the step stays eager here (the test above compiles for real)
    monkeypatch.setattr(Generation, "_compile", lambda self: compiled.append(self.mode) or setattr(
        self, "step", self._eager_step))
    ctx = context("int8-absmax")
    m = LatencySuite(**FAST, compile="torch-compile").measure(ctx)
    assert compiled == ["torch-compile", "torch-compile"]  # the method's model and the baseline's
    assert ctx.extra["compile"] == "torch-compile" and m["decode_tok_s_b1"].value > 0


def test_time_generation_times_one_prefill_and_the_decode_steps_on_the_given_clock():
    """scripts/bench_cpu_kernels.py's timer is the suite's Generation: the clock is read around the
    prefill and around all decode steps (not per step), and the decode really runs ``new_tokens`` steps."""
    model = load_model("tiny-llama").model.eval()
    calls, forwards = [], []
    model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[1]))

    def clock():
        calls.append(len(forwards))
        return float(len(calls))

    prefill_s, decode_s = latency.time_generation(model, torch.ones(1, 5, dtype=torch.long), 3,
                                                  torch.device("cpu"), clock)
    assert (prefill_s, decode_s) == (1.0, 1.0)
    assert calls == [0, 1, 1, 4]  # prefill between the first two reads, three decode steps between the last two
    assert forwards == [5, 1, 1, 1]
