"""Where qbench keeps what it can rebuild: one folder, ``QBENCH_CACHE_DIR`` or ``~/.cache/qbench``
(the dequantized demo model, quantized models, compiled CPU kernels, hub downloads it manages).

Imports nothing of qbench, so kernels may use it too."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("QBENCH_CACHE_DIR", Path.home() / ".cache" / "qbench"))
