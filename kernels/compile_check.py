"""Compile every Triton kernel for a GPU target on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs our kernels as numpy code: it checks their
arithmetic but not that they compile. The real compiler type-checks (e.g. every ``return`` of a
``@triton.jit`` helper must agree), lowers ``tl.dot`` to tensor-core instructions, and assigns
registers and shared memory. This module runs that compiler, for the target of an H100
(``cuda:90``) by default, through the same launchers users call:

* a stand-in driver answers the device queries the launchers make (device 0, the chosen target);
* ``JITFunction.run`` compiles and does not launch; an autotuned kernel compiles every config;
* each module's ``triton_can_run`` is told yes, so CPU tensors take the Triton path.

For each compiled variant it reports registers per thread, local-memory bytes (register
spills) and shared memory, read from the cubin with the ``cuobjdump`` that ships
with Triton. Nothing runs on a device: speed is not measured here (tests/benchmarks does that).

    python -m qbench.kernels.compile_check [--arch 90] [--first-config] [--markdown FILE]

Run it without ``TRITON_INTERPRET=1`` (it refuses otherwise: the launchers would pick the
interpreter's fixed small blocks instead of the autotune configs).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# Limits of the sm_90 (H100) multiprocessor, from NVIDIA's CUDA C++ Programming Guide
# ("Technical Specifications per Compute Capability"): 255 registers per thread, 227 KB of
# shared memory per block.
MAX_REGISTERS = 255
MAX_SHARED_BYTES = 227 * 1024


@dataclass
class Variant:
    """One compiled (or failed) specialization of a kernel."""

    kernel: str
    case: str  # which launcher call produced it
    meta: dict  # constexprs and launch options that distinguish it
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None
    narrow_loads: int | None = None  # ld.global of 1 or 2 bytes in the PTX (static count)
    vector_loads: int | None = None  # ld.global.v2/.v4 (8 or 16 bytes a thread)

    @property
    def ok(self) -> bool:
        """Compiled, within the register file, nothing spilled to local memory."""
        return (self.error is None and self.spill_bytes == 0 and self.registers is not None
                and self.registers <= MAX_REGISTERS)

    @property
    def fits(self) -> bool:
        """Its shared memory fits one block (Triton's autotuner skips a config that does not)."""
        return self.ok and self.shared_bytes <= MAX_SHARED_BYTES


def global_load_widths(ptx: str) -> tuple[int, int]:
    """(narrow, vector) global loads in a kernel's PTX: ``ld.global`` of one or two bytes a thread, and of
    8 or 16 bytes (``.v2``/``.v4``). Static counts, not executions: a memory-bound GEMV whose weight
    loads are narrow issues many small requests where one 16-byte load would do (the first H200 lease
    measured the affine GEMV, byte loads, at 0.2 TB/s, the int8 one, 16-byte loads, at up to 2.2)."""
    loads = re.findall(r"\bld\.global(?:\.[a-z0-9]+)*", ptx)
    narrow = sum(1 for ld in loads if ".v" not in ld and re.search(r"\.[bsu](8|16)\b", ld))
    vector = sum(1 for ld in loads if ".v2" in ld or ".v4" in ld)
    return narrow, vector


def unrunnable_cases(variants: list[Variant]) -> list[tuple[str, str]]:
    """(case, kernel) pairs with no config that compiles and fits: those would fail on the device."""
    groups: dict[tuple[str, str], bool] = {}
    for v in variants:
        key = (v.case, v.kernel)
        groups[key] = groups.get(key, False) or v.fits
    return [key for key, any_fits in groups.items() if not any_fits]


@dataclass
class _Recorder:
    arch: int
    first_config: bool
    case: str = ""
    variants: list[Variant] = field(default_factory=list)


_HIDDEN_META = {"debug", "instrumentation_mode", "fpsan_homomorphic_casts", "num_ctas"}


def _resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    """(registers per thread, local-memory bytes) of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split())
    return int(fields["REG"]), int(fields["LOCAL"])


def _innermost_message(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


@contextlib.contextmanager
def _compile_only(rec: _Recorder):
    """Patch Triton and our launchers so that launching compiles for ``rec.arch`` and records."""
    import torch
    import triton.backends.nvidia.compiler as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    cuobjdump = os.path.join(os.path.dirname(nvidia.get_ptxas(rec.arch).path), "cuobjdump")
    target = GPUTarget("cuda", rec.arch, 32)

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

    original_run, original_autotune_run = JITFunction.run, Autotuner.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        meta = {k: v for k, v in kwargs.items() if k not in _HIDDEN_META}
        meta.update({name: str(a.dtype).replace("torch.", "") for name, a in zip(self.arg_names, args)
                     if hasattr(a, "dtype") and name in ("x_ptr", "a_ptr", "g_ptr", "dy_ptr", "out_ptr")})
        variant = Variant(self.__name__, rec.case, meta)
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
            variant.registers, variant.spill_bytes = _resource_usage(kernel.asm["cubin"], cuobjdump)
            variant.shared_bytes = int(kernel.metadata.shared)
            variant.narrow_loads, variant.vector_loads = global_load_widths(kernel.asm["ptx"])
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported per variant
            variant.error = _innermost_message(exc)
        rec.variants.append(variant)

    def autotune_run(self, *args, **kwargs):
        for config in self.configs[:1] if rec.first_config else self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    previous_driver = driver._active  # None on a machine without a GPU (reset_active would raise there)
    driver.set_active(CompileOnlyDriver())
    JITFunction.run, Autotuner.run = compile_run, autotune_run
    modules = kernel_modules()
    saved = [(m, m.triton_can_run) for m in modules]
    for m in modules:
        m.triton_can_run = lambda t: True
    from qbench.kernels import nf4

    saved_fp32 = nf4._exact_fp32_options
    nf4._exact_fp32_options = lambda t: {"enable_fp_fusion": False}  # what a CUDA tensor gets
    try:
        yield
    finally:
        nf4._exact_fp32_options = saved_fp32
        for m, fn in saved:
            m.triton_can_run = fn
        JITFunction.run, Autotuner.run = original_run, original_autotune_run
        driver._active = previous_driver


def kernel_modules():
    """Every module of qbench.kernels that launches Triton kernels."""
    from qbench.kernels import absmax, affine, dequant_matmul, gptq_matmul, int8_matmul, lora_nf4, nf4, nf4_matmul

    return [absmax, affine, dequant_matmul, gptq_matmul, int8_matmul, lora_nf4, nf4, nf4_matmul]


DTYPES = ("float16", "bfloat16", "float32")


def _cases():
    """(name, call) for every launcher path: each dtype, GEMV and GEMM, each flag that changes code.

    Shapes are Llama-like but small (the kernels are specialised on dtypes and constexprs, not on
    sizes, apart from Triton's divisibility-by-16 hints, which these shapes have as real layers do).
    """
    import torch

    from qbench.kernels import absmax, affine, dequant_matmul, gptq_matmul, int8_matmul, lora_nf4, nf4, nf4_matmul
    from qbench.kernels.gptq_pack import pack_gptq

    K, N = 512, 256
    cases = []
    add = lambda name, fn: cases.append((name, fn))  # noqa: E731
    for dt_name in DTYPES:
        dt = getattr(torch, dt_name)
        w = torch.randn(N, K, dtype=dt)
        add(f"absmax.quantize_rows {dt_name}", lambda w=w: absmax.quantize_rows(w))
        add(f"absmax.quantize_rows fixed {dt_name}",
            lambda w=w: absmax.quantize_rows(w, fixed_absmax=torch.tensor(3.0)))
        add(f"absmax.dequantize {dt_name}", lambda dt=dt: absmax.dequantize(
            torch.zeros(N, K, dtype=torch.int8), torch.ones(N, K // 64), block_size=64, dtype=dt))
        add(f"affine.quantize {dt_name}", lambda w=w: affine.quantize(w, bits=4, group_size=128))
        add(f"affine.dequantize {dt_name}", lambda dt=dt: affine.dequantize(
            torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, 4), torch.zeros(N, 4), group_size=128, dtype=dt))
        for rows in (1, 16):
            x = torch.randn(rows, K, dtype=dt)
            add(f"int8_weight_matmul rows={rows} {dt_name}", lambda x=x: dequant_matmul.int8_weight_matmul(
                x, torch.zeros(N, K, dtype=torch.int8), torch.ones(N, 1)))
            add(f"int8_weight_matmul g128 bias rows={rows} {dt_name}",
                lambda x=x, dt=dt: dequant_matmul.int8_weight_matmul(
                    x, torch.zeros(N, K, dtype=torch.int8), torch.ones(N, 4), bias=torch.zeros(N, dtype=dt),
                    group_size=128))
            for bits in (2, 3, 4, 8):
                row_bytes = affine.packed_row_bytes(K, bits)
                zero_bytes = affine.packed_row_bytes(K // 128, bits)
                add(f"affine_weight_matmul {bits}b rows={rows} {dt_name}",
                    lambda x=x, bits=bits, rb=row_bytes, zb=zero_bytes: dequant_matmul.affine_weight_matmul(
                        x, torch.zeros(N, rb, dtype=torch.uint8), torch.ones(N, 4),
                        torch.zeros(N, zb, dtype=torch.uint8), bits, 128, K))
                add(f"gptq_matmul {bits}b rows={rows} {dt_name}", lambda x=x, bits=bits, dt=dt: gptq_matmul.gptq_matmul(
                    x, *_gptq_tensors(pack_gptq, K, N, bits, dt), bits))
                if rows == 1 and 32 % bits == 0:  # g_idx = k // 128: the grouped GEMV
                    add(f"gptq_matmul grouped {bits}b rows=1 {dt_name}",
                        lambda x=x, bits=bits, dt=dt: gptq_matmul.gptq_matmul(
                            x, *_gptq_tensors(pack_gptq, K, N, bits, dt), bits, group=128))
            q = nf4.quantize_nf4_reference(torch.randn(N, K))
            odd = nf4.quantize_nf4_reference(torch.randn(N, K - 16), double_quant=False)  # rows end mid-block
            add(f"nf4_matmul rows={rows} {dt_name}", lambda x=x, q=q: nf4_matmul.nf4_matmul(x, q, use_triton=True))
            add(f"nf4_matmul no-dq unaligned rows={rows} {dt_name}",
                lambda x=x, odd=odd: nf4_matmul.nf4_matmul(x[:, :K - 16], odd, use_triton=True))
            g = torch.randn(rows, N, dtype=dt)
            add(f"nf4_matmul_grad_input rows={rows} {dt_name}",
                lambda g=g, q=q: nf4_matmul.nf4_matmul_grad_input(g, q, use_triton=True))
            add(f"nf4_matmul_grad_input no-dq unaligned rows={rows} {dt_name}",
                lambda g=g, odd=odd: nf4_matmul.nf4_matmul_grad_input(g, odd, use_triton=True))
        for quant_type in ("nf4", "fp4"):
            add(f"quantize_nf4 {quant_type} {dt_name}", lambda w=w, qt=quant_type: nf4.quantize_nf4(w, quant_type=qt))
        for dq in (True, False):
            q = nf4.quantize_nf4_reference(torch.randn(N, K), double_quant=dq)
            add(f"dequantize_nf4 dq={dq} {dt_name}", lambda q=q, dt=dt: nf4.dequantize_nf4(q, dt))
        q = nf4.quantize_nf4_reference(torch.randn(N, K))
        for adapter_dtype in {torch.float32, dt}:  # fp32 adapters as the qlora method keeps them, and x's dtype
            x = torch.randn(64, K, dtype=dt, requires_grad=True)
            lora_a = torch.randn(16, K, dtype=adapter_dtype, requires_grad=True)
            lora_b = torch.randn(N, 16, dtype=adapter_dtype, requires_grad=True)
            add(f"lora_nf4_linear forward+backward {dt_name} adapters {str(adapter_dtype)[6:]}",
                lambda x=x, a=lora_a, b=lora_b, q=q: lora_nf4.lora_nf4_linear(x, q, a, b, 2.0).sum().backward())
        k_odd = K - 16  # rows end mid-block: weights decoded one by one
        x = torch.randn(64, k_odd, dtype=dt, requires_grad=True)
        lora_a = torch.randn(16, k_odd, requires_grad=True)
        lora_b = torch.randn(N, 16, requires_grad=True)
        q_odd = nf4.quantize_nf4_reference(torch.randn(N, k_odd))
        add(f"lora_nf4_linear forward+backward unaligned {dt_name}",
            lambda x=x, a=lora_a, b=lora_b, q=q_odd: lora_nf4.lora_nf4_linear(x, q, a, b, 2.0).sum().backward())
    a = torch.zeros(16, K, dtype=torch.int8)
    add("int8_matmul (W8A8)", lambda: int8_matmul.int8_matmul(a, torch.ones(16), torch.zeros(N, K, dtype=torch.int8),
                                                               torch.ones(N)))
    add("int8_matmul (W8A8) bias", lambda: int8_matmul.int8_matmul(
        a, torch.ones(()), torch.zeros(N, K, dtype=torch.int8), torch.ones(N), bias=torch.zeros(N)))
    return cases


def _gptq_tensors(pack_gptq, K, N, bits, dtype):
    import torch

    groups = K // 128
    codes = torch.zeros(K, N, dtype=torch.int32)
    g_idx = torch.arange(K, dtype=torch.int32) // 128
    t = pack_gptq(codes, torch.ones(groups, N), torch.ones(groups, N, dtype=torch.int32), g_idx, bits)
    return t["qweight"], t["qzeros"], t["scales"].to(dtype), t["g_idx"]


def compile_calls(calls, arch: int = 90, first_config: bool = False) -> list[Variant]:
    """Run each ``(name, call)`` with launching replaced by compiling for ``cuda:arch``; one
    :class:`Variant` per compiled kernel specialization (or per launcher that raised)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter picks other blocks)")
    rec = _Recorder(arch, first_config)
    with _compile_only(rec):
        for name, call in calls:
            rec.case = name
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a launcher that fails after compiling is a finding too
                rec.variants.append(Variant("(launcher)", name, {}, error=_innermost_message(exc)))
    return rec.variants


def compile_all(arch: int = 90, first_config: bool = False, only: str | None = None) -> list[Variant]:
    """Compile every kernel variant our launchers can produce; ``only`` filters cases by substring."""
    return compile_calls([(name, call) for name, call in _cases() if not only or only in name], arch, first_config)


def markdown(variants: list[Variant], arch: int, command: str | None = None) -> str:
    """One row per kernel: variants, worst registers / spills / shared memory, failures."""
    import torch
    import triton

    from qbench.records import produced_by

    produced = [produced_by(command or "python -m qbench.kernels.compile_check"),
                f", torch {torch.__version__}; nothing was run, only compiled"
                + (f" (a {torch.cuda.get_device_name()} was present)." if torch.cuda.is_available() else
                   ", on a machine without a GPU.")]
    by_kernel: dict[str, list[Variant]] = {}
    for v in variants:
        by_kernel.setdefault(v.kernel, []).append(v)
    lines = ["".join(produced), "",
             f"Triton {triton.__version__}, target cuda:{arch}; limits: {MAX_REGISTERS} registers/thread, "
             f"{MAX_SHARED_BYTES // 1024} KiB shared memory/block.", "",
             "Global loads are counted in each variant's PTX (static, most over the variants): narrow = 1 or 2 "
             "bytes a thread, vector = 8 or 16 bytes a thread.", "",
             "| kernel | variants | failed | max registers | spilled variants | max shared KiB "
             "| over the shared limit | narrow global loads | vector global loads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kernel, vs in sorted(by_kernel.items()):
        good = [v for v in vs if v.error is None]
        regs = max((v.registers for v in good), default=0)
        shared = max((v.shared_bytes for v in good), default=0)
        spilled = sum(1 for v in good if v.spill_bytes)
        over = sum(1 for v in good if v.shared_bytes > MAX_SHARED_BYTES)
        narrow = max((v.narrow_loads or 0 for v in good), default=0)
        vector = max((v.vector_loads or 0 for v in good), default=0)
        lines.append(f"| {kernel} | {len(vs)} | {len(vs) - len(good)} | {regs} | {spilled} | {shared / 1024:.1f} "
                     f"| {over} | {narrow} | {vector} |")
    problems = [v for v in variants if not v.ok]
    if problems:
        lines += ["", "Problems (compile errors, spills):", ""]
        for v in problems:
            what = v.error or f"{v.registers} registers, {v.spill_bytes} bytes spilled"
            lines.append(f"- `{v.kernel}` ({v.case}; {_short_meta(v.meta)}): {what}")
    unrunnable = unrunnable_cases(variants)
    if unrunnable:
        lines += ["", "Launches with no config that fits (they would fail on the device):", ""]
        lines += [f"- `{kernel}` ({case})" for case, kernel in unrunnable]
    skipped = [v for v in variants if v.ok and not v.fits]
    if skipped:
        lines += ["", "Autotune configs over the shared-memory limit (the autotuner skips them; others fit):", ""]
        lines += [f"- `{v.kernel}` ({v.case}; {_short_meta(v.meta)}): {v.shared_bytes / 1024:.0f} KiB" for v in skipped]
    return "\n".join(lines) + "\n"


def _short_meta(meta: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in meta.items() if k.isupper() or k.startswith("num_") or k.endswith("_ptr"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qbench.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = H100)")
    parser.add_argument("--first-config", action="store_true", help="only the first config of each autotuned kernel")
    parser.add_argument("--only", help="only launcher cases whose name contains this text")
    parser.add_argument("--markdown", help="also write the summary table to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    variants = compile_all(args.arch, args.first_config, args.only)
    text = markdown(variants, args.arch, "python -m qbench.kernels.compile_check " + " ".join(argv or sys.argv[1:]))
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0 if all(v.ok for v in variants) and not unrunnable_cases(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
