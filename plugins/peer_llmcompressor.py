"""llm-compressor as a peer: ``llmc-gptq``, ``llmc-awq``, ``llmc-smoothquant``.

Install with ``pip install 'qbench-quant[llmcompressor]'`` (it moves transformers to 5.17.0, the
newest llm-compressor 0.14 accepts).

Registered only when llmcompressor is importable. Each method runs llm-compressor's own ``oneshot``
with its own modifiers on the model in memory, calibrated on the same windows our methods draw
(``Calibration.sample(nsamples, seqlen, seed)``, one window per batch):

* ``llmc-gptq``: ``GPTQModifier`` (int, asymmetric by default, groups, ``actorder`` static by default)
* ``llmc-awq``: ``AWQModifier`` (its default mappings; no clipping search) + ``QuantizationModifier``
* ``llmc-smoothquant``: ``SmoothQuantModifier`` (its default mappings: the norms before q/k/v and
  gate/up) + ``QuantizationModifier`` W8A8: int8 weights per channel, int8 activations per tensor
  (static, its observer over the calibration windows) or per token (dynamic)

The layers then compute as llm-compressor computes them on a CPU: compressed-tensors' frozen
modules quantize and dequantize the float weight (and the activations) in every forward. Storage is
what llm-compressor writes: each layer compressed by compressed-tensors (``weight_packed`` int32
words for 4-bit, int8 weights, scales, zero points, ``weight_shape``, ``g_idx``), counted tensor by
tensor; in this process it also keeps the float weight, which is not counted.

Two things are adapted so that oneshot runs here, neither touching the numbers: oneshot reads the
model's ``config.json`` from ``config._name_or_path`` (written to a temporary folder when the model
has none on disk), and its AWQ pins cached activations in page-locked memory, which a CPU-only torch
refuses ("Cannot access accelerator device"); without an accelerator pinning is skipped (it only
speeds up host-to-device copies). compressed-tensors needs whole groups, so ``group_size`` must divide
every layer's input width (64 on the demo model, whose rows are 576 wide).
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.method import Method, QuantizedLinear, quantizable_linears, replace_linears
from qbench.params import Param, QBenchError
from qbench.quant.peer import check_finite, importable
from qbench.records import distribution_version

GROUP_SIZES = (16, 32, 64, 128)
BITS = (2, 3, 4, 8)


class LLMCompressorLinear(QuantizedLinear):
    """A linear quantized by llm-compressor, held as an attribute (not a child module) so that only
    its compressed tensors count; its forward is compressed-tensors' (fake-quantized on CPU)."""

    def __init__(self, inner: nn.Linear, compressed: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.__dict__["inner"] = inner
        self.__dict__["compressed"] = compressed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel_path = "llmcompressor-fake-quant"
        return self.inner(x)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.compressed)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_stored(cls, tensors, config):
        raise QBenchError("llm-compressor layers are not cached; quantize again")


def compressed_tensors_of(linear: nn.Linear) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors writes for ``linear`` (compressed on a copy; the layer keeps running)."""
    from compressed_tensors.compressors.base import compress_module

    clone = copy.deepcopy(linear)
    compress_module(clone)
    return {name: tensor.detach() for name, tensor in clone.state_dict().items()}


@contextlib.contextmanager
def _config_on_disk(model: nn.Module):
    """oneshot reloads ``config._name_or_path``'s config.json: give a model built in memory one."""
    config = model.config
    original = getattr(config, "_name_or_path", "")
    if original and (Path(original) / "config.json").is_file():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="qbench-llmc-") as folder:
        config.save_pretrained(folder)
        config._name_or_path = folder
        try:
            yield
        finally:
            config._name_or_path = original


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = original


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def _calibration_params(nsamples: int, seqlen: int) -> dict[str, Param]:
    return {
        "nsamples": Param(int, nsamples, "calibration windows (one per batch)", check=_positive),
        "seqlen": Param(int, seqlen, "tokens per calibration window", check=_positive),
        "seed": Param(int, 0, "seed of the calibration windows (the same windows our methods draw)"),
    }


class _LLMCompressorMethod(Method):
    cacheable = False
    needs_calibration = True

    def recipe(self) -> list:
        raise NotImplementedError

    def check_layers(self, model: nn.Module) -> None:
        group = self.values.get("group_size")
        for name, linear in quantizable_linears(model):
            check_finite(name, linear, self.name)
            if group and linear.in_features % group:
                divisors = [g for g in GROUP_SIZES if all(lin.in_features % g == 0
                                                          for _, lin in quantizable_linears(model))]
                raise QBenchError(f"method {self.name}: layer {name} has {linear.in_features} input columns, not a "
                                  f"multiple of group_size={group} (compressed-tensors needs whole groups); use "
                                  f"group_size={' or '.join(map(str, divisors)) or 'a divisor of the row width'}")

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        from llmcompressor import oneshot

        if calibration is None:
            raise QBenchError(f"method {self.name} needs calibration data; none was given")
        self.check_layers(model)
        v = self.values
        max_len = getattr(model.config, "max_position_embeddings", None) or v["seqlen"]
        seqlen = min(v["seqlen"], int(max_len))
        tokens = torch.as_tensor(calibration.sample(v["nsamples"], seqlen, v["seed"]), dtype=torch.long)
        device = next(model.parameters()).device
        batches = [{"input_ids": row[None].to(device), "attention_mask": torch.ones_like(row)[None].to(device)}
                   for row in tokens]
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        processor = getattr(calibration, "tokenizer", None) or object()  # the windows are tokenized already
        recipe = self.recipe()
        with _config_on_disk(model), _no_pinning_without_accelerator():
            oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(batches),
                    processor=processor)
        self.report = {"llmcompressor": distribution_version("llmcompressor"),
                       "compressed-tensors": distribution_version("compressed-tensors"),
                       "recipe": [repr(modifier) for modifier in recipe],
                       "calibration": {"nsamples": int(tokens.shape[0]), "seqlen": seqlen, "seed": v["seed"]}}
        model.eval()
        return replace_linears(model, lambda name, linear: LLMCompressorLinear(linear, compressed_tensors_of(linear)))


def _weights(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size}


class LLMCompressorGPTQ(_LLMCompressorMethod):
    name = "llmc-gptq"
    description = "llm-compressor's GPTQModifier (oneshot): int weights in groups, static act-order — peer library"
    params = {
        "bits": Param(int, 4, "bits per weight", choices=BITS),
        "group_size": Param(int, 64, "input columns per group (must divide every layer's width)", choices=GROUP_SIZES),
        "sym": Param(bool, False, "symmetric grid (no zero points)"),
        "actorder": Param(str, "static", "column order: static (act-order, groups fixed up front, the library's "
                          "default), group, weight, or none", choices=("static", "group", "weight", "none")),
        "dampening_frac": Param(float, 0.01, "dampening, as a fraction of the mean Hessian diagonal",
                                check=lambda v: None if 0 <= v < 10 else "must be in [0, 10)"),
        **_calibration_params(32, 512),
    }

    def recipe(self) -> list:
        from llmcompressor.modifiers.quantization import GPTQModifier

        v = self.values
        return [GPTQModifier(ignore=["lm_head"], dampening_frac=v["dampening_frac"],
                             actorder=None if v["actorder"] == "none" else v["actorder"],
                             config_groups={"group_0": {"targets": ["Linear"],
                                                        "weights": _weights(v["bits"], v["group_size"], v["sym"])}})]


class LLMCompressorAWQ(_LLMCompressorMethod):
    name = "llmc-awq"
    description = ("llm-compressor's AWQModifier + QuantizationModifier (oneshot): scaled int weights in groups "
                   "— peer library")
    params = {
        "bits": Param(int, 4, "bits per weight", choices=BITS),
        "group_size": Param(int, 64, "input columns per group (must divide every layer's width)", choices=GROUP_SIZES),
        "sym": Param(bool, False, "symmetric grid (no zero points)"),
        "duo_scaling": Param(bool, True, "scales from activations and weights (the library's default)"),
        "n_grid": Param(int, 20, "grid points of the scale exponent", check=lambda v: None if 1 <= v <= 1000
                        else "must be in 1..1000"),
        **_calibration_params(16, 256),
    }

    def recipe(self) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        v = self.values
        return [AWQModifier(duo_scaling=v["duo_scaling"], n_grid=v["n_grid"]),
                QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": {
                    "targets": ["Linear"], "weights": _weights(v["bits"], v["group_size"], v["sym"])}})]


class LLMCompressorSmoothQuant(_LLMCompressorMethod):
    name = "llmc-smoothquant"
    nominal_bits = 8
    description = ("llm-compressor's SmoothQuantModifier + QuantizationModifier W8A8 (oneshot): int8 weights per "
                   "channel, int8 activations per tensor (static) or per token (dynamic) — peer library")
    params = {
        "alpha": Param(float, 0.5, "smoothing_strength", check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "activations": Param(str, "static", "static = one calibrated scale per layer; dynamic = per token",
                             choices=("static", "dynamic")),
        **_calibration_params(16, 512),
    }

    def recipe(self) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        static = self.values["activations"] == "static"
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": not static,
                       "strategy": "tensor" if static else "token"}
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        return [SmoothQuantModifier(smoothing_strength=self.values["alpha"]),
                QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": {
                    "targets": ["Linear"], "weights": weights, "input_activations": activations}})]


@hookimpl
def register_methods(register):
    if importable("llmcompressor"):
        register(LLMCompressorGPTQ)
        register(LLMCompressorAWQ)
        register(LLMCompressorSmoothQuant)
