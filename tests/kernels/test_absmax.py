"""absmax INT8 quantize/dequantize: Triton (interpreter) vs the torch reference."""
import pytest
import torch

from qbench.kernels import absmax
from qbench.params import QBenchError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [dict(), dict(dim=-1), dict(dim=0), dict(block_size=16), dict(block_size=128)]


def test_worked_example_per_tensor():
    x = torch.tensor([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2])
    for quantize in (absmax.quantize, absmax.quantize_reference):
        codes, scale = quantize(x)
        assert codes.dtype == torch.int8
        assert codes.tolist() == [33, -14, -70, 35, -59, 10, 47, 127]
        assert scale.item() == pytest.approx(6.2 / 127)
    back = absmax.dequantize(codes, scale)
    assert (back - x).abs().max() <= scale / 2 + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "tensor")
def test_quantize_matches_reference_on_odd_shapes(dtype, layout):
    torch.manual_seed(0)
    x = (torch.randn(37, 75) * 3).to(dtype)
    x[3] = 0  # an all-zero row / block
    x[5, :40] = 1.25  # a constant stretch
    codes, scale = absmax.quantize(x, **layout)
    ref_codes, ref_scale = absmax.quantize_reference(x, **layout)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    assert int(codes.abs().max()) == 127  # the absmax itself maps to ±127
    block = layout.get("block_size")
    back = absmax.dequantize(codes, scale, block_size=block)
    assert torch.equal(back, absmax.dequantize_reference(ref_codes, ref_scale, block))
    # error bounded by half a step of each value's own scale
    step = absmax.dequantize_reference(torch.ones_like(codes), scale, block)
    assert bool(((back - x.float()).abs() <= step / 2 + 1e-6).all())


def test_blockwise_last_block_shorter_and_row_layout():
    x = torch.randn(4, 75)
    codes, scale = absmax.quantize(x, block_size=32)
    assert scale.shape == (4, 3)
    assert torch.allclose(scale[:, 2], x[:, 64:].abs().amax(1) / 127)
    _, row_scale = absmax.quantize(x, dim=-1)
    assert row_scale.shape == (4, 1)
    assert torch.allclose(row_scale[:, 0], x.abs().amax(1) / 127)


def test_all_zero_and_constant():
    x = torch.zeros(3, 20)
    x[1] = -0.5
    for layout in LAYOUTS[:4]:
        codes, scale = absmax.quantize(x, **layout)
        back = absmax.dequantize(codes, scale, block_size=layout.get("block_size"))
        assert torch.isfinite(back).all()
        assert torch.equal(back[0], torch.zeros(20))
        assert torch.allclose(back[1], torch.full((20,), -0.5))
    codes, scale = absmax.quantize(torch.zeros(5))
    assert scale.item() == 0 and codes.abs().sum() == 0


def test_fixed_absmax_clamps():
    x = torch.tensor([[0.5, -2.0, 4.0, 1.0]])
    codes, scale = absmax.quantize_rows(x, fixed_absmax=torch.tensor(1.0))
    ref_codes, ref_scale = absmax._quantize_rows_reference(x, fixed_absmax=torch.tensor(1.0))
    assert codes.tolist() == [[64, -127, 127, 127]] == ref_codes.tolist()
    assert scale.item() == pytest.approx(1 / 127) and ref_scale.item() == pytest.approx(1 / 127)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(QBenchError, match="NaN|inf"):
        absmax.quantize(x, dim=-1)
    with pytest.raises(QBenchError, match="NaN|inf"):
        absmax.quantize_reference(x)


def test_bad_block_size():
    with pytest.raises(QBenchError, match="block_size"):
        absmax.quantize(torch.randn(4, 8), block_size=0)
