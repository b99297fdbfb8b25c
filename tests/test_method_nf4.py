"""Method nf4: registration, parameters, the quantized module (cache round trip, storage
accounting, autograd through frozen weights) and user errors."""
import json

import pytest
import torch
from torch import nn

from qbench.kernels import cpu_nf4
from qbench.method import quantizable_linears, quantized_modules
from qbench.models import tiny_llama
from qbench.params import QBenchError
from qbench.plugins.nf4 import NF4Method
from qbench.quant.nf4 import NF4Linear


def test_registered_as_a_plugin():
    from qbench import host

    assert host.methods().get("nf4") is NF4Method


@pytest.mark.parametrize("params", [{}, {"double_quant": "false", "blocksize": "128"}, {"quant_type": "fp4"},
                                    {"compute_dtype": "bfloat16"}])
def test_quantizes_every_decoder_linear(params, tiny_model):
    ids = torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_model(ids).logits
    n_linears = len(list(quantizable_linears(tiny_model)))
    method = NF4Method(**params)
    model = method.quantize(tiny_model)
    modules = list(quantized_modules(model))
    assert len(modules) == n_linears and all(isinstance(m, NF4Linear) for _, m in modules)
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == want.dtype
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    # rows of whole blocks run the packed CPU kernel, the others (176 columns at blocksize 64) the reference
    blocksize = method.values["blocksize"]
    assert {m.kernel_path for _, m in modules} == {
        cpu_nf4.kernel_path(ids.numel()) if m.in_features % blocksize == 0 else "reference" for _, m in modules}
    assert method.nominal_bits == 4


def test_label_shows_changed_params():
    assert NF4Method().label == "nf4"
    assert NF4Method(quant_type="fp4", double_quant=False).label == "nf4:double_quant=false,quant_type=fp4"


def test_cache_round_trip():
    linear = nn.Linear(96, 40)
    module = NF4Linear.from_linear(linear, blocksize=32, double_quant=True, quant_type="nf4")
    config = module.config()
    json.dumps(config)
    rebuilt = NF4Linear.from_stored({k: v.clone() for k, v in module.stored_tensors().items()}, config)
    x = torch.randn(3, 96)
    assert torch.equal(rebuilt(x), module(x))
    assert set(module.stored_tensors()) == {"packed", "absmax", "nested_absmax", "offset", "bias"}


def test_storage_accounting():
    linear = nn.Linear(1024, 256, bias=False)
    dq = NF4Linear.from_linear(linear, 64, True)
    plain = NF4Linear.from_linear(linear, 64, False)
    weights = 1024 * 256
    assert dq.storage_bytes() * 8 == weights * (4 + 8 / 64 + 32 / (64 * 256)) + 32  # + the fp32 offset
    assert round(dq.bits_per_weight, 3) == 4.127
    assert plain.bits_per_weight == 4.5
    assert dq.total_bytes() == dq.storage_bytes() + 16 * 4 + 256 * 4
    assert plain.total_bytes() == plain.storage_bytes() + 16 * 4


def test_nf4_beats_fp4_on_normal_weights():
    # The QLoRA paper's point: NF4 fits normally distributed weights better than FP4.
    linear = nn.Linear(512, 128, bias=False)
    nn.init.normal_(linear.weight)
    x = torch.eye(512)
    errors = {qt: (NF4Linear.from_linear(linear, quant_type=qt)(x) - linear(x)).pow(2).mean().item()
              for qt in ("nf4", "fp4")}
    assert errors["nf4"] < errors["fp4"]


def test_gradient_flows_to_the_input_not_the_weights():
    module = NF4Linear.from_linear(nn.Linear(64, 24))
    x = torch.randn(5, 64, requires_grad=True)
    module(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in module.parameters())


def test_non_finite_weights_name_the_layer():
    model = tiny_llama(seed=0)
    name, linear = next(iter(quantizable_linears(model)))
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(QBenchError, match=f"NaN or Inf.*{name}"):
        NF4Method().quantize(model)


@pytest.mark.parametrize("params,message", [({"blocksize": "100"}, "power of two"),
                                            ({"blocksize": "16"}, "power of two"),
                                            ({"quant_type": "int4"}, "valid values: nf4, fp4"),
                                            ({"compute_dtype": "int8"}, "valid values"),
                                            ({"double_quant": "maybe"}, "true or false"),
                                            ({"group_size": "64"}, "unknown parameter")])
def test_bad_parameters(params, message):
    with pytest.raises(QBenchError, match=message):
        NF4Method(**params)


def test_the_dequantize_then_matmul_path_runs_what_it_records(monkeypatch):
    """Where a layer records triton-dequant+torch-matmul it must take the Triton launcher (which
    chooses that path), not the torch reference: a check on the recorded name once sent it there."""
    import qbench.quant.nf4 as layer_module
    from qbench.kernels.nf4_matmul import DEQUANT_MATMUL_PATH
    from qbench.quant.nf4 import NF4Linear

    calls = []
    monkeypatch.setattr(layer_module, "use_triton_in_module", lambda x: True)
    monkeypatch.setattr(layer_module, "cuda_kernel_path", lambda x: DEQUANT_MATMUL_PATH)
    monkeypatch.setattr(layer_module, "nf4_linear",
                        lambda x, q, bias, use_triton: calls.append(use_triton) or x[..., :8])
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 8))
    layer.cpu_kernel = False
    layer(torch.randn(16, 64))
    assert layer.kernel_path == DEQUANT_MATMUL_PATH and calls == [True]
