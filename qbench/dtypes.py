"""One home for dtype names: what users write (``float16`` or ``fp16``) and what records, configs
and checkpoints store (``float16``)."""
from __future__ import annotations

import torch

from qbench.params import QBenchError

# The floating-point dtypes qbench computes and stores in, by the name torch gives them.
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES: dict[str, str] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_BY_SHORT = {short: name for name, short in SHORT_NAMES.items()}
# Every spelling a user may give: float16 and fp16 alike.
DTYPE_NAMES: tuple[str, ...] = (*FLOAT_DTYPES, *_BY_SHORT)


def dtype_of(name: str) -> torch.dtype:
    """``float16`` or ``fp16`` -> torch.float16 (and so on for float32 and bfloat16)."""
    key = _BY_SHORT.get(name, name)
    if key not in FLOAT_DTYPES:
        raise QBenchError(f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}")
    return FLOAT_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> ``float16``: the name records and configs store."""
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype | str) -> str:
    """torch.float16 or ``float16`` -> ``fp16``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return SHORT_NAMES.get(_BY_SHORT.get(name, name), name)
