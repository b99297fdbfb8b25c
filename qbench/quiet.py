"""Known-harmless third-party messages, kept off the terminal of ``qbench`` commands.

Each entry says who prints it, how to recognise it, and why it is harmless here. The ``qbench``
command (the driver) drops them; cell processes do not filter, so each cell's log under
``RUN/logs/`` keeps every message once (each of these is printed once per process).
``QBENCH_VERBOSE=1`` turns the filter off. Add an entry only with the reason it is harmless.
The GGUF conversion's progress bar is not a log message: :func:`without_progress_bars` hides it
where the demo model is converted (once per cache).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Harmless:
    source: str  # a logger name, or "warnings" for the warnings module
    pattern: str  # regex searched in the message
    why: str
    category: type[Warning] = Warning  # for source == "warnings"


KNOWN_HARMLESS = (
    Harmless("torchao", r"^Failed to load .*\.so",
             "torchao's wheel carries extensions built for other targets (mxfp8 for CPython 3.10, cutlass for "
             "sm90a) that do not load here; the torchao configs qbench calls do not use them"),
    Harmless("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
             "torchao registers its enums with pytree, which torch 2.13 deprecates; nothing changes for us"),
)


class _DropKnown(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(p.search(message) for p in self.patterns)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def install() -> bool:
    """Drop the known-harmless messages in this process (idempotent). False when QBENCH_VERBOSE=1."""
    if os.environ.get("QBENCH_VERBOSE") == "1":
        return False
    if _installed:
        return True
    by_logger: dict[str, list[re.Pattern]] = {}
    for entry in KNOWN_HARMLESS:
        if entry.source == "warnings":
            warnings.filterwarnings("ignore", message=f".*{entry.pattern}", category=entry.category)
        else:
            by_logger.setdefault(entry.source, []).append(re.compile(entry.pattern))
    for name, patterns in by_logger.items():
        # A filter on the logger itself: it sees the records logged there, before any handler does.
        logger = logging.getLogger(name)
        dropper = _DropKnown(patterns)
        logger.addFilter(dropper)
        _installed.append((logger, dropper))
    return True


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    while _installed:
        logger, dropper = _installed.pop()
        logger.removeFilter(dropper)
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None
                                   and any(e.pattern in f[1].pattern for e in KNOWN_HARMLESS))]


@contextlib.contextmanager
def without_progress_bars(*descriptions: str):
    """Run a block with stderr captured; afterwards pass on everything but the progress-bar updates
    whose text starts with one of ``descriptions`` (tqdm redraws them with carriage returns)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [part for part in re.split(r"[\r\n]", captured.getvalue())
                if part.strip() and not part.lstrip().startswith(descriptions)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
