"""The perplexity suite against an independent, straightforward computation, and the data loaders."""
import math

import pytest
import torch

from qbench.data import encode, load_text
from qbench.models import ByteTokenizer, tiny_llama
from qbench.params import QBenchError
from qbench.suite import CellContext
from suites.perplexity import PerplexitySuite


def straightforward_ppl(model, ids, seqlen, n):
    """Hugging Face's own shifted loss per window, averaged over windows, exponentiated."""
    losses = []
    for i in range(n):
        window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        with torch.no_grad():
            losses.append(model(window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_suite_matches_independent_computation():
    model, tok = tiny_llama(seed=1), ByteTokenizer()
    source = load_text("wikitext2")
    ctx = CellContext(model=model, tokenizer=tok, model_info={"name": "tiny", "max_length": 512}, method=None,
                      device=torch.device("cpu"), dtype=torch.float32, dataset=source, limit=3, seed=0)
    metrics = PerplexitySuite(seqlen=96).measure(ctx)
    ids = torch.tensor(tok.encode("\n\n".join(source.rows)))
    expected = straightforward_ppl(model, ids, 96, 3)
    assert abs(metrics["ppl"].value - expected) / expected < 1e-4
    assert metrics["windows"].value == 3
    assert ctx.protocol == "wikitext2/gptq-s96/first-3"
    assert ctx.extra["windows"]["available"] == ids.numel() // 96


def test_wikitext_rows_are_the_hub_rows():
    source = load_text("wikitext2")
    assert len(source.rows) == 4358  # one row per line of wiki.test.raw, as on the hub
    assert source.rows[0] == "" and source.rows[1] == " = Robert Boulter = \n"
    assert source.sha256() == load_text("wikitext2").sha256()


def test_c4_and_plain_files(tmp_path):
    c4 = load_text("c4")
    assert len(c4.rows) == 1025 and c4.rows[0].startswith("The woman who died")
    path = tmp_path / "mine.txt"
    path.write_text("first line\nsecond line\n")
    mine = load_text(str(path))
    assert mine.text() == "first line\nsecond line\n"
    assert encode(ByteTokenizer(), mine.text()).numel() == len("first line\nsecond line\n")


def test_a_split_after_a_colon():
    valid = load_text("wikitext2:validation")
    assert valid.split == "validation" and valid.name == "wikitext2:validation"
    assert valid.rows == load_text("wikitext2", "validation").rows != load_text("wikitext2").rows
    assert valid.rows[1] == " = Homarus gammarus = \n"  # the first article of wiki.valid.raw
    assert load_text("wikitext2:test").name == "wikitext2"  # the default split keeps the plain name
    with pytest.raises(QBenchError, match="wikitext2 has the split.*not 'train'.*wikitext2:test"):
        load_text("wikitext2:train")
