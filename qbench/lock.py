"""One run per run directory: an OS lock (``flock``) on ``RUN/run.lock``.

The kernel drops the lock when the holding process dies, however it dies (SIGKILL included), so a
lock is never stale. The file also says who holds it (pid, host, command, since when), for the
message the second run prints. Cell processes do not inherit the lock's descriptor.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from qbench.params import QBenchError

LOCK_FILE = "run.lock"


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on {holder['host']} (`{holder['command']}`, since {holder['since']})")
    except (ValueError, TypeError, KeyError):
        return "another process (it has not said which yet)"


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def hold_run_dir(run_dir: Path, command: str, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``run_dir`` for the duration of the block. If another process holds it, raise QBenchError
    saying who, or with ``wait`` call ``on_wait(holder)`` once and wait until it is free."""
    try:
        import fcntl  # noqa: F401  (POSIX only)
    except ImportError:  # no flock on this platform: run unlocked rather than not at all
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise QBenchError(f"cannot create the lock file {path}: {exc.strerror or exc}; pass --out DIR on a "
                          f"writable disk") from None
    try:
        told = False
        while not _try_lock(fd):
            holder = describe_holder(path.read_text(errors="replace"))
            if not wait:
                raise QBenchError(f"run directory {run_dir} is in use by {holder}; wait for it to finish, pass "
                                  f"--wait to start when it does, or use another --out")
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            time.sleep(poll_s)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        try:  # who holds it is only for messages: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
