"""The quantized-model cache checks what it holds: a damaged, truncated, unreadable or inconsistent
entry is discarded and rebuilt (and the record says so), never used; the manifest cannot name code."""
import json
import struct
import sys

import pytest
import torch

from qbench import host
from qbench.cache import quantize_cached
from qbench.method import quantized_modules
from qbench.models import tiny_llama
from qbench.records import read_records
from tests.helpers import qbench_cli

INFO = {"name": "tiny-llama", "source": "random (seed 0)"}
IDS = torch.arange(3, 40).reshape(1, -1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def quantize(method="nf4"):
    model, info = quantize_cached(host.make_method(method, {}), tiny_llama(), dict(INFO), torch.float32,
                                  torch.device("cpu"), None)
    with torch.no_grad():
        logits = model(IDS).logits
    return model, info, logits


@pytest.fixture
def entry(cache):
    """A fresh cache entry and the logits of the model it holds."""
    _, info, logits = quantize()
    assert not info["from_cache"]
    _, again, same = quantize()
    assert again["from_cache"] and torch.equal(same, logits)
    return info["cache_dir"], logits


def weights_file(entry_dir):
    from pathlib import Path

    return Path(entry_dir) / "quantized.safetensors"


def manifest_file(entry_dir):
    from pathlib import Path

    return Path(entry_dir) / "manifest.json"


def assert_rebuilt(logits, *reason_words):
    model, info, got = quantize()
    assert not info["from_cache"]
    reason = info.get("cache_discarded") or ""
    for word in reason_words:
        assert word in reason, reason
    assert torch.equal(got, logits)  # the rebuilt model is the fresh quantization, not the damaged one
    assert len(list(quantized_modules(model))) == 14
    _, info, got = quantize()  # and the rebuilt entry is good
    assert info["from_cache"] and torch.equal(got, logits)


def test_flipped_bytes_are_caught(entry):
    entry_dir, logits = entry
    path = weights_file(entry_dir)
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    start = 8 + header + 100
    data[start:start + 32] = bytes(b ^ 0x5A for b in data[start:start + 32])
    path.write_bytes(bytes(data))
    assert_rebuilt(logits, "checksum")


def test_manifest_missing_a_layer_is_caught(entry):
    entry_dir, logits = entry
    manifest = json.loads(manifest_file(entry_dir).read_text())
    manifest["modules"].pop(sorted(manifest["modules"])[0])
    manifest_file(entry_dir).write_text(json.dumps(manifest))
    assert_rebuilt(logits)


def test_truncated_file_is_caught(entry):
    entry_dir, logits = entry
    path = weights_file(entry_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_rebuilt(logits)


def test_unreadable_manifest_is_caught(entry):
    entry_dir, logits = entry
    manifest_file(entry_dir).write_text('{"modules": ')
    assert_rebuilt(logits, "manifest")


def test_manifest_cannot_name_code_to_import(entry, tmp_path, monkeypatch):
    """Even a manifest whose checksums were recomputed names only classes the method registered."""
    from qbench.cache import seal_manifest

    entry_dir, logits = entry
    marker = tmp_path / "imported"
    (tmp_path / "qbench_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from qbench.plugins.nf4 import NF4Linear\n"
        "class Evil(NF4Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = json.loads(manifest_file(entry_dir).read_text())
    for module in manifest["modules"].values():
        module["class"] = "qbench_evil_module:Evil"
    manifest_file(entry_dir).write_text(json.dumps(seal_manifest(manifest)))
    assert_rebuilt(logits, "qbench_evil_module:Evil")
    assert not marker.exists() and "qbench_evil_module" not in sys.modules


def test_the_record_notes_a_discarded_entry(tmp_path):
    env = {"QBENCH_CACHE_DIR": str(tmp_path / "cache")}
    first = qbench_cli("run", "--methods", "nf4", "--models", "tiny-llama", "--suites", "memory:seqlen=16",
                       "--out", str(tmp_path / "a"), env_extra=env)
    assert first.returncode == 0, first.stderr
    [weights] = list((tmp_path / "cache").rglob("quantized.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-50])
    second = qbench_cli("run", "--methods", "nf4", "--models", "tiny-llama", "--suites", "memory:seqlen=16",
                        "--out", str(tmp_path / "b"), env_extra=env)
    assert second.returncode == 0, second.stderr
    [rec] = list(read_records(tmp_path / "b" / "records.jsonl"))
    [a] = list(read_records(tmp_path / "a" / "records.jsonl"))
    assert rec["status"] == "ok" and not rec["quantization"]["from_cache"]
    assert rec["quantization"]["cache_discarded"]
    assert any("discarded" in note and "rebuilt" in note for note in rec["notes"]), rec["notes"]
    assert rec["metrics"]["bits_per_weight"] == a["metrics"]["bits_per_weight"]


@pytest.mark.parametrize("method", ["int8-absmax", "nf4", "affine"])
def test_cached_tensors_are_aligned_for_the_cpu_kernels(cache, method):
    """safetensors hands out views at 8-byte offsets into one buffer; ATen's int8 CPU kernel loads
    64-byte aligned and died with SIGSEGV on them (the latency cells of a cached int8-absmax)."""
    quantize(method)
    model, info, _ = quantize(method)
    assert info["from_cache"]
    tensors = [t for _, m in quantized_modules(model) for t in m.resident_tensors().values()]
    assert tensors and all(t.data_ptr() % 64 == 0 for t in tensors)
    with torch.no_grad():  # one row: the int8 layers take torch._weight_int8pack_mm
        model(IDS[:, :1])
