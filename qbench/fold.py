"""Exact per-channel rescaling inside a decoder block, shared by AWQ and SmoothQuant.

Where the input ``x`` of some linears is the output of an operation ``prev`` that is linear per
channel (an RMSNorm's weight, or another linear's output rows), dividing ``prev``'s output channel
``c`` by ``s[c]`` and multiplying the consumers' input column ``c`` by ``s[c]`` leaves the block's
function unchanged: ``(W diag(s)) (x / s) = W x``. AWQ chooses ``s`` to protect the weights that
see large activations; SmoothQuant to move activation outliers into the weights.

The sites of a llama-style block (:func:`block_sites`):

* ``attn_in``: ``input_layernorm`` -> ``q_proj, k_proj, v_proj`` (compared at ``self_attn``'s output)
* ``attn_out``: ``v_proj`` -> ``o_proj``. With grouped-query attention ``o_proj`` has ``heads x
  head_dim`` input channels and ``v_proj`` ``kv_heads x head_dim`` outputs; query head ``h`` reads
  kv head ``h // (heads / kv_heads)``, so ``o_proj``'s input channel ``(h, d)`` is a copy of
  ``v_proj``'s output ``(h // group, d)``. A scale on ``v_proj``'s outputs folds exactly when
  ``o_proj``'s columns get the scale of the channel they copy (:attr:`ScaleSite.source`).
* ``mlp_in``: ``post_attention_layernorm`` -> ``gate_proj, up_proj`` (compared at ``mlp``'s output)
* ``mlp_out``: ``up_proj`` -> ``down_proj`` (``down(act(gate x) * up x)`` is linear in up's rows)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qbench.params import QBenchError

LLAMA_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class ScaleSite:
    """One place where a per-channel scale folds exactly: ``linears`` read the output of ``prev``."""

    name: str
    prev: str  # submodule of the block: a norm (weight [channels]) or a linear (output rows)
    linears: list[str]  # the consumers, in call order
    inspect: str  # the submodule whose output AWQ's search compares (attention, MLP, or the linear)
    source: torch.Tensor | None = None  # consumer input column -> prev output channel (None: the same)

    @property
    def prev_is_linear(self) -> bool:
        return self.name in ("attn_out", "mlp_out")

    def to_consumer(self, values: torch.Tensor) -> torch.Tensor:
        """Values per ``prev`` channel -> values per consumer input column."""
        return values if self.source is None else values[self.source.to(values.device)]

    def to_prev(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """Values per consumer input column -> per ``prev`` channel (``mean`` or ``amax`` of the copies)."""
        if self.source is None:
            return values
        channels = int(self.source.max()) + 1
        out = torch.zeros(channels, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, self.source.to(values.device), values, reduce, include_self=False)


def _kv_source(attn: nn.Module, v_out: int, o_in: int) -> torch.Tensor | None:
    """The ``v_proj`` output channel each ``o_proj`` input column copies (GQA), or None when it
    cannot be told from the attention module."""
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or v_out % head_dim or o_in % head_dim:
        return None
    kv_heads, heads = v_out // head_dim, o_in // head_dim
    if heads % kv_heads:
        return None
    group = heads // kv_heads
    column = torch.arange(o_in)
    return (column // head_dim // group) * head_dim + column % head_dim


def block_sites(layer: nn.Module, who: str) -> tuple[list[ScaleSite], list[str]]:
    """The scale sites of a llama-style decoder block, and notes on sites left out."""
    missing = [name for name in LLAMA_MODULES if not _has(layer, name)]
    if missing:
        raise QBenchError(f"{who}: the decoder block ({type(layer).__name__}) has no {missing[0]}; scale folding "
                          "supports llama-style blocks (input_layernorm, self_attn.q/k/v/o_proj, "
                          "post_attention_layernorm, mlp.gate/up/down_proj)")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if not isinstance(getattr(layer.get_submodule(norm), "weight", None), torch.Tensor):
            raise QBenchError(f"{who}: {norm} ({type(layer.get_submodule(norm)).__name__}) has no weight to fold "
                              "scales into")
    sites = [ScaleSite("attn_in", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                       "self_attn")]
    notes = []
    v_proj, o_proj = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    if v_proj.out_features == o_proj.in_features:
        sites.append(ScaleSite("attn_out", "self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    else:
        source = _kv_source(layer.get_submodule("self_attn"), v_proj.out_features, o_proj.in_features)
        if source is None:
            notes.append(f"v_proj -> o_proj not scaled: {v_proj.out_features} outputs do not map onto "
                         f"{o_proj.in_features} inputs by whole heads")
        else:
            sites.append(ScaleSite("attn_out", "self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj", source))
    sites.append(ScaleSite("mlp_in", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
    sites.append(ScaleSite("mlp_out", "mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"))
    return sites, notes


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def fold_scales(layer: nn.Module, site: ScaleSite, scales: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the consumers' input columns by
    them (computed in fp32, stored back in each tensor's dtype)."""
    scales = scales.detach().float()
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise QBenchError(f"scale folding at {site.name}: scales must be finite and positive")
    prev = layer.get_submodule(site.prev)
    if site.prev_is_linear:
        prev.weight.copy_(prev.weight.float() / scales.to(prev.weight.device)[:, None])
    else:
        prev.weight.copy_(prev.weight.float() / scales.to(prev.weight.device))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_(prev.bias.float() / scales.to(prev.bias.device))
    columns = site.to_consumer(scales)
    for name in site.linears:
        linear = layer.get_submodule(name)
        linear.weight.copy_(linear.weight.float() * columns.to(linear.weight.device)[None, :])


def folded_parameter_names(layer: nn.Module, prefix: str, sites: list[ScaleSite]) -> list[str]:
    """Full names of the norm parameters the sites change (the linears are replaced by quantized modules)."""
    names = []
    for site in sites:
        if site.prev_is_linear:
            continue
        for pname, _ in layer.get_submodule(site.prev).named_parameters(recurse=False):
            names.append(f"{prefix}{site.prev}.{pname}")
    return names


def check_same_function(reference: torch.Tensor, folded: torch.Tensor, who: str, where: str) -> float:
    """Raise when folding changed the output beyond rounding; return the relative difference."""
    tolerance = 1e-3 if reference.dtype == torch.float32 and folded.dtype == torch.float32 else 3e-2
    reference, folded = reference.float(), folded.float()
    scale = reference.abs().max().clamp(min=1e-6)
    relative = float((reference - folded).abs().max() / scale)
    if not relative <= tolerance:
        raise QBenchError(f"{who}: folding the scales changed the output of {where} (max relative difference "
                          f"{relative:.2g}); this block's norm or MLP does not fold like llama's")
    return relative
