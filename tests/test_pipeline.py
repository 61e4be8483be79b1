"""The main job end to end on a tiny budget: summary, export, store records, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from foundry_kernel._context import RunContext
from foundry_kernel.config import load_config
from foundry_kernel.errors import RunCancelled
from foundry_kernel.run._job import model_card, run_job
from foundry_kernel.store import RunStore


def _run(
    cfg_dict: dict[str, Any],
    *,
    ctx: RunContext | None = None,
    run_id: str | None = None,
    resume: bool = False,
) -> tuple[RunStore, str, dict[str, Any]]:
    cfg = load_config(cfg_dict)
    store = RunStore(cfg.runs_dir)
    if run_id is None:
        run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    summary = run_job(cfg, store=store, run_id=run_id, ctx=ctx or RunContext(run_id), resume=resume)
    return store, run_id, summary


def test_run_job_summary_export_and_store(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    store, run_id, summary = _run(tiny_config)
    for part in ("teacher", "student", "baseline"):
        assert summary[part]["params"] > 0
        assert summary[part]["val_ppl"] > 1
    assert summary["student"]["params"] == summary["baseline"]["params"]
    assert summary["student"]["params"] < summary["teacher"]["params"]
    assert 0 <= summary["agreement"] <= 1
    assert summary["val_kl"] >= 0
    assert summary["data"]["split"]["shared_chunks_after"] == 0
    assert "val_docs_seen_by_teacher" in summary["data"]
    assert summary["data"]["val_docs_seen_by_teacher"] == 0
    assert len(summary["samples"]) == 1
    roles = ("teacher", "student", "baseline")
    assert set(summary["samples"][0]) == {"prompt", *roles, *(f"{r}_sampled" for r in roles)}
    export = Path(summary["export_dir"])
    assert (export / "config.json").is_file()
    assert (export / "tokenizer.json").is_file()
    assert "held-out perplexity" in (export / "README.md").read_text()
    assert json.loads((export / "foundry-metrics.json").read_text())["teacher"]["params"] > 0
    names = store.metric_names(run_id)
    assert "train/loss" in names and "baseline/train/loss" in names and "val/ppl" in names
    steps = [r.step for r in store.metrics(run_id, ["train/loss"])]
    assert steps == list(range(1, 7))
    stored = store.get_run(run_id).summary
    assert stored["student"]["val_ppl"] == summary["student"]["val_ppl"]


def test_cancel_then_resume_completes_without_duplicates(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    tiny_config["limits"]["max_steps"] = 8
    cfg = load_config(tiny_config)
    store = RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict(), name="resume").run_id
    ctx = RunContext(run_id)

    def on_event(event) -> None:
        if event.kind == "step" and event.payload["step"] >= 5:
            ctx.cancel()

    ctx._sink = on_event
    with pytest.raises(RunCancelled):
        run_job(cfg, store=store, run_id=run_id, ctx=ctx)
    assert max(r.step for r in store.metrics(run_id, ["train/loss"])) == 5
    summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id), resume=True)
    steps = [r.step for r in store.metrics(run_id, ["train/loss"])]
    assert steps == list(range(1, 9))
    assert summary["student"]["val_ppl"] > 1
    # the samples per validation continue the history the cancelled run had (step 3)
    assert [row["step"] for row in summary["distill_sample_history"]] == [3, 6, 8]


def test_model_card_mentions_gap() -> None:
    results = {
        "teacher": {"params": 100, "val_ppl": 10.0, "tokens_per_s": 50.0},
        "student": {"params": 25, "val_ppl": 20.0, "agreement": 0.5, "tokens_per_s": 90.0},
        "baseline": {"params": 25, "val_ppl": 30.0, "agreement": 0.4, "tokens_per_s": 90.0},
        "gap_closed": 0.37,
    }
    card = model_card(load_config(), results)
    assert "37%" in card and "25%" in card


def test_preflight_refuses_what_cannot_fit(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    from foundry_kernel.errors import ResourceError

    tiny_config["optim"]["batch_size"] = 65536
    tiny_config["data"]["seq_len"] = 512
    with pytest.raises(ResourceError) as info:
        _run(tiny_config)
    text = str(info.value)
    assert "GiB" in text and "batch_size" in text


def test_seq_len_beyond_context_is_a_config_error(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    from foundry_kernel.errors import ConfigError

    tiny_config["data"]["seq_len"] = 4096
    with pytest.raises(ConfigError, match=r"data\.seq_len=4096") as info:
        _run(tiny_config)
    assert info.value.field == "data.seq_len"


def test_preflight_estimate_recorded(tiny_config: dict[str, Any], tiny_teacher_dir: Path) -> None:
    tiny_config["eval"]["baseline"] = False
    tiny_config["limits"]["max_steps"] = 1
    store, run_id, summary = _run(tiny_config)
    assert summary["preflight"]["estimate_bytes"] > 0
    assert store.get_run(run_id).summary["preflight"]["disk_free_bytes"] > 0
