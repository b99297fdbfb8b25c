"""Speed of the NF4 kernels against FP16 torch matmul of the same shape, measured in the same run.

Run on a GPU: ``pytest tests/benchmarks/bench_nf4.py --benchmark-only`` (skips without CUDA).
Each case records in ``extra_info``: the FP16 time, ``speedup_vs_fp16`` (> 1 is faster) and the
effective memory bandwidth in GB/s (bytes of packed weight + quant state + activations moved,
over the kernel time). The target on an H100: >= 3.5x FP16 at batch 1 (>= 80% of bandwidth).
"""
import pytest
import torch

from qbench.kernels.nf4 import dequantize_nf4, quantize_nf4
from qbench.kernels.nf4_matmul import GEMV_MAX_ROWS, nf4_matmul, nf4_matmul_grad_input
from tests.benchmarks.cuda_timer import cuda_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]  # (out_features, in_features): issue 13's shapes
BATCHES = [1, 16, 128]


_cuda_time = cuda_seconds


@pytest.fixture(scope="module")
def layers():
    out = {}
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        out[(n, k)] = (w, quantize_nf4(w, 64, True, "nf4"))
    return out


def _record(benchmark, fn, fp16_fn, moved_bytes):
    fp16_s = _cuda_time(fp16_fn)
    ours_s = _cuda_time(fn)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "fp16_ms": fp16_s * 1e3, "nf4_ms": ours_s * 1e3,
        "speedup_vs_fp16": fp16_s / ours_s, "effective_GBps": moved_bytes / ours_s / 1e9,
    })
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("gemm", ["default", "fused"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward(benchmark, layers, shape, batch, gemm, monkeypatch):
    """``default``: what nf4_matmul does (above GEMV_MAX_ROWS in fp16, dequantize + torch matmul);
    ``fused``: the fused GEMM kernel (QBENCH_CUDA_GEMM=fused), for the rows where they differ."""
    if gemm == "fused" and batch <= GEMV_MAX_ROWS:
        pytest.skip("one path below GEMV_MAX_ROWS")
    monkeypatch.setenv("QBENCH_CUDA_GEMM", "fused" if gemm == "fused" else "dequant")
    w, q = layers[shape]
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)
    moved = q.storage_bytes() + x.numel() * 2 + batch * shape[0] * 2
    _record(benchmark, lambda: nf4_matmul(x, q), lambda: x @ w.t(), moved)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grad_input(benchmark, layers, shape, batch):
    w, q = layers[shape]
    g = torch.randn(batch, shape[0], device="cuda", dtype=torch.float16)
    moved = q.storage_bytes() + g.numel() * 2 + batch * shape[1] * 2
    _record(benchmark, lambda: nf4_matmul_grad_input(g, q), lambda: g @ w, moved)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize(benchmark, layers, shape):
    w, q = layers[shape]
    moved = q.storage_bytes() + w.numel() * 2
    _record(benchmark, lambda: dequantize_nf4(q, torch.float16), lambda: w.clone(), moved)
