"""Read and write the 4-bit layout transformers + bitsandbytes put in safetensors checkpoints.

Per quantized linear ``<name>`` (what ``bnb.nn.Linear4bit`` saves with
``QuantState.as_dict(packed=True)``):

* ``<name>.weight``: the packed codes, uint8 ``[ceil(out*in/2), 1]`` (two codes a byte, the
  first in the high nibble);
* ``<name>.weight.absmax``: fp32 per block, or the uint8 codes of the double quantization;
* ``<name>.weight.quant_map``: the 16-entry code book (fp32);
* ``<name>.weight.nested_absmax`` / ``.nested_quant_map``: fp32 per 256 blocks and the 256-entry
  dynamic map, only with double quantization;
* ``<name>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object
  ``{"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype",
  "nested_offset"]}``;
* ``<name>.bias`` when the layer has one.

Code books other than bitsandbytes' own are refused (they would not decode the same).
No pickle anywhere: safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qbench.dtypes import FLOAT_DTYPES, dtype_name
from qbench.kernels.nf4 import DYNAMIC_MAP, NESTED_BLOCKSIZE, QUANT_TYPES, NF4Tensor, check_settings, code_book
from qbench.method import quantizable_linears, set_submodule
from qbench.params import QBenchError
from qbench.quant.nf4 import NF4Linear

QUANT_STATE_KEY = "quant_state.bitsandbytes__"


def quant_state_tensors(q: NF4Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes writes for a quantized weight (``prefix`` = "weight"
    inside a module, or the full ``<name>.weight``)."""
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": dtype_name(q.dtype),
            "shape": list(q.shape)}
    out = {prefix: q.packed.reshape(-1, 1), f"{prefix}.absmax": q.absmax,
           f"{prefix}.quant_map": code_book(q.quant_type).clone()}
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = q.nested_absmax
        out[f"{prefix}.nested_quant_map"] = DYNAMIC_MAP.clone()
        meta.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                     "nested_offset": q.offset.item()})
    out[f"{prefix}.{QUANT_STATE_KEY}{q.quant_type}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                                     dtype=torch.uint8)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def quant_state_key(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> str | None:
    """The ``...quant_state.bitsandbytes__*`` key of ``prefix`` in ``tensors``, if any."""
    for qt in QUANT_TYPES:
        key = f"{prefix}.{QUANT_STATE_KEY}{qt}"
        if key in tensors:
            return key
    return None


def nf4_tensor_from_state(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
    """Rebuild an :class:`NF4Tensor` from bitsandbytes' state-dict entries under ``prefix``."""
    key = quant_state_key(tensors, prefix)
    if key is None:
        raise QBenchError(f"{prefix}: no {QUANT_STATE_KEY}nf4/fp4 entry; not a bitsandbytes 4-bit weight")
    meta = json.loads(bytes(tensors[key].to(torch.uint8).cpu().tolist()).decode("utf-8"))
    quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
    check_settings(blocksize, quant_type)
    if meta.get("dtype") not in FLOAT_DTYPES:
        raise QBenchError(f"{prefix}: unsupported weight dtype {meta.get('dtype')!r}; valid: {', '.join(FLOAT_DTYPES)}")
    quant_map = tensors.get(f"{prefix}.quant_map")
    if quant_map is not None and not torch.equal(quant_map.float().cpu(), code_book(quant_type)):
        raise QBenchError(f"{prefix}: its quant_map is not bitsandbytes' {quant_type} code book; cannot decode it")
    packed = tensors[prefix]
    packed = (packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)).reshape(-1)
    q = NF4Tensor(packed=packed, absmax=tensors[f"{prefix}.absmax"].reshape(-1), shape=tuple(meta["shape"]),
                  dtype=FLOAT_DTYPES[meta["dtype"]], blocksize=blocksize, quant_type=quant_type)
    if f"{prefix}.nested_absmax" in tensors:
        nested_map = tensors.get(f"{prefix}.nested_quant_map")
        if nested_map is not None and not torch.equal(nested_map.float().cpu(), DYNAMIC_MAP):
            raise QBenchError(f"{prefix}: its nested_quant_map is not the signed dynamic map; cannot decode it")
        if int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise QBenchError(f"{prefix}: nested_blocksize {meta['nested_blocksize']} is not supported (only 256)")
        q.absmax = q.absmax.to(torch.uint8)
        q.nested_absmax = tensors[f"{prefix}.nested_absmax"].float().reshape(-1)
        q.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    else:
        q.absmax = q.absmax.float()
    if q.packed.numel() != (q.numel + 1) // 2:
        raise QBenchError(f"{prefix}: {q.packed.numel()} packed bytes do not hold shape {tuple(q.shape)}")
    return q


def layer_state_dict(module: NF4Linear, name: str) -> dict[str, torch.Tensor]:
    out = quant_state_tensors(module.q, f"{name}.weight")
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().contiguous().cpu()
    return out


def save_nf4_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` as transformers + bitsandbytes would: NF4Linear layers in bitsandbytes'
    4-bit layout, every other tensor as is (tied tensors written once, as transformers does)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            tensors.update(layer_state_dict(module, name))
            skip.update(f"{name}.{k}" for k, _ in module.named_parameters())
            skip.update(f"{name}.{k}" for k, _ in module.named_buffers())
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip or value is None:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights (lm_head = embeddings): transformers stores one copy
            continue
        seen.add(ptr)
        tensors[key] = value.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_nf4_checkpoint(model: nn.Module, path: str | Path, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a safetensors checkpoint in the bitsandbytes 4-bit layout into ``model`` (a float model
    of the same architecture): every decoder linear with a 4-bit quant state becomes an
    :class:`NF4Linear`; the other tensors load as they are."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    used: set[str] = set()
    for name, linear in list(quantizable_linears(model)):
        prefix = f"{name}.weight"
        if quant_state_key(tensors, prefix) is None:
            continue
        q = nf4_tensor_from_state(tensors, prefix)
        if tuple(q.shape) != tuple(linear.weight.shape):
            raise QBenchError(f"{name}: checkpoint weight shape {tuple(q.shape)} != model {tuple(linear.weight.shape)}")
        q = q.to(linear.weight.device)
        bias = tensors.get(f"{name}.bias")
        set_submodule(model, name, NF4Linear(q, None if bias is None else bias.to(linear.weight.device), compute_dtype))
        used.update(k for k in tensors if k == prefix or k.startswith(prefix + ".") or k == f"{name}.bias")
    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise QBenchError(f"checkpoint {path} has tensors the model does not: {unexpected[:3]}")
    return model
