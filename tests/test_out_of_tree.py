"""Adding a method or a suite stays one file: the README's two plugin examples, taken verbatim from the
README and installed as distributions of their own, run through `qbench run` and reach the leaderboard."""
import json
import os
import re
from pathlib import Path

import pytest

from qbench.records import read_records
from tests.helpers import qbench_cli

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_file(name: str) -> str:
    """The README's python block that starts with ``# <name>``."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"README has no python block starting with '# {name}'")


def install(site: Path, module: str, entry_point: str, code: str) -> None:
    """What `pip install` of a one-module package with a `qbench` entry point leaves behind."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(code)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qbench]\n{entry_point} = {module}\n")
    (info / "RECORD").write_text("")


def test_readme_method_and_suite_plugins_run_and_reach_the_leaderboard(tmp_path):
    site = tmp_path / "site"
    install(site, "qbench_sign", "sign", readme_file("qbench_sign.py"))
    install(site, "qbench_copy", "copy", readme_file("qbench_copy.py"))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    methods, suites = qbench_cli("methods", env_extra=env), qbench_cli("suites", env_extra=env)
    assert methods.returncode == 0 and "sign" in methods.stdout
    assert suites.returncode == 0 and "copy" in suites.stdout and "length=16" in suites.stdout

    out = tmp_path / "run"
    run = qbench_cli("run", "--methods", "fp16,sign", "--models", "tiny-llama", "--suites",
                     "memory:seqlen=16,copy:length=12", "--out", str(out), env_extra=env)
    assert run.returncode == 0, run.stderr
    records = {(r["method"]["name"], r["suite"]["name"]): r for r in read_records(out / "records.jsonl")}
    assert set(records) == {(m, s) for m in ("fp16", "sign") for s in ("memory", "copy")}
    assert {r["status"] for r in records.values()} == {"ok"}
    copy = records[("sign", "copy")]["metrics"]["copy_rate"]
    assert 0 <= copy["value"] <= 1 and copy["unit"] == "fraction"
    assert copy["title"] == "copy rate" and copy["vs_baseline"] == "diff"  # the suite's spec, in the record
    assert 8 <= records[("sign", "memory")]["metrics"]["bits_per_weight"]["value"] < 9  # int8 signs + fp32 scales

    # the report needs nothing but the records: run it without the plugins installed
    board = qbench_cli("report", str(out), "--format", "csv")
    assert board.returncode == 0, board.stderr
    header = next(line for line in board.stdout.splitlines() if line and not line.startswith("#"))
    assert "copy rate" in header and "copy rate Δ" in header and "bits/weight" in header
    table = qbench_cli("report", str(out), "--format", "json")
    assert table.returncode == 0, table.stderr
    rows = {row["method"]: row for row in json.loads(table.stdout)["leaderboard"]}
    assert rows["fp16"]["copy rate Δ"] == 0
    assert rows["sign"]["copy rate Δ"] == pytest.approx(rows["sign"]["copy rate"] - rows["fp16"]["copy rate"])
