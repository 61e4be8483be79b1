"""Atomic file replacement: readers see the old file or the new one, never half of one.

A dashboard reads ``config.json`` while a run writes it, and a crash mid-checkpoint must
not leave a truncated file where the last good one was. Writing a temporary file in the
*same* folder (so the final rename never crosses file systems), fsyncing it, and then
``os.replace``-ing it over the target gives that guarantee on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "replace_folder"]

# O_BINARY only exists (and only matters) on Windows, where text mode would mangle bytes.
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; Windows cannot open folders and needs no such step."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The temp file is created with mode 0o666 filtered by the umask, like a plain
    ``open(path, "wb")``, so other users see the same permissions they would otherwise.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _OPEN_FLAGS, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Whatever went wrong (disk full, KeyboardInterrupt), leave no stray temp file.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Text flavour of :func:`atomic_write_bytes`; newlines are written as given on all OSes."""
    atomic_write_bytes(path, text.encode(encoding))


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target`` (an exported student).

    A rename cannot replace a non-empty folder, so an existing ``target`` (a folder, a
    file or a link) is moved aside first and deleted after: no moment leaves a
    half-written ``target``, and a link is removed, never followed.
    """
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists() or target.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
