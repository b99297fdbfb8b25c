"""Speed of the absmax INT8 and affine kernels against FP16 torch matmul of the same shape, same run.

Run on a GPU: ``pytest tests/benchmarks/bench_int8_affine.py --benchmark-only`` (skips without
CUDA). Each case records in ``extra_info``: the device, the FP16 time, ``speedup_vs_fp16`` (> 1 is
faster) and the effective memory bandwidth in GB/s (stored weight bytes + activations in + out,
over the kernel time).
"""
import pytest
import torch

from qbench.kernels import absmax, affine
from qbench.kernels.dequant_matmul import affine_weight_matmul, int8_weight_matmul
from qbench.kernels.int8_matmul import int8_matmul
from tests.benchmarks.cuda_timer import cuda_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]  # (out_features, in_features): issue 13's shapes
BATCHES = [1, 16, 128]
AFFINE = [(4, 128)]  # (bits, group_size): the issue-13 target (the grouped GEMV at batch 1)
W8A8_BATCHES = [1, 16, 128, 256, 1024]  # issue 13's W8A8 target is at batch >= 256


_cuda_time = cuda_seconds


def _record(benchmark, fn, fp16_fn, moved_bytes):
    fp16_s = _cuda_time(fp16_fn)
    ours_s = _cuda_time(fn)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "fp16_ms": fp16_s * 1e3, "kernel_ms": ours_s * 1e3,
        "speedup_vs_fp16": fp16_s / ours_s, "effective_GBps": moved_bytes / ours_s / 1e9,
    })
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return {s: torch.randn(*s, device="cuda", dtype=torch.float16) * 0.02 for s in SHAPES}


def _ids(s):
    return f"{s[0]}x{s[1]}"


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_w8a16_dequant_matmul(benchmark, weights, shape, batch):
    w = weights[shape]
    codes, scale = absmax.quantize(w, dim=-1)
    scale = scale.reshape(-1)
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)
    moved = codes.numel() + scale.numel() * 4 + x.numel() * 2 + batch * shape[0] * 2
    _record(benchmark, lambda: int8_weight_matmul(x, codes, scale), lambda: x @ w.t(), moved)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bits,group_size", AFFINE, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_affine_dequant_matmul(benchmark, weights, shape, bits, group_size, batch):
    w = weights[shape]
    codes, scales, zeros = affine.quantize(w, bits, group_size)
    packed, zeros_packed, scales16 = affine.pack_codes(codes, bits), affine.pack_codes(zeros, bits), scales.half()
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)
    moved = packed.numel() + zeros_packed.numel() + scales16.numel() * 2 + x.numel() * 2 + batch * shape[0] * 2
    _record(benchmark, lambda: affine_weight_matmul(x, packed, scales16, zeros_packed, bits, group_size, shape[1]),
            lambda: x @ w.t(), moved)


@pytest.mark.parametrize("batch", W8A8_BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_w8a8_dynamic(benchmark, weights, shape, batch):
    """Per-token activation quantization + int8 GEMM, as the dynamic W8A8 layer runs them."""
    w = weights[shape]
    codes, scale = absmax.quantize(w, dim=-1)
    scale = scale.reshape(-1)
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)

    def run():
        xq, xs = absmax.quantize_rows(x)
        return int8_matmul(xq, xs, codes, scale, None, torch.float16)

    moved = codes.numel() + scale.numel() * 4 + x.numel() * 3 + batch * shape[0] * 2
    _record(benchmark, run, lambda: x @ w.t(), moved)


@pytest.mark.parametrize("batch", W8A8_BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_int8_gemm_only(benchmark, weights, shape, batch):
    w = weights[shape]
    codes, scale = absmax.quantize(w, dim=-1)
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)
    xq, xs = absmax.quantize_rows(x)
    moved = codes.numel() + xq.numel() + batch * shape[0] * 2
    _record(benchmark, lambda: int8_matmul(xq, xs, codes, scale.reshape(-1), None, torch.float16),
            lambda: x @ w.t(), moved)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_quantize_kernels(benchmark, weights, shape):
    """Weight quantization (one-off) and per-token activation quantization, vs an FP16 copy."""
    w = weights[shape]
    moved = w.numel() * 2 + w.numel() + shape[0] * 4
    _record(benchmark, lambda: absmax.quantize_rows(w), lambda: w.clone(), moved)
