"""LoRA students through peft: config errors, only adapters train, exact resume from an
adapter-only checkpoint, the adapter and merged exports, the preflight's counts, and the
fused loss strategy kept. Real tiny models (the session's Foundry-built teacher, tiny
transformers models built from configs), the real Trainer and the real job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from foundry_kernel import _lora
from foundry_kernel._context import RunContext
from foundry_kernel._models import load_causal_lm
from foundry_kernel.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LimitsConfig,
    LoraConfig,
    LossConfig,
    OptimConfig,
    load_config,
)
from foundry_kernel.data._blocks import build_data
from foundry_kernel.errors import ConfigError, RunCancelled
from foundry_kernel.run._job import run_job
from foundry_kernel.store import RunStore
from foundry_kernel.training._checkpoint import load_latest
from foundry_kernel.training._strategy import FusedLinearLoss, LogitsLoss, choose_strategy
from foundry_kernel.training._trainer import Trainer, TrainPlan

CPU = torch.device("cpu")
PLAN = TrainPlan(
    optim=OptimConfig(batch_size=4, lr=1e-2, warmup_steps=2),
    limits=LimitsConfig(max_steps=6),
    eval=EvalConfig(every_steps=3, max_batches=2),
    checkpoint=CheckpointConfig(every_steps=2),
    loss=LossConfig(ce_weight=0.5),
    seed=1,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- config


def test_lora_on_a_fresh_student_is_refused(runs_dir: Path) -> None:
    cfg = tiny_config_dict(runs_dir, student={"lora": {"rank": 4}})
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.field == "student.lora"


def test_auto_targets_without_a_peft_default_name_the_field() -> None:
    config = Olmo2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(ConfigError, match="'olmo2'") as info:
        _lora.apply_lora(Olmo2ForCausalLM(config), LoraConfig(), seed=0)
    assert info.value.field == "student.lora.target_modules"
    assert "q_proj" in str(info.value)  # the model's linear layers, to choose from


def test_a_target_list_naming_no_layer_is_refused_with_the_models_layers() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"\['qkv'\]") as info:
        _lora.apply_lora(model, LoraConfig(target_modules=["q_proj", "qkv"]), seed=0)
    assert info.value.field == "student.lora.target_modules"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "lm_head"):
        assert name in str(info.value)


# --------------------------------------------------------------------------- training


def _lora_params(model: torch.nn.Module, r: int, targets: tuple[str, ...]) -> int:
    """r * (in + out) for every targeted linear layer: LoRA's A (r x in) and B (out x r)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += r * (m.in_features + m.out_features)
    return total


@pytest.mark.parametrize(
    ("targets", "names"),
    [
        ("auto", ("q_proj", "v_proj")),
        (
            "all-linear",
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
        (["k_proj", "down_proj"], ("k_proj", "down_proj")),
    ],
)
def test_only_the_adapters_train_and_they_are_counted(targets: Any, names: tuple[str, ...]):
    base = tiny_llama()
    expected = _lora_params(base, 4, names)
    total_before = sum(p.numel() for p in base.parameters())
    model = _lora.apply_lora(base, LoraConfig(rank=4, target_modules=targets), seed=0)
    assert model is base  # injected in place: the transformers model is what trains
    counts = _lora.param_counts(model)
    assert counts.trainable == expected
    assert counts.total == total_before + expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir: Path) -> tuple[Any, Any]:
    teacher = load_causal_lm(str(tiny_teacher_dir), device=CPU)
    teacher.model.eval().requires_grad_(False)
    data = build_data(DataConfig(max_documents=40, seq_len=32), teacher.tokenizer, seed=0)
    return teacher, data


def _lora_student(tiny_teacher_dir: Path, lora: LoraConfig) -> torch.nn.Module:
    """A pretrained student (the teacher's own checkpoint) with adapters."""
    student = load_causal_lm(str(tiny_teacher_dir), device=CPU).model
    return _lora.apply_lora(student, lora, seed=7)


def _train(
    setup: Any,
    model: torch.nn.Module,
    plan: TrainPlan,
    ckpt: Path | None = None,
    *,
    stop_after: int | None = None,
    resume: bool = False,
) -> tuple[Trainer, dict[int, float]]:
    teacher, data = setup
    ctx = RunContext()
    losses: dict[int, float] = {}

    def sink(step: int, values: dict[str, float]) -> None:
        if "train/loss" in values:
            losses[step] = values["train/loss"]
        if stop_after is not None and step >= stop_after:
            ctx.cancel()

    trainer = Trainer(
        model,  # type: ignore[arg-type]
        data,
        plan,
        ctx=ctx,
        on_metrics=sink,
        teacher=teacher.model,
        vocab_size=len(teacher.tokenizer),
        ckpt_dir=ckpt,
    )
    try:
        trainer.fit(resume=resume)
    except RunCancelled:
        pass
    return trainer, losses


def test_training_moves_the_adapters_only(setup, tiny_teacher_dir: Path) -> None:
    model = _lora_student(tiny_teacher_dir, LoraConfig(rank=4, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, losses = _train(setup, model, PLAN)
    assert len(losses) == PLAN.max_steps
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert in_optimizer == _lora.param_counts(model).trainable
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if "lora_B" in name:  # B starts at zero; A moves too once B is non-zero
            assert moved, name
        elif "lora_" not in name:
            assert not moved, f"frozen {name} changed"
    assert trainer.loss_strategy.name == "fused"  # peft's layers keep transformers' forward


def test_the_fused_strategy_stays_unless_the_head_is_adapted(setup, tiny_teacher_dir: Path):
    adapted = _lora_student(tiny_teacher_dir, LoraConfig(target_modules="all-linear"))
    assert isinstance(choose_strategy("auto", adapted, None).strategy, FusedLinearLoss)
    head = _lora_student(tiny_teacher_dir, LoraConfig(target_modules=["q_proj", "lm_head"]))
    choice = choose_strategy("auto", head, None)
    assert isinstance(choice.strategy, LogitsLoss) and choice.fell_back
    assert "nn.Linear" in choice.reason


def test_resume_from_an_adapter_checkpoint_follows_the_uninterrupted_run(
    setup, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    lora = LoraConfig(rank=4, dropout=0.1, target_modules="all-linear")
    _, full = _train(setup, _lora_student(tiny_teacher_dir, lora), PLAN)
    ckpt = tmp_path / "ckpt"
    _, partial = _train(setup, _lora_student(tiny_teacher_dir, lora), PLAN, ckpt, stop_after=3)
    assert max(partial) == 3
    state = load_latest(ckpt)
    assert state is not None and state["step"] == 3  # the stop's checkpoint (on_stop)
    model_keys = set(state["model"])
    assert model_keys and all("lora_" in k for k in model_keys)  # no frozen base inside
    file_bytes = (ckpt / "step-00000003.pt").stat().st_size
    counts = _lora.param_counts(_lora_student(tiny_teacher_dir, lora))
    # adapters + two AdamW moments (+ ~1 KiB of pickling per tensor), not everything's
    assert 12 * counts.trainable < file_bytes < 12 * counts.trainable + 65_536
    assert file_bytes < 12 * counts.total / 2
    _, resumed = _train(setup, _lora_student(tiny_teacher_dir, lora), PLAN, ckpt, resume=True)
    assert sorted(resumed) == list(range(4, PLAN.max_steps + 1))
    for step, loss in resumed.items():
        assert loss == full[step], step  # bit for bit: same base, adapters, optimizer


def test_resume_with_other_adapters_is_refused(setup, tiny_teacher_dir: Path, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    _train(setup, _lora_student(tiny_teacher_dir, LoraConfig(rank=4)), PLAN, ckpt, stop_after=2)
    other = _lora_student(tiny_teacher_dir, LoraConfig(rank=4, target_modules=["k_proj"]))
    with pytest.raises(ConfigError) as info:
        _train(setup, other, PLAN, ckpt, resume=True)
    assert info.value.field == "student.lora"


def test_adapter_and_merged_folders_give_the_trained_models_logits(
    setup, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    model = _lora_student(tiny_teacher_dir, LoraConfig(rank=4, target_modules="all-linear"))
    _train(setup, model, PLAN.updated({"limits.max_steps": 3}))
    ids = setup[1].val.input_ids[:2]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    _lora.save_adapter(model, tmp_path / "adapter", base=str(tiny_teacher_dir))
    _lora.save_merged(model, tmp_path / "merged")  # consumes the adapters: last
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_teacher_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    over_base = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        a = over_base(input_ids=ids).logits
        m = merged(input_ids=ids).logits
    torch.testing.assert_close(a, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(m, a, atol=1e-5, rtol=0)
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)(input_ids=ids).logits
    assert (base_logits - a).abs().max() > 1e-3  # the adapters did change the model


# --------------------------------------------------------------------------- the job


def _run(
    cfg_dict: dict[str, Any],
    *,
    cancel_at: int | None = None,
    run_id: str | None = None,
    resume: bool = False,
) -> tuple[RunStore, str, dict[str, Any]]:
    cfg = load_config(cfg_dict)
    store = RunStore(cfg.runs_dir)
    if run_id is None:
        run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    ctx = RunContext(run_id)
    if cancel_at is not None:

        def on_event(event: Any) -> None:
            if event.kind == "step" and event.payload["step"] >= cancel_at:
                ctx.cancel()

        ctx._sink = on_event
    summary = run_job(cfg, store=store, run_id=run_id, ctx=ctx, resume=resume)
    return store, run_id, summary


def _losses(store: RunStore, run_id: str) -> dict[int, float]:
    return {r.step: r.value for r in store.metrics(run_id, ["train/loss"])}


def test_a_from_teacher_lora_job_exports_its_adapter_and_its_base(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    from peft import PeftModel

    lora = {"rank": 4, "target_modules": "all-linear", "export": "adapter"}
    cfg = tiny_config_dict(
        runs_dir, student={"init": "from_teacher", "lora": lora}, eval={"baseline": False}
    )
    store, run_id, summary = _run(cfg)
    record = summary["lora"]
    assert record["trainable_params"] < record["total_params"] / 4
    assert summary["student"]["trainable_params"] == record["trainable_params"]
    assert summary["student"]["params"] == record["total_params"]
    parts = summary["preflight"]["parts"]  # the preflight against the real counts
    assert parts["student_weights"] == 4 * record["total_params"]
    assert parts["student_grads"] == 4 * record["trainable_params"]
    assert parts["optimizer_state"] == 8 * record["trainable_params"]
    export = Path(summary["export_dir"])
    adapter_cfg = json.loads((export / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4
    assert Path(adapter_cfg["base_model_name_or_path"]) == (export / "base").resolve()
    assert (export / "tokenizer.json").is_file() and (export / "base" / "tokenizer.json").is_file()
    assert "LoRA: rank 4" in (export / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(export / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    assert not any("lora" in k for k in base_state)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    # The cut base is the teacher's (one layer of one), untouched: only the adapters moved.
    for name, p in teacher.state_dict().items():
        torch.testing.assert_close(base_state[name], p, atol=0, rtol=0)
    student = PeftModel.from_pretrained(base, export).eval()
    assert student.peft_config["default"].r == 4
    trained_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert trained_b and all(float(p.abs().max()) > 0 for p in trained_b)
    assert len(_losses(store, run_id)) == 6


def test_a_pretrained_lora_job_resumes_exactly_and_exports_merged(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    lora = {"rank": 4, "dropout": 0.1}  # export: merged (the default)
    cfg = tiny_config_dict(
        runs_dir,
        student={"init": "pretrained", "source": str(tiny_teacher_dir), "lora": lora},
        eval={"baseline": False},
        limits={"max_steps": 6},
    )
    store, full_id, full = _run(cfg)
    run_id = store.create_run(load_config(cfg).to_dict(), name="cut").run_id
    with pytest.raises(RunCancelled):
        _run(cfg, cancel_at=3, run_id=run_id)
    state = load_latest(store.run_dir(run_id) / "checkpoints" / "distill")
    assert state is not None and all("lora_" in k for k in state["model"])
    store, run_id, resumed = _run(cfg, run_id=run_id, resume=True)
    assert _losses(store, run_id) == _losses(store, full_id)
    merged = AutoModelForCausalLM.from_pretrained(resumed["export_dir"])
    assert not any("lora" in k for k in merged.state_dict())
    assert resumed["student"]["val_loss"] == full["student"]["val_loss"]
