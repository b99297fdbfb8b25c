"""affine quantize/dequantize and packing: Triton (interpreter) vs the torch reference / minmax_grid."""
import pytest
import torch

from qbench.kernels import affine
from qbench.kernels.minmax_grid import fake_quantize, minmax_scale_zero
from qbench.params import QBenchError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, -1, False), (8, 16, True), (2, 128, False),
                                                 (5, 24, True)])
def test_quantize_matches_reference(dtype, bits, group_size, sym):
    torch.manual_seed(bits)
    x = (torch.randn(13, 75) * 2).to(dtype)
    x[0] = 0  # all-zero groups
    x[1] = 0.3  # constant, all-positive groups
    x[2] = -0.7
    codes, scales, zeros = affine.quantize(x, bits, group_size, sym)
    ref = affine.quantize_reference(x, bits, group_size, sym)
    assert codes.dtype == torch.uint8 and zeros.dtype == torch.uint8
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]) and torch.equal(zeros, ref[2])
    assert int(codes.max()) <= 2**bits - 1
    back = affine.dequantize(codes, scales, zeros, group_size)
    assert torch.equal(back, affine.dequantize_reference(*ref, group_size))
    assert torch.equal(back[0], torch.zeros(75))
    assert torch.isfinite(back).all()
    step = affine.dequantize_reference(torch.ones_like(codes), scales, torch.zeros_like(zeros), group_size)
    within_half_step = (back - x.float()).abs() <= step / 2 + 1e-5
    if sym:
        # GPTQ's symmetric grid keeps xmin=0 for an all-positive group, so its top clips at about max/2
        # (a quirk of the reference kept on purpose); groups with both signs are within half a step.
        assert bool(within_half_step[3:].all())
    else:
        assert torch.allclose(back[1], torch.full((75,), 0.3), atol=1e-2)  # 0 and the constant are on the grid
        assert bool(within_half_step.all())


def test_identical_to_gptq_grid_and_short_last_group():
    """576-wide rows with group 128: 4 groups of 128 and one of 64, each exactly minmax_grid's RTN."""
    torch.manual_seed(0)
    w = torch.randn(6, 576)
    codes, scales, zeros = affine.quantize(w, bits=4, group_size=128)
    assert scales.shape == (6, 5)
    back = affine.dequantize(codes, scales, zeros, 128)
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        scale, zero = minmax_scale_zero(w[:, lo:hi], 4)
        assert torch.equal(scales[:, g:g + 1], scale)
        assert torch.equal(back[:, lo:hi], fake_quantize(w[:, lo:hi], scale, zero, 4))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_dense(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 21), dtype=torch.uint8)
    packed = affine.pack_codes(codes, bits)
    assert packed.shape == (5, (21 * bits + 7) // 8)
    assert torch.equal(affine.unpack_codes(packed, bits, 21), codes)


def test_pack_layout_is_little_endian():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert affine.pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]
    three = torch.tensor([[7, 1, 2]], dtype=torch.uint8)  # bits: 111 100 010 -> 0b10_001_111, 0b0
    assert affine.pack_codes(three, 3).tolist() == [[0b10001111, 0b0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rejected(bad):
    x = torch.randn(3, 16)
    x[1, 1] = bad
    with pytest.raises(QBenchError, match="NaN|inf"):
        affine.quantize(x)


@pytest.mark.parametrize("bits,group_size", [(1, 128), (9, 128), (4, 0), (4, -2)])
def test_bad_parameters(bits, group_size):
    with pytest.raises(QBenchError, match="valid|positive"):
        affine.quantize(torch.randn(3, 16), bits, group_size)
