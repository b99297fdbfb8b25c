"""Checks of a model directory's files before any cell starts: config.json must be a JSON object and
every safetensors file must have a readable header whose tensors fit in the file (a truncated
download or copy is caught here, in one line, instead of failing every cell)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from qbench.params import QBenchError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (header unreadable, tensors past the end of the file), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"has {size} bytes, too short for a safetensors header"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER, size - 8):
                return (f"has a broken header (it declares {header_len} header bytes, the file has {size}); "
                        f"truncated or not a safetensors file")
            header = json.loads(f.read(header_len).decode("utf-8"))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return "has a header that is not JSON; truncated or not a safetensors file"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object"
    data_bytes = size - 8 - header_len
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
        except (TypeError, KeyError, ValueError):
            return f"has a header entry for {name!r} without valid data_offsets and shape"
        itemsize = DTYPE_BYTES.get(entry.get("dtype"))
        if begin < 0 or end < begin or (itemsize and end - begin != math.prod(shape) * itemsize):
            return f"has a header entry for {name!r} whose size does not match its shape and dtype"
        needed = max(needed, end)
    if needed > data_bytes:
        return (f"is truncated: its tensors need {needed} bytes after the header, the file holds {data_bytes}; "
                f"copy or download it again")
    return None


def check_model_dir(path: Path, spec: str) -> None:
    """Raise QBenchError (one line, naming the file) for a model directory whose files cannot load."""
    config = path / "config.json"
    if not config.is_file():
        raise QBenchError(f"model directory {spec} has no config.json")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QBenchError(f"model directory {spec}: config.json is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise QBenchError(f"model directory {spec}: {config} is a JSON {type(parsed).__name__}, not a JSON object "
                          f"(a Hugging Face model config)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QBenchError(f"model directory {spec} has no *.safetensors weights (qbench loads safetensors only)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise QBenchError(f"model directory {spec}: {index} is not a valid safetensors index") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise QBenchError(f"model directory {spec}: {index.name} names {missing[0]}, which is missing "
                              f"({len(missing)} of {len(shards)} shards missing)")
    for weights in files:
        problem = safetensors_problem(weights)
        if problem:
            raise QBenchError(f"model weights {weights} {problem}")
