"""Launching a run on several processes with torchrun, and supervising the process tree.

Foundry has no launcher of its own: every multi-process run is ``python -m
torch.distributed.run ... -m foundry_kernel distill ...`` (torchrun's elastic agent),
started from an argument list, never a shell string. This module builds that command
(:class:`LaunchSpec`), runs it as a process tree Foundry controls (:class:`TorchrunTree`:
its own session, under the lifeline so it dies with the kernel or CLI that started it,
every descendant killed at the end so no rank is ever left), and turns what the tree left
behind into an outcome a person can read (:func:`diagnose`).

The ranks and their controller talk through a *control folder* (``runs/<id>/dist`` for a
run started from a notebook, a temporary folder for ``foundry distill --nproc-per-node``):

- ``stop`` - written (atomically) by the controller to ask for a stop; every rank that can
  see the folder cancels its run context, so all stop at the next step boundary (the
  trainer agrees on the step with its peers);
- ``events.jsonl`` - rank 0's events (phase, step, eval, alert), one JSON object per line,
  that the controller re-emits on its own handle (``handle.metrics``, the panel, the step
  watchdog work unchanged);
- ``rank-<r>.json`` - each rank's outcome (state, last step, error; rank 0's also the
  run's summary), written atomically when the rank's run ends. The controller reads rank
  0's as the run's outcome; when there is none (a rank was killed, a rendezvous failed),
  the outcome is torchrun's exit code and error summary (``torchrun.log``).

Why a folder and not a socket: it needs no port, survives the death of either side, is
what a person inspects after a failure, and the run store already owns the run folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from foundry_kernel._context import RunContext
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import RunConfig
from foundry_kernel.errors import ConfigError, FoundryError, RunCancelled, RunTimeout
from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import free_port, with_lifeline

__all__ = [
    "STOP_GRACE_S",
    "DistributedJob",
    "DistributedRunError",
    "LaunchSpec",
    "TorchrunTree",
    "diagnose",
    "read_outcome",
    "request_stop",
    "stop_reason",
    "torchrun_command",
    "write_outcome",
]

STOP_GRACE_S = 60.0
"""After a stop is asked, the ranks get this long to reach a step boundary, checkpoint and
exit before the whole tree is killed (SIGTERM, then SIGKILL)."""
KILL_GRACE_S = 5.0
"""Between SIGTERM and SIGKILL when the tree is killed."""
POLL_S = 0.2
STOP_FILE = "stop"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "torchrun.log"


class DistributedRunError(FoundryError):
    """A multi-process run failed as a group: a rank died, hung or never joined."""


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class LaunchSpec:
    """torchrun's launch arguments, as ``foundry distill`` takes them.

    ``nnodes`` is ``"1"``, ``"2"`` or an elastic ``"1:4"``. One node uses a static
    rendezvous on 127.0.0.1 (``master_port``: a free one unless given); several nodes use
    torchrun's c10d rendezvous at ``rdzv_endpoint`` (``--node-rank`` optional: the
    rendezvous assigns ranks in join order without it). ``rdzv_conf`` is passed through
    (e.g. ``join_timeout=30``: how long the first agent waits for the others).
    """

    nproc_per_node: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_conf: str | None = None
    master_port: int | None = None
    monitor_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(
                f"--nproc-per-node must be at least 1, got {self.nproc_per_node}",
                field="nproc_per_node",
            )
        if not re.fullmatch(r"\d+(:\d+)?", self.nnodes) or self.nnodes.startswith("0"):
            raise ConfigError(
                f"--nnodes must be a count such as 2 or an elastic range such as 1:4, "
                f"got {self.nnodes!r}",
                field="nnodes",
            )
        if self.multi_node and not self.rdzv_endpoint:
            raise ConfigError(
                "several nodes meet at a rendezvous: give --rdzv-endpoint HOST:PORT "
                "(the same on every node, e.g. the first node's address)",
                field="rdzv_endpoint",
            )
        if self.rdzv_endpoint is not None and not re.fullmatch(
            r"[A-Za-z0-9_.\-\[\]:]+:\d+", self.rdzv_endpoint
        ):
            raise ConfigError(
                f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}",
                field="rdzv_endpoint",
            )

    @property
    def multi_node(self) -> bool:
        return self.nnodes != "1"

    def torchrun_args(self) -> list[str]:
        """The arguments between ``torch.distributed.run`` and the worker module.

        ``--max-restarts 0``: a failed rank fails the run (Foundry's resume is the
        restart, from the last checkpoint, with the lost steps accounted for).
        """
        args = [
            "--nproc-per-node",
            str(self.nproc_per_node),
            "--nnodes",
            self.nnodes,
            "--max-restarts",
            "0",
            "--monitor-interval",
            f"{self.monitor_interval_s:g}",
        ]
        if self.rdzv_endpoint is not None:
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint]
            args += ["--rdzv-id", self.rdzv_id or "foundry"]
            if self.node_rank is not None:
                args += ["--node-rank", str(self.node_rank)]
        else:
            port = self.master_port if self.master_port is not None else free_port()
            args += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
        if self.rdzv_conf:
            args += ["--rdzv-conf", self.rdzv_conf]
        return args


def torchrun_command(spec: LaunchSpec, worker_args: Sequence[str]) -> list[str]:
    """``[python, -m, torch.distributed.run, <launch args>, -m, foundry_kernel, distill,
    <worker args>]``: an argument list for ``subprocess``, never a shell string."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *spec.torchrun_args(),
        "-m",
        "foundry_kernel",
        "distill",
        *worker_args,
    ]


# --------------------------------------------------------------------------- the control folder


def request_stop(control_dir: Path, reason: str) -> None:
    """Ask every rank that sees ``control_dir`` to stop at its next step boundary."""
    control_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(control_dir / STOP_FILE, reason)


def stop_reason(control_dir: Path) -> str | None:
    """The reason in the stop file, or None while no stop was asked."""
    try:
        return (control_dir / STOP_FILE).read_text(encoding="utf-8").strip() or "cancelled"
    except FileNotFoundError:
        return None


def write_outcome(control_dir: Path, rank: int, outcome: Mapping[str, Any]) -> None:
    """Rank ``rank``'s outcome, atomically (a reader never sees half of it)."""
    control_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(control_dir / f"rank-{rank}.json", json.dumps(dict(outcome), default=str))


def read_outcome(control_dir: Path, rank: int = 0) -> dict[str, Any] | None:
    """Rank ``rank``'s outcome, or None if it wrote none (it died, or never started)."""
    try:
        data = json.loads((control_dir / f"rank-{rank}.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def reset_control_dir(control_dir: Path) -> None:
    """Clear what a previous attempt of the run left (its stop request, outcomes, events),
    so a resume is not stopped by the old cancel nor read as the old outcome."""
    control_dir.mkdir(parents=True, exist_ok=True)
    for path in control_dir.iterdir():
        if path.is_file() and (
            path.name in (STOP_FILE, EVENTS_FILE) or re.fullmatch(r"rank-\d+\.json", path.name)
        ):
            path.unlink()


class EventWriter:
    """Rank 0's side of ``events.jsonl``: one JSON line per event, flushed at once."""

    def __init__(self, control_dir: Path) -> None:
        control_dir.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = (control_dir / EVENTS_FILE).open("a", encoding="utf-8")

    def write(self, kind: str, payload: Mapping[str, Any]) -> None:
        if self._fh.closed:
            return
        self._fh.write(json.dumps({"kind": kind, "payload": dict(payload)}, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class EventReader:
    """The controller's side: complete lines appended since the last read."""

    def __init__(self, control_dir: Path) -> None:
        self._path = control_dir / EVENTS_FILE
        self._offset = 0

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            with self._path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        out: list[tuple[str, dict[str, Any]]] = []
        for line in chunk[: end + 1].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                item = json.loads(line)
                if isinstance(item, dict) and isinstance(item.get("payload"), dict):
                    out.append((str(item.get("kind")), item["payload"]))
        return out


# --------------------------------------------------------------------------- the process tree


@dataclass
class TorchrunTree:
    """torchrun and every process under it, started and ended by this object.

    The agent runs in its own session under the lifeline (``foundry_kernel._lifeline``):
    when the process that started it dies, however it dies, the agent is stopped and its
    ranks with it. torchrun starts each rank in a session of its own, so a process-group
    signal does not reach them; :meth:`kill` walks the tree (psutil) instead, and the
    ranks seen while it ran are remembered, so one re-parented after the agent's death is
    still found and killed.
    """

    command: list[str]
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    tee_stderr: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _known: dict[int, psutil.Process] = field(default_factory=dict, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)
    _tee: threading.Thread | None = field(default=None, init=False)
    _tail: deque[bytes] = field(default_factory=lambda: deque(maxlen=400), init=False)

    def start(self) -> TorchrunTree:
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
            out = self._log
        self.proc = subprocess.Popen(
            with_lifeline(self.command),
            stdin=subprocess.PIPE,  # the lifeline: never written, closed when we die
            stdout=None if self.log_path is None else out,
            stderr=subprocess.PIPE if self.tee_stderr else (None if self.log_path is None else out),
            env=dict(self.env) if self.env is not None else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
        )
        if self.tee_stderr:
            self._tee = threading.Thread(
                target=self._pump, name="foundry-torchrun-tee", daemon=True
            )
            self._tee.start()
        return self

    def _pump(self) -> None:
        """Copy torchrun's stderr to ours line by line, keeping a tail to diagnose."""
        assert self.proc is not None and self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self._tail.append(line)
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line.decode("utf-8", "replace"))
                sys.stderr.flush()

    def stderr_tail(self) -> str:
        """The last lines torchrun wrote to stderr (``tee_stderr`` only)."""
        if self._tee is not None:
            self._tee.join(KILL_GRACE_S)
        return b"".join(self._tail).decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        self._remember()
        return self.proc.poll()

    def _remember(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self._known.setdefault(child.pid, child)

    def pids(self) -> list[int]:
        """The agent and every rank seen so far that is still alive."""
        self._remember()
        alive = [p.pid for p in self._known.values() if p.is_running()]
        return ([self.pid] if self.poll() is None else []) + alive

    def signal_agent(self, signum: int) -> None:
        """Send ``signum`` to the agent (the lifeline passes SIGINT/SIGTERM on as Python
        does: torchrun forwards them to its ranks and waits for them)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, grace_s: float = KILL_GRACE_S) -> None:
        """End the agent and every rank: SIGTERM, ``grace_s``, SIGKILL; then reap."""
        self._remember()
        procs = [p for p in self._known.values() if p.is_running()]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)  # a stopped rank cannot act on SIGTERM
                proc.terminate()
        self.signal_agent(signal.SIGTERM)
        if self.proc is not None and self.wait(grace_s) is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.wait(grace_s)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)

    def close(self) -> None:
        """Kill whatever is left and close the log (idempotent)."""
        if self.proc is not None:
            self.kill()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TorchrunTree:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- diagnosis

_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\).*?exitcode\s*:\s*(-?\d+)"
    r"(?:\s*\(pid:\s*(\d+)\))?.*?error_file:\s*(\S+).*?(?:traceback\s*:\s*(.*?)\n={5,})?",
    re.S,
)


_FAILURE = re.compile(
    r"\[\d+\]:\s*\n\s*time\s*:.*?\n\s*host\s*:.*?\n\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)"
    r"\s*\n\s*exitcode\s*:\s*(-?\d+)(?:\s*\(pid:\s*(\d+)\))?"
)
# What a rank's collective raises when a peer died under it (gloo and NCCL wordings).
_LOST_PEER = re.compile(
    r"Connection (?:closed|reset) by peer|Read error|Broken pipe|NCCL communicator was aborted"
    r"|remote (?:worker|process) (?:crashing|exited)",
    re.I,
)


_COLLECTIVE_TIMEOUT = re.compile(
    r"Timed out waiting|Watchdog caught collective operation timeout", re.I
)


def _killed_rank(log_text: str) -> str | None:
    """The first rank torchrun reports killed by a signal other than its own SIGTERM (the
    one it sends the survivors), as a sentence; None if no rank died that way."""
    for match in _FAILURE.finditer(log_text[-20_000:]):
        code = int(match[3])
        if code < 0 and code != -signal.SIGTERM:
            pid = f", pid {match[4]}" if match[4] else ""
            return (
                f"rank {match[1]} (local rank {match[2]}{pid}) failed, {_signal_name(code)}; "
                "torchrun stopped the other ranks"
            )
    return None


def _signal_name(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def diagnose(log_text: str, *, returncode: int | None, spec: LaunchSpec) -> str:
    """What a failed torchrun says, in one sentence a person can act on."""
    tail = log_text[-20_000:]
    match = _ROOT_CAUSE.search(tail)
    if match:
        rank, local, code = int(match[1]), int(match[2]), int(match[3])
        pid = f", pid {match[4]}" if match[4] else ""
        detail = (match[6] or "").strip()
        last = detail.splitlines()[-1].strip() if detail and "<N/A>" not in detail else ""
        why = f": {last}" if last else ""
        return (
            f"rank {rank} (local rank {local}{pid}) failed, {_signal_name(code)}{why}; "
            "torchrun stopped the other ranks"
        )
    if "EADDRINUSE" in tail or "address already in use" in tail.lower():
        where = spec.rdzv_endpoint or f"127.0.0.1:{_master_port(spec, tail)}"
        return (
            f"the rendezvous port {where} is already in use: pass another --master-port "
            "(or --rdzv-endpoint), or stop what listens there"
        )
    if "RendezvousTimeoutError" in tail or "RendezvousClosedError" in tail:
        return (
            f"the rendezvous at {spec.rdzv_endpoint} did not complete: not all of the "
            f"{spec.nnodes} node(s) joined in time (--rdzv-conf join_timeout=...); start "
            "torchrun (foundry distill) on every node with the same --rdzv-endpoint and "
            "--rdzv-id"
        )
    last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
    return f"torchrun exited with code {returncode}" + (f": {last.strip()}" if last else "")


def _master_port(spec: LaunchSpec, text: str) -> str:
    if spec.master_port is not None:
        return str(spec.master_port)
    found = re.search(r"port[=: ]+(\d{2,5})", text)
    return found[1] if found else "?"


# --------------------------------------------------------------------------- the supervisor job


@dataclass(frozen=True)
class DistributedJob:
    """The job of a run started with ``nproc_per_node`` (``fk.start``): it launches
    torchrun with rank 0 *attached* to the run this handle owns, relays rank 0's events
    onto the handle, turns a cancel or a time limit into a stop request and, after
    ``stop_grace_s``, kills the tree; it returns rank 0's summary or raises what failed.

    The controller keeps the run's lock and records the final state; rank 0 writes the
    metrics, summary and checkpoints. Every process of the tree is gone when it returns.
    """

    spec: LaunchSpec
    stop_grace_s: float = STOP_GRACE_S

    def __call__(
        self,
        config: RunConfig,
        *,
        store: RunStore,
        run_id: str,
        ctx: RunContext,
        resume: bool = False,
    ) -> dict[str, Any]:
        control = store.run_dir(run_id) / "dist"
        reset_control_dir(control)
        worker = ["--attach", run_id, "--runs-dir", str(store.root), "--control-dir", str(control)]
        if resume:
            worker.append("--attach-resume")
        ctx.set_phase("launch", world_size=self.spec.nproc_per_node)
        log_path = control / LOG_FILE
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with TorchrunTree(torchrun_command(self.spec, worker), log_path=log_path) as tree:
            returncode = self._supervise(tree, control, ctx)
        outcome = read_outcome(control, 0)
        log_text = _read_from(log_path, log_start)
        return _conclude(outcome, returncode, log_text, self.spec, ctx)

    def _supervise(self, tree: TorchrunTree, control: Path, ctx: RunContext) -> int | None:
        """Relay events until the tree exits; bounded by the stop grace once a stop is
        asked, and by the rank 0 outcome (a rank left hanging after rank 0 ended)."""
        relay = EventReader(control)
        stop_at: float | None = None
        ended_at: float | None = None
        returncode = tree.poll()
        while returncode is None:
            _relay(relay, ctx)
            now = time.monotonic()
            if ctx.stop_requested and stop_at is None:
                request_stop(control, ctx.reason or "cancelled")
                stop_at = now
            if ended_at is None and read_outcome(control, 0) is not None:
                ended_at = now
            if (stop_at is not None and now - stop_at > self.stop_grace_s) or (
                ended_at is not None and now - ended_at > KILL_GRACE_S * 2
            ):
                tree.kill()
            if stop_at is None:
                ctx.wait_stop(POLL_S)  # a cancel wakes it at once
            else:
                time.sleep(POLL_S)
            returncode = tree.poll()
        _relay(relay, ctx)
        return returncode


def _relay(reader: EventReader, ctx: RunContext) -> None:
    """Re-emit rank 0's events here; its phase and stage become the handle's (messages
    and the watchdog say where the group is)."""
    for kind, payload in reader.read():
        if kind == "phase":
            ctx.phase, ctx.stage = str(payload.get("phase")), None
        elif kind == "stage":
            ctx.stage = str(payload.get("stage"))
        ctx.emit(kind, **payload)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _conclude(
    outcome: Mapping[str, Any] | None,
    returncode: int | None,
    log_text: str,
    spec: LaunchSpec,
    ctx: RunContext,
) -> dict[str, Any]:
    """Rank 0's outcome as the controller's result or exception."""
    state = None if outcome is None else outcome.get("state")
    error = None if outcome is None else outcome.get("error")
    if state == "completed" and returncode == 0:
        summary = outcome.get("summary") if outcome is not None else None
        return dict(summary) if isinstance(summary, Mapping) else {}
    if state == "cancelled" or (state is None and ctx.stop_requested and returncode == 0):
        raise RunCancelled(str(error or "cancelled on every rank"))
    if state == "timed_out":
        raise RunTimeout(str(error or "limits.timeout_s reached"))
    if state == "failed" and error:
        killed = _killed_rank(log_text)
        if killed is not None and _LOST_PEER.search(str(error)):
            # rank 0 only saw its collective break: the cause is the rank that died
            raise DistributedRunError(f"{killed}; rank 0 lost its peer ({error})")
        if _COLLECTIVE_TIMEOUT.search(str(error)):
            raise DistributedRunError(
                "a collective timed out (distributed.timeout_s): another rank hung or was "
                f"lost, and the run was stopped on every rank (rank 0: {error})"
            )
        raise DistributedRunError(f"rank 0: {error}")
    if ctx.stop_requested and returncode is not None and returncode < 0:
        raise RunCancelled("the ranks did not stop within the grace period and were killed")
    raise DistributedRunError(diagnose(log_text, returncode=returncode, spec=spec))


@contextlib.contextmanager
def forwarded_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``on_signal`` while the launcher waits (main thread)."""
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: on_signal(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_foreground(spec: LaunchSpec, worker_args: Sequence[str], control_dir: Path) -> int:
    """``foundry distill --nproc-per-node N``: run torchrun in the foreground (its output
    on this terminal) and return the CLI's exit code for the run.

    The first Ctrl-C (or SIGTERM) asks every rank to stop at its next step boundary (the
    stop file; rank 0 records ``cancelled``); a second one, or ``STOP_GRACE_S`` without
    an exit, kills the tree. The exit code is rank 0's state when this node hosted rank 0
    (0/1/124/130), else torchrun's (0 or 1).
    """
    command = torchrun_command(spec, [*worker_args, "--control-dir", str(control_dir)])
    signals: list[float] = []
    tree = TorchrunTree(command, tee_stderr=True)
    with forwarded_signals(lambda _sig: signals.append(time.monotonic())), tree:
        returncode = tree.poll()
        while returncode is None:
            if signals and stop_reason(control_dir) is None:
                request_stop(control_dir, "interrupted (Ctrl-C)")
            if len(signals) > 1 or (signals and time.monotonic() - signals[0] > STOP_GRACE_S):
                tree.kill()
            time.sleep(POLL_S)
            returncode = tree.poll()
    outcome = read_outcome(control_dir, 0)
    exits = {"completed": 0, "failed": 1, "timed_out": 124, "cancelled": 130}
    if outcome is not None and outcome.get("state") in exits:
        state = str(outcome["state"])
        return exits[state] if state != "completed" or returncode == 0 else 1
    if returncode != 0:
        print(
            f"foundry: error: {diagnose(tree.stderr_tail(), returncode=returncode, spec=spec)}",
            file=sys.stderr,
        )
    return 0 if returncode == 0 else 1
