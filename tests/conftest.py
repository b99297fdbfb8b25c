import os

# Before anything imports triton: run @triton.jit kernels on CPU tensors. A GPU session sets
# TRITON_INTERPRET=0 (scripts/gpu_session.sh) so that the gpu-marked tests compile for the device.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Tests read the shared data in place (never copied into the repo).
os.environ.setdefault("QBENCH_DATA_DIR", str(REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_model():
    from qbench.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture
def reference_path(monkeypatch):
    """Quantized modules run their torch reference on CPU (the oracle), not the packed CPU kernels."""
    monkeypatch.setenv("QBENCH_CPU_KERNEL", "reference")
