"""Method ``awq``: activation-aware weight quantization (Lin et al., 2023), stored exactly like ``affine``.

AWQ keeps round-to-nearest but first rescales each input channel so that the weights which meet
large activations lose less to rounding. Block by block (calibration windows captured at block 0
and carried forward through the float blocks, as llm-awq and AutoAWQ do):

1. Run the float block once, keeping the inputs of every scale site (:mod:`qbench.fold`: the
   RMSNorm before q/k/v and before gate/up, v_proj before o_proj, up_proj before down_proj).
2. Per site, search ``s = mean|x|^α`` (``duo_scaling``: ``mean|x|^α / mean|ŵ|^(1-α)``, ŵ the
   weights normalised per group, as AutoAWQ's default), normalised by ``sqrt(max s · min s)``, over
   ``α = i / alpha_grid``, ``i = 0 … alpha_grid-1``: the consumers' weights become
   ``Q(W diag(s)) diag(s)⁻¹`` and the α with the smallest mean squared error of the site's output
   (the attention block, the MLP, or the linear itself) wins. ``α = 0`` is plain round-to-nearest,
   so the search never does worse than RTN on the calibration tokens.
3. Fold the winning scales into the preceding op (exact; checked on the block's output).
4. ``clip``: per output row and group, search the clipping range ``±max|w| · (1 - i/20)``,
   ``i < 10``, minimising the group's output error on 512 sampled tokens (q/k are not clipped:
   their error passes through the q·k product, as in the reference).

Then every decoder linear is quantized by :class:`qbench.plugins.affine.AffineLinear` (min-max
grid, fp16 scales, packed codes and zeros, the fused Triton kernels): the search measures its
candidates with that same quantizer, and the stored layers are byte for byte what ``affine`` stores
for the rescaled weights. With grouped-query attention o_proj's scales repeat per query group
(:mod:`qbench.fold`). The RMSNorm weights carry the folded scales (``folded_parameters``).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from qbench import hookimpl
from qbench.calibrate import capture_block_inputs, collect_outputs, decoder_layers, run_block
from qbench.fold import ScaleSite, block_sites, check_same_function, fold_scales, folded_parameter_names
from qbench.kernels import affine
from qbench.method import Method, replace_linears
from qbench.params import Param, QBenchError
from qbench.quant.affine import BITS, AffineLinear

# Calibration when nsamples/seqlen are not given: the reference's 128 windows of 512 tokens on a GPU;
# on CPU fewer, so that the demo model quantizes in a few minutes on 2 cores.
DEFAULT_CALIBRATION = {"cuda": (128, 512), "cpu": (16, 256)}
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512
NOT_CLIPPED = ("q_proj", "k_proj")
log = logging.getLogger("qbench.awq")


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The weight ``AffineLinear`` would compute with: min-max grid, codes from fp32 scales, fp16 scales."""
    codes, scales, zeros = affine.quantize_reference(weight, bits, group_size, False)
    return affine.dequantize_reference(codes, scales.half(), zeros, group_size).to(weight.dtype)


def _group_slices(columns: int, group_size: int) -> list[slice]:
    size = affine.effective_group_size(columns, group_size)
    return [slice(start, min(start + size, columns)) for start in range(0, columns, size)]


def normalized_weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input column, the mean over output rows of |w| / max |w| of its group (AutoAWQ's w_mean)."""
    weight = torch.cat([w.float() for w in weights]).abs()
    out = torch.empty(weight.shape[1], device=weight.device)
    for cols in _group_slices(weight.shape[1], group_size):
        block = weight[:, cols]
        out[cols] = (block / (block.amax(dim=1, keepdim=True) + 1e-6)).mean(0)
    return out


def _site_kwargs(site: ScaleSite, kwargs: dict[str, Any]) -> dict[str, Any]:
    return kwargs if site.inspect == "self_attn" else {}


@torch.no_grad()
def search_scale(layer: nn.Module, site: ScaleSite, x: torch.Tensor, kwargs: dict[str, Any], first_rows: int,
                 batch: int, settings: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The per-channel scale (on ``site.prev``'s channels) with the smallest output error of
    ``site.inspect`` once its consumers are quantized, and the search's record."""
    inspect = layer.get_submodule(site.inspect)
    linears = [layer.get_submodule(name) for name in site.linears]
    originals = [linear.weight.data.clone() for linear in linears]
    site_kwargs = _site_kwargs(site, kwargs)
    reference = collect_outputs(inspect, x, site_kwargs, first_rows, batch).float()
    x_mean = site.to_prev(x.abs().float().reshape(-1, x.shape[-1]).mean(0), "mean")
    w_mean = None
    if settings["duo_scaling"]:
        w_mean = site.to_prev(normalized_weight_mean(originals, settings["group_size"]), "mean")
    grid = settings["alpha_grid"]
    losses: list[float] = []
    best: tuple[float, float, torch.Tensor | None] = (math.inf, -1.0, None)
    try:
        for step in range(grid):
            ratio = step / grid
            if w_mean is None:
                scales = x_mean.pow(ratio).clamp(min=1e-4)
            else:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales[~torch.isfinite(scales)] = 1
            columns = site.to_consumer(scales)[None, :]
            for linear, weight in zip(linears, originals):
                scaled = (weight.float() * columns).to(weight.dtype)
                linear.weight.data = (fake_quantize(scaled, settings["bits"], settings["group_size"]).float()
                                      / columns).to(weight.dtype)
            out = collect_outputs(inspect, x, site_kwargs, first_rows, batch).float()
            loss = float((reference - out).pow(2).mean())
            losses.append(loss)
            if loss < best[0]:
                best = (loss, ratio, scales.clone())
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.data = weight
    if best[2] is None:
        raise QBenchError(f"awq: the scale search at {site.name} found no finite loss (losses {losses[:3]}...); "
                          "check the model weights and calibration data")
    return best[2], {"alpha": best[1], "loss": best[0], "rtn_loss": losses[0]}


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per output row and group, the clipping bound ``max|w| · (1 - i/20)`` (``i < 10``) with the
    smallest output error of the group on ~512 sampled tokens; returns the clipped weight."""
    x = x.reshape(-1, x.shape[-1])
    x = x[::max(1, x.shape[0] // CLIP_TOKENS)].float()
    clipped = weight.detach().float().clone()
    for cols in _group_slices(weight.shape[1], group_size):
        w = clipped[:, cols]
        xg = x[:, cols]
        reference = xg @ w.t()
        bound = w.abs().amax(dim=1, keepdim=True)
        best_bound = bound.clone()
        best_error = torch.full_like(bound, math.inf)
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            trial = bound * (1 - step / CLIP_GRID)
            quantized = fake_quantize(torch.maximum(torch.minimum(w, trial), -trial), bits, -1)
            error = (xg @ quantized.t() - reference).pow(2).mean(0)[:, None]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_bound = torch.where(better, trial, best_bound)
        clipped[:, cols] = torch.maximum(torch.minimum(w, best_bound), -best_bound)
    return clipped.to(weight.dtype)


def awq_blocks(model: nn.Module, tokens: torch.Tensor, settings: dict[str, Any], batch: int = 8,
               log_fn=None) -> dict[str, Any]:
    """Search and fold AWQ's scales (and clip, when ``settings["clip"]``) in every decoder block of
    ``model``, in place; the weights stay float. Returns the record and ``folded`` (changed norm
    parameter names)."""
    started = time.perf_counter()
    layers = decoder_layers(model, "awq")
    layers_prefix = next(n for n, m in model.named_modules() if m is layers)
    was_training = model.training
    model.eval()
    inputs, kwargs, first_rows = capture_block_inputs(model, layers, tokens, batch)
    if not torch.isfinite(inputs).all():
        raise QBenchError("awq: calibration activations at the input of the first block contain NaN/Inf; "
                          "check the model weights and compute dtype or the calibration data")
    blocks: dict[str, Any] = {}
    folded: list[str] = []
    notes: list[str] = []
    for index, layer in enumerate(layers):
        block_started = time.perf_counter()
        prefix = f"{layers_prefix}.{index}."
        sites, site_notes = block_sites(layer, "awq")
        notes.extend(note for note in site_notes if note not in notes)
        captured: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
        handles = [layer.get_submodule(site.linears[0]).register_forward_pre_hook(
            lambda m, args, _site=site.name: captured[_site].append(args[0].detach())) for site in sites]
        outputs = torch.empty_like(inputs)
        try:
            run_block(layer, inputs, kwargs, first_rows, batch, outputs)
        finally:
            for handle in handles:
                handle.remove()
        features = {name: torch.cat(chunks) for name, chunks in captured.items()}
        captured.clear()
        record: dict[str, Any] = {}
        scales: dict[str, torch.Tensor] = {}
        for site in sites:
            scales[site.name], record[site.name] = search_scale(layer, site, features[site.name], kwargs,
                                                                first_rows, batch, settings)
        for site in sites:
            fold_scales(layer, site, scales[site.name])
        check = collect_outputs(layer, inputs[:batch], kwargs, first_rows, batch)
        record["fold_check"] = check_same_function(outputs[:check.shape[0]], check, "awq", f"block {index}")
        if settings["clip"]:
            for site in sites:
                x = features[site.name] / site.to_consumer(scales[site.name]).to(features[site.name].dtype)
                for name in site.linears:
                    if name.rsplit(".", 1)[-1] in NOT_CLIPPED:
                        continue
                    linear = layer.get_submodule(name)
                    linear.weight.data = search_clip(linear.weight.data, x, settings["bits"], settings["group_size"])
        folded.extend(folded_parameter_names(layer, prefix, sites))
        record["seconds"] = round(time.perf_counter() - block_started, 2)
        blocks[f"{layers_prefix}.{index}"] = record
        del features
        inputs = outputs
        if log_fn:
            alphas = ", ".join(f"{site.name} α={record[site.name]['alpha']:.2f}" for site in sites)
            log_fn(f"awq block {index}: {alphas}, {record['seconds']:.1f}s")
    model.train(was_training)
    return {"blocks": blocks, "notes": notes, "folded": folded, "seconds": round(time.perf_counter() - started, 2)}


def _group_size_ok(value: int) -> str | None:
    return None if value == -1 or value > 0 else "must be -1 (one group per output channel) or a positive size"


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


class AWQ(Method):
    name = "awq"
    description = ("AWQ activation-aware scaling (per-channel scales searched per layer group, folded into the "
                   "preceding norm/linear, optional clipping search), then affine round-to-nearest: same storage "
                   "and kernels as affine")
    needs_calibration = True
    params = {
        "bits": Param(int, 4, "bits per weight code", choices=BITS),
        "group_size": Param(int, 128, "input columns per scale/zero group; -1 = one group per output channel",
                            check=_group_size_ok),
        "alpha_grid": Param(int, 20, "grid points of the scale exponent α in [0, 1)",
                            check=lambda v: None if 1 <= v <= 1000 else "must be in 1..1000"),
        "duo_scaling": Param(bool, False, "scales mean|x|^α / mean|w|^(1-α) (AutoAWQ's default) instead of the "
                             "paper's mean|x|^α"),
        "clip": Param(bool, True, "search each group's clipping range after scaling"),
        "nsamples": Param(int, None, "calibration windows (default: 128 on GPU, 16 on CPU)", check=_positive),
        "seqlen": Param(int, None, "tokens per calibration window, capped at the model's maximum length "
                        "(default: 512 on GPU, 256 on CPU)", check=_positive),
        "seed": Param(int, 0, "seed of the calibration windows"),
    }

    def quantize(self, model: nn.Module, calibration=None) -> nn.Module:
        if calibration is None:
            raise QBenchError("method awq needs calibration data (nsamples windows of seqlen tokens); none was given")
        v = self.values
        device = next(model.parameters()).device
        default_nsamples, default_seqlen = DEFAULT_CALIBRATION["cuda" if device.type == "cuda" else "cpu"]
        nsamples = v["nsamples"] or default_nsamples
        seqlen = v["seqlen"] or default_seqlen
        max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or seqlen
        seqlen = min(seqlen, int(max_len))
        tokens = torch.as_tensor(calibration.sample(nsamples, seqlen, v["seed"]), dtype=torch.long)
        settings = {k: v[k] for k in ("bits", "group_size", "alpha_grid", "duo_scaling", "clip")}
        run = awq_blocks(model, tokens, settings, log_fn=log.info)
        self.folded_parameters = tuple(run.pop("folded"))
        model = replace_linears(model, lambda name, linear: AffineLinear.from_linear(
            linear, v["bits"], v["group_size"], False))
        self.report = {"settings": settings, "calibration": {"nsamples": nsamples, "seqlen": seqlen, "seed": v["seed"]},
                       **run}
        return model


@hookimpl
def register_methods(register):
    register(AWQ)
