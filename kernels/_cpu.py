"""When the quantized modules run a packed CPU kernel instead of their torch reference.

On a CPU the reference path of every method dequantizes the whole layer on every call, then runs
an fp32 matmul: correct, and the oracle the tests compare against, but slower than the fp16
baseline. The ``cpu_*`` kernel modules compute from the packed weights instead (ATen's int8 and
int4 weight-only kernels, ``torch._int_mm``, our NF4 kernel). A module takes that path when

* the input is a CPU tensor,
* no gradient is needed through the layer (the packed kernels have no backward; QLoRA-style
  training keeps the differentiable reference path), and
* ``QBENCH_CPU_KERNEL`` is ``auto`` (the default); ``reference`` forces the reference path, so
  the oracle stays one environment variable away: ``QBENCH_CPU_KERNEL=reference qbench run ...``.

Suites that measure a model's quality (perplexity, fidelity, accuracy) compare it with a baseline
computed in fp32 on a CPU; a kernel that rounds activations to bf16 would add its own error to the
method's (up to 0.5% of perplexity on the demo model, as large as INT8's own). They run under
:func:`fp32_arithmetic`, where only paths with the reference's fp32 arithmetic are taken: W8A8's
integer matmul (bit-identical), NF4's fp32 kernels; the others run the reference.

Each module records what ran in ``kernel_path`` (``cpu:int8pack-bf16``, ``cpu:int4pack-bf16``,
``cpu:int_mm``, ``cpu:nf4-avx512``, ``reference``...), which lands in the record's ``kernel_paths``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from qbench.params import QBenchError

CPU_KERNEL_ENV = "QBENCH_CPU_KERNEL"
CPU_KERNEL_MODES = ("auto", "reference")


def cpu_kernel_mode() -> str:
    """``auto`` or ``reference``, from ``$QBENCH_CPU_KERNEL`` (read on every call, so tests and
    users can switch it at any time)."""
    mode = os.environ.get(CPU_KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in CPU_KERNEL_MODES:
        raise QBenchError(f"{CPU_KERNEL_ENV}={mode!r} is not valid; valid values: " + ", ".join(CPU_KERNEL_MODES))
    return mode


def cpu_kernels_wanted(device: torch.device | str) -> bool:
    """True when modules on ``device`` should prepare packed CPU kernels (at load or quantize time)."""
    return torch.device(device).type == "cpu" and cpu_kernel_mode() == "auto"


_state = threading.local()


@contextlib.contextmanager
def fp32_arithmetic():
    """Within this block, CPU kernels that round to bf16 are not used (see the module docstring)."""
    previous = getattr(_state, "fp32", False)
    _state.fp32 = True
    try:
        yield
    finally:
        _state.fp32 = previous


def fp32_only() -> bool:
    return getattr(_state, "fp32", False)


def use_cpu_kernel(x: torch.Tensor, fp32: bool = False) -> bool:
    """True where a module should run its packed CPU kernel on the input ``x``; ``fp32``: the kernel
    keeps the reference's fp32 arithmetic (so it also runs under :func:`fp32_arithmetic`)."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if fp32_only() and not fp32:
        return False
    return cpu_kernel_mode() == "auto"


def bf16_gemm_fast() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX), so oneDNN's bf16 GEMM is several times
    faster than an fp32 one: the compute-bound (prefill) paths decode the weight once per call and
    use it. Elsewhere bf16 is emulated and those paths stay on the packed kernels or fp32."""
    return not fp32_only() and _native_bf16()


@functools.cache
def _native_bf16() -> bool:
    """The hardware probe, once per process (bf16_gemm_fast is asked per layer and call)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
