"""Method ``gptq``: Hessian-based one-shot post-training quantization (Frantar et al., 2022).

Quantized layers are :class:`GPTQLinear` modules that hold exactly the checkpoint layout GPTQ tools
share (``qweight``, ``qzeros``, ``scales``, ``g_idx``, optional ``bias``); they run the fused Triton
dequantize-matmul on CUDA. On CPU a 4-bit layer is converted once (at quantize / load time) to ATen's
int4 layout, act-order columns permuted into contiguous groups, and runs
``torch._weight_int4pack_mm_for_cpu`` (:mod:`qbench.kernels.cpu_int4`); that layout then holds the
codes (``qweight`` is rebuilt from it exactly for ``stored_tensors()``, ``state_dict()`` and the
reference). Other widths and ``QBENCH_CPU_KERNEL=reference`` run the torch reference. :func:`save_gptq_checkpoint` and
:func:`load_gptq_checkpoint` write and read GPTQModel/AutoGPTQ-style checkpoint directories
(``model.safetensors`` + ``config.json`` with ``quantization_config`` + ``quantize_config.json``).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.kernels import cpu_int4
from qbench.kernels._cpu import cpu_kernels_wanted
from qbench.kernels._triton import use_triton_in_module
from qbench.kernels.gptq_matmul import contiguous_group, gptq_matmul, gptq_matmul_reference
from qbench.kernels.gptq_pack import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    dequantize_gptq,
    pack_gptq,
    pack_qweight,
    pack_qzeros,
    packed_rows,
    unpack_qweight,
    unpack_qzeros,
)
from qbench.method import Method, QuantizedLinear, quantizable_linears, quantized_modules, set_submodule
from qbench.params import Param, QBenchError
from qbench.quant.gptq import LayerQuantization, gptq_quantize_blocks
from qbench.quant.int4_cpu import Int4CpuLayout

GROUP_SIZES = (-1, 32, 64, 128)
# Calibration when nsamples/seqlen are not given: the reference's 128 x 2048 on a GPU; on CPU that
# takes 1-2 hours for the 135M demo model on 2 cores, 32 x 512 about 3-6 minutes.
DEFAULT_CALIBRATION = {"cuda": (128, 2048), "cpu": (32, 512)}
log = logging.getLogger("qbench.gptq")


class GPTQLinear(Int4CpuLayout, QuantizedLinear):
    """A linear layer stored in the GPTQ checkpoint layout (see :mod:`kernels.gptq_pack`)."""

    _stored_codes_name = "qweight"  # replaced in memory by the CPU int4 layout where that is exact

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 desc_act: bool, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq"):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise QBenchError(f"GPTQLinear: bits={bits} is not supported; valid values: 2, 3, 4, 8")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise QBenchError(f"GPTQLinear: checkpoint_format={checkpoint_format!r}; valid values: gptq, gptq_v2")
        groups = scales.shape[0]
        expected = {
            "qweight": (packed_rows(in_features, bits), out_features),
            "qzeros": (groups, packed_rows(out_features, bits)),
            "scales": (groups, out_features),
            "g_idx": (in_features,),
        }
        for key, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            if tuple(tensor.shape) != expected[key]:
                raise QBenchError(f"GPTQLinear {in_features}->{out_features}, {bits} bits: {key} has shape "
                                  f"{tuple(tensor.shape)}, expected {expected[key]}")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise QBenchError(f"GPTQLinear: g_idx values must lie in [0, {groups - 1}]")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.checkpoint_format = checkpoint_format
        self.register_buffer("qweight", qweight.to(torch.int32).contiguous())
        self.register_buffer("qzeros", qzeros.to(torch.int32).contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("g_idx", g_idx.to(torch.int32).contiguous())
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None
        self._cpu_pack: cpu_int4.Int4CpuPack | None | bool = None  # False: this layer has no CPU layout
        if cpu_kernels_wanted(self.qweight.device):
            self._cpu_int4()  # converted once, at quantize / load time

    @property
    def zero_offset(self) -> int:
        return CHECKPOINT_FORMATS[self.checkpoint_format]

    @classmethod
    def from_quantization(cls, linear: nn.Linear, result: LayerQuantization, bits: int, group_size: int,
                          sym: bool, desc_act: bool) -> "GPTQLinear":
        # v1 ("gptq") stores zero-1; a zero of 0 (asymmetric, all-positive group) needs gptq_v2
        checkpoint_format = "gptq" if bool((result.zeros >= 1).all()) else "gptq_v2"
        packed = pack_gptq(result.codes.t(), result.scales, result.zeros, result.g_idx, bits, checkpoint_format)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, bits, group_size, sym, desc_act,
                   bias=bias, checkpoint_format=checkpoint_format, **packed)

    @classmethod
    def from_rtn(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True,
                 act_order: bool = False) -> "GPTQLinear":
        """The GPTQ layout filled with round-to-nearest codes on GPTQ's min-max grid, without GPTQ's
        algorithm (minutes on a CPU): for benchmarks and tests of the layout and its kernels. With
        ``act_order`` the columns are grouped in descending order of their norm (a stand-in for GPTQ's
        Hessian order), so ``g_idx`` is not ascending, as in checkpoints made with ``desc_act``."""
        from qbench.kernels.affine import quantize_reference

        w = linear.weight.detach().float()
        order = torch.argsort(w.norm(dim=0), descending=True) if act_order else torch.arange(w.shape[1])
        codes_in_order, scales, zeros = quantize_reference(w[:, order], bits, group_size, sym)
        codes = torch.empty_like(codes_in_order)
        codes[:, order] = codes_in_order
        size = w.shape[1] if group_size == -1 else group_size
        g_idx = torch.empty(w.shape[1], dtype=torch.int32)
        g_idx[order] = (torch.arange(w.shape[1]) // size).to(torch.int32)
        packed = pack_gptq(codes.t(), scales.t(), zeros.t(), g_idx, bits, "gptq_v2")
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, bits, group_size, sym, act_order, bias=bias,
                   checkpoint_format="gptq_v2", **packed)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as an fp32 ``[out, in]`` matrix (what the matmul computes with)."""
        return dequantize_gptq(self._qweight(), self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset).t()

    def _cpu_int4(self) -> cpu_int4.Int4CpuPack | None:
        """ATen's int4 layout of this layer (4 bits, on CPU), built on first need; None where there is none
        (a ``g_idx`` whose groups are not ``group_size`` columns each)."""
        if self._cpu_pack is None:
            self._cpu_pack = False
            if self.bits == 4 and self.qweight.device.type == "cpu":
                codes = unpack_qweight(self.qweight, 4, self.in_features).t()
                zeros = unpack_qzeros(self.qzeros, 4, self.out_features, self.zero_offset).t()
                size = self.in_features if self.group_size == -1 else self.group_size
                self._cpu_pack = cpu_int4.pack_int4_cpu(codes, self.scales.t(), zeros, size, self.g_idx) or False
                # held once, in the kernel's layout (_qweight() rebuilds it), where the rebuild is exact
                if self._cpu_pack and cpu_int4.layout() is not None and self.in_features % 8 == 0:
                    self.qweight = None
        return self._cpu_pack or None

    def _qweight(self) -> torch.Tensor:
        """The stored ``qweight``, rebuilt from the CPU kernel's layout where only that is held."""
        if self.qweight is not None:
            return self.qweight
        return pack_qweight(cpu_int4.unpack_int4_cpu(self._cpu_pack).t(), 4)

    _stored_codes = _qweight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # checkpoints carry the GPTQ layout, whatever this process holds
            destination[prefix + "qweight"] = self._qweight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._hold_stored_codes_for(x)
        args = (x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias, self.zero_offset)
        if use_triton_in_module(x):
            self.kernel_path = "triton"
            if getattr(self, "_gemv_group", None) is None:  # g_idx read once, outside any graph capture
                self._gemv_group = contiguous_group(self.g_idx, self.bits, self.group_size)
            return gptq_matmul(*args, group=self._gemv_group)
        y = self._int4_cpu_matmul(x)
        if y is not None:
            return y
        self.kernel_path = "reference"
        return gptq_matmul_reference(*args)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": self._qweight(), "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act,
                "checkpoint_format": self.checkpoint_format}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "GPTQLinear":
        return cls(config["in_features"], config["out_features"], config["bits"], config["group_size"],
                   config["sym"], config["desc_act"], tensors["qweight"], tensors["qzeros"], tensors["scales"],
                   tensors["g_idx"], tensors.get("bias"), config.get("checkpoint_format", "gptq"))

    def to_v2(self) -> "GPTQLinear":
        """The same layer with zeros stored as themselves (gptq_v2); exact unless a v1 zero is 2**bits."""
        if self.checkpoint_format == "gptq_v2":
            return self
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features, 1)
        if bool((zeros > 2**self.bits - 1).any()):
            raise QBenchError("gptq checkpoint: a v1 zero point of 2**bits cannot be written in the gptq_v2 format")
        qzeros = pack_qzeros(zeros, self.bits, 0)
        return GPTQLinear(self.in_features, self.out_features, self.bits, self.group_size, self.sym, self.desc_act,
                          self._qweight(), qzeros, self.scales, self.g_idx, self.bias, "gptq_v2")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
                f"desc_act={self.desc_act}, format={self.checkpoint_format}")


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


class GPTQ(Method):
    name = "gptq"
    description = ("GPTQ one-shot post-training quantization: Hessian-based error feedback on the min-max grid, "
                   "packed GPTQ checkpoint layout, fused Triton dequantize-matmul")
    needs_calibration = True
    claims = [{"claim": "GPTQ loses <0.1 perplexity", "metric": "perplexity.ppl", "compare": "diff", "below": 0.1}]
    params = {
        "bits": Param(int, 4, "bits per weight", choices=SUPPORTED_BITS),
        "group_size": Param(int, 128, "input columns sharing a scale/zero (-1: one group per row)",
                            choices=GROUP_SIZES),
        # Default: asymmetric (a zero point per group, as the reference gptq.py without --sym and as
        # llm-compressor's and our affine RTN grid). On the demo model it is 2.43 ppl [2.24, 2.63]
        # better than the symmetric grid over all 148 WikiText-2 windows (results/README.md).
        "sym": Param(bool, False, "symmetric grid (zero point fixed at 2**(bits-1)), as GPTQModel's default"),
        # Default: act-order with static groups (llm-compressor's "static" act-order: no runtime cost,
        # monotonic g_idx). On the demo model it beats RTN by 4.38 ppl [4.06, 4.72] over all 148
        # WikiText-2 windows; the reference's act_order=false does not (results/README.md).
        "act_order": Param(bool, True, "quantize columns by descending Hessian diagonal (desc_act)"),
        "static_groups": Param(bool, True, "with act_order: group parameters fixed up front in column order"),
        "group_aware": Param(bool, False, "group-aware reordering (GPTQModel's GAR): groups by their largest Hessian "
                             "diagonal, columns by it inside each group; g_idx stays monotonic"),
        "observer": Param(str, "minmax", "group range: minmax, or mse (clipped to the least rounding error, "
                          "as the reference quantizer's mse search)", choices=("minmax", "mse")),
        "true_sequential": Param(bool, True, "inside a block, quantize q/k/v, o, gate/up, down in turn"),
        "percdamp": Param(float, 0.01, "dampening, as a fraction of the mean Hessian diagonal",
                          check=lambda v: None if 0 <= v < 10 else "must be in [0, 10)"),
        "blocksize": Param(int, 128, "columns per lazy batch update", check=_positive),
        "nsamples": Param(int, None, "calibration windows (default: 128 on GPU, 32 on CPU)", check=_positive),
        "seqlen": Param(int, None, "tokens per calibration window, capped at the model's maximum length "
                        "(default: 2048 on GPU, 512 on CPU)", check=_positive),
        "seed": Param(int, 0, "seed of the calibration windows"),
    }

    def settings(self) -> dict[str, Any]:
        keys = ("bits", "group_size", "sym", "act_order", "static_groups", "group_aware", "observer", "true_sequential",
                "percdamp", "blocksize")
        return {k: self.values[k] for k in keys}

    def check(self, values: dict[str, Any]) -> str | None:
        if values["group_aware"] and (values["act_order"] or values["static_groups"]):
            return ("group_aware is an ordering of its own; pass act_order=false,static_groups=false with it "
                    "(e.g. gptq:group_aware=true,act_order=false,static_groups=false)")
        return None

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        if calibration is None:
            raise QBenchError("method gptq needs calibration data (nsamples windows of seqlen tokens); none was given")
        values = self.values
        device = next(model.parameters()).device
        default_nsamples, default_seqlen = DEFAULT_CALIBRATION["cuda" if device.type == "cuda" else "cpu"]
        nsamples = values["nsamples"] or default_nsamples
        seqlen = values["seqlen"] or default_seqlen
        max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or seqlen
        seqlen = min(seqlen, int(max_len))
        tokens = calibration.sample(nsamples, seqlen, values["seed"])
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise QBenchError(f"gptq: calibration returned tokens of shape {tuple(tokens.shape)}; "
                              "expected [nsamples, seqlen]")
        settings = self.settings()
        wanted = {name for name, _ in quantizable_linears(model)}

        def make(name: str, linear: nn.Linear, result: LayerQuantization) -> GPTQLinear:
            return GPTQLinear.from_quantization(linear, result, settings["bits"], settings["group_size"],
                                                settings["sym"], settings["act_order"])

        started, cpu_started = time.perf_counter(), time.process_time()
        run = gptq_quantize_blocks(model, tokens, settings, make, wanted=wanted, log=log.info)
        missing = [name for name, _ in quantizable_linears(model)]
        if missing:  # linears outside the decoder blocks the algorithm walks (unusual architectures)
            raise QBenchError(f"gptq: {len(missing)} linears were not reached by calibration, e.g. {missing[0]}")
        losses = {name: stats["loss"] for name, stats in run["layers"].items()}
        self.report = {
            "settings": settings,
            "calibration": {"nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]), "seed": values["seed"],
                            "device_default": values["nsamples"] is None or values["seqlen"] is None},
            "quantize_seconds": round(time.perf_counter() - started, 2),
            # CPU seconds of all threads: on a shared machine wall time says more about the load than the method
            "quantize_cpu_seconds": round(time.process_time() - cpu_started, 2),
            "capture_seconds": run["capture_seconds"],
            "damp_retries": run["damp_retries"],
            "layers_with_retries": [n for n, s in run["layers"].items() if s["damp_retries"]],
            "total_loss": float(sum(losses.values())),
            "layers": run["layers"],
        }
        return model


# --- checkpoint interop ------------------------------------------------------------------------------

def _quantization_config(modules: list[GPTQLinear], checkpoint_format: str,
                         extra: dict[str, Any] | None) -> dict[str, Any]:
    first = modules[0]
    for module in modules:
        if (module.bits, module.group_size, module.sym, module.desc_act) != \
                (first.bits, first.group_size, first.sym, first.desc_act):
            raise QBenchError("gptq checkpoint: all layers must share bits, group_size, sym and desc_act")
    config = {"quant_method": "gptq", "bits": first.bits, "group_size": first.group_size, "sym": first.sym,
              "desc_act": first.desc_act, "checkpoint_format": checkpoint_format, "lm_head": False}
    if extra:
        config.update(extra)
    return config


def save_gptq_checkpoint(model: nn.Module, directory: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (with :class:`GPTQLinear` layers) as a GPTQ checkpoint directory.

    ``model.safetensors`` holds ``<layer>.qweight/.qzeros/.scales/.g_idx`` plus every other weight;
    ``config.json`` carries ``quantization_config`` and ``quantize_config.json`` repeats it. The
    format is "gptq" (v1, zeros stored minus one) unless a layer needs "gptq_v2" (a zero of 0).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = [m for _, m in quantized_modules(model) if isinstance(m, GPTQLinear)]
    if not modules:
        raise QBenchError("gptq checkpoint: the model has no GPTQLinear layers; quantize it with method gptq first")
    checkpoint_format = "gptq" if all(m.checkpoint_format == "gptq" for m in modules) else "gptq_v2"
    if checkpoint_format == "gptq_v2":
        for name, module in list(quantized_modules(model)):
            if isinstance(module, GPTQLinear) and module.checkpoint_format != "gptq_v2":
                set_submodule(model, name, module.to_v2())
        modules = [m for _, m in quantized_modules(model) if isinstance(m, GPTQLinear)]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:  # tied weights (lm_head = embeddings) are written once, as HF does
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quant_config = _quantization_config(modules, checkpoint_format, extra_config)
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    model_config["quantization_config"] = quant_config
    (directory / "config.json").write_text(json.dumps(model_config, indent=2, default=str))
    (directory / "quantize_config.json").write_text(json.dumps(quant_config, indent=2))
    return directory


def read_quantization_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    config: dict[str, Any] = {}
    if (directory / "config.json").exists():
        config = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    if not config and (directory / "quantize_config.json").exists():
        config = json.loads((directory / "quantize_config.json").read_text())
    if not config:
        raise QBenchError(f"gptq checkpoint {directory}: no quantization_config in config.json "
                          "and no quantize_config.json")
    method = str(config.get("quant_method", "gptq")).lower()
    fmt = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
    if method != "gptq" or fmt not in CHECKPOINT_FORMATS:
        raise QBenchError(f"gptq checkpoint {directory}: quant_method={method}, checkpoint_format={fmt}; "
                          "only gptq with checkpoint_format gptq or gptq_v2 can be loaded")
    bits = int(config["bits"])
    if bits not in SUPPORTED_BITS:
        raise QBenchError(f"gptq checkpoint {directory}: bits={bits}; valid values: 2, 3, 4, 8")
    return {"bits": bits, "group_size": int(config.get("group_size", -1)), "sym": bool(config.get("sym", True)),
            "desc_act": bool(config.get("desc_act", False)), "checkpoint_format": fmt}


def gptq_linears_from_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> list[str]:
    """Replace each quantizable linear of ``model`` that has ``<name>.qweight`` in ``tensors``; pops
    the tensors it uses. Returns the replaced names."""
    replaced = []
    for name, linear in list(quantizable_linears(model)):
        if f"{name}.qweight" not in tensors:
            continue
        parts = {key: tensors.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{name}.{key}" in tensors}
        if len(parts) != 4:
            raise QBenchError(f"gptq checkpoint: {name} lacks one of qweight, qzeros, scales, g_idx")
        bias = tensors.pop(f"{name}.bias", None)
        module = GPTQLinear(linear.in_features, linear.out_features, quant["bits"], quant["group_size"],
                            quant["sym"], quant["desc_act"], parts["qweight"], parts["qzeros"], parts["scales"],
                            parts["g_idx"], bias.to(linear.weight.dtype) if bias is not None else None,
                            quant["checkpoint_format"])
        set_submodule(model, name, module)
        replaced.append(name)
    return replaced


def load_gptq_checkpoint(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the model in ``directory`` (config.json) with :class:`GPTQLinear` layers from its safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    quant = read_quantization_config(directory)
    config_dict = json.loads((directory / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise QBenchError(f"gptq checkpoint {directory}: config.json has no model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QBenchError(f"gptq checkpoint {directory}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    replaced = gptq_linears_from_tensors(model, tensors, quant)
    if not replaced:
        raise QBenchError(f"gptq checkpoint {directory}: no <layer>.qweight tensor matches the model's linears")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(f"{name}." for name in replaced)  # their buffers were set from the checkpoint above
    missing = [k for k in missing if not k.startswith(prefixes)
               and not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise QBenchError(f"gptq checkpoint {directory}: tensors do not match the model ({detail})")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@hookimpl
def register_methods(register):
    register(GPTQ)
