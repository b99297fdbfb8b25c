"""The one CUDA-event timer every benchmark module uses."""
import torch


def cuda_seconds(fn, iters: int = 50, warmup: int = 10) -> float:
    """Mean seconds per call of ``fn``, timed with CUDA events after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters
