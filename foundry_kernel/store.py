"""The run store: one folder per run plus one SQLite database of runs, metrics and events.

Layout under the runs directory::

    runs/
      foundry.sqlite (+ -wal, -shm)   runs, metrics, events, meta(schema_version)
      20261129-091500-tiny-3f9a0c1e/
        config.json                    written atomically at creation

Why SQLite in WAL mode: a dashboard (a UI thread, or another process) reads metrics
while several runs write them, and WAL lets readers proceed without blocking the writer
or each other. Writes are short ``BEGIN IMMEDIATE`` transactions, so a writer takes the
write lock up front instead of failing half-way when upgrading a read lock.

Threading model (chosen over one shared connection behind a lock): each thread gets its
own connection (``threading.local``), so a UI thread's read never waits for a sampler
thread's Python-side work and SQLite's own locking does what it is good at. Writers in
*this* process additionally queue on one in-process lock per database file, because
SQLite's busy handler backs off by sleeping (up to 100 ms a try) while a Python lock
wakes the next writer at once; other processes still coordinate through
``busy_timeout``. All connections are tracked so :meth:`RunStore.close` can close them
from any thread, and connections of threads that have ended are closed on the fly, so a
long Jupyter kernel starting many runs does not accumulate open files.

Run ownership: every process that runs a run holds that run's OS lock
(``runs/<id>/run.lock``, see ``foundry_kernel._run_lock``) from the moment its folder
exists (:meth:`RunStore.create_locked_run`) until it reaches a terminal state. A
writable store, when it is opened and whenever it lists runs, settles the runs left
``pending``/``running``/``cancelling`` by a process that ended without recording a final
state (:meth:`RunStore.settle_stale_runs`): their lock is free, so nobody runs them. A
read-only store (the dashboard, ``foundry runs``) never writes, so it shows such a run as
it was left until the next writable open.

Metric values: ``+inf``/``-inf`` are stored as SQLite REAL infinities and read back as
such; NaN cannot be stored as REAL (SQLite turns it into NULL), so it is stored as NULL
and read back as ``float("nan")``. A divergence is therefore still visible in the curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry_kernel._run_lock import LOCK_FILENAME, LockOwner, RunLock, claim_unowned
from foundry_kernel._run_state import (
    LIVE_STATES,
    TERMINAL_STATES,
    RunState,
    check_store_transition,
)
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.errors import ConfigError, StoreError
from foundry_kernel.paths import new_run_id, validate_run_id

log = logging.getLogger("foundry.store")

__all__ = [
    "DB_FILENAME",
    "TERMINAL_STATES",
    "EventRow",
    "MetricRow",
    "RunRecord",
    "RunState",
    "RunStore",
]

RUN_STATES: frozenset[str] = frozenset(s.value for s in RunState)

DB_FILENAME = "foundry.sqlite"
CONFIG_FILENAME = "config.json"
_BUSY_TIMEOUT_S = 30.0
_MAX_ID_ATTEMPTS = 5
# How long a reader waits for a writer that is creating the database to add its tables.
_CREATION_WAIT_S = 5.0


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``; ``config`` and ``summary`` are decoded JSON objects."""

    run_id: str
    name: str
    kind: str
    state: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    config: dict[str, Any]
    summary: dict[str, Any]
    error: str | None
    batch_id: str | None
    parent_run_id: str | None
    damage: tuple[str, ...] = ()
    """What could not be read from the row, one phrase per field (empty when healthy);
    such fields hold a blank (``{}``, ``None``, ``nan``) instead."""

    @property
    def damaged(self) -> bool:
        """Whether part of the row could not be read (see ``damage``)."""
        return bool(self.damage)

    @property
    def is_terminal(self) -> bool:
        """Whether the run has stopped for good (until a resume sets it running again)."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class MetricRow:
    """One metric value; ``value`` is ``nan`` where NaN was logged (stored as NULL)."""

    name: str
    step: int
    value: float
    time: float


@dataclass(frozen=True)
class EventRow:
    """An alert or note on a run (divergence, OOM, resume, warning), in logging order."""

    event_id: int
    run_id: str
    time: float
    kind: str
    message: str
    step: int | None


# --- schema -------------------------------------------------------------------------------


def _migrate_to_v1(conn: sqlite3.Connection) -> None:
    """Create the first schema. ``WITHOUT ROWID`` keeps metrics clustered by run/name/step."""
    conn.execute(
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            config TEXT NOT NULL,
            summary TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            batch_id TEXT,
            parent_run_id TEXT REFERENCES runs(run_id)
        )"""
    )
    conn.execute("CREATE INDEX runs_by_created ON runs(created_at)")
    conn.execute("CREATE INDEX runs_by_batch ON runs(batch_id, created_at)")
    conn.execute("CREATE INDEX runs_by_parent ON runs(parent_run_id)")
    conn.execute(
        """CREATE TABLE metrics (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            name TEXT NOT NULL,
            step INTEGER NOT NULL,
            value REAL,
            time REAL NOT NULL,
            PRIMARY KEY (run_id, name, step)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        """CREATE TABLE events (
            event_id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            step INTEGER
        )"""
    )
    conn.execute("CREATE INDEX events_by_run ON events(run_id, event_id)")


# Version N is reached by applying _MIGRATIONS[N] to a version N-1 database. To add v2,
# write _migrate_to_v2, register it here and bump RunStore.SCHEMA_VERSION.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_to_v1}


def _schema_version(conn: sqlite3.Connection) -> int:
    """0 for an empty database, else the version recorded in ``meta``."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return 0
    try:
        return int(row[0])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"run store has a corrupt schema_version {row[0]!r}") from exc


# --- in-process write serialisation -------------------------------------------------------

_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()
# Connections inherited across fork() are never closed in the child: closing them there
# could disturb the parent's locks/WAL. They are parked here instead.
_ABANDONED_AFTER_FORK: list[sqlite3.Connection] = []


def _write_lock_for(db_path: Path) -> threading.Lock:
    """One lock per database file, shared by every RunStore on it in this process."""
    key = os.path.normcase(str(db_path))
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


def _forget_locks_after_fork() -> None:
    """A lock held by another thread at fork time would stay held forever in the child."""
    global _WRITE_LOCKS_GUARD
    _WRITE_LOCKS_GUARD = threading.Lock()
    _WRITE_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_after_fork)


# --- helpers ------------------------------------------------------------------------------


def _dump_json(value: Mapping[str, Any], *, what: str) -> str:
    """Encode a JSON object, refusing what a dashboard could not read back."""
    if not isinstance(value, Mapping):
        raise StoreError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), indent=2, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serialisable: {exc}") from exc


def _check_text(value: object, *, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")


def _as_step(step: Any, *, what: str = "step", minimum: int | None = 0) -> int:
    """Accept ints and int-likes (numpy ints); refuse bools, floats and (usually) negatives."""
    if isinstance(step, bool):
        raise StoreError(f"{what} must be an integer, got {step!r}")
    try:
        value = operator.index(step)
    except TypeError as exc:
        raise StoreError(f"{what} must be an integer, got {step!r}") from exc
    if minimum is not None and value < minimum:
        raise StoreError(f"{what} must be >= {minimum}, got {value}")
    return value


def _as_float(value: Any, *, what: str) -> float:
    """Turn floats, ints and 0-d tensors into float; explain anything else."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what}: {value!r} is not a number") from exc


def _metric_row(
    run_id: str, step: Any, name: Any, value: Any, when: Any
) -> tuple[str, str, int, float, float]:
    """Validate one metric up front so a bad value never half-commits a batch."""
    _check_text(name, what="metric name")
    return (
        run_id,
        name,
        _as_step(step),
        _as_float(value, what=f"metric {name!r} value"),
        _as_float(when, what=f"metric {name!r} time"),
    )


def _unpack_row(run_id: str, row: Any) -> tuple[str, str, int, float, float]:
    try:
        step, name, value, when = row
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"metric rows must be (step, name, value, time) tuples, got {row!r}"
        ) from exc
    return _metric_row(run_id, step, name, value, when)


def _metric_from_row(row: Sequence[Any]) -> MetricRow | None:
    """A metric row, or None for one that is not a point (a step or time that is not a
    number: written by something other than this store); a value that is not a number
    reads as NaN, i.e. a gap in the curve, like a logged NaN."""
    name, step, value, when = row
    if not isinstance(step, int) or isinstance(when, bool) or not isinstance(when, int | float):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        value = float("nan")
    return MetricRow(name, step, float(value), float(when))


_RUN_COLUMNS = (
    "run_id, name, kind, state, created_at, started_at, ended_at, config, summary, error, "
    "batch_id, parent_run_id"
)


_TIME_RANGE = (0.0, 32_503_680_000.0)
"""Timestamps a run row may hold: 1970 to 3000 UTC, which ``datetime`` formats on every
platform (Windows refuses negative ones, and every OS refuses years past 9999)."""


def _clip(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _decoded_text(value: Any, what: str, damage: list[str], *, optional: bool = False) -> Any:
    if isinstance(value, str) or (value is None and optional):
        return value
    damage.append(f"{what} is {_clip(value)}, not text")
    return None if optional else str(value)


def _decoded_time(value: Any, what: str, damage: list[str]) -> float | None:
    if value is None:
        return None
    low, high = _TIME_RANGE
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value < high:
        return float(value)
    damage.append(f"{what} {_clip(value)} is not a time between 1970 and 3000")
    return None


def _decoded_object(text: Any, what: str, damage: list[str]) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        damage.append(f"{what} is not valid JSON ({exc})")
        return {}
    if not isinstance(value, dict):
        damage.append(f"{what} is a JSON {type(value).__name__}, not an object")
        return {}
    return value


def _record_from_row(row: Sequence[Any]) -> RunRecord:
    """Decode one ``runs`` row; what cannot be read is blanked and named in ``damage``.

    Why not raise: one bad row (a hand edit, a disk error, a crashed or older writer)
    would otherwise take every listing down with it (``foundry runs``, the dashboard).
    Listings show such a run flagged instead; :meth:`RunStore.get_run` refuses it unless
    the caller only displays it, so nothing resumes a run from a blanked config.
    """
    damage: list[str] = []
    run_id = _decoded_text(row[0], "run_id", damage)
    try:
        validate_run_id(run_id)
    except ConfigError:
        damage.append(f"run_id {_clip(run_id)} is not a valid run id")
    state = _decoded_text(row[3], "state", damage)
    if state not in RUN_STATES and isinstance(row[3], str):
        damage.append(f"state {_clip(state)} is not one of {sorted(RUN_STATES)}")
    created_at = _decoded_time(row[4], "created_at", damage)
    if created_at is None and row[4] is None:
        damage.append("created_at is missing")
    return RunRecord(
        run_id=run_id,
        name=_decoded_text(row[1], "name", damage),
        kind=_decoded_text(row[2], "kind", damage),
        state=state,
        created_at=float("nan") if created_at is None else created_at,
        started_at=_decoded_time(row[5], "started_at", damage),
        ended_at=_decoded_time(row[6], "ended_at", damage),
        config=_decoded_object(row[7], "config", damage),
        summary=_decoded_object(row[8], "summary", damage),
        error=_decoded_text(row[9], "error", damage, optional=True),
        batch_id=_decoded_text(row[10], "batch_id", damage, optional=True),
        parent_run_id=_decoded_text(row[11], "parent_run_id", damage, optional=True),
        damage=tuple(damage),
    )


# --- the store ----------------------------------------------------------------------------


class RunStore:
    """Runs, metrics and events of one runs directory; safe to share between threads.

    ``read_only=True`` opens the database with a ``mode=ro`` URI: it never creates or
    migrates anything, and every write method raises ``StoreError("read-only ...")``.
    Call :meth:`close` (or use ``with``) only after the threads using the store are done.
    """

    SCHEMA_VERSION: int = 1

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        # absolute(), not resolve(): keep the user's symlinked path, but make the
        # database URI and per-file lock key independent of later chdir() calls.
        self.root: Path = Path(root).expanduser().absolute()
        self.read_only: bool = read_only
        self.db_path: Path = self.root / DB_FILENAME
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False
        self._pid = os.getpid()
        self._write_lock = _write_lock_for(self.db_path)
        self._open_store()

    def _open_store(self) -> None:
        if self.read_only:
            if not self.db_path.is_file():
                raise StoreError(
                    f"read-only run store: no database at {self.db_path}; nothing has "
                    "been run in this folder yet (or it is not a Foundry runs folder)"
                )
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create runs folder {self.root}: {exc}") from exc
        try:
            with self._translate("open"):
                self._prepare_schema(self._conn())
        except BaseException:
            self.close()
            raise
        if not self.read_only:
            self._settle_quietly()

    # -- context manager / lifecycle --

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        state = "closed" if self._closed else "open"
        return f"RunStore({str(self.root)!r}, {mode}, {state})"

    def close(self) -> None:
        """Close every connection this store opened, in any thread. Safe to call twice."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for _, conn in conns:
            conn.close()

    # -- connections --

    def _connect(self) -> sqlite3.Connection:
        """Open one connection; ``isolation_level=None`` so we issue BEGIN/COMMIT ourselves.

        ``check_same_thread=False`` only so that close() may close it from another
        thread; otherwise each connection is used by the thread that opened it.
        """
        if self.read_only:
            target, uri = self.db_path.as_uri() + "?mode=ro", True
        else:
            target, uri = str(self.db_path), False
        conn = sqlite3.connect(
            target,
            uri=uri,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not self.read_only:
                # In WAL mode NORMAL cannot corrupt the database; a power cut may lose
                # the last few commits, which for metrics is a fair price for speed.
                conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreError(f"run store {self.root} is closed")
        if os.getpid() != self._pid:
            self._reset_after_fork()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._connect()
        with self._lock:
            if self._closed:
                conn.close()
                raise StoreError(f"run store {self.root} is closed")
            self._close_dead_threads_locked()
            self._conns.append((threading.current_thread(), conn))
        self._local.conn = conn
        return conn

    def _close_dead_threads_locked(self) -> None:
        """Threads end (a sampler per run); their connections should not outlive them."""
        alive = []
        for thread, conn in self._conns:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                conn.close()
        self._conns = alive

    def _reset_after_fork(self) -> None:
        """SQLite connections must not cross fork(); the child opens its own."""
        self._lock = threading.Lock()
        _ABANDONED_AFTER_FORK.extend(conn for _, conn in self._conns)
        self._conns = []
        self._local = threading.local()
        self._pid = os.getpid()
        self._write_lock = _write_lock_for(self.db_path)

    # -- transactions --

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Re-raise SQLite failures as StoreError naming the database and the action."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"run store {self.db_path}: {action} failed: {exc}") from exc

    def _require_writable(self, action: str) -> None:
        if self.read_only:
            raise StoreError(
                f"read-only run store: cannot {action} (opened with read_only=True on {self.root})"
            )

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """A short ``BEGIN IMMEDIATE`` transaction, rolled back on any exception."""
        self._require_writable(action)
        conn = self._conn()
        with self._translate(action), self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-statement reads see one consistent snapshot."""
        conn = self._conn()
        with self._translate(action):
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.rollback()

    def _prepare_schema(self, conn: sqlite3.Connection) -> None:
        """Check the schema version; read-write stores also switch to WAL and migrate."""
        version = _schema_version(conn)
        if version > self.SCHEMA_VERSION:
            raise StoreError(
                f"run store {self.db_path} has schema v{version}, newer than this Foundry "
                f"understands (v{self.SCHEMA_VERSION}); upgrade Foundry to open it"
            )
        if self.read_only:
            if version == 0:
                version = self._wait_for_creation(conn)
            if version < self.SCHEMA_VERSION:
                raise StoreError(
                    f"run store {self.db_path} has schema v{version}, older than "
                    f"v{self.SCHEMA_VERSION}; open it once without read_only to migrate it"
                )
            return
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"run store {self.db_path}: cannot enable WAL mode (got {mode!r}); "
                "put the runs folder on a local disk"
            )
        if version < self.SCHEMA_VERSION:
            with self._write("migrate schema"):
                self._migrate(conn)

    def _wait_for_creation(self, conn: sqlite3.Connection) -> int:
        """The schema version once a writer that is creating the database has finished.

        A writer creates the file first and its tables a moment later, so a reader that
        opens in between sees an empty database (version 0). That is not an old store to
        migrate; it is a new one being made, so the reader waits for it (up to the busy
        wait) instead of failing, and says so if it never appears.
        """
        deadline = time.monotonic() + _CREATION_WAIT_S
        version = 0
        while version == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            version = _schema_version(conn)
        if version == 0:
            raise StoreError(
                f"run store {self.db_path} is empty: no Foundry tables appeared within "
                f"{_CREATION_WAIT_S:.0f} s (it is not a Foundry runs database, or the "
                "process creating it stopped); open it once without read_only to create it"
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply missing migrations; re-read the version under the write lock (races)."""
        version = _schema_version(conn)
        if version == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        for target in range(version + 1, self.SCHEMA_VERSION + 1):
            _MIGRATIONS[target](conn)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(target),),
            )

    @staticmethod
    def _require_run(conn: sqlite3.Connection, run_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise StoreError(f"unknown run {run_id!r}")

    # -- runs --

    def run_dir(self, run_id: str) -> Path:
        """Folder of a run (not checked for existence; the id is validated)."""
        return self.root / validate_run_id(run_id)

    def _allocate_run_dir(self, name: str | None) -> tuple[str, Path]:
        """Create a fresh run folder; ``exist_ok=False`` so two runs never share one."""
        for _ in range(_MAX_ID_ATTEMPTS):
            run_id = new_run_id(name)
            run_dir = self.root / run_id
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot create run folder {run_dir}: {exc}") from exc
            return run_id, run_dir
        raise StoreError(f"could not allocate a new run folder in {self.root}")

    def create_run(
        self,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        kind: str = "distill",
        batch_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> RunRecord:
        """Allocate an id, create the run folder with ``config.json``, insert a pending run.

        If anything fails after the folder was made, the folder is removed again so no
        half-created run is left behind. Nobody owns the run yet (``foundry run``
        prepares runs this way for a notebook kernel to start); a process that will run
        it at once uses :meth:`create_locked_run`.
        """
        record, _ = self._create(config, name, kind, batch_id, parent_run_id, lock=False)
        return record

    def create_locked_run(
        self,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        kind: str = "distill",
        batch_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> tuple[RunRecord, RunLock]:
        """:meth:`create_run`, holding the run's lock from before its row exists.

        So no moment exists where the run is in the store but owned by nobody; the caller
        releases the lock once the run is terminal (or on any failure to start it).
        """
        record, lock = self._create(config, name, kind, batch_id, parent_run_id, lock=True)
        assert lock is not None
        return record, lock

    def _create(
        self,
        config: Mapping[str, Any],
        name: str | None,
        kind: str,
        batch_id: str | None,
        parent_run_id: str | None,
        *,
        lock: bool,
    ) -> tuple[RunRecord, RunLock | None]:
        self._require_writable("create_run")
        _check_text(name, what="run name", optional=True)
        _check_text(kind, what="run kind")
        _check_text(batch_id, what="batch_id", optional=True)
        if parent_run_id is not None:
            validate_run_id(parent_run_id)
        try:
            config_text = _dump_json(config, what="config")
        except StoreError as exc:
            raise ConfigError(str(exc), field="config") from exc
        run_id, run_dir = self._allocate_run_dir(name)
        record = RunRecord(
            run_id=run_id,
            name=name if name is not None else run_id,
            kind=kind,
            state="pending",
            created_at=time.time(),
            started_at=None,
            ended_at=None,
            config=json.loads(config_text),
            summary={},
            error=None,
            batch_id=batch_id,
            parent_run_id=parent_run_id,
        )
        held: RunLock | None = None
        try:
            if lock:
                try:
                    held = RunLock.acquire(run_dir, run_id)
                except OSError as exc:
                    raise StoreError(f"cannot create the lock of run {run_id}: {exc}") from exc
            atomic_write_text(run_dir / CONFIG_FILENAME, config_text + "\n")
            self._insert_run(record, config_text)
        except BaseException:
            if held is not None:
                held.release()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return record, held

    def _insert_run(self, record: RunRecord, config_text: str) -> None:
        with self._write("create_run") as conn:
            if record.parent_run_id is not None:
                self._require_run(conn, record.parent_run_id)
            conn.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.run_id,
                    record.name,
                    record.kind,
                    record.state,
                    record.created_at,
                    None,
                    None,
                    config_text,
                    "{}",
                    None,
                    record.batch_id,
                    record.parent_run_id,
                ),
            )

    def get_run(self, run_id: str, *, damaged_ok: bool = False) -> RunRecord:
        """The run's current record; ``StoreError`` naming the id if there is none.

        A damaged record (see :attr:`RunRecord.damage`) is refused with what is wrong
        unless ``damaged_ok``: callers that act on a run (resume its config) must not get
        blanks, callers that only show it (``foundry show``, the dashboard) pass True.
        """
        validate_run_id(run_id)
        with self._read("get_run") as conn:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown run {run_id!r} in {self.db_path}")
        record = _record_from_row(row)
        if record.damaged and not damaged_ok:
            raise StoreError(
                f"run {run_id!r} in {self.db_path} has a damaged record: "
                f"{'; '.join(record.damage)}. It can be listed and shown (foundry show) but "
                "not used; restore the database from a backup or start a new run."
            )
        return record

    def list_runs(
        self, *, batch_id: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Runs, newest first, optionally only one batch's and at most ``limit``."""
        max_rows = -1 if limit is None else _as_step(limit, what="limit")
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        params: list[Any] = []
        if batch_id is not None:
            sql += " WHERE batch_id = ?"
            params.append(batch_id)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        params.append(max_rows)
        if not self.read_only:
            self._settle_quietly()
        with self._read("list_runs") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_record_from_row(row) for row in rows]

    def set_state(self, run_id: str, state: RunState | str, *, error: str | None = None) -> None:
        """Record a state change and its ``error`` (``None`` clears a previous one).

        The change must be in the state table (``_run_state.STORE_TRANSITIONS``), checked
        in the same transaction as the write: an ``InvalidTransition`` is a caller's bug.

        ``started_at`` is set the first time a run becomes ``running`` and kept across
        resumes; ``ended_at`` is set on terminal states and cleared when a run leaves
        them (a resumed run is not ended).
        """
        validate_run_id(run_id)
        if state not in RUN_STATES:
            raise StoreError(f"unknown run state {state!r}; expected one of {sorted(RUN_STATES)}")
        new = RunState(state)
        now = time.time()
        terminal = new.terminal
        with self._write("set_state") as conn:
            row = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"unknown run {run_id!r} in {self.db_path}")
            if row[0] in RUN_STATES:  # a damaged state may be overwritten with any
                check_store_transition(RunState(row[0]), new)
            cursor = conn.execute(
                """UPDATE runs SET state = ?, error = ?,
                       started_at = CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,
                       ended_at = CASE WHEN ? THEN ? ELSE NULL END
                   WHERE run_id = ?""",
                (new.value, error, new is RunState.RUNNING, now, terminal, now, run_id),
            )
            if cursor.rowcount == 0:
                raise StoreError(f"unknown run {run_id!r} in {self.db_path}")

    def delete_runs(self, run_ids: Iterable[str]) -> list[str]:
        """Delete finished runs for good: their rows, metrics and events, and their folders
        (checkpoints, logs, exported students); return the ids deleted (``foundry runs
        --prune``).

        Only terminal runs (completed, failed, cancelled, timed out) are deleted; a live one
        is refused with a ``StoreError`` naming it, before anything is deleted. A run whose
        lock a process holds (a resume starting right now) is skipped, not deleted. Each run
        is deleted under its own lock, its rows first (in one transaction) and then its
        folder, so a run never appears in the store without its folder's owner knowing.
        Runs that named a deleted run as their parent keep their rows, with no parent.
        """
        self._require_writable("delete runs")
        wanted = list(dict.fromkeys(validate_run_id(r) for r in run_ids))
        with self._read("delete runs") as conn:
            for run_id in wanted:
                row = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if row is None:
                    raise StoreError(f"unknown run {run_id!r} in {self.db_path}")
                if row[0] not in TERMINAL_STATES:
                    raise StoreError(
                        f"run {run_id} is {row[0]}: only finished runs can be deleted "
                        "(cancel it first, or wait for it to end)"
                    )
        deleted = []
        for run_id in wanted:
            run_dir = self.run_dir(run_id)
            with contextlib.ExitStack() as held:
                if (run_dir / LOCK_FILENAME).exists():
                    owner = held.enter_context(claim_unowned(run_dir, run_id))
                    if owner is None:  # a live process holds it: not ours to delete
                        log.warning("run %s is in use; not deleted", run_id)
                        continue
                if self._delete_rows(run_id):
                    shutil.rmtree(run_dir, ignore_errors=True)
                    deleted.append(run_id)
        return deleted

    def _delete_rows(self, run_id: str) -> bool:
        """One run's rows, if it is still terminal (re-checked under the write lock)."""
        with self._write("delete a run") as conn:
            row = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row[0] not in TERMINAL_STATES:
                return False
            conn.execute("UPDATE runs SET parent_run_id = NULL WHERE parent_run_id = ?", (run_id,))
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        return True

    # -- stale runs --

    def settle_stale_runs(self) -> list[str]:
        """Mark failed the live-looking runs that no process runs any more; return their ids.

        A ``pending``/``running``/``cancelling`` run is stale when its lock file names an
        owner but nobody holds the lock (a ``kill -9``, a crash, a disk that filled before
        the final state could be written). Each is settled under its own lock, so a resume
        that starts meanwhile either waits for this or is seen here as the live owner.
        """
        self._require_writable("settle stale runs")
        placeholders = ", ".join("?" * len(LIVE_STATES))
        with self._read("find live runs") as conn:
            rows = conn.execute(
                f"SELECT run_id FROM runs WHERE state IN ({placeholders})", LIVE_STATES
            ).fetchall()
        settled = []
        for (run_id,) in rows:
            try:
                run_dir = self.run_dir(run_id)
            except ConfigError:
                continue  # an id this Foundry would not create: not ours to settle
            with claim_unowned(run_dir, run_id) as previous:
                if previous is not None and self.settle_stale_run(run_id, previous):
                    settled.append(run_id)
        return settled

    def settle_stale_run(self, run_id: str, previous: LockOwner) -> bool:
        """Record the end of a run whose owner ``previous`` is gone; the caller holds the
        run's lock. Uses the final state the owner left in the lock file when it could not
        write it here; otherwise ``failed`` naming the process. False if already terminal.
        """
        with self._write("settle a stale run") as conn:
            row = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row[0] not in LIVE_STATES:
                return False
            state, error = _stale_outcome(previous)
            now = _wall_clock()
            conn.execute(
                "UPDATE runs SET state = ?, error = ?, ended_at = ? WHERE run_id = ?",
                (state, error, now, run_id),
            )
            conn.execute(
                "INSERT INTO events (run_id, time, kind, message, step) VALUES (?, ?, ?, ?, ?)",
                (run_id, now, state, error or f"run {state}", None),
            )
        log.warning("run %s: %s", run_id, error, extra={"run_id": run_id})
        return True

    def _settle_quietly(self) -> None:
        """Settling must never stop a store from opening or listing (a full disk, a busy
        database): it is retried at the next open or listing."""
        try:
            self.settle_stale_runs()
        except (StoreError, OSError) as exc:
            log.warning("run store %s: could not settle stale runs: %s", self.root, exc)

    def update_summary(self, run_id: str, summary: Mapping[str, Any]) -> None:
        """Merge ``summary`` into the run's summary (read-modify-write in one transaction)."""
        validate_run_id(run_id)
        _dump_json(summary, what="summary")  # fail before taking the write lock
        with self._write("update_summary") as conn:
            row = conn.execute("SELECT summary FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"unknown run {run_id!r} in {self.db_path}")
            merged = {**json.loads(row[0]), **summary}
            conn.execute(
                "UPDATE runs SET summary = ? WHERE run_id = ?",
                (_dump_json(merged, what="summary"), run_id),
            )

    # -- metrics --

    def log_metrics(
        self,
        run_id: str,
        step: int,
        values: Mapping[str, float],
        *,
        time: float | None = None,  # shadows the module on purpose: public keyword
    ) -> None:
        """Log ``values`` at ``step``. Idempotent: re-logging a step replaces its values."""
        validate_run_id(run_id)
        when = _wall_clock() if time is None else time
        rows = [_metric_row(run_id, step, name, value, when) for name, value in values.items()]
        self._insert_metrics(run_id, rows, "log_metrics")

    def log_metrics_many(self, run_id: str, rows: Iterable[tuple[int, str, float, float]]) -> None:
        """Log ``(step, name, value, time)`` rows in one transaction (e.g. a flush buffer)."""
        validate_run_id(run_id)
        prepared = [_unpack_row(run_id, row) for row in rows]
        self._insert_metrics(run_id, prepared, "log_metrics_many")

    def _insert_metrics(
        self, run_id: str, rows: list[tuple[str, str, int, float, float]], action: str
    ) -> None:
        with self._write(action) as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, name, step, value, time) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def truncate_metrics_after(self, run_id: str, step: int) -> int:
        """Delete metrics with ``step > step`` (resuming from a checkpoint); return count."""
        validate_run_id(run_id)
        cutoff = _as_step(step)
        with self._write("truncate_metrics_after") as conn:
            self._require_run(conn, run_id)
            cursor = conn.execute(
                "DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, cutoff)
            )
            return cursor.rowcount

    def metrics(
        self,
        run_id: str,
        names: Sequence[str] | None = None,
        *,
        since_step: int | None = None,
    ) -> list[MetricRow]:
        """Metric rows ordered by name then step.

        ``names`` limits to those metrics (a bare string counts as one name);
        ``since_step`` returns only rows with ``step > since_step``, so a dashboard can
        poll with the last step it has already drawn.
        """
        validate_run_id(run_id)
        sql = "SELECT name, step, value, time FROM metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if names is not None:
            wanted = [names] if isinstance(names, str) else list(names)
            if not wanted:
                return []
            sql += f" AND name IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        if since_step is not None:
            sql += " AND step > ?"
            params.append(_as_step(since_step, what="since_step", minimum=None))
        sql += " ORDER BY name, step"
        with self._read("metrics") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(sql, params).fetchall()
        decoded = [_metric_from_row(row) for row in rows]
        return [row for row in decoded if row is not None]

    def metric_names(self, run_id: str) -> list[str]:
        """Distinct metric names of a run, sorted."""
        validate_run_id(run_id)
        with self._read("metric_names") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,)
            ).fetchall()
        return [row[0] for row in rows]

    # -- events --

    def add_event(self, run_id: str, kind: str, message: str, *, step: int | None = None) -> None:
        """Record an alert (divergence, OOM, resume, warning) for the run's timeline."""
        validate_run_id(run_id)
        _check_text(kind, what="event kind")
        if not isinstance(message, str):
            raise StoreError(f"event message must be a string, got {type(message).__name__}")
        at_step = None if step is None else _as_step(step)
        with self._write("add_event") as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO events (run_id, time, kind, message, step) VALUES (?, ?, ?, ?, ?)",
                (run_id, _wall_clock(), kind, message, at_step),
            )

    def events(self, run_id: str) -> list[EventRow]:
        """The run's events in the order they were added."""
        validate_run_id(run_id)
        with self._read("events") as conn:
            self._require_run(conn, run_id)
            rows = conn.execute(
                "SELECT event_id, run_id, time, kind, message, step FROM events "
                "WHERE run_id = ? ORDER BY event_id",
                (run_id,),
            ).fetchall()
        return [EventRow(*row) for row in rows]


def _stale_outcome(previous: LockOwner) -> tuple[str, str | None]:
    """The state and error to record for a run whose process ``previous`` is gone."""
    final = previous.final_state
    if final in TERMINAL_STATES:
        note = (
            f"(recorded by pid {previous.label} in its run.lock: the run store could not "
            "be written then)"
        )
        error = previous.final_error
        return final, f"{error} {note}" if error else f"run {final} {note}"
    return "failed", (
        "the process that ran it ended without recording a final state "
        f"(pid {previous.label}); resume it to continue from its last checkpoint"
    )


_wall_clock = time.time  # module alias: log_metrics has a parameter named ``time``
