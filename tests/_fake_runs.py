"""Finished runs written straight into a store (no training): for the card, export, CLI
and tables tests, which read what a run leaves behind, not how it got there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundry_kernel.config import load_config
from foundry_kernel.store import RunStore

RESULTS: dict[str, Any] = {
    "teacher": {"params": 1000, "val_ppl": 10.0, "val_loss": 2.3, "tokens_per_s": 50.0},
    "student": {
        "params": 250,
        "val_ppl": 20.0,
        "val_loss": 3.0,
        "agreement": 0.5,
        "tokens_per_s": 90.0,
    },
    "baseline": {
        "params": 250,
        "val_ppl": 30.0,
        "val_loss": 3.4,
        "agreement": 0.4,
        "tokens_per_s": 90.0,
    },
    "gap_closed": 0.37,
}


def finished_run(
    store: RunStore,
    *,
    overrides: list[str] | None = None,
    state: str = "completed",
    results: dict[str, Any] | None = None,
    student: bool = True,
) -> str:
    """A run in ``state`` with ``results`` as its summary and (``student``) a student folder
    holding a config, weights and a tokenizer file, as ``_export`` leaves one."""
    config = load_config(overrides=list(overrides or []))
    rec = store.create_run(config.to_dict(), name=config.name)
    if state != "pending":
        store.set_state(rec.run_id, "running")
        if state != "running":
            store.set_state(rec.run_id, state, error=None if state == "completed" else "boom")
    folder = store.run_dir(rec.run_id) / "student"
    summary = dict(RESULTS if results is None else results)
    if student:
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
        (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
        (folder / "README.md").write_text("old card", encoding="utf-8")
        summary["export_dir"] = str(folder)
    store.update_summary(rec.run_id, summary)
    return rec.run_id


def make_store(root: Path) -> RunStore:
    return RunStore(root)
