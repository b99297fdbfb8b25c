"""scripts/gpu_session.sh's end-to-end step, dry-run on CPU with the tiny config: the same qbench
commands a GPU lease runs (memory + paired latency with the eager decode step, then latency with
the decode step in a CUDA graph, skipped on CPU with its reason), the per-mode reports, and the
budget bookkeeping. (nf4 alone, to keep it short; the lease runs fp16, int8-absmax, affine, nf4.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.records import read_records

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_e2e_step_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "QBENCH_E2E_METHODS": "nf4", "QBENCH_BUDGET_S": "1500",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh"), "--dry-run", str(out), "e2e", "report"],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    eager = {r["suite"]["name"]: r for r in read_records(out / "e2e-eager-records.jsonl")}
    assert {name: r["status"] for name, r in eager.items()} == {"memory": "ok", "latency": "ok"}
    latency = eager["latency"]
    assert latency["model"]["name"] == "random:scripts/gpu_models/tiny-llama-shapes"
    assert latency["extra"]["compile"] == "none" and latency["extra"]["paired"]["baseline"] == "fp16"
    decode_paths = latency["extra"]["kernel_paths_by_phase"]["b1"]["decode"]
    assert decode_paths["layers"] == 14 and decode_paths["by_shape"]["128x128"]  # 2 layers x 7 linears
    assert latency["metrics"]["decode_speedup_b1"]["ci"] and latency["metrics"]["latency_trust"]["value"]

    graphs = list(read_records(out / "e2e-graphs-records.jsonl"))
    assert [(r["status"], r["suite"]["params"]["compile"]) for r in graphs] == [("skipped", "cuda-graphs")]
    assert "needs a CUDA device" in graphs[0]["message"]

    quick = (out / "e2e.md").read_text()
    assert "## eager decode step" in quick and "## graphs decode step" in quick
    assert "decode speed-up b1 (paired)" in quick and "--device cpu" in quick
    assert "decode speed-up b1 (paired)" in (out / "e2e-eager.md").read_text()
    timings = (out / "timings-e2e-report.tsv").read_text().splitlines()
    assert timings[0] == "step\tseconds\toutcome" and timings[1].startswith("e2e\t") and timings[1].endswith("\tok")
    assert not list(out.glob("failed-*.log"))
