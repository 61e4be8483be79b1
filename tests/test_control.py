"""Tests for foundry_kernel.run._control: the run controller's guarantees.

The jobs here are small *real* training loops (torch matmuls, backward, SGD) that use
the RunContext the way pipeline.run_job does: ``ctx.check()`` between batches,
``ctx.heartbeat()`` per step, ``ctx.emit("step", ...)`` and store metrics. What is under
test is the controller's logic - threads, states, limits, cleanup - with nothing mocked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from foundry_kernel._context import Event, RunContext
from foundry_kernel.config import RunConfig, load_config
from foundry_kernel.errors import ConfigError, DivergenceError, StoreError
from foundry_kernel.run import _control as control
from foundry_kernel.store import RunStore

REPO = Path(__file__).resolve().parents[1]
S = control.RunState


# --------------------------------------------------------------------------- real jobs


def train_job(
    *,
    steps: int = 20,
    pad_s: float = 0.01,
    width: int = 32,
    on_step: Callable[[int, RunContext], None] | None = None,
    marker: float = 0.0,
) -> control.JobFn:
    """A tiny linear-regression training loop; ``pad_s`` stretches each step."""

    def job(
        config: RunConfig, *, store: RunStore, run_id: str, ctx: RunContext, resume: bool = False
    ) -> dict[str, Any]:
        torch.manual_seed(int(marker))
        w_true = torch.randn(width, 1)
        w = torch.zeros(width, 1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.05)
        first = _last_step(store, run_id) if resume else 0
        ctx.set_phase("train", max_steps=steps)
        loss = torch.tensor(0.0)
        for step in range(first + 1, steps + 1):
            for _ in range(2):  # two micro-batches, a check between them
                ctx.check()
                x = torch.randn(64, width)
                loss = ((x @ w - x @ w_true) ** 2).mean()
                loss.backward()
                loss = loss.detach()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step(step, ctx)
            time.sleep(pad_s)
            store.log_metrics(run_id, step, {"train/loss": float(loss), "marker": marker})
            ctx.heartbeat()
            ctx.emit("step", step=step, max_steps=steps, loss=float(loss), marker=marker)
        return {"final_loss": float(loss), "steps": steps, "marker": marker, "resumed": resume}

    return job


def compute_job(step_s: float = 0.08, steps: int = 10_000) -> control.JobFn:
    """Compute-bound steps (matmuls for ~step_s), for an honest cancel latency."""

    def job(
        config: RunConfig, *, store: RunStore, run_id: str, ctx: RunContext, resume: bool = False
    ) -> dict[str, Any]:
        a = torch.randn(192, 192)
        for step in range(1, steps + 1):
            ctx.check()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < step_s:
                a = torch.tanh(a @ a.T / 192)
            ctx.heartbeat()
            ctx.emit("step", step=step, max_steps=steps, loss=float(a.mean()))
        return {}

    return job


def _last_step(store: RunStore, run_id: str) -> int:
    rows = store.metrics(run_id, ["train/loss"])
    return rows[-1].step if rows else 0


def _cfg(tmp_path: Path, **overrides: Any) -> RunConfig:
    return load_config(None, {"runs_dir": str(tmp_path), "device": "cpu", **overrides})


def _wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def _record(tmp_path: Path, run_id: str) -> tuple[Any, list[Any], list[Any]]:
    with RunStore(tmp_path, read_only=True) as store:
        return store.get_run(run_id), store.events(run_id), store.metrics(run_id)


def _failure(handle: control.RunHandle) -> control.RunFailure:
    assert handle.error is not None, handle
    return handle.error


def _foundry_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("foundry-")]


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.fixture(autouse=True)
def _no_leftover_runs() -> Iterator[None]:
    """Every test must leave no live run and no Foundry thread behind."""
    yield
    for handle in control.list_runs(live_only=True):
        handle.cancel()
        handle.wait(10)
    assert _wait_until(lambda: not _foundry_threads(), 10), _foundry_threads()


# --------------------------------------------------------------------------- state machine


def test_transition_table_is_explicit_and_enforced() -> None:
    for state in (S.CANCELLED, S.COMPLETED, S.FAILED, S.TIMED_OUT):
        assert state.terminal
        for other in S:
            with pytest.raises(control.InvalidTransition):
                control.check_transition(state, other)
    control.check_transition(S.PENDING, S.RUNNING)
    control.check_transition(S.CANCELLING, S.COMPLETED)
    with pytest.raises(control.InvalidTransition, match="running to pending"):
        control.check_transition(S.RUNNING, S.PENDING)
    assert str(S.TIMED_OUT) == "timed_out" == f"{S.TIMED_OUT}"
    assert S.COMPLETED == "completed"


# --------------------------------------------------------------------------- basics


def test_start_returns_at_once_and_the_run_completes_in_the_background(tmp_path: Path) -> None:
    t0 = time.monotonic()
    handle = control.start(
        _cfg(tmp_path), job=train_job(steps=30, pad_s=0.02), sample_interval_s=0.05
    )
    started_in = time.monotonic() - t0
    assert started_in < 0.5, started_in
    assert handle.state in (S.PENDING, S.RUNNING)
    assert control.get(handle.id) is handle
    assert handle in control.list_runs(live_only=True)
    assert handle.wait(20) is S.COMPLETED
    assert handle.result == {
        "final_loss": pytest.approx(handle.metrics["loss"]),
        "steps": 30,
        "marker": 0.0,
        "resumed": False,
    }
    assert handle.error is None
    assert handle.step == handle.max_steps == 30
    losses = handle.history("loss")
    assert [s for s, _ in losses] == list(range(1, 31))
    assert losses[-1][1] < losses[0][1]  # it really trained
    record, events, metrics = _record(tmp_path, handle.id)
    assert record.state == "completed"
    assert record.error is None
    assert record.started_at is not None
    assert record.ended_at is not None
    assert events[-1].kind == "completed"
    mem = [m for m in metrics if m.name == "mem/rss_mb"]
    assert len(mem) >= 3
    assert [m.step for m in mem] == list(range(len(mem)))
    assert handle.metrics["mem/rss_mb"] > 0
    assert (tmp_path / handle.id / "run.log").read_text().count("completed") >= 1
    assert handle not in control.list_runs(live_only=True)


def test_bad_config_raises_at_start_without_a_thread(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.batch_size"):
        control.start({"runs_dir": str(tmp_path), "optim": {"batch_size": 0}}, job=train_job())
    assert _foundry_threads() == []


def test_cancel_lands_within_one_step(tmp_path: Path) -> None:
    step_s = 0.08
    handle = control.start(_cfg(tmp_path), job=compute_job(step_s), sample_interval_s=None)
    assert _wait_until(lambda: (handle.step or 0) >= 3)
    at_cancel = handle.step
    t0 = time.monotonic()
    assert handle.cancel() is True
    assert handle.state is S.CANCELLING
    assert handle.cancel() is False  # idempotent
    assert handle.wait(5) is S.CANCELLED
    latency = time.monotonic() - t0
    assert at_cancel is not None
    assert handle.step is not None
    assert handle.step - at_cancel <= 1, (at_cancel, handle.step)
    assert latency < step_s * 1.5 + 0.1, latency
    assert handle.error is not None
    assert "cancelled" in _failure(handle).message
    record, events, _ = _record(tmp_path, handle.id)
    assert record.state == "cancelled"
    assert "stopped after step" in record.error
    assert events[-1].kind == "cancelled"
    print(f"cancel latency {latency * 1000:.0f} ms with {step_s * 1000:.0f} ms steps")


def test_cancel_right_after_start_ends_cancelled(tmp_path: Path) -> None:
    handle = control.start(_cfg(tmp_path), job=train_job(), sample_interval_s=None)
    handle.cancel()
    assert handle.wait(5) is S.CANCELLED
    assert handle.cancel() is False
    assert _record(tmp_path, handle.id)[0].state == "cancelled"


def test_whole_run_timeout_ends_timed_out(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"limits.timeout_s": 0.6})
    t0 = time.monotonic()
    handle = control.start(cfg, job=train_job(steps=10_000, pad_s=0.02), sample_interval_s=None)
    assert handle.wait(10) is S.TIMED_OUT
    assert 0.6 <= time.monotonic() - t0 < 2.0
    assert handle.error is not None
    assert "limits.timeout_s=0.6" in _failure(handle).message
    record, events, _ = _record(tmp_path, handle.id)
    assert record.state == "timed_out"
    assert "limits.timeout_s" in record.error
    assert events[-1].kind == "timed_out"


def test_timeout_is_enforced_even_when_the_job_never_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "TIMEOUT_GRACE_S", 0.3)
    release = threading.Event()

    def stuck(
        config: RunConfig, *, store: RunStore, run_id: str, ctx: RunContext, resume: bool = False
    ) -> dict[str, Any]:
        while not release.wait(0.02):
            torch.ones(8) @ torch.ones(8)
            ctx.heartbeat()  # alive, but never reaching a check()
        ctx.check()
        return {}

    handle = control.start(
        _cfg(tmp_path, **{"limits.timeout_s": 0.4}), job=stuck, sample_interval_s=None
    )
    assert handle.wait(5) is S.TIMED_OUT
    assert "did not stop within" in _failure(handle).message
    release.set()
    assert handle.join(5)
    _, events, _ = _record(tmp_path, handle.id)
    assert events[-1].kind == "log"
    assert "after the run was declared timed_out" in events[-1].message


def test_step_watchdog_fails_a_hung_step_and_the_thread_still_ends(tmp_path: Path) -> None:
    release = threading.Event()

    def hang_at_4(step: int, ctx: RunContext) -> None:
        if step == 4:
            release.wait(10)  # a step that hangs (a deadlock, a stuck collective...)

    cfg = _cfg(tmp_path, **{"limits.step_timeout_s": 0.4})
    handle = control.start(cfg, job=train_job(steps=50, on_step=hang_at_4), sample_interval_s=0.05)
    t0 = time.monotonic()
    assert handle.wait(5) is S.FAILED
    assert time.monotonic() - t0 < 2.0
    msg = _failure(handle).message
    assert "limits.step_timeout_s=0.4" in msg
    assert "after step 3" in msg
    assert "'train'" in msg
    record, _, _ = _record(tmp_path, handle.id)
    assert record.state == "failed"
    assert "step_timeout_s" in record.error
    assert "foundry-sampler-" + handle.id not in _foundry_threads()  # sampler stopped
    with RunStore(tmp_path) as store, pytest.raises(control.RunConflictError, match="stuck"):
        control.start(resume=handle.id, store=store, job=train_job())  # not while it hangs
    release.set()  # the step returns; the job's next check() stops it
    assert handle.join(5)
    assert handle.state is S.FAILED  # a late exit does not rewrite the verdict
    assert handle.step == 4  # the hung step did finish, then check() stopped the job


def test_heartbeats_keep_a_slow_run_alive(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"limits.step_timeout_s": 0.5})
    handle = control.start(cfg, job=train_job(steps=12, pad_s=0.1), sample_interval_s=None)
    assert handle.wait(10) is S.COMPLETED  # 1.2 s in total, but every step < 0.5 s


# --------------------------------------------------------------------------- failures


class _Holder:
    """Something big-ish the job's frame holds; it must be freed after a failure."""

    def __init__(self) -> None:
        self.tensor = torch.ones(1024, 1024)


def _failing_job(make_exc: Callable[[], BaseException], refs: list[Any]) -> control.JobFn:
    def job(
        config: RunConfig, *, store: RunStore, run_id: str, ctx: RunContext, resume: bool = False
    ) -> dict[str, Any]:
        holder = _Holder()
        refs.append(weakref.ref(holder))
        ctx.emit("step", step=1, max_steps=5, loss=1.0)
        raise make_exc()

    return job


def _cpu_oom() -> BaseException:
    try:
        torch.empty(1 << 46, dtype=torch.float32)  # 256 TiB: the allocator refuses
    except RuntimeError as exc:
        return exc
    raise AssertionError("the allocation unexpectedly succeeded")


def _python_oom() -> BaseException:
    try:
        bytearray(1 << 62)
    except MemoryError as exc:
        return exc
    raise AssertionError("the allocation unexpectedly succeeded")


@pytest.mark.parametrize(
    "make_exc",
    [
        _cpu_oom,
        _python_oom,
        # No GPU here: construct CUDA's error as the CUDA allocator would raise it.
        lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
    ids=["torch-cpu-allocator", "MemoryError", "torch.cuda.OutOfMemoryError"],
)
def test_out_of_memory_fails_with_fixes_and_frees_the_job(
    tmp_path: Path, make_exc: Callable[[], BaseException]
) -> None:
    refs: list[Any] = []
    handle = control.start(_cfg(tmp_path), job=_failing_job(make_exc, refs), sample_interval_s=None)
    assert handle.wait(5) is S.FAILED
    msg = _failure(handle).message
    assert msg.startswith("out of")
    for fix in (
        "optim.batch_size",
        "data.seq_len",
        "optim.gradient_checkpointing",
        "optim.precision",
    ):
        assert fix in msg
    assert _failure(handle).exception is not None
    assert _failure(handle).traceback
    assert refs[0]() is None  # the job's frame (and its tensors) were released
    assert _record(tmp_path, handle.id)[0].error == msg


def test_divergence_fails_with_step_and_component_and_alerts_are_stored(tmp_path: Path) -> None:
    def diverge(step: int, ctx: RunContext) -> None:
        if step == 5:
            ctx.emit(
                "alert",
                level="warning",
                step=5,
                component="kd loss",
                message="non-finite kd loss at step 5",
            )
            raise DivergenceError("training diverged", step=5, component="kd loss")

    handle = control.start(_cfg(tmp_path), job=train_job(on_step=diverge), sample_interval_s=None)
    assert handle.wait(5) is S.FAILED
    assert "step 5" in _failure(handle).message
    assert "kd loss" in _failure(handle).message
    assert isinstance(_failure(handle).exception, DivergenceError)
    _, events, _ = _record(tmp_path, handle.id)
    assert [(e.kind, e.step) for e in events] == [("alert", 5), ("failed", 4)]


# SystemExit is re-raised in the worker after its state is recorded; pytest reports that.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_unexpected_errors_and_system_exit_become_failed(tmp_path: Path) -> None:
    def boom(step: int, ctx: RunContext) -> None:
        if step == 2:
            raise KeyError("missing")

    a = control.start(_cfg(tmp_path), job=train_job(on_step=boom), sample_interval_s=None)

    def leave(step: int, ctx: RunContext) -> None:
        sys.exit(3)

    b = control.start(_cfg(tmp_path), job=train_job(on_step=leave), sample_interval_s=None)
    assert a.wait(5) is S.FAILED
    assert _failure(a).message == "KeyError: 'missing'"
    assert b.wait(5) is S.FAILED
    assert _failure(b).message == "SystemExit: 3"
    assert b.join(5)  # SystemExit was re-raised in its thread and ended only that thread


# --------------------------------------------------------------------------- many runs


def test_ten_concurrent_runs_keep_separate_state_and_one_failure_is_contained(
    tmp_path: Path,
) -> None:
    def fail_at_3(step: int, ctx: RunContext) -> None:
        if step == 3:
            raise ValueError("bad batch in run 4")

    handles = []
    for i in range(12):
        job = train_job(
            steps=8 + i, pad_s=0.01, marker=float(i), on_step=fail_at_3 if i == 4 else None
        )
        handles.append(control.start(_cfg(tmp_path), job=job, sample_interval_s=0.2))
    assert len({h.id for h in handles}) == 12
    states = [h.wait(30) for h in handles]
    assert states == [S.FAILED if i == 4 else S.COMPLETED for i in range(12)]
    assert _failure(handles[4]).message == "ValueError: bad batch in run 4"
    with RunStore(tmp_path, read_only=True) as store:
        for i, handle in enumerate(handles):
            expected_steps = 2 if i == 4 else 8 + i
            assert handle.step == expected_steps
            assert handle.metrics["marker"] == float(i)
            rows = store.metrics(handle.id, ["marker"])
            assert [r.step for r in rows] == list(range(1, expected_steps + 1))
            assert {r.value for r in rows} == {float(i)}
            assert store.get_run(handle.id).state == str(states[i])


# --------------------------------------------------------------------------- events


def test_subscribers_poll_and_events_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str]] = []
    bad_calls: list[int] = []

    def bad(event: Event) -> None:
        bad_calls.append(1)
        raise ValueError("subscriber bug")

    handle = control.start(
        _cfg(tmp_path),
        job=train_job(steps=10),
        sample_interval_s=None,
        on_event=lambda e: seen.append((e.kind, threading.current_thread().name)),
    )
    token = handle.subscribe(bad)
    with caplog.at_level(logging.ERROR, logger="foundry.control"):
        assert handle.wait(5) is S.COMPLETED
    assert len(bad_calls) == 1  # dropped after raising once
    assert handle.unsubscribe(token) is False
    assert any("subscriber bug" in r.getMessage() for r in caplog.records)
    kinds = [k for k, _ in seen]
    assert kinds.count("step") == 10
    assert kinds[-1] == "state"
    assert all(name.startswith("foundry-run-") for _, name in seen)

    everything = handle.events_since(0)
    assert [n for n, _ in everything] == list(range(1, len(everything) + 1))
    assert [e.kind for _, e in everything] == kinds
    assert handle.events_since(everything[-2][0]) == everything[-1:]
    assert handle.poll() == [e for _, e in everything]
    assert handle.poll() == []
    assert everything[-1][1].payload == {"state": "completed"}


# --------------------------------------------------------------------------- async


def test_await_and_wait_for(tmp_path: Path) -> None:
    async def scenario() -> tuple[S, bool, S]:
        quick = control.start(_cfg(tmp_path), job=train_job(steps=5), sample_interval_s=None)
        first = await quick
        slow = control.start(
            _cfg(tmp_path), job=train_job(steps=10_000, pad_s=0.02), sample_interval_s=None
        )
        timed_out = False
        try:
            await asyncio.wait_for(slow, 0.2)
        except asyncio.TimeoutError:
            timed_out = True
        assert slow.state is S.RUNNING  # wait_for's timeout does not cancel the run
        slow.cancel()
        return first, timed_out, await asyncio.wait_for(slow, 5)

    first, timed_out, last = asyncio.run(scenario())
    assert (first, timed_out, last) == (S.COMPLETED, True, S.CANCELLED)


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_same_run_without_duplicate_or_missing_steps(
    tmp_path: Path,
) -> None:
    def stop_at_6(step: int, ctx: RunContext) -> None:
        if step == 6:
            ctx.cancel()  # as if the process had died here: 6 steps are in the store

    cfg = _cfg(tmp_path, name="resumable", seed=7)
    handle = control.start(cfg, job=train_job(steps=15, on_step=stop_at_6), sample_interval_s=0.05)
    assert handle.wait(5) is S.CANCELLED
    with RunStore(tmp_path, read_only=True) as store:
        mem_before = len(store.metrics(handle.id, ["mem/rss_mb"]))

    seen: dict[str, Any] = {}
    inner = train_job(steps=15)

    def resumed(config: RunConfig, **kw: Any) -> Any:
        seen["config"], seen["resume"] = config, kw["resume"]
        return inner(config, **kw)

    with RunStore(tmp_path) as store:
        again = control.start(resume=handle.id, store=store, job=resumed, sample_interval_s=0.05)
        with pytest.raises(control.RunConflictError, match="still"):
            control.start(resume=handle.id, store=store, job=resumed)
        assert again.id == handle.id
        assert again.wait(5) is S.COMPLETED
    assert seen["resume"] is True
    assert seen["config"].seed == 7
    record, events, metrics = _record(tmp_path, handle.id)
    assert record.state == "completed"
    assert record.error is None
    assert [m.step for m in metrics if m.name == "train/loss"] == list(range(1, 16))
    mem = [m.step for m in metrics if m.name == "mem/rss_mb"]
    assert mem == list(range(len(mem)))
    assert len(mem) > mem_before
    assert [e.kind for e in events] == ["cancelled", "resume", "completed"]


def _cancelled_run(tmp_path: Path) -> str:
    def stop_at_3(step: int, ctx: RunContext) -> None:
        if step == 3:
            ctx.cancel()

    handle = control.start(
        _cfg(tmp_path), job=train_job(steps=50, on_step=stop_at_3), sample_interval_s=None
    )
    assert handle.wait(60) is S.CANCELLED
    assert handle.join(10)
    return handle.id


def test_two_handles_on_one_run_in_one_process_are_refused(tmp_path: Path) -> None:
    """Two threads resume one run at the same moment: exactly one gets a handle."""
    run_id = _cancelled_run(tmp_path)
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def resume() -> None:
        barrier.wait()
        try:
            outcomes.append(
                control.start(resume=run_id, job=train_job(steps=50, pad_s=0.02),
                              overrides=[f"runs_dir={tmp_path}"], sample_interval_s=None)
            )  # fmt: skip
        except control.RunConflictError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    handles = [o for o in outcomes if isinstance(o, control.RunHandle)]
    refusals = [o for o in outcomes if isinstance(o, control.RunConflictError)]
    assert (len(handles), len(refusals)) == (1, 1), outcomes
    assert f"{os.getpid()}@" in str(refusals[0]) or "still" in str(refusals[0])
    assert handles[0].wait(60) is S.COMPLETED
    with RunStore(tmp_path, read_only=True) as store:
        kinds = [e.kind for e in store.events(run_id)]
    assert kinds == ["cancelled", "resume", "completed"]


def test_a_fresh_run_holds_its_lock_from_creation_to_its_final_state(tmp_path: Path) -> None:
    from foundry_kernel._run_lock import RunLock, RunLockedError, read_owner

    gate = threading.Event()
    handle = control.start(
        _cfg(tmp_path),
        job=train_job(steps=3, on_step=lambda step, ctx: gate.wait(10)),
        sample_interval_s=None,
    )
    run_dir = tmp_path / handle.id
    owner = read_owner(run_dir)
    assert owner is not None and owner.pid == os.getpid() and owner.released_at is None
    with pytest.raises(RunLockedError, match="another handle in this process"):
        RunLock.acquire(run_dir, handle.id, wait_s=0)
    with RunStore(tmp_path) as store:  # a writable open does not take a live run for stale
        assert store.settle_stale_runs() == []
        assert store.get_run(handle.id).state in ("pending", "running")
    gate.set()
    assert handle.wait(60) is S.COMPLETED
    released = read_owner(run_dir)
    assert released is not None and released.released_at is not None
    with RunLock.acquire(run_dir, handle.id, wait_s=0) as lock:  # free once terminal
        assert lock.previous == released


def test_resume_overrides_that_change_what_the_run_is_are_listed(tmp_path: Path) -> None:
    stored = _cfg(tmp_path, seed=3)
    allowed = load_config(
        stored, {"limits.max_steps": 900, "eval.every_steps": 7, "device": "cpu", "threads": 1}
    )
    assert control.resume_differences(stored, allowed) == []
    changed = load_config(
        stored, {"student.hidden_size": 32, "seed": 4, "data.seq_len": 64, "limits.max_steps": 9}
    )
    assert control.resume_differences(stored, changed) == [
        ("data.seq_len", 128, 64),
        ("seed", 3, 4),
        ("student.hidden_size", 64, 32),
    ]
    run_id = _cancelled_run(tmp_path)
    with RunStore(tmp_path) as store, pytest.raises(ConfigError) as info:
        control.start(resume=run_id, store=store, overrides=["optim.lr=0.5"], job=train_job())
    assert info.value.field == "optim.lr"
    assert "optim.lr: stored 0.003, given 0.5" in str(info.value)


def test_resume_of_an_unknown_run_is_refused(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store, pytest.raises(StoreError, match="unknown run"):
        control.start(resume="nope-123", store=store, job=train_job())


# --------------------------------------------------------------------------- cleanup


def test_no_threads_or_fds_left_after_20_start_cancel_cycles(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"limits.timeout_s": 60, "limits.step_timeout_s": 10})

    def cycle() -> None:
        handle = control.start(cfg, job=compute_job(0.01), sample_interval_s=0.02)
        assert _wait_until(lambda: (handle.step or 0) >= 1)
        handle.cancel()
        assert handle.wait(5) is S.CANCELLED

    cycle()  # warm-up: first-use imports and allocator arenas are not leaks
    assert _wait_until(lambda: not _foundry_threads())
    threads, fds = threading.active_count(), _fd_count()
    for _ in range(20):
        cycle()
    assert _wait_until(lambda: threading.active_count() == threads), threading.enumerate()
    assert _wait_until(lambda: _fd_count() == fds), (fds, _fd_count())


# --------------------------------------------------------------------------- process level


CHILD_JOB = """
import logging, sys, time
import torch
from foundry_kernel.run import _control as control
from foundry_kernel.config import load_config

logging.basicConfig(level=logging.WARNING)  # as the CLI does: warnings reach stderr

def job(config, *, store, run_id, ctx, resume=False):
    a = torch.randn(64, 64)
    for step in range(1, 100_000):
        {check}
        for _ in range({matmuls}):
            a = torch.tanh(a @ a)
        ctx.heartbeat()
        ctx.emit("step", step=step, max_steps=100_000)
        if step == 3 and {announce}:
            print("started", flush=True)
"""


def _child(
    tmp_path: Path, main: str, *, matmuls: int, announce: bool, stuck: bool = False, **env: str
) -> subprocess.Popen[str]:
    """A separate Python process running a real job, for what only a process can show:
    Ctrl-C and interpreter exit."""
    check = "time.sleep(0.01)  # never reaches a check()" if stuck else "ctx.check()"
    code = CHILD_JOB.format(check=check, matmuls=matmuls, announce=announce)
    script = tmp_path / "child.py"
    script.write_text(code + textwrap.dedent(main))
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def test_ctrl_c_in_run_sync_cancels_and_waits(tmp_path: Path) -> None:
    main = f"""
    h = control.run_sync(load_config({{"runs_dir": {str(tmp_path)!r}}}), job=job)
    print("final", h.state, h.step, flush=True)
    """
    proc = _child(tmp_path, main, matmuls=20, announce=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.split()[:2] == ["final", "cancelled"], (out, err)
    with RunStore(tmp_path, read_only=True) as store:
        assert "interrupted (Ctrl-C)" in (store.list_runs()[0].error or "")


@pytest.mark.parametrize("stuck", [False, True], ids=["checks", "never-checks"])
def test_process_exit_cancels_live_runs_and_never_hangs(tmp_path: Path, stuck: bool) -> None:
    """Kernel shutdown: atexit cancels live runs; a job stuck in a step cannot hang exit."""
    main = f"""
    h = control.start(load_config({{"runs_dir": {str(tmp_path)!r}}}), job=job)
    while (h.step or 0) < 3:
        time.sleep(0.01)
    print(h.id, flush=True)
    """
    proc = _child(
        tmp_path, main, matmuls=10, announce=False, stuck=stuck, FOUNDRY_SHUTDOWN_GRACE_S="1"
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=20)
    exit_s = time.monotonic() - t0
    assert exit_s < 3.0, exit_s  # grace 1 s: never hangs
    with RunStore(tmp_path, read_only=True) as store:
        record = store.get_run(run_id)
    if stuck:
        # Frozen at exit, resumable. CPython < 3.14 ends daemon threads with pthread_exit,
        # which torch's C++ frames may turn into std::terminate: SIGABRT is possible here.
        assert proc.returncode in (0, -signal.SIGABRT), err
        assert "did not stop within 1 s" in err
        assert record.state == "running"
    else:
        assert proc.returncode == 0, err
        assert record.state == "cancelled"
        assert "process is exiting" in (record.error or "")


def test_registry_lists_runs_started_in_this_process(tmp_path: Path) -> None:
    a = control.start(_cfg(tmp_path), job=train_job(steps=3), sample_interval_s=None)
    b = control.start(_cfg(tmp_path), job=train_job(steps=3), sample_interval_s=None)
    a.wait(5), b.wait(5)
    ids = [h.id for h in control.list_runs()]
    assert ids.index(a.id) < ids.index(b.id)
    assert control.get(b.id) is b
    assert control.get("not-a-run") is None
    assert repr(b) == f"<RunHandle {b.id} completed step 3/3>"
    assert not math.isnan(b.duration_s or float("nan"))
