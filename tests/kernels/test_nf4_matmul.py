"""Fused NF4 dequantize-GEMV/GEMM and the input-gradient kernel (TRITON_INTERPRET=1) against the
reference (dequantize, then matmul), and nf4_linear's autograd."""
import pytest
import torch

from qbench.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference
from qbench.kernels.nf4_matmul import (
    DEQUANT_MATMUL_PATH,
    GEMV_MAX_ROWS,
    cuda_kernel_path,
    nf4_linear,
    nf4_matmul,
    nf4_matmul_grad_input,
    nf4_matmul_grad_input_reference,
    nf4_matmul_reference,
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _case(out_f, in_f, blocksize, double_quant, quant_type, seed=0, zero_rows=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    if zero_rows:
        w[:2] = 0
    return quantize_nf4_reference(w, blocksize, double_quant, quant_type), gen


def _close(got, want, dtype):
    scale = want.float().abs().max().clamp(min=1)
    assert (got.float() - want.float()).abs().max() <= TOL[dtype] * scale * 4


@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant,quant_type", [
    (37, 101, 32, True, "nf4"),     # odd rows: rows start mid-byte, blocks span rows
    (24, 70, 64, False, "fp4"),
    (19, 96, 4096, True, "nf4"),    # one block larger than the whole weight
])
def test_forward_and_grad_input_match_reference(rows, dtype, out_f, in_f, blocksize, double_quant, quant_type):
    q, gen = _case(out_f, in_f, blocksize, double_quant, quant_type, seed=out_f, zero_rows=True)
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    y = nf4_matmul(x, q)
    assert y.dtype == dtype and y.shape == (rows, out_f)
    _close(y, nf4_matmul_reference(x.float(), q), dtype)
    assert torch.all(y[:, :2] == 0)  # all-zero weight rows
    g = torch.randn(rows, out_f, generator=gen).to(dtype)
    gx = nf4_matmul_grad_input(g, q)
    assert gx.dtype == dtype and gx.shape == (rows, in_f)
    _close(gx, nf4_matmul_grad_input_reference(g.float(), q), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant,quant_type", [
    (13, 64, 32, True, "nf4"),      # whole blocks per row: the aligned decode kernel
    (9, 192, 64, False, "fp4"),     # a step of 16 bytes covers pieces of two blocks
    (7, 256, 128, True, "nf4"),
    (300, 128, 64, True, "nf4"),    # more than 256 blocks: several nested absmax values
])
def test_aligned_kernels_match_reference(dtype, out_f, in_f, blocksize, double_quant, quant_type):
    q, gen = _case(out_f, in_f, blocksize, double_quant, quant_type, seed=in_f, zero_rows=True)
    for rows in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 13):  # the GEMV path, then the GEMM path
        x = torch.randn(rows, in_f, generator=gen).to(dtype)
        y = nf4_matmul(x, q)
        assert y.dtype == dtype and y.shape == (rows, out_f)
        _close(y, nf4_matmul_reference(x.float(), q), dtype)
        assert torch.all(y[:, :2] == 0)
        g = torch.randn(rows, out_f, generator=gen).to(dtype)  # the aligned input-gradient kernel
        gx = nf4_matmul_grad_input(g, q)
        assert gx.dtype == dtype and gx.shape == (rows, in_f)
        _close(gx, nf4_matmul_grad_input_reference(g.float(), q), dtype)


def test_aligned_kernels_match_reference_on_blocks_of_4096():
    """bitsandbytes' largest block, two a row, each larger than any step. In float32 only: the
    dtype cases above cover the casts, and the interpreter's 256 steps a row cost 17 s a dtype."""
    test_aligned_kernels_match_reference(torch.float32, 5, 4096 * 2, 4096, True, "nf4")


def test_batched_leading_dims():
    q, gen = _case(20, 50, 32, True, "nf4")
    x = torch.randn(2, 3, 50, generator=gen)
    _close(nf4_matmul(x, q), nf4_matmul_reference(x, q), torch.float32)


@pytest.mark.parametrize("use_triton", [True, False])
def test_nf4_linear_autograd(use_triton):
    q, gen = _case(21, 45, 32, True, "nf4")
    x = torch.randn(6, 45, generator=gen, requires_grad=True)
    bias = torch.randn(21, generator=gen, requires_grad=True)
    y = nf4_linear(x, q, bias, use_triton=use_triton)
    g = torch.randn(6, 21, generator=gen)
    y.backward(g)
    w = dequantize_nf4_reference(q, torch.float32)
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    (x2 @ w.t() + b2).backward(g)
    _close(y, x2 @ w.t() + b2, torch.float32)
    _close(x.grad, x2.grad, torch.float32)
    _close(bias.grad, b2.grad, torch.float32)


def test_shape_mismatch():
    q, _ = _case(8, 32, 32, False, "nf4")
    with pytest.raises(ValueError, match="features"):
        nf4_matmul(torch.randn(2, 31), q)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_reference(rows, dtype):
    q, gen = _case(4096, 4096, 64, True, "nf4")
    q = q.to("cuda")
    x = torch.randn(rows, 4096, generator=gen).to("cuda", dtype)
    _close(nf4_matmul(x, q), nf4_matmul_reference(x.float(), q), dtype)
    _close(nf4_matmul_grad_input(x[:, :4096], q), nf4_matmul_grad_input_reference(x.float(), q), dtype)


@pytest.mark.gpu
def test_nf4_linear_replays_from_a_cuda_graph():
    """The decode step of an NF4 model is captured once and replayed (latency's compile=cuda-graphs)."""
    from qbench.quant.nf4 import NF4Linear

    layer = NF4Linear.from_linear(torch.nn.Linear(512, 256).to("cuda", torch.float16))
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    eager = layer(x)  # compiles and autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 128])
def test_cuda_fp32_inputs_are_not_rounded_to_tf32(rows):
    """fp32 activations get IEEE fp32 dots (torch's fp32 matmul is not TF32 by default): rounding x
    to TF32's 10-bit mantissa gives errors of ~0.02 on outputs of ~45 here, over this tolerance."""
    q, gen = _case(1024, 2048, 64, True, "nf4")
    q = q.to("cuda")
    x = torch.randn(rows, 2048, generator=gen).to("cuda")
    _close(nf4_matmul(x, q), nf4_matmul_reference(x, q), torch.float32)
    g = torch.randn(rows, 1024, generator=gen).to("cuda")
    _close(nf4_matmul_grad_input(g, q), nf4_matmul_grad_input_reference(g, q), torch.float32)


@pytest.mark.gpu
def test_cuda_fp16_batches_dequantize_then_matmul(monkeypatch):
    """Above GEMV_MAX_ROWS, fp16 on CUDA dequantizes the weight and lets torch multiply; the fused
    GEMM (QBENCH_CUDA_GEMM=fused) gives the same numbers."""
    q, gen = _case(1024, 2048, 64, True, "nf4")
    q = q.to("cuda")
    x = torch.randn(16, 2048, generator=gen).to("cuda", torch.float16)
    assert cuda_kernel_path(x) == DEQUANT_MATMUL_PATH
    assert cuda_kernel_path(x[:1]) == "triton" and cuda_kernel_path(x.bfloat16()) == "triton"
    whole_weight = nf4_matmul(x, q)
    monkeypatch.setenv("QBENCH_CUDA_GEMM", "fused")
    assert cuda_kernel_path(x) == "triton"
    _close(whole_weight, nf4_matmul(x, q), torch.float16)
