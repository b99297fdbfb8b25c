"""Method gptq: the algorithm's quality against RTN, act-order, dead columns, the damping retry path,
NaN handling, the quantized module and GPTQ checkpoint interop."""
import json

import pytest
import torch

from qbench.kernels import cpu_int4
from qbench.kernels.gptq_pack import packed_rows
from qbench.kernels.minmax_grid import fake_quantize, minmax_scale_zero
from qbench.method import quantizable_linears, quantized_modules
from qbench.models import ByteTokenizer, tiny_llama
from qbench.params import QBenchError
from qbench.plugins import gptq as gptq_plugin
from qbench.plugins.gptq import GPTQ, GPTQLinear, load_gptq_checkpoint, save_gptq_checkpoint
from qbench.quant.gptq import HessianAccumulator, gptq_quantize_weight, inverse_cholesky

TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the budget. "
        "Quantization maps each weight to a small grid; GPTQ corrects the rounding error of each column "
        "with the inverse Hessian of the layer inputs, so the outputs change less than with rounding. ")


class TextCalibration:
    """Stand-in for qbench.data.Calibration: random windows of real text through ByteTokenizer."""

    def __init__(self, text: str = TEXT * 40):
        self.ids = torch.tensor(ByteTokenizer().encode(text))

    def sample(self, nsamples, seqlen, seed=0):
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, self.ids.numel() - seqlen, (nsamples,), generator=gen)
        return torch.stack([self.ids[s:s + seqlen] for s in starts.tolist()])


def _layer_inputs(model, tokens):
    """Inputs of every quantizable linear of the float model on ``tokens``: {name: [rows, in]}."""
    inputs, handles = {}, []
    for name, linear in quantizable_linears(model):
        handles.append(linear.register_forward_pre_hook(
            lambda m, args, _n=name: inputs.__setitem__(_n, args[0].reshape(-1, args[0].shape[-1]).detach())))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return inputs


def _rtn(weight, bits, group_size, sym):
    """RTN straight from the shared min-max grid: per-group scale/zero, round to nearest."""
    out = torch.empty_like(weight)
    step = weight.shape[1] if group_size == -1 else group_size
    for start in range(0, weight.shape[1], step):
        block = weight[:, start:start + step]
        scale, zero = minmax_scale_zero(block, bits, sym)
        out[:, start:start + step] = fake_quantize(block, scale, zero, bits)
    return out


@pytest.fixture(scope="module")
def float_model_and_inputs():
    model = tiny_llama(seed=0)
    tokens = TextCalibration().sample(8, 64, seed=1)
    return model, _layer_inputs(model, tokens)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (4, -1), (3, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_on_every_layer(float_model_and_inputs, bits, group_size, act_order):
    model, inputs = float_model_and_inputs
    for name, linear in quantizable_linears(model):
        X = inputs[name]
        acc = HessianAccumulator(X.shape[1])
        acc.add(X)
        W = linear.weight.detach()
        result = gptq_quantize_weight(W, acc.hessian, bits=bits, group_size=group_size, sym=True,
                                      act_order=act_order)
        gptq_error = torch.linalg.norm(X @ W.t() - X @ result.dequantized.t())
        rtn_error = torch.linalg.norm(X @ W.t() - X @ _rtn(W, bits, group_size, True).t())
        assert gptq_error < rtn_error, f"{name}: GPTQ {gptq_error:.4g} >= RTN {rtn_error:.4g}"
        # the reported errors (from H) tell the same story as the direct measurement
        assert result.stats["output_error"] < result.stats["rtn_output_error"]


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx_and_codes_reproduce_the_algorithm_weights(float_model_and_inputs, static_groups,
                                                                   reference_path):
    model, inputs = float_model_and_inputs
    name, linear = next((n, m) for n, m in quantizable_linears(model) if n.endswith("mlp.down_proj"))
    acc = HessianAccumulator(linear.in_features)
    acc.add(inputs[name])
    result = gptq_quantize_weight(linear.weight, acc.hessian, bits=4, group_size=32, sym=False,
                                  act_order=True, static_groups=static_groups)
    natural = torch.arange(linear.in_features) // 32
    if static_groups:
        assert torch.equal(result.g_idx, natural.to(torch.int32))
    else:
        assert not torch.equal(result.g_idx, natural.to(torch.int32))  # groups follow the permutation
        assert torch.equal(torch.bincount(result.g_idx.long()), torch.bincount(natural))  # 5x32 + 16
    module = GPTQLinear.from_quantization(linear, result, 4, 32, False, True)
    assert torch.equal(module.dequantized_weight(), result.dequantized)
    x = inputs[name][:5]
    torch.testing.assert_close(module(x), x @ result.dequantized.t(), rtol=1e-5, atol=1e-5)


def test_dead_columns_are_zero_and_finite():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 40, generator=gen)
    X[:, [3, 17, 39]] = 0
    acc = HessianAccumulator(40)
    acc.add(X)
    W = torch.randn(24, 40, generator=gen)
    result = gptq_quantize_weight(W, acc.hessian, bits=4, group_size=32, act_order=True)
    assert result.stats["dead_columns"] == 3
    assert torch.isfinite(result.dequantized).all()
    assert (result.dequantized[:, [3, 17, 39]] == 0).all()


def test_hessian_not_positive_definite_retries_with_more_damping():
    H = torch.eye(16)
    H[0, 1] = H[1, 0] = 2.0  # eigenvalue -1: the default 1% damping cannot fix it
    upper, damp, retries = inverse_cholesky(H, 0.01)
    assert retries >= 2 and damp >= 1.0 and torch.isfinite(upper).all()
    result = gptq_quantize_weight(torch.randn(8, 16), H, bits=4, group_size=-1)
    assert result.stats["damp_retries"] >= 2 and result.stats["damp"] > 0.01
    with pytest.raises(QBenchError, match="not positive definite"):
        inverse_cholesky(-1e6 * torch.eye(4), 0.01, max_retries=2)


def test_method_quantizes_tiny_llama_and_reports(tmp_path):
    model = tiny_llama(seed=0, max_len=128)
    tokens = TextCalibration().sample(2, 48, seed=3)
    with torch.no_grad():
        reference = model(tokens).logits
    method = GPTQ(bits=4, group_size=32, nsamples=16, seqlen=2048, act_order=True)
    assert method.needs_calibration
    method.quantize(model, TextCalibration())
    modules = dict(quantized_modules(model))
    assert len(modules) == 14 and all(isinstance(m, GPTQLinear) for m in modules.values())
    assert not list(quantizable_linears(model))
    report = method.report
    # seqlen capped at the model's length
    assert report["calibration"] == {"nsamples": 16, "seqlen": 128, "seed": 0, "device_default": False}
    assert set(report["layers"]) == set(modules)
    for stats in report["layers"].values():
        assert stats["output_error"] <= stats["rtn_output_error"]
        assert stats["damp"] == 0.01 and stats["damp_retries"] == 0
    with torch.no_grad():
        quantized = model(tokens).logits
    assert next(iter(modules.values())).kernel_path == cpu_int4.kernel_path(tokens.numel())  # act-order
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    # the module's stored tensors are all of its state
    module = modules["model.layers.0.mlp.down_proj"]
    assert set(module.stored_tensors()) == {"qweight", "qzeros", "scales", "g_idx"}
    assert module.storage_bytes() == (packed_rows(176, 4) * 64 * 4 + 6 * packed_rows(64, 4) * 4
                                      + 6 * 64 * 2 + 176 * 4)
    rebuilt = GPTQLinear.from_stored(module.stored_tensors(), json.loads(json.dumps(module.config())))
    x = torch.randn(3, 176)
    assert torch.equal(rebuilt(x), module(x))


@pytest.mark.parametrize("bits,sym", [(3, True), (2, False), (8, True)])
def test_other_bit_widths_and_asymmetric_grid(bits, sym):
    model = tiny_llama(seed=1, layers=1)
    method = GPTQ(bits=bits, group_size=64, sym=sym, nsamples=4, seqlen=64, true_sequential=False)
    method.quantize(model, TextCalibration())
    modules = dict(quantized_modules(model))
    assert len(modules) == 7 and all(m.bits == bits for m in modules.values())
    errors = [(s["output_error"], s["rtn_output_error"]) for s in method.report["layers"].values()]
    assert sum(e for e, _ in errors) < sum(r for _, r in errors)


def test_cpu_default_calibration_is_small():
    class Recorder(TextCalibration):
        def sample(self, nsamples, seqlen, seed=0):
            self.asked = (nsamples, seqlen, seed)
            return super().sample(4, 32, seed)

    calibration = Recorder()
    method = GPTQ(group_size=-1)
    method.quantize(tiny_llama(layers=1, max_len=1024), calibration)
    assert calibration.asked == (32, 512, 0)
    assert method.report["calibration"]["device_default"] is True


def test_bad_parameters_and_missing_calibration():
    with pytest.raises(QBenchError, match="bits"):
        GPTQ(bits=5)
    with pytest.raises(QBenchError, match="group_size"):
        GPTQ(group_size=100)
    with pytest.raises(QBenchError, match="calibration"):
        GPTQ().quantize(tiny_llama(layers=1), None)


def test_nan_in_calibration_activations_is_a_clear_error():
    model = tiny_llama(seed=0, layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[50:] = float("nan")
    with pytest.raises(QBenchError, match="NaN/Inf"):
        GPTQ(nsamples=2, seqlen=32).quantize(model, TextCalibration())


def test_saved_checkpoint_reloads_bit_identically(tmp_path):
    model = tiny_llama(seed=0)
    GPTQ(bits=4, group_size=32, nsamples=4, seqlen=64, act_order=True, sym=True).quantize(model, TextCalibration())
    directory = save_gptq_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config == json.loads((directory / "quantize_config.json").read_text())
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": True,
         "checkpoint_format": "gptq"}
    reloaded = load_gptq_checkpoint(directory)
    originals = dict(quantized_modules(model))
    for name, module in quantized_modules(reloaded):
        for key, tensor in module.stored_tensors().items():
            assert torch.equal(tensor, originals[name].stored_tensors()[key]), (name, key)
    tokens = TextCalibration().sample(2, 40)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reloaded(tokens).logits)


def test_zero_point_of_zero_uses_gptq_v2_and_round_trips(tmp_path):
    model = tiny_llama(seed=0, layers=1)
    with torch.no_grad():  # an all-positive row: the asymmetric grid's zero point is 0
        model.model.layers[0].mlp.up_proj.weight[0].abs_()
    GPTQ(bits=4, group_size=-1, sym=False, nsamples=4, seqlen=64).quantize(model, TextCalibration())
    formats = {m.checkpoint_format for _, m in quantized_modules(model)}
    assert "gptq_v2" in formats
    directory = save_gptq_checkpoint(model, tmp_path / "v2")
    assert json.loads((directory / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    reloaded = load_gptq_checkpoint(directory)
    originals = dict(quantized_modules(model))
    for name, module in quantized_modules(reloaded):
        assert torch.equal(module.dequantized_weight(), originals[name].dequantized_weight())


def _hand_pack_4bit(codes_kn):
    """AutoGPTQ's v1 loop, written out: word i of a column ORs code 8i+j shifted by 4j."""
    K, N = codes_kn.shape
    out = torch.zeros(K // 8, N, dtype=torch.int64)
    for i in range(K // 8):
        for j in range(8):
            out[i] |= codes_kn[8 * i + j].to(torch.int64) << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_hand_built_gptq_checkpoint_loads_and_matches_reference_dequant(tmp_path, reference_path):
    from safetensors.torch import save_file

    model = tiny_llama(seed=2, layers=1)
    gen = torch.Generator().manual_seed(0)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected = {}
    for name, linear in quantizable_linears(model):
        K, N, gs = linear.in_features, linear.out_features, 32
        G = (K + gs - 1) // gs
        codes = torch.randint(0, 16, (K, N), generator=gen)
        zeros = torch.randint(0, 15, (G, N), generator=gen)  # as stored: zero - 1
        scales = (torch.rand(G, N, generator=gen) * 0.02).half()
        g_idx = (torch.arange(K) // gs).to(torch.int32)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = _hand_pack_4bit(codes)
        state[f"{name}.qzeros"] = _hand_pack_4bit(zeros.t()).t().contiguous()
        state[f"{name}.scales"] = scales
        state[f"{name}.g_idx"] = g_idx
        expected[name] = (scales.float()[g_idx.long()] * (codes - (zeros[g_idx.long()] + 1))).t()
    save_file(state, str(tmp_path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": False, "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(config, default=str))
    loaded = load_gptq_checkpoint(tmp_path)
    modules = dict(quantized_modules(loaded))
    assert set(modules) == set(expected)
    for name, module in modules.items():
        assert torch.equal(module.dequantized_weight(), expected[name])
    x = torch.randn(2, 64)
    q_proj = modules["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(q_proj(x), x @ expected["model.layers.0.self_attn.q_proj"].t(), rtol=1e-5, atol=1e-5)


def test_plugin_registers_the_method():
    found = []
    gptq_plugin.register_methods(found.append)
    assert found == [GPTQ]
