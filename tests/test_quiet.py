"""Known-harmless third-party messages stay off the terminal (and stay in cell logs); the GGUF
conversion's progress bar is dropped while anything else it prints is kept."""
import importlib.util
import logging
import subprocess
import sys

import pytest

from qbench import quiet


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.delenv("QBENCH_VERBOSE", raising=False)
    assert quiet.install()
    yield
    quiet.uninstall()


def test_known_messages_are_dropped_and_others_kept(installed, caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope")
        logging.getLogger("torchao").warning("a real problem in torchao")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.", "E")
    assert [r.getMessage() for r in caplog.records] == ["a real problem in torchao"]


def test_verbose_turns_the_filter_off(monkeypatch, caplog):
    monkeypatch.setenv("QBENCH_VERBOSE", "1")
    assert not quiet.install()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C.so: nope")
    assert len(caplog.records) == 1


def test_every_entry_says_why_it_is_harmless():
    for entry in quiet.KNOWN_HARMLESS:
        assert entry.source and entry.pattern and len(entry.why) > 20


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_the_real_torchao_import_noise_is_reproduced_and_filtered():
    script = "import sys; {} import torchao.quantization"
    loud = subprocess.run([sys.executable, "-c", script.format("")], capture_output=True, text=True, timeout=300)
    quietened = subprocess.run([sys.executable, "-c", script.format("from qbench import quiet; quiet.install();")],
                               capture_output=True, text=True, timeout=300)
    assert quietened.returncode == 0, quietened.stderr
    noisy = [line for line in loud.stderr.splitlines() if "Failed to load" in line or "Enum subclass" in line]
    if not noisy:
        pytest.skip("this torchao/torch pair prints nothing at import")
    assert "Failed to load" not in quietened.stderr and "Enum subclass" not in quietened.stderr


def test_progress_bar_is_dropped_and_the_rest_kept(capsys):
    with quiet.without_progress_bars("Converting and de-quantizing GGUF tensors"):
        sys.stderr.write("Converting and de-quantizing GGUF tensors...:   0%|   | 0/272\r")
        sys.stderr.write("Converting and de-quantizing GGUF tensors...: 100%|###| 272/272\n")
        sys.stderr.write("a warning that matters\n")
    assert capsys.readouterr().err == "a warning that matters\n"
