"""Interleaved CPU micro-benchmark: each method's quantized layer, as the model runs it, against the
fp16 and fp32 baselines, on the demo model's layer shapes.

    python scripts/bench_cpu_kernels.py [--rows 1,128] [--passes 15] [--threads 2] [--working-set-mb 128]
                                        [--clock wall|cpu] [--reference] [--markdown FILE]

Every case is a real module (``FloatLinear`` fp16/fp32, ``Int8AbsmaxLinear``, ``AffineLinear``,
``GPTQLinear``, ``NF4Linear``) built from the same random ``nn.Linear`` and called as the model calls
it, so what is timed includes the module's own overhead (input casts, permutation, padding). Each case
holds as many copies of its layer as make ``--working-set-mb`` of fp16 weights (the demo model's decoder
linears hold 202 MiB in fp16), and one timed pass calls every copy once: weights come from memory, as in
a forward pass, not from a warm cache. Passes alternate case by case (A B C ... A B C ...), so load from
other processes falls on every case alike; a case's time per call is the median over passes, and its
speed-up the median over passes of (baseline time / its time) within the same round.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared with
other busy processes it counts only this process's work (use it with ``--threads 1``: with more
threads, idle threads spinning between parallel regions count too).

``--reference`` adds each method's torch reference path (``QBENCH_CPU_KERNEL=reference``; slow).
The last table weighs the shapes as one decoder layer of the demo model has them (q, o: 576x576;
k, v: 192x576; gate, up: 1536x576; down: 576x1536): the decoder linears' share of a decode step.
``--model smollm2-135m`` times whole models instead, the same way (the latency suite's
``time_generation`` for a ``--prompt-len`` prefill and ``--new-tokens`` greedy decode steps at batch 1,
each method's model in turn, round after round), plus with ``--ppl-window N`` one perplexity window of
N tokens of WikiText-2 per method, on the CPU kernels and on the reference path. ``gptq`` (in both
modes) is the GPTQ layout (4 bits, groups of 128; act-order ``g_idx`` where named) filled with
round-to-nearest codes (``GPTQLinear.from_rtn``): the same layout and kernels, without the minutes
GPTQ's own algorithm takes on a CPU.
Prints Markdown (and writes it to ``--markdown``); says which machine, threads and versions produced it.
Speed depends on what else runs on the machine: compare ratios, not times, across machines.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

# out_features x in_features, and how many of each one decoder layer of the demo model has
SHAPES = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def build_cases(linear: nn.Linear, reference: bool) -> dict:
    """name -> (factory of one module, kernel mode)."""
    from qbench.plugins.baseline import FloatLinear
    from qbench.plugins.gptq import GPTQLinear
    from qbench.quant.affine import AffineLinear
    from qbench.quant.int8 import Int8AbsmaxLinear
    from qbench.quant.nf4 import NF4Linear

    w = linear.weight.detach()
    cases = {
        "fp16": (lambda: FloatLinear(w.half(), None), "auto"),
        "fp32": (lambda: FloatLinear(w.float().clone(), None), "auto"),
        "int8-absmax": (lambda: Int8AbsmaxLinear.from_linear(linear, "channel", 64, "none"), "auto"),
        "int8-absmax:activations=dynamic": (lambda: Int8AbsmaxLinear.from_linear(linear, "channel", 64, "dynamic"),
                                            "auto"),
        "affine (4-bit, g128)": (lambda: AffineLinear.from_linear(linear, 4, 128, False), "auto"),
        "gptq (4-bit, g128)": (lambda: GPTQLinear.from_rtn(linear), "auto"),
        "gptq (4-bit, g128, act_order)": (lambda: GPTQLinear.from_rtn(linear, act_order=True), "auto"),
        "nf4": (lambda: NF4Linear.from_linear(linear), "auto"),
    }
    if reference:
        for name in [n for n in cases if not n.startswith("fp")]:
            cases[f"{name} [reference]"] = (cases[name][0], "reference")
    return cases


def _copies(factory, mode: str, count: int) -> list[nn.Module]:
    os.environ["QBENCH_CPU_KERNEL"] = mode
    first = factory()
    modules = [first]
    for _ in range(count - 1):  # rebuilt from the stored tensors, as the cache loads a layer
        stored = {k: v.clone() for k, v in first.stored_tensors().items()}
        modules.append(type(first).from_stored(stored, first.config()))
    return modules


def measure(shape: tuple[int, int], rows: int, passes: int, working_set_mb: float, reference: bool,
            clock=time.perf_counter) -> list[dict]:
    out_features, in_features = shape
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    count = max(1, int(working_set_mb * 2**20 // (out_features * in_features * 2)))
    cases = build_cases(linear, reference)
    built = {name: (_copies(factory, mode, count), mode) for name, (factory, mode) in cases.items()}
    x = torch.randn(rows, in_features)
    times: dict[str, list[float]] = {name: [] for name in built}
    paths: dict[str, str] = {}
    with torch.inference_mode():
        for round_ in range(passes + 1):  # the first round warms up and is not kept
            for name, (modules, mode) in built.items():
                os.environ["QBENCH_CPU_KERNEL"] = mode
                start = clock()
                for module in modules:
                    module(x)
                elapsed = (clock() - start) / len(modules)
                if round_:
                    times[name].append(elapsed)
                paths[name] = getattr(modules[0], "kernel_path", "?")
    os.environ.pop("QBENCH_CPU_KERNEL", None)
    results = []
    for name, series in times.items():
        results.append({
            "shape": f"{out_features}x{in_features}", "rows": rows, "case": name, "path": paths[name],
            "us": 1e6 * statistics.median(series),
            "vs_fp16": statistics.median(a / b for a, b in zip(times["fp16"], series)),
            "vs_fp32": statistics.median(a / b for a, b in zip(times["fp32"], series)),
            "copies": count, "series": series,
        })
    return results


MODEL_METHODS = [("fp16", {}), ("fp32", {}), ("int8-absmax", {}), ("int8-absmax", {"activations": "dynamic"}),
                 ("affine", {"bits": 4, "group_size": 128}), ("gptq", {}), ("nf4", {})]


def _build_models(spec: str) -> tuple[dict[str, nn.Module], object]:
    import copy

    from qbench import host
    from qbench.method import replace_linears
    from qbench.models import load_model
    from qbench.plugins.gptq import GPTQLinear

    loaded = load_model(spec)
    models = {}
    for name, params in MODEL_METHODS:
        label = name + "".join(f":{k}={v}" for k, v in params.items() if k != "bits")
        model = copy.deepcopy(loaded.model)
        if name == "gptq":  # the layout, with RTN codes (see the module docstring)
            model = replace_linears(model, lambda _, linear: GPTQLinear.from_rtn(linear, act_order=True))
            label = "gptq (layout, act_order)"
        else:
            model = host.make_method(name, params).quantize(model)
        models[label] = model.eval()
    return models, loaded


def measure_models(args) -> list[str]:
    from qbench.suites.latency import time_generation

    models, loaded = _build_models(args.model)
    vocab = int(loaded.model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, model in models.items():
            p, d = time_generation(model, ids, args.new_tokens, torch.device("cpu"), clock)
            if round_:
                prefill[name].append(p)
                decode[name].append(args.new_tokens / d)
            print(f"round {round_} {name}: prefill {1000 * p:.0f} ms, decode {args.new_tokens / d:.2f} tok/s",
                  file=sys.stderr, flush=True)
    paths = {name: ",".join(sorted({m.kernel_path for m in model.modules() if hasattr(m, "kernel_path")}))
             for name, model in models.items()}
    lines = ["", f"### {args.model}: batch 1, {args.prompt_len}-token prefill, {args.new_tokens} decode steps, "
             f"{args.rounds} interleaved rounds", "",
             "| method | kernels | prefill ms | prefill vs fp16 | vs fp32 | decode tok/s | decode vs fp16 | vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        ratio = {base: (statistics.median(b / a for a, b in zip(prefill[name], prefill[base])),
                        statistics.median(a / b for a, b in zip(decode[name], decode[base])))
                 for base in ("fp16", "fp32")}
        lines.append(f"| {name} | {paths[name]} | {1000 * statistics.median(prefill[name]):.0f} | "
                     f"{ratio['fp16'][0]:.2f} | {ratio['fp32'][0]:.2f} | {statistics.median(decode[name]):.2f} | "
                     f"{ratio['fp16'][1]:.2f} | {ratio['fp32'][1]:.2f} |")
    if args.ppl_window:
        lines += _measure_ppl_window(args, models, loaded)
    return lines


def _measure_ppl_window(args, models, loaded) -> list[str]:
    from qbench.data import encode, load_text
    from qbench.suites.perplexity import window_nlls, windows

    batch = windows(encode(loaded.tokenizer, load_text("wikitext2").text()), args.ppl_window, 1)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[tuple[str, str], list[float]] = {}
    nll: dict[tuple[str, str], float] = {}
    for round_ in range(args.ppl_rounds):
        for name, model in models.items():
            for mode in (("auto",) if name.startswith("fp") else ("auto", "reference")):
                os.environ["QBENCH_CPU_KERNEL"] = mode
                start = clock()
                nll[name, mode] = window_nlls(model, batch, "cpu")[0]
                times.setdefault((name, mode), []).append(clock() - start)
                print(f"ppl round {round_} {name} {mode}: {times[name, mode][-1]:.1f} s", file=sys.stderr, flush=True)
    os.environ.pop("QBENCH_CPU_KERNEL", None)
    lines = ["", f"### One perplexity window of {args.ppl_window} tokens (WikiText-2 test), {args.ppl_rounds} "
             "interleaved rounds", "",
             "| method | s (CPU kernels) | s (reference) | reference / kernels | ppl (kernels) | ppl (reference) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in models:
        fast = statistics.median(times[name, "auto"])
        if (name, "reference") in times:
            ref = statistics.median(times[name, "reference"])
            speedup = statistics.median(b / a for a, b in zip(times[name, "auto"], times[name, "reference"]))
            lines.append(f"| {name} | {fast:.1f} | {ref:.1f} | {speedup:.2f} | {math.exp(nll[name, 'auto']):.4f} | "
                         f"{math.exp(nll[name, 'reference']):.4f} |")
        else:
            lines.append(f"| {name} | {fast:.1f} | | | {math.exp(nll[name, 'auto']):.4f} | |")
    return lines


def _header(args) -> list[str]:
    from qbench.kernels import cpu_nf4
    from qbench.records import _cpu_name, git_commit

    git = git_commit()
    lines = [f"- command: `python scripts/bench_cpu_kernels.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- machine: {_cpu_name()}, {os.cpu_count()} CPUs, torch threads "
             f"{torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, load average "
             f"{os.getloadavg()[0]:.1f} at the start",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}; qbench commit "
             f"{str(git.get('commit', '?'))[:10]}{' (dirty)' if git.get('dirty') else ''}",
             f"- NF4 kernel: {cpu_nf4.kernel_path() if cpu_nf4.library() is not None else cpu_nf4.build_error()}",
             ]
    if not args.model:
        lines.append(f"- {args.passes} interleaved passes per shape; each pass calls every copy once "
                     f"({args.working_set_mb:g} MiB of fp16 weights per case)")
    lines.append("- clock: " + ("wall (perf_counter)" if args.clock == "wall" else "process CPU time (process_time)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,128", help="input rows per call (1 = decode; 128 = a 128-token prefill)")
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--working-set-mb", type=float, default=128.0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this process's CPU time (robust to other load; use --threads 1)")
    parser.add_argument("--shapes", default=None, help="e.g. 576x576,1536x576 (default: the demo model's four)")
    parser.add_argument("--reference", action="store_true", help="also time each method's torch reference path")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--model", default=None, help="time whole models instead (e.g. smollm2-135m)")
    parser.add_argument("--rounds", type=int, default=5, help="--model: interleaved rounds")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ppl-window", type=int, default=0, help="--model: also time one perplexity window")
    parser.add_argument("--ppl-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        text = "\n".join(_header(args) + measure_models(args)) + "\n"
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return 0
    shapes = SHAPES if not args.shapes else {tuple(int(v) for v in s.split("x")): 1 for s in args.shapes.split(",")}
    lines = _header(args)
    summary: dict[tuple[int, str], dict[str, float]] = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        lines += ["", f"### {rows} input row{'s' if rows > 1 else ''}", "",
                  "| shape (out x in) | case | kernel path | µs per call | vs fp16 | vs fp32 |",
                  "|---|---|---|---:|---:|---:|"]
        for shape, per_layer in shapes.items():
            clock = time.perf_counter if args.clock == "wall" else time.process_time
            for r in measure(shape, rows, args.passes, args.working_set_mb, args.reference, clock):
                lines.append(f"| {r['shape']} | {r['case']} | {r['path']} | {r['us']:.1f} | {r['vs_fp16']:.2f} | "
                             f"{r['vs_fp32']:.2f} |")
                print(lines[-1], file=sys.stderr, flush=True)  # progress
                acc = summary.setdefault((rows, r["case"]), {"us": 0.0, "fp16": 0.0, "fp32": 0.0})
                acc["us"] += per_layer * r["us"]
                acc["fp16"] += per_layer * r["us"] * r["vs_fp16"]  # the fp16 time of the same rounds
                acc["fp32"] += per_layer * r["us"] * r["vs_fp32"]
    if not args.shapes:
        lines += ["", "### One decoder layer of the demo model (its 7 linears, weighted by the table above)", "",
                  "| input rows | case | µs per layer | vs fp16 | vs fp32 |", "|---:|---|---:|---:|---:|"]
        for (rows, case), acc in summary.items():
            lines.append(f"| {rows} | {case} | {acc['us']:.0f} | {acc['fp16'] / acc['us']:.2f} | "
                         f"{acc['fp32'] / acc['us']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
