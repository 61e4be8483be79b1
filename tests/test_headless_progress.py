"""Progress in headless output: ``foundry run`` on stderr while its notebook runs, and the
lines a headless notebook prints while it waits for its run.

Both print the one progress line (``foundry_kernel.progress``) through ``progress_lines``:
a line per phase change and at most one per interval, never the same line twice. The
line generation is checked on synthetic snapshots (the real tracker fed timed events, no
sleeping); real tiny runs check the teacher's completions are counted, the notebook's
wait, and that ``foundry run`` prints progress while a real papermill kernel runs the
shipped notebook. (The capture's count: tests/test_logit_cache.py.)
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config_dict

from foundry_kernel.progress import (
    PROGRESS_FILE,
    Progress,
    ProgressTracker,
    RunPlan,
    format_progress,
    poll_progress,
    progress_lines,
    read_progress,
)

PLAN = RunPlan(max_steps=200, eval_every=100, baseline=True)
PHASES = (
    "teacher",
    "teacher_build",
    "teacher_check",
    "data",
    "student",
    "capture",
    "distill",
    "baseline",
    "evaluate",
    "export",
)


def _assert_no_repeats(lines: list[str]) -> None:
    repeats = [a for a, b in itertools.pairwise(lines) if a == b]
    assert not repeats, repeats


def _step_event(step: int, prefix: str, loss: float) -> dict[str, Any]:
    metrics = {f"{prefix}train/loss": loss, f"{prefix}tokens_per_s": 1000.0}
    return {"step": step, "max_steps": 200, "prefix": prefix, "metrics": metrics}


def _simulated_run() -> list[tuple[Progress, float]]:
    """A run as a headless notebook polls it (one snapshot a second): 200 distill steps
    with a loss, 200 baseline steps, then the final evaluation, whose last part (samples,
    speed) sends no events for three minutes - where 17 identical lines were printed."""
    events: list[tuple[float, str, dict[str, Any]]] = [
        (0.0, "phase", {"phase": "distill", "max_steps": 200})
    ]
    events += [(s * 0.5, "step", _step_event(s, "", 2.5 + 1 / s)) for s in range(1, 201)]
    events.append((100.5, "phase", {"phase": "baseline", "max_steps": 200}))
    events += [
        (100.5 + s * 0.5, "step", _step_event(s, "baseline/", 3.0 + 1 / s)) for s in range(1, 201)
    ]
    events += [(201.0, "phase", {"phase": "evaluate"}), (201.0, "stage", {"stage": "student"})]
    events += [
        (201.0 + b, "count", {"done": b, "total": 17, "unit": "batches"}) for b in range(1, 18)
    ]
    t = ProgressTracker("r", PLAN)
    t.set_state("running", 0.0)
    snaps, pending = [], iter(events)
    upcoming = next(pending, None)
    for now in range(400):
        while upcoming is not None and upcoming[0] <= now:
            t.observe(upcoming[1], upcoming[2], upcoming[0])
            upcoming = next(pending, None)
        snaps.append((t.snapshot(float(now)), float(now)))
    return snaps


def test_headless_lines_tell_the_phase_and_never_repeat() -> None:
    lines = list(progress_lines(_simulated_run(), every_s=10.0))
    _assert_no_repeats(lines)
    assert not [line for line in lines if "loss" in line]  # progress, not the last loss
    baseline = [line for line in lines if line.startswith("baseline")]
    assert baseline and all(re.match(r"baseline · \d+/200 steps", x) for x in baseline[1:])
    counted = [int(m.group(1)) for x in baseline if (m := re.match(r"baseline · (\d+)/", x))]
    assert counted == sorted(counted) and counted[-1] > 150  # baseline steps, rising
    evaluating = [line for line in lines if line.startswith("evaluate")]
    assert any(re.search(r"evaluate/student · \d+/17 batches", x) for x in evaluating)
    last_count = max(i for i, x in enumerate(evaluating) if "batches" in x)
    quiet = evaluating[last_count + 1 :]  # ~3 minutes with no news: a line a minute at most
    assert 1 <= len(quiet) <= 4, quiet
    assert len(lines) < 60  # 400 polls, a line per phase change and at most every 10 s


def test_a_stale_progress_file_carries_its_clock_but_prints_no_copies(tmp_path: Path) -> None:
    p = Progress(run_id="r", state="running", phase="evaluate", stage="student", elapsed_s=5.0)
    path = tmp_path / PROGRESS_FILE
    path.write_text(json.dumps(p.to_dict()), encoding="utf-8")
    written = path.stat().st_mtime
    aged = read_progress(tmp_path, now=written + 30)
    assert aged is not None and aged.elapsed_s == pytest.approx(35.0)
    assert read_progress(tmp_path) == p  # without a clock: as written
    # the file does not change for 3 minutes: a line when the watch starts and a
    # heartbeat a minute at most, never the same text twice
    snaps = [(read_progress(tmp_path, now=written + s), written + s) for s in range(180)]
    lines = list(progress_lines([(s, t) for s, t in snaps if s is not None], every_s=10.0))
    assert 1 <= len(lines) <= 4, lines
    _assert_no_repeats(lines)
    done = Progress(run_id="r", state="completed", phase="completed", elapsed_s=9.0)
    path.write_text(json.dumps(done.to_dict()), encoding="utf-8")
    finished = read_progress(tmp_path, now=written + 500)
    assert finished is not None and finished.elapsed_s == 9.0  # an ended run's time stays
    assert list(progress_lines([(finished, 0.0)])) == []  # the waiter says how it ended


def test_polling_ends_when_the_wait_says_so() -> None:
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return len(waits) == 3

    p = Progress(run_id="r", state="running", phase="distill")
    got = list(poll_progress(lambda: p, wait, poll_s=0.25, clock=lambda: 7.0))
    assert got == [(p, 7.0)] * 3 and waits == [0.25] * 3
    assert list(poll_progress(lambda: None, lambda _s: True)) == []  # no file yet


def test_the_teachers_completions_are_counted(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    """Sequence mode: the teacher writes completions before training; ``n/N prompts``."""
    import foundry_kernel as fk

    tiny_config["distill"] = {
        "mode": "sequence",
        "sequence": {"num_prompts": 32, "prompt_tokens": 8, "max_new_tokens": 8},
    }
    tiny_config["eval"]["baseline"] = False
    handle = fk.start(tiny_config)
    snaps: list[Progress] = []
    handle.subscribe(lambda _e: snaps.append(handle.progress))
    assert handle.wait(300) is fk.RunState.COMPLETED, handle.error
    writing = [s for s in snaps if s.phase == "sequence" and s.done is not None]
    assert writing and {s.unit for s in writing} == {"prompts"}
    assert all(re.match(r"sequence · \d+/\d+ prompts", format_progress(s)) for s in writing)
    total = writing[0].total
    assert total is not None and 16 < total <= 32  # two batches of the teacher's prompts


def test_the_headless_wait_prints_phases_not_losses(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import foundry_kernel as fk
    from widgets.display import _wait_with_progress

    tiny_config["limits"]["max_steps"] = 12
    handle = fk.start(tiny_config)
    _wait_with_progress(handle, 300.0, every_s=10.0, poll_s=0.02)
    assert handle.state is fk.RunState.COMPLETED, handle.error
    out = capsys.readouterr().out.splitlines()
    lines = [x.strip() for x in out if x.startswith("  ")]
    _assert_no_repeats(lines)
    assert out[-1].startswith(f"run {handle.id} completed in ")
    phases = {line.split(" · ")[0].split("/")[0] for line in lines}
    assert {"distill", "baseline", "evaluate"} <= phases, lines
    loss = handle.metrics["train/loss"]  # the last distillation loss, as printed before
    assert not [x for x in lines if f"{loss:.4f}" in x or "loss" in x], lines
    baseline = [x for x in lines if x.startswith("baseline · ")]
    assert any(re.match(r"baseline · \d+/12 steps", x) for x in baseline), lines


def test_foundry_run_prints_its_notebooks_progress(
    tmp_path: Path,
    runs_dir: Path,
    tiny_teacher_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("papermill")
    from widgets import runner
    from widgets.resources import shipped_notebook

    cfg = tiny_config_dict(Path("unused"), checkpoint={"every_steps": None})
    cfg.pop("runs_dir")
    cfg["limits"].pop("max_steps")
    overrides = {
        f"{section}.{key}": value
        for section, values in cfg.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }
    overrides.update({k: v for k, v in cfg.items() if not isinstance(v, dict)})
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"config_overrides": overrides}), encoding="utf-8")
    monkeypatch.setattr(runner, "PROGRESS_POLL_S", 0.1)
    argv = [str(shipped_notebook("distill")), "-f", str(params), "-p", "max_steps", "60"]
    t0 = time.monotonic()
    code = runner.main([*argv, "--runs-dir", str(runs_dir), "--timeout", "300"])
    err = capsys.readouterr().err.splitlines()
    assert code == 0, "\n".join(err)
    assert time.monotonic() - t0 < 300
    tag = "foundry run: [1/1] "
    progress = [x.removeprefix(tag) for x in err if x.startswith(tag)]
    lines = [x for x in progress if x.split(" · ")[0].split("/")[0] in PHASES]
    assert lines, err
    _assert_no_repeats(lines)
    assert any(re.match(r"(distill|baseline) · \d+/60 steps", x) for x in lines), lines
    ok = next(i for i, x in enumerate(err) if re.search(r"\[1/1\] \S+: ok \(", x))
    # the thread stopped with papermill: none of its lines after the member's outcome
    assert not [x for x in err[ok + 1 :] if x.startswith("foundry run: [1/1] ")], err
