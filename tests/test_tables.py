"""``foundry_kernel.tables``: runs, metrics and events as DataFrames, read-only."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from _fake_runs import finished_run

import foundry_kernel as fk
from foundry_kernel.store import RunStore


def _store(root: Path) -> tuple[str, str]:
    with RunStore(root) as store:
        a = finished_run(store, overrides=["name=a", "loss.temperature=2"])
        b = finished_run(store, overrides=["name=b"], state="failed", results={})
        store.log_metrics(a, 1, {"distill/train/loss": 3.0, "distill/val/loss": 3.5})
        store.log_metrics(a, 2, {"distill/train/loss": 2.5, "distill/val/loss": float("nan")})
        store.add_event(a, "warning", "loss spiked", step=2)
        store.add_event(a, "note", "resumed")
    return a, b


def test_runs_frame_has_results_verdict_and_config_columns(tmp_path: Path) -> None:
    a, b = _store(tmp_path / "runs")
    frame = fk.runs_frame(tmp_path / "runs")
    assert list(frame.run_id) == [b, a]  # newest first, like the store
    row = frame.set_index("run_id").loc[a]
    assert row.state == "completed" and row.student_ppl == 20.0 and row.baseline_ppl == 30.0
    assert row.teacher_ppl == 10.0 and row.gap_closed == 0.37 and row.helped
    assert row.verdict.startswith("Distillation helped")
    assert row["config.loss.temperature"] == 2.0 and row["mode"] == "online"
    assert isinstance(row.created_at, pd.Timestamp) and str(row.created_at.tz) == "UTC"
    failed = frame.set_index("run_id").loc[b]
    assert failed.state == "failed" and math.isnan(failed.student_ppl)
    grid = frame.groupby("config.loss.temperature").student_ppl.min()
    assert grid.loc[2.0] == 20.0


def test_metrics_frame_long_and_wide(tmp_path: Path) -> None:
    a, b = _store(tmp_path / "runs")
    with RunStore(tmp_path / "runs", read_only=True) as store:
        long = fk.metrics_frame(store, a)
        assert list(long.columns) == ["run_id", "name", "step", "value", "time"]
        assert len(long) == 4 and long.step.dtype == "int64"
        only = fk.metrics_frame(store, a, ["distill/train/loss"])
        assert list(only.value) == [3.0, 2.5]
        wide = fk.metrics_frame(store, a, wide=True)
        assert list(wide.index) == [1, 2]
        assert wide.loc[2, "distill/train/loss"] == 2.5
        assert math.isnan(wide.loc[2, "distill/val/loss"])  # logged NaN stays NaN
        both = fk.metrics_frame(store, [a, b])
        assert set(both.run_id) == {a}  # b logged nothing
        with pytest.raises(ValueError, match="one run_id"):
            fk.metrics_frame(store, [a, b], wide=True)


def test_events_frame(tmp_path: Path) -> None:
    a, b = _store(tmp_path / "runs")
    events = fk.events_frame(str(tmp_path / "runs"), a)
    assert list(events.kind) == ["warning", "note"]
    assert events.step.iloc[0] == 2 and events.step.isna().iloc[1]
    assert fk.events_frame(tmp_path / "runs", b).empty


def test_frames_never_write_the_store(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _store(root)
    before = (root / "foundry.sqlite").stat().st_mtime_ns
    fk.runs_frame(root)
    assert (root / "foundry.sqlite").stat().st_mtime_ns == before
    with pytest.raises(fk.FoundryError, match="no database"):
        fk.runs_frame(tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here").exists()
