"""Calibration plumbing shared by the methods that calibrate block by block (GPTQ, AWQ).

The decoder blocks are found (:func:`decoder_layers`), the calibration windows are run through the
model up to the input of block 0 (:func:`capture_block_inputs`), and from then on each block (or a
part of it) is run on those inputs in chunks (:func:`run_block`), with the keyword arguments the
model passed to the block (attention mask, position embeddings...) sliced to the chunk. A hook may
raise :class:`StopForward` once it has what it needs; the rest of that chunk's forward is skipped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench.params import QBenchError


class StopForward(Exception):
    """Raised from a hook once the wanted inputs are captured: the rest of the forward is skipped."""


def decoder_layers(model: nn.Module, who: str = "gptq") -> nn.ModuleList:
    """The decoder blocks of a Hugging Face llama-style model (``model.model.layers``)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise QBenchError(f"{who}: cannot find the decoder blocks (expected model.model.layers, as in llama-style models)")


def fit_batch(value: Any, full: int, rows: int) -> Any:
    """Slice tensors captured for a batch of ``full`` rows down to ``rows`` (the last, shorter chunk)."""
    if rows == full or full == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() > 0 and value.shape[0] == full else value
    if isinstance(value, (tuple, list)):
        return type(value)(fit_batch(v, full, rows) for v in value)
    return value


def block_output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor,
                         batch: int) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Inputs of block 0 for every calibration row, and the keyword arguments the model passed
    (attention mask, position embeddings...), captured for the first chunk of ``batch`` rows."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    call_kwargs: dict[str, Any] = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        if not call_kwargs:
            call_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            call_kwargs["_rows"] = hidden.shape[0]
        raise StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch):
                try:
                    model(tokens[start:start + batch].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    first_rows = call_kwargs.pop("_rows")
    call_kwargs.pop("past_key_values", None)
    call_kwargs.pop("past_key_value", None)
    call_kwargs["use_cache"] = False
    return torch.cat(captured), call_kwargs, first_rows


def run_block(layer: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], first_rows: int, batch: int,
              outputs: torch.Tensor | None = None) -> None:
    """Run ``layer`` over all rows in chunks; a hook may stop each chunk early (:class:`StopForward`).
    ``layer`` may be a block or a part of one (attention, MLP, a linear: pass ``kwargs={}``)."""
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            chunk = inputs[start:start + batch]
            chunk_kwargs = {k: fit_batch(v, first_rows, chunk.shape[0]) for k, v in kwargs.items()}
            try:
                result = layer(chunk, **chunk_kwargs)
            except StopForward:
                continue
            if outputs is not None:
                outputs[start:start + chunk.shape[0]] = block_output(result)


def collect_outputs(module: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], first_rows: int,
                    batch: int) -> torch.Tensor:
    """``module``'s outputs over all rows of ``inputs``, run in chunks as :func:`run_block` does."""
    outputs = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            chunk = inputs[start:start + batch]
            chunk_kwargs = {k: fit_batch(v, first_rows, chunk.shape[0]) for k, v in kwargs.items()}
            outputs.append(block_output(module(chunk, **chunk_kwargs)))
    return torch.cat(outputs)
