"""Run control inside the kernel: start, cancel, timeouts, a step watchdog, many runs at once.

The old Foundry ran each job as a subprocess with no timeout and shared plain dicts
between threads. Here a run is a worker thread in the *same* process (the Jupyter
kernel or the CLI), so a notebook cell returns at once and widgets keep working while
the model trains. Everything that crosses threads goes through a lock or a
``threading.Event``; nothing is ever killed from outside:

- ``cancel()``, the whole-run limit (``limits.timeout_s``) and the step watchdog
  (``limits.step_timeout_s``) all reach the job through its :class:`RunContext`; the job
  calls ``ctx.check()`` between batches and stops itself at the next safe point, so a
  checkpoint is never cut in half and the last completed step's metrics are kept.
- Every outcome becomes a state (``completed``, ``cancelled``, ``timed_out``,
  ``failed``) recorded in the run store with an event, never an exception escaping into
  the kernel. Out-of-memory and divergence get messages that say what to change.

Thread model and shutdown
-------------------------
One worker thread per run, **daemon=True**, plus an ``atexit`` hook that cancels every
live run and waits up to ``FOUNDRY_SHUTDOWN_GRACE_S`` (default 10 s) for them to stop.
Why not ``daemon=False``: Python joins non-daemon threads *before* running ``atexit``
hooks and without a timeout, so a job stuck inside one long step would hang the kernel's
shutdown forever, and nothing could even ask it to stop. With daemon threads the hook
runs first, asks every job to stop at its next ``ctx.check()`` (which comes after, not
during, a checkpoint write) and waits a bounded time. A thread still busy after that
ends with the process (CPython < 3.14 may then abort with SIGABRT if it sits in torch's
C++ code); checkpoints and the store are written atomically (temp file + ``os.replace``;
SQLite WAL), so even that leaves the previous checkpoint intact and the run resumable.

Ownership: one process, one handle
----------------------------------
A run is owned by exactly one handle in one process: the handle holds the run's OS lock
(``runs/<id>/run.lock``, :mod:`foundry_kernel._run_lock`) from the creation of a fresh
run's folder, or from a resume's start, until its worker thread has ended. A resume is
refused, before anything is touched, for a run that is completed, live in this process or
another (the error names the owner ``pid@host``), or given a config that changes what the
run is (:data:`RESUME_MAY_CHANGE`). When the store cannot take the final state (a full
disk), it is kept in the lock file and recorded by the next writable open of the store.

One shared watchdog thread serves all runs that have a limit; it exists only while
such runs are alive, so an idle kernel has no Foundry threads at all. "Progress" for the
step watchdog is any ``ctx.check()``, ``ctx.heartbeat()``, ``ctx.set_phase()``/``set_stage()``
or emitted event. Every phase has stop points at the grain of its work (see
:mod:`foundry_kernel._context`): a document, a batch of documents, a downloaded chunk, a
captured or evaluated batch, a generated token, a saved file; the tokenizer's trainer runs
in a child process that heartbeats while it uses CPU. So a slow phase that progresses is
never called hung, and one stuck inside a single unit (a read that never returns) is.

``start()`` does only what must raise at once - validating the config, opening the store,
taking the run's lock - and starts the worker; importing the pipeline (torch,
transformers: seconds to tens of seconds on a cold, busy machine) and starting the memory
sampler happen on the worker, so a notebook cell gets its handle in a fraction of a second.

Proven against a real ipykernel 7.4 kernel (tests/test_kernel_control.py): a run keeps
training after its cell returns, and cells and widget clicks are served in milliseconds.

Events
------
The job's events (``ctx.emit``) are buffered on the handle (bounded) with sequence
numbers. Consumers on the kernel's main thread use :meth:`RunHandle.poll` or
:meth:`RunHandle.events_since`; callbacks registered with :meth:`RunHandle.subscribe`
are called **on a background thread** - the worker, for the job's events (keep them
short; a callback that raises is logged and dropped, and never stops the run).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from foundry_kernel._context import Event, RunContext
from foundry_kernel._run_lock import RunConflictError, RunLock, RunLockedError
from foundry_kernel._run_state import (
    InvalidTransition,
    RunState,
    check_transition,
)
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import RunConfig, load_config, parse_override, validate_config
from foundry_kernel.errors import (
    ConfigError,
    DivergenceError,
    FoundryError,
    RunCancelled,
    RunTimeout,
    StoreError,
)
from foundry_kernel.exporters import ExportFeed, ExportSettings, check_installed, make_exporters
from foundry_kernel.logs import run_log
from foundry_kernel.metrics import event_values as _numeric_items
from foundry_kernel.paths import default_runs_dir
from foundry_kernel.progress import PROGRESS_FILE, Progress, ProgressTracker, RunPlan
from foundry_kernel.store import RunRecord, RunStore

if TYPE_CHECKING:
    import asyncio

    from foundry_kernel.run._launch import LaunchSpec
    from foundry_kernel.run._resources import MemorySampler

__all__ = [
    "HISTORY_LEN",
    "RESUME_MAY_CHANGE",
    "InvalidTransition",
    "JobFn",
    "RunConflictError",
    "RunFailure",
    "RunHandle",
    "RunLockedError",
    "RunState",
    "attach",
    "get",
    "list_runs",
    "run_sync",
    "start",
    "wait_interruptibly",
]

log = logging.getLogger("foundry.control")

HISTORY_LEN = 2000
"""Values kept per metric on a handle (the store keeps all of them)."""
EVENT_BUFFER = 10_000
"""Events kept on a handle for pollers; older ones are dropped first."""
PROGRESS_FILE_EVERY_S = 2.0
"""How often a run rewrites its progress file between phase changes."""
KEEP_FINISHED = 100
"""Finished handles kept in the registry (live ones are always kept)."""
TIMEOUT_GRACE_S = 10.0
"""After ``limits.timeout_s`` the job gets this long to reach a ``ctx.check()`` before
the run is declared ``timed_out`` without it (it is still asked to stop)."""
SAMPLE_INTERVAL_S = 0.5

T = TypeVar("T")


# --------------------------------------------------------------------------- states


@dataclass(frozen=True)
class RunFailure:
    """Why a run did not complete: a readable ``message`` plus the original exception.

    The exception's traceback is kept as text and dropped from the object itself: its
    frames hold the job's locals (models, optimizer, batches), and freeing memory after
    an out-of-memory failure is the point.
    """

    message: str
    exception: BaseException | None = None
    traceback: str = ""

    def __str__(self) -> str:
        return self.message


class JobFn(Protocol):
    """What a run executes: ``foundry_kernel.run._job.run_job`` or anything shaped like it.

    It must call ``ctx.check()`` between batches (that is where cancel and the time
    limits land) and ``ctx.heartbeat()`` per step (the watchdog's evidence of progress).
    """

    def __call__(
        self,
        config: RunConfig,
        *,
        store: RunStore,
        run_id: str,
        ctx: RunContext,
        resume: bool = False,
    ) -> Mapping[str, Any] | None: ...


EventCallback = Callable[[Event], None]


# --------------------------------------------------------------------------- the one catch-all


def _capture(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """Run ``fn`` and hand back its result or whatever it raised.

    This is the single place in Foundry's controller that catches everything, and it
    must: it runs user/job code (the job itself, event subscribers) on threads where an
    escaping exception would vanish into ``threading.excepthook`` and leave a run stuck
    in ``running`` forever. Callers turn the exception into a state and re-raise
    ``KeyboardInterrupt``/``SystemExit`` once that state is recorded.
    """
    try:
        return fn(), None
    except BaseException as exc:  # noqa: BLE001 - deliberate; see the docstring
        return None, exc


_PROPAGATE = (KeyboardInterrupt, SystemExit)
"""Never swallowed: re-raised once the run's state is recorded."""


# --------------------------------------------------------------------------- failures


_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def _loaded_torch() -> Any:
    """torch if something in this process imported it, else None.

    The controller never imports torch itself: ``start()`` runs on the caller's thread (a
    notebook's main thread) and must not pay for it; the job imports it on the worker.
    An exception that came out of torch implies torch is loaded.
    """
    return sys.modules.get("torch")


def _is_torch_oom(exc: BaseException) -> bool:
    torch = _loaded_torch()
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _is_oom(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or torch's CPU allocator failing (which
    raises a plain RuntimeError saying so)."""
    if isinstance(exc, MemoryError) or _is_torch_oom(exc):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)


def _oom_message(exc: BaseException, config: RunConfig) -> str:
    from foundry_kernel.run._resources import memory_fixes  # (worker thread; imports torch)

    where = "GPU" if _is_torch_oom(exc) else "memory"
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    detail = f" ({type(exc).__name__}: {first_line})" if first_line else ""
    fixes = memory_fixes(config)
    return f"out of {where}{detail}. {fixes[:1].upper()}{fixes[1:]}."


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's own wording for it, also when wrapped (the
    store re-raises SQLite's errors as StoreError ``from`` the original)."""
    return _disk_full_cause(exc) is not None


def _disk_full_cause(exc: BaseException) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        if isinstance(current, sqlite3.OperationalError) and "disk is full" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def _disk_full_message(exc: BaseException, config: RunConfig) -> str:
    cause = _disk_full_cause(exc) or exc
    where = getattr(cause, "filename", None) or "the run store"
    runs_dir = config.runs_dir or default_runs_dir()
    return (
        f"the disk is full (writing {where}). Free space on the disk holding {runs_dir}, or "
        "set runs_dir to a roomier folder, then resume the run: checkpoints are written "
        "atomically, so the last one saved before this is intact."
    )


def _divergence_message(exc: DivergenceError) -> str:
    message = str(exc)
    if str(exc.step) not in message or exc.component not in message:
        message += f" (step {exc.step}, component {exc.component})"
    return message


def _release_memory(oom: bool) -> None:
    """Give memory back at the end of a run.

    The job's frames are gone once it returns (and failures drop their tracebacks), so
    plain reference counting frees models on CPU. A full ``gc.collect()`` costs 0.1-0.5 s
    with torch loaded, so it runs only where it buys something: after an out-of-memory
    failure (cycles the job left may hold the memory the next run needs) and on CUDA,
    where ``empty_cache()`` can only return blocks whose tensors were really collected.
    """
    torch = _loaded_torch()
    cuda = torch is not None and torch.cuda.is_available()
    if oom or cuda:
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _strip_tracebacks(exc: BaseException) -> str:
    """Format the traceback, then drop it (and its chained ones) to free the job's frames."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return text


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """Last value per metric plus a bounded history, behind one lock (written by the
    worker and the sampler threads, read by the kernel's main thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._history: dict[str, deque[tuple[int, float]]] = {}
        self.step: int | None = None
        self.max_steps: int | None = None

    def update(
        self, step: int | None, values: Iterable[tuple[str, float]] | Mapping[str, float]
    ) -> None:
        items = values.items() if isinstance(values, Mapping) else values
        with self._lock:
            for name, value in items:
                self._last[name] = value
                series = self._history.setdefault(name, deque(maxlen=HISTORY_LEN))
                series.append((-1 if step is None else step, value))

    def note_step(self, payload: Mapping[str, Any]) -> int | None:
        with self._lock:
            step, max_steps = payload.get("step"), payload.get("max_steps")
            if isinstance(step, int):
                self.step = step
            if isinstance(max_steps, int):
                self.max_steps = max_steps
            return self.step

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._last)

    def history(self, name: str) -> list[tuple[int, float]]:
        with self._lock:
            return list(self._history.get(name, ()))


# --------------------------------------------------------------------------- watchdog


class _Watchdog:
    """One thread for all runs that have a time limit; it exits when none is left.

    It reads each run's ``ctx.last_beat`` (set by ``heartbeat()``, ``set_phase()`` and
    every emitted event) and its deadline, at a tick of a fifth of the smallest step
    limit (bounded to 20-500 ms), so a hang is noticed within ~20% of its limit.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs: set[RunHandle] = set()
        self._thread: threading.Thread | None = None

    def watch(self, handle: RunHandle) -> None:
        with self._cond:
            self._runs.add(handle)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="foundry-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def unwatch(self, handle: RunHandle) -> None:
        with self._cond:
            self._runs.discard(handle)
            self._cond.notify_all()

    def _tick(self) -> float:
        limits = [
            h.config.limits.step_timeout_s / 5
            for h in self._runs
            if h.config.limits.step_timeout_s is not None
        ]
        return min(max(min(limits, default=0.5), 0.02), 0.5)

    def _loop(self) -> None:
        try:
            while self._watch_once():
                pass
        finally:
            # Normally reached with no runs left; if a check ever raised (a bug), clearing
            # the slot lets the next watch() start a fresh watchdog instead of trusting a
            # dead one. The exception itself reaches threading.excepthook.
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _watch_once(self) -> bool:
        """One round over the watched runs; False when there is nothing left to watch."""
        with self._cond:
            if not self._runs:
                self._thread = None  # in the same locked section: watch() starts a new one
                return False
            runs = list(self._runs)
        now = time.monotonic()
        for handle in runs:  # outside the lock: a check may write to the store
            handle._watchdog_check(now)
        with self._cond:
            if self._runs:
                self._cond.wait(self._tick())
        return True


_WATCHDOG = _Watchdog()


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, RunHandle] = {}
_REGISTRY_LOCK = threading.Lock()


def _live_conflict(run_id: str) -> str | None:
    """Why ``run_id`` cannot get a new handle in this process now, or None. Caller holds
    _REGISTRY_LOCK."""
    current = _REGISTRY.get(run_id)
    if current is not None and not current.done:
        return (
            f"run {run_id} is still {current.state} in this process; "
            "cancel it and wait before resuming it"
        )
    if current is not None and current.worker_alive:
        # Declared failed by the watchdog, but its thread is still inside the hung step:
        # a second worker would write the same checkpoints and metrics concurrently.
        return (
            f"run {run_id}'s previous worker is still stuck in a step; it was asked "
            "to stop - resume once it has (handle.join())"
        )
    return None


def _refuse_if_live_here(run_id: str) -> None:
    with _REGISTRY_LOCK:
        conflict = _live_conflict(run_id)
    if conflict is not None:
        raise RunConflictError(conflict)


def _register(handle: RunHandle) -> None:
    with _REGISTRY_LOCK:
        conflict = _live_conflict(handle.id)
        if conflict is not None:
            raise RunConflictError(conflict)
        _REGISTRY.pop(handle.id, None)  # re-insert at the end (newest)
        _REGISTRY[handle.id] = handle
        finished = [k for k, h in _REGISTRY.items() if h.done]
        for key in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
            del _REGISTRY[key]


def _unregister(handle: RunHandle) -> None:
    """Forget a handle that was never launched (its start failed half-way)."""
    with _REGISTRY_LOCK:
        if _REGISTRY.get(handle.id) is handle:
            del _REGISTRY[handle.id]


def list_runs(*, live_only: bool = False) -> list[RunHandle]:
    """Handles started in this process, oldest first (finished ones: the last 100)."""
    with _REGISTRY_LOCK:
        handles = list(_REGISTRY.values())
    return [h for h in handles if not (live_only and h.done)]


def get(run_id: str) -> RunHandle | None:
    """The handle of ``run_id`` if it was started in this process (and not pruned)."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(run_id)


def _shutdown_grace() -> float:
    try:
        return max(float(os.environ.get("FOUNDRY_SHUTDOWN_GRACE_S", "10")), 0.0)
    except ValueError:
        return 10.0


def _stop_all_at_exit() -> None:
    """Interpreter exit (kernel shutdown, end of a script): ask live runs to stop and give
    them a bounded time to reach a safe point and record their state."""
    live = list_runs(live_only=True)
    if not live:
        return
    log.warning("process exiting: cancelling %d live run(s)", len(live))
    for handle in live:
        handle.cancel(reason="the process is exiting")
    grace = _shutdown_grace()
    deadline = time.monotonic() + grace
    for handle in live:
        handle.join(max(deadline - time.monotonic(), 0.0))
    stuck = [h.id for h in live if not h.join(0)]
    if stuck:
        # CPython < 3.14 ends daemon threads at exit with pthread_exit; one caught inside
        # torch's C++ code may turn that into std::terminate (SIGABRT). Checkpoints and the
        # store are written atomically, so the run is simply resumable from its last one.
        log.warning(
            "process exiting: run(s) %s did not stop within %.0f s "
            "(FOUNDRY_SHUTDOWN_GRACE_S); they end with the process and can be resumed",
            ", ".join(stuck),
            grace,
        )


atexit.register(_stop_all_at_exit)


# --------------------------------------------------------------------------- the handle


class RunHandle:
    """A run in progress or finished: its state, live metrics, events and result.

    Thread-safe. Create one with :func:`start`, not directly.
    ``await handle`` (or ``asyncio.wait_for(handle, t)``) waits without blocking the
    event loop and returns the final state; a timed-out ``wait_for`` does not cancel
    the run - call :meth:`cancel` for that.
    """

    def __init__(
        self,
        run_id: str,
        config: RunConfig,
        *,
        store: RunStore,
        owns_store: bool,
        job: JobFn | None,
        resume: bool,
        sample_interval_s: float | None,
        first_sample: int = 0,
        run_lock: RunLock | None = None,
        records_state: bool = True,
    ) -> None:
        if sample_interval_s is not None and not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0 or None, got {sample_interval_s}")
        self.id = run_id
        # False for a rank of a multi-process run (see attach()): another process owns the
        # run's lock and records its state; this handle only runs the job.
        self.records_state = records_state
        self._run_lock = run_lock  # held until the worker ends (see _release_lock)
        self.config = config
        self.runs_dir: Path = store.root
        self.resume = resume
        self._store = store
        self._owns_store = owns_store
        self._job: JobFn | None = job  # None: the pipeline, imported on the worker
        self._spent = False  # the job ran (a handle runs its job once)
        self._lock = threading.Lock()
        self._state = RunState.PENDING
        self._result: dict[str, Any] | None = None
        self._error: RunFailure | None = None
        self._metrics = _Metrics()
        self._events: deque[tuple[int, Event]] = deque(maxlen=EVENT_BUFFER)
        self._seq = 0
        self._poll_cursor = 0
        self._subscribers: dict[int, EventCallback] = {}
        self._next_token = 1
        self._done = threading.Event()
        self._done_callbacks: list[Callable[[RunHandle], None]] = []
        self._cancel_step: int | None = None
        self._thread: threading.Thread | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        timeout = config.limits.timeout_s
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.ctx = RunContext(run_id, sink=self._on_event, deadline=self._deadline)
        self._sample_interval_s = sample_interval_s
        self._first_sample = first_sample
        self._tracker = ProgressTracker(run_id, RunPlan.from_config(config))
        self._progress_written: float | None = None
        self._progress_where: tuple[str, str | None, str | None] | None = None
        self._sampler: MemorySampler | None = None  # made on the worker (it imports torch)
        self._exports: ExportFeed | None = None  # tracking.report_to (see _export_to)

    # -- read side ------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        with self._lock:
            return self._state

    @property
    def done(self) -> bool:
        """True once the state is terminal and recorded (see :meth:`wait`)."""
        return self._done.is_set()

    @property
    def result(self) -> dict[str, Any] | None:
        """The job's summary dict once it completed (None before, or if it did not)."""
        with self._lock:
            return None if self._result is None else dict(self._result)

    @property
    def error(self) -> RunFailure | None:
        """Why the run failed, timed out or was cancelled (None while running/completed)."""
        with self._lock:
            return self._error

    @property
    def metrics(self) -> dict[str, float]:
        """Last value of every metric seen in events and memory samples (a copy)."""
        return self._metrics.snapshot()

    def history(self, name: str) -> list[tuple[int, float]]:
        """Recent ``(step, value)`` pairs of one metric (memory: ``(sample, value)``)."""
        return self._metrics.history(name)

    @property
    def step(self) -> int | None:
        return self._metrics.step

    @property
    def max_steps(self) -> int | None:
        return self._metrics.max_steps

    @property
    def cancel_step(self) -> int | None:
        """The last step seen when :meth:`cancel` was called (None: not cancelled, or
        before the first step)."""
        with self._lock:
            return self._cancel_step

    @property
    def phase(self) -> str:
        return self.ctx.phase

    @property
    def progress(self) -> Progress:
        """Where the run stands now: phase, ``n/N``, elapsed, an ETA for the whole run,
        rates (see :mod:`foundry_kernel.progress`); the one snapshot every view prints."""
        return self._tracker.snapshot(time.time(), self.state.value)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def __repr__(self) -> str:
        progress = "" if self.step is None else f" step {self.step}/{self.max_steps}"
        return f"<RunHandle {self.id} {self.state}{progress}>"

    # -- waiting --------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> RunState:
        """Block until the run is over (or ``timeout``); return the state at that point.

        Normally returns after the worker has also released its resources (sampler
        stopped, store closed). The exception: a run the step watchdog declared hung is
        reported at once, since waiting for a hung thread would defeat the watchdog.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("wait() called from the run's own worker thread would deadlock")
        self._done.wait(timeout)
        return self.state

    @property
    def worker_alive(self) -> bool:
        """Whether the worker thread still runs (after a watchdog verdict it may, briefly)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread itself to end; True if it has."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return thread is None
        thread.join(timeout)
        return not thread.is_alive()

    def __await__(self) -> Generator[Any, None, RunState]:
        import asyncio  # (only awaiting pays for it, not start())

        loop = asyncio.get_running_loop()
        future: asyncio.Future[RunState] = loop.create_future()

        def resolve() -> None:
            if not future.done():
                future.set_result(self.state)

        def on_done(_: RunHandle) -> None:
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop was closed: nobody awaits any more
                pass

        self._add_done_callback(on_done)
        future.add_done_callback(lambda _f: self._remove_done_callback(on_done))
        return future.__await__()

    def _add_done_callback(self, callback: Callable[[RunHandle], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(callback)
                return
        callback(self)

    def _remove_done_callback(self, callback: Callable[[RunHandle], None]) -> None:
        with self._lock:
            if callback in self._done_callbacks:
                self._done_callbacks.remove(callback)

    # -- events ---------------------------------------------------------------------

    def subscribe(self, callback: EventCallback) -> int:
        """Call ``callback(event)`` for every later event; returns a token.

        Called on a **background thread** - the worker for the job's events; a state
        change made by :meth:`cancel` or the watchdog is delivered on the thread that
        made it. Keep it short and thread-safe; to update UI state from the kernel's main
        thread, use :meth:`poll` instead. A callback that raises is logged and
        unsubscribed; the run goes on.
        """
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._subscribers[token] = callback
        return token

    def unsubscribe(self, token: int) -> bool:
        with self._lock:
            return self._subscribers.pop(token, None) is not None

    def events_since(self, seq: int = 0) -> list[tuple[int, Event]]:
        """Buffered ``(seq, event)`` pairs with ``seq`` greater than the one given.

        Sequence numbers start at 1 and have no gaps, so a consumer that sees a jump
        knows the bounded buffer dropped events it was too slow to fetch.
        """
        with self._lock:
            return [(n, e) for n, e in self._events if n > seq]

    def poll(self) -> list[Event]:
        """Events since the previous ``poll()`` (for one main-thread consumer, e.g. a
        widget timer): no callbacks, no threads, just a cursor on the buffer."""
        with self._lock:
            new = [e for n, e in self._events if n > self._poll_cursor]
            self._poll_cursor = self._seq
        return new

    def _on_event(self, event: Event) -> None:
        """The job's event sink (worker thread): metrics, buffer, store, subscribers."""
        self.ctx.heartbeat()  # an emitting job is alive, whatever phase it is in
        if event.kind in ("step", "eval"):
            step = self._metrics.note_step(event.payload)
            self._metrics.update(step, _numeric_items(event.payload))
        if event.kind == "alert" and self.records_state:
            payload = event.payload
            message = str(payload.get("message") or payload)
            step = payload.get("step") if isinstance(payload.get("step"), int) else None
            self._store_call(
                "record an alert", self._store.add_event, self.id, "alert", message, step=step
            )
        self._publish(event)

    def _publish(self, event: Event) -> None:
        self._tracker.observe(event.kind, event.payload, event.time)
        self._write_progress(event)
        with self._lock:
            self._seq += 1
            self._events.append((self._seq, event))
            subscribers = list(self._subscribers.items())
        for token, callback in subscribers:
            _, exc = _capture(functools.partial(callback, event))
            if exc is None:
                continue
            if isinstance(exc, _PROPAGATE):
                raise exc
            self._log(
                logging.ERROR,
                "event subscriber %r raised %s: %s; unsubscribed it",
                callback,
                type(exc).__name__,
                exc,
            )
            self.unsubscribe(token)

    def _write_progress(self, event: Event) -> None:
        """Keep ``<run dir>/progress.json`` (the snapshot as plain data) for readers in
        other processes - ``foundry run`` waiting on a notebook's kernel, a dashboard -
        on every phase, stage, state and activity change (a phase's first step, a
        validation's start and end: a short phase would otherwise never show its ``n/N``)
        and at most every PROGRESS_FILE_EVERY_S."""
        if not self.records_state:
            return
        now = event.time
        change = event.kind in ("phase", "stage", "state")
        last = self._progress_written
        snapshot = self._tracker.snapshot(now, event.payload.get("state") or self.state.value)
        where = (snapshot.phase, snapshot.stage, snapshot.activity)
        change = change or where != self._progress_where
        if not change and last is not None and now - last < PROGRESS_FILE_EVERY_S:
            return
        self._progress_written, self._progress_where = now, where
        try:
            atomic_write_text(
                self._store.run_dir(self.id) / PROGRESS_FILE, json.dumps(snapshot.to_dict())
            )
        except (OSError, ValueError) as exc:  # progress is a view: never fail the run
            self._log(logging.DEBUG, "could not write the progress file: %s", exc)

    def _emit_state(self, state: RunState, failure: RunFailure | None) -> None:
        payload: dict[str, Any] = {"state": state.value}
        if failure is not None:
            payload["error"] = failure.message
        self._publish(Event(kind="state", run_id=self.id, payload=payload))

    # -- control --------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the run to stop at its next ``ctx.check()`` (within one step).

        Returns False if it had already finished. Does no I/O, so a widget callback on
        the kernel's main thread never waits on disk; the store records the outcome.
        """
        with self._lock:
            if self._state.terminal or self._state is RunState.CANCELLING:
                return False
            check_transition(self._state, RunState.CANCELLING)
            self._state = RunState.CANCELLING
            self._cancel_step = self._metrics.step
        self.ctx.cancel(reason)
        self._emit_state(RunState.CANCELLING, None)
        return True

    # -- the worker -----------------------------------------------------------------

    def _launch(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"foundry-run-{self.id}", daemon=True
        )
        if self.config.limits.timeout_s is not None or self.config.limits.step_timeout_s:
            _WATCHDOG.watch(self)
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads/memory
            self._thread = None
            self._finish(RunState.FAILED, RunFailure(f"could not start the run: {exc}", exc))
            self._cleanup()
            self._release_lock()
            self._resolve()

    def _run(self) -> None:
        """Worker thread body: run the job, turn its outcome into a state, clean up.

        The whole body runs inside the run's ``run.log`` (logs.run_log), so the job's and
        the controller's log lines for this run land in its own folder.
        """
        exc: BaseException | None = None
        try:
            with contextlib.ExitStack() as stack:
                self._open_run_log(stack)
                result, exc = _capture(self._execute)
                self._conclude(result, exc)
        finally:
            self._cleanup()
            _release_memory(exc is not None and _is_oom(exc))
            self._release_lock()  # before waking waiters: once wait() returns, resume works
            self._resolve()
        if isinstance(exc, _PROPAGATE):
            raise exc  # the state is recorded; let Python handle SystemExit/Ctrl-C as usual

    def _open_run_log(self, stack: contextlib.ExitStack) -> None:
        try:
            stack.enter_context(run_log(self._store.run_dir(self.id), self.id))
        except OSError as exc:  # an unwritable folder costs the log file, not the run
            self._log(logging.WARNING, "cannot open run.log: %s", exc)

    def _conclude(self, result: dict[str, Any] | None, exc: BaseException | None) -> None:
        """Record the outcome, unless the watchdog already declared one."""
        state, failure = self._classify(exc)
        if not self._finish(state, failure, result) and exc is not None:
            self._store_call(
                "note a late exit",
                self._store.add_event,
                self.id,
                "log",
                f"the job stopped after the run was declared {self.state}: "
                f"{type(exc).__name__}: {exc}",
            )

    def _log(self, level: int, msg: str, *args: Any) -> None:
        """Log with this run's id, also from the watchdog and sampler threads."""
        log.log(level, "run %s: " + msg, self.id, *args, extra={"run_id": self.id})

    def _execute(self) -> dict[str, Any] | None:
        """The worker's part of a run. Everything heavy happens here, not in ``start()``:
        importing the pipeline (torch, transformers: seconds on a cold machine) and
        starting the memory sampler, so the caller's thread gets its handle at once."""
        if not self._begin():
            raise RunCancelled("run cancelled before it started")
        if self._spent:
            raise RuntimeError("this run has already finished; start a new one")
        self._spent = True
        self._start_sampler()
        job = self._job if self._job is not None else _default_job()
        self.ctx.check()  # a cancel that came during the imports lands before the job
        self.ctx.heartbeat()  # queueing and import time are not a hung step
        result = job(
            self.config, store=self._store, run_id=self.id, ctx=self.ctx, resume=self.resume
        )
        if result is None:
            return {}
        return dict(result) if isinstance(result, Mapping) else {"result": result}

    def _start_sampler(self) -> None:
        if self._sample_interval_s is None:
            return
        from foundry_kernel.run._resources import MemorySampler  # (imports torch)

        sampler = MemorySampler(
            self._on_sample, self._sample_interval_s, name=self.id, start_index=self._first_sample
        )
        self._sampler = sampler
        if not self.state.terminal:  # the watchdog may have concluded during the import
            with contextlib.suppress(RuntimeError):  # ... or just now: it stopped the sampler
                sampler.start()

    def _begin(self) -> bool:
        """pending -> running (False if a cancel came first)."""
        with self._lock:
            if self._state is not RunState.PENDING:
                return False
            self._state = RunState.RUNNING
            self.started_at = time.time()
        if self.records_state:
            self._store_call("record running", self._store.set_state, self.id, "running")
        self._emit_state(RunState.RUNNING, None)
        return True

    def _classify(self, exc: BaseException | None) -> tuple[RunState, RunFailure | None]:
        """Map the job's outcome to a final state and a message a person can act on."""
        if exc is None:
            return RunState.COMPLETED, None
        tb = _strip_tracebacks(exc)
        if isinstance(exc, RunTimeout) or (
            isinstance(exc, RunCancelled) and self.ctx.reason == "timed_out"
        ):
            return RunState.TIMED_OUT, RunFailure(
                f"{self._timeout_text()} at step {self.step}; raise the limit or lower "
                "limits.max_steps",
                exc,
                tb,
            )
        if isinstance(exc, RunCancelled):
            return RunState.CANCELLED, RunFailure(self._cancel_message(), exc, tb)
        if _is_oom(exc):
            return RunState.FAILED, RunFailure(_oom_message(exc, self.config), exc, tb)
        if isinstance(exc, DivergenceError):
            return RunState.FAILED, RunFailure(_divergence_message(exc), exc, tb)
        if _is_disk_full(exc):
            return RunState.FAILED, RunFailure(_disk_full_message(exc, self.config), exc, tb)
        if isinstance(exc, FoundryError):
            return RunState.FAILED, RunFailure(str(exc), exc, tb)
        self._log(logging.ERROR, "failed with an unexpected error:\n%s", tb)
        return RunState.FAILED, RunFailure(f"{type(exc).__name__}: {exc}", exc, tb)

    def _timeout_text(self) -> str:
        limit = self.config.limits.timeout_s
        setting = f"limits.timeout_s={limit:g} s" if limit is not None else "limits.timeout_s"
        return f"the run hit its wall-clock limit ({setting})"

    def _cancel_message(self) -> str:
        reason = self.ctx.reason or "cancelled"
        asked, stopped = self._cancel_step, self.step
        where = f"in phase {self.ctx.where!r}"
        if stopped is None:
            return f"cancelled {where}, before the first step ({reason})"
        if asked is None:  # the job (or its own context) asked, not handle.cancel()
            return f"cancelled {where} ({reason}), stopped after step {stopped}"
        return f"cancelled {where} ({reason}): asked at step {asked}, stopped after step {stopped}"

    def _finish(
        self, state: RunState, failure: RunFailure | None, result: dict[str, Any] | None = None
    ) -> bool:
        """Enter a terminal state once and record it; False if one was already reached."""
        with self._lock:
            if self._state.terminal:
                return False
            check_transition(self._state, state)
            self._state, self._error, self._result = state, failure, result
            self.ended_at = time.time()
        _WATCHDOG.unwatch(self)
        if self._sampler is not None:
            self._sampler.stop()
        message = failure.message if failure is not None else "run completed"
        if not self.records_state:
            self._log(logging.INFO, "%s: %s", state, message)
            self._emit_state(state, failure)
            return True
        recorded = self._store_call(
            "record the final state",
            self._store.set_state,
            self.id,
            state.value,
            error=None if failure is None else failure.message,
        )
        if not recorded and self._run_lock is not None:
            # A full disk: keep the outcome in the lock file's reserved bytes, from where
            # the next writable open of the store records it (RunStore.settle_stale_runs).
            if self._run_lock.record_final(state.value, failure.message if failure else None):
                self._log(logging.WARNING, "final state kept in %s", self._run_lock.path)
        self._store_call(
            "record the final event",
            self._store.add_event,
            self.id,
            state.value,
            message,
            step=self.step,
        )
        self._log(logging.INFO, "%s: %s", state, message)
        self._emit_state(state, failure)
        return True

    def _release_lock(self) -> None:
        """Give up the run's ownership: only when the worker has ended (a run the watchdog
        declared hung keeps it while its thread is still inside the step)."""
        if self._run_lock is not None:
            self._run_lock.release()

    def _cleanup(self) -> None:
        """Release what the run holds; runs on the worker thread after the job returned."""
        if self._sampler is not None:
            self._sampler.stop()
        _WATCHDOG.unwatch(self)
        self._job = None  # keep no closure (and the models it may capture) alive
        if self._exports is not None and not self._exports.close():
            self._log(logging.WARNING, "exporters still busy after the run; not waiting longer")
        if self._owns_store:
            self._store.close()

    def _resolve(self) -> None:
        """Wake waiters and awaiters (idempotent)."""
        with self._lock:
            if self._done.is_set():
                return
            self._done.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback(self)

    # -- watchdog side ----------------------------------------------------------------

    def _watchdog_check(self, now: float) -> None:
        """Called by the watchdog thread: enforce the step and whole-run limits."""
        if self.state.terminal:
            return
        limits = self.config.limits
        idle = now - self.ctx.last_beat
        if limits.step_timeout_s is not None and idle > limits.step_timeout_s:
            self._declare_hung(idle, limits.step_timeout_s)
        elif self._deadline is not None and now > self._deadline:
            self.ctx.cancel("timed_out")  # lands at the job's next check()
            if now > self._deadline + TIMEOUT_GRACE_S:
                self._finish(
                    RunState.TIMED_OUT,
                    RunFailure(
                        f"{self._timeout_text()} and did not stop within {TIMEOUT_GRACE_S:g} s",
                        RunTimeout("limits.timeout_s reached"),
                    ),
                )
                self._resolve()

    def _declare_hung(self, idle: float, limit: float) -> None:
        message = (
            f"step watchdog: no progress for {idle:.1f} s in phase {self.ctx.where!r} "
            f"after step {self.step} (limits.step_timeout_s={limit:g} s); the step hung, "
            "so the run was failed and asked to stop"
        )
        self.ctx.cancel("step_timeout")
        if self._finish(RunState.FAILED, RunFailure(message, RunTimeout(message))):
            self._resolve()

    # -- memory sampler side ------------------------------------------------------------

    def _on_sample(self, index: int, when: float, sample: dict[str, float | None]) -> None:
        values = {k: v for k, v in sample.items() if v is not None}
        self._metrics.update(index, values)
        self._store_call(
            "record a memory sample", self._store.log_metrics, self.id, index, values, time=when
        )

    # -- store -----------------------------------------------------------------------

    def _store_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Store writes from the controller never end a run: a full disk or a closed
        store is logged, the run's in-memory state stays authoritative. True if written."""
        try:
            fn(*args, **kwargs)
        except StoreError as exc:
            self._log(logging.WARNING, "could not %s: %s", what, exc)
            return False
        return True

    # -- exporters (tracking.report_to) ---------------------------------------------------

    def _export_to(self) -> None:
        """Feed ``tracking.report_to``'s trackers from this handle's events, on a thread of
        their own (foundry_kernel.exporters). Only the handle that records the run exports:
        in a multi-process run that is the launcher, which sees rank 0's events."""
        names = self.config.tracking.report_to
        if not names or not self.records_state:
            return
        settings = ExportSettings.for_run(self.config, self.runs_dir, self.id)
        feed = ExportFeed(
            make_exporters(settings, names),
            self.config,
            self.id,
            warn=self._export_warning,
            summary=self._export_summary,
        )
        self._exports = feed
        self.subscribe(feed)

    def _export_warning(self, message: str) -> None:
        """A tracker failed: a warning alert on the run (store, events), never a failure.
        Published without a heartbeat: an exporter's trouble is not the job's progress."""
        self._log(logging.WARNING, "%s", message)
        self._store_call("record an alert", self._store.add_event, self.id, "alert", message)
        alert = {"level": "warning", "message": message}
        self._publish(Event(kind="alert", run_id=self.id, payload=alert))

    def _export_summary(self) -> Mapping[str, Any] | None:
        """The summary the trackers get at the end: the job's result, or what the store
        holds of it when the run did not complete."""
        result = self.result
        if result is not None:
            return result
        try:
            return self._store.get_run(self.id).summary
        except StoreError:
            return None


# --------------------------------------------------------------------------- starting


def _default_job() -> JobFn:
    """pipeline.run_job, imported on the run's worker thread: it imports torch and
    transformers (seconds on a cold machine), which neither ``import foundry_kernel`` nor
    ``start()`` may pay for on the caller's thread."""
    from foundry_kernel.run._job import run_job

    return run_job


def _as_config(config: RunConfig | Mapping[str, Any] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return load_config(config)


def _runs_dir_for(config: RunConfig | None, overrides: list[str] | dict[str, Any]) -> Path | None:
    """Where the run lives: the config's runs_dir, else a ``runs_dir`` override (a resume
    without a config), else None for the default folder."""
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    named = [value for key, value in pairs if key == "runs_dir"]
    if named and named[-1] not in (None, ""):
        return Path(str(named[-1]))
    return config.runs_dir if config is not None else None


def _open_store(runs_dir: Path | None, store: RunStore | None) -> tuple[RunStore, bool]:
    if store is not None:
        return store, False
    return RunStore(runs_dir or default_runs_dir()), True


RESUME_MAY_CHANGE: tuple[str, ...] = (
    "name",
    "device",
    "threads",
    "runs_dir",
    "limits.",
    "checkpoint.",
    "eval.",
    "tracking.",
    "optim.gradient_checkpointing",
    "teacher.server.port",
    "teacher.server.start_timeout_s",
    "teacher.server.request_timeout_s",
    "teacher.server.retries",
    "teacher.server.backoff_s",
    "teacher.server.kv_cache_gib",
)
"""Config fields a resume may change (a trailing dot: the whole section).

A resume continues the *same* run from its checkpoint, so what the run **is** must stay as
it was created: the seed, the teacher (source, backend, url, dtype, build recipe), the
student's shape and init, the data and its split, the loss, the distillation mode and the
optimiser (lr, batch size, precision, ...). Changing any of those would load a checkpoint
into another model (a shape error deep in torch) or silently mix two experiments in one
curve. What may change is how long and how closely it is run and watched: ``limits.*``
(train longer with ``limits.max_steps``, other time limits), ``checkpoint.*``,
``eval.*`` (evaluation and reporting), ``tracking.*`` (the exporters), where and how
fast it runs (``device``, ``threads``, ``runs_dir`` when the folder moved,
``optim.gradient_checkpointing``, a memory-for-compute trade), the operational settings
of a Foundry-started teacher server, and the ``name`` label (the store keeps the name
the run was created with). Anything else is refused before anything is touched, naming
each field with its stored and given value.
"""


def _may_change(field: str) -> bool:
    return any(
        field == allowed or (allowed.endswith(".") and field.startswith(allowed))
        for allowed in RESUME_MAY_CHANGE
    )


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted field -> value for every non-section value (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


_ABSENT = object()


def resume_differences(stored: RunConfig, given: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(field, stored, given)`` for each field a resume may not change but ``given`` does."""
    old, new = _leaves(stored.to_dict()), _leaves(given.to_dict())
    return [
        (field, old.get(field, _ABSENT), new.get(field, _ABSENT))
        for field in sorted(old.keys() | new.keys())
        if old.get(field, _ABSENT) != new.get(field, _ABSENT) and not _may_change(field)
    ]


def _changed_fields(stored: RunConfig, given: RunConfig) -> list[str]:
    """The allowed changes a resume makes, as ``field old -> new`` (for its event)."""
    old, new = _leaves(stored.to_dict()), _leaves(given.to_dict())
    return [
        f"{field} {old.get(field)!r} -> {new.get(field)!r}"
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    ]


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _check_resume_config(run_id: str, stored: RunConfig, given: RunConfig) -> None:
    """Refuse a resume config that changes what the run is (see RESUME_MAY_CHANGE)."""
    differences = resume_differences(stored, given)
    if not differences:
        return
    lines = [f"{field}: stored {_show(a)}, given {_show(b)}" for field, a, b in differences]
    raise ConfigError(
        f"cannot resume run {run_id} with this config: {len(lines)} field(s) differ from the "
        "run's stored config and may not change on resume:\n  "
        + "\n  ".join(lines)
        + "\nOnly limits.*, checkpoint.*, eval.*, tracking.*, device, threads, runs_dir, name, "
        "optim.gradient_checkpointing and the teacher server's operational settings may "
        "change on resume; start a new run to change the others. Nothing was modified.",
        field=differences[0][0],
    )


def _refuse_completed(record: RunRecord) -> None:
    if record.state == "completed":
        raise RunConflictError(
            f"run {record.run_id} is completed: there is nothing to resume, and it stays as "
            "it is. Start a new run (without --resume / resume=) to train again or longer."
        )


def _config_with(base: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    return load_config(base, overrides) if overrides else base


def _new_handle(
    store: RunStore,
    config: RunConfig | None,
    overrides: list[str] | dict[str, Any],
    resume: str | None,
    job: JobFn | None,
    owns_store: bool,
    sample_interval_s: float | None,
) -> tuple[RunHandle, str]:
    """A new run in the store, or the resumed one; plus what its resume event should say.

    The handle holds the run's lock (foundry_kernel._run_lock); a new run is locked from
    before its row exists.
    """
    if resume is not None:
        return _resume_handle(store, config, overrides, resume, job, owns_store, sample_interval_s)
    assert config is not None  # start() always resolves a config for a new run
    config = _config_with(config, overrides)
    record, lock = store.create_locked_run(config.to_dict(), name=config.name, kind="distill")
    handle = RunHandle(
        record.run_id,
        config,
        store=store,
        owns_store=owns_store,
        job=job,
        resume=False,
        sample_interval_s=sample_interval_s,
        run_lock=lock,
    )
    return handle, ""


def _resume_handle(
    store: RunStore,
    given: RunConfig | None,
    overrides: list[str] | dict[str, Any],
    run_id: str,
    job: JobFn | None,
    owns_store: bool,
    sample_interval_s: float | None,
) -> tuple[RunHandle, str]:
    """Checks in this order, so every refusal leaves the store and the run folder as they
    were: live in this process; completed; a config that changes what the run is; live
    in another process (its lock); then, under the lock, completed again (it may have
    finished meanwhile). A run left live-looking by a dead process is settled first."""
    _refuse_if_live_here(run_id)
    record = store.get_run(run_id)
    _refuse_completed(record)
    stored = validate_config(record.config)
    config = _config_with(given if given is not None else stored, overrides)
    _check_resume_config(run_id, stored, config)
    try:
        lock = RunLock.acquire(store.run_dir(run_id), run_id)
    except OSError as exc:
        raise StoreError(f"cannot take the lock of run {run_id}: {exc}") from exc
    try:
        record = store.get_run(run_id)
        _refuse_completed(record)
        if lock.previous is not None:
            store.settle_stale_run(run_id, lock.previous)  # no-op unless left live-looking
        handle = RunHandle(
            run_id,
            config,
            store=store,
            owns_store=owns_store,
            job=job,
            resume=True,
            sample_interval_s=sample_interval_s,
            first_sample=_next_sample_index(store, run_id),
            run_lock=lock,
        )
    except BaseException:
        lock.release()
        raise
    changes = _changed_fields(stored, config)
    how = "its saved config" + (f", changing {'; '.join(changes)}" if changes else "")
    assert lock.owner is not None
    return handle, f"resumed in process {lock.owner.label} with {how}"


def _next_sample_index(store: RunStore, run_id: str) -> int:
    """Memory samples are numbered per run; a resumed run continues the numbering so it
    never overwrites the samples of the attempt that crashed."""
    rows = store.metrics(run_id, ["mem/rss_mb"])
    return rows[-1].step + 1 if rows else 0


def start(
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    resume: str | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    store: RunStore | None = None,
    job: JobFn | None = None,
    on_event: EventCallback | None = None,
    sample_interval_s: float | None = SAMPLE_INTERVAL_S,
    nproc_per_node: int | None = None,
    launch: LaunchSpec | None = None,
) -> RunHandle:
    """Start a run in a background thread and return its handle at once.

    ``nproc_per_node=N`` (or a full ``launch`` spec: nodes, rendezvous) runs it on N
    processes launched by torchrun, children of this process: the handle is the same, its
    job supervises the process tree (``run._launch.DistributedJob``). This process keeps
    the run's lock and records its state; rank 0 writes the metrics, summary, checkpoints
    and memory samples, and its events stream back onto the handle through the run
    folder. ``cancel()`` asks every rank to stop at its next step boundary (checkpointing
    first) and kills the whole tree if it has not exited ``STOP_GRACE_S`` later;
    ``limits.timeout_s`` and the step watchdog apply to the group the same way.

    ``resume=RUN_ID`` reopens that run in the store and calls the job with
    ``resume=True``. Its config is the saved one, or ``config`` if given, with
    ``overrides`` (``"limits.max_steps=500"`` strings or a dotted mapping) applied on top;
    a resume may change only the fields in :data:`RESUME_MAY_CHANGE`. A resume is refused
    (before anything is touched) for a completed run, for a run live in this or another
    process (the error names the owner ``pid@host``) and for a config that changes what
    the run is. Without ``store``, one is opened on ``config.runs_dir`` (or the default
    runs folder) and closed when the run ends. ``on_event`` is subscribed before the run
    starts, so it sees every event (on the worker thread). Config, store and ownership
    errors raise here, before any thread exists.
    """
    overrides = dict(overrides) if isinstance(overrides, Mapping) else list(overrides)
    if nproc_per_node is not None or launch is not None:
        if job is not None:
            raise ValueError("a multi-process run runs Foundry's pipeline: pass no job=")
        if launch is None:
            from foundry_kernel.run._launch import LaunchSpec  # (stdlib and psutil only)

            launch = LaunchSpec(nproc_per_node=int(nproc_per_node or 1))
        elif nproc_per_node is not None and nproc_per_node != launch.nproc_per_node:
            raise ValueError("nproc_per_node and launch.nproc_per_node differ")
        job = _distributed_job(launch)
        sample_interval_s = None  # rank 0 samples its own memory, not this process
    given = None if config is None and resume is not None else _as_config(config)
    if given is not None:  # a missing tracker is refused before the store is touched
        check_installed(_config_with(given, overrides).tracking.report_to)
    run_store, owns = _open_store(_runs_dir_for(given, overrides), store)
    handle: RunHandle | None = None
    launched = False
    try:
        handle, note = _new_handle(
            run_store, given, overrides, resume, job, owns, sample_interval_s
        )
        check_installed(handle.config.tracking.report_to)  # a resume's stored config
        _register(handle)
        if resume is not None:
            run_store.add_event(resume, "resume", note)
        if on_event is not None:
            handle.subscribe(on_event)
        handle._export_to()
        handle._launch()
        launched = True
    finally:
        if not launched:  # nothing will run: give the run and the store back
            if handle is not None:
                _unregister(handle)
                handle._release_lock()
            if owns:
                run_store.close()
    assert handle is not None
    return handle


def _distributed_job(spec: LaunchSpec) -> JobFn:
    from foundry_kernel.run._launch import DistributedJob

    return DistributedJob(spec)


def attach(
    run_id: str,
    config: RunConfig,
    *,
    store: RunStore,
    job: JobFn,
    resume: bool = False,
    sample_interval_s: float | None = None,
    on_event: EventCallback | None = None,
) -> RunHandle:
    """Run ``job`` on an existing run that another process owns: a rank of a multi-process
    run. The handle neither takes the run's lock nor records its state (the owner does);
    it runs the job on its worker thread with its own context (cancel, timeout, events)
    and classifies the outcome the same way as an owned run, for the rank to report."""
    first = _next_sample_index(store, run_id) if sample_interval_s is not None else 0
    handle = RunHandle(
        run_id,
        config,
        store=store,
        owns_store=False,
        job=job,
        resume=resume,
        sample_interval_s=sample_interval_s,
        first_sample=first,
        records_state=False,
    )
    if on_event is not None:
        handle.subscribe(on_event)
    handle._launch()
    return handle


def run_sync(config: RunConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> RunHandle:
    """Start a run and wait for it (the CLI). Ctrl-C cancels the run and waits for it to
    stop cleanly; a second Ctrl-C during that wait propagates as usual.

    In the main thread Ctrl-C is caught by a signal handler that only records it, and the
    wait polls: a KeyboardInterrupt raised inside ``Event.wait`` could land between a
    lock's acquire and release and leave the next wait deadlocked (seen once in CI).
    """
    handle = start(config, **kwargs)
    wait_interruptibly(handle)
    return handle


def wait_interruptibly(handle: RunHandle) -> None:
    """Wait for ``handle``; the first Ctrl-C cancels the run (see :func:`run_sync`)."""
    cancelled = False
    with _sigint_recorded() as interrupted:
        while not handle.done:
            handle.wait(0.1)
            if interrupted and not cancelled:
                handle.cancel(reason="interrupted (Ctrl-C)")
                cancelled = True


@contextlib.contextmanager
def _sigint_recorded() -> Iterator[list[int]]:
    """Record Ctrl-C (the first one) instead of raising; a second one raises as usual."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def record(signum: int, frame: object) -> None:
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)
