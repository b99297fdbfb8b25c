"""Seed sweeps from the command line (gptq:seed=0+1+2) and the seed-spread report."""
import pytest

from qbench.params import QBenchError, Spec, parse_specs
from qbench.runner import RunConfig, plan
from qbench.seeds import expand_seed_sweeps
from tests.fake_runs import record, write_run
from tests.helpers import qbench_cli


def test_a_seed_sweep_expands_to_one_spec_per_seed_and_leaves_others_alone():
    specs = expand_seed_sweeps(parse_specs("fp16,gptq:bits=3,seed=0+1+2,nf4"))
    assert specs == [Spec("fp16"), Spec("gptq", {"bits": "3", "seed": "0"}), Spec("gptq", {"bits": "3", "seed": "1"}),
                     Spec("gptq", {"bits": "3", "seed": "2"}), Spec("nf4")]
    assert expand_seed_sweeps(parse_specs("gptq:seed=5")) == [Spec("gptq", {"seed": "5"})]


@pytest.mark.parametrize("text, message", [
    ("nf4:seed=0+1", "method nf4 has no seed parameter"),
    ("gptq:seed=0+x", "each seed of a sweep must be an integer"),
    ("gptq:seed=1+1", "names a seed twice"),
])
def test_bad_sweeps_are_one_clear_error(text, message):
    with pytest.raises(QBenchError, match=message):
        expand_seed_sweeps(parse_specs(text))


def test_the_run_plans_one_cell_per_seed(tmp_path):
    config = RunConfig(methods=parse_specs("fp16,gptq:nsamples=2,seqlen=16,seed=0+1+2"), models=["tiny-llama"],
                       suites=parse_specs("memory"), out=tmp_path / "run")
    cells = plan(config)
    gptq = [c for c in cells if c["method"]["name"] == "gptq"]
    assert [c["method"]["params"]["seed"] for c in gptq] == [0, 1, 2]
    assert [c["method"]["label"] for c in gptq] == ["gptq:nsamples=2,seqlen=16", "gptq:nsamples=2,seqlen=16,seed=1",
                                                    "gptq:nsamples=2,seqlen=16,seed=2"]
    assert len({c["id"] for c in gptq}) == 3


def test_cli_rejects_a_sweep_of_a_method_without_seed(tmp_path):
    result = qbench_cli("run", "--methods", "nf4:seed=0+1", "--models", "tiny-llama", "--suites", "memory",
                        "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "has no seed parameter" in result.stderr.strip().splitlines()[-1]


def test_report_seed_spread_is_the_table_per_seed(tmp_path):
    recs = []
    for seed, ppl in ((0, 32.0), (1, 30.0), (2, 31.0)):
        rec = record("gptq" if seed == 0 else f"gptq:seed={seed}", "perplexity", {"ppl": ppl},
                     protocol="wikitext2/gptq-s2048/first-16")
        rec["method"]["params"] = {"bits": 4, "seed": seed}
        rec["cell"] += str(seed)
        recs.append(rec)
    run = write_run(tmp_path / "run", recs)
    result = qbench_cli("report", str(run), "--seed-spread")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| tiny-llama"))
    assert row.split(" | ")[4:9] == ["0: 32.00, 1: 30.00, 2: 31.00", "3", "31.00", "1.00", "2.00 |"]
    assert "Produced by `qbench report" in result.stdout
