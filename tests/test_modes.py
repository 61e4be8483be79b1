"""Distillation modes end to end with the in-process (``hf``) teacher, on a tiny budget.

offline (logit cache captured once, then reused), sequence (teacher-written completions),
on_policy (student samples scored by the teacher, deterministic across a resume), the
config rules that tie the modes to other sections, and the CLI's JSON for a mode.
The vLLM backend of the same modes is tested in ``test_vllm_teacher.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config_dict
from safetensors.torch import load_file

from foundry_kernel._context import Event, RunContext
from foundry_kernel._models import load_causal_lm
from foundry_kernel.config import DataConfig, load_config
from foundry_kernel.data._blocks import build_data
from foundry_kernel.errors import ConfigError, RunCancelled
from foundry_kernel.run._job import run_job
from foundry_kernel.store import RunStore
from foundry_kernel.teachers._interface import HFTeacher

CPU = torch.device("cpu")
SEQ_LEN = 32  # tiny_config_dict's data.seq_len
BATCH = 4  # tiny_config_dict's optim.batch_size
DOCS = 4  # 192 training blocks of 32 tokens: a capture takes about a second

# Offline at k = V against online full-vocabulary training. The cache stores log-probs in
# fp16 (11-bit significand: each value within 2^-11 ~ 4.9e-4 relative of the fp32 one);
# "renormalize" over all V ids is otherwise the dense loss exactly. Measured over 6 steps
# here: 1.3e-5 on train/loss and 6.5e-5 on the held-out loss. The tolerances leave 10-15x
# headroom, and stay far below a real difference: training on the top-8 instead of all V
# ids moved the held-out loss by 0.19.
TRAIN_LOSS_TOL = 2e-4
VAL_LOSS_TOL = 1e-3


# --------------------------------------------------------------------------- helpers


def _config(runs_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny run on 4 documents, without the CE-only baseline (not what is tested)."""
    cfg = tiny_config_dict(runs_dir, data={"max_documents": DOCS}, eval={"baseline": False})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def _run(
    cfg_dict: dict[str, Any],
    *,
    run_id: str | None = None,
    resume: bool = False,
    sink: Callable[[Event], None] | None = None,
) -> tuple[RunStore, str, dict[str, Any]]:
    cfg = load_config(cfg_dict)
    store = RunStore(cfg.runs_dir)
    if run_id is None:
        run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    ctx = RunContext(run_id, sink=sink)
    summary = run_job(cfg, store=store, run_id=run_id, ctx=ctx, resume=resume)
    return store, run_id, summary


def _series(store: RunStore, run_id: str, name: str) -> dict[int, float]:
    return {row.step: row.value for row in store.metrics(run_id, [name])}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Calls:
    count: int = 0


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> Calls:
    """Count calls to a real method (it still runs): proves whether the teacher was asked."""
    real = getattr(cls, name)
    calls = Calls()

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.fixture
def fresh_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_teacher_dir: Path
) -> tuple[Path, str]:
    """An empty FOUNDRY_CACHE_DIR (logit caches start empty) and the session's tiny
    teacher as a local folder (so nothing needs building in the empty cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(cache))
    return cache, str(tiny_teacher_dir)


def _vocab(teacher_dir: Path) -> int:
    return int(json.loads((teacher_dir / "config.json").read_text())["vocab_size"])


# --------------------------------------------------------------------------- offline


def test_offline_captures_once_then_trains_from_the_cache(
    runs_dir: Path, fresh_cache: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, teacher = fresh_cache
    asked = _count_calls(monkeypatch, HFTeacher, "signal")
    cfg = _config(
        runs_dir, teacher={"source": teacher}, distill={"mode": "offline"}, loss={"top_k": 8}
    )
    store, first_id, first = _run(cfg)
    lc = first["logit_cache"]
    folder = Path(lc["path"])
    assert lc["k"] == 8 and folder.parent == cache_dir / "logits"
    blocks = first["data"]["blocks"]["train"]
    assert asked.count == math.ceil(blocks / BATCH)  # one teacher call per capture batch
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert shards
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["key"]["k"] == 8
    # The cache's own figure is the shard bytes over the token positions stored ...
    on_disk = sum(p.stat().st_size for p in shards) / (blocks * SEQ_LEN)
    assert lc["bytes_per_token"] == pytest.approx(on_disk, rel=1e-12)
    # ... with the default compressed codec: below the exact layout's 4k + 4
    assert manifest["codec"]["name"] == "compressed"
    assert 0 < lc["bytes_per_token"] < 4 * 8 + 4
    before = {p.name: (_sha256(p), p.stat().st_mtime_ns) for p in shards}

    asked.count = 0
    _, second_id, second = _run(cfg)
    assert asked.count == 0  # training targets came from disk, not from the teacher
    assert second["logit_cache"]["path"] == lc["path"]
    after = {p.name: (_sha256(p), p.stat().st_mtime_ns) for p in folder.glob("shard-*")}
    assert after == before
    assert _series(store, second_id, "train/loss") == _series(store, first_id, "train/loss")


def test_offline_reads_the_next_step_ahead_and_trains_the_same(
    runs_dir: Path, fresh_cache: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer announces each next step's blocks (``Teacher.prefetch``) and the cached
    teacher decodes them on its reader thread meanwhile: every training step after the
    first is served from a read-ahead, nothing past the last step is read, and the run is
    the same, loss for loss, as one with the read-ahead turned off."""
    from foundry_kernel.teachers._interface import CachedTeacher

    _, teacher = fresh_cache
    cfg = _config(
        runs_dir, teacher={"source": teacher}, distill={"mode": "offline"}, loss={"top_k": 8}
    )
    served: list[str] = []
    announced: list[tuple[int, ...]] = []
    real_signal, real_prefetch = CachedTeacher.signal, CachedTeacher.prefetch

    def signal(self: CachedTeacher, index: Any, *args: Any) -> Any:
        if index is not None:
            key = tuple(int(i) for i in index.reshape(-1).tolist())
            served.append("ahead" if key in self._ahead else "direct")
        return real_signal(self, index, *args)

    def prefetch(self: CachedTeacher, index: Any) -> None:
        announced.append(tuple(int(i) for i in index.reshape(-1).tolist()))
        real_prefetch(self, index)

    monkeypatch.setattr(CachedTeacher, "signal", signal)
    monkeypatch.setattr(CachedTeacher, "prefetch", prefetch)
    store, ahead_id, summary = _run(cfg)
    steps, accum = cfg["limits"]["max_steps"], cfg["optim"].get("grad_accum", 1)
    assert summary["student"]["val_loss"] > 0
    assert served == ["direct"] * accum + ["ahead"] * ((steps - 1) * accum)
    assert len(announced) == (steps - 1) * accum  # none after the last step
    monkeypatch.setattr(CachedTeacher, "max_ahead", 0)
    served.clear()
    _, plain_id, _ = _run(cfg)
    assert served == ["direct"] * steps
    assert _series(store, ahead_id, "train/loss") == _series(store, plain_id, "train/loss")


def test_offline_at_full_vocabulary_matches_online(
    runs_dir: Path, fresh_cache: tuple[Path, str], tiny_teacher_dir: Path
) -> None:
    _, teacher = fresh_cache
    vocab = _vocab(tiny_teacher_dir)
    online_cfg = _config(runs_dir, teacher={"source": teacher})
    store, online_id, online = _run(online_cfg)
    offline_cfg = _config(
        runs_dir,
        teacher={"source": teacher},
        distill={"mode": "offline", "cache_codec": "exact"},  # exact: fp16 vs online's fp32
        loss={"top_k": vocab, "top_k_mass": "renormalize"},
    )
    _, offline_id, offline = _run(offline_cfg)
    assert online.get("logit_cache") is None
    assert offline["logit_cache"]["k"] == vocab
    assert offline["logit_cache"]["bytes_per_token"] >= 4 * vocab + 4
    a = _series(store, online_id, "train/loss")
    b = _series(store, offline_id, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=TRAIN_LOSS_TOL), step
    assert offline["student"]["val_loss"] == pytest.approx(
        online["student"]["val_loss"], abs=VAL_LOSS_TOL
    )


# --------------------------------------------------------------------------- sequence

PROMPT, NEW, PROMPTS = 8, 16, 8


def _sequence_config(runs_dir: Path, **sequence: Any) -> dict[str, Any]:
    values = {"num_prompts": PROMPTS, "prompt_tokens": PROMPT, "max_new_tokens": NEW, **sequence}
    return _config(runs_dir, distill={"mode": "sequence", "sequence": values})


def test_sequence_mode_trains_on_the_teachers_completions(
    runs_dir: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated = _count_calls(monkeypatch, HFTeacher, "generate")
    cfg = _sequence_config(runs_dir, temperature=0.0)
    store, run_id, summary = _run(cfg)
    seq = summary["sequence"]
    assert seq["blocks"] == PROMPTS and seq["generated_tokens"] == PROMPTS * NEW
    assert seq["reused"] is False and generated.count >= 1
    path = Path(seq["path"])
    assert path.suffix == ".safetensors"
    saved = load_file(path)
    ids, mask, labels = saved["input_ids"], saved["attention_mask"], saved["labels"]
    end = PROMPT + NEW
    assert bool((labels[:, :PROMPT] == -100).all())  # no loss on the prompt
    assert torch.equal(labels[:, PROMPT:end], ids[:, PROMPT:end])  # loss on the completion
    assert bool((labels[:, end:] == -100).all()) and bool((mask[:, end:] == 0).all())
    assert bool((mask[:, :end] == 1).all())

    teacher = load_causal_lm(str(tiny_teacher_dir), device=CPU)
    tok = teacher.tokenizer
    prompts = ids[:, :PROMPT].tolist()
    train = build_data(DataConfig(max_documents=DOCS, seq_len=SEQ_LEN), tok, seed=0).train
    starts = {tuple(row) for row in train.input_ids[:, :PROMPT].tolist()}
    assert all(tuple(p) in starts for p in prompts)  # prompts are training-block starts
    greedy = HFTeacher(teacher.model, pad_token_id=tok.pad_token_id).generate(
        prompts, max_new_tokens=NEW, temperature=0.0, seed=123
    )
    assert greedy == ids[:, PROMPT:end].tolist()  # exactly the teacher's greedy text

    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [tok.decode(p) for p in prompts]
    assert [r["completion"] for r in rows] == [tok.decode(c) for c in greedy]
    names = store.metric_names(run_id)
    assert "train/loss" in names and "train/kd" not in names  # plain cross-entropy

    digest = _sha256(path)
    generated.count = 0
    _, _, again = _run(cfg, run_id=run_id, resume=True)
    assert again["sequence"]["reused"] is True and again["sequence"]["path"] == str(path)
    assert generated.count == 0 and _sha256(path) == digest


def test_sequence_logit_kd_also_matches_the_teachers_distribution(runs_dir: Path) -> None:
    store, run_id, summary = _run(_sequence_config(runs_dir, logit_kd=True))
    assert summary["sequence"]["blocks"] == PROMPTS
    kd = _series(store, run_id, "train/kd")
    assert sorted(kd) == list(range(1, 7))
    assert all(math.isfinite(v) and v > 0 for v in kd.values())


# --------------------------------------------------------------------------- on-policy


def _on_policy_config(runs_dir: Path, fraction: float, max_steps: int) -> dict[str, Any]:
    on_policy = {"fraction": fraction, "prompt_tokens": 8, "max_new_tokens": 8}
    return _config(
        runs_dir,
        distill={"mode": "on_policy", "on_policy": on_policy},
        limits={"max_steps": max_steps},
    )


def test_on_policy_fraction_one_trains_on_student_samples_every_step(runs_dir: Path) -> None:
    store, run_id, _ = _run(_on_policy_config(runs_dir, 1.0, 4))
    flags = _series(store, run_id, "train/on_policy")
    assert flags == {step: 1.0 for step in range(1, 5)}
    loss, kd = _series(store, run_id, "train/loss"), _series(store, run_id, "train/kd")
    for step in flags:  # no hard-label CE on the student's own samples: loss is all KD
        assert loss[step] == pytest.approx(kd[step], rel=1e-6)


def test_on_policy_fraction_zero_is_online(runs_dir: Path) -> None:
    store, policy_id, _ = _run(_on_policy_config(runs_dir, 0.0, 4))
    _, online_id, _ = _run(_config(runs_dir, limits={"max_steps": 4}))
    assert _series(store, policy_id, "train/on_policy") == {s: 0.0 for s in range(1, 5)}
    assert _series(store, policy_id, "train/loss") == _series(store, online_id, "train/loss")


def test_on_policy_cancel_and_resume_follows_the_uninterrupted_trajectory(
    runs_dir: Path,
) -> None:
    steps, cancel_at = 6, 4
    cfg = _on_policy_config(runs_dir, 0.5, steps)
    store, full_id, _ = _run(cfg)
    flags = _series(store, full_id, "train/on_policy")
    # The choice is random.Random(f"{seed}:{step}") < fraction: here off, on, on, on, off, on,
    # so the resumed part (steps 5 and 6) has both kinds of step.
    expected = {s + 1: float(random.Random(f"0:{s}").random() < 0.5) for s in range(steps)}
    assert flags == expected
    assert {expected[s] for s in range(cancel_at + 1, steps + 1)} == {0.0, 1.0}

    parsed = load_config(cfg)
    run_id = store.create_run(parsed.to_dict(), name="cut").run_id

    def cancel(event: Event) -> None:
        if event.kind == "step" and event.payload["step"] >= cancel_at:
            ctx.cancel()

    ctx = RunContext(run_id, sink=cancel)
    with pytest.raises(RunCancelled):
        run_job(parsed, store=store, run_id=run_id, ctx=ctx)
    assert max(_series(store, run_id, "train/loss")) == cancel_at
    _run(cfg, run_id=run_id, resume=True)
    full, resumed = _series(store, full_id, "train/loss"), _series(store, run_id, "train/loss")
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    assert _series(store, run_id, "train/on_policy") == expected


# --------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"distill": {"mode": "offline"}}, "loss.top_k"),
        (
            {"distill": {"mode": "sequence", "sequence": {"prompt_tokens": SEQ_LEN}}},
            "distill.sequence.prompt_tokens",
        ),
        (
            {"distill": {"mode": "on_policy", "on_policy": {"prompt_tokens": 40}}},
            "distill.on_policy.prompt_tokens",
        ),
        ({"teacher": {"url": "http://127.0.0.1:8000"}}, "teacher.url"),
        ({"teacher": {"backend": "vllm", "url": "ftp://127.0.0.1:8000"}}, "teacher.url"),
        ({"teacher": {"backend": "vllm", "url": "http://h:8000/v1?x=1"}}, "teacher.url"),
    ],
)
def test_bad_combinations_name_the_field(
    tmp_path: Path, sections: dict[str, dict[str, Any]], field: str
) -> None:
    cfg = tiny_config_dict(tmp_path, loss={"top_k": 8} if field != "loss.top_k" else {})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.field == field
    assert field in str(info.value)


# --------------------------------------------------------------------------- CLI


def test_cli_offline_json_reports_the_logit_cache(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    cfg = _config(tmp_path / "runs", teacher={"source": str(tiny_teacher_dir)})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    args = ["--config", str(path), "--set", "distill.mode=offline", "--set", "loss.top_k=8"]
    proc = subprocess.run(
        [sys.executable, "-m", "foundry_kernel.cli", "distill", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FOUNDRY_CACHE_DIR": str(cache)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "completed"
    lc = summary["logit_cache"]
    assert lc["k"] == 8 and 0 < lc["bytes_per_token"] < 4 * 8 + 4  # compressed (default)
    assert Path(lc["path"]).parent == cache / "logits"
    assert (Path(lc["path"]) / "manifest.json").is_file()
    assert summary["sequence"] is None
