"""Per-layer error of each GPTQ setting in a run, against round-to-nearest on the same grid.

Every ``gptq`` record carries, per quantized linear, GPTQ's output error on its calibration inputs
``mean ‖(W − Ŵ)x‖²`` and the same for round-to-nearest (min-max grid of the same bits, group and
symmetry): ``method_report.layers.<name>.output_error`` / ``rtn_output_error``. This prints, per GPTQ
setting of a run, the ratio GPTQ / RTN by layer kind (q, k, v, o, gate, up, down: median and worst
over the 30 blocks), how many layers GPTQ leaves worse than RTN, and its quantization time — the
measurements that say which choice did what, layer by layer, without evaluating anything again.

    python scripts/gptq_layer_errors.py results/runs/explore16 -o results/gptq-layer-errors-cpu.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbench.records import RECORDS, latest_records, produced_by  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def settings_rows(run_dir: Path) -> list[dict]:
    seen, rows = set(), []
    for rec in latest_records(Path(run_dir) / RECORDS).values():
        report = rec.get("method_report") or {}
        if rec["method"]["name"] != "gptq" or rec.get("status") != "ok" or not report.get("layers"):
            continue
        label = rec["method"]["label"]
        if label in seen:  # one row per setting, whatever suites ran on it
            continue
        seen.add(label)
        ratios = {kind: [] for kind in KINDS}
        worse = 0
        for name, stats in report["layers"].items():
            ratio = stats["output_error"] / stats["rtn_output_error"] if stats["rtn_output_error"] else float("nan")
            worse += ratio > 1
            kind = name.rsplit(".", 1)[-1]
            if kind in ratios:
                ratios[kind].append(ratio)
        rows.append({"label": label, "ratios": ratios, "worse": worse, "layers": len(report["layers"]),
                     "seconds": report.get("quantize_seconds"), "cpu_seconds": report.get("quantize_cpu_seconds"),
                     "calibration": report.get("calibration", {})})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    head = "| setting | " + " | ".join(k.removesuffix("_proj") for k in KINDS) + \
        " | layers worse than RTN | quantize s (CPU s) |"
    lines = [produced_by(command) + ".", "",
             "Output error on the calibration inputs, GPTQ / RTN on the same grid, per layer kind: median "
             "(worst) over the blocks. Below 1: GPTQ's rounding beats round-to-nearest on that layer.", "",
             head, "|---|" + "---:|" * (len(KINDS) + 2)]
    for r in rows:
        cells = []
        for kind in KINDS:
            values = r["ratios"][kind]
            cells.append(f"{statistics.median(values):.2f} ({max(values):.2f})" if values else "")
        cpu = f" ({r['cpu_seconds']:.0f})" if r["cpu_seconds"] is not None else ""
        seconds = f"{r['seconds']:.0f}{cpu}" if r["seconds"] is not None else ""
        lines.append(f"| `{r['label']}` | " + " | ".join(cells) + f" | {r['worse']} of {r['layers']} | {seconds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / RECORDS).is_file():
        print(f"error: no {RECORDS} in {args.run_dir}; pass the --out directory of a qbench run", file=sys.stderr)
        return 2
    rows = settings_rows(Path(args.run_dir))
    if not rows:
        print(f"error: no ok gptq records with per-layer errors in {args.run_dir}", file=sys.stderr)
        return 2
    command = "python scripts/gptq_layer_errors.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, command)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
