"""Which process of a data-parallel job this is, and the few collectives the engine uses.

One value, :class:`World`, crosses every boundary that data parallelism touches (the job,
the trainer, evaluation, the logit cache, the teacher server), so no module reads
``RANK``/``WORLD_SIZE`` from the environment on its own or calls ``torch.distributed``
behind another's back. A single process is ``World()`` (rank 0 of 1): every collective is
then the identity, so single-process code paths are the distributed ones with W = 1, not a
second copy of them.

The launcher is torchrun (``torch.distributed.run``, the elastic agent); it sets the
environment that :func:`world_from_env` reads. :func:`init_world` starts the default process
group once per process with the configured backend and collective timeout, and
:func:`close_world` ends it. Collectives are torch's own (``all_reduce``, ``broadcast``,
``all_gather_object``); Foundry adds none of its own.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "World",
    "WorldEnvError",
    "close_world",
    "init_world",
    "launched_by_torchrun",
    "resolve_backend",
    "world_from_env",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


class WorldEnvError(ValueError):
    """The torchrun environment variables are present but inconsistent."""


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``World()`` is a single process.

    ``rank``/``world_size`` are global; ``local_rank``/``local_world_size`` count the
    processes of this node (one per GPU); ``node_rank`` is torchrun's ``GROUP_RANK``.
    ``backend`` is the process group's backend once :func:`init_world` ran (None for a
    single process, which has no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise WorldEnvError(f"rank {self.rank} is not in a world of {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise WorldEnvError(
                f"local rank {self.local_rank} is not in a node of {self.local_world_size}"
            )

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's summary, metrics and export."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """Local rank 0: the one process per node that starts node-wide services (a vLLM
        teacher server)."""
        return self.local_rank == 0

    @property
    def label(self) -> str:
        """``rank 1/2`` for messages; empty for a single process."""
        return f"rank {self.rank}/{self.world_size}" if self.distributed else ""

    # -- collectives (identities for a single process) ---------------------------------

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum ``tensor`` over all ranks in place and return it (one collective)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` holds it, on every rank (pickled: plain data only)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled: plain data only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (bounded by the process group's timeout)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, n: int) -> tuple[int, int]:
        """The ``[start, stop)`` of this rank's contiguous share of ``n`` items: shares
        differ by at most one item, the first ``n % world_size`` ranks take the extra one
        (the same rule as ``torch.tensor_split``)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise WorldEnvError(f"${name}={raw!r} is not an integer") from None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a torchrun worker (torchrun sets ``RANK`` and
    ``WORLD_SIZE``, and ``TORCHELASTIC_RUN_ID`` for its agent's workers)."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The :class:`World` torchrun's environment describes (``World()`` outside torchrun).

    Does not start a process group: see :func:`init_world`.
    """
    env = os.environ if env is None else env
    if not launched_by_torchrun(env):
        return World()
    world_size = _int_env(env, "WORLD_SIZE", 1)
    return World(
        rank=_int_env(env, "RANK", 0),
        world_size=world_size,
        local_rank=_int_env(env, "LOCAL_RANK", 0),
        local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", world_size),
        node_rank=_int_env(env, "GROUP_RANK", 0),
    )


def resolve_backend(backend: str, device_type: str) -> str:
    """``auto`` is nccl on CUDA and gloo on CPU; an explicit nccl on CPU is refused by
    ``config.distributed.backend``'s caller with the field named."""
    if backend != "auto":
        return backend
    return "nccl" if device_type == "cuda" else "gloo"


def init_world(
    *, backend: str = "auto", device_type: str = "cpu", timeout_s: float = 600.0
) -> World:
    """Start this process's default process group from torchrun's environment and return
    its :class:`World`; a single process gets ``World()`` and no group.

    Idempotent within a process (a second call returns the running group's world). On
    CUDA each process takes the GPU of its local rank before the group starts, so NCCL
    binds one device per rank.
    """
    world = world_from_env()
    if not world.distributed:
        return world
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return World(**{**world.__dict__, "backend": str(dist.get_backend())})
    chosen = resolve_backend(backend, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    device_id = torch.device("cuda", world.local_rank) if chosen == "nccl" else None
    dist.init_process_group(
        backend=chosen, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id
    )
    return World(**{**world.__dict__, "backend": chosen})


def close_world(world: World, *, meet: bool = True) -> None:
    """End the default process group if this process started one (safe to call twice).

    Why not just ``destroy_process_group``: gloo's worker threads release a finished
    collective's tensors while holding the group's lock, and releasing a tensor Python
    still knows needs the GIL; a group destroyed (or dropped by the last DDP reducer, or
    at interpreter exit) while one is still doing that deadlocks or aborts (seen here: a
    rank hung in ``~ProcessGroupGloo``, another died of SIGABRT after its work was done).
    So every rank first meets the others at a barrier (``meet``; skipped on a rank that
    is failing, whose peers may be gone), which finishes every earlier collective, and
    unreachable wrappers (DDP reducers hold the group too) are collected before the group
    is destroyed. Callers should drop their wrapped models first.
    """
    if not world.distributed:
        return
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if meet:
        try:
            dist.barrier()
        except RuntimeError:  # a peer already left or died: nothing more to finish with it
            pass
    gc.collect()
    dist.destroy_process_group()
