"""Checkpoints that survive a kill -9 and refuse tampering.

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
from pathlib import Path
from typing import Any

import torch

from foundry_kernel.atomic import atomic_write_bytes, atomic_write_text
from foundry_kernel.errors import FoundryError

log = logging.getLogger("foundry.checkpoint")
MANIFEST = "latest.json"


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
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        path = directory / Path(manifest["file"]).name
        expected = str(manifest["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
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
