"""``qbench compare RUN_A RUN_B``: matched cells with metric deltas, status and protocol changes,
cells found in one run only."""
import json

from qbench.compare import compare_runs, render_comparison
from tests.fake_runs import record, standard_run, write_run
from tests.helpers import qbench_cli


def two_runs(tmp_path):
    a = standard_run(tmp_path / "a", with_fidelity=False)
    b_records = [json.loads(line) for line in (a / "records.jsonl").read_text().splitlines()]
    b_records = [r for r in b_records if r["method"]["label"] != "int8-absmax"]  # only in A
    for r in b_records:
        if r["method"]["label"] == "nf4" and r["suite"]["name"] == "perplexity":
            r["metrics"]["ppl"]["value"] = 13.0  # a regression: 12.5 -> 13.0
        if r["method"]["label"] == "fp16" and r["suite"]["name"] == "latency":
            r["status"], r["metrics"], r["message"] = "error", {}, "out of memory"
    b_records.append(record("gptq:bits=3", "perplexity:seqlen=64", {"ppl": 14.0},
                            protocol="wikitext2/gptq-s64/first-2"))  # only in B
    b_records.append(record("nf4", "fidelity", {"kl_mean": 0.03}, protocol="c4/fidelity-s512-vs-fp32"))
    return a, write_run(tmp_path / "b", b_records)


def test_compare_matches_cells_and_computes_deltas(tmp_path):
    a, b = two_runs(tmp_path)
    result = compare_runs(a, b)
    assert result["matched"] == 6  # fp16 and nf4 × memory, latency, perplexity
    ppl = [r for r in result["metrics"] if r["method"] == "nf4" and r["metric"] == "ppl"]
    assert len(ppl) == 1 and ppl[0]["a"] == 12.5 and ppl[0]["b"] == 13.0
    assert abs(ppl[0]["delta"] - 0.5) < 1e-12 and abs(ppl[0]["delta_pct"] - 4.0) < 1e-9
    unchanged = [r for r in result["metrics"] if r["method"] == "fp16" and r["metric"] == "bits_per_weight"]
    assert unchanged[0]["delta"] == 0
    assert result["status_changes"] == [{"model": "tiny-llama", "method": "fp16", "suite": "latency",
                                         "a": "ok", "b": "error", "message": "out of memory"}]
    fp16_latency = [r for r in result["metrics"] if r["method"] == "fp16" and r["suite"] == "latency"]
    assert all(r["b"] is None and r["delta"] is None for r in fp16_latency)
    assert {(r["method"], r["suite"]) for r in result["only_in_a"]} == {
        ("int8-absmax", "memory"), ("int8-absmax", "latency"), ("int8-absmax", "perplexity:seqlen=64")}
    assert {(r["method"], r["suite"]) for r in result["only_in_b"]} == {
        ("gptq:bits=3", "perplexity:seqlen=64"), ("nf4", "fidelity")}


def test_markdown_and_cli(tmp_path):
    a, b = two_runs(tmp_path)
    md = render_comparison(a, b)
    assert "6 cells in both runs, 3 only in A, 2 only in B" in md
    # no per-window samples nor stderr in these records: no interval, no verdict
    assert "| tiny-llama | nf4 | perplexity:seqlen=64 | ppl | 12.5 | 13 | 0.5 | +4.00% | — | — |" in md
    assert "## Status changes" in md and "out of memory" in md
    assert "## Only in B" in md and "gptq:bits=3" in md
    changed = render_comparison(a, b, changed_only=True)
    assert "bits_per_weight" not in changed and "| ppl |" in changed

    result = qbench_cli("compare", str(a), str(b))
    assert result.returncode == 0, result.stderr
    assert result.stdout == md
    as_json = qbench_cli("compare", str(a), str(b), "--format", "json")
    assert json.loads(as_json.stdout)["matched"] == 6


def test_protocol_change_is_flagged(tmp_path):
    a = write_run(tmp_path / "a", [record("nf4", "perplexity", {"ppl": 10.0}, protocol="wikitext2/gptq-s2048")])
    b = write_run(tmp_path / "b", [record("nf4", "perplexity", {"ppl": 11.0}, protocol="wikitext2/gptq-s2048/first-4")])
    md = render_comparison(a, b)
    assert "## Protocol changes (numbers not comparable)" in md and "first-4" in md


def test_missing_run_is_a_one_line_error(tmp_path):
    a = standard_run(tmp_path / "a")
    result = qbench_cli("compare", str(a), str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"qbench: error: run directory {tmp_path / 'nope'} does not exist; "
                                     "pass the --out directory of a qbench run")
    (tmp_path / "empty").mkdir()
    result = qbench_cli("compare", str(a), str(tmp_path / "empty"))
    assert result.returncode == 2 and "no records.jsonl" in result.stderr


def test_methods_are_found_by_their_parameters_when_the_defaults_changed(tmp_path):
    """A record labelled under older defaults (gptq:act_order=true,static_groups=true, written when
    act_order was off by default) is the method `gptq` names today: compare finds it by its values."""
    from qbench import host

    today = host.make_method("gptq", {})
    old = record("gptq:act_order=true,static_groups=true", "perplexity", {"ppl": 29.6})
    old["method"]["params"] = json.loads(json.dumps(today.values, default=str))
    rtn = record("affine", "perplexity", {"ppl": 34.0})
    run = write_run(tmp_path / "run", [rtn, old])
    md = render_comparison(run, None, "md", methods=["affine", today.label])
    assert "gptq vs affine" in md and "29.6" in md
    other = host.make_method("gptq", {"act_order": False, "static_groups": False}).label
    result = qbench_cli("compare", str(run), "--methods", f"affine,{other}")
    assert result.returncode == 2 and "has no cells" in result.stderr


def test_a_label_whose_defaults_changed_does_not_pick_the_older_cells(tmp_path):
    """`smoothquant` today (targets=all, alpha=0.8) is not the record labelled `smoothquant` under the
    older defaults (targets=norms, alpha=0.5): compare takes the cell whose values match, not the label."""
    from qbench import host

    older = host.make_method("smoothquant", {"targets": "norms", "alpha": "0.5"})
    today = host.make_method("smoothquant", {})
    old = record("smoothquant", "perplexity", {"ppl": 36.8})  # labelled when these were the defaults
    old["method"]["params"] = json.loads(json.dumps(older.values, default=str))
    new = record("smoothquant:alpha=0.8,targets=all", "perplexity", {"ppl": 20.0})
    new["method"]["params"] = json.loads(json.dumps(today.values, default=str))
    base = record("int8-absmax", "perplexity", {"ppl": 19.2})
    run = write_run(tmp_path / "run", [base, old, new])
    md = render_comparison(run, None, "md", methods=["int8-absmax", today.label])
    assert "20" in md and "36.8" not in md
    md = render_comparison(run, None, "md", methods=["int8-absmax", older.label])
    assert "36.8" in md and "| 20 |" not in md


def test_runs_made_before_and_after_a_default_changed_do_not_pair_the_same_label(tmp_path):
    from qbench import host

    defaults = {k: p.default for k, p in host.methods()["gptq"].params.items()}
    before = record("gptq", "perplexity", {"ppl": 30.0})
    before["method"]["params"] = {**defaults, "sym": not defaults["sym"]}  # "gptq" when it was written
    after = record("gptq", "perplexity", {"ppl": 27.0})
    after["method"]["params"] = dict(defaults)
    result = compare_runs(write_run(tmp_path / "a", [before]), write_run(tmp_path / "b", [after]))
    assert result["matched"] == 0
    assert [r["method"] for r in result["only_in_a"]] == [f"gptq:sym={str(not defaults['sym']).lower()}"]
    assert [r["method"] for r in result["only_in_b"]] == ["gptq"]


def test_a_method_not_installed_here_is_compared_by_its_recorded_label(tmp_path):
    """Peers recorded from their own venv (llm-compressor's `llmc-*`) have no plugin in this one."""
    ours = record("smoothquant", "perplexity", {"ppl": 20.0})
    peer = record("llmc-smoothquant", "perplexity", {"ppl": 22.0})
    peer_params = record("llmc-gptq:group_size=64", "perplexity", {"ppl": 25.0})
    run = write_run(tmp_path / "run", [ours, peer, peer_params])
    result = qbench_cli("compare", str(run), "--methods", "smoothquant,llmc-smoothquant")
    assert result.returncode == 0, result.stderr
    assert "| llmc-smoothquant vs smoothquant | perplexity | ppl | 20 | 22 | 2 |" in result.stdout
    result = qbench_cli("compare", str(run), "--methods", "smoothquant,llmc-gptq:group_size=64")
    assert result.returncode == 0, result.stderr
    assert "| llmc-gptq:group_size=64 vs smoothquant | perplexity | ppl | 20 | 25 | 5 |" in result.stdout
    result = qbench_cli("compare", str(run), "--methods", "smoothquant,llmc-awq")
    assert result.returncode == 2 and "'llmc-awq' has no cells" in result.stderr
    assert "llmc-smoothquant" in result.stderr  # the run's own methods are listed
