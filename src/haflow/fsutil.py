"""Writing state files so that a crash or a full disk never leaves a half-written one.

Every file haflow keeps for itself (the spec from `init`, secrets, the state record, agent
records, rendered configs) goes through `atomic_write`: a temporary file in the same directory,
flushed to disk, then renamed over the old one. A failure at any point leaves the old file
intact and says so in one line.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from haflow.errors import HaflowError, UserError


class DiskFull(UserError):
    """No space (or quota) left where haflow must write: exit 2, the old file is intact."""


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` (mode and owner set before the rename) or leave it untouched."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{path}: no space left on the device to write it; free some space and re-run "
                           "(the previous version of the file is intact)") from None
        raise HaflowError(f"{path}: could not write it ({e.strerror}); the previous version is intact") from None


def tree_checksum(folder: Path, extra: dict[str, Path] | None = None) -> str:
    """sha256 over the sorted relative paths and contents of every file (no __pycache__), as
    if the `extra` files (relative name -> file) were in the folder too. A symlink counts as
    its target's name, never what it points at (it is copied as a link)."""
    files: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow linked folders
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        linked_dirs = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [f for f in filenames if not f.endswith(".pyc")] + linked_dirs:
            path = Path(dirpath) / name
            files[path.relative_to(folder)] = path
    files.update({Path(name): p for name, p in (extra or {}).items()})
    h = hashlib.sha256()
    for rel in sorted(files):
        p = files[rel]
        body = b"link:" + os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        h.update(str(rel).encode() + b"\0" + body + b"\0")
    return h.hexdigest()
