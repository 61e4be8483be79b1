"""What a running job sees of its controller: a stop signal, a heartbeat and an event sink.

The training loop, the evaluator and the teacher builder all take a
``RunContext`` and call ``ctx.check()`` between batches. That single call is
how cancellation, the whole-run timeout and the step watchdog reach code that
runs in a worker thread: nothing is killed from outside, the job stops itself
at the next safe point and leaves no half-written state behind.

Every phase of a run does this, not only training: loading documents (per
document), the split (per batch of documents hashed), packing (per batch of
documents tokenized), tokenizer training (per document fed; the merge step runs
in a child process that a cancel kills), the teacher's and the student's
builds, logit capture (per batch), evaluation (per batch, and per generated
token in samples), and export (per file). A phase names its current part with
:meth:`RunContext.set_stage`, so events, the watchdog's verdict and a cancelled
run's record say where the run stood.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from foundry_kernel.errors import RunCancelled, RunTimeout


@dataclass(frozen=True)
class Event:
    """One progress event. ``kind`` is e.g. 'phase', 'step', 'eval', 'alert', 'log'."""

    kind: str
    run_id: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)


EventSink = Callable[[Event], None]


class RunContext:
    """Cooperative control for one run, shared by its worker and its controller.

    Thread-safe: ``cancel``/``expire`` may be called from any thread; ``check``
    and ``heartbeat`` from the worker.
    """

    def __init__(
        self,
        run_id: str = "-",
        *,
        sink: EventSink | None = None,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id
        self._sink = sink
        self._deadline = deadline
        self._clock = clock
        self._stop = threading.Event()
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.last_beat = clock()
        self.phase = "pending"
        self.stage: str | None = None
        self._last_count: float | None = None

    # controller side ---------------------------------------------------------
    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the job to stop at its next check (idempotent; first reason wins)."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def wait_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early if a stop is requested."""
        return self._stop.wait(timeout)

    # worker side -------------------------------------------------------------
    def check(self) -> None:
        """Raise RunCancelled/RunTimeout if the job should stop now.

        Reaching a check is also progress (a batch finished), so it feeds the
        watchdog: long evaluations and teacher scoring are not mistaken for hangs.
        """
        self.last_beat = self._clock()
        if self._deadline is not None and self._clock() > self._deadline:
            self.cancel("timed_out")
        if self._stop.is_set():
            if self._reason == "timed_out":
                raise RunTimeout("the run's wall-clock limit (limits.timeout_s) was reached")
            raise RunCancelled(f"run stopped: {self._reason}")

    def pending_stop(self) -> str | None:
        """The stop reason if the job should stop now (``"timed_out"`` past the deadline),
        else None; never raises.

        A data-parallel rank must not raise alone mid-step (the others would wait in a
        collective until the timeout): it folds this answer into the step's one
        all-reduce instead, and every rank stops together after that step. Like
        :meth:`check` it is a heartbeat and applies the deadline.
        """
        self.last_beat = self._clock()
        if self._deadline is not None and self._clock() > self._deadline:
            self.cancel("timed_out")
        return self._reason if self._stop.is_set() else None

    def heartbeat(self) -> None:
        """Mark progress for the step watchdog."""
        self.last_beat = self._clock()

    def set_phase(self, phase: str, **payload: Any) -> None:
        """Enter a phase of the run (teacher, data, student, distill, ...); a ``phase``
        event. Entering a phase is progress (a heartbeat) and clears the stage."""
        self.phase = phase
        self.stage = None
        self._last_count = None  # its first count goes out, however soon after the last
        self.heartbeat()
        self.emit("phase", phase=phase, **payload)

    def set_stage(self, stage: str, **payload: Any) -> None:
        """Name the part of the current phase that runs now (e.g. the teacher build's
        ``tokenizer``, the data phase's ``split``); a ``stage`` event with both names.

        Also a stop point: it calls :meth:`check` first, so a cancel that came during the
        previous stage lands before this one starts any work. Subscribers see the event
        on the worker thread before the stage's work begins.
        """
        self.check()
        self.stage = stage
        self._last_count = None
        self.emit("stage", phase=self.phase, stage=stage, **payload)

    def advance(self, done: int, total: int | None, unit: str = "batches") -> None:
        """Say how far the current phase's counted work is (``done`` of ``total`` items,
        e.g. evaluation batches): a ``count`` event, so a progress line can show
        ``n/N`` and a rate where no optimizer step moves (validation, final evaluation).

        A heartbeat, never a stop point (the caller's own ``check`` is). Events go out for
        the first and the last item (and a phase's or stage's first count) and at most
        every ``COUNT_EVERY_S`` in between, so a long evaluation does not flood the run's
        event buffer.
        """
        from foundry_kernel.progress import COUNT_EVERY_S

        self.heartbeat()
        now = self._clock()
        last = done <= 1 or (total is not None and done >= total)
        if not last and self._last_count is not None and now - self._last_count < COUNT_EVERY_S:
            return
        self._last_count = now
        self.emit("count", phase=self.phase, stage=self.stage, done=done, total=total, unit=unit)

    @property
    def where(self) -> str:
        """``phase`` or ``phase/stage``: where the run stands, for messages."""
        return self.phase if self.stage is None else f"{self.phase}/{self.stage}"

    def emit(self, kind: str, **payload: Any) -> None:
        """Send an event to the sink (sinks must not raise: they belong to the controller)."""
        if self._sink is None:
            return
        self._sink(Event(kind=kind, run_id=self.run_id, payload=payload))
