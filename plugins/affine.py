"""Method ``affine``: asymmetric (zero-point) round-to-nearest quantization of the weights.

``q = clamp(round(w / S) + Z, 0, 2**bits - 1)``, ``w ≈ S * (q - Z)``, with S and Z from the min
and max of each group of ``group_size`` input columns (``-1``: one group per output row) on the
GPTQ-reference min-max grid (:mod:`qbench.kernels.minmax_grid`), so ``affine:bits=4`` is exactly
the RTN baseline GPTQ is judged against. When ``group_size`` does not divide the row the last
group is shorter (576 columns, group 128: 4 x 128 + 1 x 64), as in GPTQ (column // group_size).

Stored per layer (every byte counts in the memory suite):

* ``codes``: uint8 ``[out, cdiv(in * bits, 8)]``, each row a dense little-endian bit stream
  (two 4-bit codes per byte, eight 3-bit codes per three bytes; see
  :func:`qbench.kernels.affine.pack_codes`);
* ``scales``: fp16 ``[out, groups]`` (computed in fp32 on the grid, stored in fp16 as GPTQ
  checkpoints do);
* ``zeros``: zero points packed the same way at ``bits`` bits, uint8 ``[out, cdiv(groups * bits, 8)]``;
  not stored when ``sym=true`` (the zero is 2**(bits-1) for every group);
* ``bias`` when the layer has one.

On CUDA the layer runs the fused dequantize-matmul (GEMV for batch 1, GEMM otherwise). On CPU a
4-bit layer is converted once (at quantize / load time) to ATen's int4 layout and runs
``torch._weight_int4pack_mm_for_cpu`` (bf16 activations; :mod:`qbench.kernels.cpu_int4`). That
layout (``runtime_tensors``) then holds the codes: the ``codes`` buffer is dropped and rebuilt
exactly from it when ``stored_tensors()`` is asked for (saving, format bytes) or the reference
runs. Other widths and ``QBENCH_CPU_KERNEL=reference`` run the torch reference. ``kernel_path``
records which ran.
"""
from __future__ import annotations

from torch import nn

from qbench import hookimpl
from qbench.method import Method, replace_linears
from qbench.params import Param
from qbench.quant.affine import BITS, AffineLinear


def _group_size_ok(value: int) -> str | None:
    return None if value == -1 or value > 0 else "must be -1 (one group per output channel) or a positive size"


class Affine(Method):
    name = "affine"
    description = ("Asymmetric zero-point round-to-nearest weight quantization on the GPTQ min-max grid "
                   "(2-8 bits, per channel or grouped), densely packed codes, fused Triton dequantize-matmul")
    params = {
        "bits": Param(int, 4, "bits per weight code", choices=BITS),
        "group_size": Param(int, 128, "input columns per scale/zero group; -1 = one group per output channel",
                            check=_group_size_ok),
        "sym": Param(bool, False, "symmetric grid (zero point fixed at 2**(bits-1), no zeros stored)"),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        v = self.values
        return replace_linears(model, lambda name, linear: AffineLinear.from_linear(
            linear, v["bits"], v["group_size"], v["sym"]))


@hookimpl
def register_methods(register):
    register(Affine)
