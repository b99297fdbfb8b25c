"""Fused dequantize-matmul (GEMV and GEMM paths): Triton (interpreter) vs the torch reference."""
import pytest
import torch

from qbench.kernels import absmax, affine
from qbench.kernels.dequant_matmul import (
    affine_dequant_weight_reference,
    affine_weight_matmul,
    affine_weight_matmul_reference,
    int8_weight_matmul,
    int8_weight_matmul_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, K = 37, 75  # neither a multiple of the blocks


def _close(y, ref, dtype):
    # the kernels decode in fp32 and accumulate in another order; allow a couple of output ulps
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = ref.float().abs().max().item() + 1e-6
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,m", [("gemv", 1), ("gemm", 1), ("gemm", 6), (None, 1), (None, 6)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_int8_weights(dtype, path, m, granularity):
    torch.manual_seed(m)
    w = torch.randn(N, K) * 0.1
    if granularity == "tensor":
        codes, scale, group = *absmax.quantize(w), -1
    elif granularity == "channel":
        (codes, scale), group = absmax.quantize(w, dim=-1), -1
        scale = scale.reshape(-1)
    else:
        (codes, scale), group = absmax.quantize(w, block_size=32), 32
    x = torch.randn(m, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = int8_weight_matmul(x, codes, scale, bias, group, path=path)
    ref = int8_weight_matmul_reference(x, codes, scale, bias, group)
    assert y.dtype == dtype and y.shape == (m, N)
    _close(y, ref, dtype)
    # the reference itself is x @ dequant(W).T
    deq = absmax.dequantize(codes, scale.reshape(N, -1) if scale.dim() else scale, block_size=32 if group > 0 else None)
    torch.testing.assert_close(ref.float(), (x.float() @ deq.to(dtype).float().T + bias.float()).to(dtype).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,m", [("gemv", 1), ("gemm", 5)])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, 16, False), (8, -1, False), (2, 64, True),
                                                 (4, 128, True), (4, 16, False), (4, -1, False), (4, 24, False),
                                                 (8, 32, True)])
def test_packed_affine_weights(dtype, path, m, bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(N, K) * 0.1
    w[4] = 0  # all-zero groups
    codes, scales, zeros = affine.quantize(w, bits, group_size, sym)
    packed = affine.pack_codes(codes, bits)
    zeros_packed = None if sym else affine.pack_codes(zeros, bits)
    scales16 = scales.half()
    x = torch.randn(m, K).to(dtype)
    bias = torch.randn(N).to(dtype) if bits != 8 else None
    y = affine_weight_matmul(x, packed, scales16, zeros_packed, bits, group_size, K, bias, path=path)
    ref = affine_weight_matmul_reference(x, packed, scales16, zeros_packed, bits, group_size, K, bias)
    assert y.dtype == dtype and y.shape == (m, N)
    _close(y, ref, dtype)
    # the packed reference decodes to exactly what affine.dequantize gives (with fp16 scales)
    deq = affine_dequant_weight_reference(packed, scales16, zeros_packed, bits, group_size, K, sym)
    assert torch.equal(deq, affine.dequantize(codes, scales16.float(), zeros, group_size))


def test_leading_dims_kept():
    w = torch.randn(N, K)
    codes, scale = absmax.quantize(w, dim=-1)
    x = torch.randn(2, 3, K)
    y = int8_weight_matmul(x, codes, scale.reshape(-1))
    assert y.shape == (2, 3, N)
    _close(y, int8_weight_matmul_reference(x, codes, scale.reshape(-1)), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 130])
def test_cuda_kernels_match_reference(m):
    """On a GPU: the autotuned kernels (real compiled path) against the references."""
    torch.manual_seed(0)
    w = torch.randn(300, 576, device="cuda") * 0.05
    x = torch.randn(m, 576, device="cuda", dtype=torch.float16)
    codes, scale = absmax.quantize(w, dim=-1)
    ref_codes, ref_scale = absmax.quantize_reference(w, dim=-1)
    assert torch.equal(codes, ref_codes)
    _close(int8_weight_matmul(x, codes, scale.reshape(-1)),
           int8_weight_matmul_reference(x, codes, scale.reshape(-1)), torch.float16)
    q, s, z = affine.quantize(w, 4, 128)
    assert torch.equal(q, affine.quantize_reference(w, 4, 128)[0])
    packed, zp = affine.pack_codes(q, 4), affine.pack_codes(z, 4)
    _close(affine_weight_matmul(x, packed, s.half(), zp, 4, 128, 576),
           affine_weight_matmul_reference(x, packed, s.half(), zp, 4, 128, 576), torch.float16)


@pytest.mark.parametrize("bits,group_size,grouped", [(4, 128, True), (4, 16, True), (2, -1, True), (8, 32, True),
                                                     (4, 24, False), (3, 16, False), (4, 8, False)])
def test_batch_one_takes_the_grouped_gemv_where_codes_fill_bytes(monkeypatch, bits, group_size, grouped):
    """Codes that fill whole bytes in power-of-two groups (or one group a row) take the grouped GEMV
    (vector loads, scale and zero once per group); others the general kernel."""
    import qbench.kernels.dequant_matmul as dm

    launched = []
    real = dm._kernel
    monkeypatch.setattr(dm, "_kernel", lambda name: launched.append(name) or real(name))
    codes, scales, zeros = affine.quantize(torch.randn(N, K) * 0.1, bits, group_size)
    packed, zeros_packed = affine.pack_codes(codes, bits), affine.pack_codes(zeros, bits)
    affine_weight_matmul(torch.randn(1, K), packed, scales.half(), zeros_packed, bits, group_size, K)
    assert launched == ["gemv_grouped" if grouped else "gemv"]
