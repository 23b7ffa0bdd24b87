"""Whole files or none: the files ditkit writes for a user go through here.

``atomic_path(path)`` hands the writer a temporary sibling of ``path`` (same folder, so the rename
stays on one file system; same suffix, since PIL, imageio and soundfile pick the format by it) and
renames it onto ``path`` when the block ends without an exception (``os.replace``: POSIX rename is
atomic, so a reader sees the old file or the whole new one, never half of one). On an exception the
temporary file is removed and ``path`` is left as it was. ``fsync=True`` also flushes the file and
its folder to disk before and after the rename, so the file survives a power loss (checkpoints,
run configs); without it the rename still protects against a crash of the process.

A leaf room: it imports nothing from ditkit (tests/test_layering.py lists the rooms that use it).
Not covered: staging folders renamed into place as a whole (checkpoints, latent and caption caches,
judges), which are atomic one level up.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "write_bytes", "write_text"]


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # a writable handle: Windows' fsync needs one
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` on success.

    Creates the parent folder. The temporary name is hidden (``.stem.partial-PID-RANDOM.suffix``) and
    random per call, so two writers of one path (threads, processes, hosts sharing a file system)
    never share it; the last rename wins.
    Raises whatever the block raises (after removing the temporary file) and ``OSError`` from the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` whole or not at all (``atomic_path``); returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` whole or not at all (``atomic_path``); returns ``path``."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
