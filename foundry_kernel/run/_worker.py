"""One rank of a multi-process run: what ``foundry distill`` does under torchrun.

Every rank starts the process group (``_world.init_world``, the config's backend and
collective timeout), then:

- rank 0 creates or resumes the run exactly as a single process does (it owns the run's
  lock and records the final state), or, *attached* (``--attach RUN_ID``, a run a
  notebook's handle owns), runs the job without touching the lock or the state; it
  broadcasts the run id and the resolved config;
- every other rank runs the same job on that run (``run_job(..., world=world)``) under a
  handle that records nothing in the store (``_control.attach``);
- every rank waits for all others at the end (a barrier, bounded by
  ``distributed.timeout_s``) so rank 0 never reports ``completed`` while a peer still
  trains or has hung, writes its outcome to the control folder, and ends the group.

A stop file in the control folder (``_launch.request_stop``) is watched by every rank
that can see it and cancels its context; the trainer makes the ranks agree on the step
boundary where they stop. Ranks on nodes that cannot see the folder learn it from the
trainer's collective stop flag.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry_kernel._context import Event, RunContext
from foundry_kernel._world import World, close_world, init_world
from foundry_kernel.config import RunConfig, load_config, validate_config
from foundry_kernel.errors import FoundryError
from foundry_kernel.paths import default_runs_dir
from foundry_kernel.run import _launch
from foundry_kernel.run._control import (
    RunHandle,
    attach,
    start,
    wait_interruptibly,
)
from foundry_kernel.store import RunStore

__all__ = ["RankRequest", "run_rank"]

STOP_POLL_S = 0.05


@dataclass(frozen=True)
class RankRequest:
    """What the command line asked this rank to do."""

    config: RunConfig | None  # a new run's config, or a resume's given one
    overrides: list[str]
    resume: str | None = None
    attach: str | None = None  # rank 0 attached to a run another process owns
    attach_resume: bool = False
    runs_dir: Path | None = None
    control_dir: Path | None = None


def _local_config(request: RankRequest) -> RunConfig:
    """The config this rank needs before the group exists (backend, timeout): given, or
    the stored one of the run it resumes or attaches to (read-only)."""
    run_id = request.attach or request.resume
    if request.config is not None and request.attach is None:
        return (
            load_config(request.config, request.overrides)
            if request.overrides
            else (request.config)
        )
    assert run_id is not None
    runs = request.runs_dir or default_runs_dir()
    with RunStore(runs, read_only=True) as store:
        stored = validate_config(store.get_run(run_id).config)
    return load_config(stored, request.overrides) if request.overrides else stored


def _device_type(config: RunConfig) -> str:
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_job_for(world: World) -> Callable[..., Mapping[str, Any] | None]:
    """The pipeline's job for this rank (imported here: it pulls in torch)."""
    from foundry_kernel.run._job import run_job

    return functools.partial(run_job, world=world)


def _rank_job(
    gate: threading.Event,
    world: World,
    config: RunConfig,
    *,
    store: RunStore,
    run_id: str,
    ctx: RunContext,
    resume: bool = False,
) -> Mapping[str, Any] | None:
    """The job on every rank: wait until rank 0 has broadcast the run (no collective may
    overlap that broadcast), run the pipeline, then meet every peer at a barrier."""
    if not gate.wait(config.distributed.timeout_s):
        raise _launch.DistributedRunError("rank 0 never announced the run")
    result = _run_job_for(world)(config, store=store, run_id=run_id, ctx=ctx, resume=resume)
    _barrier(world, config)
    return result


def _barrier(world: World, config: RunConfig) -> None:
    """All ranks finished; a peer that hung or died fails this rank after the timeout."""
    try:
        world.barrier()
    except RuntimeError as exc:  # torch.distributed's DistBackendError is one
        raise _launch.DistributedRunError(
            f"{world.label}: the ranks did not all finish: a collective waited longer than "
            f"distributed.timeout_s={config.distributed.timeout_s:g} s (a rank hung or "
            f"died): {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc}"
        ) from exc


def _watch_stop(handle: RunHandle, control_dir: Path) -> threading.Thread:
    """Cancel ``handle`` when the stop file appears; ends with the run."""

    def loop() -> None:
        while not handle.wait(STOP_POLL_S).terminal:
            reason = _launch.stop_reason(control_dir)
            if reason is not None:
                handle.cancel(reason)
                return

    thread = threading.Thread(target=loop, name=f"foundry-stop-{handle.id}", daemon=True)
    thread.start()
    return thread


def _announce(world: World, handle: RunHandle | None, error: str | None) -> dict[str, Any]:
    """Rank 0's run (id, config, resume) on every rank, or its error."""
    payload = (
        {"error": error}
        if handle is None
        else {"run_id": handle.id, "config": handle.config.to_dict(), "resume": handle.resume}
    )
    return dict(world.broadcast_object(payload))


def run_rank(
    request: RankRequest, *, on_event: Callable[[Event], None] | None = None
) -> tuple[RunHandle | None, World]:
    """Run this rank's part of the run; rank 0 returns its handle (None where it could
    not start the run, after telling every peer), other ranks theirs."""
    config = _local_config(request)
    world = init_world(
        backend=config.distributed.backend,
        device_type=_device_type(config),
        timeout_s=config.distributed.timeout_s,
    )
    try:
        handle = _run_on(world, request, config, on_event)
    finally:
        # no second barrier: a completed job already met every peer at its end (_rank_job),
        # and a failing rank must not wait distributed.timeout_s for peers that are gone
        close_world(world, meet=False)
    return handle, world


def _run_on(
    world: World,
    request: RankRequest,
    config: RunConfig,
    on_event: Callable[[Event], None] | None,
) -> RunHandle | None:
    gate = threading.Event()
    job = functools.partial(_rank_job, gate, world)
    runs = request.runs_dir or config.runs_dir or default_runs_dir()
    control_dir = request.control_dir
    relays = world.is_main and request.attach is not None and control_dir is not None
    events = _launch.EventWriter(control_dir) if relays and control_dir is not None else None
    sink = _sink(on_event, events)
    store: RunStore | None = None
    try:
        if world.is_main:
            store = RunStore(runs)  # first: it creates the store's schema
            handle, error = _start_main(request, config, store, job, sink)
            announced = _announce(world, handle, error)
        else:
            announced = _announce(world, None, None)
            handle = None
            if "run_id" in announced:
                peer_config = validate_config(announced["config"])
                run_id, resume = announced["run_id"], bool(announced["resume"])
                store = RunStore(runs)  # after rank 0 made it: one schema creator
                handle = attach(run_id, peer_config, store=store, job=job, resume=resume)
        if handle is None:
            return None
        gate.set()
        if request.control_dir is not None:
            _watch_stop(handle, request.control_dir)
        wait_interruptibly(handle)
        handle.join()
        if request.control_dir is not None:
            _launch.write_outcome(request.control_dir, world.rank, _outcome(handle, world))
        return handle
    finally:
        if events is not None:
            events.close()
        if store is not None:
            store.close()


def _sink(
    on_event: Callable[[Event], None] | None, events: _launch.EventWriter | None
) -> Callable[[Event], None] | None:
    if events is None:
        return on_event

    def both(event: Event) -> None:
        if event.kind != "state":  # the controller has its own states
            events.write(event.kind, event.payload)
        if on_event is not None:
            on_event(event)

    return both


def _start_main(
    request: RankRequest,
    config: RunConfig,
    store: RunStore,
    job: Any,
    sink: Callable[[Event], None] | None,
) -> tuple[RunHandle | None, str | None]:
    """Rank 0: attach, resume or create the run; a refusal becomes the peers' error."""
    try:
        if request.attach is not None:
            handle = attach(
                request.attach,
                config,
                store=store,
                job=job,
                resume=request.attach_resume,
                sample_interval_s=0.5,
                on_event=sink,
            )
        elif request.resume is not None:
            handle = start(
                request.config,
                resume=request.resume,
                overrides=request.overrides,
                store=store,
                job=job,
                on_event=sink,
            )
        else:
            handle = start(config, store=store, job=job, on_event=sink)
    except FoundryError as exc:
        print(f"foundry: error: {exc}", file=sys.stderr)
        return None, str(exc)
    return handle, None


def _outcome(handle: RunHandle, world: World) -> dict[str, Any]:
    error = handle.error
    out: dict[str, Any] = {
        "rank": world.rank,
        "world_size": world.world_size,
        "state": str(handle.state),
        "step": handle.step,
        "cancel_step": handle.cancel_step,
        "error": None if error is None else error.message,
    }
    if world.is_main:
        out["summary"] = handle.result
    return out
