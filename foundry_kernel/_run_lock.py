"""One owner per run: an OS file lock on ``runs/<run_id>/run.lock`` that dies with its process.

Without it two processes could train one run at once (a ``--resume`` of a run still
training elsewhere, or two resumes started together): they wrote the same checkpoints,
pruned each other's temp files and overwrote each other's final state. Now every run
start (fresh or resumed) holds the run's lock from the moment its folder exists until it
reaches a terminal state, and a second owner is refused with the first one's name.

Why an OS lock and not a "lock file exists" flag: a ``kill -9``, a power cut or an
out-of-memory kill leaves a flag behind forever, while the kernel drops an OS lock the
moment its process ends. ``fcntl.flock`` on POSIX locks the open file description, so a
second ``open`` + ``flock`` in the *same* process conflicts too; ``msvcrt.locking`` on
Windows locks per file handle, with the same effect. (``filelock`` is installed, as a
dependency of torch and huggingface_hub, but it is re-entrant within a process, and two
handles on one run in one kernel must be refused, so it does not give the semantics we
need; and it is not our declared dependency.) Inside one process a table of held locks
also gives a clearer refusal than the OS would.

What the file holds: one JSON line naming the owner (pid, host, start time), padded to
:data:`RESERVED_BYTES` when the lock is taken. The padding is the point of item 9 of the
penetration test: when the disk fills mid-run, SQLite cannot record the final state, but
rewriting bytes that are already allocated needs no free space (true of ext4, xfs, NTFS
and tmpfs; not of copy-on-write file systems such as btrfs or ZFS, where the write may
fail and the run is then marked by the stale sweep below instead). So the owner writes
its final state into the lock file (:meth:`RunLock.record_final`), and the next writable
open of the store copies it into the database.

Stale runs: a ``pending``/``running``/``cancelling`` run whose lock file names an owner
but whose lock nobody holds was left by a process that ended without recording a final
state. :func:`claim_unowned` takes such a lock (briefly, without recording itself as the
owner) so the store can mark the run failed under it; see ``RunStore.settle_stale_runs``.
A run whose folder has no lock file was never started by a process (``foundry run``
prepares runs that a notebook kernel starts later) and is left alone.

Fork: a child forked without ``exec`` shares the lock (the same open file description),
so the run stays owned while such children live; the child forgets the lock table and
never unlocks the parent's lock. File descriptors are not inherited across ``exec``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry_kernel.errors import FoundryError

__all__ = [
    "LOCK_FILENAME",
    "RESERVED_BYTES",
    "LockOwner",
    "RunConflictError",
    "RunLock",
    "RunLockedError",
    "claim_unowned",
    "read_owner",
]

LOCK_FILENAME = "run.lock"
RESERVED_BYTES = 4096
"""Size the lock file is padded to, so the final state can be written without free space."""
_FINAL_MESSAGE_CHARS = 2000
"""A final error longer than this is cut, so owner + final state fit the reserved bytes."""
PROBE_WAIT_S = 5.0
"""How long an acquirer retries while the lock is held by no live owner: that is a stale
sweep (or a peer that has not written its name yet), holding it for milliseconds."""
_RETRY_S = 0.02
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_BINARY", 0)


class RunConflictError(FoundryError):
    """The run already has an owner (this process or another): it cannot be started twice."""


class RunLockedError(RunConflictError):
    """Another process (or another handle in this one) holds the run's lock.

    ``owner`` is what the lock file says about the holder, when it says anything.
    """

    def __init__(self, message: str, *, owner: LockOwner | None) -> None:
        super().__init__(message)
        self.owner = owner


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or last held) a run's lock, as recorded in its lock file."""

    pid: int
    host: str
    started_at: float
    run_id: str
    final_state: str | None = None
    final_error: str | None = None
    released_at: float | None = None

    @property
    def label(self) -> str:
        """``pid@host``, the form every message uses."""
        return f"{self.pid}@{self.host}"

    def alive(self) -> bool | None:
        """Whether the owner process still exists; None when it ran on another host."""
        if self.host != _host():
            return None
        import psutil  # lazy: read-only consumers of the store need not load it

        return bool(psutil.pid_exists(self.pid))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": self.pid,
            "host": self.host,
            "started_at": self.started_at,
            "run_id": self.run_id,
        }
        if self.final_state is not None:
            out["final_state"] = self.final_state
            out["final_error"] = self.final_error
        if self.released_at is not None:
            out["released_at"] = self.released_at
        return out

    def holds_it(self) -> bool:
        """Whether this record may describe a live holder (not released, not known dead)."""
        return self.released_at is None and self.alive() is not False


def _host() -> str:
    return socket.gethostname() or "localhost"


def _parse_owner(raw: bytes) -> LockOwner | None:
    """The owner recorded in a lock file's bytes; None for an empty or foreign file."""
    try:
        data = json.loads(raw.decode("utf-8").strip() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, Mapping):
        return None
    try:
        return LockOwner(
            pid=int(data["pid"]),
            host=str(data["host"]),
            started_at=float(data["started_at"]),
            run_id=str(data["run_id"]),
            final_state=None if data.get("final_state") is None else str(data["final_state"]),
            final_error=None if data.get("final_error") is None else str(data["final_error"]),
            released_at=None if data.get("released_at") is None else float(data["released_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _encode(owner: LockOwner) -> bytes:
    """Owner as one JSON line padded with spaces to exactly RESERVED_BYTES."""
    line = json.dumps(owner.to_json(), ensure_ascii=True).encode("ascii")
    if len(line) + 1 > RESERVED_BYTES:  # only a huge host name could do this
        raise ValueError(f"lock record of {len(line)} bytes does not fit {RESERVED_BYTES}")
    return line + b" " * (RESERVED_BYTES - len(line) - 1) + b"\n"


def read_owner(run_dir: Path) -> LockOwner | None:
    """What the lock file of ``run_dir`` says about its (last) owner; None if nothing."""
    try:
        with (Path(run_dir) / LOCK_FILENAME).open("rb") as handle:
            return _parse_owner(handle.read(RESERVED_BYTES))
    except OSError:
        return None


# --------------------------------------------------------------------------- OS locks


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        # Windows byte-range locks are mandatory: lock one byte *past* the owner record,
        # so other processes can still read who holds the run.
        os.lseek(fd, RESERVED_BYTES, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, RESERVED_BYTES, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


_HELD: dict[str, RunLock] = {}
_HELD_GUARD = threading.Lock()


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def _forget_after_fork() -> None:
    """The child shares the parent's locks but must never release them (see module doc)."""
    global _HELD_GUARD
    _HELD_GUARD = threading.Lock()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class RunLock:
    """The held lock of one run. Create with :meth:`acquire`; :meth:`release` is idempotent."""

    def __init__(
        self, path: Path, fd: int, owner: LockOwner | None, previous: LockOwner | None
    ) -> None:
        self.path = path
        self.owner = owner
        """Who holds it (None for a silent claim, see :func:`claim_unowned`)."""
        self.previous = previous
        """The owner recorded before this acquisition (the process that ran it last)."""
        self._fd: int | None = fd
        self._pid = os.getpid()
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        who = self.owner.label if self.owner is not None else "silent claim"
        return f"<RunLock {self.path} {who} {'held' if self.held else 'released'}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(
        cls, run_dir: Path, run_id: str, *, wait_s: float = PROBE_WAIT_S, create: bool = True
    ) -> RunLock:
        """Take the lock of ``run_dir`` for this process and record it as the owner.

        Refused at once with :class:`RunLockedError` (naming ``pid@host``) while a live
        process holds it; retried for up to ``wait_s`` while its holder is not a live
        owner (a stale sweep's brief claim). ``create=False`` is for silent claims.
        """
        path = Path(run_dir) / LOCK_FILENAME
        key = _key(path)
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            with _HELD_GUARD:
                mine = _HELD.get(key)
                if mine is None:
                    _HELD[key] = _PLACEHOLDER
                    break
            if mine.owner is not None or time.monotonic() >= deadline:
                raise RunLockedError(_in_process_message(run_id, mine), owner=mine.owner)
            time.sleep(_RETRY_S)  # a silent claim (stale sweep) of this process: brief
        try:
            lock = cls._take(path, run_id, deadline=deadline, create=create)
        except BaseException:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            raise
        with _HELD_GUARD:
            _HELD[key] = lock
        return lock

    @classmethod
    def _take(cls, path: Path, run_id: str, *, deadline: float, create: bool) -> RunLock:
        flags = _OPEN_FLAGS | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o644)
        try:
            while not _try_lock(fd):
                holder = _parse_owner(_pread(fd))
                if (holder is not None and holder.holds_it()) or time.monotonic() >= deadline:
                    raise RunLockedError(_held_message(run_id, holder, path), owner=holder)
                time.sleep(_RETRY_S)
            previous = _parse_owner(_pread(fd))
            owner = None
            if create:
                owner = LockOwner(os.getpid(), _host(), time.time(), run_id)
                _overwrite(fd, _encode(owner))
        except BaseException:
            os.close(fd)  # closing drops the flock too, if we had taken it
            raise
        return cls(path, fd, owner, previous)

    def record_final(self, state: str, error: str | None) -> bool:
        """Write the final state into the reserved bytes (for when the store cannot take
        it, e.g. a full disk). True if written; never raises for an I/O error."""
        with self._guard:
            if self._fd is None or self.owner is None:
                return False
            text = None if error is None else error[:_FINAL_MESSAGE_CHARS]
            final = dataclasses.replace(self.owner, final_state=state, final_error=text)
            try:
                _overwrite(self._fd, _encode(final))
            except (OSError, ValueError):
                return False
            self.owner = final
            return True

    def release(self) -> None:
        """Mark the record released, unlock and close; a forked child only closes (the
        lock is its parent's). The mark tells a waiting acquirer that the live pid in the
        record (a kernel that outlives its run) no longer holds the run."""
        with self._guard:
            fd, self._fd = self._fd, None
            owner = self.owner
        if fd is None:
            return
        try:
            if os.getpid() == self._pid:
                if owner is not None:
                    with contextlib.suppress(OSError, ValueError):
                        _overwrite(fd, _encode(dataclasses.replace(owner, released_at=time.time())))
                with contextlib.suppress(OSError):
                    _unlock(fd)
        finally:
            os.close(fd)
            with _HELD_GUARD:
                if _HELD.get(_key(self.path)) is self:
                    del _HELD[_key(self.path)]

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class _Placeholder:
    """Marks a lock being taken by another thread of this process (between check and OS lock)."""

    owner = None


_PLACEHOLDER: Any = _Placeholder()


def _pread(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, RESERVED_BYTES)


def _overwrite(fd: int, data: bytes) -> None:
    """Rewrite the record in place (no truncation: the reserved bytes stay allocated)."""
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _in_process_message(run_id: str, mine: RunLock) -> str:
    who = mine.owner.label if mine.owner is not None else f"{os.getpid()}@{_host()}"
    return (
        f"run {run_id} is already owned by another handle in this process ({who}); "
        "cancel it and wait for it before starting it again"
    )


def _held_message(run_id: str, holder: LockOwner | None, path: Path) -> str:
    if holder is None:
        return f"run {run_id} is locked by another process ({path}); wait for it to finish"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started_at))
    return (
        f"run {run_id} is live in process {holder.label} (its owner since {since}); "
        "it cannot be resumed while that process runs it: wait for it to finish, or "
        f"stop that process first (cancel it, or kill pid {holder.pid})"
    )


@contextlib.contextmanager
def claim_unowned(run_dir: Path, run_id: str) -> Iterator[LockOwner | None]:
    """Yield the last owner of a run nobody holds, holding its lock meanwhile.

    Yields None (holding nothing) when a live process, or a handle in this process, holds
    the lock, or when the run has no lock file (it was never started by a process). The
    lock file is neither created nor rewritten: a silent claim records no owner.
    """
    try:
        lock = RunLock.acquire(run_dir, run_id, wait_s=0.0, create=False)
    except (RunLockedError, OSError):  # held, no lock file, or a folder we cannot open
        yield None
        return
    try:
        yield lock.previous
    finally:
        lock.release()
