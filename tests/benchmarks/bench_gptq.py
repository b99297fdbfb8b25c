"""Speed of the GPTQ dequantize-matmul against FP16 torch matmul of the same shape, same run.

Run on a CUDA machine: ``python -m pytest tests/benchmarks/bench_gptq.py --benchmark-only``.
Each case records in ``extra_info``: both times (ms), the ratio fp16/gptq (>1: GPTQ faster) and the
effective memory bandwidth of the GPTQ kernel (packed weight + zeros + scales + g_idx + x + y bytes).
"""
import pytest
import torch

from qbench.kernels.gptq_matmul import gptq_matmul
from qbench.kernels.gptq_pack import pack_gptq
from tests.benchmarks.cuda_timer import cuda_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (in_features, out_features): issue 13's shapes


def _cuda_ms(fn, iters=50, warmup=10) -> float:
    return 1000 * cuda_seconds(fn, iters, warmup)


def _layer(K, N, bits, group_size, act_order):
    gen = torch.Generator().manual_seed(0)
    G = (K + group_size - 1) // group_size
    codes = torch.randint(0, 2**bits, (K, N), generator=gen)
    zeros = torch.full((G, N), 2 ** (bits - 1))
    scales = torch.rand(G, N, generator=gen) * 0.01
    g_idx = torch.arange(K) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    return {k: v.cuda() for k, v in pack_gptq(codes, scales, zeros, g_idx, bits).items()}


@pytest.mark.parametrize("batch", [1, 16, 128])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_gptq_matmul_vs_fp16(benchmark, K, N, batch, bits, act_order):
    packed = _layer(K, N, bits, 128, act_order)
    x = torch.randn(batch, K, device="cuda", dtype=torch.float16)
    weight = torch.randn(K, N, device="cuda", dtype=torch.float16)

    def run():
        return gptq_matmul(x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)

    run()  # autotune outside the timings
    fp16_ms = _cuda_ms(lambda: x @ weight)
    gptq_ms = _cuda_ms(run)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=20, iterations=5, warmup_rounds=2)
    moved = sum(t.numel() * t.element_size() for t in packed.values()) + x.numel() * 2 + batch * N * 2
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(),
        "shape": f"{batch}x{K}x{N}", "bits": bits, "act_order": act_order,
        "fp16_ms": round(fp16_ms, 4), "gptq_ms": round(gptq_ms, 4),
        "speedup_vs_fp16": round(fp16_ms / gptq_ms, 3),
        "gptq_GBps": round(moved / gptq_ms / 1e6, 1),
        "fp16_GBps": round((K * N * 2 + x.numel() * 2 + batch * N * 2) / fp16_ms / 1e6, 1),
    })
