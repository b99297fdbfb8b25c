"""``accuracy``: zero-shot task accuracy through EleutherAI's lm-evaluation-harness (lm-eval).

The cell's quantized model, as it is in memory (its own modules and kernels), is wrapped in
lm-eval's ``HFLM`` with its tokenizer and scored by ``lm_eval.simple_evaluate`` on loglikelihood
tasks: piqa, arc_easy, arc_challenge, lambada_openai, winogrande, boolq, hellaswag.

Where the task's original file is in ``<data dir>/tasks/`` (``--data-dir`` / ``QBENCH_DATA_DIR``;
see shared/data/tasks/MANIFEST.md) the task definition qbench ships in ``qbench/tasks/`` reads it:
the built-in task's prompt, target, choices, metrics and version, pointed at the local file (the
original layouts of ARC and BoolQ are mapped to the hub's). Otherwise, online, lm-eval's own
hub-backed task of the same name runs. The record says which (file and sha256, or hub dataset),
with the lm-eval version and each task's version.

Items per task: the suite's ``limit``, else the run's ``--limit`` (the first N items of each
task's split, as lm-eval's ``--limit``; the CPU default of 4 is a smoke test), ``--limit all``
for the full sets. Reported per task: each metric with lm-eval's standard error, the item count;
and the mean of each task's main metric (acc_norm for arc_challenge and hellaswag, acc
elsewhere) with its standard error, each against the baseline row as recovery %.

Each task's per-item results (lm-eval's logged samples: the item's ``doc_id`` and its 0/1 acc,
acc_norm) are kept in the record as a sample set (:mod:`qbench.paired`) keyed by the task, its
version, the shot count and the data (file hash or hub dataset), so two cells that answered the same
items are compared **paired** (bootstrap over items, the same draw for both): a quantized model
mostly gets the same items right as its baseline, and the paired interval is much narrower than one
from the two standard errors. The mean over tasks is paired too: a bootstrap within each task
(every resample keeps each task's item count) of the mean of the tasks' main metrics.
"""
from __future__ import annotations

import math
from pathlib import Path

from qbench import hookimpl
from qbench.durable import file_sha256
from qbench.hub import offline
from qbench.paired import sample_set_json
from qbench.params import Param, QBenchError
from qbench.suite import CellContext, Metric, MetricSpec, Suite


def _tasks_dir() -> Path:
    import qbench.tasks

    return Path(qbench.tasks.__file__).resolve().parent


# task -> (metrics lm-eval reports for it, the main one: the task's column and recovery %)
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "piqa": (("acc", "acc_norm"), "acc"),
    "arc_easy": (("acc", "acc_norm"), "acc"),
    "arc_challenge": (("acc", "acc_norm"), "acc_norm"),
    "lambada_openai": (("acc", "perplexity"), "acc"),
    "winogrande": (("acc",), "acc"),
    "boolq": (("acc",), "acc"),
    "hellaswag": (("acc", "acc_norm"), "acc_norm"),
}
DEFAULT_TASKS = "piqa+arc_easy+lambada_openai+winogrande"
SOURCES = ("auto", "local", "hub")


def _check_tasks(value: str) -> str | None:
    names = value.split("+")
    if not all(names):
        return "task names are joined by '+', e.g. piqa+arc_easy"
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        return f"unknown task {unknown[0]!r}; available tasks: {', '.join(TASKS)}"
    if len(set(names)) != len(names):
        return "a task is named twice"
    return None


def local_config(task: str, resolve_functions: bool = True) -> dict:
    """The task definition qbench ships for ``task`` (lm-eval's YAML loader: ``!function`` entries
    resolve to ``qbench/tasks/utils.py``), with ``data_files`` still relative to ``<data dir>/tasks``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_tasks_dir() / f"{task}.yaml", resolve_func=resolve_functions)


def local_files(task: str) -> dict[str, str]:
    """split -> file relative to ``<data dir>/tasks`` (read from the YAML without importing lm-eval)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(_tasks_dir() / f"{task}.yaml", encoding="utf-8") as f:
        return dict(yaml.load(f, Loader=_Loader)["dataset_kwargs"]["data_files"])  # noqa: S506 (SafeLoader)


def find_local(task: str, data_dir: str | None) -> tuple[dict[str, Path] | None, list[str]]:
    """(split -> path of the task's files in the first data dir that has them all, or None; the
    paths looked at)."""
    from qbench.data import data_dirs

    looked = []
    for d in data_dirs(data_dir):
        paths = {split: d / "tasks" / rel for split, rel in local_files(task).items()}
        looked.extend(str(p) for p in paths.values())
        if all(p.is_file() for p in paths.values()):
            return paths, looked
    return None, looked


def resolve_source(task: str, source: str, data_dir: str | None) -> tuple[str, dict[str, Path] | None]:
    """("local", files) or ("hub", None) for ``task``, or QBenchError saying what was looked for and where."""
    files, looked = find_local(task, data_dir) if source in ("auto", "local") else (None, [])
    if files is not None:
        return "local", files
    if source == "hub" and offline():
        raise QBenchError(f"accuracy:source=hub: task {task} needs the hub, which is offline (HF_HUB_OFFLINE/"
                          f"HF_DATASETS_OFFLINE); use source=auto or local with the task files in <data dir>/tasks")
    where = ", ".join(looked) if looked else "no data dir set (--data-dir or QBENCH_DATA_DIR)"
    if source == "local":
        raise QBenchError(f"accuracy task {task}: local file not found (looked for {where}); pass --data-dir DIR "
                          f"or set QBENCH_DATA_DIR to a folder with tasks/ laid out like shared/data")
    if offline():
        missing = "its data is not in shared/data; " if task == "hellaswag" else ""
        raise QBenchError(f"accuracy task {task}: {missing}no local file (looked for {where}) and the hub is "
                          f"offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); pass --data-dir DIR or set "
                          f"QBENCH_DATA_DIR to a folder with tasks/ laid out like shared/data, or go online")
    return "hub", None


def build_tasks(names: list[str], source: str = "auto", data_dir: str | None = None) -> tuple[list, dict]:
    """lm-eval Task objects for ``names`` and a description of each (source, files + sha256 or
    hub dataset, task version) for the record."""
    from lm_eval.api.task import ConfigurableTask

    tasks, described = [], {}
    hub_manager = None
    for name in names:
        kind, files = resolve_source(name, source, data_dir)
        if kind == "local":
            config = local_config(name)
            config["dataset_kwargs"] = {"data_files": {split: str(path) for split, path in files.items()}}
            config.setdefault("metadata", {})["config_source"] = f"qbench/tasks/{name}.yaml"
            task = ConfigurableTask(config=config)
            info = {"source": "local", "definition": f"qbench/tasks/{name}.yaml",
                    "files": {split: {"path": str(path), "sha256": file_sha256(path)} for split, path in files.items()}}
        else:
            from lm_eval.tasks import TaskManager

            hub_manager = hub_manager or TaskManager()
            try:
                task = hub_manager.load([name])["tasks"][name]
            except Exception as exc:
                raise QBenchError(f"accuracy task {name}: lm-eval could not load it from the hub: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            info = {"source": "hub", "definition": f"lm-eval built-in {name}",
                    "dataset": {"path": task.config.dataset_path, "name": task.config.dataset_name}}
        info["version"] = (task.config.metadata or {}).get("version")
        tasks.append(task)
        described[name] = info
    return tasks, described


def wrap_model(model, tokenizer, device, batch_size: int):
    """lm-eval's HFLM around the in-memory model (nothing is saved or reloaded)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))


def evaluate(lm, tasks: list, limit: int | None, num_fewshot: int = 0, bootstrap_iters: int = 100000) -> dict:
    """``lm_eval.simple_evaluate`` with the settings this suite records (seeds are lm-eval's defaults)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   bootstrap_iters=bootstrap_iters, log_samples=True,
                                   task_manager=TaskManager(include_defaults=False))


def item_key(task: str, info: dict, num_fewshot: int) -> str:
    """What a task's per-item ids index: the task, its version, the shot count and the data it read
    (file hashes, or the hub dataset), so items of another file or prompt never pair."""
    if info.get("source") == "local":
        data = "files:" + ",".join(f["sha256"][:12] for _, f in sorted(info["files"].items()))
    else:
        dataset = info.get("dataset") or {}
        data = f"hub:{dataset.get('path')}/{dataset.get('name')}"
    return f"lm-eval {task} v{info.get('version')} {num_fewshot}-shot {data}"


def item_samples(results: dict, names: list[str], described: dict, num_fewshot: int) -> dict[str, dict]:
    """task -> the per-item sample set of its 0/1 metrics (lm-eval's logged samples, by doc_id), and
    ``tasks``: every task's main metric per item (ids ``task/doc_id``) with the task's index, from
    which the mean over tasks is recomputed (a stratified mean) when every task has its items."""
    out = {}
    for name in names:
        logged = sorted((results.get("samples") or {}).get(name) or [], key=lambda item: item["doc_id"])
        columns = [m for m in TASKS[name][0] if m != "perplexity" and all(m in item for item in logged)]
        if not logged or not columns:
            continue
        values = {m: [float(item[m]) for item in logged] for m in columns}
        if "perplexity" in TASKS[name][0] and all("perplexity" in item for item in logged):
            # lm-eval's per-item "perplexity" is the target's loglikelihood; the task's is exp(−mean)
            values["nll"] = [-float(item["perplexity"]) for item in logged]
            values["count"] = [1.0] * len(logged)
        out[name] = sample_set_json(item_key(name, described[name], num_fewshot),
                                    [int(item["doc_id"]) for item in logged], values)
    if all(name in out and TASKS[name][1] in out[name]["values"] for name in names):
        ids, main, task = [], [], []
        for index, name in enumerate(names):
            ids += [f"{name}/{i}" for i in out[name]["ids"]]
            main += out[name]["values"][TASKS[name][1]]
            task += [index] * len(out[name]["ids"])
        out["tasks"] = sample_set_json(" | ".join(out[name]["key"] for name in names), ids,
                                       {"main": main, "task": task})
    return out


def _unit(metric: str) -> str:
    return "" if metric == "perplexity" else "fraction"


def metrics_from_results(results: dict, names: list[str]) -> dict[str, Metric]:
    """qbench metrics from lm-eval's results: ``task.metric`` with its stderr, ``task.items``, and
    ``mean_acc`` (mean of the tasks' main metrics; stderr of a mean of independent values)."""
    out: dict[str, Metric] = {}
    mains, errors = [], []
    for name in names:
        row = results["results"][name]
        reported, main = TASKS[name]
        for metric in reported:
            value = row.get(f"{metric},none")
            if value is None:
                continue
            stderr = row.get(f"{metric}_stderr,none")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            out[f"{name}.{metric}"] = Metric(float(value), _unit(metric), stderr=stderr)
        out[f"{name}.items"] = Metric(int(results["n-samples"][name]["effective"]), "items")
        main_metric = out.get(f"{name}.{main}")
        if main_metric is not None:
            mains.append(main_metric.value)
            errors.append(main_metric.stderr)
    if mains:
        stderr = (math.sqrt(sum(e * e for e in errors)) / len(errors)) if all(e is not None for e in errors) else None
        out["mean_acc"] = Metric(sum(mains) / len(mains), "fraction", stderr=stderr)
    return out


def _metric_specs() -> dict[str, MetricSpec]:
    specs = {}
    for name, (_, main) in TASKS.items():
        specs[f"{name}.{main}"] = MetricSpec(f"{name} {main} (%)", higher_is_better=True, display_unit="%",
                                             vs_baseline="percent", baseline_title=f"{name} recovery %",
                                             samples=name, statistic=("mean", main))
        if name == "lambada_openai":
            specs["lambada_openai.perplexity"] = MetricSpec("lambada_openai ppl", higher_is_better=False,
                                                            samples=name, statistic=("exp_ratio", "nll", "count"))
    specs["mean_acc"] = MetricSpec("mean acc (%)", higher_is_better=True, display_unit="%", aggregate="mean",
                                   vs_baseline="percent", baseline_title="mean recovery %",
                                   samples="tasks", statistic=("stratified_mean", "main", "task"))
    # The other metric of tasks that report two (acc beside acc_norm...): with --columns all.
    specs["*.acc"] = MetricSpec("{0} acc (%)", higher_is_better=True, headline=False, display_unit="%",
                                vs_baseline="percent", baseline_title="{0} acc recovery %",
                                samples="{0}", statistic=("mean", "acc"))
    specs["*.acc_norm"] = MetricSpec("{0} acc_norm (%)", higher_is_better=True, headline=False, display_unit="%",
                                     vs_baseline="percent", baseline_title="{0} acc_norm recovery %",
                                     samples="{0}", statistic=("mean", "acc_norm"))
    specs["*.items"] = MetricSpec("{0} items", headline=False)
    return specs


class AccuracySuite(Suite):
    name = "accuracy"
    fp32_arithmetic = True  # compared with the baseline: no bf16 kernels on a CPU
    description = ("Zero-shot task accuracy through lm-evaluation-harness on the in-memory model "
                   "(local task files, else the hub), with recovery % against the baseline")
    reads_limit = True
    params = {
        "tasks": Param(str, DEFAULT_TASKS, f"tasks joined by '+' (available: {', '.join(TASKS)})", check=_check_tasks),
        "limit": Param(int, None, "items per task (default: the run's --limit, else all)",
                       check=lambda v: None if v > 0 else "must be positive"),
        "num_fewshot": Param(int, 0, "few-shot examples (from the train split: hub tasks only)",
                             check=lambda v: None if v >= 0 else "must be >= 0"),
        "batch_size": Param(int, 16, "requests per forward pass",
                            check=lambda v: None if v > 0 else "must be positive"),
        "source": Param(str, "auto", "auto: the local task file where found, else the hub; local; hub",
                        choices=SOURCES),
        "bootstrap_iters": Param(int, 100000, "bootstrap draws for stderrs without a closed form (lambada ppl; "
                                 "lm-eval's default)", check=lambda v: None if v >= 0 else "must be >= 0"),
    }
    metrics = _metric_specs()

    @property
    def task_names(self) -> list[str]:
        return self.values["tasks"].split("+")

    def check_run(self, models: list[str], data_dir: str | None) -> str | None:
        """Before any cell starts: every task's data can be had; the models have a real tokenizer."""
        from qbench.models import resolve_model

        for model in models:
            if resolve_model(model)["kind"] in ("tiny", "random"):
                return (f"the accuracy suite needs a model with a Hugging Face tokenizer and real weights; "
                        f"{model} is a random model driven by a byte tokenizer")
        for name in self.task_names:
            try:
                kind, _ = resolve_source(name, self.values["source"], data_dir)
            except QBenchError as exc:
                return str(exc)
            if kind == "local" and self.values["num_fewshot"] > 0:
                return (f"accuracy:num_fewshot={self.values['num_fewshot']}: the local task files hold only the "
                        f"evaluated split and few-shot examples come from the train split; use source=hub (online)")
        return None

    def measure(self, ctx: CellContext) -> dict[str, Metric]:
        import lm_eval
        from transformers import PreTrainedTokenizerBase

        if not isinstance(ctx.tokenizer, PreTrainedTokenizerBase):
            raise QBenchError("the accuracy suite needs a model with a Hugging Face tokenizer "
                              f"(this one has {type(ctx.tokenizer).__name__})")
        limit = self.values["limit"] if self.values["limit"] is not None else ctx.limit
        names = self.task_names
        tasks, described = build_tasks(names, self.values["source"], getattr(ctx, "data_dir", None))
        lm = wrap_model(ctx.model, ctx.tokenizer, ctx.device, self.values["batch_size"])
        results = evaluate(lm, tasks, limit, self.values["num_fewshot"], self.values["bootstrap_iters"])
        metrics = metrics_from_results(results, names)
        shortened = []
        for name in names:
            counts = results["n-samples"][name]
            described[name].update(items=int(counts["original"]), evaluated=int(counts["effective"]),
                                   version=results["versions"].get(name, described[name]["version"]),
                                   main_metric=TASKS[name][1])
            if counts["effective"] < counts["original"]:
                shortened.append(f"{name} {counts['effective']}/{counts['original']}")
        ctx.extra["lm_eval"] = {"version": lm_eval.__version__, "num_fewshot": self.values["num_fewshot"],
                                "batch_size": self.values["batch_size"], "limit": limit,
                                "bootstrap_iters": self.values["bootstrap_iters"]}
        ctx.extra["tasks"] = described
        ctx.extra["samples"] = item_samples(results, names, described, self.values["num_fewshot"])
        sources = sorted({d["source"] for d in described.values()})
        ctx.protocol = (f"lm-eval-{lm_eval.__version__}/{self.values['num_fewshot']}-shot/"
                        f"{'+'.join(sources)}" + (f"/first-{limit}" if shortened else ""))
        if shortened:
            ctx.notes.append(f"accuracy over the first {limit} items per task ({', '.join(shortened)}); "
                             f"pass --limit all for the full sets")
        return metrics


@hookimpl
def register_suites(register):
    register(AccuracySuite)
