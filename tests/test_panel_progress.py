"""The panel's live view: progress line and bar, the evaluation table, labelled memory,
unique run labels, greyed fields and a Start button that says why it is off.

The table's rows come from a pure function (tested on metric dicts); the panel wiring is
tested on real runs: scripted jobs through the real controller (seconds), and one tiny
real distillation with its CE-only twin, so the metric names the trainer emits are the
ones the table reads.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config_dict

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

import foundry_kernel
from foundry_kernel.ranks import rank_figures
from foundry_kernel.run._control import RunState
from tests.test_widgets import _quick, _wait_for
from widgets import DistillPanel
from widgets.eval_table import NO_GAP, NO_TEACHER, eval_rows, eval_table_html
from widgets.form import unused_fields
from widgets.panel import memory_text, run_number

RUN_TIMEOUT_S = 120


# --------------------------------------------------------------------- the rows function


def _points() -> dict[int, dict[str, float]]:
    return {
        2: {
            "train/loss": 3.0,
            "train/kd": 2.0,
            "train/ce": 4.0,
            "val/loss": 2.5,
            "val/ppl": math.exp(2.5),
            "val/agreement": 0.25,
            "val/kl": 0.7,
            "baseline/train/loss": 3.5,
            "baseline/val/loss": 2.9,
            "baseline/val/ppl": math.exp(2.9),
        },
        4: {
            "train/loss": 2.0,
            "train/kd": 1.5,
            "train/ce": 3.0,
            "val/loss": 2.2,
            "val/ppl": math.exp(2.2),
            "val/agreement": 0.4,
            "val/kl": 0.5,
        },
        5: {"train/loss": 1.9},  # a training step without an evaluation: no row
    }


def test_rows_merge_train_and_eval_and_mark_the_lowest_validation_loss() -> None:
    rows = eval_rows(_points(), teacher_loss=2.1)
    assert [r.step for r in rows] == [2, 4]
    first, second = rows
    assert (first.train_loss, first.kd, first.ce) == (3.0, 2.0, 4.0)
    assert first.agreement == 0.25 and first.val_kl == 0.7
    assert first.twin_ppl == pytest.approx(math.exp(2.9))
    # the twin closed 0 of its gap, the student (2.9 - 2.5) / (2.9 - 2.1) = 50 %
    assert first.gap_closed == pytest.approx(0.5) and first.gap_note == ""
    # the twin has not evaluated step 4 yet: blank, not a number and not "no gap"
    assert second.twin_ppl is None and second.gap_closed is None and second.gap_note == ""
    assert [r.best for r in rows] == [False, True]


def test_no_gap_and_no_teacher_are_said_not_shown_as_numbers() -> None:
    no_better = eval_rows(_points(), teacher_loss=3.0)[0]  # teacher worse than the twin
    assert no_better.gap_closed is None and no_better.gap_note == NO_GAP
    unknown = eval_rows(_points(), teacher_loss=None)[0]
    assert unknown.gap_closed is None and unknown.gap_note == NO_TEACHER
    text = eval_table_html(eval_rows(_points(), teacher_loss=3.0))
    assert f">{NO_GAP}</td></tr>" in text  # the last column: words, not a percentage
    assert eval_table_html([]) == ""


def test_the_table_html_has_every_column_and_stars_the_best_row() -> None:
    text = eval_table_html(eval_rows(_points(), teacher_loss=2.1))
    for header in ("step", "train loss", "KD", "CE", "val ppl", "agreement", "val KL"):
        assert f">{header}</th>" in text
    assert ">CE-only ppl</th>" in text and ">gap closed</th>" in text
    assert text.count("<tr") == 3  # header + two evaluations
    assert "4 ★" in text and text.count("data-best") == 1
    assert ">50%<" in text and ">25.0%<" in text  # gap closed, agreement


# --------------------------------------------------------------------- small helpers


def test_run_numbers_are_unique_in_the_process_and_stable_per_run() -> None:
    a, b = run_number("run-a-for-numbering"), run_number("run-b-for-numbering")
    assert a != b and run_number("run-a-for-numbering") == a


def test_memory_text_names_each_figure() -> None:
    text = memory_text(
        {
            "mem/rss_mb": 812.0,
            "mem/gpu0_used_mb": 3300.0,
            "mem/gpu0_total_mb": 81920.0,
            "mem/torch_allocated_mb": 1100.0,
            "mem/torch_reserved_mb": 1500.0,
            "mem/torch_max_allocated_mb": 1300.0,
        },
        estimate_mb=2048.0,
    )
    assert text == (
        "memory: process RSS 812 MB · GPU0 NVML used 3.22 GB of 80.00 GB · "
        "torch allocated 1.07 GB · torch reserved 1.46 GB · torch peak allocated 1.27 GB · "
        "preflight estimate 2.00 GB"
    )
    assert memory_text({}) == ""
    cpu = memory_text({"mem/rss_mb": 812.0}, estimate_mb=5.0, estimate_base_mb=790.0)
    assert cpu == "memory: process RSS 812 MB · preflight estimate 5 MB on top of 790 MB RSS"
    shared = memory_text({"mem/rss_mb": 812.0}, sharing=2)
    assert shared == "memory: process RSS 812 MB · process-wide: 2 live runs share this kernel"
    assert memory_text({}, sharing=2) == ""
    ranks = rank_figures({"rank/0/rss_mb": [900.0], "rank/1/rss_mb": [700.0]})
    assert memory_text({"mem/rss_mb": 812.0}, ranks=ranks) == (
        "memory: process RSS 812 MB · rank 0 RSS 900 MB · rank 1 RSS 700 MB"
    )


def test_fields_that_do_not_apply_are_greyed_and_come_back(runs_dir: Path) -> None:
    assert "loss.beta" in unused_fields({"loss": {"kind": "forward_kl"}})
    assert "loss.beta" not in unused_fields({"loss": {"kind": "jsd"}})
    assert "student.hidden_size" in unused_fields({"student": {"init": "pretrained"}})
    panel = DistillPanel(_quick(runs_dir))  # forward KL
    beta = panel.form.controls["loss.beta"]
    assert beta.input.disabled and "loss.kind=jsd" in beta.note.value
    assert "not used" in beta.input.tooltip
    assert not panel.form.controls["loss.kind"].input.disabled
    panel.form.set("loss.kind", "jsd")
    assert not beta.input.disabled and beta.note.value == "" and beta.unused == ""
    panel.form.set("loss.kind", "forward_kl")
    panel.form.set("loss.beta", 3.0)  # out of range: stays editable so it can be fixed
    assert beta.error.value and not beta.input.disabled


def test_a_disabled_start_says_why(runs_dir: Path) -> None:
    panel = DistillPanel(_quick(runs_dir))
    assert not panel.start_button.disabled and panel.start_reason.value == ""
    panel.form.set("loss.temperature", 0.0)
    assert panel.start_button.disabled
    assert panel.start_button.tooltip.startswith("fix: ")
    assert "loss.temperature" in panel.start_button.tooltip
    assert "Start is off: fix: " in panel.start_reason.value
    panel.form.set("loss.temperature", 1.0)
    assert not panel.start_button.disabled and panel.start_reason.value == ""


# --------------------------------------------------------------------- the panel, live


def _scripted(steps: int, every: int, *, hold: Any = None) -> Any:
    """A job emitting what the trainer and the job emit: phases, steps, evaluations (the
    twin's too), counts, the preflight's estimate; its summary holds the teacher's loss."""

    def job(config: Any, *, store: Any, run_id: str, ctx: Any, resume: bool = False) -> dict:
        ctx.emit("preflight", estimate_mb=300.0, device="cpu")
        for phase, prefix in (("distill", ""), ("baseline", "baseline/")):
            ctx.set_phase(phase, max_steps=steps)
            for step in range(1, steps + 1):
                ctx.check()
                loss = 4.0 / step + (0.5 if prefix else 0.0)
                train = {f"{prefix}train/loss": loss, f"{prefix}tokens_per_s": 100.0}
                if not prefix:
                    train.update({"train/kd": loss / 2, "train/ce": loss})
                ctx.emit("step", step=step, max_steps=steps, prefix=prefix, metrics=train)
                if hold is not None and step == steps // 2 and not prefix:
                    hold.wait(RUN_TIMEOUT_S)
                if step % every == 0:
                    ctx.advance(1, 1)
                    val = {"val/loss": loss, "val/ppl": math.exp(loss), "val/agreement": 0.3}
                    named = {f"{prefix}{k}": v for k, v in val.items()}
                    ctx.emit("step", step=step, max_steps=steps, prefix=prefix, metrics=named)
        ctx.set_phase("evaluate")
        return {"teacher": {"val_loss": 0.5}, "student": {"val_ppl": 2.0}}

    return job


def test_two_panels_label_their_runs_apart(runs_dir: Path) -> None:
    job = _scripted(2, 1)
    panels = [
        DistillPanel(_quick(runs_dir), start_fn=lambda c: foundry_kernel.start(c, job=job))
        for _ in range(2)
    ]
    for panel in panels:
        panel.start()
        assert panel.wait(RUN_TIMEOUT_S)
    labels = [panel.views[0].label for panel in panels]
    assert labels[0] != labels[1]  # both were "#1 tiny"
    assert [list(p.tabs.titles)[1] for p in panels] == labels
    for panel in panels:
        panel.close()


def test_the_panel_shows_progress_and_grows_the_table(runs_dir: Path) -> None:
    hold = threading.Event()
    job = _scripted(6, 2, hold=hold)
    panel = DistillPanel(_quick(runs_dir), start_fn=lambda c: foundry_kernel.start(c, job=job))
    handle = panel.start()
    view = panel.views[0]
    # parked at step 3 of 6; the updater thread draws it
    _wait_for(lambda: "3/6 steps" in view.status.value, RUN_TIMEOUT_S, "step 3/6 drawn")
    _wait_for(lambda: view.evals.value.count("<tr") == 2, 5, "the first evaluation drawn")
    live = view.status.value
    assert "running" in live and "distill" in live and "3/6 steps" in live and "&lt;" in live
    assert view.bar.layout.visibility == "visible" and view.bar.value == pytest.approx(0.5)
    assert "2 ★" in view.evals.value  # header + step 2, the best so far
    assert "a run is in progress" in panel.start_reason.value and panel.start_button.disabled
    hold.set()
    assert panel.wait(RUN_TIMEOUT_S) and handle.state is RunState.COMPLETED
    rows = view.eval_rows()
    assert [r.step for r in rows] == [2, 4, 6]
    assert all(r.twin_ppl is not None for r in rows)
    # teacher 0.5, twin 4/6 + 0.5, student 4/6: closed (twin - student) / (twin - teacher)
    assert rows[-1].gap_closed == pytest.approx(0.5 / (4 / 6)) and rows[-1].best
    assert "6 ★" in view.evals.value and "%" in view.evals.value
    assert 'data-state="completed"' in view.status.value and "step 6/6" in view.status.value
    assert view.bar.value == 1.0 and view.bar.bar_style == "success"
    # the preflight estimate, dashed: on a CPU run on top of the RSS it was made at (the
    # estimate counts tensors; the RSS holds the interpreter and libraries besides)
    base = view.estimate_base_mb
    assert base is not None and base > 50  # a Python process with torch loaded
    shapes = view.charts.figures["memory"].layout.shapes
    assert [s.y0 for s in shapes] == [pytest.approx(300.0 + base)]
    notes = [a.text for a in view.charts.figures["memory"].layout.annotations]
    assert notes == ["RSS at preflight + estimate (cpu)"], notes
    expected = memory_text({}, 300.0, estimate_base_mb=base).removeprefix("memory: ")
    assert expected.startswith("preflight estimate 300 MB on top of ") and expected.endswith(" RSS")
    assert expected in view.memory.value
    assert panel.start_reason.value == ""
    panel.close()


def test_a_real_run_fills_the_table_with_the_twin_and_the_gap(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    """The trainer's own metric names reach every column (a renamed metric would leave a
    column blank here)."""
    config = tiny_config_dict(
        runs_dir,
        eval={"baseline": True, "every_steps": 2, "max_batches": 1, "teacher_check": False},
        limits={"max_steps": 4},
        checkpoint={"every_steps": None},
    )
    panel = DistillPanel(config)
    handle = panel.start()
    assert panel.wait(RUN_TIMEOUT_S) and handle.state is RunState.COMPLETED, handle.error
    view = panel.views[0]
    rows = view.eval_rows()
    assert [r.step for r in rows] == [2, 4]
    for row in rows:
        assert None not in (row.train_loss, row.kd, row.ce, row.val_ppl, row.agreement)
        assert row.val_kl is not None and row.twin_ppl is not None
        assert row.gap_closed is not None or row.gap_note == NO_GAP
    assert sum(r.best for r in rows) == 1
    assert view.evals.value.count("<tr") == 3
    assert view.estimate_mb is not None and view.estimate_mb > 0
    assert "process RSS" in view.memory.value and "preflight estimate" in view.memory.value
    assert "step 4/4" in view.status.value
    panel.close()
