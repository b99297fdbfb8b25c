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

Each module records what ran in ``kernel_path`` (``cpu:int8pack-bf16``, ``cpu:int4pack-bf16``,
``cpu:int_mm``, ``cpu:nf4-avx512``, ``reference``...), which lands in the record's ``kernel_paths``.
"""
from __future__ import annotations

import os

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


def use_cpu_kernel(x: torch.Tensor) -> bool:
    """True where a module should run its packed CPU kernel on the input ``x``."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return cpu_kernel_mode() == "auto"


def bf16_gemm_fast() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX), so oneDNN's bf16 GEMM is several times
    faster than an fp32 one: the compute-bound (prefill) paths decode the weight once per call and
    use it. Elsewhere bf16 is emulated and those paths stay on the packed kernels or fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
