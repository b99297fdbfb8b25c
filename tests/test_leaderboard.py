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
    recs = [record(m, "latency", {"decode_tok_s_b1": v, "decode_tok_s_b4": 4 * v, "decode_speedup_b4": v / 10})
            for m, v in (("fp16", 10), ("nf4", 15))]
    recs += [record(m, "memory", {"quantized_layer_bytes": b * MIB}) for m, b in (("fp16", 8), ("nf4", 2))]
    run = write_run(tmp_path / "run", recs)
    board = leaderboard(load_frame(run))
    assert board["decode b1 (tok/s)"].tolist() == [10, 15] and "decode b4 (tok/s)" not in board.columns
    assert board["quantized layers (MiB)"].tolist() == [8.0, 2.0] and board["memory vs fp16"].tolist() == [1.0, 0.25]
    everything = leaderboard(load_frame(run), columns="all")
    assert everything["decode b4 (tok/s)"].tolist() == [40, 60]
    assert everything["decode speed-up b4 (paired)"].tolist() == [1.0, 1.5]


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


def test_uncertainty_travels_from_metric_to_every_format(tmp_path):
    acc = {"title": "piqa acc", "higher_is_better": True}
    recs = [described(m, "quiz", {"acc": {"value": v, "unit": "", "stderr": 0.011, **acc},
                                  "speed": {"value": 1.5, "unit": "", "ci": [1.41, 1.63], "title": "speed-up"}})
            for m, v in (("fp16", 0.652), ("nf4", 0.640))]
    run = write_run(tmp_path / "run", recs)
    board = leaderboard(load_frame(run))
    assert board["piqa acc ±"].tolist() == [0.011, 0.011]
    assert board["speed-up CI low"].tolist() == [1.41, 1.41] and board["speed-up CI high"].tolist() == [1.63, 1.63]
    md = render(run, "md")
    assert "0.652 ± 0.011" in md and "1.5 [1.41, 1.63]" in md and "piqa acc ±" not in md
    page = render(run, "html")
    assert "data-v='0.652'>0.652 ± 0.011</td>" in page
    assert json.loads(render(run, "json"))["leaderboard"][1]["piqa acc ±"] == 0.011


def test_mean_of_independent_values_combines_their_stderr(tmp_path):
    spec = {"title": "acc", "aggregate": "mean"}
    recs = [described("fp16", f"quiz:n={i}", {"acc": {"value": v, "unit": "", "stderr": 0.03, **spec}})
            for i, v in enumerate((0.5, 0.7))]
    recs[1]["cell"] += "-2"
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    assert board["acc"][0] == pytest.approx(0.6) and board["acc ±"][0] == pytest.approx(0.03 / 2**0.5)


def test_rows_are_labelled_by_todays_defaults_from_the_recorded_values(tmp_path):
    from qbench import host

    defaults = {k: p.default for k, p in host.methods()["gptq"].params.items()}
    old_default = record("gptq", "perplexity", {"ppl": 30.0})  # written when sym=true was the default
    old_default["method"]["params"] = {**defaults, "sym": not defaults["sym"]}
    today = record("gptq:sym=false", "perplexity", {"ppl": 27.0})
    today["method"]["params"] = dict(defaults)
    unknown = record("gptq:bits=3", "perplexity", {"ppl": 90.0})
    unknown["method"]["params"] = {"bits": 3}  # made before the other parameters existed: its own label
    board = leaderboard(load_frame(write_run(tmp_path / "run", [old_default, today, unknown])))
    flipped = f"gptq:sym={str(not defaults['sym']).lower()}"
    assert list(board["method"]) == [flipped, "gptq", "gptq:bits=3"]


def test_a_run_resumed_under_other_code_names_each_commit_and_its_rows(tmp_path):
    def env(commit, dirty=False):
        return {"device": "cpu (test)", "python": "3.11", "torch": "2.13.0", "triton": "3.9.0",
                "transformers": "5.24.0", "git": {"commit": commit, "dirty": dirty}}

    recs = [record(m, "memory", {"bits_per_weight": b}) for m, b in (("fp16", 16), ("nf4", 4.1), ("int8-absmax", 8.2))]
    recs[0]["env"] = recs[1]["env"] = env("a" * 40)
    recs[2]["env"] = env("b" * 40, dirty=True)
    text = render(write_run(tmp_path / "mixed", recs), "md")
    assert "versions (fp16, nf4): python 3.11, torch 2.13.0, triton 3.9.0, transformers 5.24.0; " \
           "qbench commit aaaaaaaaaa" in text
    assert "versions (int8-absmax): " in text and "qbench commit bbbbbbbbbb (dirty)" in text
    recs[2]["env"] = env("a" * 40)
    text = render(write_run(tmp_path / "same", recs), "md")
    assert "versions: python 3.11" in text and "versions (" not in text
