"""Method affine on tiny_llama: runs, accuracy by bit width, exact storage, the GPTQ grid, round trip."""
import copy

import pytest
import torch
from torch import nn

from qbench.kernels import affine, cpu_int4
from qbench.kernels.minmax_grid import minmax_scale_zero, quantize_to_grid
from qbench.method import quantized_modules
from qbench.params import QBenchError
from qbench.plugins.affine import Affine
from qbench.quant.affine import AffineLinear, storage_bytes


@pytest.fixture(scope="module")
def model_and_logits():
    from qbench.models import tiny_llama

    model = tiny_llama(seed=0)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return model, ids, logits


# (params, error bound, CPU path for the 48 input rows below): 4-bit layers run the int4 CPU path,
# except groups of 48 (the kernel's groups are 32/64/128/256, none of which tiles a group of 48);
# other widths the reference
INT4 = cpu_int4.kernel_path(48)
VARIANTS = [({"bits": 8}, 0.02, "reference"), ({"bits": 4}, 0.15, INT4), ({"bits": 4, "group_size": -1}, 0.15, INT4),
            ({"bits": 4, "group_size": 48, "sym": True}, 0.15, "reference"),
            ({"bits": 3, "group_size": 32}, 0.35, "reference")]


@pytest.mark.parametrize("params,bound,path", VARIANTS, ids=lambda p: str(p))
def test_runs_close_to_float_and_round_trips(model_and_logits, params, bound, path):
    model, ids, logits = model_and_logits
    quantized = Affine(**params).quantize(copy.deepcopy(model))
    modules = dict(quantized_modules(quantized))
    assert len(modules) == 14 and all(isinstance(m, AffineLinear) for m in modules.values())
    with torch.no_grad():
        out = quantized(ids).logits
    assert all(m.kernel_path == path for m in modules.values())
    error = ((out - logits).abs().max() / logits.abs().max()).item()
    assert 0 < error < bound
    rebuilt = copy.deepcopy(quantized)
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        clone = AffineLinear.from_stored({k: v.clone() for k, v in module.stored_tensors().items()}, module.config())
        setattr(rebuilt.get_submodule(parent), child, clone)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, out)


def test_more_bits_less_error(model_and_logits):
    model, ids, logits = model_and_logits
    errors = []
    for bits in (2, 4, 8):
        with torch.no_grad():
            out = Affine(bits=bits, group_size=32).quantize(copy.deepcopy(model))(ids).logits
        errors.append((out - logits).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]


def test_storage_bytes_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(576, 10, bias=False)  # the demo model's row width: groups 4 x 128 + 1 x 64
    layer = AffineLinear.from_linear(linear, 4, 128, False)
    assert layer.scales.shape == (10, 5)
    # codes 576 * 4 bits = 288 bytes/row; fp16 scales 5 * 2; zeros 5 * 4 bits -> 3 bytes/row
    assert layer.storage_bytes() == 10 * 288 + 10 * 5 * 2 + 10 * 3 == storage_bytes(10, 576, 4, 128)
    three = AffineLinear.from_linear(linear, 3, 128, False)
    assert three.storage_bytes() == 10 * 216 + 10 * 10 + 10 * 2  # 3-bit codes are dense: 576 * 3 / 8 = 216
    sym = AffineLinear.from_linear(linear, 4, -1, True)
    assert sym.storage_bytes() == 10 * 288 + 10 * 2  # one fp16 scale per row, no zeros stored
    biased = AffineLinear.from_linear(nn.Linear(576, 10), 8, 64, False)
    assert biased.storage_bytes() == 10 * 576 + 10 * 9 * 2 + 10 * 9 + 10 * 4  # + fp32 bias


def test_codes_are_the_gptq_rtn_grid(reference_path):
    torch.manual_seed(0)
    linear = nn.Linear(576, 6, bias=False)
    layer = AffineLinear.from_linear(linear, 4, 128, False)
    codes = affine.unpack_codes(layer.codes, 4, 576)
    w = linear.weight.detach()
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        scale, zero = minmax_scale_zero(w[:, lo:hi], 4)
        assert torch.equal(codes[:, lo:hi].float(), quantize_to_grid(w[:, lo:hi], scale, zero, 4))
        assert torch.equal(layer.scales[:, g:g + 1], scale.half())
    # the layer computes with exactly its dequantized weight (the reference path; the CPU kernel's
    # agreement with it is tested in tests/kernels/test_cpu_kernels.py)
    x = torch.randn(3, 576)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T)
    assert layer.kernel_path == "reference"


@pytest.mark.parametrize("params,match", [
    ({"bits": 1}, "valid values: 2, 3, 4, 5, 6, 7, 8"), ({"bits": 9}, "valid values: 2, 3, 4, 5, 6, 7, 8"),
    ({"group_size": 0}, "-1"), ({"group_size": -4}, "-1"),
])
def test_bad_parameters(params, match):
    with pytest.raises(QBenchError, match=match):
        Affine(**params)


def test_inf_weights_rejected():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[0, 0] = float("inf")
    with pytest.raises(QBenchError, match="inf"):
        AffineLinear.from_linear(linear, 4, 128, False)
