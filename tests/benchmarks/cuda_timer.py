"""The one CUDA-event timer every benchmark module uses.

Each timed call starts with a cold L2: a decode step reads every layer's weights once, from HBM,
and a Llama-shaped layer (8-32 MB packed, 32-117 MB in FP16) would otherwise sit in the H200's
50 MB L2 between back-to-back calls and report bandwidth no model run ever sees. FP16 and the
kernel under test are timed the same way, so their ratio compares like with like.
"""
import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times any current GPU's L2 (H100/H200: 50 MB)


def cuda_seconds(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median seconds of one call of ``fn``, CUDA events around each call, L2 flushed before each."""
    for _ in range(warmup):
        fn()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return times[len(times) // 2] / 1000
