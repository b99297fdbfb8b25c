"""The `accuracy` suite: lm-eval's own answer through `qbench run`, our shipped task definitions
against lm-eval's built-in ones on the same rows, and bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from qbench.paired import SampleSet
from qbench.params import QBenchError
from qbench.records import read_records
from qbench.suites import accuracy
from tests.helpers import qbench_cli

DATA_DIR = Path(os.environ["QBENCH_DATA_DIR"])
TASK_FILES = DATA_DIR / "tasks"
BUILTIN = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}
LOCAL_TASKS = ["piqa", "arc_easy", "arc_challenge", "lambada_openai", "winogrande", "boolq"]
needs_data = pytest.mark.skipif(not TASK_FILES.is_dir(), reason="no tasks/ in QBENCH_DATA_DIR")


# --- the test's own reading of the hub layouts (MANIFEST.md), independent of qbench/tasks/utils.py

def _arc_rows_in_hub_layout(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        rows.append({"id": item["id"], "question": item["question"]["stem"],
                     "choices": {"text": [c["text"] for c in item["question"]["choices"]],
                                 "label": [c["label"] for c in item["question"]["choices"]]},
                     "answerKey": item["answerKey"]})
    return rows


def _boolq_rows_in_superglue_layout(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        item = json.loads(line)
        rows.append({"question": item["question"], "passage": f"{item['title']} -- {item['passage']}",
                     "idx": i, "label": 1 if item["answer"] else 0})
    return rows


def builtin_task_on(name: str, rows_file: Path) -> ConfigurableTask:
    """lm-eval's built-in task config, unchanged but for where its rows come from."""
    config = load_yaml(BUILTIN / BUILTIN_YAML[name], resolve_func=True)
    config.pop("tag", None)
    split = config.get("test_split") or config["validation_split"]
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(rows_file)}})
    for key in ("training_split", "validation_split", "test_split"):
        if config.get(key) not in (None, split):
            config[key] = None  # the local files hold only the evaluated split
    return ConfigurableTask(config=config)


def _hub_layout_file(name: str, tmp_path: Path) -> Path:
    ours = accuracy.local_files(name)
    original = TASK_FILES / next(iter(ours.values()))
    if name.startswith("arc_"):
        rows = _arc_rows_in_hub_layout(original)
    elif name == "boolq":
        rows = _boolq_rows_in_superglue_layout(original)
    else:
        return original  # piqa, lambada_openai, winogrande: the original layout is the hub's
    target = tmp_path / f"{name}.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return target


@needs_data
@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_shipped_task_gives_the_builtin_tasks_requests_on_every_row(name, tmp_path):
    [ours], described = accuracy.build_tasks([name], source="local", data_dir=str(DATA_DIR))
    theirs = builtin_task_on(name, _hub_layout_file(name, tmp_path))
    assert described[name]["source"] == "local"
    assert ours.config.output_type == theirs.config.output_type
    assert ours.config.metric_list == theirs.config.metric_list
    assert ours.config.metadata["version"] == theirs.config.metadata["version"]
    assert (ours.config.target_delimiter, ours.config.fewshot_delimiter) == \
           (theirs.config.target_delimiter, theirs.config.fewshot_delimiter)
    our_docs, their_docs = list(ours.eval_docs), list(theirs.eval_docs)
    expected = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "lambada_openai": 5153,
                "winogrande": 1267, "boolq": 3270}[name]
    assert len(our_docs) == len(their_docs) == expected
    for a, b in zip(our_docs, their_docs):
        assert ours.doc_to_text(a) == theirs.doc_to_text(b)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)
        if ours.config.output_type == "multiple_choice":
            assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
    # the exact (context, continuation) pairs lm-eval would score, for the first rows
    for i in range(5):
        mine = ours.construct_requests(our_docs[i], ours.fewshot_context(our_docs[i], 0))
        ref = theirs.construct_requests(their_docs[i], theirs.fewshot_context(their_docs[i], 0))
        mine, ref = (m if isinstance(m, list) else [m] for m in (mine, ref))
        assert [r.arguments for r in mine] == [r.arguments for r in ref]


@needs_data
def test_arc_challenge_numeric_labels_keep_their_answer():
    [task], _ = accuracy.build_tasks(["arc_challenge"], source="local", data_dir=str(DATA_DIR))
    numeric = [d for d in task.eval_docs if d["answerKey"] in "1234"]
    assert len(numeric) == 22 and all(d["id"].startswith("NYSEDREGENTS_") for d in numeric)
    for doc in numeric:
        target = task.doc_to_target(doc)
        assert doc["choices"]["label"][target] == doc["answerKey"]


def test_hellaswag_definition_builds_the_builtin_documents():
    """No local HellaSwag copy exists yet; the shipped definition must still build lm-eval's documents."""
    import datasets

    rows = [{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
             "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
             "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
            {"ind": 7, "activity_label": "Making a cake [title] Mix", "ctx_a": "[header] How to bake [step]",
             "ctx_b": "you  need flour", "ctx": "", "split": "val", "split_type": "zeroshot", "label": 0,
             "endings": [" [substeps] Add  eggs. ", "Stir [title] well", "Bake.", "Serve."]}]
    theirs = load_yaml(BUILTIN / BUILTIN_YAML["hellaswag"], resolve_func=True)
    ours = accuracy.local_config("hellaswag")
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "metadata"):
        assert ours[key] == theirs[key], key
    ds = datasets.Dataset.from_list(rows)
    assert ours["process_docs"](ds).to_list() == theirs["process_docs"](ds).to_list()


# --- lm-eval's own answer, directly and through `qbench run`

TASKS_FOR_EQUALITY = "piqa+arc_challenge+lambada_openai+winogrande+boolq"
ITEMS = 5


def make_small_model(root: Path) -> Path:
    """A local model directory: a 2-layer random llama with a real (byte-level BPE) tokenizer,
    trained here on a few task rows, so that lm-eval's HFLM drives it like any Hugging Face model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for rel in ("piqa/valid.jsonl", "winogrande/dev.jsonl", "lambada_openai/lambada_test.jsonl"):
        texts += (TASK_FILES / rel).read_text(encoding="utf-8").splitlines()[:200]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("small-llama"))


@needs_data
def test_qbench_run_gives_lm_evals_own_numbers(tmp_path, small_model_dir):
    from qbench import host
    from qbench.kernels._cpu import fp32_arithmetic
    from qbench.models import load_model

    model_dir = small_model_dir
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "nf4", "--models", str(model_dir), "--suites",
                        f"accuracy:tasks={TASKS_FOR_EQUALITY},batch_size=4", "--limit", str(ITEMS),
                        "--threads", "1", "--no-cache", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [record] = [r for r in read_records(out / "records.jsonl")]
    assert record["status"] == "ok", record.get("message")
    assert record["kernel_paths"]  # the method's own modules ran

    # lm-eval directly: the same model, quantized by the same method, in memory; lm-eval builds the
    # tasks itself from the same definitions and files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(str(model_dir))
        model = host.make_method("nf4", {}).quantize(loaded.model).eval()
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=4, device="cpu")
        configs = []
        for name in TASKS_FOR_EQUALITY.split("+"):
            config = accuracy.local_config(name)
            config["dataset_kwargs"] = {"data_files": {split: str(TASK_FILES / rel)
                                                       for split, rel in accuracy.local_files(name).items()}}
            configs.append(config)
        with fp32_arithmetic():  # as the suite runs on a CPU
            direct = lm_eval.simple_evaluate(model=lm, tasks=configs, num_fewshot=0, limit=ITEMS, log_samples=True)
    finally:
        torch.set_num_threads(threads)

    metrics = record["metrics"]
    compared = 0
    for name in TASKS_FOR_EQUALITY.split("+"):
        row = direct["results"][name]
        for metric in accuracy.TASKS[name][0]:
            assert metrics[f"{name}.{metric}"]["value"] == row[f"{metric},none"], (name, metric)
            assert metrics[f"{name}.{metric}"]["stderr"] == row[f"{metric}_stderr,none"], (name, metric)
            compared += 1
        assert metrics[f"{name}.items"]["value"] == ITEMS == direct["n-samples"][name]["effective"]
        assert record["extra"]["tasks"][name]["version"] == direct["versions"][name]
        # per item, as lm-eval logged them: the same items, the same 0/1 results, and their mean is the metric
        items = record["extra"]["samples"][name]
        logged = {item["doc_id"]: item for item in direct["samples"][name]}
        assert items["ids"] == sorted(logged) == list(range(ITEMS))
        for metric in set(items["values"]) - {"nll", "count"}:
            values = items["values"][metric]
            assert values == [logged[i][metric] for i in items["ids"]], (name, metric)
            assert sum(values) / len(values) == pytest.approx(metrics[f"{name}.{metric}"]["value"])
        assert f" {name} v{direct['versions'][name]} 0-shot files:" in items["key"]
    assert compared == 8
    # lambada: its perplexity, exp(−mean loglikelihood), recomputed from the items' NLLs
    lambada = SampleSet.from_json(record["extra"]["samples"]["lambada_openai"])
    assert set(lambada.values) == {"acc", "nll", "count"}
    assert lambada.statistic(("exp_ratio", "nll", "count")) == \
        pytest.approx(metrics["lambada_openai.perplexity"]["value"], rel=1e-9)
    pooled = SampleSet.from_json(record["extra"]["samples"]["tasks"])
    assert len(pooled.ids) == ITEMS * len(TASKS_FOR_EQUALITY.split("+"))
    assert pooled.statistic(("stratified_mean", "main", "task")) == pytest.approx(metrics["mean_acc"]["value"])
    assert metrics["lambada_openai.perplexity"]["value"] > 1
    mains = [metrics[f"{n}.{accuracy.TASKS[n][1]}"]["value"] for n in TASKS_FOR_EQUALITY.split("+")]
    assert metrics["mean_acc"]["value"] == pytest.approx(sum(mains) / len(mains))
    assert record["extra"]["lm_eval"]["version"] == lm_eval.__version__
    assert record["extra"]["tasks"]["boolq"]["files"]["validation"]["sha256"] == \
        "ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a"
    assert record["dataset"]["protocol"] == f"lm-eval-{lm_eval.__version__}/0-shot/local/first-{ITEMS}"
    assert record["limit"] == ITEMS


@needs_data
def test_limit_larger_than_a_task_takes_the_whole_task(tmp_path, small_model_dir):
    rows = (TASK_FILES / "winogrande" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "data" / "tasks" / "winogrande").mkdir(parents=True)
    (tmp_path / "data" / "tasks" / "winogrande" / "dev.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "fp32", "--models", str(small_model_dir), "--suites",
                        "accuracy:tasks=winogrande", "--limit", "50", "--data-dir", str(tmp_path / "data"),
                        "--out", str(out), env_extra={"QBENCH_DATA_DIR": str(tmp_path / "none")}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [record] = read_records(out / "records.jsonl")
    assert record["metrics"]["winogrande.items"]["value"] == 3
    assert record["extra"]["tasks"]["winogrande"]["items"] == 3
    assert record["dataset"]["protocol"] == f"lm-eval-{lm_eval.__version__}/0-shot/local"  # nothing cut
    assert not any("first" in note for note in record["notes"])


def test_metrics_from_results_and_the_mean():
    results = {"results": {"piqa": {"acc,none": 0.6, "acc_stderr,none": 0.03, "acc_norm,none": 0.62,
                                    "acc_norm_stderr,none": 0.031},
                           "arc_challenge": {"acc,none": 0.2, "acc_stderr,none": 0.04, "acc_norm,none": 0.25,
                                             "acc_norm_stderr,none": 0.04},
                           "lambada_openai": {"acc,none": 0.3, "acc_stderr,none": 0.02, "perplexity,none": 40.0,
                                              "perplexity_stderr,none": 2.0}},
               "n-samples": {n: {"original": 10, "effective": 10} for n in ("piqa", "arc_challenge", "lambada_openai")}}
    metrics = accuracy.metrics_from_results(results, ["piqa", "arc_challenge", "lambada_openai"])
    assert metrics["piqa.acc"].value == 0.6 and metrics["piqa.acc"].stderr == 0.03
    assert metrics["lambada_openai.perplexity"].unit == ""
    # the mean of each task's main metric: piqa acc, arc_challenge acc_norm, lambada acc
    assert metrics["mean_acc"].value == pytest.approx((0.6 + 0.25 + 0.3) / 3)
    assert metrics["mean_acc"].stderr == pytest.approx((0.03**2 + 0.04**2 + 0.02**2) ** 0.5 / 3)
    specs = accuracy.AccuracySuite.metrics
    spec = accuracy.AccuracySuite.metric_spec("arc_challenge.acc_norm")
    assert spec.headline and spec.vs_baseline == "percent" and spec.baseline_title == "arc_challenge recovery %"
    assert not accuracy.AccuracySuite.metric_spec("arc_challenge.acc").headline
    assert accuracy.AccuracySuite.metric_spec("piqa.acc_norm").title == "piqa acc_norm (%)"
    assert specs["mean_acc"].aggregate == "mean"


# --- bad input

def test_unknown_task_lists_the_available_ones():
    with pytest.raises(QBenchError, match=r"unknown task 'hellaswg'; available tasks: piqa, arc_easy"):
        accuracy.AccuracySuite(tasks="piqa+hellaswg")


def test_missing_task_file_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("QBENCH_DATA_DIR")
    suite = accuracy.AccuracySuite(tasks="piqa+winogrande")
    problem = suite.check_run(["smollm2-135m"], str(tmp_path))
    assert str(tmp_path / "tasks" / "piqa" / "valid.jsonl") in problem and "offline" in problem
    local = accuracy.AccuracySuite(tasks="winogrande", source="local")
    assert "no data dir set" in local.check_run(["smollm2-135m"], None)
    assert "source=hub" in accuracy.AccuracySuite(tasks="piqa", source="hub").check_run(["smollm2-135m"], None)


@needs_data
def test_hellaswag_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    problem = accuracy.AccuracySuite(tasks="hellaswag").check_run(["smollm2-135m"], str(DATA_DIR))
    assert problem.startswith("accuracy task hellaswag: its data is not in shared/data")
    assert "hellaswag/hellaswag_val.jsonl" in problem and "\n" not in problem


@needs_data
def test_fewshot_needs_the_hub_and_random_models_are_refused():
    suite = accuracy.AccuracySuite(tasks="piqa", num_fewshot=5)
    assert "source=hub" in suite.check_run(["smollm2-135m"], str(DATA_DIR))
    assert "byte tokenizer" in accuracy.AccuracySuite().check_run(["tiny-llama"], str(DATA_DIR))


def test_cli_stops_before_any_cell_when_task_data_is_missing(tmp_path):
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "fp16", "--suites", "accuracy:tasks=winogrande", "--out", str(out),
                        env_extra={"QBENCH_DATA_DIR": str(tmp_path / "empty"), "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "accuracy task" in line]  # one line
    assert "winogrande/dev.jsonl" in line and "offline" in line
    assert not (out / "records.jsonl").exists()


def test_leaderboard_shows_accuracy_with_stderr_and_recovery(tmp_path):
    from qbench.cell import _jsonable_metrics
    from qbench.leaderboard import leaderboard, load_frame
    from tests.fake_runs import record, write_run

    suite = accuracy.AccuracySuite(tasks="piqa+arc_challenge")
    recs = []
    for method, piqa, arc in (("fp16", 0.60, 0.30), ("nf4", 0.57, 0.27)):
        results = {"results": {"piqa": {"acc,none": piqa, "acc_stderr,none": 0.02, "acc_norm,none": piqa + 0.01,
                                        "acc_norm_stderr,none": 0.02},
                               "arc_challenge": {"acc,none": arc - 0.05, "acc_stderr,none": 0.03,
                                                 "acc_norm,none": arc, "acc_norm_stderr,none": 0.03}},
                   "n-samples": {"piqa": {"effective": 50}, "arc_challenge": {"effective": 50}}}
        rec = record(method, "accuracy", {})
        rec["metrics"] = _jsonable_metrics(accuracy.metrics_from_results(results, suite.task_names), suite)
        recs.append(rec)
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    nf4 = board[board["method"] == "nf4"].iloc[0]
    assert nf4["piqa acc (%)"] == 57.0 and nf4["piqa acc (%) ±"] == 2.0
    assert nf4["piqa recovery %"] == 95.0
    assert nf4["arc_challenge recovery %"] == 90.0
    assert nf4["mean acc (%)"] == 42.0 and nf4["mean recovery %"] == pytest.approx(100 * 0.42 / 0.45, abs=0.01)
    assert "piqa acc_norm (%)" not in board.columns  # the other metric: --columns all
    assert "piqa acc_norm (%)" in leaderboard(load_frame(tmp_path / "run"), columns="all").columns


def test_accuracy_differences_are_paired_over_the_same_items(tmp_path):
    """With per-item results kept, recovery % gets a paired bootstrap interval over the items both
    rows answered, far narrower than the unpaired one from two standard errors when the quantized
    model gets mostly the same items right; the mean over tasks too; items of another file refuse to pair."""
    import random

    from qbench.cell import _jsonable_metrics
    from qbench.leaderboard import leaderboard, load_frame
    from qbench.paired import normal_interval
    from tests.fake_runs import record, write_run

    names = ["piqa", "winogrande"]
    suite = accuracy.AccuracySuite(tasks="+".join(names))
    rng = random.Random(0)
    sizes = {"piqa": 400, "winogrande": 150}
    base = {n: [1.0 if rng.random() < 0.6 else 0.0 for _ in range(sizes[n])] for n in names}
    flipped = {n: [v if rng.random() > 0.05 else 1.0 - v for v in base[n]] for n in names}  # 5% of answers change

    def described(sha):
        return {n: {"source": "local", "version": 1.0, "files": {"validation": {"sha256": sha * 32}}} for n in names}

    def make(method, answers, sha="ab"):
        results = {"results": {}, "n-samples": {}, "samples": {}}
        for n in names:
            values = answers[n]
            mean = sum(values) / len(values)
            stderr = (mean * (1 - mean) / (len(values) - 1)) ** 0.5
            results["results"][n] = {"acc,none": mean, "acc_stderr,none": stderr, "acc_norm,none": mean,
                                     "acc_norm_stderr,none": stderr}
            results["n-samples"][n] = {"effective": len(values)}
            results["samples"][n] = [{"doc_id": i, "acc": v, "acc_norm": v} for i, v in enumerate(values)]
        rec = record(method, "accuracy", {})
        rec["metrics"] = _jsonable_metrics(accuracy.metrics_from_results(results, names), suite)
        rec["extra"] = {"samples": accuracy.item_samples(results, names, described(sha), 0)}
        return rec

    recs = [make("fp16", base), make("nf4", flipped)]
    board = leaderboard(load_frame(write_run(tmp_path / "run", recs)))
    nf4 = board[board["method"] == "nf4"].iloc[0]
    assert nf4["piqa recovery %"] == pytest.approx(100 * sum(flipped["piqa"]) / sum(base["piqa"]), abs=0.01)
    for title, metric in (("piqa recovery %", "piqa.acc"), ("mean recovery %", "mean_acc")):
        paired_half = (nf4[f"{title} CI high"] - nf4[f"{title} CI low"]) / 2
        a, b = (r["metrics"][metric] for r in recs)
        unpaired = normal_interval(b["value"], a["value"], b["stderr"], a["stderr"], "percent")
        assert 0 < paired_half < unpaired.half_width / 2, title

    # the same ids over another file: no interval rather than a wrong pairing
    board = leaderboard(load_frame(write_run(tmp_path / "other", [recs[0], make("nf4", flipped, sha="cd")])))
    other = board[board["method"] == "nf4"].iloc[0]
    assert pd_isna(other.get("piqa recovery % CI low")) and pd_isna(other.get("mean recovery % CI low"))


def pd_isna(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))
