"""One mutating haflow command per cluster at a time: an flock on the state directory.

Two concurrent `down`s (or an `up` racing a `down`) step on each other's supervisors; the second
command now stops at once with a one-line error instead. The lock dies with its process, so a
killed command never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from haflow.errors import HaflowError

LOCK_FILE = ".lock"


class Busy(HaflowError):
    exit_code = 1


@contextmanager
def exclusive(state_dir: Path, command: str) -> Iterator[None]:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"another haflow command is running on this cluster ({holder}); wait for it to finish and retry") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"`haflow {command}`, PID {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
