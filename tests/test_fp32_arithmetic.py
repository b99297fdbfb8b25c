"""Suites that compare a model's quality with the baseline (perplexity, fidelity, accuracy) run on
a CPU under ``fp32_arithmetic``: only kernels with the reference's fp32 arithmetic are taken, so
their numbers are the method's, not a kernel's bf16 rounding (tests/test_cpu_kernels_demo.py
measures that rounding: up to ~0.5% of a window's perplexity)."""
import copy

import pytest
import torch

from qbench import host
from qbench.kernels._cpu import CPU_KERNEL_ENV, fp32_arithmetic
from qbench.method import quantized_modules
from qbench.suite import Suite

CASES = [("int8-absmax", {}), ("int8-absmax", {"activations": "dynamic"}), ("affine", {"bits": 4, "group_size": 32}),
         ("nf4", {})]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
@pytest.mark.parametrize("rows", [3, 40])  # decode-sized and prefill-sized inputs
def test_fp32_arithmetic_gives_the_reference_logits(tiny_model, monkeypatch, name, params, rows):
    model = host.make_method(name, params).quantize(copy.deepcopy(tiny_model)).eval()
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fp32_arithmetic():
        fast = model(ids).logits
    paths = {m.kernel_path for _, m in quantized_modules(model)}
    assert not any("bf16" in p for p in paths), paths
    monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
    with torch.no_grad():
        oracle = model(ids).logits
    assert {m.kernel_path for _, m in quantized_modules(model)} == {"reference"}
    if "cpu:nf4-avx512" in paths:  # fp32 dot products in another order: fp32 rounding only
        torch.testing.assert_close(fast, oracle, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fast, oracle)


def test_fp32_arithmetic_ends_with_its_block():
    from qbench.kernels._cpu import fp32_only

    with fp32_arithmetic():
        assert fp32_only()
    assert not fp32_only()


def test_quality_suites_ask_for_fp32_arithmetic():
    suites = host.suites()
    assert all(suites[name].fp32_arithmetic for name in ("perplexity", "fidelity", "accuracy"))
    assert not suites["latency"].fp32_arithmetic and not Suite.fp32_arithmetic
