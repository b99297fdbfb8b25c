"""Method int8-absmax on tiny_llama: runs, accuracy, storage, static vs dynamic scales, round trip."""
import copy

import pytest
import torch
from torch import nn

from qbench.kernels import cpu_int8
from qbench.method import quantized_modules
from qbench.params import QBenchError
from qbench.plugins.int8_absmax import Int8Absmax, Int8AbsmaxLinear


class RandomCalibration:
    """Stand-in for qbench.data.Calibration: random token windows for the byte-level tiny model."""

    def __init__(self):
        self.calls = []

    def sample(self, nsamples, seqlen, seed=0):
        self.calls.append((nsamples, seqlen, seed))
        return torch.randint(3, 259, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


VARIANTS = [
    {}, {"granularity": "tensor"}, {"granularity": "block", "block_size": 48},
    {"activations": "dynamic"}, {"activations": "static"},
    {"activations": "static", "observer": "percentile", "percentile": 99.9},
]


def cpu_path(params, rows) -> str:
    """The CPU kernel each variant runs: ATen's int8 weight-only kernel (or the bf16 GEMM for many rows),
    torch._int_mm for W8A8, and the reference for per-block scales (no such kernel)."""
    if params.get("activations", "none") != "none":
        return "cpu:int_mm"
    return "reference" if params.get("granularity") == "block" else cpu_int8.kernel_path(rows)


@pytest.fixture(scope="module")
def model_and_logits():
    from qbench.models import tiny_llama

    model = tiny_llama(seed=0)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return model, ids, logits


def _quantize(model, **params):
    method = Int8Absmax(**params)
    calibration = RandomCalibration() if method.needs_calibration else None
    if calibration is not None:
        params.setdefault("nsamples", 4)
        params.setdefault("seqlen", 32)
        method = Int8Absmax(**params)
    return method.quantize(copy.deepcopy(model), calibration)


@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_runs_close_to_float_and_round_trips(model_and_logits, params):
    model, ids, logits = model_and_logits
    quantized = _quantize(model, **params)
    modules = dict(quantized_modules(quantized))
    assert len(modules) == 14 and all(isinstance(m, Int8AbsmaxLinear) for m in modules.values())
    with torch.no_grad():
        out = quantized(ids).logits
    assert all(m.kernel_path == cpu_path(params, ids.numel()) for m in modules.values())
    error = (out - logits).abs().max() / logits.abs().max()
    assert 0 < error < (0.1 if params.get("observer") == "percentile" else 0.05)  # clipping costs a little more
    # rebuild every layer from what it stores: identical outputs
    rebuilt = copy.deepcopy(quantized)
    for name, module in modules.items():
        clone = Int8AbsmaxLinear.from_stored({k: v.clone() for k, v in module.stored_tensors().items()},
                                             module.config())
        rebuilt.get_submodule(name.rpartition(".")[0]).__setattr__(name.rpartition(".")[2], clone)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, out)


def test_storage_bytes_by_hand(model_and_logits):
    model = model_and_logits[0]
    channel = dict(quantized_modules(_quantize(model)))["model.layers.0.mlp.down_proj"]
    assert (channel.out_features, channel.in_features) == (64, 176)
    assert channel.storage_bytes() == 64 * 176 + 64 * 4  # int8 codes + one fp32 scale per row
    tensor = dict(quantized_modules(_quantize(model, granularity="tensor")))["model.layers.0.mlp.down_proj"]
    assert tensor.storage_bytes() == 64 * 176 + 4
    modules = dict(quantized_modules(_quantize(model, granularity="block", block_size=48)))
    block = modules["model.layers.0.mlp.down_proj"]
    assert block.storage_bytes() == 64 * 176 + 64 * 4 * 4  # 176 = 3 x 48 + 32: four blocks per row
    static = dict(quantized_modules(_quantize(model, activations="static")))["model.layers.0.mlp.down_proj"]
    assert static.storage_bytes() == 64 * 176 + 64 * 4 + 4  # + the calibrated activation absmax


def test_static_scales_are_fixed_dynamic_follow_input(model_and_logits):
    model = model_and_logits[0]
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    static = dict(quantized_modules(_quantize(model, activations="static")))["model.layers.0.self_attn.q_proj"]
    dynamic = dict(quantized_modules(_quantize(model, activations="dynamic")))["model.layers.0.self_attn.q_proj"]
    before = static.act_absmax.clone()
    assert before > 0
    with torch.no_grad():
        y_static, y_static_big = static(x), static(x * 50)
        y_dynamic, y_dynamic_big = dynamic(x), dynamic(x * 50)
    assert torch.equal(static.act_absmax, before)  # running on new inputs never moves the scale
    # dynamic per-token scales scale with the input: identical codes, outputs exactly 50x
    # (x50 is exact in fp32 for these values up to rounding of the product)
    torch.testing.assert_close(y_dynamic_big, 50 * y_dynamic, rtol=1e-5, atol=1e-5)
    # static: inputs beyond the calibrated range clamp, so the output is not 50x
    assert (y_static_big - 50 * y_static).abs().max() > 0.1 * (50 * y_static).abs().max()


def test_static_observers(model_and_logits):
    model = model_and_logits[0]
    with_max = dict(quantized_modules(_quantize(model, activations="static")))
    with_pct = dict(quantized_modules(_quantize(model, activations="static", observer="percentile", percentile=90.0)))
    for name, module in with_max.items():
        assert with_pct[name].act_absmax < module.act_absmax


def test_static_uses_the_calibration_object(model_and_logits):
    calibration = RandomCalibration()
    method = Int8Absmax(activations="static", nsamples=3, seqlen=16)
    assert method.needs_calibration and not Int8Absmax().needs_calibration
    method.quantize(copy.deepcopy(model_and_logits[0]), calibration)
    assert calibration.calls == [(3, 16, 0)]
    with pytest.raises(QBenchError, match="calibration"):
        method.quantize(copy.deepcopy(model_and_logits[0]), None)


def test_w8a8_reference_is_the_integer_scheme():
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    layer = Int8AbsmaxLinear.from_linear(linear, "channel", 64, "dynamic")
    x = torch.randn(3, 40)
    xa = x.abs().amax(1, keepdim=True)
    xq = torch.round(x * (127 / xa)).to(torch.int64)
    acc = xq @ layer.weight_codes.to(torch.int64).T  # exact integers
    expected = acc.float() * (xa / 127) * layer.weight_scale + linear.bias
    torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_per_tensor_worse_than_per_channel_with_outlier_row():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight[7] *= 60  # one outlier output channel
    x = torch.randn(16, 64)
    errors = {}
    for granularity in ("tensor", "channel"):
        layer = Int8AbsmaxLinear.from_linear(linear, granularity, 64, "none")
        with torch.no_grad():
            errors[granularity] = (layer(x) - linear(x)).pow(2).mean().item()
    assert errors["tensor"] > 5 * errors["channel"]


@pytest.mark.parametrize("params,match", [
    ({"observer": "median"}, "valid values: max, percentile"),
    ({"granularity": "row"}, "valid values: tensor, channel, block"),
    ({"activations": "always"}, "valid values: none, dynamic, static"),
    ({"granularity": "block", "activations": "dynamic"}, "weight-only"),
    ({"observer": "percentile"}, "static"),
    ({"activations": "static", "observer": "percentile", "percentile": 0}, "percentile"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_parameters(params, match):
    with pytest.raises(QBenchError, match=match):
        Int8Absmax(**params)


def test_nan_weights_rejected():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    with pytest.raises(QBenchError, match="NaN"):
        Int8AbsmaxLinear.from_linear(linear, "channel", 64, "none")
