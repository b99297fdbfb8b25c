"""bitsandbytes as a qbench peer: ``bnb-nf4``, ``bnb-fp4`` and ``bnb-int8``.

A third-party plugin package (``pip install plugins/peers/qbench_bnb``), found by qbench through
its ``qbench`` entry point. Every number comes from bitsandbytes' own code: weights are quantized
with ``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant`` and multiplied with
``bitsandbytes.matmul_4bit`` / ``bitsandbytes.matmul`` (LLM.int8(), with its outlier threshold).
The modules keep exactly the tensors bitsandbytes serializes for a ``Linear4bit`` /
``Linear8bitLt`` layer (packed codes, absmax, code books, nested state, row scales, bias), so the
memory suite counts what bitsandbytes stores.

The methods register only when bitsandbytes imports. Where it cannot run on the cell's device
(no native library for that device), ``quantize`` raises a QBenchError saying so.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import torch
from torch import nn

import qbench
from qbench.dtypes import dtype_name, dtype_of
from qbench.method import Method, QuantizedLinear, replace_linears
from qbench.params import Param, QBenchError, QBenchSkip

# bitsandbytes prints its optional-kernel misses ("Failed to load CPU gemm_4bit_forward from
# kernels-community ...") to stderr when imported, which would land in every qbench command, an
# error line included; what it printed is kept here instead.
_import_output = io.StringIO()
try:
    with contextlib.redirect_stderr(_import_output), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
except Exception as exc:  # not installed, or its native library does not load
    bnb = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None
IMPORT_OUTPUT = _import_output.getvalue().strip()

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
KERNEL_PATH = "bitsandbytes"


def check_device(device: torch.device, method: str) -> None:
    """Run a tiny quantize/dequantize on ``device`` with bitsandbytes; a clear error if it cannot."""
    if bnb is None:
        raise QBenchSkip(f"method {method} needs bitsandbytes, which does not import here ({IMPORT_ERROR}); "
                          f"pip install 'bitsandbytes>=0.50'")
    try:
        probe = torch.ones(4, 64, device=device)
        packed, state = bnbf.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QBenchSkip(f"method {method}: bitsandbytes {bnb.__version__} cannot run on {device} ({first}); "
                          f"use our own methods there, or a device bitsandbytes supports") from None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Bnb4bitLinear(QuantizedLinear):
    """A 4-bit (NF4 or FP4) layer in bitsandbytes' own format, multiplied by ``bnb.matmul_4bit``."""

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in state.shape)
        self.state = state  # bitsandbytes.functional.QuantState
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel_path = "none"

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int, double_quant: bool, quant_type: str) -> "Bnb4bitLinear":
        weight = linear.weight.detach()
        packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type=quant_type)
        # bitsandbytes hands every layer the same cached nested code book; each layer serializes its
        # own copy (and safetensors refuses tensors that share memory), so own one here too.
        state.code = state.code.clone()
        if state.nested:
            state.state2.code = state.state2.code.clone()
        return cls(packed, state, linear.bias)

    def _apply(self, fn, *args, **kwargs):
        # Keep the quant state's tensors on the module's device when the model is moved.
        super()._apply(fn, *args, **kwargs)
        self.state.to(self.packed.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = KERNEL_PATH
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.state, bias=bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        # What bitsandbytes serializes for a Linear4bit layer (QuantState.as_dict), plus the codes.
        s = self.state
        tensors = {"packed": self.packed, "absmax": s.absmax, "quant_map": s.code}
        if s.nested:
            tensors.update({"nested_absmax": s.state2.absmax, "nested_quant_map": s.state2.code,
                            "offset": s.offset.reshape(1)})
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    def config(self) -> dict[str, Any]:
        s = self.state
        cfg = {"in_features": self.in_features, "out_features": self.out_features, "blocksize": s.blocksize,
               "quant_type": s.quant_type, "dtype": dtype_name(s.dtype)}
        if s.nested:
            cfg.update({"nested_blocksize": s.state2.blocksize, "nested_dtype": dtype_name(s.state2.dtype)})
        return cfg

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "Bnb4bitLinear":
        state2 = offset = None
        if "nested_absmax" in tensors:
            offset = tensors["offset"].reshape(())
            state2 = bnbf.QuantState(absmax=tensors["nested_absmax"], blocksize=config["nested_blocksize"],
                                     code=tensors["nested_quant_map"], dtype=dtype_of(config["nested_dtype"]))
        shape = torch.Size([config["out_features"], config["in_features"]])
        state = bnbf.QuantState(absmax=tensors["absmax"], shape=shape,
                                code=tensors["quant_map"], blocksize=config["blocksize"],
                                quant_type=config["quant_type"], dtype=dtype_of(config["dtype"]),
                                offset=offset, state2=state2)
        return cls(tensors["packed"], state, tensors.get("bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.state.quant_type}, "
                f"blocksize={self.state.blocksize}, double_quant={self.state.nested}, path={self.kernel_path}")


class Bnb8bitLinear(QuantizedLinear):
    """LLM.int8(): int8 weights with one absmax scale per output row, multiplied by ``bnb.matmul``;
    input columns with an |x| above ``threshold`` go through an fp16 matmul (outlier decomposition)."""

    def __init__(self, codes: torch.Tensor, row_scales: torch.Tensor, bias: torch.Tensor | None, threshold: float):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in codes.shape)
        self.threshold = float(threshold)
        self.register_buffer("codes", codes)
        self.register_buffer("row_scales", row_scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel_path = "none"

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float) -> "Bnb8bitLinear":
        # bitsandbytes quantizes the fp16 weight (as Int8Params does on load).
        codes, row_scales, _ = bnbf.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
        return cls(codes, row_scales, linear.bias, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = KERNEL_PATH
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.codes, self.row_scales
        state.threshold = self.threshold
        state.has_fp16_weights = False
        state.is_training = False
        bias = None if self.bias is None else self.bias.to(torch.float16)
        # LLM.int8() takes fp16 activations (it casts them itself, with a warning per call).
        out = bnb.matmul(x.to(torch.float16), self.codes, state=state, bias=bias)
        return out.to(x.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"codes": self.codes, "row_scales": self.row_scales}
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "Bnb8bitLinear":
        return cls(tensors["codes"], tensors["row_scales"], tensors.get("bias"), config["threshold"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold}, path={self.kernel_path}")


def _check_blocksize(value: int) -> str | None:
    return None if value in BLOCKSIZES else "must be one of " + ", ".join(map(str, BLOCKSIZES))


def _check_finite(name: str, linear: nn.Linear, method: str) -> None:
    if not torch.isfinite(linear.weight).all():
        raise QBenchError(f"method {method}: layer {name} has NaN/Inf weights; bitsandbytes would store them "
                          f"as garbage — check the model file")


class _Bnb4bit(Method):
    quant_type = "nf4"
    params = {
        "blocksize": Param(int, 64, "weights per absmax block", check=_check_blocksize),
        "double_quant": Param(bool, True, "quantize the absmax values to 8 bits (bitsandbytes compress_statistics)"),
    }

    @property
    def nominal_bits(self) -> int:
        return 4

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        check_device(_model_device(model), self.name)
        values = self.values

        def make(name: str, linear: nn.Linear) -> Bnb4bitLinear:
            _check_finite(name, linear, self.name)
            return Bnb4bitLinear.from_linear(linear, values["blocksize"], values["double_quant"], self.quant_type)

        self.report["bitsandbytes"] = bnb.__version__
        return replace_linears(model, make)


class BnbNF4(_Bnb4bit):
    name = "bnb-nf4"
    description = "bitsandbytes 4-bit NormalFloat (Linear4bit's format and matmul_4bit) — peer library"
    quant_type = "nf4"


class BnbFP4(_Bnb4bit):
    name = "bnb-fp4"
    description = "bitsandbytes 4-bit float (FP4, Linear4bit's format and matmul_4bit) — peer library"
    quant_type = "fp4"


class BnbInt8(Method):
    name = "bnb-int8"
    description = "bitsandbytes LLM.int8() (Linear8bitLt: int8 rows + fp16 outlier columns) — peer library"
    params = {
        "threshold": Param(float, 6.0, "activation outlier threshold (0 = no outlier decomposition)",
                           check=lambda v: None if v >= 0 else "must be >= 0"),
    }

    @property
    def nominal_bits(self) -> int:
        return 8

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        check_device(_model_device(model), self.name)
        threshold = self.values["threshold"]

        def make(name: str, linear: nn.Linear) -> Bnb8bitLinear:
            _check_finite(name, linear, self.name)
            return Bnb8bitLinear.from_linear(linear, threshold)

        self.report["bitsandbytes"] = bnb.__version__
        return replace_linears(model, make)


@qbench.hookimpl
def register_methods(register):
    if bnb is None:  # registered only where bitsandbytes imports; `qbench plugins` shows this module loaded
        return
    register(BnbNF4)
    register(BnbFP4)
    register(BnbInt8)
