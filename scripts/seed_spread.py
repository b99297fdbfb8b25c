"""Spread of a metric over a method's ``seed`` parameter (e.g. GPTQ's calibration windows).

Groups the ok records of a run directory by model, method and parameters other than ``seed``,
suite and protocol, and prints per group the value for each seed, the mean, the sample standard
deviation and the range, as markdown. Methods without a seed parameter are one-row groups.

    python scripts/seed_spread.py results/runs/gptq-seeds [--metric ppl] > results/gptq-seed-spread-16windows-cpu.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbench.records import latest_records, produced_by  # noqa: E402


def spread(records: list[dict], metric: str) -> list[dict]:
    groups: dict[str, dict] = {}
    for rec in records:
        if rec.get("status") != "ok" or metric not in rec.get("metrics", {}):
            continue
        params = dict(rec["method"]["params"])
        seed = params.pop("seed", None)
        key = json.dumps([rec["model"]["name"], rec["method"]["name"], params, rec["suite"]["label"],
                          (rec.get("dataset") or {}).get("protocol")], sort_keys=True)
        group = groups.setdefault(key, {"model": rec["model"]["name"], "method": rec["method"]["name"],
                                        "params": params, "protocol": (rec.get("dataset") or {}).get("protocol"),
                                        "values": {}})
        group["values"][seed] = rec["metrics"][metric]["value"]
    rows = []
    for group in groups.values():
        values = [group["values"][s] for s in sorted(group["values"], key=lambda s: (s is None, s))]
        rows.append({**group, "n": len(values), "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "min": min(values), "max": max(values)})
    return rows


def markdown(rows: list[dict], metric: str, command: str) -> str:
    lines = [produced_by(command) + ".", "",
             f"| model | method | parameters (seed aside) | protocol | {metric} per seed | n | mean | sd | range |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], json.dumps(r["params"], sort_keys=True))):
        per_seed = ", ".join(f"{'-' if s is None else s}: {v:.2f}" for s, v in
                             sorted(r["values"].items(), key=lambda kv: (kv[0] is None, kv[0])))
        params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        sd = "" if r["sd"] is None else f"{r['sd']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {params} | {r['protocol']} | {per_seed} | {r['n']} | "
                     f"{r['mean']:.2f} | {sd} | {r['max'] - r['min']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--metric", default="ppl")
    args = parser.parse_args(argv)
    path = Path(args.run_dir) / "records.jsonl"
    if not path.exists():
        print(f"error: {path} does not exist; pass a run directory written by qbench run", file=sys.stderr)
        return 2
    rows = spread(list(latest_records(path).values()), args.metric)
    if not rows:
        print(f"error: no ok records with metric {args.metric!r} in {path}", file=sys.stderr)
        return 2
    command = "python scripts/seed_spread.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, args.metric, command), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
