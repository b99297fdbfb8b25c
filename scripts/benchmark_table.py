"""Markdown tables from a pytest-benchmark JSON file (``pytest ... --benchmark-json FILE``).

One table per benchmark module and test function: a row per parametrized case with its
parameters, the median time pytest-benchmark measured and every number the case put in
``extra_info`` (our modules store the FP16 time measured in the same run, ``speedup_vs_fp16`` and
effective GB/s there). The header says which machine and versions produced the file.

    python scripts/benchmark_table.py benchmarks.json > benchmarks.md

A ``.jsonl`` file (one case per line, as tests/benchmarks/conftest.py streams them to
``$QBENCH_BENCH_JSONL``) gives the same tables without pytest-benchmark's median column: what a
module stopped by a time limit left.
"""
from __future__ import annotations

import json
import sys


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def tables(data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [f"pytest-benchmark {data.get('version', '?')}, {data.get('datetime', '?')}; "
             f"python {machine.get('python_version', '?')} on {machine.get('node', '?')}; "
             f"commit {commit.get('id', '?')}{' (dirty)' if commit.get('dirty') else ''}.", ""]
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        test = bench.get("fullname", bench["name"]).split("[")[0]
        groups.setdefault(test, []).append(bench)
    for test, benches in groups.items():
        params = sorted({k for b in benches for k in (b.get("params") or {})})
        extras = []
        for b in benches:
            extras += [k for k in b.get("extra_info", {}) if k not in extras]
        lines += [f"### {test}", "",
                  "| " + " | ".join(params + ["median ms"] + extras) + " |",
                  "|" + "---|" * len(params) + "---:|" * (1 + len(extras))]
        for b in benches:
            cells = [_fmt((b.get("params") or {}).get(p, "")) for p in params]
            cells.append(_fmt(b["stats"]["median"] * 1e3) if b.get("stats") else "")
            cells += [_fmt(b.get("extra_info", {}).get(k, "")) for k in extras]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/benchmark_table.py BENCHMARK_JSON", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            if argv[0].endswith(".jsonl"):
                data = {"benchmarks": [json.loads(line) for line in f if line.strip()],
                        "machine_info": {"node": "streamed cases (no pytest-benchmark session data)"}}
            else:
                data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {argv[0]} as pytest-benchmark JSON ({exc})", file=sys.stderr)
        return 2
    print(tables(data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
