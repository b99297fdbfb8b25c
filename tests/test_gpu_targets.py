"""scripts/gpu_targets.py: issue 13's verdicts from a lease's files (a kernel target needs its worst shape)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench(name, params, extra):
    return {"name": name, "params": params, "extra_info": extra, "stats": {"median": 1e-4}}


def _write(folder: Path):
    nf4 = [_bench("test_forward[a]", {"shape": [4096, 4096], "batch": 1, "gemm": "default"},
                  {"speedup_vs_fp16": 3.0, "effective_GBps": 3500.0}),
           _bench("test_forward[b]", {"shape": [8192, 8192], "batch": 1, "gemm": "default"},
                  {"speedup_vs_fp16": 2.6, "effective_GBps": 3300.0}),
           _bench("test_forward[c]", {"shape": [8192, 8192], "batch": 16, "gemm": "default"},
                  {"speedup_vs_fp16": 1.2, "effective_GBps": 900.0}),
           _bench("test_forward[d]", {"shape": [8192, 8192], "batch": 16, "gemm": "fused"},  # not what users get
                  {"speedup_vs_fp16": 9.0, "effective_GBps": 900.0})]
    (folder / "bench-nf4.json").write_text(json.dumps({"benchmarks": nf4}))
    records = [{"method": {"name": "fp16"}, "status": "ok", "metrics": {}},
               {"method": {"name": "nf4"}, "status": "ok",
                "metrics": {"decode_speedup_b1": {"value": 2.4, "ci": [2.2, 2.6]}}},
               {"method": {"name": "affine"}, "status": "ok",
                "metrics": {"decode_speedup_b1": {"value": 1.01, "ci": [0.97, 1.05]}}},
               {"method": {"name": "int8-absmax"}, "status": "error", "message": "capture failed; more"}]
    (folder / "e2e-graphs-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_verdicts(tmp_path):
    _write(tmp_path)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_targets.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["nf4 (blocksize 64, double quant), batch 1, speed-up"].endswith("| met |")
    assert "2.6 .. 3 (2 cases) | 8192x8192" in rows["nf4 (blocksize 64, double quant), batch 1, speed-up"]
    assert rows["nf4 (blocksize 64, double quant), batch 1, effective TB/s"].endswith("| met |")
    assert rows["nf4 (blocksize 64, double quant), batch 16"].endswith("| missed |")
    assert rows["nf4 (blocksize 64, double quant), batch 128"].endswith("missed (no measurement) |")
    assert rows["end to end decode b1, nf4, graphs decode step"].endswith("| met |")
    assert "interval spans the target" in rows["end to end decode b1, affine, graphs decode step"]
    assert "failed: capture failed" in rows["end to end decode b1, int8-absmax, graphs decode step"]


def test_bad_folder_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_targets.py"), str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
