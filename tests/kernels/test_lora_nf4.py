"""lora_nf4_linear (Triton under the interpreter) against its torch reference; gradcheck in fp64."""
import pytest
import torch

from qbench.kernels.lora_nf4 import LoRANF4Function, lora_nf4_linear, lora_nf4_linear_reference
from qbench.kernels.nf4 import quantize_nf4
from qbench.params import QBenchError

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _case(m=19, n=45, k=70, r=3, dtype=torch.float32, double_quant=True, blocksize=64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g) * 0.3
    b = torch.randn(n, r, generator=g) * 0.3
    bias_t = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return x, q, a, b, bias_t


def _close(got, want, dtype):
    scale = want.float().abs().max().clamp(min=1)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (1, 17, 33, 1), (19, 45, 70, 3),  # odd: no dim a multiple of a block
    (7, 40, 192, 4),                  # rows of whole blocks: pairs of columns read as packed bytes
])
def test_forward_and_backward_match_reference(dtype, shape):
    m, n, k, r = shape
    x, q, a, b, bias = _case(m, n, k, r, dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    As = [a.clone().requires_grad_(), a.clone().requires_grad_()]
    Bs = [b.clone().requires_grad_(), b.clone().requires_grad_()]
    ours = lora_nf4_linear(xs[0], q, As[0], Bs[0], 1.5, bias)
    ref = lora_nf4_linear_reference(xs[1], q, As[1], Bs[1], 1.5, bias)
    assert ours.dtype == dtype and ours.shape == (m, n)
    _close(ours, ref, dtype)
    dy = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours.backward(dy)
    ref.backward(dy)
    for got, want in [(xs[0].grad, xs[1].grad), (As[0].grad, As[1].grad), (Bs[0].grad, Bs[1].grad)]:
        assert got.dtype == want.dtype
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_in_the_input_dtype(dtype):
    """16-bit adapters as well as the fp32 ones the qlora method keeps (the scaled x@A.T must be cast
    after scaling, or tl.dot gets an fp32 and a 16-bit operand)."""
    x, q, a, b, bias = _case(m=5, n=24, k=40, r=4, dtype=dtype)
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = lora_nf4_linear(x, q, a, b, 2.0, bias)
    ref = lora_nf4_linear_reference(x, q, a_ref, b_ref, 2.0, bias)
    _close(ours, ref, dtype)
    ours.float().sum().backward()
    ref.float().sum().backward()
    _close(a.grad, a_ref.grad, dtype)
    _close(b.grad, b_ref.grad, dtype)


def test_rank_above_16_pads_the_rank_block():
    x, q, a, b, bias = _case(m=17, n=20, k=36, r=20)
    a, b = a.requires_grad_(), b.requires_grad_()
    _close(lora_nf4_linear(x, q, a, b, 0.25, bias), lora_nf4_linear_reference(x, q, a, b, 0.25, bias), torch.float32)


@pytest.mark.parametrize("double_quant, blocksize", [(False, 32), (True, 128)])
def test_quant_settings_and_3d_input_with_dropout_input(double_quant, blocksize):
    x, q, a, b, _ = _case(m=10, n=21, k=50, r=2, double_quant=double_quant, blocksize=blocksize, bias=False)
    x = x.reshape(2, 5, 50)
    xl = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3) / 0.7  # a dropout mask
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    xl1, xl2 = xl.clone().requires_grad_(), xl.clone().requires_grad_()
    ours = lora_nf4_linear(x1, q, a, b, 0.5, x_lora=xl1)
    ref = lora_nf4_linear_reference(x2, q, a, b, 0.5, x_lora=xl2)
    _close(ours, ref, torch.float32)
    ours.sum().backward()
    ref.sum().backward()
    _close(x1.grad, x2.grad, torch.float32)
    _close(xl1.grad, xl2.grad, torch.float32)


def test_edge_values_zero_adapter_and_zero_input():
    x, q, a, b, bias = _case(m=5, n=20, k=40, r=2)
    zero_b = torch.zeros_like(b)
    from qbench.kernels.nf4 import dequantize_nf4
    base = x @ dequantize_nf4(q).t() + bias
    _close(lora_nf4_linear(x, q, a, zero_b, 2.0, bias), base, torch.float32)  # B = 0 at init: exactly the base
    assert torch.equal(lora_nf4_linear(torch.zeros_like(x), q, a, b, 2.0), torch.zeros(5, 20))


@pytest.mark.parametrize("k", [20, 64])  # rows ending mid-block, and rows of whole blocks (the byte-pair path)
def test_gradcheck_fp64(k):
    x, q, a, b, bias = _case(m=3, n=18, k=k, r=2, bias=True, blocksize=32)
    x = x.double().requires_grad_()
    a = a.double().requires_grad_()
    b = b.double().requires_grad_()
    fn = lambda x_, a_, b_: LoRANF4Function.apply(x_, None, a_, b_, bias.double(), q, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b), eps=1e-6, atol=1e-6, fast_mode=True)
    ref = lambda x_, a_, b_: lora_nf4_linear_reference(x_, q, a_, b_, 0.7, bias.double())  # noqa: E731
    assert torch.autograd.gradcheck(ref, (x, a, b), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bad_shapes():
    x, q, a, b, _ = _case(m=2, n=20, k=40, r=2, bias=False)
    with pytest.raises(QBenchError, match="expects 40"):
        lora_nf4_linear(x[:, :30], q, a, b, 1.0)
    with pytest.raises(QBenchError, match="LoRA A must be"):
        lora_nf4_linear(x, q, a[:, :30], b, 1.0)
