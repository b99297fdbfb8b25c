"""``nf4``: 4-bit NormalFloat (or FP4) blockwise quantization with double quantization — the data
type of QLoRA, bit-compatible with bitsandbytes (``quantize_4bit`` / ``dequantize_4bit``).

Parameters: ``blocksize`` (64; 32..4096, powers of two), ``double_quant`` (true),
``quant_type`` (nf4 | fp4), ``compute_dtype`` (auto = the input's dtype | float16 | bfloat16 |
float32). The layer is :class:`qbench.quant.nf4.NF4Linear` (shared with ``qlora``), where its
storage and kernels are described.
"""
from __future__ import annotations

from torch import nn

from qbench import hookimpl
from qbench.dtypes import FLOAT_DTYPES, dtype_of
from qbench.kernels.nf4 import QUANT_TYPES, VALID_BLOCKSIZES
from qbench.method import Method, replace_linears
from qbench.params import Param, QBenchError
from qbench.quant.nf4 import NF4Linear


def _check_blocksize(value: int) -> str | None:
    if value not in VALID_BLOCKSIZES:
        return "must be a power of two from 32 to 4096 (" + ", ".join(map(str, VALID_BLOCKSIZES)) + ")"
    return None


class NF4Method(Method):
    name = "nf4"
    nominal_bits = 4  # the code width, for the notes' bytes-per-parameter table
    description = "4-bit NormalFloat/FP4 blockwise, double-quantized absmax (QLoRA; bit-compatible with bitsandbytes)"
    params = {
        "blocksize": Param(int, 64, "weights per absmax block", check=_check_blocksize),
        "double_quant": Param(bool, True, "quantize the absmax values to 8 bits (blocks of 256)"),
        "quant_type": Param(str, "nf4", "4-bit code book", choices=QUANT_TYPES),
        "compute_dtype": Param(str, "auto", "dtype of the matmul (auto = the input's)",
                               choices=("auto", *FLOAT_DTYPES)),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        values = self.values
        compute = None if values["compute_dtype"] == "auto" else dtype_of(values["compute_dtype"])

        def make(name: str, linear: nn.Linear) -> NF4Linear:
            try:
                return NF4Linear.from_linear(linear, values["blocksize"], values["double_quant"],
                                             values["quant_type"], compute)
            except QBenchError as exc:
                raise QBenchError(f"{exc} (layer {name})") from None

        return replace_linears(model, make)


@hookimpl
def register_methods(register):
    register(NF4Method)
