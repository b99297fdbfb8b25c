"""``qbench report --format html``: one self-contained page with the sortable leaderboard and the
plots (base64 PNG); says so when matplotlib is missing; md/csv/json unchanged. Rendered in headless
Chromium (screenshot + DOM after sorting) where /usr/bin/chromium exists."""
import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qbench.report import render
from tests.fake_runs import MIB, record, standard_run, write_run
from tests.helpers import qbench_cli

PNG = b"\x89PNG\r\n\x1a\n"


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_html_page_has_sortable_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    page = render(standard_run(tmp_path / "run"), "html")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<table id='leaderboard'" in page and "addEventListener('click'" in page
    for method in ("fp16", "int8-absmax", "nf4"):
        assert f">{method}</td>" in page
    for column in ("bits/weight", "ppl", "KL mean (nats/token)", "top-1 agree", "decode speed-up b1 (paired)"):
        assert f">{column}</th>" in page
    pngs = images(page)
    assert len(pngs) == 2 and all(p.startswith(PNG) and len(p) > 5000 for p in pngs)
    assert "KL divergence from FP32 (nats/token, mean) vs bits per weight" in page
    assert "decode speed-up vs memory saved" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "src='data:image/png" in page  # self-contained: nothing fetched


def test_plot_falls_back_to_perplexity_without_fidelity(tmp_path):
    pytest.importorskip("matplotlib")
    page = render(standard_run(tmp_path / "run", with_fidelity=False), "html")
    assert "alt='perplexity vs bits per weight'" in page and "KL mean" not in page
    assert len(images(page)) == 2


def test_without_matplotlib_the_page_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    page = render(standard_run(tmp_path / "run"), "html")
    assert "id='no-plots'" in page and "pip install 'qbench-quant[plots]'" in page
    assert "<table id='leaderboard'" in page and not images(page)


def test_other_formats_still_work(tmp_path):
    run = standard_run(tmp_path / "run")
    assert "| nf4" in render(run, "md")
    csv = render(run, "csv")
    assert csv.startswith("# ") and '\n"model","method",' in csv  # context first, as comment lines
    rows = json.loads(render(run, "json"))["leaderboard"]
    assert {r["method"] for r in rows} == {"fp16", "int8-absmax", "nf4"}
    out = tmp_path / "board.html"
    result = qbench_cli("report", str(run), "--format", "html", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "<table id='leaderboard'" in out.read_text()


def test_fidelity_columns_in_every_format_only_when_measured(tmp_path):
    with_kl = standard_run(tmp_path / "with")
    rows = {r["method"]: r for r in json.loads(render(with_kl, "json"))["leaderboard"]}
    assert rows["nf4"]["KL mean (nats/token)"] == 0.03 and rows["nf4"]["top-1 agree"] == 1 - 3 * 0.03
    assert "KL p99 (nats/token)" in render(with_kl, "csv").splitlines()[-4]  # the header, after the context
    assert "KL mean" in render(with_kl, "md").splitlines()[0]
    without = standard_run(tmp_path / "without", with_fidelity=False)
    assert "KL" not in render(without, "md").splitlines()[0]
    assert "nan" not in render(without, "md").split("\n\n")[0]  # unmeasured values are blank


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium (apt-get install chromium)")
def test_page_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "board.html"
    page.write_text(render(standard_run(tmp_path / "run"), "html"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1400,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 20_000
    # The DOM after the page's own script ran, opened sorted by ppl descending.
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri() + "#sort=ppl,desc"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<img class=\"plot\"") == 2
    order = re.findall(r"<td data-v=\"(fp16|int8-absmax|nf4)\">", dom)
    assert order == ["nf4", "int8-absmax", "fp16"]  # ppl 12.5 > 12.1 > 12.0
    mpimg = pytest.importorskip("matplotlib.image")
    pixels = mpimg.imread(str(shot))
    assert pixels.std() > 0.05  # not a blank page


def screenshot_script() -> None:
    """``python tests/test_report_html.py RUN_DIR OUT.png``: the same check by hand."""
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("no chromium on PATH: apt-get install chromium")
    page = out.with_suffix(".html")
    page.write_text(render(run, "html"))
    subprocess.run([browser, "--headless", "--no-sandbox", f"--screenshot={out}", "--window-size=1400,1600",
                    page.as_uri()], check=True)
    print(f"screenshot: {out}")


if __name__ == "__main__":
    screenshot_script()


def read_csv_report(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), comment="#")


def test_forward_peak_column_only_when_measured(tmp_path):
    assert "forward peak Δ (MiB)" not in read_csv_report(render(standard_run(tmp_path / "without"), "csv")).columns
    recs = [record("fp16", "memory", {"bits_per_weight": 16, "quantized_layer_bytes": 8 * MIB, "peak_memory": 900 * MIB,
                                      "peak_activation_memory": 48 * MIB})]
    board = read_csv_report(render(write_run(tmp_path / "with", recs), "csv"))
    columns = list(board.columns)
    assert columns.index("forward peak Δ (MiB)") == columns.index("peak mem (MiB)") + 1
    assert board["forward peak Δ (MiB)"][0] == 48.0


def test_csv_context_lines_are_comments_pandas_skips(tmp_path):
    run = standard_run(tmp_path / "run")
    text = render(run, "csv")
    context = [line for line in text.splitlines() if line.startswith("# ")]
    assert any("perplexity protocol: wikitext2/gptq-s64/first-2" in line for line in context)
    assert any("fidelity protocol: wikitext2/fidelity-s512-vs-fp32/first-2" in line for line in context)
    board = read_csv_report(text)
    assert list(board["method"]) == ["fp16", "int8-absmax", "nf4"] and board["ppl"].tolist() == [12.0, 12.1, 12.5]
