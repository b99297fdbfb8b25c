"""Writes that leave either the old file or the new one, never a torn or empty one, and that turn a
full or read-only disk into one line for the user (QBenchError, exit 2) instead of a traceback."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from qbench.params import QBenchError

# errors of the place being written to, which the user fixes (free space, remount, permissions)
_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EFBIG: "free some space (file size limit reached)",
    errno.EROFS: "the file system is read-only; pass --out on a writable disk",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.ENOENT: "its folder does not exist",
    errno.EISDIR: "a folder of that name is in the way",
}


RERUN = " and rerun the same command (the cells already recorded are kept)"


def write_error(path: Path | str, exc: OSError, what: str = "write", then: str = RERUN) -> QBenchError:
    """One line: which file, what went wrong, what to do (``then``: after fixing it)."""
    reason = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno, "check the disk")
    return QBenchError(f"cannot {what} {path}: {reason}; {advice}{then}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes | str, then: str = RERUN) -> None:
    """Replace ``path`` with ``data`` (temp file in the same directory, fsync, rename). On failure the
    old file is untouched, the temp file is removed, and QBenchError says what to do."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise write_error(path, exc, then=then) from None


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` in one piece and fsync; if the disk fills up midway, cut the file back to where
    it was, so no torn line is left, and raise QBenchError."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass  # the reader skips a torn last line, and the next run cuts it
            raise write_error(path, exc) from None
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
