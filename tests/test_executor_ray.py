"""``--executor ray`` on a local Ray instance started by the test (tiny model, CPU, no GPU)."""
import os
from pathlib import Path

import pytest

from qbench import host
from qbench.params import parse_specs
from qbench.records import read_records
from qbench.runner import RunConfig, execute
from tests.helpers import make_third_party_dist

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    site = make_third_party_dist(tmp_path_factory.mktemp("site"))
    # the driver finds the third-party method through its entry point; the workers through PYTHONPATH
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), old_path) if p)
    import sys
    sys.path.insert(0, str(site))
    host.reset()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield site
    ray.shutdown()
    sys.path.remove(str(site))
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path
    host.reset()


def config(out: Path, methods: str, suites: str = "memory:seqlen=16,perplexity:seqlen=64") -> RunConfig:
    return RunConfig(methods=parse_specs([methods]), models=["tiny-llama"], suites=parse_specs([suites]), out=out,
                     limit=1, executor="ray")


def test_ray_cells_land_in_the_same_records_and_resume(local_ray, tmp_path):
    out = tmp_path / "run"
    summary = execute(config(out, "fp32"))
    assert summary["ran"] == 2 and not summary["failed"]
    recs = list(read_records(out / "records.jsonl"))
    assert len(recs) == 2 and {r["status"] for r in recs} == {"ok"}
    for r in recs:
        assert r["env"]["host"]  # the worker's environment, reported back to the driver
        assert (out / "logs" / f"{r['cell']}.log").is_file()
    ppl = [r for r in recs if r["suite"]["name"] == "perplexity"]
    assert all(r["metrics"]["ppl"]["value"] > 1 for r in ppl)

    again = execute(config(out, "fp32,fp16"))  # resume: only the new method's cells run
    assert again["already_done"] == 2 and again["ran"] == 2
    recs = list(read_records(out / "records.jsonl"))
    assert len({r["cell"] for r in recs}) == len(recs) == 4


def test_a_crashing_cell_on_a_worker_is_an_error_record(local_ray, tmp_path):
    out = tmp_path / "run"
    summary = execute(config(out, "sign,sign:crash=segfault", "memory:seqlen=16"))
    assert len(summary["failed"]) == 1
    by_label = {}
    for r in read_records(out / "records.jsonl"):
        by_label.setdefault(r["method"]["label"], []).append(r)
    assert {r["status"] for r in by_label["sign"]} == {"ok"}
    assert all(r["status"] == "error" and "SIGSEGV" in r["message"] for r in by_label["sign:crash=segfault"])


def test_ray_resources_per_cell():
    from qbench.executor_ray import RayExecutor, group_key

    executor = RayExecutor()
    assert executor._resources({"device": "cuda:0"})["num_gpus"] == 1
    assert executor._resources({"device": "cpu"})["num_gpus"] == 0
    cell = {"method": {"label": "nf4"}, "model": "m", "device": "cpu", "dtype": "auto"}
    assert group_key(cell) == group_key({**cell, "suite": "other"})


def test_bad_cpus_per_cell_is_one_clear_error(monkeypatch):
    from qbench.executor_ray import RayExecutor
    from qbench.params import QBenchError

    monkeypatch.setenv("QBENCH_RAY_CPUS", "zero")
    with pytest.raises(QBenchError, match="QBENCH_RAY_CPUS"):
        RayExecutor()
