"""One memory tracker for every measurement: the memory suite, the checkpointing suite and training
(as optimum-benchmark has one tracker for every scenario).

* :class:`PeakMemory`: the peak while a ``with`` block runs, reset when it starts. CUDA: the caching
  allocator's max allocated and max reserved bytes. CPU: the process's peak resident set (VmHWM),
  reset through ``/proc/self/clear_refs``; or, with ``cpu="allocator"``, the peak of torch's own
  live allocations from torch.profiler's memory events (what the tensors need, without the process
  around them).
* :class:`SavedTensorMeter`: the peak bytes of tensors saved for backward during a training step,
  recomputed ones (gradient checkpointing) included — exact and device-independent.
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

CPU_MODES = ("rss", "allocator")


def reset_rss_peak() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM...) in bytes, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory on ``device`` while the ``with`` block runs, reset when it starts.

    After the block: ``peak`` (bytes, None where the platform cannot tell), ``start`` (the same
    measure when the block began), ``rise`` (``peak - start``: what the block itself added; None on
    CPU when the peak could not be reset, since it then carries the process's history),
    ``peak_reserved`` (CUDA: the caching allocator's reserved bytes) and ``kind`` (what was
    measured, for the record).
    """

    def __init__(self, device: torch.device | str, cpu: str = "rss"):
        if cpu not in CPU_MODES:
            raise ValueError(f"PeakMemory: cpu must be one of {CPU_MODES}, not {cpu!r}")
        self.device = torch.device(device)
        self.cpu = cpu
        self.peak: int | None = None
        self.start: int | None = None
        self.peak_reserved: int | None = None
        self.reset = True
        self._profiler = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kind(self) -> str:
        if self.is_cuda:
            return "cuda max allocated"
        if self.cpu == "allocator":
            return "torch.profiler CPU allocations"
        return "process peak RSS (VmHWM)" + ("" if self.reset else ", not reset: includes the process's history")

    @property
    def rise(self) -> int | None:
        if self.peak is None or self.start is None or not self.reset:
            return None
        return self.peak - self.start

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = int(torch.cuda.memory_allocated(self.device))
        elif self.cpu == "allocator":
            from torch.profiler import ProfilerActivity, profile

            self.start = 0  # the profiler sees only what happens inside the block
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        else:
            self.reset = reset_rss_peak()
            self.start = process_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_reserved = int(torch.cuda.max_memory_reserved(self.device))
        elif self._profiler is not None:
            self._profiler.__exit__(*exc)
            if exc[0] is None:
                self.peak = _live_peak(self._profiler)
        else:
            self.peak = process_status_bytes("VmHWM")


def _live_peak(prof) -> int:
    """The peak of live bytes over torch.profiler's memory events (allocations minus frees, in time order)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


# --------------------------------------------------------------------------- saved-tensor meter


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return (str(storage.device), storage.data_ptr()), storage.nbytes()
    except Exception:  # tensor subclasses without a plain storage: count their own bytes
        return ("object", id(t)), t.numel() * t.element_size()


class _Packed:
    """What the outer hook stores instead of the tensor; its death releases the bytes."""

    __slots__ = ("tensor", "key", "meter", "__weakref__")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Peak live bytes of tensors saved for backward, recomputed ones included.

    ``with meter.measure(): <forward + backward>`` leaves ``peak``: the peak over forward *and*
    backward of the live bytes of tensors saved for backward, deduplicated by storage, the model's
    parameters and buffers excluded. An outer ``torch.autograd.graph.saved_tensors_hooks`` sees what
    the ordinary graph saves (with checkpointing: the inputs of each checkpointed block). Inside a
    checkpointed block ``torch.utils.checkpoint`` installs its own hooks, so the outer hook never
    sees the tensors the backward *recomputes*; they are counted by wrapping the pack hook of
    checkpoint's ``_recomputation_hook`` (the context it pushes while recomputing): each recomputed
    tensor counts from its recomputation until it is freed after use (``recomputed_tensors``).
    ``recompute_hooked`` is False if a future torch renames that class (the recompute is then not
    counted). Weight *copies* made in the forward (a dequantized weight kept for backward, 16-bit
    weights upcast for CPU compute) are not parameters: they count, because the step holds them.
    """

    def __init__(self, model: nn.Module):
        self.excluded = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers()) if t is not None}
        self.counts: dict[Any, list[int]] = {}
        self.live = self.peak = 0
        self.recomputed_tensors = 0
        self.recompute_hooked = False
        self.active = False

    def _add(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor):
            return None
        key, nbytes = _storage_key(t)
        if key in self.excluded or nbytes == 0:
            return None
        entry = self.counts.get(key)
        if entry is None:
            self.counts[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        return key

    def _release(self, key) -> None:
        entry = self.counts.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.counts[key]

    def _pack(self, t):
        key = self._add(t)
        return t if key is None else _Packed(t, key, self)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Packed) else obj

    def _track_recomputed(self, x) -> None:
        key = self._add(x)
        if key is not None:
            self.recomputed_tensors += 1
            weakref.finalize(x, self._release, key)

    @contextmanager
    def measure(self):
        with self._recompute_patch(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @contextmanager
    def _recompute_patch(self):
        import torch.utils.checkpoint as ckpt

        original = getattr(ckpt, "_recomputation_hook", None)
        if original is None or not isinstance(original, type):
            yield
            return
        meter = self

        class _CountingRecomputationHook(original):
            def __init__(self, target_frame_ref, gid, *args, **kwargs):
                super().__init__(target_frame_ref, gid, *args, **kwargs)
                inner = self.pack_hook

                def pack_hook(x):
                    # The last recomputed tensor is stored and then _StopRecomputationError raised
                    # (early stop), so find what was stored through the frame, not the return value.
                    frame = target_frame_ref()
                    index = frame.recomp_counter[gid]
                    try:
                        return inner(x)
                    finally:
                        meter._track_recomputed(_stored_recomputed(frame, gid, index))
                self.pack_hook = pack_hook

        ckpt._recomputation_hook = _CountingRecomputationHook
        self.recompute_hooked = True
        try:
            yield
        finally:
            ckpt._recomputation_hook = original


def _stored_recomputed(frame, gid, index):
    """The tensor checkpoint's recomputation hook just stored for saved-tensor ``index``."""
    if index >= len(frame.weak_holders):
        return None
    holder = frame.weak_holders[index]()
    handle = None if holder is None else holder.handles.get(gid)
    return None if handle is None else frame.recomputed[gid].get(handle)
