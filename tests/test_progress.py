"""The progress snapshot: its ETA as pure functions of synthetic timings, its line, and
one real tiny run that walks through the phases in order."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from foundry_kernel.progress import (
    Progress,
    ProgressLines,
    ProgressTracker,
    RunPlan,
    evals_due,
    format_duration,
    format_progress,
    read_progress,
    remaining_in_evaluate,
    remaining_in_training,
)

PLAN = RunPlan(max_steps=200, eval_every=100, baseline=True)


def _step(
    t: ProgressTracker, step: int, at: float, prefix: str = "", n: int = 200, **metrics: float
) -> None:
    named = {f"{prefix}{k}": v for k, v in metrics.items()}
    t.observe("step", {"step": step, "max_steps": n, "prefix": prefix, "metrics": named}, at)


def _count(t: ProgressTracker, done: int, total: int, at: float) -> None:
    t.observe("count", {"done": done, "total": total, "unit": "batches"}, at)


def _distill(t: ProgressTracker, *, steps: int, step_s: float, start: float = 0.0) -> float:
    """Phase ``distill`` at ``start``; ``steps`` steps of ``step_s`` each; returns the time."""
    t.observe("phase", {"phase": "distill", "max_steps": 200}, start)
    at = start
    for s in range(1, steps + 1):
        at += step_s
        _step(t, s, at, **{"train/loss": 3.0, "tokens_per_s": 1000.0})
    return at


def _validate(
    t: ProgressTracker, *, at: float, batches: int, batch_s: float, step: int, prefix: str = ""
) -> float:
    for b in range(1, batches + 1):
        at += batch_s
        _count(t, b, batches, at)
    _step(t, step, at, prefix=prefix, **{"val/loss": 3.1})
    return at


# ----------------------------------------------------------------------- pure functions


def test_evals_due_follows_the_trainers_rule() -> None:
    assert evals_due(0, 200, 100) == 2
    assert evals_due(100, 200, 100) == 1
    assert evals_due(150, 200, 100) == 1
    assert evals_due(200, 200, 100) == 0
    assert evals_due(0, 250, 100) == 3  # 100, 200 and the last step
    assert evals_due(0, 6, 3) == 2


def test_remaining_in_training_adds_the_validations_still_due() -> None:
    left = remaining_in_training(done=50, total=200, step_s=1.0, eval_every=100, validation_s=20.0)
    assert left == pytest.approx(150 + 2 * 20)
    assert (
        remaining_in_training(done=0, total=10, step_s=None, eval_every=5, validation_s=1) is None
    )


def test_remaining_in_evaluate_takes_the_students_stage_for_the_baseline() -> None:
    left = remaining_in_evaluate(
        stages_left=("baseline",), current_left_s=3.0, stage_s={"student": 40.0}, evaluation_s=10.0
    )
    assert left == pytest.approx(43.0)
    left = remaining_in_evaluate(
        stages_left=("student", "baseline"), current_left_s=None, stage_s={}, evaluation_s=10.0
    )
    assert left == pytest.approx(20.0)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 3720, None)] == [
        "0s",
        "42s",
        "3m 05s",
        "1h 02m",
        "?",
    ]


def test_the_line_names_phase_count_times_and_rates_and_never_none() -> None:
    p = Progress(
        run_id="r",
        state="running",
        phase="distill",
        activity="train",
        done=120,
        total=300,
        unit="steps",
        elapsed_s=62,
        eta_s=150,
        eta_complete=True,
        rate=3.1,
        tokens_per_s=2400,
    )
    assert format_progress(p) == "distill · 120/300 steps · 1m 02s < 2m 30s · 3.1 it/s · 2.4k tok/s"
    bare = format_progress(Progress(run_id="r", state="running", phase="teacher", elapsed_s=5))
    assert bare == "teacher · 5s < ?"
    assert "None" not in bare
    done = Progress(run_id="r", state="completed", phase="export", elapsed_s=1290)
    assert format_progress(done) == "completed · 21m 30s"


# ----------------------------------------------------------------------- the tracker


def test_the_eta_does_not_climb_during_a_validation_and_shows_its_batches() -> None:
    t = ProgressTracker("r", PLAN)
    at = _distill(t, steps=99, step_s=1.0)
    at = _validate(t, at=at, batches=17, batch_s=1.0, step=99)  # times one validation
    at += 1.0
    _step(t, 100, at, **{"train/loss": 3.0})
    before = t.snapshot(at)
    etas = []
    for b in range(1, 17):  # the second validation, at step 100: 17 batches of 1 s
        now = at + 1.0 * b
        _count(t, b, 17, now)
        for dt in (0.0, 0.25, 0.5, 0.75):
            etas.append(t.snapshot(now + dt).eta_s)
        if b == 2:
            during = t.snapshot(now + 0.5)
    assert during.activity == "validation"
    assert (during.done, during.total, during.unit) == (2, 17, "batches")
    assert (during.step, during.max_steps) == (100, 200)
    assert "validation · 2/17 batches · at step 100/200" in format_progress(during)
    assert all(e is not None for e in etas)
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(etas)), etas
    assert etas[0] <= before.eta_s  # the validation was part of the estimate


def test_after_the_last_step_the_eta_covers_baseline_and_final_evaluation() -> None:
    t = ProgressTracker("r", PLAN)
    at = _distill(t, steps=100, step_s=1.0)
    at = _validate(t, at=at, batches=10, batch_s=0.5, step=100)  # 5 s per evaluation
    for s in range(101, 201):
        at += 1.0
        _step(t, s, at, **{"train/loss": 3.0})
    at = _validate(t, at=at, batches=10, batch_s=0.5, step=200)
    snap = t.snapshot(at)
    distill_total = at  # the phase started at 0
    # baseline ~ as long as distill; final evaluation: teacher, student, baseline
    assert snap.eta_complete
    assert snap.eta_s == pytest.approx(distill_total + 3 * 5.0, rel=0.05)
    t.observe("phase", {"phase": "baseline", "max_steps": 200}, at)
    guess = t.snapshot(at + 1)
    assert guess.eta_s is not None and guess.eta_s > distill_total * 0.9


def test_the_final_evaluation_never_shows_eta_zero_before_its_last_stage() -> None:
    t = ProgressTracker("r", PLAN)
    at = _distill(t, steps=10, step_s=1.0)
    at = _validate(t, at=at, batches=4, batch_s=1.0, step=10)
    t.observe("phase", {"phase": "evaluate"}, at)
    seen = []
    for stage in ("teacher", "student", "baseline"):
        t.observe("stage", {"stage": stage}, at)
        for b in range(1, 5):
            at += 1.0
            _count(t, b, 4, at)
            seen.append(t.snapshot(at))
        at += 20.0  # samples and speed after the batches
        seen.append(t.snapshot(at - 1))
    last_stage = [s for s in seen if s.stage == "baseline"]
    for snap in seen:
        if snap not in last_stage:
            assert snap.eta_s is not None and snap.eta_s > 0, snap
    evaluating = seen[1]
    assert (evaluating.activity, evaluating.done, evaluating.total) == ("evaluation", 2, 4)
    assert format_progress(evaluating).startswith("evaluate/teacher · 2/4 batches")
    # the CE-only student's stage is expected to take what the student's took (24 s)
    t.observe("stage", {"stage": "baseline"}, 100.0)
    assert t.snapshot(100.0).eta_s == pytest.approx(24.0, abs=0.5)


def test_before_training_the_eta_is_marked_partial() -> None:
    t = ProgressTracker("r", PLAN)
    t.observe("phase", {"phase": "teacher_build", "steps": 700}, 0.0)
    for s in range(1, 11):
        _step(t, s, float(s), prefix="teacher_build/", n=700, **{"train/loss": 5.0})
    snap = t.snapshot(10.0)
    assert (snap.phase, snap.done, snap.total) == ("teacher_build", 10, 700)
    assert snap.eta_s == pytest.approx(690.0) and not snap.eta_complete
    assert "< 11m 30s+" in format_progress(snap)


def test_the_teacher_checks_reference_training_counts_its_steps() -> None:
    """Measured: its steps were ignored, so a validation's "1/20 batches" stayed up for
    the whole check while the ETA climbed from 3 to 32 minutes."""
    t = ProgressTracker("r", PLAN)
    t.observe("phase", {"phase": "teacher_check"}, 0.0)
    for s in range(1, 101):
        _step(t, s, s * 0.1, prefix="teacher_reference/", n=700, **{"train/loss": 5.0})
    at = _validate(t, at=10.0, batches=20, batch_s=0.05, step=100, prefix="teacher_reference/")
    _step(t, 101, at + 0.1, prefix="teacher_reference/", n=700, **{"train/loss": 5.0})
    snap = t.snapshot(at + 0.1)
    assert (snap.phase, snap.done, snap.total, snap.unit) == ("teacher_check", 101, 700, "steps")
    assert snap.eta_s == pytest.approx(59.9, abs=1.0)


def test_a_step_of_another_phase_does_not_count_here() -> None:
    t = ProgressTracker("r", PLAN)
    t.observe("phase", {"phase": "baseline", "max_steps": 200}, 0.0)
    _step(t, 150, 1.0, **{"train/loss": 2.0})  # a distill step (no prefix): ignored
    assert t.snapshot(1.0).done is None
    _step(t, 1, 2.0, prefix="baseline/", **{"train/loss": 2.0})
    assert t.snapshot(2.0).done == 1


def test_progress_lines_print_each_new_thing_once() -> None:
    lines = ProgressLines(every_s=10)
    p = Progress(run_id="r", state="running", phase="evaluate", stage="student", elapsed_s=5)
    assert lines.next(p, 0.0) is not None
    same = Progress(run_id="r", state="running", phase="evaluate", stage="student", elapsed_s=15)
    assert lines.next(same, 1.0) is None  # same phase, within the interval
    assert lines.next(same, 12.0) is None  # only the clock moved: no new information
    moved = Progress(
        run_id="r", state="running", phase="evaluate", stage="student", activity="evaluation",
        done=3, total=17, unit="batches", elapsed_s=16,
    )  # fmt: skip
    assert lines.next(moved, 13.0) is not None  # a new activity: at once
    other = Progress(run_id="r", state="running", phase="export", elapsed_s=17)
    assert lines.next(other, 13.5) is not None


def test_snapshots_round_trip_through_plain_data(tmp_path: Path) -> None:
    p = Progress(run_id="r", state="running", phase="distill", done=3, total=6, eta_s=2.0)
    (tmp_path / "progress.json").write_text(__import__("json").dumps(p.to_dict()))
    assert read_progress(tmp_path) == p
    assert read_progress(tmp_path / "missing") is None


# ----------------------------------------------------------------------- a real run


def test_a_real_run_goes_through_the_phases_in_order(tiny_config: dict[str, Any]) -> None:
    import foundry_kernel as fk

    handle = fk.start(tiny_config)
    snaps: list[Progress] = []
    handle.subscribe(lambda _e: snaps.append(handle.progress))
    assert handle.wait(120) is fk.RunState.COMPLETED
    order = []
    for s in snaps:
        if not order or order[-1] != s.phase:
            order.append(s.phase)
    wanted = ["teacher", "data", "student", "distill", "baseline", "evaluate", "export"]
    first = [order.index(p) for p in wanted]  # each phase is there, and in this order
    assert first == sorted(first), order
    activities = {(s.phase, s.activity) for s in snaps}
    assert ("distill", "validation") in activities
    assert ("baseline", "train") in activities
    assert ("evaluate", "evaluation") in activities
    evaluating = [s for s in snaps if s.activity == "evaluation"]
    assert {s.stage for s in evaluating} == {"teacher", "student", "baseline"}
    assert all(s.eta_s is not None for s in snaps if s.phase in ("baseline", "evaluate"))
    lines = [format_progress(s) for s in snaps]
    assert not any("None" in line for line in lines)
    on_disk = read_progress(handle.runs_dir / handle.id)
    assert on_disk is not None and on_disk.state == "completed"
    assert format_progress(handle.progress).startswith("completed · ")
