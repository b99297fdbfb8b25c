"""The ``qbench`` command line. User errors print one line and exit 2; failed cells exit 1."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import click

from qbench.paired import RESAMPLES as RESAMPLES_DEFAULT
from qbench.params import QBenchError, parse_specs


def user_errors(fn):
    """Turn QBenchError (and unexpected errors) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QBenchError as exc:
            click.echo(f"qbench: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("qbench: interrupted; rerun the same command to finish the remaining cells", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("QBENCH_DEBUG"):
                raise
            click.echo(f"qbench: internal error: {describe_internal_error(exc)} (set QBENCH_DEBUG=1 for the traceback)",
                       err=True)
            sys.exit(3)

    return wrapper


def describe_internal_error(exc: BaseException) -> str:
    """One line: the error, the file it concerns (OSError), and the operation that failed (the
    innermost function of the traceback, with its source file and line)."""
    import traceback

    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f" (file {exc.filename})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        at = lambda f: f"{f.name}() at {Path(f.filename).name}:{f.lineno}"  # noqa: E731
        where = f" in {at(frames[-1])}"
        roots = _source_roots()
        ours = [f for f in frames if any(Path(f.filename).resolve().is_relative_to(r) for r in roots)]
        if ours and ours[-1] is not frames[-1]:  # it happened in a library: say which step of ours called it
            where += f", called from {at(ours[-1])}"
    return f"{type(exc).__name__}: {text}{where}"


def _source_roots() -> list[Path]:
    """Where qbench's own code lives (plugins, suites and kernels sit beside qbench/ in a checkout)."""
    import importlib.util

    roots = []
    for package in ("qbench", "qbench.plugins", "qbench.suites", "qbench.kernels"):
        spec = importlib.util.find_spec(package)
        roots += [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


@click.group()
@click.version_option(package_name="qbench-quant")
def main():
    """qbench: compare LLM quantization methods on equal terms."""
    from qbench import quiet

    quiet.install()  # known-harmless third-party warnings stay off the terminal (QBENCH_VERBOSE=1 shows them)


def _params_table(cls) -> str:
    return ", ".join(f"{k}={v.default}" for k, v in cls.params.items())


@main.command()
@user_errors
def methods():
    """List the quantization methods and their parameters (defaults shown)."""
    from qbench import host

    owners = host.provided_by("methods")
    for name, cls in sorted(host.methods().items()):
        click.echo(f"{name:<16} {cls.description}  [{owners.get(name)}]")
        if cls.params:
            click.echo(f"{'':<16} params: {_params_table(cls)}")


@main.command()
@user_errors
def suites():
    """List the measurement suites and their parameters (defaults shown)."""
    from qbench import host

    owners = host.provided_by("suites")
    for name, cls in sorted(host.suites().items()):
        click.echo(f"{name:<16} {cls.description}  [{owners.get(name)}]")
        if cls.params:
            click.echo(f"{'':<16} params: {_params_table(cls)}")


@main.command("plugins")
@user_errors
def plugins_cmd():
    """List loaded plugins, and the ones that failed to load with their error."""
    from qbench import host

    for row in host.plugin_status():
        line = f"{row['status']:<7} {row['name']:<32} {row['source']}"
        if row["error"]:
            line += f"  error: {row['error']}"
        click.echo(line)


@main.command()
@click.option("--device", default="cpu", show_default=True)
@user_errors
def env(device):
    """Print the environment a record would carry (versions, git commit, device)."""
    from qbench.records import environment

    click.echo(json.dumps(environment(device), indent=1))


def _split(values) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _limit(value: str | None, device: str) -> tuple[int | None, bool]:
    """(windows or None for all, whether that is the CPU default rather than the user's choice)."""
    from qbench.runner import DEFAULT_CPU_LIMIT

    if value is None:
        if device == "cpu":
            return DEFAULT_CPU_LIMIT, True
        return None, False
    if value.lower() in ("all", "none", "0"):
        return None, False
    try:
        n = int(value)
    except ValueError:
        raise QBenchError(f"--limit {value!r} must be a number of windows or 'all'") from None
    if n < 0:
        raise QBenchError(f"--limit {value!r} must be positive (or 'all')")
    return n, False


@main.command()
@click.option("--methods", "methods_", multiple=True, help="e.g. fp16,nf4:blocksize=128,double_quant=false,gptq:bits=3")
@click.option("--models", multiple=True,
              help="smollm2-135m (default), tiny-llama, random:DIR (random weights in DIR/config.json's "
                   "architecture: speed and memory only), a model directory or hub id")
@click.option("--suites", "suites_", multiple=True, help="e.g. memory,latency,perplexity:seqlen=512")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2 (test split), wikitext2:validation, c4, or a .txt/.jsonl file")
@click.option("--data-dir", default=None, help="folder laid out like shared/data (else $QBENCH_DATA_DIR, else the hub)")
@click.option("--calibration", default="c4", show_default=True,
              help="dataset for calibrating methods (GPTQ, static INT8)")
@click.option("--out", default=None, help="run directory (default: results/runs/run-<hash of the options>)")
@click.option("--limit", default=None, help="perplexity/fidelity windows, accuracy items per task "
              "(default on CPU: 4; 'all' for the full split)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="compute dtype: auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--executor", default="local", show_default=True)
@click.option("--threads", default=None, type=int, help="torch threads per cell")
@click.option("--trust-remote-code", is_flag=True, help="allow a hub model's own code to run")
@click.option("--no-cache", is_flag=True, help="quantize again instead of using the quantized-model cache")
@click.option("--wait", is_flag=True, help="if another run holds OUT, wait for it to finish instead of stopping")
@user_errors
def run(methods_, models, suites_, dataset, data_dir, calibration, out, limit, device, dtype, seed, executor,
        threads, trust_remote_code, no_cache, wait):
    """Run the comparison matrix (methods × models × suites) and append records to OUT/records.jsonl."""
    from qbench.models import DEMO_MODEL
    from qbench.runner import DEFAULT_METHODS, DEFAULT_SUITES, RunConfig, execute

    method_specs = parse_specs(list(methods_) or [DEFAULT_METHODS])
    suite_specs = parse_specs(list(suites_) or [DEFAULT_SUITES])
    model_names = _split(models) or [DEMO_MODEL]
    n_limit, limit_is_default = _limit(limit, device)
    if out is None:
        key = json.dumps([sorted(map(str, method_specs)), model_names, sorted(map(str, suite_specs)), dataset,
                          n_limit, device, dtype, seed, calibration])
        out = f"results/runs/run-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    config = RunConfig(methods=method_specs, models=model_names, suites=suite_specs, dataset=dataset,
                       data_dir=data_dir, out=Path(out), limit=n_limit, device=device, dtype=dtype, seed=seed,
                       calibration=calibration, executor=executor, trust_remote_code=trust_remote_code,
                       use_cache=not no_cache, threads=threads, limit_is_default=limit_is_default, wait=wait)
    summary = execute(config, argv=["qbench", "run", *sys.argv[2:]], say=lambda line: click.echo(f"qbench: {line}"))
    click.echo(f"qbench: {summary['ran']} cells run, {summary['already_done']} already recorded; "
               f"records in {summary['records']}; leaderboard: qbench report {out}")
    if summary["failed"]:
        click.echo(f"qbench: {len(summary['failed'])} cell(s) failed:", err=True)
        for label in summary["failed"]:
            click.echo(f"  {label}", err=True)
        sys.exit(1)


@main.command()
@click.argument("run_dir")
@click.option("--format", "fmt", default="md", show_default=True, type=click.Choice(["md", "csv", "json", "html"]))
@click.option("--columns", default="headline", show_default=True, type=click.Choice(["headline", "all"]),
              help="headline columns, or every metric the suites describe (all batch sizes, configurations...)")
@click.option("--resamples", default=RESAMPLES_DEFAULT, show_default=True, type=click.IntRange(min=1),
              help="bootstrap resamples for the intervals of the differences against the baseline")
@click.option("--bootstrap-seed", default=0, show_default=True, type=int, help="seed of the bootstrap")
@click.option("--baseline", default=None,
              help="the method (its label as the leaderboard shows it) the differences are against, e.g. "
                   "affine:sym=true for GPTQ vs round-to-nearest  [default: the run's fp16/bf16/fp32 row]")
@click.option("--seed-spread", is_flag=True,
              help="instead of the leaderboard: a metric's value per seed, mean, sd and range, for methods run "
                   "with several seeds (markdown)")
@click.option("--metric", default="ppl", show_default=True, help="the metric of --seed-spread")
@click.option("-o", "--output", default=None, help="write to this file instead of stdout")
@user_errors
def report(run_dir, fmt, columns, resamples, bootstrap_seed, baseline, seed_spread, metric, output):
    """Render the leaderboard of RUN_DIR as markdown, csv, json or html."""
    from qbench.durable import write_atomic
    from qbench.report import render

    _check_run_dir(run_dir)
    if seed_spread:
        from qbench.seeds import seed_spread_markdown

        if fmt != "md":
            raise QBenchError("--seed-spread writes markdown; drop --format")
        text = seed_spread_markdown(Path(run_dir), metric, command="qbench report " + " ".join(sys.argv[2:]))
    else:
        text = render(Path(run_dir), fmt, columns, resamples=resamples, seed=bootstrap_seed, baseline=baseline)
    if output:
        write_atomic(Path(output), text, then="")
    else:
        click.echo(text, nl=False)


def _check_run_dir(run_dir: str) -> None:
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise QBenchError(f"{run_dir} is a file, not a run directory; pass the --out directory of a qbench run")
    if not path.exists():
        raise QBenchError(f"run directory {run_dir} does not exist; pass the --out directory of a qbench run")


@main.command()
@click.argument("run_a")
@click.argument("run_b", required=False)
@click.option("--methods", "methods_", default=None,
              help="compare two methods of RUN_A instead of two runs: A,B (e.g. affine:bits=4,group_size=128,gptq)")
@click.option("--format", "fmt", default="md", show_default=True, type=click.Choice(["md", "json"]))
@click.option("--changed-only", is_flag=True, help="list only metrics whose value changed")
@click.option("--resamples", default=RESAMPLES_DEFAULT, show_default=True, type=click.IntRange(min=1),
              help="bootstrap resamples for the paired intervals")
@click.option("--bootstrap-seed", default=0, show_default=True, type=int, help="seed of the bootstrap")
@click.option("-o", "--output", default=None, help="write to this file instead of stdout")
@user_errors
def compare(run_a, run_b, methods_, fmt, changed_only, resamples, bootstrap_seed, output):
    """What changed from RUN_A to RUN_B (or from method A to method B in RUN_A, with --methods A,B):
    same cells, metric deltas with a 95% interval and a verdict (better / worse / indistinguishable),
    cells in one run only."""
    from qbench.compare import method_labels, render_comparison
    from qbench.durable import write_atomic

    for run in (run_a, run_b):
        if run is not None:
            _check_run_dir(run)
    methods = method_labels(methods_) if methods_ else None
    text = render_comparison(Path(run_a), Path(run_b) if run_b else None, fmt, changed_only=changed_only,
                             methods=methods, resamples=resamples, seed=bootstrap_seed)
    if output:
        write_atomic(Path(output), text, then="")
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
