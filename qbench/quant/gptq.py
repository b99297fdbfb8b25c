"""The GPTQ algorithm (Frantar et al., 2022), as in its reference implementation.

* :class:`HessianAccumulator`: ``H = 2 X Xᵀ / n`` of a linear layer's inputs, in fp32.
* :func:`gptq_quantize_weight`: one layer: dead columns, dampening (with retries when the Hessian is
  not positive definite), upper Cholesky factor of ``H⁻¹``, column-by-column quantization with error
  feedback and lazy batch updates, act-order and static groups.
* :func:`gptq_quantize_blocks`: the whole model, one decoder block at a time: the calibration
  activations are captured at the input of block 0, every block is quantized (sub-groups of linears
  in call order when ``true_sequential``) and the *quantized* block's outputs feed the next block.

The grid is :mod:`kernels.minmax_grid` (the reference quantizer's min-max grid), so GPTQ and the
RTN baseline differ only in how codes are chosen.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qbench.calibrate import StopForward as _StopForward
from qbench.calibrate import capture_block_inputs, decoder_layers
from qbench.calibrate import run_block as _run_block
from qbench.kernels.minmax_grid import minmax_scale_zero, mse_scale_zero
from qbench.params import QBenchError


class HessianAccumulator:
    """Running ``2 X Xᵀ / n`` over every token row ``x`` (fp32, ``[in_features, in_features]``)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", name: str = "layer"):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0
        self.name = name

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        if not torch.isfinite(x).all():
            raise QBenchError(f"gptq: calibration activations at the input of {self.name} contain NaN/Inf; "
                              "check the model weights and compute dtype (try dtype=float32) or the calibration data")
        new_rows = x.shape[0]
        if new_rows == 0:
            return
        self.hessian.mul_(self.rows / (self.rows + new_rows))
        self.rows += new_rows
        x = x * math.sqrt(2.0 / self.rows)
        self.hessian.addmm_(x.t(), x)


@dataclass
class LayerQuantization:
    """One quantized layer: integer codes in the original column order, per-group parameters."""

    codes: torch.Tensor  # [out, in] int32
    scales: torch.Tensor  # [groups, out] fp32 (values representable in fp16)
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32
    dequantized: torch.Tensor  # [out, in] fp32, scales * (codes - zeros)
    stats: dict[str, Any] = field(default_factory=dict)


def _group_params(columns: torch.Tensor, bits: int, sym: bool,
                  observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``columns`` ([out, n]) — min-max, or with the range clipped to the
    least rounding error (``observer="mse"``); scales rounded to fp16 as stored."""
    scale, zero = (mse_scale_zero if observer == "mse" else minmax_scale_zero)(columns, bits, sym)
    return scale[:, 0].half().float(), zero[:, 0]


def group_aware_order(diagonal: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQModel's group-aware reordering (GAR, Gafni et al. 2025): groups by their largest Hessian
    diagonal entry, most important first, and inside each group its columns by the diagonal. The
    groups stay the original contiguous column ranges, so ``g_idx`` stays ``column // group``
    (no gather at inference) while the important columns are still quantized early."""
    columns = diagonal.numel()
    group_of = torch.arange(columns, device=diagonal.device) // group
    score = torch.full((int(group_of[-1]) + 1,), -torch.inf, device=diagonal.device)
    score = score.scatter_reduce(0, group_of, diagonal, "amax")
    rank = torch.argsort(torch.argsort(score, descending=True, stable=True))
    by_diagonal = torch.argsort(diagonal, descending=True, stable=True)
    return by_diagonal[torch.argsort(rank[group_of[by_diagonal]], stable=True)]


def rtn_dequantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the same grid and groups (the baseline GPTQ is judged against)."""
    W = weight.detach().float()
    columns = W.shape[1]
    group = columns if group_size == -1 or group_size >= columns else group_size
    out = torch.empty_like(W)
    for start in range(0, columns, group):
        block = W[:, start:start + group]
        scale, zero = _group_params(block, bits, sym)
        q = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        out[:, start:start + group] = scale[:, None] * (q - zero[:, None])
    return out


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error over the calibration tokens, ``mean ||(W - Q) x||²``, from ``H = 2XXᵀ/n``."""
    delta = weight - quantized
    return float(((delta @ hessian.to(delta.device)) * delta).sum() / 2)


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, max_retries: int = 4,
                     name: str = "layer") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹`` with ``damp = percdamp · mean(diag H)``.

    When ``H`` is not positive definite after dampening, retry with 10× the dampening (up to
    ``max_retries`` times). Returns the factor, the relative dampening used and the retry count.
    """
    mean_diag = hessian.diagonal().mean().item()
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    relative = percdamp
    for retries in range(max_retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(relative * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            # H⁻¹ = L⁻ᵀL⁻¹ from a triangular solve: torch.cholesky_inverse (LAPACK potri) is ~10x slower on
            # CPU, a third of GPTQ's CPU time on the demo model; the results agree to ~1e-6 relative.
            lower_inv = torch.linalg.solve_triangular(lower, torch.eye(len(lower), device=lower.device), upper=False)
            inverse = lower_inv.t() @ lower_inv
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, relative, retries
        relative *= 10
    raise QBenchError(f"gptq: the Hessian of {name} is not positive definite even with damping "
                      f"{relative / 10:g}·mean(diag H); use more calibration samples or a larger percdamp")


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                         sym: bool = True, act_order: bool = False, static_groups: bool = False,
                         percdamp: float = 0.01, blocksize: int = 128, max_retries: int = 4,
                         name: str = "layer", group_aware: bool = False,
                         observer: str = "minmax") -> LayerQuantization:
    """Quantize one weight ``[out, in]`` given the Hessian of its inputs (the reference's fasterquant).

    ``act_order``: columns by descending Hessian diagonal (``static_groups``: group parameters from
    the original weight, so ``g_idx`` stays monotonic). ``group_aware``: group-aware reordering
    instead (see :func:`group_aware_order`); each group's parameters come from the weight as updated
    when the group is reached. ``observer="mse"``: each group's range clipped to the least error."""
    if group_aware and (act_order or static_groups):
        raise QBenchError("gptq: group_aware reorders columns itself; it excludes act_order and static_groups")
    started = time.perf_counter()
    W = weight.detach().float().clone()
    if not torch.isfinite(W).all():
        raise QBenchError(f"gptq: the weight of {name} contains NaN/Inf; the model cannot be quantized")
    rows, columns = W.shape
    H = hessian.detach().float().clone().to(W.device)
    maxq = 2**bits - 1
    group = columns if group_size == -1 or group_size >= columns else group_size
    groups = (columns + group - 1) // group

    dead = H.diagonal() == 0  # columns that never see input: any value is exact, quantize them as 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(groups, rows, device=W.device)
    zeros = torch.zeros(groups, rows, device=W.device)
    if static_groups:  # parameters from the original column order, fixed before the updates
        for g in range(groups):
            scales[g], zeros[g] = _group_params(W[:, g * group:(g + 1) * group], bits, sym, observer)

    perm = None
    if act_order:  # most-activated columns first, while the most error feedback is still possible
        perm = torch.argsort(H.diagonal(), descending=True)
    elif group_aware:
        perm = group_aware_order(H.diagonal(), group)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    starts = list(range(0, columns, blocksize))
    if group_aware:  # a group's parameters need every earlier update: blocks also break where groups do
        group_of = perm // group
        first = [0] + (torch.nonzero(group_of[1:] != group_of[:-1]).flatten() + 1).tolist()
        starts = sorted(set(starts) | set(first))

    Hinv, damp_used, retries = inverse_cholesky(H, percdamp, max_retries, name)
    del H

    first_set = set(first) if group_aware else set()
    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    for i1, i2 in zip(starts, starts[1:] + [columns]):
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static_groups:
                g = (int(perm[column]) if perm is not None else column) // group
            elif group_aware:
                g = int(perm[column]) // group
                if column in first_set:  # a block starts here, so W holds every update so far
                    width = min(group, columns - g * group)  # the group's columns follow contiguously
                    scales[g], zeros[g] = _group_params(W[:, column:column + width], bits, sym, observer)
            else:
                g = column // group
                if column % group == 0:  # as the reference: from W, updated up to this block
                    scales[g], zeros[g] = _group_params(W[:, column:column + group], bits, sym, observer)
            scale, zero = scales[g], zeros[g]
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            dq = scale * (q - zero)
            codes[:, column] = q.to(torch.int32)
            Q[:, column] = dq
            losses += (w - dq) ** 2 / d**2 / 2
            err = (w - dq) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns not reached yet

    positions = torch.arange(columns, device=W.device)
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        codes = codes[:, invperm]
        g_idx = positions // group if static_groups or group_aware else invperm // group
    else:
        g_idx = positions // group
    original = weight.detach().float().to(W.device)
    stats = {
        "loss": float(losses.sum()),
        "output_error": output_error(original, Q, hessian),
        "rtn_output_error": output_error(original, rtn_dequantize(original, bits, group_size, sym), hessian),
        "damp": damp_used,
        "damp_retries": retries,
        "dead_columns": int(dead.sum()),
        "seconds": round(time.perf_counter() - started, 4),
    }
    return LayerQuantization(codes=codes, scales=scales, zeros=zeros.to(torch.int32),
                             g_idx=g_idx.to(torch.int32), dequantized=Q, stats=stats)


# --- sequential over decoder blocks ---------------------------------------------------------------

def linear_groups(layer: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], first_rows: int,
                  true_sequential: bool) -> list[list[str]]:
    """The block's linears in call order, grouped by shared input (q/k/v, o, gate/up, down for llama)
    when ``true_sequential``, else all in one group. Found by one forward on one calibration row."""
    order: list[tuple[str, int]] = []
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, _name=name: order.append((_name, args[0].data_ptr()))))
    try:
        _run_block(layer, inputs[:1], kwargs, first_rows, 1)
    finally:
        for handle in handles:
            handle.remove()
    seen: list[str] = []
    groups: list[list[str]] = []
    previous_pointer = None
    for name, pointer in order:
        if name in seen:
            continue
        seen.append(name)
        # consecutive calls on the same input tensor (q/k/v, gate/up) form one group; only
        # consecutive ones, since a freed tensor's address may be reused later in the block
        if true_sequential and groups and pointer == previous_pointer:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_pointer = pointer
    if not true_sequential:
        groups = [seen]
    return groups


def gptq_quantize_blocks(model: nn.Module, tokens: torch.Tensor, settings: dict[str, Any],
                         make_module: Callable[[str, nn.Linear, LayerQuantization], nn.Module],
                         wanted: set[str] | None = None, batch: int = 8,
                         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize every decoder-block linear of ``model`` in place with GPTQ, block by block.

    ``settings`` has bits, group_size, sym, act_order, static_groups, true_sequential, percdamp,
    blocksize (and optionally group_aware, observer). ``make_module(full_name, linear, result)``
    builds the replacement module; ``wanted`` limits quantization to those full names. Returns
    per-layer stats and timings.
    """
    started = time.perf_counter()
    layers = decoder_layers(model)
    layers_prefix = next(n for n, m in model.named_modules() if m is layers)
    was_training = model.training
    model.eval()
    inputs, kwargs, first_rows = capture_block_inputs(model, layers, tokens, batch)
    capture_seconds = time.perf_counter() - started
    if not torch.isfinite(inputs).all():
        raise QBenchError("gptq: calibration activations at the input of the first block contain NaN/Inf; "
                          "check the model weights and compute dtype or the calibration data")
    per_layer: dict[str, dict[str, Any]] = {}
    for index, layer in enumerate(layers):
        block_started = time.perf_counter()
        prefix = f"{layers_prefix}.{index}."
        groups = linear_groups(layer, inputs, kwargs, first_rows, settings["true_sequential"])
        results: dict[str, LayerQuantization] = {}
        for group in groups:
            group = [n for n in group if wanted is None or prefix + n in wanted]
            if not group:
                continue
            # With true_sequential a group's linears read one input tensor (q/k/v, gate/up): one Hessian serves all.
            shared = settings["true_sequential"] and len(group) > 1
            accumulators = {n: HessianAccumulator(layer.get_submodule(n).in_features, inputs.device, prefix + n)
                            for n in (group[:1] if shared else group)}
            if shared:
                accumulators.update({n: accumulators[group[0]] for n in group[1:]})
            calls: set[str] = set()
            handles = []

            def collect(module, args, _name):
                if not shared or _name == group[0]:
                    accumulators[_name].add(args[0])
                calls.add(_name)
                if len(calls) == len(group):  # every input of this group seen: skip the rest
                    calls.clear()
                    raise _StopForward

            for n in group:
                handles.append(layer.get_submodule(n).register_forward_pre_hook(
                    lambda m, args, _n=n: collect(m, args, _n)))
            try:
                _run_block(layer, inputs, kwargs, first_rows, batch)
            finally:
                for handle in handles:
                    handle.remove()
            for n in group:
                linear = layer.get_submodule(n)
                result = gptq_quantize_weight(
                    linear.weight, accumulators[n].hessian, bits=settings["bits"],
                    group_size=settings["group_size"], sym=settings["sym"], act_order=settings["act_order"],
                    static_groups=settings["static_groups"], percdamp=settings["percdamp"],
                    blocksize=settings["blocksize"], name=prefix + n,
                    group_aware=settings.get("group_aware", False), observer=settings.get("observer", "minmax"))
                del accumulators[n]
                # later groups and the next block see this layer quantized, as in the reference
                linear.weight.data = result.dequantized.to(linear.weight.dtype)
                results[n] = result
                per_layer[prefix + n] = result.stats
                if log:
                    log(f"gptq {prefix + n}: loss {result.stats['loss']:.4g}, damp {result.stats['damp']:g}")
        outputs = torch.empty_like(inputs)
        _run_block(layer, inputs, kwargs, first_rows, batch, outputs)
        for n, result in results.items():
            _set_child(layer, n, make_module(prefix + n, layer.get_submodule(n), result))
        inputs = outputs
        if log:
            log(f"gptq block {index}: {time.perf_counter() - block_started:.1f}s")
    model.train(was_training)
    return {
        "layers": per_layer,
        "seconds": round(time.perf_counter() - started, 2),
        "capture_seconds": round(capture_seconds, 2),
        "damp_retries": sum(s["damp_retries"] for s in per_layer.values()),
    }


def _set_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, child = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, child, module)
