"""One owner per run, proved with real processes (penetration test, issue 15, items 5 and 9).

Every test here starts real ``foundry distill`` processes (argument lists, never a shell)
on the tiny built-in teacher, and checks what a second process sees: a live run is
refused naming its owner, a ``kill -9`` frees the run (the OS lock dies with its process)
and the next writable open of the store marks it failed, two simultaneous resumes let
exactly one through, and a refused resume (completed run, incompatible override) leaves
the store row and every file of the run folder byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import recorded_steps, tiny_config_dict, wait_for_step

from foundry_kernel import load_config, run_sync, start
from foundry_kernel._run_lock import (
    LOCK_FILENAME,
    RESERVED_BYTES,
    RunConflictError,
    RunLockedError,
    read_owner,
)
from foundry_kernel.store import RunStore

FOUNDRY = [sys.executable, "-m", "foundry_kernel.cli"]
HOST = socket.gethostname()


def _foundry(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOUNDRY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _popen(*args: str, log: Path) -> subprocess.Popen[str]:
    """A CLI process whose output goes to a file (a full pipe would stall it)."""
    handle = log.open("w")
    try:
        return subprocess.Popen([*FOUNDRY, *args], stdout=handle, stderr=subprocess.STDOUT)
    finally:
        handle.close()


def _long_config(tmp_path: Path, runs_dir: Path, max_steps: int = 100_000) -> Path:
    cfg = tiny_config_dict(
        runs_dir,
        limits={"max_steps": max_steps},
        checkpoint={"every_steps": 5},
        eval={"baseline": False, "every_steps": 100_000},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(runs_dir: Path, run_id: str) -> dict[str, Any]:
    """The run's row, events and metrics, and the bytes and mtime of every file it has."""
    with RunStore(runs_dir, read_only=True) as store:
        record = store.get_run(run_id)
        events = [(e.kind, e.message, e.step) for e in store.events(run_id)]
        metrics = [(m.name, m.step, m.time) for m in store.metrics(run_id)]
    files = {
        str(p.relative_to(runs_dir)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted((runs_dir / run_id).rglob("*"))
        if p.is_file()
    }
    return {"record": record, "events": events, "metrics": metrics, "files": files}


def _stopped_run(runs_dir: Path, *, complete: bool) -> str:
    """A real pipeline run in this process: completed, or cancelled after a few steps."""
    steps = 6 if complete else 100_000
    cfg = load_config(
        tiny_config_dict(runs_dir, limits={"max_steps": steps}, eval={"baseline": False})
    )
    if complete:
        handle = run_sync(cfg)
        assert str(handle.state) == "completed", handle.error
        return handle.id
    handle = start(cfg)
    deadline = time.monotonic() + 120
    while (handle.step or 0) < 6 and time.monotonic() < deadline and not handle.done:
        time.sleep(0.05)
    handle.cancel()
    assert str(handle.wait(60)) == "cancelled", handle.error
    assert handle.join(10)
    return handle.id


def test_resume_of_a_live_run_is_refused_naming_its_owner_and_kill_9_frees_it(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    """Item 5 (live run elsewhere) and item 9 (stale ``running`` without a full disk)."""
    runs_dir = tmp_path / "runs"
    config = _long_config(tmp_path, runs_dir)
    child = _popen("distill", "--config", str(config), log=tmp_path / "a.log")
    try:
        run_id = wait_for_step(runs_dir, minimum=10)
        owner = read_owner(runs_dir / run_id)
        assert owner is not None and (owner.pid, owner.host) == (child.pid, HOST)

        t0 = time.monotonic()
        second = _foundry("distill", "--resume", run_id, "--runs-dir", str(runs_dir))
        cli_s = time.monotonic() - t0
        at_refusal = max(recorded_steps(runs_dir, run_id))
        # the same refusal from this (also a second) process, timed without CLI start-up
        with RunStore(runs_dir) as store:
            t0 = time.monotonic()
            with pytest.raises(RunLockedError, match=f"live in process {child.pid}@") as info:
                start(resume=run_id, store=store)
            refuse_ms = (time.monotonic() - t0) * 1000
        assert info.value.owner is not None and info.value.owner.pid == child.pid
        assert second.returncode == 2, second.stderr
        assert f"live in process {child.pid}@{HOST}" in second.stderr
        assert "Traceback" not in second.stderr
        # the owner was not disturbed: still running, still training, same state row
        deadline = time.monotonic() + 60
        while (
            max(recorded_steps(runs_dir, run_id)) < at_refusal + 5 and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert child.poll() is None
        assert max(recorded_steps(runs_dir, run_id)) >= at_refusal + 5
        with RunStore(runs_dir, read_only=True) as store:
            record = store.get_run(run_id)
        assert (record.state, record.error) == ("running", None)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

    t0 = time.monotonic()
    with RunStore(runs_dir) as store:  # a writable open settles the run nobody runs
        settle_s = time.monotonic() - t0
        record = store.get_run(run_id)
    assert record.state == "failed"
    assert record.error is not None
    assert "ended without recording a final state" in record.error
    assert f"(pid {child.pid}@{HOST})" in record.error
    killed_at = max(recorded_steps(runs_dir, run_id))

    finish = killed_at + 5
    t0 = time.monotonic()
    third = _foundry(
        "distill", "--resume", run_id, "--runs-dir", str(runs_dir),
        "--set", f"limits.max_steps={finish}", "--json",
    )  # fmt: skip
    resume_s = time.monotonic() - t0
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout.strip().splitlines()[-1])["run_id"] == run_id
    with RunStore(runs_dir, read_only=True) as store:
        record = store.get_run(run_id)
        kinds = [e.kind for e in store.events(run_id)]
    assert (record.state, record.error) == ("completed", None)
    assert recorded_steps(runs_dir, run_id) == list(range(1, finish + 1))
    assert kinds[-3:] == ["failed", "resume", "completed"]
    print(
        f"refused a resume of a live run in {refuse_ms:.1f} ms (CLI: {cli_s:.1f} s with "
        "start-up); "
        f"settled after kill -9 in {settle_s * 1000:.0f} ms; resumed to step {finish} in "
        f"{resume_s:.1f} s"
    )


def test_two_simultaneous_resumes_exactly_one_proceeds(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    runs_dir = tmp_path / "runs"
    run_id = _stopped_run(runs_dir, complete=False)
    finish = max(recorded_steps(runs_dir, run_id)) + 150  # long enough for the two to overlap
    args = ("distill", "--resume", run_id, "--runs-dir", str(runs_dir))
    limit = f"limits.max_steps={finish}"
    procs = [_popen(*args, "--set", limit, log=tmp_path / f"r{i}.log") for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    logs = [(tmp_path / f"r{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = logs[loser]
    # Refused while the winner trained (naming it), or - if it started that late - because
    # the winner had already completed the run; never a second owner.
    assert f"live in process {procs[winner].pid}@{HOST}" in refusal or "is completed" in refusal
    assert "Traceback" not in refusal
    with RunStore(runs_dir, read_only=True) as store:
        record = store.get_run(run_id)
        kinds = [e.kind for e in store.events(run_id)]
    assert record.state == "completed"
    assert recorded_steps(runs_dir, run_id) == list(range(1, finish + 1))
    assert kinds.count("resume") == 1 and kinds.count("completed") == 1
    print("loser's refusal:", refusal.strip().splitlines()[-1])


def test_resume_of_a_completed_run_is_refused_and_changes_nothing(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    runs_dir = tmp_path / "runs"
    run_id = _stopped_run(runs_dir, complete=True)
    before = _snapshot(runs_dir, run_id)
    proc = _foundry("distill", "--resume", run_id, "--runs-dir", str(runs_dir))
    assert proc.returncode == 2, proc.stderr
    assert f"run {run_id} is completed" in proc.stderr
    assert "Start a new run" in proc.stderr
    assert "Traceback" not in proc.stderr
    for overrides in (["student.hidden_size=32"], ["limits.max_steps=50"]):  # in-process too
        with RunStore(runs_dir) as store, pytest.raises(RunConflictError, match="is completed"):
            start(resume=run_id, store=store, overrides=overrides)
    assert _snapshot(runs_dir, run_id) == before


def test_incompatible_resume_override_is_refused_before_anything_is_touched(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    runs_dir = tmp_path / "runs"
    run_id = _stopped_run(runs_dir, complete=False)
    before = _snapshot(runs_dir, run_id)
    assert before["record"].state == "cancelled"
    proc = _foundry(
        "distill", "--resume", run_id, "--runs-dir", str(runs_dir),
        "--set", "student.hidden_size=32", "--set", "loss.temperature=3",
        "--set", "limits.max_steps=50",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "2 field(s) differ" in proc.stderr
    assert "student.hidden_size: stored 16, given 32" in proc.stderr
    assert "loss.temperature: stored 1.0, given 3.0" in proc.stderr
    assert "limits.max_steps: stored" not in proc.stderr  # allowed to change
    assert "Traceback" not in proc.stderr
    assert _snapshot(runs_dir, run_id) == before


def test_lock_file_names_its_owner_and_keeps_room_for_the_final_state(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    runs_dir = tmp_path / "runs"
    run_id = _stopped_run(runs_dir, complete=True)
    lock = runs_dir / run_id / LOCK_FILENAME
    assert lock.stat().st_size == RESERVED_BYTES
    owner = read_owner(runs_dir / run_id)
    assert owner is not None
    assert (owner.pid, owner.host, owner.run_id) == (os.getpid(), HOST, run_id)
    assert owner.released_at is not None and owner.released_at >= owner.started_at


@pytest.fixture(autouse=True)
def _no_stray_children() -> Any:
    import psutil

    yield
    assert psutil.Process().children(recursive=True) == []
