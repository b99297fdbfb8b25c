"""Nothing lost, nothing wrong: one run per directory, malformed records and run.json, full disks,
scratch space of killed runs, and what ``report`` says about directories that are not (yet) runs."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qbench.cli import main
from qbench.records import read_records
from tests.fake_runs import standard_run
from tests.helpers import qbench_cli

MEMORY = "memory:seqlen=16"


def cli(*args):
    """In-process, for failures that happen before any cell process starts."""
    return CliRunner().invoke(main, list(args))


def stderr_lines(result):
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


def records(out: Path):
    return list(read_records(out / "records.jsonl"))


# --- 1. one run per directory ------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from qbench.lock import hold_run_dir
with hold_run_dir(Path(sys.argv[1]), command="holder-command --out somewhere"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def start_holder(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_directory_is_refused_with_who_holds_it(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out, 120)
    try:
        result = cli("run", "--methods", "fp32", "--models", "tiny-llama", "--suites", MEMORY, "--out", str(out))
        assert result.exit_code == 2, result.output
        lines = stderr_lines(result)
        assert len(lines) == 1, result.stderr
        for needle in (f"pid {holder.pid}", socket.gethostname(), "holder-command", "since", "--wait"):
            assert needle in lines[0]
        assert not (out / "records.jsonl").exists()
        assert "run directory" not in result.stdout  # nothing announced for a run that does not start
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released it: the lock dies with its process, nothing stale is left behind
    from qbench.lock import hold_run_dir

    with hold_run_dir(out, command="after the kill"):
        pass


def test_wait_waits_for_the_holder_then_runs(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out, 300)
    run = subprocess.Popen([sys.executable, "-m", "qbench.cli", "run", "--methods", "fp32", "--models", "tiny-llama",
                            "--suites", MEMORY, "--out", str(out), "--wait"], stdout=subprocess.PIPE, text=True)
    try:
        first = run.stdout.readline()
        assert "in use by" in first and f"pid {holder.pid}" in first and "waiting" in first, first
        assert run.poll() is None and not (out / "records.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    rest, _ = run.communicate(timeout=300)
    assert run.returncode == 0, rest
    assert [r["status"] for r in records(out)] == ["ok"]


def test_two_runs_on_one_directory_measure_each_cell_once(tmp_path):
    """The issue's reproduction: `$C & $C & wait`."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qbench.cli", "run", "--methods", "fp32,fp16", "--models", "tiny-llama",
            "--suites", MEMORY, "--out", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    ids = [r["cell"] for r in records(out)]
    assert len(ids) == len(set(ids)) == 2, results
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0, results
    # the other one either found the directory held (2) or came after and found every cell recorded
    assert codes[1] == 2 or all("0 cells run" in o for c, o, _ in results if c == 0), results


# --- 5. run.json --------------------------------------------------------------------------------

def test_report_does_not_need_run_json_and_names_a_corrupt_one(tmp_path):
    run = standard_run(tmp_path / "run")
    (run / "run.json").write_text('{"x":[')
    result = cli("report", str(run))
    assert result.exit_code == 0, result.output
    assert "fp16" in result.stdout and "nf4" in result.stdout
    lines = stderr_lines(result)
    assert len(lines) == 1 and "run.json" in lines[0] and str(run) in lines[0], result.stderr
    (run / "run.json").unlink()
    assert cli("report", str(run)).exit_code == 0


def test_run_on_a_corrupt_run_json_says_which_file_and_what_to_do(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"x":[')
    result = cli("run", "--methods", "fp32", "--models", "tiny-llama", "--suites", MEMORY, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and str(out / "run.json") in lines[0] and "move it away" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert (out / "run.json").read_text() == '{"x":['  # left as it was, for the user to look at


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One fp32 memory cell, run once; tests get a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = qbench_cli("run", "--methods", "fp32", "--models", "tiny-llama", "--suites", MEMORY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


# --- 6. malformed records -------------------------------------------------------------------

def test_report_and_compare_skip_a_record_lacking_fields_with_one_warning(tmp_path):
    a, b = standard_run(tmp_path / "a"), standard_run(tmp_path / "b", nf4_ppl=13.0)
    n = len((b / "records.jsonl").read_text().splitlines())
    with open(b / "records.jsonl", "a") as f:
        f.write('{"cell":"deadbeefdeadbeef","status":"ok"}\n')
        f.write('["not", "a", "record"]\n')
    for result in (cli("report", str(b)), cli("report", str(b), "--format", "csv"), cli("compare", str(a), str(b))):
        assert result.exit_code == 0, result.output
        lines = stderr_lines(result)
        assert len(lines) == 1, result.stderr
        assert "2 malformed" in lines[0] and f"lines {n + 1}, {n + 2}" in lines[0]
    assert "13" in cli("compare", str(a), str(b)).stdout


def test_resume_treats_a_malformed_record_as_missing(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    [line] = (out / "records.jsonl").read_text().splitlines()
    stripped = {"cell": json.loads(line)["cell"], "status": "ok"}  # valid JSON, fields lost
    (out / "records.jsonl").write_text(json.dumps(stripped) + "\n")
    again = qbench_cli("run", "--methods", "fp32", "--models", "tiny-llama", "--suites", MEMORY, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "1 cells run, 0 already recorded" in again.stdout
    assert "malformed" in again.stderr and "line 1" in again.stderr
    report = qbench_cli("report", str(out))
    assert report.returncode == 0 and "fp32" in report.stdout


# --- 7. a full disk -----------------------------------------------------------------------------

def run_with_file_size_limit(args, limit: int):
    """Every write past ``limit`` bytes in a file fails with EFBIG, as writes to a full disk fail with
    ENOSPC: a real kernel error, no privileges needed."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "qbench.cli", *args], capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=300)


def test_a_record_that_does_not_fit_leaves_no_torn_line(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = (out / "records.jsonl").read_bytes()
    result = run_with_file_size_limit(["run", "--methods", "fp32,fp16", "--models", "tiny-llama", "--suites", MEMORY,
                                       "--out", str(out)], len(before) + 200)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1 and "records.jsonl" in lines[0] and "free" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "records.jsonl").read_bytes() == before  # the torn half-record was cut
    assert not list(out.glob("*.tmp"))


def test_run_json_that_does_not_fit_leaves_the_old_one(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = (out / "run.json").read_bytes()
    result = run_with_file_size_limit(["run", "--methods", "fp32", "--models", "tiny-llama", "--suites", MEMORY,
                                       "--out", str(out)], len(before) + 10)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1 and "run.json" in lines[0], result.stderr
    assert (out / "run.json").read_bytes() == before
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_enospc_on_append_truncates_back(tmp_path, monkeypatch):
    import errno

    from qbench import records as rec_module
    from qbench.params import QBenchError

    path = tmp_path / "records.jsonl"
    rec_module.append_record(path, {"cell": "a" * 16, "status": "ok"})
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(QBenchError, match="No space left on device"):
        rec_module.append_record(path, {"cell": "b" * 16, "status": "ok", "pad": "x" * 1000})
    monkeypatch.undo()
    assert path.read_bytes() == before


# --- 10. scratch space of killed runs -------------------------------------------------------------

def test_killed_runs_leave_no_scratch_behind(tmp_path):
    out, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    args = [sys.executable, "-m", "qbench.cli", "run", "--methods", "fp32,fp16", "--models", "tiny-llama",
            "--suites", MEMORY, "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "logs").glob("*.log")):
        time.sleep(0.1)
    time.sleep(0.5)  # inside the first cell
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp.glob("qbench-*")), list(tmp.iterdir())
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    leftovers = [p for p in (*tmp.rglob("*"), *out.rglob("*")) if "qbench-cell" in p.name or p.parent.name == ".cells"]
    assert not leftovers, leftovers


ORPHAN = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; from qbench.cell import exit_with_parent; "
                          "exit_with_parent(0.1); print('ready', flush=True); time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waits only for its reaper


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_cell_ends_when_its_driver_is_killed():
    """The driver dies without a word (as under ``kill`` or SIGKILL): its cell must not run on alone."""
    driver = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=60)
    cell_pid = int(driver.stdout.split()[-1])
    deadline = time.time() + 15
    while _running(cell_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(cell_pid)


# --- issue 16: what report says about directories that are not runs ------------------------------

def test_report_on_an_interrupted_run_directory_and_on_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"invocations": [{"argv": ["qbench", "run", "--out", str(run)]}]}))
    for command in (["report", str(run)], ["compare", str(run), str(run)]):
        result = cli(*command)
        assert result.exit_code == 2
        lines = stderr_lines(result)
        assert len(lines) == 1 and "no records yet" in lines[0] and "--out directory" not in lines[0], result.stderr
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    result = cli("report", str(a_file))
    assert result.exit_code == 2
    assert "is a file" in result.stderr and "does not exist" not in result.stderr


# --- issue 16: everything qbench writes stays under QBENCH_CACHE_DIR ------------------------------

def test_reading_a_user_file_writes_nothing_outside_the_cache_dir(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "qcache"
    home.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("a few words of the user's own\n" * 5)
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), QBENCH_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = standard_run(tmp_path / "run")
    code = ("import sys; from pathlib import Path; from qbench.data import load_text; "
            "from qbench.report import render; print(sum(len(load_text(p).rows) for p in sys.argv[2:])); "
            "print(len(render(Path(sys.argv[1]), 'html')))")
    result = subprocess.run([sys.executable, "-c", code, str(run), str(text), str(jsonl)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "7"
    written = [p for p in home.rglob("*") if p.is_file()]
    assert not written, written
