"""scripts/seed_spread.py groups records by everything but the seed and summarises the metric."""
import subprocess
import sys
from pathlib import Path

from tests.fake_runs import record, write_run

REPO = Path(__file__).resolve().parent.parent


def _rec(params, ppl, status="ok"):
    rec = record("gptq", "perplexity", {"ppl": ppl}, status=status, protocol="wikitext2/gptq-s2048/first-16")
    rec["method"]["params"] = params
    rec["cell"] += str(sorted(params.items()))
    return rec


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "seed_spread.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_seeds_of_one_setting_form_one_row(tmp_path):
    run = write_run(tmp_path / "run", [
        _rec({"bits": 4, "seed": 0}, 32.0), _rec({"bits": 4, "seed": 1}, 30.0), _rec({"bits": 4, "seed": 2}, 31.0),
        _rec({"bits": 3, "seed": 0}, 100.0), _rec({"bits": 3, "seed": 1}, 1.0, status="error"),
    ])
    proc = _run(run)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| tiny-llama")]
    assert len(rows) == 2
    four = next(r for r in rows if "bits=4" in r).split(" | ")
    assert four[4] == "0: 32.00, 1: 30.00, 2: 31.00" and four[5:9] == ["3", "31.00", "1.00", "2.00 |"]
    three = next(r for r in rows if "bits=3" in r).split(" | ")
    assert three[4] == "0: 100.00" and three[5] == "1"  # the error record is left out


def test_missing_run_is_one_line_and_exit_2(tmp_path):
    proc = _run(tmp_path / "nothing")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "records.jsonl" in proc.stderr
