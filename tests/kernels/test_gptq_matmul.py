"""Triton dequantize-matmul over the GPTQ layout (run under TRITON_INTERPRET=1) against its reference."""
import pytest
import torch

import qbench.kernels.gptq_matmul as gm
from qbench.kernels.gptq_pack import pack_gptq
from qbench.params import QBenchError

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layer(K, N, bits, group_size, act_order, seed=0, fmt="gptq", extreme=False):
    gen = torch.Generator().manual_seed(seed)
    G = (K + group_size - 1) // group_size
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (K, N), generator=gen)
    zeros = torch.randint(1 if fmt == "gptq" else 0, maxq + 1, (G, N), generator=gen)
    if extreme:  # codes and zeros at both ends of the range
        codes[::2] = maxq
        codes[1::2] = 0
        zeros[:, ::2] = maxq
    scales = torch.rand(G, N, generator=gen) * 0.05 + 1e-3
    g_idx = torch.arange(K) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    packed = pack_gptq(codes, scales, zeros, g_idx, bits, fmt)
    return packed, (1 if fmt == "gptq" else 0)


def _no_reference(*args, **kwargs):
    raise AssertionError("the launcher fell back to the reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 19])
def test_launcher_matches_reference(dtype, bits, rows, monkeypatch):
    K, N = 77, 45  # neither a multiple of the blocks nor of a packing word
    packed, offset = _layer(K, N, bits, 32, act_order=bits in (3, 4), seed=bits + rows)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
    bias = torch.randn(N).to(dtype)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, bias, offset)
    expected = gm.gptq_matmul_reference(*args)
    monkeypatch.setattr(gm, "gptq_matmul_reference", _no_reference)
    got = gm.gptq_matmul(*args)
    assert got.dtype == dtype and got.shape == (rows, N)
    scale = expected.float().abs().max().clamp(min=1.0)
    assert ((got.float() - expected.float()).abs().max() / scale) <= TOL[dtype]


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_edge_codes_v2_zeros_no_bias_and_3d_input(fmt):
    packed, offset = _layer(50, 33, 4, 16, act_order=False, fmt=fmt, extreme=True)
    x = torch.randn(2, 3, 50)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, None, offset)
    got = gm.gptq_matmul(*args)
    expected = gm.gptq_matmul_reference(*args)
    assert got.shape == (2, 3, 33)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_v1_stored_zero_of_fifteen_means_sixteen():
    # AutoGPTQ-style kernels read a v1 nibble 15 as zero point 16; so do ours (both paths)
    packed, _ = _layer(8, 8, 4, 8, act_order=False)
    packed["qweight"].zero_()  # all codes 0
    packed["qzeros"].fill_(-1)  # every stored nibble 15
    packed["scales"].fill_(1.0)
    x = torch.ones(1, 8)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert torch.equal(gm.gptq_matmul_reference(*args), torch.full((1, 8), -16.0 * 8))
    assert torch.equal(gm.gptq_matmul(*args), torch.full((1, 8), -16.0 * 8))


def test_empty_batch_and_bad_shapes():
    packed, _ = _layer(40, 16, 4, 32, act_order=False)
    args = (packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert gm.gptq_matmul(torch.zeros(0, 40), *args).shape == (0, 16)
    with pytest.raises(QBenchError, match="expects 40"):
        gm.gptq_matmul(torch.zeros(2, 41), *args)
    with pytest.raises(QBenchError, match="qweight has shape"):
        gm.gptq_matmul(torch.zeros(2, 40), packed["qweight"][:-1], *args[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_grouped_gemv_matches_reference(dtype):
    packed, offset = _layer(4096, 1024, 4, 128, act_order=False)
    packed = {k: v.cuda() for k, v in packed.items()}
    x = torch.randn(1, 4096, device="cuda").to(dtype)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, None, offset)
    group = gm.contiguous_group(packed["g_idx"], 4, 128)
    assert group == 128
    torch.testing.assert_close(gm.gptq_matmul(*args, group=group).float(), gm.gptq_matmul_reference(*args).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_reference(rows, dtype):
    packed, offset = _layer(4096, 1024, 4, 128, act_order=True)
    packed = {k: v.cuda() for k, v in packed.items()}
    x = torch.randn(rows, 4096, device="cuda").to(dtype)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, None, offset)
    torch.testing.assert_close(gm.gptq_matmul(*args).float(), gm.gptq_matmul_reference(*args).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits,group_size,K,act_order,grouped", [
    (4, 32, 96, False, True), (4, 16, 75, False, True), (2, 32, 80, False, True), (8, 16, 40, False, True),
    (4, 75, 75, False, True),  # one group a row
    (4, 24, 72, False, False), (3, 32, 96, False, False), (4, 32, 96, True, False),
])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_single_rows_with_contiguous_groups_take_the_grouped_gemv(monkeypatch, bits, group_size, K, act_order,
                                                                  grouped, fmt):
    """g_idx = k // group (no act-order, or static groups) and codes that fill words: the grouped GEMV
    (each word loaded once, scale and zero once per group) gives the reference's numbers."""
    packed, offset = _layer(K, 24, bits, group_size, act_order, fmt=fmt)
    group = gm.contiguous_group(packed["g_idx"], bits, group_size)
    assert bool(group) == grouped
    if not grouped:
        return
    launched = []
    real = gm._gptq_gemv_grouped_kernel
    monkeypatch.setattr(gm, "_gptq_gemv_grouped_kernel", _Recording(real, launched))
    x = torch.randn(1, K)
    bias = torch.randn(24)
    args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, bias, offset)
    torch.testing.assert_close(gm.gptq_matmul(*args, group=group), gm.gptq_matmul_reference(*args),
                               rtol=1e-5, atol=1e-5)
    assert launched


class _Recording:
    """A kernel stand-in that notes each launch and runs the real one."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.kernel[grid]
