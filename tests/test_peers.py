"""Peer libraries as methods: torchao, optimum-quanto and HQQ, each registered only when importable,
run through the same suites, their storage counted from the tensors the library keeps."""
import pytest
import torch

from qbench import host
from qbench.method import quantizable_linears, quantized_modules
from qbench.params import QBenchError, QBenchSkip
from qbench.records import read_records
from qbench.suites.memory import quantized_layer_bytes
from tests.helpers import qbench_cli


def quantized(method_spec: str, params: dict, model):
    method = host.make_method(method_spec, params)
    reference_input = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        before = model(reference_input).logits
    model = method.quantize(model)
    assert not list(quantizable_linears(model)), "every decoder linear is replaced"
    with torch.no_grad():
        after = model(reference_input).logits
    return model, (after - before).norm().item() / before.norm().item()


def layer_shapes(model):
    return [(m.out_features, m.in_features) for _, m in quantized_modules(model)]


def test_torchao_int8_counts_codes_scales_and_zero_points(tiny_model):
    pytest.importorskip("torchao")
    model, error = quantized("torchao-int8", {}, tiny_model)
    assert error < 0.02
    stored, weights = quantized_layer_bytes(model)
    # int8 codes + one fp32 scale and one int8 zero point per output row, as torchao keeps them
    assert stored == sum(o * i + o * 4 + o * 1 for o, i in layer_shapes(model))
    assert {m.kernel_path for _, m in quantized_modules(model)} == {"torchao-int8wo (Int8Tensor)"}


def test_torchao_int4_needs_whole_groups_and_bfloat16_on_cuda(tiny_model):
    pytest.importorskip("torchao")
    message = "64 input columns, not a multiple of group_size=128.*use group_size=16 or 32 or 64"
    with pytest.raises(QBenchError, match=message):
        host.make_method("torchao-int4", {"group_size": 128}).quantize(tiny_model)
    method = host.make_method("torchao-int4", {})
    with pytest.raises(QBenchSkip, match="needs bfloat16"):  # checked before any CUDA call
        method.config_for(torch.device("cuda"), torch.float16)
    model, error = quantized("torchao-int4", {"group_size": 16}, tiny_model)
    assert error < 0.3
    stored, weights = quantized_layer_bytes(model)
    # on CPU torchao keeps each int4 code in an int8 byte, with fp32 scale and int8 zero per group
    assert stored == sum(o * i + (o * i // 16) * (4 + 1) for o, i in layer_shapes(model))


def test_quanto_int8_codes_are_ours_per_channel(tiny_model):
    """Same format (symmetric absmax, one scale per row): quanto's codes equal int8-absmax's."""
    pytest.importorskip("optimum.quanto")
    from qbench.kernels.absmax import quantize as absmax_quantize

    weights = {n: linear.weight.detach().clone() for n, linear in quantizable_linears(tiny_model)}
    model, error = quantized("quanto-int8", {}, tiny_model)
    assert error < 0.02
    for name, module in quantized_modules(model):
        codes, _ = absmax_quantize(weights[name], dim=1)
        assert torch.equal(module.stored_tensors()["weight.data"], codes), name


def test_hqq_stores_packed_codes_and_fp16_group_parameters(tiny_model):
    pytest.importorskip("hqq")
    model, error = quantized("hqq", {"bits": 4, "group_size": 32}, tiny_model)
    assert error < 0.3
    stored, weights = quantized_layer_bytes(model)
    # two 4-bit codes per byte + fp16 scale and fp16 zero per group of 32 = 4 + 32/32 bits per weight
    assert stored * 8 / weights == pytest.approx(5.0)
    assert {m.kernel_path for _, m in quantized_modules(model)} == {"hqq-dequantize"}


def test_peers_register_only_when_importable(monkeypatch):
    from qbench.plugins import peer_hqq, peer_quanto, peer_torchao

    registered = []
    for module in (peer_torchao, peer_quanto, peer_hqq):
        monkeypatch.setattr(module, "importable", lambda name: False)
        module.register_methods(registered.append)
    assert registered == []


def test_peers_go_through_qbench_run_like_our_methods(tmp_path):
    for library in ("torchao", "optimum.quanto", "hqq"):
        pytest.importorskip(library)
    out = tmp_path / "run"
    result = qbench_cli("run", "--methods", "int8-absmax,quanto-int8,torchao-int8,hqq", "--models", "tiny-llama",
                        "--suites", "perplexity:seqlen=64", "--limit", "1", "--out", str(out),
                        # our fp32 reference path (the CPU kernel rounds activations to bf16)
                        env_extra={"QBENCH_CACHE_DIR": str(tmp_path / "cache"), "QBENCH_CPU_KERNEL": "reference"})
    assert result.returncode == 0, result.stderr
    ppl = {r["method"]["label"]: r["metrics"]["ppl"]["value"] for r in read_records(out / "records.jsonl")}
    assert set(ppl) == {"int8-absmax", "quanto-int8", "torchao-int8", "hqq"}
    # the same codes and scales: the same model, up to float summation order
    assert ppl["quanto-int8"] == pytest.approx(ppl["int8-absmax"], rel=1e-4)
    board = qbench_cli("report", str(out), "--format", "csv")
    assert board.returncode == 0 and "torchao-int8wo" in board.stdout
