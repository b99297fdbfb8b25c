"""Methods awq and smoothquant: the folding is exact (with and without grouped-query attention), the
searches measure what is stored, both beat their plain counterparts where activations have outliers,
the cache keeps the folded norms, and bad parameters get one line."""
import pytest
import torch

from qbench import host
from qbench.cache import quantize_cached
from qbench.calibrate import decoder_layers
from qbench.fold import block_sites, fold_scales
from qbench.method import quantized_modules
from qbench.models import tiny_llama
from qbench.params import QBenchError
from qbench.plugins.affine import Affine, AffineLinear
from qbench.plugins.awq import AWQ, awq_blocks, fake_quantize, search_clip
from qbench.plugins.int8_absmax import Int8Absmax, Int8AbsmaxLinear
from qbench.plugins.smoothquant import SmoothQuant, smooth_model


class TokenCalibration:
    """Stand-in for qbench.data.Calibration: random token windows (a seeded generator)."""

    def __init__(self, vocab: int = 259):
        self.vocab = vocab

    def sample(self, nsamples, seqlen, seed=0):
        gen = torch.Generator().manual_seed(1000 + seed)
        return torch.randint(3, self.vocab, (nsamples, seqlen), generator=gen)

    def describe(self):
        return {"dataset": "random tokens"}


def _tokens(rows=2, seqlen=48, seed=7):
    return torch.randint(3, 259, (rows, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _with_outliers(kv_heads=2, factor=40.0):
    """A tiny llama whose RMSNorm weights have a few huge channels (the consumers' columns divided by the
    same factor, so the float function is unchanged): the activation outliers AWQ and SmoothQuant address."""
    model = tiny_llama(seed=0, kv_heads=kv_heads)
    for layer in decoder_layers(model):
        for site in block_sites(layer, "test")[0]:
            if site.name in ("attn_in", "mlp_in"):
                channels = layer.get_submodule(site.prev).weight.shape[0]
                scales = torch.ones(channels)
                scales[[3, 17, 40]] = 1 / factor
                fold_scales(layer, site, scales)
    return model


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_folding_random_scales_keeps_the_function(kv_heads):
    model = tiny_llama(seed=0, kv_heads=kv_heads)
    tokens = _tokens()
    before = _logits(model, tokens)
    gen = torch.Generator().manual_seed(0)
    names = []
    for layer in decoder_layers(model):
        sites, notes = block_sites(layer, "test")
        assert notes == []
        names.append([site.name for site in sites])
        for site in sites:
            channels = layer.get_submodule(site.prev).weight.shape[0]
            fold_scales(layer, site, torch.rand(channels, generator=gen) * 20 + 0.05)
    assert names[0] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    after = _logits(model, tokens)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    # a wrong GQA mapping (o_proj's columns scaled as if they were v_proj's channels tiled) breaks it
    if kv_heads == 2:
        layer = decoder_layers(model)[0]
        site = block_sites(layer, "test")[0][1]
        assert site.source is not None and site.source.tolist()[:3] == [0, 1, 2]
        wrong = site.source.clone()
        site.source = torch.arange(wrong.numel()) % (wrong.max() + 1)
        fold_scales(layer, site, torch.rand(int(wrong.max()) + 1, generator=gen) + 0.5)
        assert (_logits(model, tokens) - before).abs().max() > 1e-3


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_awq_scaling_before_quantization_keeps_the_function(kv_heads):
    model = _with_outliers(kv_heads)
    tokens = _tokens()
    before = _logits(model, tokens)
    norm = decoder_layers(model)[0].input_layernorm.weight.detach().clone()
    settings = {"bits": 4, "group_size": 16, "alpha_grid": 10, "duo_scaling": False, "clip": False}
    run = awq_blocks(model, TokenCalibration().sample(4, 32), settings)
    assert not torch.equal(decoder_layers(model)[0].input_layernorm.weight, norm)  # scales were folded
    assert (_logits(model, tokens) - before).abs().max() <= 1e-5 * before.abs().max()
    assert "model.layers.0.input_layernorm.weight" in run["folded"]
    for block in run["blocks"].values():
        for site in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            assert block[site]["loss"] <= block[site]["rtn_loss"]
        assert block["attn_in"]["alpha"] > 0  # the planted outliers make scaling pay


def test_fake_quantize_is_what_affine_stores():
    linear = torch.nn.Linear(80, 24)  # 80 = 2 x 32 + a shorter last group of 16
    stored = AffineLinear.from_linear(linear, 3, 32, False).dequantized_weight()
    assert torch.equal(fake_quantize(linear.weight.data, 3, 32), stored)


def test_clip_search_never_worse_than_no_clip_on_its_tokens():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=gen)
    weight[torch.arange(32), torch.randint(0, 64, (32,), generator=gen)] = 6.0  # one lone outlier per row
    x = torch.randn(600, 64, generator=gen)  # < 1024 tokens: the search uses all of them

    def error(w):
        return ((x @ fake_quantize(w, 3, 32).t() - x @ weight.t()) ** 2).mean(0)

    clipped = search_clip(weight, x, 3, 32)
    assert (clipped != weight).any(dim=1).sum() >= 8  # rows where clipping paid
    assert (error(clipped) <= error(weight) + 1e-6).all()
    assert error(clipped).sum() < 0.95 * error(weight).sum()


def _output_error(model, reference, tokens):
    return float(((_logits(model, tokens) - reference) ** 2).mean())


def test_awq_beats_round_to_nearest_where_activations_have_outliers():
    tokens = _tokens(rows=4, seqlen=64, seed=3)
    reference = _logits(_with_outliers(), tokens)
    awq = AWQ(bits=3, group_size=32, nsamples=8, seqlen=64).quantize(_with_outliers(), TokenCalibration())
    rtn = Affine(bits=3, group_size=32).quantize(_with_outliers())
    modules = dict(quantized_modules(awq))
    assert modules and all(isinstance(m, AffineLinear) and m.config()["bits"] == 3 for m in modules.values())
    assert set(modules) == {name for name, _ in quantized_modules(rtn)}
    assert _output_error(awq, reference, tokens) < 0.7 * _output_error(rtn, reference, tokens)


def test_smoothing_keeps_the_function_and_flattens_the_activations():
    model = _with_outliers(kv_heads=2)
    tokens = _tokens()
    before = _logits(model, tokens)
    run = smooth_model(model, TokenCalibration().sample(4, 32), 0.5, "all")
    assert (_logits(model, tokens) - before).abs().max() <= 1e-5 * before.abs().max()
    assert len(run["folded"]) == 4  # two norms in each of the two blocks
    assert set(run["scale_spread"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_smoothquant_beats_plain_w8a8_where_activations_have_outliers(activations):
    tokens = _tokens(rows=4, seqlen=64, seed=3)
    reference = _logits(_with_outliers(factor=200.0), tokens)
    smooth = SmoothQuant(activations=activations, nsamples=4, seqlen=64).quantize(
        _with_outliers(factor=200.0), TokenCalibration())
    plain = Int8Absmax(activations=activations, nsamples=4, seqlen=64).quantize(
        _with_outliers(factor=200.0), TokenCalibration())
    modules = [m for _, m in quantized_modules(smooth)]
    assert modules and all(isinstance(m, Int8AbsmaxLinear) and m.activations == activations for m in modules)
    assert _output_error(smooth, reference, tokens) < 0.5 * _output_error(plain, reference, tokens)


@pytest.mark.parametrize("spec", ["awq:bits=4,group_size=16,alpha_grid=4,nsamples=2,seqlen=32",
                                  "smoothquant:targets=all,nsamples=2,seqlen=32"])
def test_cache_keeps_the_folded_norms(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path))
    name, _, raw = spec.partition(":")
    params = dict(item.split("=") for item in raw.split(","))
    info = {"name": "tiny-llama", "source": "random (seed 0)"}
    tokens = _tokens()
    fresh, first = quantize_cached(host.make_method(name, params), tiny_llama(seed=0), info, torch.float32,
                                   torch.device("cpu"), TokenCalibration)
    assert first["from_cache"] is False
    method = host.make_method(name, params)
    reloaded, second = quantize_cached(method, tiny_llama(seed=0), info, torch.float32, torch.device("cpu"),
                                       TokenCalibration)
    assert second["from_cache"] is True
    assert torch.equal(_logits(fresh, tokens), _logits(reloaded, tokens))
    assert torch.equal(reloaded.model.layers[1].post_attention_layernorm.weight,
                       fresh.model.layers[1].post_attention_layernorm.weight)


@pytest.mark.parametrize("name, params, needle", [
    ("awq", {"bits": "9"}, "bits"),
    ("awq", {"group_size": "0"}, "group_size"),
    ("awq", {"alpha_grid": "0"}, "alpha_grid"),
    ("awq", {"clip": "maybe"}, "clip"),
    ("awq", {"nsamples": "-1"}, "nsamples"),
    ("smoothquant", {"alpha": "1.5"}, "alpha"),
    ("smoothquant", {"activations": "none"}, "activations"),
    ("smoothquant", {"targets": "mlp"}, "targets"),
    ("smoothquant", {"activations": "dynamic", "observer": "percentile"}, "observer"),
])
def test_parameter_errors_are_one_line(name, params, needle):
    with pytest.raises(QBenchError) as error:
        host.make_method(name, params)
    message = str(error.value)
    assert "\n" not in message and needle in message and name in message


def test_methods_listed_with_their_parameters():
    from click.testing import CliRunner

    from qbench.cli import main

    listing = CliRunner().invoke(main, ["methods"]).stdout
    for needle in ("awq", "alpha_grid", "smoothquant", "targets"):
        assert needle in listing


def test_ema_observer_is_llm_compressors_moving_average_of_each_windows_range():
    """observer=ema: the first window's min and max, each moved 1% toward every later window's, and
    the larger magnitude of the two (llm-compressor's MinMaxObserver, averaging_constant 0.01)."""
    from qbench.quant.int8 import observe_activation_absmax

    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(1, 1)

        def forward(self, ids):
            return self.proj(ids.float().reshape(-1, 1))

    windows = torch.tensor([[-3, 2], [-1, 10], [0, 4]])
    got = observe_activation_absmax(Echo(), windows, ["proj"], "ema", 99.99)["proj"]
    low, high = -3.0, 2.0
    for w_low, w_high in ((-1.0, 10.0), (0.0, 4.0)):
        low, high = low + 0.01 * (w_low - low), high + 0.01 * (w_high - high)
    assert got.item() == pytest.approx(max(abs(low), abs(high)))
    assert observe_activation_absmax(Echo(), windows, ["proj"], "max", 99.99)["proj"].item() == 10.0
