"""Build a kernel module's C source once per machine and load it with ctypes.

The CPU kernels that ATen lacks (NF4's code-book GEMV, decoding ATen's int4 layout for prefill) are
plain C with AVX-512 intrinsics behind ``#ifdef __AVX512F__`` (scalar loops otherwise), compiled by
the system C compiler (``$CC``, default ``cc``) with OpenMP into
``$QBENCH_CACHE_DIR/cpu_kernels/<name>_<hash of source and flags>.so``: no Python headers, no
torch headers, a second or two the first time. The library links ``libgomp.so.1``, which resolves
to the OpenMP runtime torch already loaded, so its threads are torch's (a kernel is told
``torch.get_num_threads()``). Where the build fails (no compiler) :func:`build` returns None once
and logs why; the calling module keeps its other path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from qbench.paths import cache_dir

log = logging.getLogger("qbench.cpu_kernels")

_LIBRARIES: dict[str, ctypes.CDLL | None] = {}
_ERRORS: dict[str, str] = {}


def avx512() -> bool:
    """Compile the AVX-512 code paths (the CPU has them, as torch's dispatch says)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def _compile(name: str, source: str) -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-std=c11"]
    flags += ["-mavx512f", "-mavx512bw", "-mfma"] if avx512() else []
    digest = hashlib.sha256("\0".join([source, compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "cpu_kernels" / f"{name}_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            path = Path(tmp) / f"{name}.c"
            path.write_text(source)
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(path), "-o", str(built)], capture_output=True, text=True,
                                    timeout=300, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    return ctypes.CDLL(str(target))


def build(name: str, source: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The compiled ``source`` (``declare`` sets its functions' ctypes signatures), built on first
    use; None where it cannot be built (the reason: :func:`build_error`)."""
    if name not in _LIBRARIES:
        try:
            library = _compile(name, source)
            declare(library)
            _LIBRARIES[name] = library
        except Exception as exc:  # no compiler, no OpenMP...: the callers' other paths still work
            _LIBRARIES[name] = None
            _ERRORS[name] = f"{type(exc).__name__}: {exc}"
            log.warning("CPU kernel %s unavailable, its callers keep their other path: %s", name, _ERRORS[name])
    return _LIBRARIES[name]


def build_error(name: str) -> str | None:
    return _ERRORS.get(name)
