"""scripts/benchmark_table.py on a JSON file that pytest-benchmark really wrote (a CPU benchmark)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BENCH = '''
import pytest


@pytest.mark.parametrize("batch", [1, 16])
def test_sum(benchmark, batch):
    benchmark.extra_info.update({"fp16_ms": 0.5 * batch, "speedup_vs_fp16": 2.0 + batch})
    benchmark.pedantic(lambda: sum(range(1000 * batch)), rounds=3)
'''


def test_one_row_per_case_with_params_median_and_extra_info(tmp_path):
    (tmp_path / "bench_fake.py").write_text(BENCH)
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "bench_fake.py"), "--benchmark-only", f"--benchmark-json={out}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:]
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_table.py"), str(out)],
                           capture_output=True, text=True, check=True).stdout
    lines = table.splitlines()
    header = next(ln for ln in lines if ln.startswith("| batch"))
    assert header == "| batch | median ms | fp16_ms | speedup_vs_fp16 |"
    rows = [ln for ln in lines if ln.startswith("| 1 ") or ln.startswith("| 16 ")]
    assert [r.split(" | ")[-1] for r in rows] == ["3 |", "18 |"]
    assert float(rows[0].split(" | ")[1]) > 0


def test_unreadable_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_table.py"), str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "pytest-benchmark JSON" in run.stderr


def test_cases_stream_to_jsonl_as_they_finish_and_make_the_same_table(tmp_path):
    """tests/benchmarks/conftest.py appends each finished case to $QBENCH_BENCH_JSONL (a GPU lease
    can stop a module before pytest-benchmark writes its JSON); the table reads that file too."""
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "conftest.py").write_text((REPO / "tests" / "benchmarks" / "conftest.py").read_text())
    (bench_dir / "bench_fake.py").write_text(BENCH)
    streamed = tmp_path / "cases.jsonl"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(bench_dir / "bench_fake.py"), "--benchmark-only"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "QBENCH_BENCH_JSONL": str(streamed)})
    assert run.returncode == 0, run.stdout[-2000:]
    assert len(streamed.read_text().splitlines()) == 2
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_table.py"), str(streamed)],
                           capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in table.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 16 ")]
    assert rows == ["| 1 |  | 0.5 | 3 |", "| 16 |  | 8 | 18 |"]
