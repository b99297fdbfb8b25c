"""Bit-compatibility with bitsandbytes (a test-only dependency; skipped cleanly without it):
packed codes, absmax codes, nested absmax, offset and dequantized weights are identical, and
the transformers + bitsandbytes safetensors layout round-trips in both directions."""
import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
from safetensors.torch import load_file, save_file  # noqa: E402

from qbench.formats.bnb_nf4 import load_nf4_checkpoint, nf4_tensor_from_state, quant_state_tensors, save_nf4_checkpoint  # noqa: E402
from qbench.kernels.nf4 import (  # noqa: E402
    DYNAMIC_MAP,
    FP4_CODE,
    NF4_CODE,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_nf4,
    quantize_nf4_reference,
)
from qbench.quant.nf4 import NF4Linear  # noqa: E402

CPU = torch.device("cpu")


def test_code_books_are_bitsandbytes_own():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, F.create_dynamic_map(signed=True))


# Shapes whose rows are at least one block long (or odd): bitsandbytes' CPU dequantize kernel
# indexes blocks per row there as everywhere else (see the test below for shorter rows).
CASES = [((13, 100), 32), ((7, 257), 64), ((3, 1000), 128), ((4, 512), 256), ((3, 777), 512),
         ((2, 2048), 1024), ((2, 2049), 2048), ((1, 4099), 4096)]


@pytest.mark.parametrize("shape,blocksize", CASES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_identical_to_bitsandbytes(shape, blocksize, quant_type, double_quant):
    dtype = [torch.float32, torch.float16, torch.bfloat16][blocksize % 3]
    gen = torch.Generator().manual_seed(blocksize)
    w = (torch.randn(shape, generator=gen) * (torch.rand(shape[0], 1, generator=gen) * 4)).to(dtype)
    w.view(-1)[blocksize: 2 * blocksize] = 0  # an all-zero block
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    want = F.dequantize_4bit(packed, state)
    quantizers = [quantize_nf4_reference] + ([quantize_nf4] if w.numel() < 3000 else [])  # interpreter is slow
    for quantize in quantizers:
        q = quantize(w, blocksize, double_quant, quant_type)
        assert torch.equal(q.packed, packed.reshape(-1))
        assert torch.equal(q.absmax, state.absmax)
        if double_quant:
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            assert torch.equal(q.offset, state.offset)
        assert torch.equal(dequantize_nf4_reference(q), want)
    assert torch.equal(dequantize_nf4(q), want)


def test_double_quant_rounding_matches_bitsandbytes_table():
    # Many absmax values sitting near dynamic-map entries and their midpoints: bitsandbytes rounds
    # through a 65536-cell table, not to the exact nearest entry; we must do the same.
    gen = torch.Generator().manual_seed(1)
    block_max = DYNAMIC_MAP[torch.randint(0, 256, (700,), generator=gen)].abs() + 1.5
    w = torch.randn(700, 64, generator=gen)
    w = w / w.abs().amax(1, keepdim=True) * block_max[:, None]
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4_reference(w, 64, True, "nf4")
    assert torch.equal(q.absmax, state.absmax) and torch.equal(q.nested_absmax, state.state2.absmax)


def test_short_rows_follow_bitsandbytes_flat_blocks():
    # Rows shorter than a block: blocks run across rows (as bitsandbytes quantizes, and as its
    # CUDA / default dequantize decode). Its CPU C dequantize kernel disagrees with its own
    # quantizer there, so compare against the default (torch) backend it ships.
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    compute = getattr(default_ops, "_dequantize_4bit_compute", None)
    if compute is None:
        pytest.skip("bitsandbytes default backend changed")
    w = torch.randn(64, 64)
    packed, state = F.quantize_4bit(w, blocksize=256, compress_statistics=False, quant_type="nf4")
    want = compute(packed.reshape(-1), state.absmax, NF4_CODE, 256, (64, 64), torch.float32)
    assert torch.equal(dequantize_nf4_reference(quantize_nf4_reference(w, 256, False)), want)


def _bnb_linear(weight, bias, quant_type, double_quant, blocksize):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, blocksize=blocksize)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128)])
def test_bitsandbytes_checkpoint_loads_into_nf4linear(tmp_path, quant_type, double_quant, blocksize):
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(12, 130, generator=gen), torch.randn(12, generator=gen)
    layer = _bnb_linear(weight, bias, quant_type, double_quant, blocksize)
    state = layer.state_dict()
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bnb.safetensors")
    tensors = load_file(tmp_path / "bnb.safetensors")
    ours = NF4Linear(nf4_tensor_from_state(tensors, "weight"), tensors["bias"])
    x = torch.randn(5, 130, generator=gen)
    dequantized = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(ours(x), x @ dequantized.t() + bias)
    assert torch.equal(dequantize_nf4_reference(ours.q), dequantized)


@pytest.mark.parametrize("quant_type,double_quant,blocksize",
                         [("nf4", True, 64), ("fp4", True, 32), ("nf4", False, 256)])
def test_our_checkpoint_loads_into_bitsandbytes(tmp_path, quant_type, double_quant, blocksize):
    w = torch.randn(10, 333, dtype=torch.float16)
    q = quantize_nf4_reference(w, blocksize, double_quant, quant_type)
    save_file(quant_state_tensors(q, "weight"), tmp_path / "ours.safetensors")
    tensors = load_file(tmp_path / "ours.safetensors")
    meta = json.loads(bytes(tensors[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["shape"] == [10, 333] and meta["dtype"] == "float16" and meta["blocksize"] == blocksize
    state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"},
                                   device=CPU)
    assert torch.equal(F.dequantize_4bit(tensors["weight"], state), dequantize_nf4_reference(q))
    # ... and a Linear4bit built from it the way transformers loads a pre-quantized checkpoint
    layer = bnb.nn.Linear4bit(333, 10, bias=False, quant_type=quant_type)
    stats = {k: v for k, v in tensors.items() if k != "weight"}
    layer.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device="cpu", module=layer)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), dequantize_nf4_reference(q))


def test_whole_model_round_trip(tmp_path, tiny_model):
    from qbench.models import tiny_llama
    from qbench.plugins.nf4 import NF4Method

    quantized = NF4Method().quantize(tiny_model)
    save_nf4_checkpoint(quantized, tmp_path / "model.safetensors")
    loaded = load_nf4_checkpoint(tiny_llama(seed=1), tmp_path / "model.safetensors")
    ids = torch.randint(3, 259, (1, 9))
    assert torch.equal(loaded(ids).logits, quantized(ids).logits)
