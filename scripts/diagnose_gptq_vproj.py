"""Why 4-bit GPTQ (act_order=false) barely beats round-to-nearest on the demo model.

Loads the demo model, quantizes it with ``gptq:bits=4,group_size=128`` (or takes it from the
quantized-model cache a `qbench run` filled) and with RTN on the same symmetric min-max grid, then

1. perplexity with GPTQ weights in every layer, in every layer but ``v_proj`` (RTN there), and
   in ``v_proj`` only (RTN elsewhere);
2. for each ``v_proj``: the output error ``‖(W − Ŵ)x‖²`` of GPTQ over RTN at the window's first
   token (the attention sink every later token attends to) and over all other tokens.

Run: ``python scripts/diagnose_gptq_vproj.py --windows 2 -o results/gptq-vproj-diagnosis-cpu.md``
(QBENCH_DATA_DIR pointing at the data; about 5 minutes on 2 cores with a warm cache).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from qbench import host
from qbench.cache import quantize_cached
from qbench.data import Calibration, encode, load_text
from qbench.method import quantizable_linears, quantized_modules
from qbench.models import DEMO_MODEL, load_model
from qbench.quant.gptq import rtn_dequantize
from qbench.records import environment


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nlls = [F.cross_entropy(model(w[None]).logits[0, :-1].float(), w[1:]).item() for w in windows]
    return math.exp(sum(nlls) / len(nlls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows of 2048 tokens")
    parser.add_argument("-o", "--output", default=None, help="write the markdown here (else stdout)")
    args = parser.parse_args()
    started = time.time()

    base = load_model(DEMO_MODEL)
    model, tokenizer = base.model, base.tokenizer
    ids = encode(tokenizer, load_text("wikitext2", "test").text())
    windows = ids[: args.windows * 2048].view(args.windows, 2048)
    original = {n: linear.weight.detach().clone() for n, linear in quantizable_linears(model)}
    rtn = {n: rtn_dequantize(w, 4, 128, True) for n, w in original.items()}

    method = host.make_method("gptq", {"bits": 4, "group_size": 128})
    fresh = load_model(DEMO_MODEL)
    quantized, info = quantize_cached(method, fresh.model, fresh.info, torch.float32, torch.device("cpu"),
                                      lambda: Calibration(tokenizer, load_text("c4")))  # the same tokenizer
    gptq = {n: m.dequantized_weight() for n, m in quantized_modules(quantized)}
    del quantized, fresh

    def with_weights(choose) -> float:
        for name, linear in quantizable_linears(model):
            linear.weight.data = choose(name)
        return perplexity(model, windows)

    rows = [("fp32 (no quantization)", with_weights(lambda n: original[n])),
            ("RTN everywhere", with_weights(lambda n: rtn[n])),
            ("GPTQ everywhere", with_weights(lambda n: gptq[n])),
            ("GPTQ everywhere but v_proj (RTN there)",
             with_weights(lambda n: rtn[n] if n.endswith("v_proj") else gptq[n])),
            ("GPTQ in v_proj only (RTN elsewhere)",
             with_weights(lambda n: gptq[n] if n.endswith("v_proj") else rtn[n]))]

    # output errors on the fp32 model's own inputs (first window): every layer, then v_proj per token
    for name, linear in quantizable_linears(model):
        linear.weight.data = original[name]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [linear.register_forward_pre_hook(lambda m, a, _n=n: inputs.__setitem__(_n, a[0][0].detach()))
             for n, linear in quantizable_linears(model)]
    with torch.no_grad():
        model(windows[:1])
    for hook in hooks:
        hook.remove()
    layer_ratio = {}
    for name, x in inputs.items():
        layer_ratio[name] = float(((x @ (original[name] - gptq[name]).t()) ** 2).sum()
                                  / ((x @ (original[name] - rtn[name]).t()) ** 2).sum())
    first, rest = [], []
    for name, x in ((n, x) for n, x in inputs.items() if n.endswith("v_proj")):
        err_gptq = ((x @ (original[name] - gptq[name]).t()) ** 2).sum(1)
        err_rtn = ((x @ (original[name] - rtn[name]).t()) ** 2).sum(1)
        first.append(float(err_gptq[0] / err_rtn[0]))
        rest.append(float(err_gptq[1:].sum() / err_rtn[1:].sum()))

    env = environment("cpu")
    lines = [f"| weights | ppl (first {args.windows} WikiText-2 test windows of 2048) |", "|:--|--:|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in rows]
    worse = sorted(n for n, r in layer_ratio.items() if r > 1)
    lines += ["", f"Output error ‖(W − Ŵ)x‖², GPTQ / RTN, per layer on the first window (fp32 inputs): median "
              f"{statistics.median(layer_ratio.values()):.2f}; GPTQ below RTN on {len(layer_ratio) - len(worse)} of "
              f"{len(layer_ratio)} layers" + (f" (above: {', '.join(worse)})" if worse else "") + ".",
              "", f"v_proj output error, GPTQ / RTN, over the {len(first)} layers (first window, fp32 inputs):", "",
              "| tokens | median | min | max |", "|:--|--:|--:|--:|",
              f"| first token of the window | {statistics.median(first):.2f} | {min(first):.2f} | {max(first):.2f} |",
              f"| all other tokens | {statistics.median(rest):.2f} | {min(rest):.2f} | {max(rest):.2f} |", "",
              f"- command: `python scripts/diagnose_gptq_vproj.py --windows {args.windows}`",
              f"- GPTQ: gptq:bits=4,group_size=128 (act_order=false), calibration {info.get('calibration')}, "
              f"from cache: {info.get('from_cache')}",
              "- RTN: the same symmetric min-max grid, groups of 128 (4x128 + 64 per 576-wide row)",
              f"- versions: torch {env['torch']}, transformers {env['transformers']}; qbench commit "
              f"{env['git'].get('commit', '?')[:10]}{' (dirty)' if env['git'].get('dirty') else ''}; "
              f"device {env['device']}",
              f"- took {time.time() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
