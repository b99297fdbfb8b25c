"""Shared test helpers: run the CLI in a subprocess, make a third-party plugin distribution."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

THIRD_PARTY_PLUGIN = '''
"""A method defined outside qbench, installed as a distribution with a `qbench` entry point."""
import os
import signal

import torch
import torch.nn.functional as F

import qbench
from qbench.method import Method, QuantizedLinear, replace_linears
from qbench.params import Param


class SignLinear(QuantizedLinear):
    """1-bit sign weights with one fp32 scale per row (crude, but a real method)."""

    def __init__(self, signs, scale):
        super().__init__()
        self.out_features, self.in_features = signs.shape
        self.register_buffer("signs", signs)
        self.register_buffer("scale", scale)

    def forward(self, x):
        self.kernel_path = "reference"
        w = self.signs.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w)

    def stored_tensors(self):
        return {"signs": self.signs, "scale": self.scale}

    def config(self):
        return {}

    @classmethod
    def from_stored(cls, tensors, config):
        return cls(tensors["signs"], tensors["scale"])


class SignMethod(Method):
    name = "sign"
    description = "third-party test method: sign of each weight times the row's mean |w|"
    params = {"crash": Param(str, "no", choices=["no", "raise", "segfault"])}

    def quantize(self, model, calibration=None):
        if self.values["crash"] == "raise":
            raise RuntimeError("deliberate failure inside quantize")
        if self.values["crash"] == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)

        def make(name, linear):
            w = linear.weight.data.float()
            return SignLinear(torch.sign(w).to(torch.int8), w.abs().mean(dim=1))

        return replace_linears(model, make)


@qbench.hookimpl
def register_methods(register):
    register(SignMethod)
'''


def make_third_party_dist(root: Path) -> Path:
    """A distribution as pip would install it: module + .dist-info with a `qbench` entry point."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qbench_sign_method.py").write_text(THIRD_PARTY_PLUGIN)
    info = root / "qbench_sign_method-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qbench-sign-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qbench]\nsign = qbench_sign_method\n")
    (info / "RECORD").write_text("")
    return root


def qbench_cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "qbench.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def dedent(text: str) -> str:
    return textwrap.dedent(text)
