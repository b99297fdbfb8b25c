"""Issue 13's GPU targets, met or missed, from the files a lease left in a folder.

    python scripts/gpu_targets.py results/gpu-h200 > results/gpu-h200/targets.md

Reads bench-nf4.json, bench-int8_affine.json, bench-gptq.json (pytest-benchmark files, each case's
``speedup_vs_fp16`` against torch's FP16 matmul timed in the same run) and the end-to-end records
(e2e-eager-records.jsonl, e2e-graphs-records.jsonl). Each target row gives the range over the
shapes measured (worst .. best), the shape of the worst case, and met only when the worst case
reaches the target. A target with no measurement says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GEMV_TB_S = 3.2  # issue 13: effective bandwidth of the 4-bit batch-1 GEMV, TB/s


def _cases(folder: Path, module: str, test: str) -> list[dict]:
    path = folder / f"bench-{module}.json"
    if not path.exists():
        return []
    out = []
    for bench in json.loads(path.read_text()).get("benchmarks", []):
        if bench["name"].split("[")[0] == test:
            out.append({**(bench.get("params") or {}), **bench.get("extra_info", {})})
    return out


def _shape(case: dict) -> str:
    if "shape" in case and isinstance(case["shape"], list):
        return "x".join(map(str, case["shape"]))
    return f"{case.get('K')}x{case.get('N')}"


def _row(target: str, goal: float, cases: list[dict], key: str = "speedup_vs_fp16", unit: str = "x") -> str:
    if not cases:
        return f"| {target} | {goal:g}{unit} | not measured | | missed (no measurement) |"
    worst = min(cases, key=lambda c: c[key])
    best = max(c[key] for c in cases)
    verdict = "met" if worst[key] >= goal else "missed"
    return (f"| {target} | {goal:g}{unit} | {worst[key]:.3g} .. {best:.3g} ({len(cases)} cases) | "
            f"{_shape(worst)} | {verdict} |")


def _gbps_to_tbs(cases: list[dict], key: str) -> list[dict]:
    return [{**c, "tb_s": c[key] / 1000} for c in cases if key in c]


def bench_rows(folder: Path) -> list[str]:
    # what nf4_matmul does by default; bench_nf4 also times the fused GEMM (gemm=fused) beside it
    nf4 = [c for c in _cases(folder, "nf4", "test_forward") if c.get("gemm", "default") == "default"]
    affine = [c for c in _cases(folder, "int8_affine", "test_affine_dequant_matmul")
              if c.get("bits") == 4 and c.get("group_size") == 128]
    gptq = [c for c in _cases(folder, "gptq", "test_gptq_matmul_vs_fp16") if c.get("bits") == 4]
    w8a16 = _cases(folder, "int8_affine", "test_w8a16_dequant_matmul")
    w8a8 = _cases(folder, "int8_affine", "test_w8a8_dynamic")
    gemm = _cases(folder, "int8_affine", "test_int8_gemm_only")
    rows = []
    for name, cases, gbps in [("nf4 (blocksize 64, double quant)", nf4, "effective_GBps"),
                              ("affine g128", affine, "effective_GBps"), ("gptq g128", gptq, "gptq_GBps")]:
        b1 = [c for c in cases if c.get("batch") == 1]
        rows.append(_row(f"{name}, batch 1, speed-up", 2.5, b1))
        rows.append(_row(f"{name}, batch 1, effective TB/s", GEMV_TB_S, _gbps_to_tbs(b1, gbps), "tb_s", " TB/s"))
        rows.append(_row(f"{name}, batch 16", 1.5, [c for c in cases if c.get("batch") == 16]))
        rows.append(_row(f"{name}, batch 128", 0.8, [c for c in cases if c.get("batch") == 128]))
    rows.append(_row("INT8 weight-only (w8a16), batch 1", 1.7, [c for c in w8a16 if c.get("batch") == 1]))
    rows.append(_row("W8A8 with per-token activation quantization, batch >= 256", 1.3,
                     [c for c in w8a8 if c.get("batch", 0) >= 256]))
    rows.append(_row("W8A8 int8 GEMM alone, batch >= 256", 1.3, [c for c in gemm if c.get("batch", 0) >= 256]))
    return rows


def e2e_rows(folder: Path) -> list[str]:
    rows = []
    for mode in ("eager", "graphs"):
        path = folder / f"e2e-{mode}-records.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            method = record["method"]["name"]
            if method in ("fp16", "bf16", "fp32"):
                continue
            goal = 2.0 if method == "nf4" else 1.0
            target = f"end to end decode b1, {method}, {mode} decode step"
            metric = (record.get("metrics") or {}).get("decode_speedup_b1")
            if record.get("status") != "ok" or not metric:
                message = (record.get("message") or record.get("status", "?")).split(";")[0]
                rows.append(f"| {target} | {goal:g}x | failed: {message} | | missed (did not run) |")
                continue
            low, high = metric.get("ci", [metric["value"]] * 2)
            verdict = "met" if low >= goal else ("missed" if high < goal else "not shown (interval spans the target)")
            rows.append(f"| {target} | {goal:g}x | {metric['value']:.3g} [{low:.3g}, {high:.3g}] (paired, 95%) | "
                        f"7B shapes | {verdict} |")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/gpu_targets.py FOLDER (a folder holding bench-*.json and e2e-*-records.jsonl)",
              file=sys.stderr)
        return 2
    folder = Path(argv[0])
    print(f"Issue 13 targets from `{folder}` (`python scripts/gpu_targets.py {folder}`). Speed-ups are against "
          "torch's FP16 matmul timed in the same run; a kernel target is met only when its worst shape meets it.\n")
    print("| target | goal | measured (worst .. best) | worst shape | verdict |")
    print("|---|---:|---|---|---|")
    for row in bench_rows(folder) + e2e_rows(folder):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
