"""The GPTQ checkpoint layout: bit-stream packing along the input dim, v1/v2 zeros, dequantization."""
import pytest
import torch

from qbench.kernels.gptq_pack import (
    dequantize_gptq,
    pack_gptq,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    packed_rows,
    unpack_qzeros,
    unpack_rows,
)
from qbench.params import QBenchError


def _python_bitstream_pack(codes: list[int], bits: int) -> list[int]:
    """Independent spec: code k at bits [bits*k, bits*k + bits) of a little-endian stream of int32 words."""
    stream = 0
    for k, code in enumerate(codes):
        stream |= code << (bits * k)
    words = []
    for w in range(packed_rows(len(codes), bits)):
        word = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(word - 2**32 if word >= 2**31 else word)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 31, 33, 177])
def test_pack_unpack_round_trip_and_matches_bit_stream_spec(bits, rows):
    gen = torch.Generator().manual_seed(bits * 1000 + rows)
    codes = torch.randint(0, 2**bits, (rows, 3), generator=gen)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (packed_rows(rows, bits), 3)
    assert torch.equal(unpack_rows(words, bits, rows), codes.to(torch.int32))
    for col in range(3):
        assert words[:, col].tolist() == _python_bitstream_pack(codes[:, col].tolist(), bits)


def test_known_words():
    # code 8i+j sits in nibble j of word i (low nibble first), as GPTQ/AutoGPTQ pack
    assert pack_qweight(torch.arange(8).view(8, 1), 4).item() == 0x76543210
    assert pack_qweight(torch.full((8, 1), 15), 4).item() == -1  # all bits set, int32
    # symmetric 4-bit zero point 8 is stored minus one in the v1 format: the familiar 0x77777777
    assert pack_qzeros(torch.full((1, 8), 8), 4).item() == 0x77777777
    assert pack_qzeros(torch.full((1, 8), 8), 4, zero_offset=0).item() == -(2**31) + 0x08888888
    # 3 bits: 32 codes fill exactly three words; code 10 straddles words 0 and 1
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111
    words = pack_qweight(codes, 3)
    assert words.shape == (3, 1)
    assert (words[0].item() & 0xFFFFFFFF) == 0b11 << 30 and words[1].item() == 1 and words[2].item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("offset", [0, 1])
def test_qzeros_round_trip(bits, offset):
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(offset, 2**bits, (3, 45), generator=gen)
    qzeros = pack_qzeros(zeros, bits, offset)
    assert qzeros.shape == (3, packed_rows(45, bits))
    assert torch.equal(unpack_qzeros(qzeros, bits, 45, offset), zeros.to(torch.int32))


def test_v1_zero_of_zero_is_refused_and_v2_keeps_it():
    codes = torch.zeros(8, 8, dtype=torch.long)
    zeros = torch.zeros(1, 8, dtype=torch.long)
    scales = torch.ones(1, 8)
    g_idx = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(QBenchError, match="gptq_v2"):
        pack_gptq(codes, scales, zeros, g_idx, 4, "gptq")
    packed = pack_gptq(codes, scales, zeros, g_idx, 4, "gptq_v2")
    assert torch.equal(unpack_qzeros(packed["qzeros"], 4, 8, 0), zeros.to(torch.int32))


def test_dequantize_matches_formula_with_act_order_g_idx():
    gen = torch.Generator().manual_seed(0)
    K, N, G, bits = 40, 24, 3, 4
    codes = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(1, 16, (G, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) + 0.1).half().float()
    g_idx = torch.randperm(K, generator=gen) % G
    packed = pack_gptq(codes, scales, zeros, g_idx, bits)
    expected = scales[g_idx.long()] * (codes - zeros[g_idx.long()])
    got = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(got, expected)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(QBenchError, match="bits=5"):
        pack_rows(torch.zeros(8, 1, dtype=torch.long), 5)
    with pytest.raises(QBenchError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(QBenchError, match="cannot hold"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 8)
