"""Method ``int8-absmax``: symmetric absmax INT8 weights, optionally INT8 activations (W8A8).

Weights: ``q = round(w * 127 / absmax)`` in -127..127 per tensor, per output channel (row) or per
block of ``block_size`` input columns; scales are fp32 (4 bytes each), codes 1 byte each.

Activations (``activations=``):

* ``none`` (W8A16): the layer computes ``x @ (q * s).T`` in the activation dtype with the fused
  dequantize-matmul (GEMV at batch 1, GEMM otherwise).
* ``dynamic``: every token (row of the input) is absmax-quantized to int8 at run time, then an
  int8 x int8 -> int32 GEMM with both scales in the epilogue.
* ``static``: one activation absmax per layer fixed from calibration windows (``observer=max``:
  the largest |x| seen; ``observer=percentile``: the ``percentile``-th percentile of |x| in each
  window, averaged over the windows; ``observer=ema``: llm-compressor's default, the first window's
  min/max moved 1% toward each later window's), values beyond it clamp to ±127. Needs calibration data.

W8A8 needs one weight scale per row or per tensor (the scales go in the GEMM epilogue), so
``granularity=block`` is weight-only. On CPU the modules run ATen's kernels (:mod:`qbench.kernels._cpu`):
W8A16 ``torch._weight_int8pack_mm`` on the stored codes (bf16 activations, see
:mod:`qbench.kernels.cpu_int8`), W8A8 ``torch._int_mm`` (bit-identical to the reference, which sums
the integer products exactly); per-block scales and ``QBENCH_CPU_KERNEL=reference`` run the torch
references. ``kernel_path`` records which ran.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.method import Method, quantizable_linears, replace_linears
from qbench.params import Param, QBenchError
from qbench.quant.int8 import (
    ACTIVATIONS,
    GRANULARITIES,
    STATIC_RANGE_PARAMS,
    Int8AbsmaxLinear,
    check_static_range,
    observe_activation_absmax,
)


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


class Int8Absmax(Method):
    name = "int8-absmax"
    nominal_bits = 8  # the code width, for the notes' bytes-per-parameter table
    description = ("Symmetric absmax INT8 (LLM.int8()-style vector-wise quantization without outlier decomposition): "
                   "W8A16, or W8A8 with dynamic per-token or static calibrated activation scales")
    params = {
        "granularity": Param(str, "channel", "weight scales: one per tensor, per output channel, or per block",
                             choices=GRANULARITIES),
        "block_size": Param(int, 64, "input columns per block (granularity=block)", check=_positive),
        "activations": Param(str, "none", "none = W8A16; dynamic = per-token int8 at run time; "
                             "static = per-layer scale from calibration", choices=ACTIVATIONS),
        **STATIC_RANGE_PARAMS,
        "nsamples": Param(int, 16, "calibration windows (activations=static)", check=_positive),
        "seqlen": Param(int, 512, "tokens per calibration window (activations=static)", check=_positive),
        "seed": Param(int, 0, "seed of the calibration windows (activations=static)"),
    }

    @property
    def needs_calibration(self) -> bool:
        return self.values["activations"] == "static"  # only static activation scales need data

    def check(self, values: dict[str, Any]) -> str | None:
        if values["granularity"] == "block" and values["activations"] != "none":
            return ("granularity=block is weight-only (W8A8 applies weight scales in the int32 GEMM epilogue); "
                    "use granularity=channel or tensor with activations=dynamic/static")
        if why := check_static_range(values):
            return why
        if values["seed"] != 0 and values["activations"] != "static":
            return "seed picks the calibration windows of activations=static; other settings draw nothing"
        return None

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        act_absmax: dict[str, torch.Tensor] = {}
        if v["activations"] == "static":
            if calibration is None:
                raise QBenchError("int8-absmax with activations=static needs calibration data")
            windows = calibration.sample(v["nsamples"], v["seqlen"], v["seed"])
            names = [name for name, _ in quantizable_linears(model)]
            act_absmax = observe_activation_absmax(model, windows, names, v["observer"], v["percentile"])

        def make(name, linear):
            return Int8AbsmaxLinear.from_linear(linear, v["granularity"], v["block_size"], v["activations"],
                                                act_absmax.get(name))

        return replace_linears(model, make)


@hookimpl
def register_methods(register):
    register(Int8Absmax)
