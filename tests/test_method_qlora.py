"""The lora and qlora methods: training, PEFT round trip, cache rebuild, bad input (tiny_llama only)."""
import json
import os

import pytest
import torch

from qbench.formats.peft import load_peft_adapter, save_peft_adapter
from qbench.method import quantized_modules
from qbench.models import tiny_llama
from qbench.params import QBenchError
from qbench.plugins.lora import LoRAMethod
from qbench.quant.lora import lora_modules


class WindowData:
    """Stands in for the runner's training data: ``sample(n, seqlen, seed)`` token windows."""

    def __init__(self, ntokens=4000, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: a repeated short random phrase
        phrase = torch.randint(3, 259, (37,), generator=g)
        self.ids = phrase.repeat(ntokens // 37 + 1)[:ntokens]

    def sample(self, n, seqlen, seed=0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, self.ids.numel() - seqlen, (n,), generator=g)
        return torch.stack([self.ids[s:s + seqlen] for s in starts.tolist()])


FAST = dict(steps=8, batch_size=2, seqlen=32, lr=1e-2, eval_windows=2, r=4, alpha=8)


def _randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_trains_and_loss_falls(tmp_path):
    model = tiny_llama()
    method = LoRAMethod(**FAST, adapter_dir=str(tmp_path / "adapter"))
    method.quantize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    metrics = method.train(model, None, WindowData())
    assert metrics["eval_loss_after"].value < metrics["eval_loss_before"].value - 0.05
    assert metrics["loss_last"].value < metrics["loss_first"].value
    assert 0 < metrics["trainable_pct"].value < 20
    # 2 layers x 7 linears, each r*(in+out)
    expected = sum(m.r * (m.in_features + m.out_features) for _, m in lora_modules(model))
    assert metrics["trainable_params"].value == expected and len(lora_modules(model)) == 14
    for n, p in model.named_parameters():  # the frozen parts did not move
        if n in before:
            assert torch.equal(p, before[n]), n
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left
    assert metrics["tokens_per_s"].value > 0 and metrics["peak_memory_bytes"].value > 0


def test_lora_cache_round_trip():
    model = tiny_llama()
    LoRAMethod(r=4).quantize(model)
    _randomize_b(model)
    x = torch.randint(3, 259, (2, 16))
    ref = model(x).logits
    for name, module in list(quantized_modules(model)):
        rebuilt = type(module).from_stored(module.stored_tensors(), json.loads(json.dumps(module.config())))
        assert set(module.stored_tensors()) >= {"weight", "lora_A", "lora_B"}
        from qbench.method import set_submodule
        set_submodule(model, name, rebuilt)
    torch.testing.assert_close(model(x).logits, ref)


def test_peft_loads_our_adapter_on_float_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    LoRAMethod(r=4, alpha=8, target_modules="q_proj+v_proj+down_proj").quantize(model)
    _randomize_b(model)
    save_peft_adapter(model, tmp_path / "a", "tiny-llama")
    x = torch.randint(3, 259, (2, 16))
    ours = model(x).logits
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    theirs_model.eval()
    theirs = theirs_model(input_ids=x).logits
    assert not torch.allclose(ours, tiny_llama()(x).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and back: a fresh model with zero B loads the adapter and gives the same logits
    again = tiny_llama()
    LoRAMethod(r=4, alpha=8, target_modules="q_proj+v_proj+down_proj").quantize(again)
    load_peft_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(x).logits, ours)


def test_save_replaces_whole_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama(layers=1)
    LoRAMethod(r=2).quantize(model)
    save_peft_adapter(model, tmp_path / "a")
    _randomize_b(model)
    def boom(*a, **k):
        raise KeyboardInterrupt  # killed midway through writing
    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        save_peft_adapter(model, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(KeyboardInterrupt):
        save_peft_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("params, match", [
    (dict(r=0), "rank must be >= 1"),
    (dict(dropout=1.5), "dropout"),
    (dict(optimizer="sgd"), "valid values"),
])
def test_bad_params(params, match):
    with pytest.raises(QBenchError, match=match):
        LoRAMethod(**params)


@pytest.mark.parametrize("params, match", [
    (dict(r=40), "larger than layer"),  # k_proj is 32x64 in tiny_llama
    (dict(target_modules="qkv_proj"), "unknown target module 'qkv_proj'"),
])
def test_bad_model_fit(params, match):
    with pytest.raises(QBenchError, match=match):
        LoRAMethod(**params).quantize(tiny_llama(layers=1))


@pytest.mark.parametrize("params, data, match", [
    (dict(seqlen=1024), WindowData(), "above the model's limit of 512"),
    (dict(seqlen=64, batch_size=4), WindowData(ntokens=200), "fewer than one batch"),
])
def test_bad_train_input(params, data, match):
    model = tiny_llama(layers=1)
    method = LoRAMethod(r=2, **params)
    method.quantize(model)
    with pytest.raises(QBenchError, match=match) as err:
        method.train(model, None, data)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ qlora

from qbench.plugins.qlora import QLoRAMethod  # noqa: E402
from qbench.quant.lora import QLoRALinear  # noqa: E402
from qbench.quant.nf4 import NF4Linear  # noqa: E402


def _swap_rebuilt(model):
    from qbench.method import set_submodule
    for name, module in list(quantized_modules(model)):
        config = json.loads(json.dumps(module.config()))
        set_submodule(model, name, type(module).from_stored(dict(module.stored_tensors()), config))


def test_qlora_trains_and_cache_rebuilds_fine_tuned_model():
    model = tiny_llama()
    method = QLoRAMethod(**FAST)
    method.quantize(model)
    assert all(isinstance(m, QLoRALinear) for _, m in quantized_modules(model))
    metrics = method.train(model, None, WindowData())
    assert metrics["eval_loss_after"].value < metrics["eval_loss_before"].value - 0.05
    assert metrics["optimizer_state_host_bytes"].value == 8 * metrics["trainable_params"].value
    _, module = next(iter(quantized_modules(model)))
    stored = module.stored_tensors()
    assert {"packed", "absmax", "nested_absmax", "offset", "lora_A", "lora_B"} <= set(stored)
    assert stored["packed"].dtype == torch.uint8 and stored["absmax"].dtype == torch.uint8  # double quant
    assert stored["lora_B"].abs().sum() > 0  # trained
    x = torch.randint(3, 259, (2, 16))
    ref = model(x).logits
    _swap_rebuilt(model)
    torch.testing.assert_close(model(x).logits, ref)


def test_qlora_target_subset_quantizes_the_rest_without_adapters():
    model = tiny_llama(layers=1)
    QLoRAMethod(r=2, target_modules="q_proj+v_proj").quantize(model)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in quantized_modules(model)}
    assert kinds["q_proj"] is QLoRALinear and kinds["v_proj"] is QLoRALinear
    assert kinds["o_proj"] is NF4Linear and kinds["down_proj"] is NF4Linear
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)


def test_qlora_adapter_loads_in_peft_on_dequantized_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    QLoRAMethod(r=4, alpha=8).quantize(model)
    _randomize_b(model)
    save_peft_adapter(model, tmp_path / "a")
    base = tiny_llama()  # the original float model, with the NF4-rounded weights the adapter was trained on
    for name, module in lora_modules(model):
        with torch.no_grad():
            base.get_submodule(name).weight.copy_(module.dequantized_weight())
    x = torch.randint(3, 259, (2, 16))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()(input_ids=x).logits
    torch.testing.assert_close(theirs, model(x).logits, rtol=1e-5, atol=1e-5)


def test_fused_module_path_matches_reference(monkeypatch):
    """The module's Triton path (forced on CPU under the interpreter) against its torch path."""
    import qbench.quant.lora as lora_layers
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=True)
    layer = QLoRALinear.from_linear(linear, r=3, alpha=6, dropout=0.0, generator=g)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    x = torch.randn(2, 5, 40, generator=g)
    outs, grads = [], []
    for fused in (False, True):
        monkeypatch.setattr(lora_layers, "use_triton_in_module", lambda t, f=fused: f)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        assert layer.kernel_path == ("triton" if fused else "reference")
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append((xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        layer.lora_A.grad = layer.lora_B.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_qlora_bad_input():
    with pytest.raises(QBenchError, match="blocksize"):
        QLoRAMethod(blocksize=48)
    with pytest.raises(QBenchError, match="larger than layer"):
        QLoRAMethod(r=33).quantize(tiny_llama(layers=1))
