"""Which accuracy differences against the baseline row are larger than their standard errors.

Reads a run's `accuracy` records (every task metric lm-eval reported with its standard error) and
writes, per method and task metric, the difference from the baseline row (fp16, else bf16, else
fp32) in points, the standard error of that difference and how many standard errors it is.

The standard error of a difference is taken as sqrt(se_method² + se_baseline²), as for two
independent samples. The methods are scored on the same items, so their errors are positively
correlated and the true standard error of a difference is smaller: this errs toward calling a
difference noise.

    python scripts/accuracy_differences.py results/runs/RUN -o results/accuracy-differences.md
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from qbench.leaderboard import BASELINES, STDERR, load_frame


def differences(run_dir: Path) -> list[dict]:
    frame = load_frame(run_dir)
    frame = frame[(frame["suite"] == "accuracy") & (frame["status"] == "ok")]
    keys = [k for k in frame.columns if k.startswith("accuracy.") and f"{k}{STDERR}" in frame.columns
            and frame.attrs["metric_units"].get(k) == "fraction"]
    rows = []
    for model, group in frame.groupby("model", sort=False):
        base = next((group[group["method"] == b].iloc[-1] for b in BASELINES if (group["method"] == b).any()), None)
        if base is None:
            continue
        for method, mine in group.groupby("method", sort=False):
            if method == base["method"]:
                continue
            mine = mine.iloc[-1]
            for key in keys:
                values = (mine.get(key), base.get(key), mine.get(f"{key}{STDERR}"), base.get(f"{key}{STDERR}"))
                if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
                    continue
                value, base_value, se, base_se = map(float, values)
                se_diff = math.hypot(se, base_se)
                diff = value - base_value
                rows.append({"model": model, "method": method, "metric": key.removeprefix("accuracy."),
                             "baseline": base["method"], "diff": 100 * diff, "se": 100 * se_diff,
                             "z": diff / se_diff if se_diff else math.inf})
    return rows


def markdown(rows: list[dict], run_dir: Path) -> str:
    lines = [f"Accuracy differences against the baseline row, from `{run_dir}` (points = percentage points; "
             "se = sqrt(se_method² + se_baseline²)).", "",
             "| model | method | metric | Δ vs baseline (points) | se of Δ (points) | Δ / se | beyond |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        beyond = "2 se" if abs(r["z"]) > 2 else "1 se" if abs(r["z"]) > 1 else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['metric']} | {r['diff']:+.1f} | {r['se']:.1f} | "
                     f"{r['z']:+.2f} | {beyond} |")
    beyond_one = [r for r in rows if abs(r["z"]) > 1]
    lines += ["", f"{len(beyond_one)} of {len(rows)} differences are larger than one standard error, "
              f"{sum(abs(r['z']) > 2 for r in rows)} larger than two."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    text = markdown(differences(args.run_dir), args.run_dir)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
