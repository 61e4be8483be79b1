"""Runs, metrics and events as pandas DataFrames, read from the run store's SQLite file.

For analysis in a notebook or a script, without the dashboard::

    import foundry_kernel as fk
    runs = fk.runs_frame("runs")                     # one row per run
    runs[runs.state == "completed"].sort_values("student_ppl")
    curves = fk.metrics_frame("runs", runs.run_id[0], wide=True)   # steps x metric names
    curves[["distill/train/loss", "distill/val/loss"]].plot()
    fk.events_frame("runs", runs.run_id[0])

Every function takes a :class:`~foundry_kernel.store.RunStore` or a runs folder; a folder
is opened read-only (``RunStore(..., read_only=True)``) and closed again, so reading never
changes the store, and works while runs are writing to it. Times are timezone-aware UTC
``Timestamp`` columns (``.dt.tz_convert(None)`` or ``.dt.tz_localize(None)`` to drop it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from foundry_kernel.config import flatten_config
from foundry_kernel.store import RunRecord, RunStore
from foundry_kernel.summary import ROLES, RunSummary

__all__ = ["events_frame", "metrics_frame", "runs_frame"]

StoreLike = RunStore | Path | str


@contextlib.contextmanager
def _opened(store: StoreLike) -> Iterator[RunStore]:
    """The store itself, or the folder's store opened read-only for the call."""
    if isinstance(store, RunStore):
        yield store
        return
    with RunStore(store, read_only=True) as opened:
        yield opened


def _times(seconds: Sequence[float | None]) -> pd.Series:
    return pd.to_datetime(pd.Series(seconds, dtype="float64"), unit="s", utc=True)


def _run_row(rec: RunRecord) -> dict[str, Any]:
    summary = RunSummary.parse(rec.summary)
    verdict = summary.verdict
    row: dict[str, Any] = {
        "run_id": rec.run_id,
        "name": rec.name,
        "kind": rec.kind,
        "state": rec.state,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "duration_s": (
            rec.ended_at - rec.started_at
            if rec.ended_at is not None and rec.started_at is not None
            else None
        ),
        "mode": rec.config.get("distill", {}).get("mode"),
        "loss": rec.config.get("loss", {}).get("kind"),
        "teacher": rec.config.get("teacher", {}).get("source"),
        "data": rec.config.get("data", {}).get("source"),
    }
    for role in ROLES:
        result = summary.role(role)
        row[f"{role}_ppl"] = None if result is None else result.val_ppl
        row[f"{role}_params"] = None if result is None else result.params
    row["agreement"] = summary.agreement
    row["gap_closed"] = summary.gap_closed
    row["helped"] = None if verdict is None else verdict.helped
    row["verdict"] = None if verdict is None else verdict.text
    row["error"] = rec.error
    row["batch_id"] = rec.batch_id
    row["damaged"] = rec.damaged
    row.update(flatten_config(rec.config, "config."))
    return row


def runs_frame(store: StoreLike, *, batch_id: str | None = None) -> pd.DataFrame:
    """One row per run, newest first: id, name, state, times, duration, mode and loss,
    each model's held-out perplexity and size, gap closed with the verdict (``helped``,
    ``verdict``), and every config setting as a ``config.<section>.<field>`` column (so a
    grid reads as ``df.groupby("config.loss.temperature").student_ppl.min()``)."""
    with _opened(store) as opened:
        records = opened.list_runs(batch_id=batch_id)
    frame = pd.DataFrame([_run_row(r) for r in records])
    if frame.empty:
        return pd.DataFrame(columns=["run_id", "name", "state", "created_at"])
    for column in ("created_at", "started_at", "ended_at"):
        frame[column] = _times(frame[column].tolist())
    return frame


def metrics_frame(
    store: StoreLike,
    run_id: str | Sequence[str],
    names: Sequence[str] | None = None,
    *,
    wide: bool = False,
) -> pd.DataFrame:
    """A run's (or several runs') metrics, long: ``run_id, name, step, value, time``,
    sorted by run, name and step; ``names`` keeps only those metrics. ``wide=True`` (one
    run) pivots to one row per step and one column per metric name, for plotting."""
    ids = [run_id] if isinstance(run_id, str) else list(run_id)
    if wide and len(ids) != 1:
        raise ValueError("metrics_frame(wide=True) takes one run_id; pivot a long frame instead")
    rows: list[dict[str, Any]] = []
    with _opened(store) as opened:
        for one in ids:
            for m in opened.metrics(one, names):
                rows.append(
                    {
                        "run_id": one,
                        "name": m.name,
                        "step": m.step,
                        "value": m.value,
                        "time": m.time,
                    }
                )
    frame = pd.DataFrame(rows, columns=["run_id", "name", "step", "value", "time"])
    frame["time"] = _times(frame["time"].tolist())
    frame["step"] = frame["step"].astype("int64")
    if wide:
        pivot = frame.pivot_table(index="step", columns="name", values="value", aggfunc="last")
        pivot.columns.name = None
        return pivot
    return frame


def events_frame(store: StoreLike, run_id: str) -> pd.DataFrame:
    """A run's events (alerts, warnings, resumes) in the order they happened:
    ``event_id, time, kind, message, step`` (``step`` is ``<NA>`` where none applies)."""
    with _opened(store) as opened:
        events = opened.events(run_id)
    frame = pd.DataFrame(
        [
            {
                "event_id": e.event_id,
                "time": e.time,
                "kind": e.kind,
                "message": e.message,
                "step": e.step,
            }
            for e in events
        ],
        columns=["event_id", "time", "kind", "message", "step"],
    )
    frame["time"] = _times(frame["time"].tolist())
    frame["step"] = frame["step"].astype("Int64")
    return frame
