"""Where a run stands, as one typed snapshot every view prints the same way.

The panel, ``foundry distill``, ``foundry run`` and the headless notebook all show one
line, ``phase · n/N unit · elapsed < ETA · rate · tokens/s``, computed here from the
run's events (``phase``, ``stage``, ``step``, ``count``) and nothing else, so they
cannot disagree.

The ETA is for the whole run, not the current phase, and it has to stay honest where a
naive ``elapsed / done`` estimate lies:

- during a validation inside training the step counter stands still; the step rate is
  measured on training time only (validations are timed apart), so the ETA does not
  climb while the validation runs, and the validation shows its own ``n/N batches``;
- after the last training step come the CE-only baseline and the final evaluation: the
  baseline is estimated as long as the distillation took, and each model's evaluation
  by its batches (timed on the validations), so "ETA 0 s" does not stay up for minutes;
- before training there is nothing to time the training by: the ETA then covers the
  current phase only and says so (``ETA+``: at least this long).

Everything here is a pure function of the events and their times: tests feed synthetic
timings, no test sleeps.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COUNT_EVERY_S",
    "PROGRESS_FILE",
    "Progress",
    "ProgressLines",
    "ProgressTracker",
    "RunPlan",
    "evals_due",
    "format_duration",
    "format_progress",
    "poll_progress",
    "progress_lines",
    "read_progress",
    "remaining_in_evaluate",
    "remaining_in_training",
]

PROGRESS_FILE = "progress.json"
"""A run's latest snapshot as JSON, in its run folder (for readers in other processes)."""

COUNT_EVERY_S = 0.5
"""A phase's ``count`` events (e.g. evaluation batches) come at most this often, plus the
first and the last: enough for a progress line, few enough for the event buffer."""

TRAINING_PHASES = ("teacher_build", "teacher_check", "distill", "baseline")
"""Phases that count optimizer steps (their step events carry ``step``/``max_steps``)."""

_OWN_SCHEDULE = ("teacher_build", "teacher_check")
"""Training phases that validate on the teacher recipe's schedule, not ``eval.every_steps``."""

_PREFIX_PHASE = {
    "": "distill",
    "baseline/": "baseline",
    "teacher_build/": "teacher_build",
    "teacher_reference/": "teacher_check",  # the teacher check trains a reference model
}
_EVAL_STAGES = ("teacher", "student", "baseline")
_TERMINAL = ("completed", "failed", "cancelled", "timed_out")


@dataclass(frozen=True)
class RunPlan:
    """What the run will do, from its config: what the ETA extrapolates to."""

    max_steps: int
    eval_every: int
    baseline: bool = True

    @classmethod
    def from_config(cls, config: Any) -> RunPlan:
        """The plan of a :class:`~foundry_kernel.config.RunConfig`."""
        return cls(
            max_steps=int(config.limits.max_steps),
            eval_every=int(config.eval.every_steps),
            baseline=bool(config.eval.baseline),
        )


@dataclass(frozen=True)
class Progress:
    """One moment of a run, as every view shows it (see :func:`format_progress`).

    ``phase`` is the engine's phase (``teacher_build``, ``capture``, ``distill``,
    ``baseline``, ``evaluate``, ``export``, ...); ``activity`` says what the current
    ``done/total`` counts: ``"train"`` (optimizer steps), ``"validation"`` (batches of a
    validation inside training, at ``step``/``max_steps``), ``"evaluation"`` (batches
    of the final evaluation of ``stage``), or ``"wait"`` (nothing counted yet).
    ``eta_s`` covers the rest of the run when ``eta_complete``, else only what could be
    estimated (at least that long). ``rate`` is in ``unit`` per second.
    """

    run_id: str
    state: str
    phase: str
    stage: str | None = None
    activity: str = "wait"
    done: int | None = None
    total: int | None = None
    unit: str = "steps"
    step: int | None = None
    max_steps: int | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    eta_complete: bool = False
    rate: float | None = None
    tokens_per_s: float | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], None when nothing is counted."""
        if self.done is None or not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a progress file, a JSON answer)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Progress:
        """The inverse of :meth:`to_dict`; unknown keys are ignored (a newer writer)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``; ``?`` for an unknown duration."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _rate(value: float | None, unit: str) -> str | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    per = {"steps": "it/s", "batches": "batch/s"}.get(unit, f"{unit}/s")
    if value < 1:
        return f"{1 / value:.1f} s/{'it' if unit == 'steps' else unit.rstrip('s')}"
    return f"{value:.1f} {per}" if value < 100 else f"{value:.0f} {per}"


def _tokens(value: float | None) -> str | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return f"{value / 1000:.1f}k tok/s" if value >= 1000 else f"{value:.0f} tok/s"


def _label(p: Progress) -> str:
    if p.activity == "validation":
        return f"{p.phase} · validation"
    if p.stage and p.activity in ("evaluation", "wait"):
        return f"{p.phase}/{p.stage}"
    return p.phase


def format_progress(p: Progress) -> str:
    """The one progress line: ``phase · n/N unit · elapsed < ETA · rate · tokens/s``.

    Parts that are not known are left out (never ``None``); a finished run says how it
    ended and how long it took."""
    if p.finished:
        return f"{p.state} · {format_duration(p.elapsed_s)}"
    parts = [_label(p)]
    if p.done is not None:
        parts.append(f"{p.done}/{p.total if p.total is not None else '?'} {p.unit}")
    if p.activity == "validation" and p.step is not None:
        parts.append(f"at step {p.step}/{p.max_steps if p.max_steps is not None else '?'}")
    eta = format_duration(p.eta_s)
    plus = "" if p.eta_complete or p.eta_s is None else "+"
    parts.append(f"{format_duration(p.elapsed_s)} < {eta}{plus}")
    for extra in (_rate(p.rate, p.unit), _tokens(p.tokens_per_s)):
        if extra is not None:
            parts.append(extra)
    return " · ".join(parts)


# ----------------------------------------------------------------------- pure estimates


def evals_due(done: int, total: int, every: int) -> int:
    """Validations a training loop still runs after step ``done``: at every multiple of
    ``every`` up to ``total``, and at ``total`` itself (the trainer's rule)."""
    if every < 1 or done >= total:
        return 0
    n = total // every - done // every
    return n + (0 if total % every == 0 else 1)


def remaining_in_training(
    *,
    done: int,
    total: int,
    step_s: float | None,
    eval_every: int,
    validation_s: float | None,
    in_validation_left_s: float = 0.0,
) -> float | None:
    """Seconds left in a training phase: the steps left at ``step_s`` (training time per
    step, validations excluded), the validations still due at ``validation_s`` each, and
    what is left of a validation running now. None before any step was timed."""
    if step_s is None:
        return None
    steps = max(0, total - done) * step_s
    due = evals_due(done, total, eval_every)
    return steps + due * (validation_s or 0.0) + max(0.0, in_validation_left_s)


def remaining_in_evaluate(
    *,
    stages_left: tuple[str, ...],
    current_left_s: float | None,
    stage_s: Mapping[str, float],
    evaluation_s: float | None,
) -> float | None:
    """Seconds left in the final evaluation: what is left of the current stage, then for
    each stage still to come its estimate. The CE-only student's evaluation takes what
    the distilled student's took (same model, same batches, same samples); otherwise a
    stage takes one held-out evaluation (``evaluation_s``). None when nothing is timed."""
    total = current_left_s
    for name in stages_left:
        guess = stage_s.get("student") if name == "baseline" else None
        guess = evaluation_s if guess is None else guess
        if guess is None:
            return total
        total = (total or 0.0) + guess
    return total


# ----------------------------------------------------------------------- the tracker


@dataclass
class _Count:
    done: int
    total: int | None
    unit: str
    t0: float  # when the count started (its first event)
    done0: int  # the count at t0
    t: float  # the latest count event


@dataclass
class _Phase:
    name: str
    t0: float
    step: int | None = None
    max_steps: int | None = None
    first_step_t: float | None = None
    first_step: int = 0
    last_step_t: float | None = None
    validation_spent_s: float = 0.0  # validations inside this phase, for the step rate
    validation_pending_s: float = 0.0  # a validation after the last step (not yet spent)
    tokens_per_s: float | None = None
    validated_step: int | None = None  # the step of the latest validation's report


@dataclass
class ProgressTracker:
    """Builds :class:`Progress` snapshots from a run's events (``observe``) and the time
    (``snapshot``). Thread-safe: the worker observes, any thread takes snapshots."""

    run_id: str
    plan: RunPlan
    start: float | None = None
    _phase: _Phase | None = None
    _stage: str | None = None
    _stage_t0: float = 0.0
    _count: _Count | None = None
    _durations: dict[str, float] = field(default_factory=dict)
    _stage_s: dict[str, float] = field(default_factory=dict)
    _validation_s: float | None = None  # the last validation inside training
    _batch_s: float | None = None  # seconds per evaluation batch (latest measure)
    _eval_batches: int | None = None  # batches in one held-out evaluation
    _state: str = "pending"
    _end: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- feeding -------------------------------------------------------------------
    def observe(self, kind: str, payload: Mapping[str, Any], t: float) -> None:
        """Take one event (``kind``, ``payload``, its wall time ``t``)."""
        with self._lock:
            if self.start is None:
                self.start = t
            if kind == "phase":
                self._enter_phase(str(payload.get("phase")), payload, t)
            elif kind == "stage":
                self._enter_stage(str(payload.get("stage")), t)
            elif kind == "step":
                self._on_step(payload, t)
            elif kind == "count":
                self._on_count(payload, t)
            elif kind == "state":
                self._state = str(payload.get("state"))
                if self._state in _TERMINAL:
                    self._end = t

    def set_state(self, state: str, t: float) -> None:
        with self._lock:
            self._state = state
            if self.start is None and state == "running":
                self.start = t
            if state in _TERMINAL:
                self._end = t

    def _enter_phase(self, name: str, payload: Mapping[str, Any], t: float) -> None:
        self._close_count(t)
        self._close_stage(t)
        old = self._phase
        if old is not None:
            self._durations[old.name] = self._durations.get(old.name, 0.0) + t - old.t0
        phase = _Phase(name, t)
        steps = payload.get("max_steps", payload.get("steps"))
        if name in TRAINING_PHASES and isinstance(steps, int):
            phase.max_steps = steps
        self._phase = phase
        self._stage = None
        if self._state == "pending":
            self._state = "running"

    def _enter_stage(self, name: str, t: float) -> None:
        self._close_count(t)
        self._close_stage(t)
        self._stage, self._stage_t0 = name, t

    def _close_stage(self, t: float) -> None:
        if self._phase is not None and self._phase.name == "evaluate" and self._stage:
            self._stage_s[self._stage] = t - self._stage_t0

    def _on_step(self, payload: Mapping[str, Any], t: float) -> None:
        phase = self._phase
        prefix = str(payload.get("prefix") or "")
        step = payload.get("step")
        if phase is None or _PREFIX_PHASE.get(prefix, prefix.rstrip("/")) != phase.name:
            return
        if not isinstance(step, int):
            return
        metrics = payload.get("metrics")
        metrics = metrics if isinstance(metrics, Mapping) else {}
        if any(str(k).endswith("val/loss") for k in metrics):  # a validation's report
            self._close_count(t)
            phase.validated_step = step
            return
        if isinstance(payload.get("max_steps"), int):
            phase.max_steps = int(payload["max_steps"])
        if phase.first_step_t is None:
            # the phase's first step: time from the phase's start (a resumed phase
            # starts past 0, so its rate counts only the steps done here)
            phase.first_step = step - 1
            phase.first_step_t = phase.t0
        phase.step, phase.last_step_t = step, t
        phase.validation_spent_s += phase.validation_pending_s
        phase.validation_pending_s = 0.0
        tps = metrics.get(f"{prefix}tokens_per_s")
        if isinstance(tps, int | float) and not isinstance(tps, bool) and math.isfinite(tps):
            phase.tokens_per_s = float(tps)

    def _on_count(self, payload: Mapping[str, Any], t: float) -> None:
        done, total = payload.get("done"), payload.get("total")
        if not isinstance(done, int):
            return
        total = total if isinstance(total, int) else None
        unit = str(payload.get("unit") or "batches")
        c = self._count
        if c is None or done < c.done or total != c.total or unit != c.unit:
            # a new count: it began one item before this event (first-event rule)
            self._close_count(t)
            c = self._count = _Count(done, total, unit, t, done, t)
            if done <= 1 and self._phase is not None:
                c.t0, c.done0 = self._phase_mark(t), 0
        c.done, c.t = done, t
        ended = total is not None and done >= total
        timed = unit == "batches"  # evaluation batches; other counts (blocks) time nothing
        if timed and c.done > c.done0 and c.t > c.t0 and (ended or self._batch_s is None):
            # later evaluations are timed on whole ones (a first batch is often slow)
            self._batch_s = (c.t - c.t0) / (c.done - c.done0)
        if total is not None and unit == "batches":
            self._eval_batches = total
        if total is not None and done >= total:
            self._close_count(t)

    def _phase_mark(self, t: float) -> float:
        """When the work of a count's first item began: the last step, stage or phase
        start before it (a count's first event comes after its first item)."""
        phase = self._phase
        assert phase is not None
        marks = [phase.t0, phase.last_step_t or phase.t0]
        if self._stage is not None:
            marks.append(self._stage_t0)
        return min(t, max(marks))

    def _close_count(self, t: float) -> None:
        c, phase = self._count, self._phase
        if c is None:
            return
        self._count = None
        if phase is not None and phase.name in TRAINING_PHASES:
            spent = max(0.0, c.t - c.t0)
            phase.validation_pending_s += spent
            if c.total is not None and c.done >= c.total:
                self._validation_s = spent

    # -- reading -------------------------------------------------------------------
    def snapshot(self, now: float, state: str | None = None) -> Progress:
        """Where the run stands at ``now`` (the run's state given by its handle, else
        the last one observed)."""
        with self._lock:
            return self._snapshot(now, state or self._state)

    def _snapshot(self, now: float, state: str) -> Progress:
        start = self.start if self.start is not None else now
        end = self._end if state in _TERMINAL and self._end is not None else now
        phase = self._phase
        base = Progress(
            run_id=self.run_id,
            state=state,
            phase=phase.name if phase is not None else state,
            stage=self._stage,
            elapsed_s=max(0.0, end - start),
        )
        if phase is None or state in _TERMINAL:
            return base
        count = self._count
        if phase.name in TRAINING_PHASES:
            return self._training(base, phase, count, now)
        if count is not None:
            rate = self._count_rate(count)
            left = None
            if count.total is not None and rate is not None:
                left = _count_left(count, rate, now)
            eta, complete = self._after(phase.name, left, now)
            return _with(
                base,
                activity="evaluation" if phase.name == "evaluate" else "count",
                done=count.done,
                total=count.total,
                unit=count.unit,
                rate=rate,
                eta_s=eta,
                eta_complete=complete,
            )
        eta, complete = self._after(phase.name, None, now)
        return _with(base, eta_s=eta, eta_complete=complete)

    def _count_rate(self, c: _Count) -> float | None:
        if c.done > c.done0 and c.t > c.t0:
            return (c.done - c.done0) / (c.t - c.t0)
        return None if self._batch_s is None else 1.0 / self._batch_s

    def _step_s(self, phase: _Phase, now: float) -> float | None:
        if phase.step is None or phase.first_step_t is None or phase.last_step_t is None:
            return None
        steps = phase.step - phase.first_step
        train_s = phase.last_step_t - phase.first_step_t - phase.validation_spent_s
        return train_s / steps if steps > 0 and train_s > 0 else None

    def _training(
        self, base: Progress, phase: _Phase, count: _Count | None, now: float
    ) -> Progress:
        step_s = self._step_s(phase, now)
        total = phase.max_steps
        done = phase.step or 0
        validation_s = self._validation_s
        if validation_s is None and self._batch_s is not None and self._eval_batches:
            validation_s = self._batch_s * self._eval_batches
        in_val_left = 0.0
        if count is not None and count.total is not None:
            rate = self._count_rate(count)
            in_val_left = 0.0 if rate is None else _count_left(count, rate, now)
        left = None
        if total is not None:
            since = 0.0
            if count is None and step_s is not None and phase.last_step_t is not None:
                since = min(max(0.0, now - phase.last_step_t), step_s)  # the next step runs
            every = self.plan.eval_every if phase.name not in _OWN_SCHEDULE else 0
            due_now = (
                count is None
                and every > 0
                and done > 0
                and (done % every == 0 or done == total)
                and phase.validated_step != done
            )
            if due_now and validation_s is not None:  # this step's validation comes next
                in_val_left += validation_s
            left = remaining_in_training(
                done=done,
                total=total,
                step_s=step_s,
                eval_every=every,
                validation_s=validation_s if every else None,
                in_validation_left_s=in_val_left,
            )
            left = None if left is None else max(0.0, left - since)
        eta, complete = self._after(phase.name, left, now)
        common = dict(
            step=phase.step,
            max_steps=total,
            eta_s=eta,
            eta_complete=complete,
            tokens_per_s=phase.tokens_per_s,
        )
        if count is not None:
            return _with(
                base,
                activity="validation",
                done=count.done,
                total=count.total,
                unit=count.unit,
                rate=self._count_rate(count),
                **common,
            )
        return _with(
            base,
            activity="train" if phase.step is not None else "wait",
            done=phase.step,
            total=total,
            unit="steps",
            rate=None if step_s is None else 1.0 / step_s,
            **common,
        )

    def _phase_total_s(self, name: str, left: float | None, now: float) -> float | None:
        """How long a training phase takes in all: measured if it ended, else the time it
        ran so far plus ``left``."""
        if self._phase is not None and self._phase.name == name:
            return None if left is None else now - self._phase.t0 + left
        return self._durations.get(name)

    def _after(self, name: str, left: float | None, now: float) -> tuple[float | None, bool]:
        """``(eta_s, complete)`` for the run from phase ``name`` with ``left`` seconds of
        it to go: the later phases estimated where they can be."""
        plan = self.plan
        one_eval = None
        if self._batch_s is not None and self._eval_batches:
            one_eval = self._batch_s * self._eval_batches
        stages = ("teacher", "student") + (("baseline",) if plan.baseline else ())
        if name == "distill":
            if left is None:
                return None, False
            rest = left
            complete = True
            if plan.baseline:
                total = self._phase_total_s("distill", left, now)
                rest += total or 0.0
            final = remaining_in_evaluate(
                stages_left=stages, current_left_s=None, stage_s={}, evaluation_s=one_eval
            )
            complete = final is not None
            return rest + (final or 0.0), complete
        if name == "baseline":
            if left is None:
                guess = self._durations.get("distill")
                return guess, False
            final = remaining_in_evaluate(
                stages_left=stages, current_left_s=None, stage_s={}, evaluation_s=one_eval
            )
            return left + (final or 0.0), final is not None
        if name == "evaluate":
            stage = self._stage
            after = stages[stages.index(stage) + 1 :] if stage in stages else stages
            current = left
            if current is None and stage in stages:
                # between the batches and the next stage (samples, speed): the stage
                # takes what the student's took, if known
                took = self._stage_s.get("student") if stage == "baseline" else None
                current = None if took is None else max(0.0, took - (now - self._stage_t0))
            eta = remaining_in_evaluate(
                stages_left=after,
                current_left_s=current,
                stage_s=self._stage_s,
                evaluation_s=one_eval,
            )
            return eta, eta is not None
        if name == "export":
            return 0.0, True
        return left, False  # before training: only the current phase is known


def _count_left(c: _Count, rate: float, now: float) -> float:
    """Seconds left in a count at ``rate``, less the time since its latest event (the
    next items are under way), so the estimate falls between events instead of standing."""
    assert c.total is not None
    per_item = 1.0 / rate
    since = min(max(0.0, now - c.t), per_item)
    return max(0.0, (c.total - c.done) * per_item - since)


def _with(p: Progress, **changes: Any) -> Progress:
    from dataclasses import replace

    return replace(p, **changes)


class ProgressLines:
    """Which progress lines a log (a terminal that is not a TTY, a notebook's output)
    prints: one when the phase or stage changes, else at most one per ``every_s``, and
    never the same text twice in a row - each line is new information."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._where: tuple[str, str | None, str] | None = None
        self._last_t: float | None = None
        self._last_text = ""

    def next(self, p: Progress, now: float) -> str | None:
        """The line to print for ``p`` at ``now``, or None."""
        text = format_progress(p)
        where = (p.phase, p.stage, p.activity)
        due = self._last_t is None or now - self._last_t >= self.every_s
        if where == self._where and not due:
            return None
        if text == self._last_text:
            return None
        quiet = self._last_t is not None and now - self._last_t < 6 * self.every_s
        if quiet and _same_but_time(text, self._last_text):
            return None
        self._where, self._last_t, self._last_text = where, now, text
        return text


def _same_but_time(a: str, b: str) -> bool:
    """Two lines that differ only in their clock (nothing moved): not worth a line."""
    strip = [" · ".join(x for x in s.split(" · ") if "<" not in x) for s in (a, b)]
    return strip[0] == strip[1] and re.search(r"\d/", strip[0]) is None


def read_progress(run_dir: Path, *, now: float | None = None) -> Progress | None:
    """The progress file a run keeps in ``run_dir``; None when there is none yet or it
    cannot be read (it is rewritten atomically, so a reader sees a whole one or none).

    The file is rewritten on events only, so during a phase that sends none (samples,
    saving) it stands still. With ``now`` (wall time) a running run's elapsed time is
    carried forward to ``now`` by the file's age; the rest (the count, the ETA: the
    last estimate) is as the run last said it."""
    path = Path(run_dir) / PROGRESS_FILE
    try:
        written = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        progress = Progress.from_dict(data)
    except TypeError:
        return None
    if now is None or progress.finished or now <= written:
        return progress
    return _with(progress, elapsed_s=progress.elapsed_s + (now - written))


def progress_lines(
    snapshots: Iterable[tuple[Progress, float]], every_s: float = 10.0
) -> Iterator[str]:
    """The lines a log prints for a run's successive snapshots (each with its wall
    time): :class:`ProgressLines` over those of a running run. A run not started yet
    has nothing to say, and how a run ended is said by whoever waited for it (with its
    outcome), so neither makes a line."""
    lines = ProgressLines(every_s)
    for progress, now in snapshots:
        if progress.state == "pending" or progress.finished:
            continue
        text = lines.next(progress, now)
        if text is not None:
            yield text


def poll_progress(
    read: Callable[[], Progress | None],
    wait: Callable[[float], bool],
    *,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> Iterator[tuple[Progress, float]]:
    """A run's snapshots from ``read`` (a handle's ``progress``, a progress file) with
    their time, every ``poll_s``, until ``wait(poll_s)`` says the watch is over (it
    returns True: the run is done, the process running it returned). For readers that
    are not fed the run's events - another process, a notebook cell waiting on a run."""
    while True:
        progress = read()
        if progress is not None:
            yield progress, clock()
        if wait(poll_s):
            return
