"""Where a run is, and which changes of state are allowed: one table, enforced twice.

A :class:`RunHandle` checks every change against :data:`ALLOWED_TRANSITIONS` in memory,
and :meth:`RunStore.set_state` checks every change it records against
:data:`STORE_TRANSITIONS` inside the write transaction, whoever writes (the controller,
the notebook runner, the stale-run sweep). The store's table adds what only the store
sees: a resume takes an unfinished run (failed, cancelled, timed out) back to ``pending``
or ``running``; a completed run never changes again.
"""

from __future__ import annotations

import enum

__all__ = [
    "ALLOWED_TRANSITIONS",
    "LIVE_STATES",
    "STORE_TRANSITIONS",
    "TERMINAL_STATES",
    "InvalidTransition",
    "RunState",
    "check_store_transition",
    "check_transition",
]


class RunState(str, enum.Enum):
    """Where a run is. Terminal states never change (a resume starts a new handle)."""

    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"

    def __str__(self) -> str:  # "completed", as the store, the CLI and JSON spell it
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def terminal(self) -> bool:
        return not ALLOWED_TRANSITIONS[self]


_S = RunState
ALLOWED_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # pending -> failed/cancelled: the worker could not start, or was cancelled first.
    _S.PENDING: frozenset({_S.RUNNING, _S.CANCELLING, _S.CANCELLED, _S.FAILED}),
    # running -> cancelled directly: the job stopped itself with RunCancelled.
    _S.RUNNING: frozenset({_S.CANCELLING, _S.COMPLETED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED}),
    # cancelling -> completed: the last step finished before the job saw the request.
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.COMPLETED, _S.FAILED, _S.TIMED_OUT}),
    _S.CANCELLED: frozenset(),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.TIMED_OUT: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change the table above does not allow (a controller bug, never user error)."""


def check_transition(old: RunState, new: RunState) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is in the table."""
    if new not in ALLOWED_TRANSITIONS[old]:
        raise InvalidTransition(f"run state cannot go from {old} to {new}")


_RESUMED_FROM = frozenset({_S.FAILED, _S.CANCELLED, _S.TIMED_OUT})
STORE_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    state: allowed
    | (frozenset({_S.PENDING, _S.RUNNING}) if state in _RESUMED_FROM else frozenset())
    for state, allowed in ALLOWED_TRANSITIONS.items()
}
TERMINAL_STATES: frozenset[str] = frozenset(s.value for s in RunState if s.terminal)
#: States that promise a process is (about to be) running the run: stale without its lock.
LIVE_STATES: tuple[str, ...] = tuple(s.value for s in RunState if not s.terminal)


def check_store_transition(old: RunState, new: RunState) -> None:
    """Raise :class:`InvalidTransition` unless the store may record ``old -> new``
    (writing the state a run already has is a no-op and always allowed)."""
    if new is not old and new not in STORE_TRANSITIONS[old]:
        raise InvalidTransition(f"run state cannot go from {old} to {new}")
