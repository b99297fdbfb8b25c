"""The memory tracker (qbench.memory), and what it says of the NF4 layers: their backward keeps only
the packed weight, never a dequantized copy, on every path."""
import mmap

import pytest
import torch

from qbench.memory import PeakMemory, SavedTensorMeter
from qbench.models import tiny_llama
from qbench.plugins.lora import LoRAMethod
from qbench.plugins.qlora import QLoRAMethod
from qbench.quant.lora import QLoRALinear, lora_modules
from qbench.quant.nf4 import NF4Linear
from qbench.suites.checkpointing import set_trainable, training_step

MiB = 2**20


def _touch_fresh_pages(size: int) -> None:
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_peak_memory_resets_the_cpu_peak_between_blocks():
    # fresh anonymous mappings, touched page by page: a long test process's malloc may hand back
    # memory that is already resident (no rise at all), which would test the allocator, not the tracker
    with PeakMemory("cpu") as big:
        _touch_fresh_pages(64 * MiB)
    with PeakMemory("cpu") as small:
        _touch_fresh_pages(MiB)
    if not big.reset:
        pytest.skip("this kernel refuses /proc/self/clear_refs; the CPU peak cannot be reset")
    assert big.rise >= 60 * MiB
    # without the reset the second block's peak would still be the first block's 64 MiB
    assert small.rise < 32 * MiB and small.peak < big.peak
    assert big.kind == "process peak RSS (VmHWM)"


def test_peak_memory_allocator_mode_counts_torch_allocations():
    with PeakMemory("cpu", cpu="allocator") as mem:
        a = torch.empty(MiB)  # 4 MiB
        b = a * 2  # 4 MiB more, both live
        del a, b
        c = torch.empty(MiB // 4)  # 1 MiB after the others are freed: not a new peak
        del c
    assert 8 * MiB <= mem.peak < 9 * MiB and mem.rise == mem.peak
    assert mem.kind == "torch.profiler CPU allocations"
    with pytest.raises(ValueError, match="cpu must be one of"):
        PeakMemory("cpu", cpu="vmhwm")


def _saved_bytes(module, x, backward=True) -> int:
    meter = SavedTensorMeter(module)
    with meter.measure():
        y = module(x)
        if backward:
            y.square().sum().backward()
    return meter.peak


def _fused_on_cpu(monkeypatch):
    """Force QLoRALinear's Triton path on CPU (the interpreter runs it, as on a GPU)."""
    import qbench.quant.lora as lora_layers
    monkeypatch.setattr(lora_layers, "use_triton_in_module", lambda t: True)


@pytest.mark.parametrize("layer", ["nf4", "qlora", "qlora-dropout", "qlora-fused"])
def test_nf4_layers_save_no_weight_copy_for_backward(layer, monkeypatch):
    """A dequantized fp32 weight (512 x 256 x 4 B = 512 KiB) must never be saved for backward: the
    layers keep only the packed codes (buffers) and dequantize again in backward."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True)
    if layer == "nf4":
        module = NF4Linear.from_linear(linear)
    else:
        module = QLoRALinear.from_linear(linear, r=4, alpha=8, dropout=0.1 if layer == "qlora-dropout" else 0.0,
                                         generator=g)
        module.train()
        if layer == "qlora-fused":
            _fused_on_cpu(monkeypatch)
    x = torch.randn(1, 4, 256, generator=g, requires_grad=True)
    saved = _saved_bytes(module, x)
    weight_bytes = linear.weight.numel() * 4
    assert saved < weight_bytes / 16, f"{layer}: {saved} bytes saved for backward, a weight copy is {weight_bytes}"
    assert x.grad is not None and torch.isfinite(x.grad).all()
    expected = {"nf4": "reference", "qlora": "reference", "qlora-dropout": "reference", "qlora-fused": "triton"}
    assert module.kernel_path == expected[layer]


def test_nf4_layer_input_gradient_matches_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    module = NF4Linear.from_linear(torch.nn.Linear(96, 40, bias=True))
    x = torch.randn(3, 96, generator=g, requires_grad=True)
    module(x).square().sum().backward()
    w = module.dequantized_weight().clone().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, module.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", ["all", "q_proj+v_proj"])
def test_qlora_saves_no_more_for_backward_than_16bit_lora(targets):
    """QLoRA's frozen NF4 base must not cost more saved-tensor memory than LoRA's frozen float base
    (whose weight is a buffer, saved by reference): the activations are the same."""
    saved = {}
    for name, method in (("lora", LoRAMethod), ("qlora", QLoRAMethod)):
        model = tiny_llama()
        method(r=4, dropout=0.0, target_modules=targets).quantize(model)
        set_trainable(model)
        for _, m in lora_modules(model):
            torch.nn.init.normal_(m.lora_B, std=0.1)
        model.train()
        batch = torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(0))
        meter = SavedTensorMeter(model)
        with meter.measure():
            training_step(model, batch, checkpointing=False, seed=0)
        saved[name] = meter.peak
    assert saved["qlora"] <= 1.01 * saved["lora"], saved


def test_half_precision_baseline_on_cpu_keeps_no_fp32_weight_copy_for_backward():
    """fp16 weights computing in fp32 (the fp16 baseline on CPU, fully fine-tuned by the checkpointing
    suite): the upcast copy is made again in backward; the gradients are autograd's through the cast."""
    from qbench.plugins.baseline import FloatLinear

    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(256, 512, bias=True)
    module = FloatLinear(linear.weight.data.half(), linear.bias.data.half())
    for p in module.parameters():
        p.requires_grad_(True)
    x = torch.randn(1, 4, 256, generator=g, requires_grad=True)
    saved = _saved_bytes(module, x)
    assert saved < linear.weight.numel() * 4 / 16, saved  # x and the output, not a 512 KiB fp32 weight
    w = module.weight.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w.float(), b.float()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(module.weight.grad, w.grad)
    torch.testing.assert_close(module.bias.grad, b.grad)
    assert module.weight.grad.dtype == torch.float16
