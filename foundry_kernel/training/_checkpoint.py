"""Checkpoints that survive a kill -9 and refuse tampering.

Two formats behind one manifest. A single process writes one file (below). A data-parallel
job writes a ``torch.distributed.checkpoint`` (DCP) folder per step, ``step-00000010/``:
each rank writes its own part of the model and optimizer state, rank 0 adds the trainer's
counters and sampler position (``trainer.json``, identical on every rank by construction,
which is checked), and only after every rank has finished does rank 0 write the manifest,
listing each file with its SHA-256. DCP stores tensors with their global shapes, so a
folder written by N ranks loads on M ranks (or on one process): it reshards.

A checkpoint is one ``torch.save`` file written atomically, plus a manifest
(``latest.json``, also atomic) naming it with its SHA-256. The manifest is
written *after* the file, so a crash mid-write leaves the previous manifest
pointing at the previous, intact checkpoint. Loading uses
``weights_only=True`` (no arbitrary pickles) and checks the hash, so a file
that was altered on disk is refused instead of executed or half-trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from foundry_kernel.atomic import atomic_write_bytes, atomic_write_text
from foundry_kernel.errors import FoundryError

log = logging.getLogger("foundry.checkpoint")
MANIFEST = "latest.json"
SHARDED = "dcp"
TRAINER_STATE = "trainer.json"
EXTRA_STATE = "extra.pt"  # a loss strategy's own parameters and optimizer (replicated)


class CheckpointError(FoundryError):
    """A checkpoint is missing, corrupt or was modified."""


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], *, keep_last: int) -> Path:
    """Write ``state`` as checkpoint ``step``, point the manifest at it, prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = directory / f"step-{step:08d}.pt"
    atomic_write_bytes(path, data)
    manifest = {"file": path.name, "step": step, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest))
    _prune(directory, keep=keep_last, current=path.name)
    return path


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest complete checkpoint's state, or None when there is none yet."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = _read_manifest(manifest_path)
    if manifest.get("format") == SHARDED:
        raise CheckpointError(
            f"checkpoint {manifest_path} is a sharded (DCP) checkpoint: load it with "
            "load_sharded (the Trainer does this by itself)"
        )
    try:
        path = directory / Path(manifest["file"]).name
        expected = str(manifest["sha256"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {exc}") from exc
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} named by {manifest_path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {path} does not match its recorded SHA-256: it was modified or "
            "damaged after it was written; refusing to load it"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be loaded safely: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state


def _prune(directory: Path, *, keep: int, current: str) -> None:
    files = sorted(directory.glob("step-*.pt"))
    for old in files[:-keep]:
        if old.name != current:
            old.unlink(missing_ok=True)
    for tmp in directory.glob(".step-*.tmp"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- both formats


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint manifest {path} is not a JSON object")
    return manifest


def latest_format(directory: Path) -> str | None:
    """``"file"`` (one process's checkpoint), ``"dcp"`` (sharded) or None (no checkpoint)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    return SHARDED if _read_manifest(path).get("format") == SHARDED else "file"


# --------------------------------------------------------------------------- sharded (DCP)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The files this rank wrote into a DCP folder: its ``__{rank}_*.distcp`` parts, and for
    rank 0 the ``.metadata`` and the trainer state. Hashed by their writer, so a job
    without a shared filesystem can still list them."""
    own = sorted(folder.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        names = (".metadata", TRAINER_STATE, EXTRA_STATE)
        own += [folder / n for n in names if (folder / n).is_file()]
    return own


def save_sharded(
    directory: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    world: Any,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write step ``step`` as a DCP folder (every rank calls this: it is a collective), then
    point the manifest at it (rank 0, last) and prune old folders.

    ``model`` is the HF model (its own parameter names, so the folder loads into one
    process or any other world size); ``trainer_state`` (step, skipped, sampler) is plain
    JSON and must be identical on every rank. ``extra`` (a loss strategy's own
    parameters and optimizer state, replicated on every rank) is rank 0's ``extra.pt``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    states = world.all_gather_object(trainer_state)
    if any(other != trainer_state for other in states):
        raise CheckpointError(
            f"the ranks disagree on the trainer state at step {step} ({states}): the data "
            "order or a skip decision diverged between ranks; refusing to checkpoint"
        )
    name = f"step-{step:08d}"
    folder = directory / name
    # The manifest already names this step (a resumed run stopping before its next step):
    # the state is that checkpoint's; rewriting its folder would open a window with none.
    current = world.broadcast_object(_current_dir(directory) if world.is_main else None)
    if current == name:
        return folder
    if world.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # left by a crash before its manifest: never referenced
            shutil.rmtree(folder)
        folder.mkdir()
    world.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options(model))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    if world.is_main:
        atomic_write_text(folder / TRAINER_STATE, json.dumps(trainer_state))
        if extra is not None:
            buffer = io.BytesIO()
            torch.save(extra, buffer)
            atomic_write_bytes(folder / EXTRA_STATE, buffer.getvalue())
    hashes = {p.name: _sha256(p) for p in _own_files(folder, world.rank)}
    every = world.all_gather_object(hashes)  # also the barrier: every rank has written
    if world.is_main:
        files: dict[str, str] = {}
        for part in every:
            files.update(part)
        manifest = {
            "format": SHARDED,
            "dir": name,
            "step": step,
            "world_size": world.world_size,
            "files": files,
        }
        atomic_write_text(directory / MANIFEST, json.dumps(manifest))
        _prune_sharded(directory, keep=keep_last, current=name)
    world.barrier()
    return folder


def _current_dir(directory: Path) -> str | None:
    """The folder the manifest names, if it is a sharded checkpoint's."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = _read_manifest(path)
    return str(manifest.get("dir")) if manifest.get("format") == SHARDED else None


def load_sharded(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: Any
) -> dict[str, Any] | None:
    """Load the newest sharded checkpoint into ``model``/``optimizer`` (resharded to this
    world) and return its trainer state; None when there is no checkpoint. Every file is
    checked against its recorded SHA-256 first (each rank checks its share of them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = _read_manifest(manifest_path)
    try:
        folder = directory / Path(str(manifest["dir"])).name
        files = {Path(str(k)).name: str(v) for k, v in dict(manifest["files"]).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {exc}") from exc
    problems = []
    for i, (fname, expected) in enumerate(sorted(files.items())):
        if i % world.world_size != world.rank:
            continue
        path = folder / fname
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif _sha256(path) != expected:
            problems.append(f"{path} does not match its recorded SHA-256")
    found = [p for part in world.all_gather_object(problems) for p in part]
    if found:
        raise CheckpointError(
            f"sharded checkpoint {folder} is damaged ({'; '.join(found)}): it was modified "
            "or damaged after it was written; refusing to load it"
        )
    options = _dcp_options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))  # in place
    set_state_dict(
        model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
    )
    trainer_state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"{folder / TRAINER_STATE} does not hold the trainer state")
    return trainer_state


def load_sharded_extra(directory: Path) -> dict[str, Any] | None:
    """The newest sharded checkpoint's ``extra.pt`` (checked against the manifest's
    SHA-256, loaded with ``weights_only``), or None when it has none."""
    manifest = _read_manifest(directory / MANIFEST)
    folder = directory / Path(str(manifest.get("dir"))).name
    expected = dict(manifest.get("files") or {}).get(EXTRA_STATE)
    path = folder / EXTRA_STATE
    if expected is None or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path} does not match its recorded SHA-256; refusing to load it")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state if isinstance(state, dict) else None


def _prune_sharded(directory: Path, *, keep: int, current: str) -> None:
    folders = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in folders[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    _prune(directory, keep=keep, current=current)


def _frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _dcp_options(model: torch.nn.Module, **extra: Any) -> Any:
    """DCP's state-dict options: a partly frozen model (a LoRA student) saves and loads only
    what trains - its frozen base is rebuilt from its source by the resumed run - so the
    frozen keys are neither written nor required (``strict=False``; the loaded keys are
    exactly the trainable ones, which DCP requires the folder to hold)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if _frozen(model):
        return StateDictOptions(ignore_frozen_params=True, strict=False, **extra)
    return StateDictOptions(**extra)


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
) -> None:
    """Load a one-process checkpoint's full states into a (possibly sharded) model and its
    optimizer: the model's by name, the optimizer's re-keyed from parameter positions to
    names (the order ``optimizer``'s groups hold them in), then resharded to this rank.
    Every rank calls it with the same full states."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    by_position: list[str] = []
    for group in optimizer.param_groups:
        by_position.extend(names[id(p)] for p in group["params"])
    try:
        state = {by_position[int(k)]: v for k, v in optim_state["state"].items()}
        groups = [
            {**g, "params": [by_position[int(i)] for i in g["params"]]}
            for g in optim_state["param_groups"]
        ]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state does not match this model's parameters: {exc}"
        ) from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict={"state": state, "param_groups": groups},
        options=_dcp_options(model, full_state_dict=True),
    )
