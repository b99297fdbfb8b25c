"""Metrics describe themselves: the leaderboard's columns come from the specs records carry (or, for
records without them, from the installed suite), never from a table inside the report."""
import json

import pytest

from qbench.leaderboard import claim_lines, leaderboard, load_frame
from qbench.report import render
from qbench.suite import MetricSpec, Suite, find_spec
from tests.fake_runs import MIB, record, write_run


def test_spec_lookup_exact_first_then_wildcards_fill_the_title():
    specs = {"decode_tok_s_b1": MetricSpec("decode b1"), "decode_tok_s_b*": MetricSpec("decode b{0}", headline=False,
                                                                                        vs_baseline="ratio",
                                                                                        baseline_title="speed-up b{0}")}
    assert find_spec(specs, "decode_tok_s_b1").title == "decode b1"
    spec = find_spec(specs, "decode_tok_s_b16")
    assert (spec.title, spec.baseline_title, spec.headline) == ("decode b16", "speed-up b16", False)
    assert find_spec(specs, "prefill_ms_b1") is None


def test_spec_round_trips_through_json_and_rejects_unknown_aggregations():
    spec = MetricSpec("acc", higher_is_better=True, aggregate="mean", vs_baseline="percent",
                      baseline_title="recovery %")
    assert MetricSpec.from_json({"value": 0.5, "unit": "", **spec.to_json()}) == spec
    assert MetricSpec("x").to_json() == {"title": "x"}  # defaults are not written
    with pytest.raises(ValueError):
        MetricSpec("x", aggregate="median")
    with pytest.raises(ValueError):
        MetricSpec("x", vs_baseline="ratio")  # a derived column needs a title


class _Suite(Suite):
    metrics = {"b": MetricSpec("B"), "a*": MetricSpec("A{0}"), "z": MetricSpec("Z")}


def test_declared_order_is_the_column_order():
    assert _Suite.in_declared_order(["z", "a2", "x", "b", "a1"]) == ["b", "a2", "a1", "z", "x"]


def described(method: str, suite: str, metrics: dict, **kw) -> dict:
    """A record of a suite qbench does not know, whose metrics carry their specs."""
    rec = record(method, suite, {}, **kw)
    rec["metrics"] = metrics
    return rec


def test_a_third_party_suites_metrics_become_columns_from_the_records_alone(tmp_path):
    spec = {"title": "answer rate", "higher_is_better": True, "vs_baseline": "percent", "baseline_title": "recovery %"}
    hidden = {"title": "items", "headline": False}
    recs = [described(m, "quiz", {"rate": {"value": v, "unit": "fraction", **spec},
                                  "items": {"value": 10, "unit": "", **hidden},
                                  "raw": {"value": 1, "unit": ""}})
            for m, v in (("fp16", 0.8), ("nf4", 0.6))]
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    assert list(board.columns) == ["model", "method", "answer rate", "recovery %", "quantize (s)", "kernels", "status"]
    assert board["recovery %"].tolist() == [100.0, 75.0]
    everything = leaderboard(load_frame(tmp_path / "run"), columns="all")
    assert "items" in everything.columns and "raw" not in everything.columns  # undescribed: record only


def test_aggregation_and_display_unit_come_from_the_spec(tmp_path):
    mean = {"title": "score", "aggregate": "mean"}
    mib = {"title": "held (MiB)", "display_unit": "MiB"}
    recs = [described("fp16", "quiz:n=1", {"score": {"value": 1.0, "unit": "", **mean}}),
            described("fp16", "quiz:n=2", {"score": {"value": 2.0, "unit": "", **mean}}),
            described("fp16", "store", {"held": {"value": 3 * MIB, "unit": "bytes", **mib}})]
    recs[1]["cell"] += "-2"
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    assert board["score"][0] == 1.5 and board["held (MiB)"][0] == 3.0


def test_records_without_specs_are_described_by_the_installed_suite(tmp_path):
    recs = [record(m, "latency", {"decode_tok_s_b1": v, "decode_tok_s_b4": 4 * v})
            for m, v in (("fp16", 10), ("nf4", 15))]
    run = write_run(tmp_path / "run", recs)
    board = leaderboard(load_frame(run))
    assert board["decode speed-up"].tolist() == [1.0, 1.5] and "decode b4 (tok/s)" not in board.columns
    assert leaderboard(load_frame(run), columns="all")["decode speed-up b4"].tolist() == [1.0, 1.5]


def test_claims_come_from_records_and_from_methods_and_skip_random_models(tmp_path):
    gptq_claim = {"claim": "GPTQ loses <0.1 perplexity", "metric": "perplexity.ppl", "compare": "diff", "below": 0.1}
    recs = [record("fp16", "perplexity", {"ppl": 10.0}), record("gptq", "perplexity", {"ppl": 10.05}),
            record("gptq", "memory", {"bits_per_weight": 4.2}, model="demo")]
    for rec in recs[:2]:
        rec["model"]["kind"] = "demo"
    recs[1]["baseline_claims"] = [gptq_claim]
    recs[2]["claims"] = [{"claim": "0.5 bytes per parameter", "measured": "0.525 bytes/weight", "verdict": "holds"}]
    recs.append(dict(recs[1], cell="random", model={"name": "random-x", "kind": "random"}))
    frame = load_frame(write_run(tmp_path / "run", recs))
    lines = claim_lines(frame, leaderboard(frame))
    assert lines == ["claim '0.5 bytes per parameter' for gptq on demo: 0.525 bytes/weight: holds",
                     "claim 'GPTQ loses <0.1 perplexity' for gptq on tiny-llama: measured Δ +0.050: holds"]
    assert "GPTQ loses" in render(tmp_path / "run", "md") and "random-x" not in "".join(lines)
    assert json.loads(render(tmp_path / "run", "json"))["claims"] == lines
