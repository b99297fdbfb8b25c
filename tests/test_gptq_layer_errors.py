"""scripts/gptq_layer_errors.py: GPTQ / RTN output error per layer kind, from the records alone."""
import subprocess
import sys
from pathlib import Path

from tests.fake_runs import record, write_run

REPO = Path(__file__).resolve().parent.parent


def _gptq(label, ratios):
    rec = record(label, "perplexity", {"ppl": 30.0})
    layers = {f"model.layers.{i}.self_attn.v_proj": {"output_error": r, "rtn_output_error": 1.0}
              for i, r in enumerate(ratios)}
    rec["method_report"] = {"layers": layers, "quantize_seconds": 100.0, "quantize_cpu_seconds": 180.0}
    return rec


def test_ratios_per_layer_kind_and_layers_worse_than_rtn(tmp_path):
    run = write_run(tmp_path / "run", [_gptq("gptq", [0.5, 0.7, 1.5]), _gptq("gptq:act_order=true", [0.4, 0.4, 0.6]),
                                       record("nf4", "perplexity", {"ppl": 29.0})])
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gptq_layer_errors.py"), str(run)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0]: line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| `")}
    assert rows["| `gptq`"][3] == "0.70 (1.50)" and rows["| `gptq`"][-2] == "1 of 3"
    assert rows["| `gptq:act_order=true`"][3] == "0.40 (0.60)" and rows["| `gptq:act_order=true`"][-1] == "100 (180) |"
    assert "nf4" not in proc.stdout
