"""int8 x int8 -> int32 GEMM with scale epilogue: Triton (interpreter) vs the exact torch reference."""
import pytest
import torch

from qbench.kernels import absmax
from qbench.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from qbench.params import QBenchError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(y, ref, dtype):
    # fp32/fp16: identical. bf16: the interpreter's fp32->bf16 store may differ by one bf16 ulp.
    if dtype == torch.bfloat16:
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 37, 75), (19, 45, 130)])
def test_matches_reference(dtype, m, n, k):
    torch.manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    sa, sb = torch.rand(m) / 127, torch.rand(n) / 127
    bias = torch.randn(n).to(dtype)
    y = int8_matmul(a, sa, b, sb, bias, dtype)
    ref = int8_matmul_reference(a, sa, b, sb, bias, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y, ref, dtype)
    # per-tensor scales, no bias
    y = int8_matmul(a, torch.tensor(0.01), b, torch.tensor(0.02), None, dtype)
    _close(y, int8_matmul_reference(a, torch.tensor(0.01), b, torch.tensor(0.02), None, dtype), dtype)


def test_integer_sum_is_exact_at_extremes():
    """All codes ±127: the int32 accumulator holds K*127*127 exactly."""
    k = 200
    a = torch.full((3, k), 127, dtype=torch.int8)
    b = torch.full((5, k), -127, dtype=torch.int8)
    one = torch.ones(1)
    y = int8_matmul(a, one, b, one, None, torch.float32)
    assert torch.equal(y, torch.full((3, 5), -127.0 * 127 * k))
    assert torch.equal(int8_matmul_reference(a, one, b, one, None, torch.float32), y)


def test_w8a8_close_to_float_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(7, 96), torch.randn(33, 96) * 0.05
    xq, xs = absmax.quantize(x, dim=-1)
    wq, ws = absmax.quantize(w, dim=-1)
    y = int8_matmul(xq, xs, wq, ws, None, torch.float32)
    ref = x @ w.T
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_rejects_non_int8():
    with pytest.raises(QBenchError, match="int8"):
        int8_matmul(torch.zeros(2, 4), torch.ones(1), torch.zeros(3, 4, dtype=torch.int8), torch.ones(1))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 130])
def test_cuda_kernel_matches_reference(m):
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (m, 576), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (300, 576), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(m, device="cuda") / 127, torch.rand(300, device="cuda") / 127
    y = int8_matmul(a, sa, b, sb, None, torch.float32)
    assert torch.equal(y, int8_matmul_reference(a, sa, b, sb, None, torch.float32))
