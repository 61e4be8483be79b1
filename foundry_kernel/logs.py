"""Logging for Foundry: one format, a log file per run, and throttling for chatty loops.

Every Foundry logger lives under ``"foundry"`` and every line carries the run it belongs
to: ``%(asctime)s %(levelname)s %(name)s [%(run_id)s] %(message)s``. The run id comes
from an explicit ``extra={"run_id": ...}`` or, usually, from the context variable
:data:`current_run_id`, which :func:`run_log` and :func:`bind_run` set. That is how one
Jupyter kernel running several runs at once still writes each run's lines into that
run's own ``run.log`` only.

Threads and context variables: a ``threading.Thread`` starts with an *empty* context (on
Python 3.11-3.13); it does not inherit ``current_run_id`` from the thread that created it.
So either enter :func:`run_log` inside the run's worker thread, or enter it where the run
is set up and wrap the worker's body in ``with bind_run(run_id):`` (or start the thread
with ``contextvars.copy_context().run`` as its target).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TextIO

from foundry_kernel.errors import ConfigError
from foundry_kernel.paths import validate_run_id

__all__ = [
    "LOGGER_NAME",
    "LOG_FORMAT",
    "RUN_LOG_FILENAME",
    "Throttle",
    "bind_run",
    "configure_logging",
    "current_run_id",
    "get_logger",
    "run_log",
]

LOGGER_NAME = "foundry"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(run_id)s] %(message)s"
RUN_LOG_FILENAME = "run.log"
NO_RUN = "-"

current_run_id: ContextVar[str | None] = ContextVar("foundry_current_run_id", default=None)
"""The run whose work the current thread/task is doing; ``None`` outside any run."""

_CONSOLE_HANDLER_NAME = "foundry-console"


def get_logger(name: str | None = None) -> logging.Logger:
    """``foundry`` or a child such as ``foundry.store``, so configuration applies to it."""
    if not name or name == LOGGER_NAME:
        return logging.getLogger(LOGGER_NAME)
    if name.startswith(LOGGER_NAME + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def _record_run_id(record: logging.LogRecord) -> str:
    """The record's run: an explicit ``extra`` wins, else the context of the logging call.

    Handler filters run in the thread that logged, so the context variable is the
    caller's, which is exactly what we want.
    """
    explicit = getattr(record, "run_id", None)
    if explicit and explicit != NO_RUN:
        return str(explicit)
    return current_run_id.get() or NO_RUN


class RunIdFilter(logging.Filter):
    """Fills ``record.run_id`` so the shared format never fails; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = _record_run_id(record)
        return True


class _OnlyRunFilter(RunIdFilter):
    """Passes only records that belong to one run (for that run's ``run.log``)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        return getattr(record, "run_id", None) == self.run_id


def _level_number(level: str | int) -> int:
    """``"info"``/``"INFO"``/``20`` -> 20; unknown names are a configuration error."""
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ConfigError(
            f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
            field="log_level",
        )
    return number


def _formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT)


def configure_logging(level: str | int = "INFO", *, stream: TextIO | None = None) -> None:
    """Send Foundry's logs to ``stream`` (default stderr) in the shared format.

    Idempotent: a second call adjusts the level (and stream, if given) of the handler
    the first call added instead of adding another, so re-running a notebook cell does
    not print every line twice. Propagation to the root logger is left as it is.
    """
    logger = logging.getLogger(LOGGER_NAME)
    numeric = _level_number(level)
    handler = next((h for h in logger.handlers if h.get_name() == _CONSOLE_HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.set_name(_CONSOLE_HANDLER_NAME)
        handler.setFormatter(_formatter())
        handler.addFilter(RunIdFilter())
        logger.addHandler(handler)
    elif stream is not None and isinstance(handler, logging.StreamHandler):
        handler.setStream(stream)
    handler.setLevel(numeric)
    _level_lease.set_base(numeric)


@contextlib.contextmanager
def bind_run(run_id: str) -> Iterator[str]:
    """Mark the current thread's (or task's) work as belonging to ``run_id``."""
    token = current_run_id.set(validate_run_id(run_id))
    try:
        yield run_id
    finally:
        current_run_id.reset(token)


class _LevelLease:
    """Lowers the ``foundry`` logger's level while run logs need it, restoring it after.

    A run log at INFO is useless if the logger drops INFO before handlers see it. Several
    run logs may be open at once (one per running run), so the original level is saved
    by the first and restored by the last. Console output is unaffected because
    :func:`configure_logging` also sets the level on its own handler.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = logging.NOTSET

    def acquire(self, level: int) -> None:
        logger = logging.getLogger(LOGGER_NAME)
        with self._lock:
            if self._users == 0:
                self._saved = logger.level
            self._users += 1
            if logger.getEffectiveLevel() > level:
                logger.setLevel(level)

    def set_base(self, level: int) -> None:
        """Set the logger's own level; while run logs are open, only remember it."""
        logger = logging.getLogger(LOGGER_NAME)
        with self._lock:
            if self._users == 0:
                logger.setLevel(level)
            else:
                self._saved = level
                logger.setLevel(min(level, logger.level or level))

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                logging.getLogger(LOGGER_NAME).setLevel(self._saved)


_level_lease = _LevelLease()


class _QuietRunLogHandler(logging.handlers.RotatingFileHandler):
    """A ``run.log`` that cannot be written (a full disk) costs its lines, not the run.

    logging's default ``handleError`` prints a traceback per failed line to stderr, so a
    full disk buried the one line that mattered. Here the first failure prints one line
    naming the file and the error, later ones are silent, and a failing flush or close
    (at the end of the run) raises nothing.
    """

    failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(
                f"foundry: cannot write {self.baseFilename} ({error}); "
                "dropping this run's further log lines\n"
            )

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            self.handleError(None)


@contextlib.contextmanager
def run_log(
    run_dir: Path,
    run_id: str,
    *,
    max_bytes: int = 5_000_000,
    backup_count: int = 3,
    level: int | str = logging.INFO,
) -> Iterator[Path]:
    """Write this run's Foundry log lines to ``run_dir/run.log`` (rotating) while inside.

    Sets :data:`current_run_id` for the current context (see the module docstring for
    worker threads). Yields the log file's path. On exit the handler is removed *and*
    closed, so no file handle outlives the run and Windows can move or delete the folder.
    """
    validate_run_id(run_id)
    numeric = _level_number(level)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOG_FILENAME
    handler = _QuietRunLogHandler(
        path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
    )
    handler.set_name(f"foundry-run-{run_id}")
    handler.setLevel(numeric)
    handler.setFormatter(_formatter())
    handler.addFilter(_OnlyRunFilter(run_id))
    logger = logging.getLogger(LOGGER_NAME)
    _level_lease.acquire(numeric)
    logger.addHandler(handler)
    try:
        with bind_run(run_id):
            yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        _level_lease.release()


class Throttle:
    """Lets an action through at most once per ``min_interval_s``; counts what it held back.

    Progress bars and widget refreshes fire every step; a UI that redraws 1000 times a
    second freezes the notebook. ``clock`` is injectable so tests need not sleep.
    Thread-safe: one throttle may be shared by a run's threads.
    """

    def __init__(self, min_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not math.isfinite(min_interval_s) or min_interval_s < 0:
            raise ValueError(f"min_interval_s must be a finite number >= 0, got {min_interval_s}")
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._pending = 0
        self.total_suppressed = 0

    @property
    def suppressed(self) -> int:
        """How many calls were refused since the last one let through."""
        return self._pending

    def check(self) -> int | None:
        """``None`` if refused, else how many were refused since the previous success."""
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last < self.min_interval_s:
                self._pending += 1
                self.total_suppressed += 1
                return None
            self._last = now
            dropped, self._pending = self._pending, 0
            return dropped

    def ready(self) -> bool:
        """Whether the action may run now (and, if so, start a new interval)."""
        return self.check() is not None

    __call__ = ready

    def reset(self) -> None:
        """Let the next call through regardless of timing (e.g. at the end of a run)."""
        with self._lock:
            self._last = None
