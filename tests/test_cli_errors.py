"""Bad input gets one clear line on stderr, a non-zero exit, no traceback, nothing written."""
import pytest
from click.testing import CliRunner

from qbench.cli import main


class Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def qbench_cli(*args, env_extra=None):
    """In-process: the errors are raised before any cell process starts, so no subprocess is needed."""
    return Result(CliRunner().invoke(main, list(args), env=env_extra))


def check_one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--methods", "fp17"], ["unknown method 'fp17'", "fp16"]),
    (["--suites", "speed"], ["unknown suite 'speed'", "latency, memory, perplexity"]),
    (["--suites", "perplexity:seqlen=abc"], ["seqlen='abc' must be int"]),
    (["--suites", "latency:batch_sizes=1,4"], ["unknown suite '4'"]),
    (["--suites", "perplexity:window=5"], ["unknown parameter 'window'"]),
    (["--dataset", "wikitext3"], ["unknown dataset 'wikitext3'"]),
    (["--dataset", "/nonexistent/text.txt"], ["dataset file /nonexistent/text.txt not found"]),
    (["--models", "/nonexistent-model-dir/x"], ["not found"]),
    (["--limit", "many"], ["--limit 'many'"]),
    (["--device", "tpu"], ["--device 'tpu' is not supported"]),
    (["--executor", "slurm"], ["unknown executor 'slurm'", "local"]),
])
def test_bad_run_arguments(tmp_path, args, needles):
    out = tmp_path / "out"
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--out", str(out), "--suites", "memory",
                        *args)
    check_one_line_error(result, *needles)
    assert not (out / "records.jsonl").exists()


def test_dataset_not_found_says_where_it_looked(tmp_path):
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "perplexity",
                        "--out", str(tmp_path / "o"),
                        env_extra={"QBENCH_DATA_DIR": str(tmp_path / "empty"), "HF_DATASETS_OFFLINE": "1"})
    check_one_line_error(result, "dataset wikitext2 not found", str(tmp_path / "empty"), "--data-dir")


def test_dataset_shorter_than_one_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    out = tmp_path / "o"
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "perplexity:seqlen=128",
                        "--dataset", str(short), "--out", str(out))
    check_one_line_error(result, "fewer than one window of 128")
    assert not (out / "records.jsonl").exists()


def test_model_directory_without_weights(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    result = qbench_cli("run", "--methods", "fp32", "--models", str(model), "--suites", "memory",
                        "--out", str(tmp_path / "o"))
    check_one_line_error(result, "config.json is not valid JSON")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "memory",
                        "--out", str(blocker / "run"))
    check_one_line_error(result, "not writable")


def test_report_of_missing_run(tmp_path):
    check_one_line_error(qbench_cli("report", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    check_one_line_error(qbench_cli("report", str(tmp_path / "empty")), "no records.jsonl")


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out"
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "memory",
                        "--executor", "ray", "--out", str(out))
    check_one_line_error(result, "executor ray needs the ray package", "qbench-quant[ray]")
    assert not out.exists()
