"""Every GPU autotune config of the batch-1 GEMVs gives the reference's numbers (under the interpreter).

The interpreter normally runs one small fixed block; on a GPU the autotuner may pick any config, and
a block shape the tests never ran (a tile wider than the row, a group split across tiles) is where a
masking or reshape mistake would hide. Each config's blocks are swapped in for the interpreter's.
"""
import pytest
import torch

import qbench.kernels.dequant_matmul as dm
import qbench.kernels.gptq_matmul as gm
import qbench.kernels.nf4_matmul as nm
from qbench.kernels import affine
from qbench.kernels.nf4 import quantize_nf4_reference
from tests.kernels.test_gptq_matmul import _layer


def _blocks(config):
    return {k: v for k, v in config.kwargs.items() if k.startswith("BLOCK")}


@pytest.mark.parametrize("config", dm._gemv_configs(), ids=lambda c: str(_blocks(c)))
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (2, -1), (8, 32), (3, 16)])
def test_affine_gemv(monkeypatch, config, bits, group_size):
    monkeypatch.setattr(dm, "INTERPRET_GEMV_BLOCKS", _blocks(config))
    gen = torch.Generator().manual_seed(bits)
    N, K = 40, 300
    codes, scales, zeros = affine.quantize(torch.randn(N, K, generator=gen) * 0.1, bits, group_size)
    args = (affine.pack_codes(codes, bits), scales.half(), affine.pack_codes(zeros, bits), bits, group_size, K)
    x = torch.randn(1, K, generator=gen)
    torch.testing.assert_close(dm.affine_weight_matmul(x, *args), dm.affine_weight_matmul_reference(x, *args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", gm._GEMV_CONFIGS, ids=lambda c: f"{_blocks(c)}-s{c.num_stages}")
def test_gptq_gemv(monkeypatch, config):
    monkeypatch.setattr(gm, "INTERPRET_GEMV_BLOCKS", _blocks(config))
    K, N = 300, 40
    for act_order in (False, True):  # the grouped GEMV, then the general one
        packed, offset = _layer(K, N, 4, 32, act_order)
        x = torch.randn(1, K)
        args = (x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, None, offset)
        group = gm.contiguous_group(packed["g_idx"], 4, 32)
        assert bool(group) != act_order
        torch.testing.assert_close(gm.gptq_matmul(*args, group=group), gm.gptq_matmul_reference(*args),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_j,step,warps", nm.GEMV_ALIGNED_CONFIGS)
def test_nf4_aligned_gemv(monkeypatch, block_j, step, warps):
    monkeypatch.setattr(nm, "INTERPRET_GEMV_ALIGNED_BLOCKS", {"BLOCK_J": block_j, "STEP": step})
    gen = torch.Generator().manual_seed(0)
    q = quantize_nf4_reference(torch.randn(24, 1024, generator=gen))  # whole blocks a row: the aligned kernel
    x = torch.randn(1, 1024, generator=gen)
    torch.testing.assert_close(nm.nf4_matmul(x, q, use_triton=True), nm.nf4_matmul_reference(x, q),
                               rtol=1e-5, atol=1e-5)
