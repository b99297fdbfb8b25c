"""Bad input gets one clear line on stderr, a non-zero exit, no traceback, nothing written."""
from pathlib import Path

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
    assert not result.stdout.strip(), result.stdout  # validated first: nothing announced before the error
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--methods", "fp17"], ["unknown method 'fp17'", "fp16"]),
    (["--suites", "speed"], ["unknown suite 'speed'", "latency, memory, perplexity"]),
    (["--suites", "perplexity:seqlen=abc"], ["seqlen='abc' must be int"]),
    (["--suites", "latency:batch_sizes=1,4"], ["unknown suite '4'"]),
    (["--suites", "perplexity:window=5"], ["unknown parameter 'window'"]),
    (["--dataset", "wikitext3"], ["unknown dataset 'wikitext3'"]),
    (["--dataset", "wikitext2:train"], ["wikitext2 has the split(s) test, validation, not 'train'"]),
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


# --- a corrupt model is caught before any cell starts ------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from qbench.models import tiny_llama

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama().save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def copy_model(saved_model, tmp_path):
    import shutil

    return Path(shutil.copytree(saved_model, tmp_path / "model"))


def test_truncated_safetensors_is_caught_before_the_run(saved_model, tmp_path):
    model = copy_model(saved_model, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    out = tmp_path / "o"
    result = qbench_cli("run", "--methods", "fp32", "--models", str(model), "--suites", "memory", "--out", str(out))
    check_one_line_error(result, str(weights), "truncated")
    assert not (out / "records.jsonl").exists()


def test_safetensors_with_a_broken_header_is_caught(saved_model, tmp_path):
    model = copy_model(saved_model, tmp_path)
    (model / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    result = qbench_cli("run", "--methods", "fp32", "--models", str(model), "--suites", "memory",
                        "--out", str(tmp_path / "o"))
    check_one_line_error(result, "model.safetensors", "header")


def test_config_that_is_a_json_list_is_caught(saved_model, tmp_path):
    model = copy_model(saved_model, tmp_path)
    (model / "config.json").write_text("[1, 2]")
    result = qbench_cli("run", "--methods", "fp32", "--models", str(model), "--suites", "memory",
                        "--out", str(tmp_path / "o"))
    check_one_line_error(result, "config.json", "not a JSON object")


# --- dataset files: one line saying what is wrong with which file --------------------------------

@pytest.mark.parametrize("name, content, needles", [
    ("numbers.jsonl", b'{"text": 5}\n', ["line 1", "'text' is int, not a string"]),
    ("later.jsonl", b'{"text": "fine"}\n{"text": null}\n', ["line 2", "'text' is NoneType, not a string"]),
    ("nofield.jsonl", b'{"body": "x"}\n', ["line 1", "no 'text' field"]),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', ["line 2", "not valid JSON"]),
    ("empty.jsonl", b"", ["is empty"]),
    ("blank.txt", b"\n  \n", ["is empty"]),
    ("binary.txt", bytes(range(256)) * 4, ["not UTF-8 text"]),
    ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["not UTF-8 text"]),
])
def test_bad_dataset_files(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "o"
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "perplexity:seqlen=16",
                        "--dataset", str(path), "--out", str(out))
    check_one_line_error(result, str(path), *needles)
    assert not out.exists()


# --- offline: at once, one line --------------------------------------------------------------

def test_no_network_fails_at_once_without_retries(monkeypatch):
    import socket
    import time

    import datasets

    from qbench.data import load_text
    from qbench.params import QBenchError

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "QBENCH_DATA_DIR", "HTTPS_PROXY", "https_proxy",
                "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("went to the hub although it cannot be reached")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    start = time.monotonic()
    for name in ("wikitext2", "c4"):
        with pytest.raises(QBenchError) as err:
            load_text(name)
        assert "QBENCH_DATA_DIR" in str(err.value) and "cannot be reached" in str(err.value)
    assert time.monotonic() - start < 5


# --- validate first, then announce ------------------------------------------------------------

def test_a_memory_only_run_does_not_announce_perplexity_windows(tmp_path):
    result = qbench_cli("run", "--models", "tiny-llama", "--methods", "fp32", "--suites", "memory:seqlen=16",
                        "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "run directory" in result.stdout and "windows" not in result.stdout


# --- an internal error says where ----------------------------------------------------------------

def test_internal_error_names_the_file_and_operation(tmp_path, monkeypatch):
    from tests.fake_runs import standard_run

    run = standard_run(tmp_path / "run")

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error", str(run / "records.jsonl"))

    monkeypatch.setattr("qbench.report.leaderboard", broken)
    result = qbench_cli("report", str(run))
    assert result.returncode == 3
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert str(run / "records.jsonl") in lines[0] and "broken" in lines[0] and "QBENCH_DEBUG" in lines[0]
