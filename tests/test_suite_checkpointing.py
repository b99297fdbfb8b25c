"""The checkpointing suite: exact saved-tensor accounting (recompute included), equal gradients."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qbench.memory import SavedTensorMeter
from qbench.models import tiny_llama
from qbench.params import QBenchError
from qbench.suite import CellContext
from qbench.suites.checkpointing import CheckpointingSuite, grads_of, set_trainable, training_step, verdict


def _ctx(model, method_name="qlora"):
    method = type("M", (), {"name": method_name, "can_train": method_name in ("qlora", "lora")})()
    return CellContext(model=model, tokenizer=None, model_info={}, method=method, device=torch.device("cpu"),
                       dtype=torch.float32, dataset=None, limit=None, seed=0)


def _block(x):
    return torch.exp(torch.sin(x))  # sin saves its input, exp its output


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_meter_counts_exact_bytes_including_recompute(use_checkpoint):
    weight = torch.nn.Parameter(torch.randn(1000))
    model = torch.nn.Module()
    model.weight = weight
    x = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter(model)
    with meter.measure():
        h = x * weight  # saves x (4000 B) and the parameter (excluded)
        y = checkpoint(_block, h, use_reentrant=False) if use_checkpoint else _block(h)
        y.sum().backward()
    if use_checkpoint:
        # forward keeps x and the block input h; backward recomputes sin's input (h again:
        # deduplicated) and exp's output: peak x + h + exp(h)
        assert meter.recomputed_tensors == 2
    else:
        assert meter.recomputed_tensors == 0
    assert meter.peak == 3 * 4000  # without: x, h (saved by sin), exp(h)
    assert meter.live == 0 and not meter.counts  # everything released after backward


def test_meter_without_recompute_patch_would_undercount(monkeypatch):
    x = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter(torch.nn.Module())
    monkeypatch.setattr(SavedTensorMeter, "_recompute_patch", lambda self: __import__("contextlib").nullcontext())
    with meter.measure():
        checkpoint(_block, x * 2, use_reentrant=False).sum().backward()
    assert meter.peak == 4000  # only the block input: the outer hook alone misses exp(h)


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_gradients_match_with_and_without_checkpointing(kind):
    model = tiny_llama()
    if kind == "lora":
        from qbench.plugins.lora import LoRAMethod
        LoRAMethod(r=4, dropout=0.1).quantize(model)
    elif kind == "qlora":
        from qbench.plugins.qlora import QLoRAMethod
        QLoRAMethod(r=4, dropout=0.1).quantize(model)
    assert set_trainable(model) == ("full" if kind == "full" else "lora")
    if kind != "full":
        from qbench.quant.lora import lora_modules
        for _, m in lora_modules(model):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()  # dropout on: checkpoint must replay the same masks
    batch = torch.randint(3, 259, (2, 40))
    loss_off = training_step(model, batch, False, seed=3)
    g_off = grads_of(model)
    loss_on = training_step(model, batch, True, seed=3)
    g_on = grads_of(model)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert len(g_off) == len(g_on) > 0
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_suite_on_qlora_model_reports_every_metric():
    from qbench.plugins.qlora import QLoRAMethod
    model = tiny_llama(layers=3)
    QLoRAMethod(r=4).quantize(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ctx = _ctx(model)
    metrics = CheckpointingSuite(seqlens="32+64", batch_sizes="2", repeats=1, warmup=0).measure(ctx)
    for tag in ("bs2_seq32", "bs2_seq64"):
        assert metrics[f"{tag}.saved_bytes_with"].value < metrics[f"{tag}.saved_bytes_without"].value
        assert metrics[f"{tag}.recomputed_tensors"].value > 0
        assert metrics[f"{tag}.alloc_peak_with"].value < metrics[f"{tag}.alloc_peak_without"].value
        assert metrics[f"{tag}.grad_max_rel_diff"].value < 1e-5
        assert "claimed 50–80%" in metrics[f"{tag}.verdict"].value
    # longer sequences: more activation memory
    assert metrics["bs2_seq64.saved_bytes_without"].value > 1.8 * metrics["bs2_seq32.saved_bytes_without"].value
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert not ctx.notes


def test_applies_to_training_methods_only():
    suite = CheckpointingSuite()
    for name in ("qlora", "lora", "fp16"):
        assert suite.applies_to(_ctx(None, name).method) is None
    reason = suite.applies_to(_ctx(None, "gptq").method)
    assert reason and "does not train" in reason


def test_verdict_text():
    assert verdict(65, 25).count("within") == 2
    assert "below the claimed 50–80%" in verdict(10, 25) and "above the claimed ~20–30%" in verdict(60, 45)


@pytest.mark.parametrize("params", [dict(seqlens="128,512"), dict(seqlens="0"), dict(batch_sizes="x")])
def test_bad_params(params):
    with pytest.raises(QBenchError, match="joined by"):
        CheckpointingSuite(**params)


def test_seqlen_above_model_limit():
    with pytest.raises(QBenchError, match="above the model's limit of 512"):
        CheckpointingSuite(seqlens="1024").measure(_ctx(tiny_llama(layers=1), "fp16"))
