"""optimum-quanto as a peer: ``quanto-int8`` and ``quanto-int4`` weights (``pip install 'qbench-quant[quanto]'``).

Registered only when optimum-quanto is importable. Each layer goes through quanto's own
``quantize(weights=qint8|qint4)`` and ``freeze``; the frozen weight is quanto's tensor subclass
(int8 codes with per-row scales, or packed 4-bit codes with per-group scale and shift, groups
chosen by quanto), and quanto's ``F.linear`` dispatch runs the matmul. Activations stay in float.
"""
from __future__ import annotations

from torch import nn

from qbench import hookimpl
from qbench.method import Method, replace_linears
from qbench.quant.peer import PeerTensorLinear, check_finite, importable
from qbench.records import distribution_version


class _QuantoMethod(Method):
    bits = 8
    cacheable = False

    @property
    def nominal_bits(self) -> int:
        return self.bits

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        from optimum.quanto import freeze, qint4, qint8, quantize

        weights = qint8 if self.bits == 8 else qint4
        self.report["optimum-quanto"] = distribution_version("optimum-quanto")

        def make(name: str, linear: nn.Linear) -> PeerTensorLinear:
            check_finite(name, linear, self.name)
            holder = nn.Sequential(linear)
            quantize(holder, weights=weights)
            freeze(holder)
            qlinear = holder[0]
            return PeerTensorLinear(qlinear.weight.data if isinstance(qlinear.weight, nn.Parameter) else qlinear.weight,
                                    linear.bias, linear.in_features, linear.out_features,
                                    f"quanto-{weights.name} ({type(qlinear.weight).__name__})")

        return replace_linears(model, make)


class QuantoInt8(_QuantoMethod):
    name = "quanto-int8"
    description = "optimum-quanto int8 weights (per-row scales), float activations — peer library"
    bits = 8


class QuantoInt4(_QuantoMethod):
    name = "quanto-int4"
    description = "optimum-quanto int4 weights (packed, per-group scale and shift), float activations — peer library"
    bits = 4


@hookimpl
def register_methods(register):
    if importable("optimum.quanto"):
        register(QuantoInt8)
        register(QuantoInt4)
