"""The fidelity suite on tiny-llama: KL of the FP32 model against itself is 0, of a crude
quantization is > 0 and grows as the bits shrink; top-1 agreement is a fraction; it runs on a
user's own text file through ``qbench run``."""
import math

import pytest
import torch

from qbench import host
from qbench.data import TextSource
from qbench.models import load_model
from qbench.params import QBenchError
from qbench.records import read_records
from qbench.suite import CellContext
from qbench.suites.fidelity import FidelitySuite, compare_window, summarize
from tests.helpers import qbench_cli

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40
        + "Pack my box with five dozen liquor jugs! 0123456789 " * 20)


def context(model, loaded, limit=2):
    source = TextSource("mytext.txt", "file", "mem", [TEXT], joiner="")
    return CellContext(model=model, tokenizer=loaded.tokenizer, model_info=loaded.info, method=None,
                       device=torch.device("cpu"), dtype=torch.float32, dataset=source, limit=limit, seed=0)


def quantized(method: str, params: dict):
    loaded = load_model("tiny-llama")
    model = host.make_method(method, params).quantize(loaded.model)
    return model, loaded


def test_fp32_against_itself_is_exactly_zero():
    model, loaded = quantized("fp32", {})
    ctx = context(model, loaded)
    m = FidelitySuite(seqlen=64).measure(ctx)
    assert m["kl_mean"].value == 0 and m["kl_p99"].value == 0 and m["kl_max"].value == 0
    assert m["top1_agreement"].value == 1.0
    assert m["ppl"].value == m["ppl_reference"].value
    assert m["tokens"].value == 2 * 63 and m["windows"].value == 2
    assert ctx.protocol == "mytext.txt/fidelity-s64-vs-fp32/first-2"
    assert ctx.extra["reference"]["model"] == "tiny-llama"


def test_crude_quantization_diverges_more_with_fewer_bits():
    results = {}
    for bits in (2, 4):
        model, loaded = quantized("affine", {"bits": bits, "group_size": 32})
        results[bits] = FidelitySuite(seqlen=64).measure(context(model, loaded))
    for m in results.values():
        assert m["kl_mean"].value > 0
        assert m["kl_p99"].value >= m["kl_median"].value
        assert m["kl_max"].value >= m["kl_p99"].value
        assert 0 <= m["top1_agreement"].value <= 1
    assert results[2]["kl_mean"].value > results[4]["kl_mean"].value
    # (a random tiny llama's top token is mostly its input token, through the tied embeddings,
    # so top-1 agreement stays near 1 even at 2 bits; the demo model shows it dropping)


def test_window_kl_matches_a_direct_computation():
    torch.manual_seed(0)
    ref = load_model("tiny-llama").model
    noisy = load_model("tiny-llama").model
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, 259, (33,))
    kl, agree, ref_nll, quant_nll = compare_window(ref, noisy, ids)
    with torch.no_grad():
        p = torch.softmax(ref(ids[None]).logits[0, :-1].double(), -1)
        q = torch.softmax(noisy(ids[None]).logits[0, :-1].double(), -1)
    want = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kl, want, rtol=1e-4, atol=1e-7)
    assert agree.shape == (32,)
    assert torch.equal(agree, p.argmax(-1) == q.argmax(-1))
    assert math.isclose(ref_nll, -p.log()[torch.arange(32), ids[1:]].sum().item(), rel_tol=1e-5)
    m = summarize(kl, agree, ref_nll, quant_nll)
    assert math.isclose(m["kl_mean"].value, want.mean().item(), rel_tol=1e-4)


def test_too_short_text_is_a_clear_error():
    model, loaded = quantized("fp32", {})
    ctx = context(model, loaded)
    ctx.dataset = TextSource("short.txt", "file", "mem", ["tiny"], joiner="")
    with pytest.raises(QBenchError, match="fewer than one window"):
        FidelitySuite(seqlen=64).measure(ctx)
    with pytest.raises(QBenchError, match="seqlen"):
        FidelitySuite(seqlen=1)
    with pytest.raises(QBenchError, match="valid values: float32, float16, bfloat16"):
        FidelitySuite(reference="int8")


def test_half_precision_reference():
    model, loaded = quantized("fp32", {})
    ctx = context(model, loaded, limit=1)
    m = FidelitySuite(seqlen=64, reference="bfloat16").measure(ctx)
    assert 0 < m["kl_mean"].value < 0.01  # bf16 rounding of the reference only
    assert ctx.protocol == "mytext.txt/fidelity-s64-vs-bf16/first-1"


def test_qbench_run_on_a_users_text_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "fp32,affine:bits=2,group_size=32", "--models", "tiny-llama",
                        "--suites", "fidelity:seqlen=64", "--dataset", str(text), "--limit", "2",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    recs = {r["method"]["label"]: r for r in read_records(out / "records.jsonl")}
    assert recs["fp32"]["metrics"]["kl_mean"]["value"] == 0
    assert recs["affine:bits=2,group_size=32"]["metrics"]["kl_mean"]["value"] > 0
    assert recs["fp32"]["dataset"]["protocol"] == "notes.txt/fidelity-s64-vs-fp32/first-2"
    check_fidelity_only_report(out)


def check_fidelity_only_report(run):
    """A fidelity-only run's report (issue 16, item 7): KL columns carry their unit, the suite's own
    perplexity is a column, the protocol line names the fidelity suite, and no column is empty."""
    import io
    import json

    import pandas as pd

    from qbench.report import render

    md = render(run, "md")
    for title in ("KL mean (nats/token)", "KL p99 (nats/token)", "top-1 agree", "ppl (fidelity windows)"):
        assert title in md.splitlines()[0]
    assert "- fidelity protocol: notes.txt/fidelity-s64-vs-fp32/first-2" in md and "perplexity protocol" not in md
    board = pd.read_csv(io.StringIO(render(run, "csv")), comment="#")
    assert not [c for c in board.columns if board[c].isna().all()], "empty columns in a fidelity-only report"
    assert {"KL mean (nats/token)", "ppl (fidelity windows)"} <= set(board.columns)
    assert board["ppl (fidelity windows)"].notna().all()
    rows = json.loads(render(run, "json"))["leaderboard"]
    assert all(any(r.get(k) is not None for r in rows) for k in rows[0])
    assert "fidelity protocol: notes.txt/fidelity-s64-vs-fp32/first-2" in json.loads(render(run, "json"))["context"]
