"""llm-compressor as a peer (llmc-gptq, llmc-awq, llmc-smoothquant): its oneshot runs on CPU, the
storage is the compressed-tensors checkpoint layout, and at matching settings its error is the size
of our own implementation's."""
import pytest
import torch

from qbench import host
from qbench.method import quantizable_linears, quantized_modules
from qbench.models import ByteTokenizer, tiny_llama
from qbench.params import QBenchError
from qbench.suites.memory import quantized_layer_bytes

pytest.importorskip("llmcompressor")


class TokenCalibration:
    tokenizer = ByteTokenizer()

    def sample(self, nsamples, seqlen, seed=0):
        return torch.randint(3, 259, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


TOKENS = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(5))
CALIBRATION = {"nsamples": "4", "seqlen": "64"}


def _model():
    return tiny_llama(seed=0, intermediate=192)  # every row width a multiple of 32


def _relative_error(spec, params):
    reference = _model()
    with torch.no_grad():
        expected = reference(TOKENS).logits
    model = host.make_method(spec, {**params, **CALIBRATION}).quantize(_model(), TokenCalibration())
    assert not list(quantizable_linears(model)), "every decoder linear is replaced"
    with torch.no_grad():
        got = model(TOKENS).logits
    return model, float((got - expected).norm() / expected.norm())


def _shapes(model):
    return [(m.out_features, m.in_features) for _, m in quantized_modules(model)]


def test_llmc_gptq_stores_packed_int4_and_matches_our_gptq():
    model, theirs = _relative_error("llmc-gptq", {"group_size": "32"})
    _, ours = _relative_error("gptq", {"group_size": "32", "sym": "false", "act_order": "true",
                                       "static_groups": "true"})
    assert 0 < theirs < 0.2 and abs(theirs - ours) < 0.2 * ours
    stored, _ = quantized_layer_bytes(model)
    # weight_packed: 8 codes per int32; fp32 scales per group; zero points packed 8 per int32 down the
    # output rows; weight_shape: two int64
    expected = sum(o * i // 2 + o * (i // 32) * 4 + -(-o // 8) * (i // 32) * 4 + 16 for o, i in _shapes(model))
    assert stored == expected
    assert {m.kernel_path for _, m in quantized_modules(model)} == {"llmcompressor-fake-quant"}


def test_llmc_smoothquant_matches_ours_and_stores_int8_with_an_input_scale():
    _, theirs = _relative_error("llmc-smoothquant", {"activations": "dynamic"})
    _, ours = _relative_error("smoothquant", {"activations": "dynamic"})
    assert 0 < theirs < 0.05 and abs(theirs - ours) < 0.2 * ours
    model, static = _relative_error("llmc-smoothquant", {})
    assert static < 0.05
    first = next(m for _, m in quantized_modules(model))
    assert {k: v.dtype for k, v in first.stored_tensors().items()} == {
        "weight": torch.int8, "weight_scale": torch.float32, "input_scale": torch.float32}
    assert quantized_layer_bytes(model)[0] == sum(o * i + o * 4 + 4 for o, i in _shapes(model))


def test_llmc_awq_runs_and_is_close_to_ours():
    model, theirs = _relative_error("llmc-awq", {"group_size": "32"})
    _, ours = _relative_error("awq", {"group_size": "32", "duo_scaling": "true", "clip": "false"})
    assert 0 < theirs < 0.2 and 0.6 < theirs / ours < 1.6
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, _model().model.layers[0].input_layernorm.weight)  # its scales were folded


def test_group_size_must_divide_every_row():
    method = host.make_method("llmc-awq", {"group_size": "64"})
    with pytest.raises(QBenchError, match="96 input columns, not a multiple of group_size=64.*use group_size=16 or 32"):
        method.quantize(tiny_llama(seed=0, intermediate=192, hidden=96, heads=4, kv_heads=2), TokenCalibration())
