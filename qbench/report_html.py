"""``qbench report --format html``: one self-contained page — the leaderboard (sortable by clicking a
header, a few lines of inline JavaScript) and plots embedded as base64 PNG:

* perplexity (or, where the run has the fidelity suite, KL divergence from FP32) against bits per
  weight, one point per method, the FP16 baseline as a reference line;
* decode speed-up against memory saved in the quantized layers, FP16 at (0 %, 1×);

each point with an error bar where the run measured its uncertainty: the 95% paired interval of its
difference from the baseline (drawn from the baseline's value), else its own interval or stderr.

Plots need matplotlib (the ``plots`` extra); without it the page says so and still has the table.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import pandas as pd

from qbench.leaderboard import CI_HIGH, CI_LOW, STDERR, baseline_row, column_for, with_uncertainty_in_cells
from qbench.paired import Z95


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _cell(v: Any, text: Any = None) -> str:
    """A table cell sorted by ``v`` and showing ``text`` (the value with its uncertainty) or ``v``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "<td data-v=''>—</td>"
    if _is_number(v):
        shown = html.escape(str(text)) if isinstance(text, str) else f"{float(v):.6g}"
        return f"<td class='num' data-v='{float(v)!r}'>{shown}</td>"
    text = html.escape(str(v))
    return f"<td data-v='{text}'>{text}</td>"


def table_html(board: pd.DataFrame) -> str:
    shown = with_uncertainty_in_cells(board)  # the value ± its uncertainty, sorted by the value
    head = "".join(f"<th title='click to sort'>{html.escape(str(c))}</th>" for c in shown.columns)
    values = board[list(shown.columns)].astype(object)
    rows = "".join("<tr>" + "".join(_cell(v, t) for v, t in zip(vrow, trow)) + "</tr>"
                   for vrow, trow in zip(values.itertuples(index=False), shown.itertuples(index=False)))
    return f"<table id='leaderboard' class='leaderboard'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


SORT_JS = """
document.querySelectorAll('#leaderboard th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var asc = th.dataset.order !== 'asc';
    th.parentNode.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === '' && y === '') return 0;
      if (x === '') return 1;            // empty cells last either way
      if (y === '') return -1;
      var nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
// A link can open the page sorted: page.html#sort=ppl (twice for descending: #sort=ppl,desc).
(function () {
  var m = /^#sort=([^,]*)(,desc)?$/.exec(location.hash);
  if (!m) return;
  var name = decodeURIComponent(m[1]);
  document.querySelectorAll('#leaderboard th').forEach(function (th) {
    if (th.textContent === name) { th.click(); if (m[2]) th.click(); }
  });
})();
"""

STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
    "td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}td.num{text-align:right}"
    "th{background:#f4f4f4;cursor:pointer;user-select:none}th[data-order=asc]::after{content:' ▲'}"
    "th[data-order=desc]::after{content:' ▼'}img.plot{max-width:48%;min-width:420px;margin:1em 1em 0 0}"
    ".missing{color:#a33}.wide{overflow-x:auto;max-width:100%}table{font-size:14px}"
)


def _points(board: pd.DataFrame, x: str, y: str) -> list[tuple[str, str, float, float]]:
    out = []
    if x not in board.columns or y not in board.columns:
        return out
    for r in board.to_dict("records"):
        if _is_number(r.get(x)) and _is_number(r.get(y)):
            out.append((r["model"], r["method"], float(r[x]), float(r[y])))
    return out


def _error_bar(board: pd.DataFrame, y: str, model: str, method: str, value: float) -> tuple[float, float] | None:
    """(below, above) the point for ``y``'s error bar: the paired 95% interval of the row's difference
    from the baseline, drawn from the baseline's value (so a bar that crosses the baseline line is a
    difference the run cannot tell from none); else the interval or ±1.96 stderr the value carries."""
    row = board[(board["model"] == model) & (board["method"] == method)].iloc[0]
    paired = board.attrs.get("diff_intervals", {}).get(y, {}).get((model, method))
    base = baseline_row(board, model, board.attrs.get("baseline"))
    if paired is not None and base is not None and _is_number(base.get(y)):
        low, high = float(base[y]) + paired[0], float(base[y]) + paired[1]
        return max(0.0, value - low), max(0.0, high - value)
    for cols in (board.attrs.get("derived", {}).get(y), board.attrs.get("uncertainty", {}).get(y)):
        if not cols:
            continue
        if CI_LOW in cols and _is_number(row.get(cols[CI_LOW])) and _is_number(row.get(cols[CI_HIGH])):
            return max(0.0, value - float(row[cols[CI_LOW]])), max(0.0, float(row[cols[CI_HIGH]]) - value)
        if STDERR in cols and _is_number(row.get(cols[STDERR])):
            return (Z95 * float(row[cols[STDERR]]),) * 2
    return None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(board: pd.DataFrame) -> list[tuple[str, str]]:
    """(title, base64 PNG) per plot; raises ImportError without matplotlib."""
    import os

    from qbench.paths import cache_dir

    # its font cache goes under qbench's cache dir, not ~/.cache/matplotlib (only if not imported yet)
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    kl, ppl, bits = column_for(board, "fidelity.kl_mean"), column_for(board, "perplexity.ppl"), column_for(
        board, "memory.bits_per_weight")
    memory_ratio = column_for(board, "memory.quantized_layer_bytes:ratio")
    # the paired speed-up (baseline timed in the same cell); records from before it: the ratio of two cells
    speedup = column_for(board, "latency.decode_speedup_b1") or column_for(board, "latency.decode_tok_s_b1:ratio")
    uses_kl = kl is not None and board[kl].notna().any()
    quality, quality_label = (kl, "KL divergence from FP32 (nats/token, mean)") if uses_kl else (ppl, "perplexity")
    for x, y, title, xlabel, ylabel, reference in (
        (bits, quality, f"{quality_label} vs bits per weight", "bits per weight (quantized layers)",
         quality_label, quality),
        ("memory saved (%)", speedup, "decode speed-up vs memory saved",
         f"memory saved vs {board.attrs.get('baseline') or 'FP16'} (%)",
         "decode speed-up vs FP16 (×, batch 1)", None),
    ):
        if x is None or y is None:
            continue
        data = board.copy()
        if memory_ratio is not None:
            data["memory saved (%)"] = [None if not _is_number(v) else round(100 * (1 - float(v)), 2)
                                        for v in data[memory_ratio]]
        points = _points(data, x, y)
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        has_bars = False
        models = sorted({p[0] for p in points})
        for model in models:
            mine = [p for p in points if p[0] == model]
            ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=model if len(models) > 1 else None, zorder=3)
            bars = [(p, _error_bar(data, y, model, p[1], p[3])) for p in mine]
            bars = [(p, bar) for p, bar in bars if bar is not None]
            if bars:
                has_bars = True
                ax.errorbar([p[2] for p, _ in bars], [p[3] for p, _ in bars], fmt="none", ecolor="black",
                            elinewidth=1, capsize=3, zorder=2,
                            yerr=[[bar[0] for _, bar in bars], [bar[1] for _, bar in bars]])
            for _, method, px, py in mine:
                ax.annotate(method, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
            base = baseline_row(data, model, board.attrs.get("baseline"))
            if reference is not None and base is not None and _is_number(base.get(reference)):
                ax.axhline(float(base[reference]), linestyle="--", color="gray", linewidth=1,
                           label=f"{base['method']} ({model})")
            elif reference is None:
                ax.axhline(1.0, linestyle="--", color="gray", linewidth=1, label="FP16 (1×)")
        if reference is None:
            ax.axvline(0.0, linestyle=":", color="gray", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title + ("\n(bars: 95% interval of the difference from the baseline)" if has_bars else ""),
                     fontsize=10 if has_bars else None)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if labels:
            # one legend entry per label (the FP16 line is drawn once per model)
            seen = {}
            for h, lab in zip(handles, labels):
                seen.setdefault(lab, h)
            ax.legend(seen.values(), seen.keys(), fontsize=8)
        figures.append((title, _png(fig)))
        plt.close(fig)
    return figures


def render_html(frame: pd.DataFrame, board: pd.DataFrame, context: list[str], claims: list[str] | None = None) -> str:
    try:
        figures = plots(board)
        if figures:
            plot_html = "".join(f"<img class='plot' alt='{html.escape(t)}' title='{html.escape(t)}' "
                                f"src='data:image/png;base64,{b64}'>" for t, b64 in figures)
        else:
            plot_html = "<p class='missing'>No plots: the run has no memory/perplexity/latency numbers to plot.</p>"
    except ImportError:
        plot_html = ("<p class='missing' id='no-plots'>Plots need matplotlib, which is not installed: "
                     "pip install 'qbench-quant[plots]'</p>")
    items = "".join(f"<li>{html.escape(line)}</li>" for line in context)
    claim_html = ""
    if claims:
        claim_html = "<h2>The notes' claims, as measured here</h2><ul>" + "".join(
            f"<li>{html.escape(c)}</li>" for c in claims) + "</ul>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>qbench leaderboard</title>"
        f"<style>{STYLE}</style></head><body><h1>qbench leaderboard</h1>"
        f"<div class='wide'>{table_html(board)}</div><p><small>Click a column header to sort.</small></p>"
        f"<h2>Plots</h2><div id='plots'>{plot_html}</div>"
        f"<h2>Context</h2><ul>{items}</ul>{claim_html}"
        f"<script>{SORT_JS}</script></body></html>\n"
    )
