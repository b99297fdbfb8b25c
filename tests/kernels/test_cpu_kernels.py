"""The packed CPU kernels against the torch references, on odd shapes, fp32 and bf16 inputs.

Tolerances, and why:

* W8A8 (``torch._int_mm``): none. The integer sums are exact and the epilogue is the reference's,
  operation for operation: bit-identical.
* NF4 decode (prefill path): none, the weight is bit-identical. NF4 GEMV (decode path): fp32
  throughout, the sums in another order: within 1e-6 of ``|x| @ |W|.T`` (fp32 rounding is 6e-8
  per operation; a wrong code, nibble or absmax would be off by a whole quantization step).
* int8 weight-only and int4 (ATen's kernels vectorize bf16 activations only; the prefill paths use
  oneDNN's bf16 GEMM): the activations and the output are rounded to bf16 (2**-9 relative each),
  int4 also rounds its scale (2**-9 relative) and zero (at most 8 * 2**-9 of the scale) to bf16, and
  the bf16 GEMM paths round the weight, so per output
  ``|y - ref| <= 2**-7 * (|x| @ |W|.T) + 2**-8 * |ref|`` plus, for int4, ``2**-6 * (|x| @ S.T)``
  (S: each weight's scale). Against their exact emulations (same roundings, plain torch) they agree
  to one bf16 step of the output. The int4 layout itself is checked exactly: the identity matrix as
  input returns the decoded weight (rounded to bf16) bit for bit, and so does the C decode.
"""
import copy

import pytest
import torch

from qbench.kernels import affine, cpu_int4, cpu_int8, cpu_int8_matmul, cpu_nf4
from qbench.kernels._cpu import CPU_KERNEL_ENV, bf16_gemm_fast, cpu_kernel_mode, use_cpu_kernel
from qbench.kernels.absmax import _quantize_rows_reference
from qbench.kernels.absmax import quantize_reference as absmax_quantize
from qbench.kernels.dequant_matmul import affine_weight_matmul_reference, int8_weight_matmul_reference
from qbench.kernels.gptq_pack import pack_gptq
from qbench.kernels.int8_matmul import int8_matmul_reference
from qbench.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference
from qbench.method import quantized_modules
from qbench.params import QBenchError

needs_nf4_kernel = pytest.mark.skipif(cpu_nf4.library() is None,
                                      reason=f"NF4 CPU kernel did not build: {cpu_nf4.build_error()}")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _bf16_bound(x, w, ref, first=2**-7):
    """|y - ref| allowed per output for a bf16-activation kernel (see the module docstring)."""
    return first * (x.float().abs() @ w.float().abs().T) + 2**-8 * ref.float().abs() + 1e-6


def _int4_bound(x, w, scales, group_size, ref):
    """The bf16 bound plus the bf16 rounding of each group's zero (at most 8 * 2**-9 of its scale)."""
    K = w.shape[1]
    size = affine.effective_group_size(K, group_size)
    step = scales.float().repeat_interleave(size, dim=1)[:, :K]
    return _bf16_bound(x, w, ref) + 2**-6 * (x.float().abs() @ step.T)


def _one_bf16_step(y, emulated):
    """y within one bf16 rounding step of the emulation (the sums differ only in order)."""
    step = emulated.float().abs() * 2**-7 + 1e-6
    return bool(((y.float() - emulated.float()).abs() <= step).all())


# ---------------------------------------------------------------- int8 weight-only (W8A16)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("rows,N,K", [(1, 37, 48), (5, 16, 112), (3, 1, 16), (2, 20, 576), (20, 24, 64)])
def test_int8_weight_only_matches_reference(dtype, granularity, rows, N, K):  # 40 rows: the bf16 GEMM path
    w = torch.randn(N, K, generator=_gen())
    codes, scale = absmax_quantize(w, dim=-1) if granularity == "channel" else absmax_quantize(w)
    scale = scale.reshape(-1) if granularity == "channel" else scale
    bias = torch.randn(N, generator=_gen(1)).to(dtype)
    x = torch.randn(2, rows, K, generator=_gen(2)).to(dtype)
    y = cpu_int8.int8_weight_matmul_cpu(x, codes, scale, bias)
    ref = int8_weight_matmul_reference(x, codes, scale, bias)
    assert y.shape == ref.shape == (2, rows, N) and y.dtype == dtype
    w_hat = codes.float() * scale.reshape(-1, 1).float()
    bound = _bf16_bound(x.reshape(-1, K), w_hat, ref.reshape(-1, N), first=2**-8).reshape(ref.shape)
    if dtype == torch.bfloat16:
        bound = bound + 2**-8 * ref.float().abs()  # the reference's own bf16 output rounding
    assert ((y.float() - ref.float()).abs() <= bound).all()
    unbiased = cpu_int8.int8_weight_matmul_cpu(x, codes, scale)
    assert _one_bf16_step(unbiased, cpu_int8.int8_weight_matmul_cpu_reference(x, codes, scale))
    assert cpu_int8.kernel_path(2 * rows) == ("cpu:int8-bf16gemm" if 2 * rows >= cpu_int8.BF16_GEMM_MIN_ROWS
                                              and bf16_gemm_fast() else "cpu:int8pack-bf16")


def test_int8_weight_only_supports_per_channel_and_tensor_scales_and_rows_of_16s_only():
    codes = torch.zeros(4, 32, dtype=torch.int8)
    assert cpu_int8.supports(codes, torch.ones(4)) and cpu_int8.supports(codes, torch.tensor(1.0))
    assert not cpu_int8.supports(codes, torch.ones(4, 2))  # per-block scales: no such kernel
    assert not cpu_int8.supports(torch.zeros(4, 100, dtype=torch.int8), torch.ones(4))  # ATen: wrong sums
    with pytest.raises(QBenchError, match="per output channel"):
        cpu_int8.int8_weight_matmul_cpu(torch.randn(1, 32), codes, torch.ones(4, 2))


# ---------------------------------------------------------------- W8A8

@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,N,K", [(1, 37, 53), (7, 16, 100), (2, 3, 2), (0, 5, 4)])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_is_bit_identical_to_the_reference(out_dtype, rows, N, K, static):
    w = torch.randn(N, K, generator=_gen())
    codes, scale = absmax_quantize(w, dim=-1)
    x = torch.randn(rows, K, generator=_gen(1)) * 3
    fixed = torch.tensor(2.5) if static else None
    a, sa = _quantize_rows_reference(x, fixed_absmax=fixed)
    bias = torch.randn(N, generator=_gen(2))
    y = cpu_int8_matmul.int8_matmul_cpu(a, sa, codes, scale.reshape(-1), bias, out_dtype)
    ref = int8_matmul_reference(a, sa, codes, scale.reshape(-1), bias, out_dtype)
    assert torch.equal(y, ref)


def test_w8a8_reduction_of_width_one_keeps_the_reference():  # torch._int_mm is wrong there (torch 2.13)
    assert cpu_int8_matmul.supports(torch.zeros(3, 2, dtype=torch.int8))
    assert not cpu_int8_matmul.supports(torch.zeros(3, 1, dtype=torch.int8))


def test_w8a8_extreme_codes_sum_exactly():
    a = torch.full((2, 4096), -127, dtype=torch.int8)
    b = torch.full((3, 4096), 127, dtype=torch.int8)
    y = cpu_int8_matmul.int8_matmul_cpu(a, torch.ones(1), b, torch.ones(1), out_dtype=torch.float32)
    assert torch.equal(y, torch.full((2, 3), -4096.0 * 127 * 127))


# ---------------------------------------------------------------- int4 (affine / GPTQ layout)

INT4_CASES = [  # N, K, group_size: the demo's ragged rows, padding, per-row groups, N not a multiple of 16
    (64, 576, 128), (37, 100, 32), (20, 70, 64), (48, 96, -1), (33, 256, 256)]


def _affine_layer(N, K, group_size, sym=False, seed=0):
    w = torch.randn(N, K, generator=_gen(seed))
    codes, scales, zeros = affine.quantize_reference(w, 4, group_size, sym)
    return codes, scales.half(), zeros


@pytest.mark.parametrize("N,K,group_size", INT4_CASES)
def test_int4_layout_decodes_the_weight_exactly(N, K, group_size):
    codes, scales, zeros = _affine_layer(N, K, group_size)
    size = affine.effective_group_size(K, group_size)
    pack = cpu_int4.pack_int4_cpu(codes, scales, zeros, size)
    assert pack is not None and pack.weight.shape[0] % 16 == 0 and pack.padded_in % pack.group == 0
    decoded = cpu_int4.int4_matmul_cpu(torch.eye(K), pack)  # row k: column k of the weight, in bf16
    expected = cpu_int4.int4_dequant_weight_cpu_reference(codes, scales, zeros, size)
    assert torch.equal(decoded.T, expected.to(torch.bfloat16).float())
    # and the decoded weight is the stored one up to the bf16 rounding of scale and zero
    exact = affine.dequantize_reference(codes, scales.float(), zeros, group_size)
    step = scales.float().repeat_interleave(size, dim=1)[:, :K]
    assert ((expected - exact).abs() <= 2**-8 * step * 16 + 1e-7).all()


def test_ragged_last_group_needs_no_padding_with_kernel_groups_of_64():
    codes, scales, zeros = _affine_layer(16, 576, 128)  # 4 x 128 + 64
    pack = cpu_int4.pack_int4_cpu(codes, scales, zeros, 128)
    assert (pack.group, pack.padded_in) == (64, 576)
    assert pack.scales_and_zeros.shape == (9, 16, 2)
    odd = cpu_int4.pack_int4_cpu(*_affine_layer(16, 70, 64), 64)  # 64 + 6: padded with zero columns
    assert odd.padded_in % odd.group == 0 and odd.padded_in >= 70


@pytest.mark.parametrize("rows", [6, 40])  # ATen's kernel; from 32 rows the bf16 GEMM on the decoded weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,group_size", INT4_CASES)
def test_int4_matmul_matches_the_affine_reference(rows, dtype, N, K, group_size):
    codes, scales, zeros = _affine_layer(N, K, group_size)
    size = affine.effective_group_size(K, group_size)
    pack = cpu_int4.pack_int4_cpu(codes, scales, zeros, size)
    x = torch.randn(rows // 2, 2, K, generator=_gen(5)).to(dtype)
    bias = torch.randn(N, generator=_gen(6)).to(dtype)
    y = cpu_int4.int4_matmul_cpu(x, pack, bias)
    packed, packed_zeros = affine.pack_codes(codes, 4), affine.pack_codes(zeros, 4)
    ref = affine_weight_matmul_reference(x, packed, scales, packed_zeros, 4, group_size, K, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    w = affine.dequantize_reference(codes, scales.float(), zeros, group_size)
    bound = _int4_bound(x.reshape(-1, K), w, scales, group_size, ref.reshape(-1, N)).reshape(ref.shape)
    if dtype == torch.bfloat16:
        bound = bound + 2**-7 * ref.float().abs()  # bf16 bias add and the reference's own rounding
    assert ((y.float() - ref.float()).abs() <= bound).all()
    emulated = cpu_int4.int4_matmul_cpu_reference(x, codes, scales, zeros, size)
    if cpu_int4.kernel_path(rows) == cpu_int4.BF16_GEMM_PATH:  # the decoded weight is rounded to bf16 too
        w_bf16 = cpu_int4.int4_dequant_weight_cpu_reference(codes, scales, zeros, size).to(torch.bfloat16)
        emulated = (x.to(torch.bfloat16).float() @ w_bf16.float().T).to(torch.bfloat16).to(dtype)
    assert _one_bf16_step(cpu_int4.int4_matmul_cpu(x, pack), emulated)


@pytest.mark.parametrize("N,K,group_size", INT4_CASES)
def test_int4_decode_for_the_bf16_gemm_is_the_kernels_weight_in_bf16(N, K, group_size):
    codes, scales, zeros = _affine_layer(N, K, group_size)
    size = affine.effective_group_size(K, group_size)
    pack = cpu_int4.pack_int4_cpu(codes, scales, zeros, size)
    if cpu_int4.layout() is None or cpu_int4._decoder() is None:
        pytest.skip("no C compiler, or ATen's int4 layout is unknown here")
    decoded = cpu_int4.decode_bf16_t(pack)
    assert decoded.shape == (pack.padded_in, pack.weight.shape[0])
    expected = cpu_int4.int4_dequant_weight_cpu_reference(codes, scales, zeros, size).to(torch.bfloat16)
    assert torch.equal(decoded[:K, :N].T, expected)


def _act_order_gidx(K, group_size, seed=0):
    order = torch.randperm(K, generator=_gen(seed))
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[order] = torch.arange(K) // group_size
    return g_idx.to(torch.int32)


def test_int4_act_order_permutes_columns_into_groups():
    N, K, gs = 32, 160, 32
    g_idx = _act_order_gidx(K, gs)
    codes = torch.randint(0, 16, (N, K), generator=_gen(1))
    scales = torch.rand(N, K // gs, generator=_gen(2)).half() + 0.1
    zeros = torch.randint(0, 16, (N, K // gs), generator=_gen(3)).float()
    pack = cpu_int4.pack_int4_cpu(codes, scales, zeros, gs, g_idx)
    assert pack.perm is not None and torch.equal(g_idx[pack.perm].long(), torch.arange(K) // gs)
    x = torch.randn(4, K, generator=_gen(4))
    y = cpu_int4.int4_matmul_cpu(x, pack)
    emulated = cpu_int4.int4_matmul_cpu_reference(x, codes, scales, zeros, gs, g_idx)
    assert _one_bf16_step(y, emulated)
    # monotonic g_idx (no act-order, or static groups) needs no permutation
    natural = (torch.arange(K) // gs).to(torch.int32)
    assert cpu_int4.pack_int4_cpu(codes, scales, zeros, gs, natural).perm is None
    # groups of unequal size have no contiguous layout: the caller keeps the reference
    uneven = natural.clone()
    uneven[:40] = 0
    assert cpu_int4.pack_int4_cpu(codes, scales, zeros, gs, uneven) is None


def test_int4_groups_the_kernel_cannot_tile_fall_back():
    codes, scales, zeros = _affine_layer(16, 96, 48)  # 48: not a multiple of 32
    assert cpu_int4.pack_int4_cpu(codes, scales, zeros, 48) is None


# ---------------------------------------------------------------- NF4 / FP4

NF4_CASES = [(37, 64, 64, True, "nf4"), (16, 96, 32, False, "fp4"), (5, 256, 128, True, "fp4"),
             (300, 64, 64, True, "nf4")]  # 300 x 64: more than 256 blocks, two nested absmax values


@needs_nf4_kernel
@pytest.mark.parametrize("N,K,blocksize,double_quant,quant_type", NF4_CASES)
def test_nf4_decode_is_bit_identical(N, K, blocksize, double_quant, quant_type):
    q = quantize_nf4_reference(torch.randn(N, K, generator=_gen()), blocksize, double_quant, quant_type)
    assert cpu_nf4.supports(q)
    assert torch.equal(cpu_nf4.nf4_decode_cpu(q), dequantize_nf4_reference(q, torch.float32))


@needs_nf4_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,blocksize,double_quant,quant_type", NF4_CASES)
def test_nf4_matmul_matches_reference(rows, dtype, N, K, blocksize, double_quant, quant_type):
    q = quantize_nf4_reference(torch.randn(N, K, generator=_gen()), blocksize, double_quant, quant_type)
    x = torch.randn(rows, K, generator=_gen(1)).to(dtype)
    y = cpu_nf4.nf4_matmul_cpu(x, q)
    ref = cpu_nf4.nf4_matmul_cpu_reference(x, q)
    assert y.shape == ref.shape and y.dtype == dtype
    w = dequantize_nf4_reference(q, torch.float32)
    if rows > cpu_nf4.GEMV_MAX_ROWS and not bf16_gemm_fast():  # decode + the same fp32 matmul
        assert torch.equal(y, ref)
    elif rows > cpu_nf4.GEMV_MAX_ROWS:  # decode, then bf16 weight and input into oneDNN's bf16 GEMM
        assert ((y.float() - ref.float()).abs() <= _bf16_bound(x, w, ref)).all()
    else:
        scale = x.float().abs() @ w.abs().T
        slack = 2**-7 * ref.float().abs() if dtype == torch.bfloat16 else 0  # one bf16 step of the output
        assert ((y.float() - ref.float()).abs() <= 1e-6 * scale + slack + 1e-7).all()


@needs_nf4_kernel
def test_nf4_rows_that_end_mid_block_are_not_supported():
    q = quantize_nf4_reference(torch.randn(6, 96), 64, True, "nf4")  # 96 columns, blocks of 64
    assert not cpu_nf4.supports(q)
    with pytest.raises(QBenchError, match="whole quantization"):
        cpu_nf4.nf4_matmul_cpu(torch.randn(1, 96), q)


# ---------------------------------------------------------------- modules: path choice, oracle switch, memory

def test_mode_switch_and_autograd_keep_the_reference(monkeypatch):
    x = torch.randn(2, 4)
    assert cpu_kernel_mode() == "auto" and use_cpu_kernel(x)
    assert not use_cpu_kernel(x.requires_grad_())  # the packed kernels have no backward
    with torch.no_grad():
        assert use_cpu_kernel(x)
    monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
    assert not use_cpu_kernel(torch.randn(2, 4))
    monkeypatch.setenv(CPU_KERNEL_ENV, "fast")
    with pytest.raises(QBenchError, match="QBENCH_CPU_KERNEL='fast' is not valid; valid values: auto, reference"):
        use_cpu_kernel(torch.randn(2, 4))


def _method_model(tiny_model, name, params):
    from qbench import host

    return host.make_method(name, params).quantize(copy.deepcopy(tiny_model))


@pytest.mark.parametrize("name,params,path", [
    ("int8-absmax", {}, "cpu:int8pack-bf16"), ("int8-absmax", {"activations": "dynamic"}, "cpu:int_mm"),
    ("affine", {"bits": 4, "group_size": 32}, "cpu:int4pack-bf16"),
    ("nf4", {"blocksize": 32}, cpu_nf4.kernel_path(12)),
])
def test_modules_record_their_path_and_the_oracle_is_one_variable_away(tiny_model, monkeypatch, name, params, path):
    if name == "nf4" and cpu_nf4.library() is None:
        pytest.skip("NF4 CPU kernel did not build")
    model = _method_model(tiny_model, name, params)
    ids = torch.randint(3, 259, (1, 12), generator=_gen())
    # NF4 rows must be whole blocks: down_proj's 176 columns (blocks of 32) keep the reference
    expected = {n: "reference" if name == "nf4" and m.in_features % 32 else path for n, m in quantized_modules(model)}
    with torch.no_grad():
        fast = model(ids).logits
        assert {n: m.kernel_path for n, m in quantized_modules(model)} == expected
        monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
        oracle = model(ids).logits
        assert {m.kernel_path for _, m in quantized_modules(model)} == {"reference"}
    if path == "cpu:int_mm":
        assert torch.equal(fast, oracle)
    else:  # bf16 activations through 2 decoder layers (int8 / int4), fp32 sums in another order (nf4)
        assert (fast - oracle).abs().max() <= 0.02 * oracle.abs().max()


def test_int4_layout_replaces_the_codes_at_load_time_and_is_what_the_memory_suite_counts(tiny_model, monkeypatch):
    from qbench.quant.affine import AffineLinear
    from qbench.suites.memory import model_bytes, quantized_layer_bytes

    monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
    oracle = _method_model(tiny_model, "affine", {"bits": 4, "group_size": 32})
    monkeypatch.setenv(CPU_KERNEL_ENV, "auto")
    model = _method_model(tiny_model, "affine", {"bits": 4, "group_size": 32})
    layers, oracle_layers = dict(quantized_modules(model)), dict(quantized_modules(oracle))
    layer = layers["model.layers.0.mlp.down_proj"]  # 64 x 176: 176 = 5 x 32 + 16, padded to 192 columns
    reference_layer = oracle_layers["model.layers.0.mlp.down_proj"]
    held = layer.runtime_tensors()
    assert set(held) == {"int4pack_weight", "int4pack_scales_and_zeros"}
    assert held["int4pack_weight"].shape == (64, 96) and held["int4pack_scales_and_zeros"].shape == (6, 64, 2)
    # the kernel's layout holds the codes: the stored buffer is gone, rebuilt exactly on request
    assert layer.codes is None and reference_layer.codes is not None and reference_layer.runtime_tensors() == {}
    for name, tensor in reference_layer.stored_tensors().items():
        assert torch.equal(layer.stored_tensors()[name], tensor)
    assert layer.storage_bytes() == reference_layer.storage_bytes()
    codes_bytes = reference_layer.codes.numel()
    assert layer.resident_bytes() == layer.storage_bytes() - codes_bytes + 64 * 96 + 6 * 64 * 2 * 2
    assert reference_layer.resident_bytes() == reference_layer.storage_bytes()
    resident, _ = quantized_layer_bytes(model, resident=True)
    assert resident == sum(m.resident_bytes() for m in layers.values()) != quantized_layer_bytes(model)[0]
    assert model_bytes(model) - model_bytes(oracle) == resident - quantized_layer_bytes(oracle, resident=True)[0]
    # rebuilt from the stored tensors (as the cache loads it): the same layout, before any forward
    clone = AffineLinear.from_stored(layer.stored_tensors(), layer.config())
    assert torch.equal(clone.runtime_tensors()["int4pack_weight"], held["int4pack_weight"])
    # switching to the reference brings the stored codes back (both held then, and counted)
    x = torch.randn(2, 176, generator=_gen())
    with torch.no_grad():
        fast = clone(x)
        monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
        assert torch.equal(clone(x), reference_layer(x)) and clone.codes is not None
    assert clone.resident_bytes() == clone.storage_bytes() + 64 * 96 + 6 * 64 * 2 * 2
    bound = _int4_bound(x, reference_layer.dequantized_weight(), reference_layer.scales, 32, fast)
    assert ((fast - reference_layer(x)).abs() <= bound).all()
    # moved or cast: the stored codes come back first, the layout is rebuilt where a CPU forward needs it
    monkeypatch.setenv(CPU_KERNEL_ENV, "auto")
    moved = copy.deepcopy(layer).float()
    assert moved.codes is not None and moved.runtime_tensors() == {}
    assert torch.equal(moved.codes, reference_layer.codes)


def test_gptq_act_order_module_runs_the_int4_kernel(monkeypatch):
    from qbench.plugins.gptq import GPTQLinear

    N, K, gs = 48, 96, 32
    g_idx = _act_order_gidx(K, gs, seed=3)
    codes = torch.randint(0, 16, (K, N), generator=_gen(1))
    scales = torch.rand(K // gs, N, generator=_gen(2)).half() + 0.05
    zeros = torch.randint(1, 16, (K // gs, N), generator=_gen(3))
    packed = pack_gptq(codes, scales, zeros, g_idx, 4)
    layer = GPTQLinear(K, N, 4, gs, False, True, **packed)
    assert set(layer.runtime_tensors()) == {"int4pack_weight", "int4pack_scales_and_zeros", "int4pack_perm"}
    assert layer.qweight is None  # held in the kernel's layout; checkpoints still get the GPTQ one, exactly
    assert torch.equal(layer.stored_tensors()["qweight"], packed["qweight"])
    assert torch.equal(layer.state_dict()["qweight"], packed["qweight"])
    x = torch.randn(3, K, generator=_gen(4))
    with torch.no_grad():
        y = layer(x)
        assert layer.kernel_path == "cpu:int4pack-bf16"
        monkeypatch.setenv(CPU_KERNEL_ENV, "reference")
        ref = layer(x)
    step = scales.float()[g_idx.long()].T  # each weight's scale, [N, K]
    bound = _bf16_bound(x, layer.dequantized_weight(), ref) + 2**-6 * (x.abs() @ step.T)
    assert ((y - ref).abs() <= bound).all()


def test_float_linear_left_alone():
    from qbench.plugins.baseline import FloatLinear

    layer = FloatLinear(torch.randn(8, 4).half(), None)
    layer(torch.randn(1, 4))
    assert layer.kernel_path == "torch" and layer.runtime_tensors() == {}


def test_every_path_a_layer_ran_is_recorded(tiny_model):
    from qbench.method import kernel_paths

    model = _method_model(tiny_model, "int8-absmax", {})
    with torch.no_grad():
        model(torch.randint(3, 259, (1, 40), generator=_gen()))  # a prefill of 40 rows, then one decode step
        model(torch.randint(3, 259, (1, 1), generator=_gen()))
    assert kernel_paths(model) == sorted({cpu_int8.kernel_path(40), cpu_int8.kernel_path(1)})
    layer = next(m for _, m in quantized_modules(model))
    assert layer.kernel_path == cpu_int8.kernel_path(1)  # the last one


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layout_from_round_to_nearest(act_order):
    from torch import nn

    from qbench.plugins.gptq import GPTQLinear

    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = GPTQLinear.from_rtn(linear, 4, 32, True, act_order)
    w = linear.weight.detach()
    order = torch.argsort(w.norm(dim=0), descending=True) if act_order else torch.arange(96)
    codes, scales, zeros = affine.quantize_reference(w[:, order], 4, 32, True)
    expected = torch.empty_like(w)
    expected[:, order] = affine.dequantize_reference(codes, scales.half().float(), zeros, 32)  # fp16 scales
    assert torch.equal(layer.dequantized_weight(), expected)
    assert bool((layer.g_idx.diff() < 0).any()) == act_order
    assert torch.equal(layer.bias, linear.bias.detach())
