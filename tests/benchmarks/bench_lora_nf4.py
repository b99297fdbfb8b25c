"""Speed of the fused LoRA + NF4 kernel against FP16 torch of the same shape, in the same run,
and the peak GPU memory the paged AdamW saves.

Run on a GPU: ``pytest tests/benchmarks/bench_lora_nf4.py --benchmark-only`` (skips without CUDA).
``extra_info`` holds the FP16 time (``x @ W.T + s * (x @ A.T) @ B.T`` with fp16 W and fp32 adapters,
torch), ``speedup_vs_fp16`` (> 1 is faster) and effective GB/s (packed weight + quant state +
adapters + activations moved, over the kernel time).
"""
import pytest
import torch

from qbench.kernels.lora_nf4 import lora_nf4_linear
from qbench.kernels.nf4 import quantize_nf4
from tests.benchmarks.cuda_timer import cuda_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features), Llama-7B-like
BATCHES = [1, 16, 128]
RANK = 64


def _cuda_time(fn, iters=30, warmup=5) -> float:
    return cuda_seconds(fn, iters, warmup)


@pytest.fixture(scope="module")
def layers():
    out = {}
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        a = torch.randn(RANK, k, device="cuda") * 0.01
        b = torch.randn(n, RANK, device="cuda") * 0.01
        out[(n, k)] = (w, quantize_nf4(w, 64, True, "nf4"), a, b)
    return out


def _torch_lora(x, w, a, b, s):
    return x @ w.t() + ((x.float() @ a.t()) @ b.t() * s).to(x.dtype)


def _record(benchmark, fn, fp16_fn, moved):
    fp16_s, ours_s = _cuda_time(fp16_fn), _cuda_time(fn)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(), "fp16_ms": fp16_s * 1e3, "ours_ms": ours_s * 1e3,
        "speedup_vs_fp16": fp16_s / ours_s, "effective_GBps": moved / ours_s / 1e9,
    })
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward(benchmark, layers, shape, batch):
    w, q, a, b = layers[shape]
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16)
    moved = q.storage_bytes() + (a.numel() + b.numel()) * 4 + x.numel() * 2 + batch * shape[0] * 2
    _record(benchmark, lambda: lora_nf4_linear(x, q, a, b, 0.25), lambda: _torch_lora(x, w, a, b, 0.25), moved)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_backward(benchmark, layers, shape, batch):
    w, q, a, b = layers[shape]
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    x = torch.randn(batch, shape[1], device="cuda", dtype=torch.float16, requires_grad=True)
    dy = torch.randn(batch, shape[0], device="cuda", dtype=torch.float16)

    def ours():
        lora_nf4_linear(x, q, a, b, 0.25).backward(dy)

    def fp16():
        _torch_lora(x, w, a, b, 0.25).backward(dy)
    moved = 2 * q.storage_bytes() + 3 * (a.numel() + b.numel()) * 4 + 2 * x.numel() * 2 + 2 * batch * shape[0] * 2
    _record(benchmark, ours, fp16, moved)


@pytest.mark.parametrize("optimizer", ["adamw", "paged", "bnb-paged"])
def test_paged_optimizer_peak_memory(benchmark, optimizer):
    """Peak GPU memory of one optimizer step on 256 Mi fp16 parameters (state: 2 GiB fp32)."""
    from qbench.params import QBenchError
    from qbench.train.paged_adamw import make_optimizer

    params = [torch.zeros(1 << 24, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(16)]
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        opt = make_optimizer(optimizer, params, lr=1e-4)
    except QBenchError as exc:
        pytest.skip(str(exc))
    opt.step()  # the state exists from here on
    torch.cuda.synchronize()
    base = sum(p.numel() * p.element_size() * 2 for p in params)  # params + grads
    torch.cuda.reset_peak_memory_stats()
    seconds = _cuda_time(opt.step, iters=3, warmup=0)
    benchmark.extra_info.update({"optimizer": optimizer, "step_ms": seconds * 1e3,
                                 "peak_above_params_and_grads_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20})
    benchmark.pedantic(lambda: (opt.step(), torch.cuda.synchronize()), rounds=2)
