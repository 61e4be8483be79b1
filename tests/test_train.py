"""The training loop: determinism, exact resume, accumulation, divergence, checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from foundry_kernel._context import RunContext
from foundry_kernel._models import LoadedModel, build_student, load_causal_lm
from foundry_kernel.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
)
from foundry_kernel.data._blocks import DataBundle, build_data
from foundry_kernel.errors import DivergenceError, RunCancelled
from foundry_kernel.training._checkpoint import CheckpointError, load_latest, save_checkpoint
from foundry_kernel.training._trainer import Trainer, TrainPlan

CPU = torch.device("cpu")
PLAN = TrainPlan(
    optim=OptimConfig(batch_size=4, lr=1e-2, warmup_steps=2),
    limits=LimitsConfig(max_steps=8),
    eval=EvalConfig(every_steps=4, max_batches=2),
    checkpoint=CheckpointConfig(every_steps=3),
    loss=LossConfig(ce_weight=0.5),
    seed=1,
)


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir: Path) -> tuple[LoadedModel, DataBundle]:
    teacher = load_causal_lm(str(tiny_teacher_dir), device=CPU)
    data = build_data(DataConfig(max_documents=40, seq_len=32), teacher.tokenizer, seed=0)
    return teacher, data


def _train(
    setup,
    plan: TrainPlan,
    ckpt: Path | None = None,
    *,
    stop_after: int | None = None,
    resume: bool = False,
) -> dict[int, dict[str, float]]:
    teacher, data = setup
    student = build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=CPU, seed=0
    )
    ctx = RunContext()
    log: dict[int, dict[str, float]] = {}

    def sink(step: int, values: dict[str, float]) -> None:
        log.setdefault(step, {}).update(values)
        if stop_after is not None and step >= stop_after:
            ctx.cancel()

    trainer = Trainer(
        student.model,
        data,
        plan,
        ctx=ctx,
        on_metrics=sink,
        teacher=teacher.model if plan.loss else None,
        vocab_size=len(teacher.tokenizer),
        ckpt_dir=ckpt,
    )
    try:
        trainer.fit(resume=resume)
    except RunCancelled:
        pass
    return log


def _losses(log: dict[int, dict[str, float]]) -> list[float]:
    return [log[s]["train/loss"] for s in sorted(log)]


def test_deterministic_same_seed(setup) -> None:
    a, b = _train(setup, PLAN), _train(setup, PLAN)
    assert _losses(a) == _losses(b)
    assert len(a) == PLAN.max_steps
    c = _train(setup, PLAN.updated({"seed": 2}))
    assert _losses(a) != _losses(c)


def test_loss_decreases_and_reports_parts(setup) -> None:
    log = _train(setup, PLAN.updated({"limits.max_steps": 20, "eval.every_steps": 10}))
    first, last = log[1], log[20]
    assert last["train/loss"] < first["train/loss"]
    assert {"train/kd", "train/ce", "train/lr", "train/grad_norm", "tokens_per_s"} <= set(first)
    assert {"val/loss", "val/ppl", "val/agreement", "val/kl"} <= set(log[10])
    assert math.isclose(log[20]["val/ppl"], math.exp(log[20]["val/loss"]), rel_tol=1e-6)


@pytest.mark.parametrize(("on_stop", "restart_at"), [(False, 3), (True, 5)])
def test_resume_follows_the_uninterrupted_trajectory(
    setup, tmp_path: Path, on_stop: bool, restart_at: int
) -> None:
    """Without a stop checkpoint (a crash) the run restarts from the periodic one at step 3;
    with it (a cancel) from step 5. Either way the rest matches an uninterrupted run."""
    plan = PLAN.updated({"checkpoint.on_stop": on_stop})
    full = _train(setup, plan)
    ckpt = tmp_path / "ckpt"
    partial = _train(setup, plan, ckpt, stop_after=5)
    assert max(partial) == 5
    assert load_latest(ckpt)["step"] == restart_at
    resumed = _train(setup, plan, ckpt, resume=True)
    assert sorted(resumed) == list(range(restart_at + 1, plan.max_steps + 1))
    for step in resumed:
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-6)


def test_cancel_mid_step_rewinds_its_batches(setup, tmp_path: Path) -> None:
    """A cancel between micro-batches loses the partial step but not its data position."""
    plan = PLAN.updated({"optim.grad_accum": 2, "optim.batch_size": 2})
    full = _train(setup, plan)
    teacher, data = setup
    student = build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=CPU, seed=0
    )
    ctx = RunContext()
    trainer = Trainer(
        student.model,
        data,
        plan,
        ctx=ctx,
        on_metrics=lambda s, v: None,
        teacher=teacher.model,
        vocab_size=len(teacher.tokenizer),
        ckpt_dir=tmp_path,
    )
    real_micro = trainer._micro_step
    calls = 0

    def micro(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2 * 4 + 1:  # first micro-batch of step 5
            ctx.cancel()
        return real_micro(*args, **kwargs)

    trainer._micro_step = micro
    with pytest.raises(RunCancelled):
        trainer.fit()
    assert load_latest(tmp_path)["step"] == 4
    resumed = _train(setup, plan, tmp_path, resume=True)
    for step in resumed:
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-6)


def test_gradient_accumulation_uses_global_token_count(setup) -> None:
    """grad_accum=2 over batch 2 sees the same 4 blocks as batch 4: same first-step loss."""
    ce_plan = PLAN.updated(
        {
            "loss": None,
            "limits.max_steps": 1,
            "eval.every_steps": 100,
            "checkpoint.every_steps": None,
        }
    )
    whole = _train(setup, ce_plan.updated({"optim.batch_size": 4}))
    _, data = setup
    from foundry_kernel.data._blocks import BatchSampler

    a = BatchSampler(len(data.train), 4, seed=1).next_indices()
    b = BatchSampler(len(data.train), 2, seed=1)
    assert torch.equal(torch.cat([b.next_indices(), b.next_indices()]), a)
    accum = _train(setup, ce_plan.updated({"optim.batch_size": 2, "optim.grad_accum": 2}))
    assert accum[1]["train/loss"] == pytest.approx(whole[1]["train/loss"], rel=1e-5)


def _exploding(plan: TrainPlan) -> TrainPlan:
    """lr 1e6 without clipping: far past what the schema accepts (lr <= 1), which is the
    point; ``model_copy`` builds the section without validation to simulate a divergence."""
    optim = plan.optim.model_copy(update={"lr": 1e6, "max_grad_norm": None})
    return dataclasses.replace(plan, optim=optim)


def test_divergence_fails_with_step_and_component(setup) -> None:
    plan = _exploding(PLAN.updated({"limits.max_steps": 30, "checkpoint.every_steps": None}))
    with pytest.raises(DivergenceError) as info:
        _train(setup, plan)
    assert info.value.step >= 1
    assert info.value.component in {"loss loss", "kd loss", "ce loss", "gradient"}
    assert "optim.lr" in str(info.value)


def test_nonfinite_skip_counts_then_fails(setup) -> None:
    plan = _exploding(
        PLAN.updated(
            {
                "limits.max_steps": 30,
                "checkpoint.every_steps": None,
                "limits.on_nonfinite": "skip",
                "limits.max_skips": 2,
            }
        )
    )
    with pytest.raises(DivergenceError):
        _train(setup, plan)


def test_checkpoint_tamper_and_crash_safety(tmp_path: Path) -> None:
    state = {"step": 1, "w": torch.ones(3)}
    save_checkpoint(tmp_path, 1, state, keep_last=2)
    save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(3)}, keep_last=2)
    save_checkpoint(tmp_path, 3, {"step": 3, "w": torch.zeros(3)}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == [
        "step-00000002.pt",
        "step-00000003.pt",
    ]
    assert load_latest(tmp_path)["step"] == 3
    # a half-written temp file from a crash is ignored; the manifest still names step 3
    (tmp_path / ".step-00000004.pt.dead.tmp").write_bytes(b"partial")
    assert load_latest(tmp_path)["step"] == 3
    target = tmp_path / "step-00000003.pt"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_latest(tmp_path)


def test_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    """A checkpoint whose hash matches but which holds arbitrary objects is still refused."""
    import hashlib
    import json
    import pickle

    class Evil:
        def __reduce__(self):  # pragma: no cover - must never run
            return (print, ("pwned",))

    blob = pickle.dumps({"x": Evil()})
    (tmp_path / "step-00000001.pt").write_bytes(blob)
    manifest = {"file": "step-00000001.pt", "step": 1, "sha256": hashlib.sha256(blob).hexdigest()}
    (tmp_path / "latest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="safely"):
        load_latest(tmp_path)
