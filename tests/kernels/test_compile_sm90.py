"""Every Triton kernel compiles for an H100 (sm_90) with the real compiler, without a GPU.

The interpreter tests check the arithmetic; this checks what only the compiler sees (types of
every return, tl.dot operand dtypes, register spills, shared memory per block). It runs
``python -m qbench.kernels.compile_check`` in a subprocess because this test session has
``TRITON_INTERPRET=1`` set before triton was imported.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia.compiler as nvidia

        return os.path.exists(nvidia.get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no CUDA backend in this triton build
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton has no CUDA backend with ptxas here")

def _launchable_kernels() -> set[str]:
    """Names of the @triton.jit kernels the launchers start (helpers are compiled inside them)."""
    from triton.runtime.jit import JITFunction

    from qbench.kernels.compile_check import kernel_modules

    names = set()
    for module in kernel_modules():
        for value in vars(module).values():
            while hasattr(value, "fn") and not isinstance(value, JITFunction):
                value = value.fn  # Autotuner / Heuristics wrappers
            if isinstance(value, JITFunction) and value.__name__.endswith("_kernel"):
                names.add(value.__name__)
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "sm90.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "qbench.kernels.compile_check", "--first-config",
                           "--markdown", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    return proc, out.read_text() if out.exists() else ""


def test_every_kernel_compiles_for_sm90_without_spills(report):
    proc, text = report
    assert proc.returncode == 0, f"compile check failed:\n{text or proc.stderr[-3000:]}"
    assert "Problems" not in text and "no config that fits" not in text


def test_every_launchable_kernel_is_covered(report):
    _, text = report
    compiled = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| _")}
    missing = _launchable_kernels() - compiled
    assert not missing, f"kernels no launcher case compiled (add them to compile_check._cases): {sorted(missing)}"


def test_refuses_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "qbench.kernels.compile_check", "--only", "nothing"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr and "Traceback" not in proc.stderr


TWO_RETURNS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _scale(ptr, DOUBLE: tl.constexpr):
    if DOUBLE:
        return tl.load(ptr).to(tl.float32) * 2.0
    return tl.load(ptr)  # not fp32 unless ptr is: the compiler rejects the pair, the interpreter never sees it


@triton.jit
def _two_returns_kernel(x_ptr, out_ptr, DOUBLE: tl.constexpr):
    tl.store(out_ptr, _scale(x_ptr, DOUBLE))


def launch(x_dtype):
    out = torch.zeros(1)
    _two_returns_kernel[(1,)](torch.ones(1, dtype=x_dtype), out, DOUBLE=True)
    return out
'''

CHECK = '''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import two_returns
from qbench.kernels.compile_check import compile_calls
variants = compile_calls([("uint8", lambda: two_returns.launch(torch.uint8)),
                          ("fp32", lambda: two_returns.launch(torch.float32))])
print(json.dumps([[v.case, v.error, v.registers] for v in variants]))
'''


def test_the_interpreter_runs_what_the_compiler_rejects(tmp_path):
    """Why this module exists: the interpreter takes the first return and never types the second."""
    (tmp_path / "two_returns.py").write_text(TWO_RETURNS)
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import two_returns; "
            "print(two_returns.launch(torch.uint8).item())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "2.0"


def test_a_kernel_the_compiler_rejects_is_reported(tmp_path):
    (tmp_path / "two_returns.py").write_text(TWO_RETURNS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (bad_case, bad_error, _), (good_case, good_error, good_registers) = __import__("json").loads(
        proc.stdout.strip().splitlines()[-1])
    assert (bad_case, good_case) == ("uint8", "fp32")
    assert bad_error is not None and "Return type mismatch" in bad_error
    assert good_error is None and good_registers > 0


def test_global_loads_are_counted_by_width():
    """The report counts 1-2 byte and 8-16 byte global loads in the PTX: weight loads a byte at a time
    are what made the affine GEMV ten times slower than the int8 one on the first H200 lease."""
    from qbench.kernels.compile_check import global_load_widths

    ptx = """
        ld.global.b8 %rs1, [%rd1];
        ld.global.nc.u16 %rs2, [%rd2];
        ld.global.b32 %r1, [%rd3];
        ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd4];
        ld.global.nc.v2.b32 {%r6, %r7}, [%rd5];
        st.global.b8 [%rd6], %rs1;
    """
    assert global_load_widths(ptx) == (2, 2)
