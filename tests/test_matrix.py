"""`qbench run` end to end on a tiny random model: records, resume, isolation of failing cells."""
import json
import os
import signal
import subprocess
import sys
import time

from qbench.records import read_records
from tests.helpers import make_third_party_dist, qbench_cli

FAST_SUITES = "memory:seqlen=64,latency:prompt_len=8,new_tokens=2,batch_sizes=1+2,repeats=2,perplexity:seqlen=64"


def records(out):
    return list(read_records(out / "records.jsonl"))


def test_matrix_records_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--methods", "fp32,fp16", "--models", "tiny-llama", "--suites", FAST_SUITES,
            "--out", str(out), "--limit", "2"]
    first = qbench_cli(*args)
    assert first.returncode == 0, first.stderr
    recs = records(out)
    assert len(recs) == 6 and {r["status"] for r in recs} == {"ok"}
    ppl = [r for r in recs if r["suite"]["name"] == "perplexity"][0]
    assert ppl["dataset"]["protocol"] == "wikitext2/gptq-s64/first-2"
    assert ppl["dataset"]["sha256"]
    assert ppl["metrics"]["ppl"]["value"] > 1
    for key in ("python", "torch", "triton", "transformers", "git", "device"):
        assert key in ppl["env"]
    # which distribution provided the method and the suite
    assert ppl["method"]["provided_by"]["distribution"] == ppl["suite"]["provided_by"]["distribution"] == "qbench-quant"
    assert ppl["method"]["provided_by"]["plugin"] == "qbench.plugins.baseline"
    assert json.loads((out / "run.json").read_text())["methods"] == ["fp32", "fp16"]
    memory = {r["method"]["name"]: r for r in recs if r["suite"]["name"] == "memory"}
    assert memory["fp32"]["metrics"]["bits_per_weight"]["value"] == 32
    assert memory["fp16"]["metrics"]["bits_per_weight"]["value"] == 16

    again = qbench_cli(*args)
    assert again.returncode == 0
    assert "0 cells run, 6 already recorded" in again.stdout
    assert len(records(out)) == 6


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--methods", "fp32", "--models", "tiny-llama", "--suites", "memory:seqlen=16", "--out", str(out)]
    assert qbench_cli(*args).returncode == 0
    with open(out / "records.jsonl", "a") as f:
        f.write('{"cell": "abc", "status": "ok", "metr')  # a run killed mid-write
    assert len(records(out)) == 1
    again = qbench_cli(*args)
    assert again.returncode == 0 and "1 already recorded" in again.stdout
    assert (out / "records.jsonl").read_text().endswith("}\n")


def test_failing_cells_are_recorded_and_the_rest_finish(tmp_path):
    site = make_third_party_dist(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "sign,sign:crash=raise,sign:crash=segfault", "--models", "tiny-llama",
                        "--suites", "memory:seqlen=16,perplexity:seqlen=64", "--limit", "1", "--out", str(out),
                        env_extra=env)
    assert result.returncode == 1
    assert "failed" in result.stderr and "sign:crash=segfault" in result.stderr
    recs = records(out)
    by_method = {}
    for r in recs:
        by_method.setdefault(r["method"]["label"], []).append(r)
    assert {r["status"] for r in by_method["sign"]} == {"ok"}
    assert by_method["sign"][0]["method"]["provided_by"] == {"plugin": "sign", "distribution": "qbench-sign-method",
                                                             "version": "0.1"}
    assert all("deliberate failure" in r["message"] for r in by_method["sign:crash=raise"])
    assert all("SIGSEGV" in r["message"] for r in by_method["sign:crash=segfault"])
    # the third-party method went through the same suites and the leaderboard shows every cell
    bits = [r for r in by_method["sign"] if r["suite"]["name"] == "memory"][0]["metrics"]["bits_per_weight"]["value"]
    assert 8 <= bits < 9  # int8 signs + fp32 row scales, counted exactly
    board = qbench_cli("report", str(out), "--format", "csv", env_extra=env)
    assert board.returncode == 0
    assert "SIGSEGV" in board.stdout and "deliberate failure" in board.stdout


def test_kill_midway_then_rerun_finishes_each_cell_once(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qbench.cli", "run", "--methods", "fp32,fp16,bf16", "--models", "tiny-llama",
            "--suites", "memory:seqlen=16,perplexity:seqlen=64", "--limit", "1", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(records(out)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cell process, at an arbitrary moment
    proc.wait()
    partial = len(records(out))
    assert 2 <= partial < 6
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    recs = records(out)
    ids = [r["cell"] for r in recs]
    assert len(ids) == len(set(ids)) == 6
    assert {r["status"] for r in recs} == {"ok"}


def test_records_carry_the_threads_the_cell_used(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--methods", "fp32", "--models", "tiny-llama", "--suites", "memory", "--out", str(out)]
    assert qbench_cli(*args, "--threads", "1").returncode == 0
    record = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert record["env"]["torch_threads"] == 1
    # on CPU the process peak holds the process's history: the record says which number compares
    if "not reset" not in record["extra"]["peak_memory_kind"]:  # the kernel let us reset the peak
        assert record["metrics"]["peak_activation_memory"]["value"] > 0
    assert any("forward peak Δ" in note for note in record["notes"])


def test_a_record_names_the_commit_its_cell_ran_not_the_drivers():
    """A run resumed for hours while commits land: each cell process reports the checkout it started
    from, and that is what its record says."""
    from qbench.runner import make_record

    cell = {"id": "x", "method": {"name": "fp32", "params": {}, "label": "fp32"}, "model": "tiny-llama",
            "suite": {"name": "memory", "params": {}, "label": "memory"}, "device": "cpu", "dtype": "auto", "seed": 0}
    driver_env = {"git": {"commit": "a" * 40, "dirty": False}, "torch_threads": 2}
    cell_git = {"commit": "b" * 40, "dirty": True}
    record = make_record(cell, {"status": "ok", "metrics": {}, "git": cell_git}, driver_env, 1.0)
    assert record["env"]["git"] == cell_git and driver_env["git"]["commit"] == "a" * 40
    assert make_record(cell, {"status": "ok", "metrics": {}}, driver_env, 1.0)["env"]["git"] == driver_env["git"]
