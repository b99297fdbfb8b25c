"""random:DIR models: random weights in a config's architecture, for speed and memory only."""
import json

import pytest
import torch

from qbench.models import RANDOM_PREFIX, load_model, load_tokenizer, resolve_model, tiny_llama
from qbench.params import QBenchError
from tests.test_cli_errors import check_one_line_error, qbench_cli


@pytest.fixture
def config_dir(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path / "arch")
    return tmp_path / "arch"


def test_loads_the_architecture_with_the_same_weights_every_time(config_dir):
    one = load_model(RANDOM_PREFIX + str(config_dir))
    two = load_model(RANDOM_PREFIX + str(config_dir))
    assert one.info["kind"] == "random" and one.info["name"] == "random-arch"
    assert "say nothing about a method" in one.info["note"]
    assert one.info["architecture"] == "LlamaForCausalLM"
    assert one.model.config.num_hidden_layers == tiny_llama().config.num_hidden_layers
    for (name, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([one.tokenizer.encode("hello")])
    assert one.model(ids).logits.shape[-1] == one.model.config.vocab_size


def test_a_config_file_path_works_too(config_dir):
    assert resolve_model(RANDOM_PREFIX + str(config_dir / "config.json"))["kind"] == "random"


@pytest.mark.parametrize("content, needle", [
    (None, "no config.json"),
    ("{not json", "is not a JSON object"),
    ('{"hidden_size": 8}', "has no model_type"),
])
def test_bad_configs_are_one_line_errors(tmp_path, content, needle):
    arch = tmp_path / "arch"
    arch.mkdir()
    if content is not None:
        (arch / "config.json").write_text(content)
    with pytest.raises(QBenchError, match=needle):
        resolve_model(RANDOM_PREFIX + str(arch))
    result = qbench_cli("run", "--methods", "fp32", "--models", RANDOM_PREFIX + str(arch), "--suites", "memory",
                        "--out", str(tmp_path / "o"))
    check_one_line_error(result, needle)
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_vocabulary_smaller_than_the_byte_tokenizer_is_refused(config_dir):
    config = json.loads((config_dir / "config.json").read_text())
    config["vocab_size"] = 100
    (config_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(QBenchError, match="vocab_size 100"):
        load_model(RANDOM_PREFIX + str(config_dir))


def test_memory_cell_on_a_random_model_records_the_note(config_dir, tmp_path):
    """Also: a run whose suites read no text needs no dataset (the GPU machine has none)."""
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "fp16,nf4", "--models", RANDOM_PREFIX + str(config_dir),
                        "--suites", "memory", "--out", str(out),
                        env_extra={"QBENCH_DATA_DIR": str(tmp_path / "no-data")})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(r["model"]["kind"] == "random" and "say nothing" in r["model"]["note"] for r in records)
    report = qbench_cli("report", str(out))
    assert "random weights (seed 0)" in report.stdout


def test_tokenizer_check_before_cells_uses_the_byte_tokenizer(config_dir):
    tokenizer, max_length = load_tokenizer(RANDOM_PREFIX + str(config_dir))
    assert tokenizer.vocab_size == 259 and max_length == tiny_llama().config.max_position_embeddings
