"""Seeds of calibration-dependent methods: sweeping them from the command line, and their spread.

A method whose result depends on random draws (GPTQ's calibration windows, QLoRA's initialisation
and data) has a ``seed`` parameter. ``--methods gptq:seed=0+1+2`` runs one cell per seed (the same
``+`` that joins list-valued parameters elsewhere); the leaderboard then shows, beside each seed's
row, the mean and spread over the seeds (:func:`qbench.leaderboard.leaderboard`), and
``qbench report RUN --seed-spread`` the table of values per seed (:func:`seed_spread_markdown`).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from qbench.params import QBenchError, Spec
from qbench.records import RECORDS, latest_records, produced_by

SEP = "+"


def expand_seed_sweeps(specs: list[Spec]) -> list[Spec]:
    """``gptq:bits=4,seed=0+1+2`` → three specs with ``seed=0``, ``seed=1``, ``seed=2`` (other specs
    unchanged). Only a method with a ``seed`` parameter can be swept; seeds must be integers, given
    once each."""
    from qbench import host

    out: list[Spec] = []
    for spec in specs:
        raw = spec.params.get("seed")
        if raw is None or SEP not in str(raw):
            out.append(spec)
            continue
        cls = host.methods().get(spec.name)
        if cls is not None and "seed" not in cls.params:
            raise QBenchError(f"method {spec.name} has no seed parameter, so seed={raw} cannot be swept; only methods "
                              f"that draw at random (gptq, int8-absmax:activations=static, qlora...) have one")
        seeds = [part.strip() for part in str(raw).split(SEP)]
        for part in seeds:
            try:
                int(part)
            except ValueError:
                raise QBenchError(f"{spec.name}: seed={raw}: each seed of a sweep must be an integer "
                                  f"(e.g. seed=0+1+2)") from None
        if len({int(p) for p in seeds}) != len(seeds):
            raise QBenchError(f"{spec.name}: seed={raw} names a seed twice")
        out.extend(Spec(spec.name, {**spec.params, "seed": part}) for part in seeds)
    return out


def spread(records: list[dict], metric: str) -> list[dict]:
    """Per model × method × parameters other than ``seed`` × suite × protocol: the metric per seed,
    its mean, sample standard deviation and range (ok records only)."""
    groups: dict[str, dict] = {}
    for rec in records:
        if rec.get("status") != "ok" or metric not in (rec.get("metrics") or {}):
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


def spread_markdown(rows: list[dict], metric: str, command: str) -> str:
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


def seed_spread_markdown(run_dir: Path, metric: str = "ppl", command: str | None = None) -> str:
    """The seed-spread table of a run directory (``qbench report RUN --seed-spread``)."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        raise QBenchError(f"no {RECORDS} in {run_dir}; pass the --out directory of a qbench run")
    rows = spread(list(latest_records(path).values()), metric)
    if not rows:
        raise QBenchError(f"no ok records with metric {metric!r} in {path}")
    return spread_markdown(rows, metric, command or f"qbench report {run_dir} --seed-spread --metric {metric}")
