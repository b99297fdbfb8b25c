"""Typed parameters for methods and suites, and the shared ``name:k=v,k=v,name2`` list syntax."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class QBenchError(Exception):
    """A user error: printed as one line by the CLI, never as a traceback."""


@dataclass(frozen=True)
class Param:
    """One typed parameter. ``type`` is bool, int, float or str; ``choices`` limits the values;
    ``check(value)`` returns an error message (str) or None for further validation."""

    type: type
    default: Any
    help: str = ""
    choices: Sequence[Any] | None = None
    check: Callable[[Any], str | None] | None = None

    def convert(self, owner: str, name: str, raw: Any) -> Any:
        value = raw
        if isinstance(raw, str) and self.type is not str:
            value = _parse_scalar(owner, name, raw, self.type)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is None:
            if self.default is not None:
                raise QBenchError(f"{owner}: parameter {name} needs a {self.type.__name__} value")
            return None
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise QBenchError(f"{owner}: parameter {name}={raw!r} must be {self.type.__name__}")
        if self.choices is not None and value not in self.choices:
            valid = ", ".join(str(c) for c in self.choices)
            raise QBenchError(f"{owner}: parameter {name}={raw!r} is not valid; valid values: {valid}")
        if self.check is not None and value is not None:
            problem = self.check(value)
            if problem:
                raise QBenchError(f"{owner}: parameter {name}={raw!r}: {problem}")
        return value


def _parse_scalar(owner: str, name: str, raw: str, typ: type) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null"):
        return None
    if typ is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise QBenchError(f"{owner}: parameter {name}={raw!r} must be true or false")
    try:
        return typ(text)
    except ValueError:
        raise QBenchError(f"{owner}: parameter {name}={raw!r} must be {typ.__name__}") from None


def validate_params(owner: str, declared: dict[str, Param], given: dict[str, Any]) -> dict[str, Any]:
    """Return every declared parameter with its value (defaults filled in), or raise QBenchError."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(sorted(declared)) or "(none)"
        raise QBenchError(f"{owner}: unknown parameter {unknown[0]!r}; valid parameters: {valid}")
    values = {}
    for name, param in declared.items():
        values[name] = param.convert(owner, name, given[name]) if name in given else param.default
    return values


@dataclass(frozen=True)
class Spec:
    """A name with its raw parameters, as written by the user (``nf4:blocksize=128``)."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_specs(texts: str | Sequence[str]) -> list[Spec]:
    """Parse ``fp16,nf4:blocksize=128,double_quant=false,gptq:bits=3`` into three Specs.

    Comma-separated items; an item with ``=`` is a parameter of the name before it; an item
    ``name:k=v`` starts a new name with its first parameter. Several texts (repeated options)
    are concatenated.
    """
    if isinstance(texts, str):
        texts = [texts]
    specs: list[Spec] = []
    for text in texts:
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if ":" in item:
                name, _, first = item.partition(":")
                specs.append(Spec(name.strip(), {}))
                item = first.strip()
                if not item:
                    continue
            if "=" in item:
                if not specs:
                    raise QBenchError(f"parameter {item!r} has no name before it (write name:{item})")
                key, _, value = item.partition("=")
                key = key.strip()
                if not key:
                    raise QBenchError(f"empty parameter name in {item!r}")
                if key in specs[-1].params:
                    raise QBenchError(f"{specs[-1].name}: parameter {key!r} given twice")
                specs[-1].params[key] = value.strip()
            else:
                specs.append(Spec(item, {}))
    return specs


def label(name: str, params: dict[str, Any], defaults: dict[str, Param]) -> str:
    """Short human label: the name plus the parameters that differ from their defaults."""
    changed = {k: v for k, v in params.items() if k in defaults and v != defaults[k].default}
    if not changed:
        return name
    return name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in changed.items())


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class QBenchSkip(QBenchError):
    """Raised by a method or suite that cannot run in this setting (e.g. a peer library without
    support for the device): the cell is recorded ``status=skipped`` with this message."""
