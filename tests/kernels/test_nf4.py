"""Blockwise NF4/FP4 quantize + dequantize: Triton launchers (TRITON_INTERPRET=1) against the
plain-torch references, on odd shapes, every blocksize, fp32/fp16/bf16, all-zero blocks."""
import pytest
import torch

import qbench.kernels.nf4 as nf4
from qbench.kernels.nf4 import (
    DYNAMIC_MAP,
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_nf4,
    quantize_nf4_reference,
)
from qbench.params import QBenchError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype, seed=0, zero_block=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (torch.rand(shape[0], 1, generator=gen) * 3 + 0.01)
    if zero_block is not None:
        w.view(-1)[zero_block[0]:zero_block[1]] = 0
    return w.to(dtype)


def _assert_same(a: NF4Tensor, b: NF4Tensor):
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.absmax, b.absmax)
    assert a.double_quant == b.double_quant
    if a.double_quant:
        assert torch.equal(a.nested_absmax, b.nested_absmax)
        assert torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("blocksize,shape", [(32, (7, 45)), (64, (13, 100)), (128, (5, 77)), (256, (3, 301)),
                                             (512, (9, 131)), (1024, (2, 999)), (2048, (3, 1001)), (4096, (1, 4099))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_match_reference(blocksize, shape, dtype):
    w = _weight(shape, dtype, seed=blocksize, zero_block=(0, blocksize))  # first block all zero
    quant_type = "fp4" if blocksize in (128, 1024) else "nf4"
    double_quant = blocksize != 512
    got = quantize_nf4(w, blocksize, double_quant, quant_type)
    want = quantize_nf4_reference(w, blocksize, double_quant, quant_type)
    _assert_same(got, want)
    assert got.packed.numel() == (w.numel() + 1) // 2
    deq = dequantize_nf4(got)
    ref = dequantize_nf4_reference(want)
    assert deq.shape == w.shape and deq.dtype == dtype
    assert torch.equal(deq, ref)
    assert torch.all(ref.reshape(-1)[:blocksize] == 0)  # the all-zero block decodes to zeros
    # error bound: at most half the widest code gap times the block absmax
    err = (ref.float() - w.float()).abs().reshape(-1)
    assert torch.all(err <= 0.17 * w.float().abs().max() + 1e-6)


def test_codes_hit_the_nearest_value_and_ties_go_down():
    # A block with absmax 1: every NF4 value, every midpoint (tie -> lower code), and just above.
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    values = torch.cat([NF4_CODE, mids, torch.nextafter(mids, torch.ones(15)), torch.tensor([1.0])])
    w = torch.cat([values, torch.zeros(64 - values.numel() % 64)])[:64].reshape(1, 64)
    for quantize in (quantize_nf4, quantize_nf4_reference):
        q = quantize(w, 64, False, "nf4")
        codes = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)[: values.numel()].long()
        assert torch.equal(codes[:16], torch.arange(16))
        assert torch.equal(codes[16:31], torch.arange(15))
        assert torch.equal(codes[31:46], torch.arange(1, 16))


def test_fp4_zero_and_sign_order():
    w = torch.tensor([[0.0, -0.0, 1e-3, -1e-3, 1.0, -1.0, 0.5, -0.5]])
    for quantize in (quantize_nf4, quantize_nf4_reference):
        q = quantize(w, 32, False, "fp4")
        assert q.packed.tolist() == [0x00, 0x80, 0x3B, 0x5D]  # bitsandbytes' own codes


def test_double_quant_storage_is_4_127_bits():
    w = _weight((256, 1024), torch.float16)
    q = quantize_nf4_reference(w, 64, True)
    # 4 + 8/64 + 32/(64*256) bits per weight, plus the one fp32 offset of the tensor
    assert q.storage_bytes() * 8 == w.numel() * (4 + 8 / 64 + 32 / (64 * 256)) + 32
    assert abs(q.bits_per_weight - 4.127) < 1e-3
    assert quantize_nf4_reference(w, 64, False).bits_per_weight == 4.5
    assert nf4.codebook_bytes == 16 * 4 + 256 * 4


def test_nested_quant_of_equal_absmax_is_exact():
    # Every block has the same absmax: absmax - mean is all zero -> code 0 of an all-zero nested block.
    w = torch.ones(4, 128)
    w[:, ::3] = -1
    for quantize in (quantize_nf4, quantize_nf4_reference):
        q = quantize(w, 64, True)
        assert torch.all(q.absmax == 0) and torch.all(q.nested_absmax == 0)
        assert torch.equal(dequantize_nf4(q), w)


def test_odd_element_count_pads_last_nibble_with_zero_code():
    w = torch.randn(1, 33)
    q = quantize_nf4_reference(w, 32, False, "nf4")
    assert q.packed.numel() == 17 and (int(q.packed[-1]) & 15) == 7  # NF4 code of 0.0
    assert torch.equal(quantize_nf4(w, 32, False, "nf4").packed, q.packed)


def test_dynamic_map_shape():
    assert DYNAMIC_MAP.numel() == 256 and DYNAMIC_MAP[-1] == 1 and torch.all(DYNAMIC_MAP[1:] > DYNAMIC_MAP[:-1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_user_error(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(QBenchError, match="NaN or Inf"):
        quantize_nf4(w)


@pytest.mark.parametrize("kwargs", [{"blocksize": 48}, {"blocksize": 8192}, {"quant_type": "int4"}])
def test_bad_settings(kwargs):
    with pytest.raises(QBenchError, match="valid values"):
        quantize_nf4(torch.randn(4, 64), **kwargs)


def test_code_tables_reach_a_device_once():
    """A host-to-device copy of the code tables in every forward made the NF4 decode step impossible
    to capture in a CUDA graph (first H200 lease); each table is copied to a device once."""
    q = nf4.quantize_nf4_reference(torch.randn(64, 128)).to("meta")
    assert q.code.device.type == "meta" and q.nested_code.device.type == "meta"
    assert q.code is q.code and q.nested_code is q.nested_code
    cpu = nf4.quantize_nf4_reference(torch.randn(64, 128))
    assert cpu.code is nf4.code_book("nf4")  # no copy at all on the CPU
