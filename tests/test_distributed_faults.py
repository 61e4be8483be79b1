"""Faults of a multi-process run, on this machine over loopback: a rank killed with
SIGKILL, a rank that hangs, a rendezvous port taken, a node that never joins, and a cancel
from a real notebook kernel. Each launch has its own free port; every wait is bounded.
The seconds each fault takes to surface are printed (``-s``) for the report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_distributed_launch import (
    FOUNDRY,
    assert_nothing_left,
    dist_config,
    store_steps,
    write_config,
)

from foundry_kernel.run import _control as control
from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import free_port

LONG = {"max_steps": 80}  # long enough to be interrupted mid-training


def _rank_pid(run_id: str, rank: int, timeout: float = 120) -> int:
    """The pid of rank ``rank`` of the supervised run ``run_id`` (its command line carries
    ``--attach RUN_ID``, its environment ``RANK``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if run_id.encode() in cmdline and f"RANK={rank}".encode() in environ:
                if b"torch.distributed.run" not in cmdline:
                    return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} of {run_id} never appeared")


def _wait_step(handle: control.RunHandle, step: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while (handle.step or 0) < step and not handle.done and time.monotonic() < deadline:
        handle.wait(0.05)
    assert (handle.step or 0) >= step, (handle.state, handle.error)


def test_kill_9_of_one_rank_fails_the_run_naming_it_and_resume_loses_no_step(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    cfg = dist_config(runs_dir, limits=LONG, checkpoint={"every_steps": 5})
    handle = control.start(cfg, nproc_per_node=2)
    victim = _rank_pid(handle.id, 1)
    _wait_step(handle, 3)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    handle.wait(60)
    to_failed = time.monotonic() - killed_at
    print(f"\nkill -9 of rank 1 -> failed in {to_failed:.1f} s")
    assert handle.state == "failed" and to_failed < 60
    assert "rank 1" in str(handle.error) and "SIGKILL" in str(handle.error)
    assert_nothing_left(handle.id)
    with RunStore(runs_dir, read_only=True) as store:
        assert store.get_run(handle.id).state == "failed"
    before = store_steps(runs_dir, handle.id)
    assert before and max(before) < 80

    resumed = control.start(
        resume=handle.id, overrides={"runs_dir": str(runs_dir)}, nproc_per_node=2
    )
    resumed.wait(180)
    assert resumed.state == "completed", resumed.error
    steps = store_steps(runs_dir, handle.id)
    assert steps == list(range(1, 81))  # none lost
    relayed = [s for s, _ in resumed.history("train/loss")]
    assert relayed == list(range(relayed[0], 81))  # none repeated: one contiguous run
    assert relayed[0] % 5 == 1 and relayed[0] <= max(before) + 1  # from the checkpoint
    assert_nothing_left(handle.id)


def test_a_rank_hung_in_a_collective_fails_the_run_at_the_collective_timeout(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    cfg = dist_config(runs_dir, limits=LONG, distributed={"timeout_s": 5})
    handle = control.start(cfg, nproc_per_node=2)
    victim = _rank_pid(handle.id, 1)
    _wait_step(handle, 2)
    os.kill(victim, signal.SIGSTOP)  # alive but never answers its peers again
    stopped_at = time.monotonic()
    handle.wait(120)
    took = time.monotonic() - stopped_at
    print(f"\nrank 1 hung -> {handle.state} in {took:.1f} s (timeout_s=5): {handle.error}")
    assert handle.state == "failed", handle.error
    message = str(handle.error)
    assert "collective timed out (distributed.timeout_s)" in message, message
    assert took < 60  # the 5 s collective timeout, not a 10-minute default
    assert_nothing_left(handle.id)


@pytest.fixture
def taken_port() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_the_rendezvous_port_taken_is_a_clear_error(
    tmp_path: Path, runs_dir: Path, taken_port: int, tiny_teacher_dir: Path
) -> None:
    cfg_path = write_config(tmp_path, dist_config(runs_dir))
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            *FOUNDRY,
            *("distill", "--nproc-per-node", "2", "--master-port", str(taken_port)),
            *("--config", str(cfg_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - t0
    print(f"\nport taken -> exit {proc.returncode} in {took:.1f} s")
    assert proc.returncode == 1
    assert f"{taken_port} is already in use" in proc.stderr, proc.stderr[-2000:]
    assert_nothing_left(str(cfg_path))


def test_a_node_that_never_joins_is_a_clear_error_within_the_join_timeout(
    tmp_path: Path, runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    cfg_path = write_config(tmp_path, dist_config(runs_dir))
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            *FOUNDRY,
            *("distill", "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "0"),
            *("--rdzv-endpoint", endpoint, "--rdzv-conf", "join_timeout=5"),
            *("--config", str(cfg_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - t0
    print(f"\nnode never joins (join_timeout=5) -> exit {proc.returncode} in {took:.1f} s")
    assert proc.returncode == 1
    assert "did not complete" in proc.stderr and endpoint in proc.stderr, proc.stderr[-2000:]
    assert took < 60
    assert_nothing_left(str(cfg_path))


# --------------------------------------------------------------------------- a real kernel

jupyter_client = pytest.importorskip("jupyter_client")


def test_cancel_from_a_notebook_kernel_stops_both_ranks_within_a_step(
    tmp_path: Path, runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    from jupyter_client.manager import KernelManager

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env=env, cwd=str(repo))
    client = manager.client()
    client.start_channels()

    def cell(code: str, timeout: float = 60) -> str:
        out: list[str] = []
        reply = client.execute_interactive(
            code,
            timeout=timeout,
            output_hook=lambda m: (
                out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None
            ),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)

    def value(expr: str) -> object:
        return json.loads(cell(f"import json as _j; print(_j.dumps({expr}))").strip())

    try:
        client.wait_for_ready(timeout=60)
        cfg = dist_config(runs_dir, limits={"max_steps": 400}, checkpoint={"every_steps": 1000})
        cell(f"import foundry_kernel as fk\nh = fk.start({cfg!r}, nproc_per_node=2)")
        deadline = time.monotonic() + 150
        while (value("h.step or 0") or 0) < 3 and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.1)
        t0 = time.monotonic()
        cell("h.cancel()")
        cell("h.wait(120)", timeout=130)
        to_cancelled = time.monotonic() - t0
        run_id = str(value("h.id"))
        assert value("str(h.state)") == "cancelled", value("str(h.error)")
        outcomes = [
            json.loads((runs_dir / run_id / "dist" / f"rank-{r}.json").read_text()) for r in (0, 1)
        ]
        print(f"\nkernel cancel -> cancelled in {to_cancelled:.1f} s; ranks: {outcomes}")
        for outcome in outcomes:
            assert outcome["state"] == "cancelled"
            if outcome["step"] is not None and outcome["cancel_step"] is not None:
                # cancel_step is the last step *reported* when the request came; the step in
                # flight then may already have read its stop flag (at its end, before its
                # all-reduce), so it finishes and at most one more optimizer step runs
                assert outcome["step"] - outcome["cancel_step"] <= 2
        stops = {o["step"] for o in outcomes if o["step"] is not None}
        assert len(stops) <= 1, outcomes  # every rank stopped after the same step
        assert any((runs_dir / run_id / "checkpoints").rglob("*")), "no checkpoint on cancel"
        assert_nothing_left(run_id)
        t1 = time.monotonic()
        assert value("1 + 1") == 2  # the kernel stays usable
        assert time.monotonic() - t1 < 5
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
