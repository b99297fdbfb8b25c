"""What the 4-bit layers (``affine``/``awq``'s AffineLinear, ``gptq``'s GPTQLinear) share on a CPU:
ATen's int4 layout of the weight (:mod:`qbench.kernels.cpu_int4`), built once, replaces the layer's
stored codes in memory; the stored codes are rebuilt from it, exactly, where they are needed (the
reference path, saving, a device move)."""
from __future__ import annotations

import torch

from qbench.kernels import cpu_int4
from qbench.kernels._cpu import use_cpu_kernel


class Int4CpuLayout:
    """Mixin for a QuantizedLinear. The layer sets ``_cpu_pack = None`` in ``__init__`` and defines
    ``_cpu_int4()`` (build the layout on first need, dropping the buffer named ``_stored_codes_name``
    where the rebuild is exact) and ``_stored_codes()`` (that buffer, rebuilt if dropped)."""

    _stored_codes_name: str

    def _hold_stored_codes_for(self, x: torch.Tensor) -> None:
        """Put the stored codes back where ``x`` will not take the CPU kernel (the reference needs them)."""
        if getattr(self, self._stored_codes_name) is None and not use_cpu_kernel(x):
            setattr(self, self._stored_codes_name, self._stored_codes())

    def _int4_cpu_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """ATen's int4 kernel on ``x`` where it applies (``kernel_path`` set), else None."""
        pack = self._cpu_int4() if use_cpu_kernel(x) else None
        if pack is None:
            return None
        self.kernel_path = cpu_int4.kernel_path(x.shape[:-1].numel())
        return cpu_int4.int4_matmul_cpu(x, pack, self.bias)

    def runtime_tensors(self) -> dict[str, torch.Tensor]:
        return self._cpu_pack.tensors() if self._cpu_pack else {}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        held = {name: t for name, t in self._buffers.items() if t is not None}
        return {**held, **self.runtime_tensors()}

    def _apply(self, fn, recurse=True):
        if getattr(self, self._stored_codes_name) is None:
            setattr(self, self._stored_codes_name, self._stored_codes())
        self._cpu_pack = None  # moved or cast: rebuilt from the stored tensors where needed
        return super()._apply(fn, recurse)
