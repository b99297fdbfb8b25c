"""Paired intervals: the bootstrap against closed forms, pairing by window id (and refusing windows
that differ), and the intervals in leaderboards, reports and ``qbench compare``."""
import json
import math

import numpy as np
import pytest

from qbench.compare import compare_methods, compare_runs, render_comparison
from qbench.leaderboard import leaderboard, load_frame
from qbench.paired import PairingError, SampleSet, normal_interval, paired_bootstrap
from qbench.report import render
from qbench.suite import MetricSpec
from tests.fake_runs import record, with_window_samples, write_run
from tests.helpers import qbench_cli


def _set(values: dict, ids=None, key="k") -> SampleSet:
    n = len(next(iter(values.values())))
    return SampleSet.from_json({"key": key, "ids": list(range(n)) if ids is None else list(ids), "values": values})


def test_bootstrap_of_a_mean_difference_matches_the_normal_interval():
    """Paired differences d ~ N(0.3, 1) over 600 windows: the percentile bootstrap of mean(a) − mean(b)
    must agree with the closed form mean(d) ± 1.96·sd(d)/√n (large n: t ≈ normal)."""
    rng = np.random.default_rng(7)
    base = rng.normal(5.0, 3.0, 600)  # large per-window variation that pairing cancels
    d = rng.normal(0.3, 1.0, 600)
    a, b = _set({"x": base + d}), _set({"x": base})
    interval = paired_bootstrap(a, b, ("mean", "x"), "diff", resamples=4000, seed=1)
    half = 1.959964 * d.std(ddof=0) / math.sqrt(len(d))
    assert interval.value == pytest.approx(d.mean())
    assert interval.low == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert interval.high == pytest.approx(d.mean() + half, abs=0.08 * half)
    assert interval.significant and interval.n == 600 and interval.resamples == 4000
    # Unpaired, the per-window variation of the base would swamp the difference: pairing is what makes it tight.
    unpaired = 1.96 * math.sqrt(((base + d).var() + base.var()) / 600)
    assert interval.half_width < 0.5 * unpaired


def test_the_statistic_is_recomputed_from_each_resample_not_averaged_per_window():
    """ppl = exp(Σ NLL / Σ tokens): windows of unequal length weigh by their tokens."""
    tokens = np.array([10, 1000, 10, 1000])
    a = _set({"nll_sum": [50.0, 2100.0, 40.0, 2000.0], "tokens": tokens})
    b = _set({"nll_sum": [20.0, 2000.0, 20.0, 2000.0], "tokens": tokens})
    interval = paired_bootstrap(a, b, ("exp_ratio", "nll_sum", "tokens"), "diff", resamples=500)
    expected = math.exp(4190 / 2020) - math.exp(4040 / 2020)
    mean_of_window_differences = np.mean(np.exp(a.column("nll_sum") / tokens) - np.exp(b.column("nll_sum") / tokens))
    assert interval.value == pytest.approx(expected)
    assert abs(interval.value - mean_of_window_differences) > 1.0
    ratio = paired_bootstrap(a, b, ("exp_ratio", "nll_sum", "tokens"), "ratio", resamples=500)
    assert ratio.value == pytest.approx(math.exp(4190 / 2020) / math.exp(4040 / 2020)) and ratio.null == 1.0


def test_same_seed_same_interval_and_resamples_change_it_little():
    rng = np.random.default_rng(0)
    a, b = _set({"x": rng.normal(1, 1, 50)}), _set({"x": rng.normal(0.8, 1, 50)})
    first, again = (paired_bootstrap(a, b, ("mean", "x"), seed=3) for _ in range(2))
    assert (first.low, first.high) == (again.low, again.high)


def test_windows_pair_by_their_ids_not_their_position():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 30), rng.normal(0, 1, 30)
    order = rng.permutation(30)
    aligned = paired_bootstrap(_set({"x": x}), _set({"x": y}), ("mean", "x"), seed=2)
    shuffled = paired_bootstrap(_set({"x": x}), _set({"x": y[order]}, ids=order), ("mean", "x"), seed=2)
    assert (aligned.low, aligned.high, aligned.value) == pytest.approx((shuffled.low, shuffled.high, shuffled.value))


def test_different_windows_or_texts_refuse_to_pair_with_a_clear_message():
    a = _set({"x": np.ones(16)}, key="wikitext2/gptq-s2048 text:abc")
    with pytest.raises(PairingError, match=r"different windows of .*16 windows \(0–15\).*148 windows \(0–147\).*"
                                           r"same --limit"):
        paired_bootstrap(a, _set({"x": np.ones(148)}, key="wikitext2/gptq-s2048 text:abc"), ("mean", "x"))
    with pytest.raises(PairingError, match="different texts or protocols"):
        paired_bootstrap(a, _set({"x": np.ones(16)}, key="c4/gptq-s2048 text:def"), ("mean", "x"))
    with pytest.raises(Exception, match="ids repeat"):
        SampleSet.from_json({"key": "k", "ids": [0, 0], "values": {"x": [1, 2]}})


def test_normal_interval_from_standard_errors():
    diff = normal_interval(0.60, 0.65, 0.011, 0.012)
    half = 1.959964 * math.hypot(0.011, 0.012)
    assert (diff.low, diff.high) == pytest.approx((-0.05 - half, -0.05 + half)) and diff.significant
    same = normal_interval(0.64, 0.65, 0.011, 0.012)
    assert not same.significant
    percent = normal_interval(0.60, 0.65, 0.011, 0.012, "percent")
    se = 100 * math.hypot(0.011 / 0.65, 0.60 * 0.012 / 0.65**2)  # delta method
    assert percent.high - percent.low == pytest.approx(2 * 1.959964 * se)


def test_metric_spec_carries_how_to_recompute_from_samples():
    spec = MetricSpec("ppl", samples="windows", statistic=("exp_ratio", "nll_sum", "tokens"))
    assert MetricSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError):
        MetricSpec("x", samples="windows", statistic=("median", "x"))
    with pytest.raises(ValueError):
        MetricSpec("x", samples="windows", statistic=("ratio", "x"))  # ratio takes two columns
    with pytest.raises(ValueError):
        MetricSpec("x", samples="windows")


# --- in the leaderboard --------------------------------------------------------------------------------

RNG = np.random.default_rng(5)
BASE = RNG.normal(300.0, 30.0, 24)
TOKENS = [100] * 24


def _ppl_record(method, shift, noise=1.0, n=24, seed=None):
    rec = record(method, "perplexity", {}, protocol="wikitext2/gptq-s64")
    if seed is not None:
        rec["method"] = {"name": "gptq", "params": {"bits": 4, "seed": seed}, "label": method}
        rec["cell"] += f"-{seed}"
    return with_window_samples(rec, BASE[:n] + shift + RNG.normal(0, noise, n), TOKENS[:n])


def test_leaderboard_differences_carry_paired_intervals_and_significance(tmp_path):
    run = write_run(tmp_path / "run", [_ppl_record("fp16", 0), _ppl_record("nf4", 5.0),
                                       _ppl_record("affine", 0.0), _ppl_record("hqq", 5.0, n=12)])
    board = leaderboard(load_frame(run))
    rows = {r["method"]: r for r in board.to_dict("records")}
    assert rows["nf4"]["ppl Δ vs fp16 CI low"] > 0 and rows["nf4"]["ppl Δ vs fp16 significant"] is True
    assert rows["affine"]["ppl Δ vs fp16 CI low"] < 0 < rows["affine"]["ppl Δ vs fp16 CI high"]
    assert rows["affine"]["ppl Δ vs fp16 significant"] is False
    assert rows["nf4"]["ppl Δ vs fp16 CI low"] < rows["nf4"]["ppl Δ vs fp16"] < rows["nf4"]["ppl Δ vs fp16 CI high"]
    assert rows["hqq"]["ppl Δ vs fp16 CI low"] is None or math.isnan(rows["hqq"]["ppl Δ vs fp16 CI low"])
    md = render(run, "md")
    nf4_line = next(line for line in md.splitlines() if "| nf4 " in line)
    assert " ± " in nf4_line and "(n.s.)" not in nf4_line
    assert "(n.s.)" in next(line for line in md.splitlines() if "| affine " in line)
    assert "2000 resamples, seed 0" in md
    assert "no interval for ppl Δ vs fp16 of hqq" in md and "different windows" in md
    as_json = json.loads(render(run, "json"))
    assert as_json["leaderboard"][1]["ppl Δ vs fp16 significant"] is True
    assert "500 resamples" in render(run, "md", resamples=500)


def test_report_takes_the_differences_against_a_chosen_baseline_row(tmp_path):
    # no fp16 row at all (a GPTQ-vs-RTN run): --baseline names the reference row
    run = write_run(tmp_path / "run", [_ppl_record("affine:sym=true", 8.0), _ppl_record("gptq", 3.0),
                                       _ppl_record("hqq", 8.0)])
    assert "ppl Δ vs fp16" not in leaderboard(load_frame(run)).columns
    board = leaderboard(load_frame(run), baseline="affine:sym=true")
    rows = {r["method"]: r for r in board.to_dict("records")}
    title = "ppl Δ vs affine:sym=true"
    assert rows["gptq"][title] == pytest.approx(rows["gptq"]["ppl"] - rows["affine:sym=true"]["ppl"], abs=1e-3)
    assert rows["gptq"][f"{title} CI high"] < 0 and rows["gptq"][f"{title} significant"] is True
    assert rows["hqq"][f"{title} CI low"] < 0 < rows["hqq"][f"{title} CI high"]
    md = qbench_cli("report", str(run), "--baseline", "affine:sym=true")
    assert md.returncode == 0, md.stderr
    assert title in md.stdout and "differences against: affine:sym=true" in md.stdout
    bad = qbench_cli("report", str(run), "--baseline", "fp16")
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "not a method of this run" in last and "gptq" in last


def test_seed_rows_get_mean_and_spread_beside_their_own_value(tmp_path):
    recs = [_ppl_record("fp16", 0)] + [_ppl_record(label, shift, seed=seed) for label, shift, seed in
                                       (("gptq", 4.0, 0), ("gptq:seed=1", 6.0, 1), ("gptq:seed=2", 5.0, 2))]
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    seeds = board[board["method"].str.startswith("gptq")]
    values = seeds["ppl"].tolist()
    assert seeds["ppl over seeds"].tolist() == pytest.approx([np.mean(values)] * 3)
    assert seeds["ppl over seeds sd"].tolist() == pytest.approx([np.std(values, ddof=1)] * 3)
    assert seeds["ppl seeds"].tolist() == [3, 3, 3]
    assert board.loc[board["method"] == "fp16", "ppl over seeds"].isna().all()
    md = render(tmp_path / "run", "md")
    assert "(3 seeds)" in md and "sample standard deviation" in md


# --- qbench compare ------------------------------------------------------------------------------------

def test_compare_runs_says_better_worse_or_indistinguishable(tmp_path):
    a = write_run(tmp_path / "a", [_ppl_record("nf4", 5.0), _ppl_record("gptq", 5.0), _ppl_record("hqq", 5.0)])
    b = write_run(tmp_path / "b", [_ppl_record("nf4", 0.0), _ppl_record("gptq", 9.0), _ppl_record("hqq", 5.1)])
    rows = {r["method"]: r for r in compare_runs(a, b)["metrics"] if r["metric"] == "ppl"}
    assert rows["nf4"]["verdict"] == "better" and rows["nf4"]["ci_high"] < 0  # lower perplexity is better
    assert rows["gptq"]["verdict"] == "worse" and rows["gptq"]["ci_low"] > 0
    assert rows["hqq"]["verdict"] == "indistinguishable" and rows["hqq"]["ci_low"] < 0 < rows["hqq"]["ci_high"]
    md = render_comparison(a, b)
    assert "better 1, worse 1, indistinguishable 1" in md and "| better |" in md


def test_compare_methods_within_one_run_and_the_cli(tmp_path):
    run = write_run(tmp_path / "run", [_ppl_record("affine", 8.0), _ppl_record("gptq", 3.0)])
    result = compare_methods(run, "affine", "gptq")
    (row,) = [r for r in result["metrics"] if r["metric"] == "ppl"]
    assert row["verdict"] == "better" and row["method"] == "gptq vs affine"
    # the label a run records leaves default parameters out; --methods may spell them
    cli = qbench_cli("compare", str(run), "--methods", "affine:bits=4,group_size=128,gptq", "--format", "json")
    assert cli.returncode == 0, cli.stderr
    assert [r["verdict"] for r in json.loads(cli.stdout)["metrics"] if r["metric"] == "ppl"] == ["better"]
    bad = qbench_cli("compare", str(run), "--methods", "gptq")
    last = bad.stderr.strip().splitlines()[-1]  # (bitsandbytes may warn on import before it)
    assert bad.returncode == 2 and last.startswith("qbench: error:") and "two methods" in last
    missing = qbench_cli("compare", str(run), "--methods", "gptq,nf4")
    assert missing.returncode == 2 and "method 'nf4' has no cells" in missing.stderr


def test_compare_refuses_to_pair_different_windows_and_says_so(tmp_path):
    a = write_run(tmp_path / "a", [_ppl_record("nf4", 5.0, n=12)])
    b = write_run(tmp_path / "b", [_ppl_record("nf4", 0.0)])
    (row,) = [r for r in compare_runs(a, b)["metrics"] if r["metric"] == "ppl"]
    assert row["verdict"] is None and "different windows" in row["no_interval"]
    assert "No interval:" in render_comparison(a, b)


def test_html_plots_draw_the_paired_interval_as_an_error_bar(tmp_path):
    from qbench.report_html import _error_bar

    run = write_run(tmp_path / "run", [_ppl_record("fp16", 0), _ppl_record("nf4", 5.0)])
    board = leaderboard(load_frame(run))
    base, nf4 = (board.loc[board["method"] == m].iloc[0] for m in ("fp16", "nf4"))
    below, above = _error_bar(board, "ppl", "tiny-llama", "nf4", float(nf4["ppl"]))
    # the bar spans baseline + the difference's interval (to the rounding of the board's columns)
    assert float(nf4["ppl"]) - below == pytest.approx(base["ppl"] + nf4["ppl Δ vs fp16 CI low"], abs=1e-3)
    assert float(nf4["ppl"]) + above == pytest.approx(base["ppl"] + nf4["ppl Δ vs fp16 CI high"], abs=1e-3)
    assert _error_bar(board, "ppl", "tiny-llama", "fp16", float(base["ppl"])) is None


def test_stratified_bootstrap_keeps_each_stratum_and_matches_the_closed_form():
    """Mean over tasks of per-task accuracy: the bootstrap draws within each task, so its interval of a
    paired difference matches sqrt(Σ var(d_t) / n_t) / T, and the statistic is the mean of task means."""
    rng = np.random.default_rng(3)
    sizes = (1000, 300)
    strata = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])
    a_values = (rng.random(strata.size) < 0.6).astype(float)
    b_values = np.where(rng.random(strata.size) < 0.1, 1 - a_values, a_values)
    ids = list(range(strata.size))
    a = SampleSet("tasks", tuple(ids), {"main": a_values, "task": strata.astype(float)})
    b = SampleSet("tasks", tuple(ids), {"main": b_values, "task": strata.astype(float)})
    stat = ("stratified_mean", "main", "task")
    assert a.statistic(stat) == pytest.approx(np.mean([a_values[strata == t].mean() for t in range(2)]))
    interval = paired_bootstrap(b, a, stat, "diff", resamples=4000, seed=2)
    d = b_values - a_values
    sd = np.sqrt(sum(d[strata == t].var() / n for t, n in enumerate(sizes))) / len(sizes)
    assert interval.value == pytest.approx(b.statistic(stat) - a.statistic(stat))
    assert interval.half_width == pytest.approx(1.96 * sd, rel=0.1)
