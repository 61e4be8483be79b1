"""The micro-step's loss strategy: fused and logits train alike, the fused path goes through
the model's forward, and a model that cannot take the fused loss falls back (auto) or is
refused (fused) with the reason and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from foundry_kernel._context import Event, RunContext
from foundry_kernel._models import LoadedModel, build_student, load_causal_lm
from foundry_kernel.config import (
    DataConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    load_config,
)
from foundry_kernel.data._blocks import DataBundle, TokenBlocks, build_data
from foundry_kernel.errors import ConfigError
from foundry_kernel.teachers._interface import HFTeacher, Teacher
from foundry_kernel.teachers._targets import TeacherSignal
from foundry_kernel.training._losses import LossOutput, LossSpec
from foundry_kernel.training._strategy import (
    LossSetup,
    MicroBatch,
    choose_strategy,
    fused_eligibility,
)
from foundry_kernel.training._trainer import Trainer, TrainPlan

CPU = torch.device("cpu")
PLAN = TrainPlan(
    optim=OptimConfig(batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1),
    limits=LimitsConfig(max_steps=3),
    eval=EvalConfig(every_steps=100, max_batches=1),
    loss=LossConfig(ce_weight=0.5),
    seed=3,
)


class LogitsTeacher(Teacher):
    """An in-process teacher that answers with its dense logits through the Teacher
    interface only (the fused strategy cannot project it, so it gets the logits)."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.inner = HFTeacher(model, vocab_size=vocab_size)

    def signal(self, index: Tensor | None, input_ids: Tensor, attention_mask: Tensor) -> Any:
        return self.inner.signal(index, input_ids, attention_mask)

    def eval_signal(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherSignal:
        return self.inner.eval_signal(input_ids, attention_mask)

    def generate(self, prompts: Any, **kwargs: Any) -> list[list[int]]:
        return self.inner.generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir: Path) -> tuple[LoadedModel, DataBundle]:
    """The tiny teacher and data whose training blocks are partly masked: some blocks end
    in padding (attention 0, label -100), some start with an unscored prompt (label -100)."""
    teacher = load_causal_lm(str(tiny_teacher_dir), device=CPU)
    data = build_data(DataConfig(max_documents=40, seq_len=32), teacher.tokenizer, seed=0)
    ids, mask, labels = (t.clone() for t in dataclasses.astuple(data.train))
    n = ids.shape[0]
    padded = torch.arange(n) % 3 == 0
    mask[padded, -7:] = 0
    labels[padded, -7:] = -100
    ids[padded, -7:] = teacher.tokenizer.pad_token_id or 0
    labels[torch.arange(n) % 2 == 1, :5] = -100
    train = TokenBlocks(input_ids=ids, attention_mask=mask, labels=labels)
    return teacher, dataclasses.replace(data, train=train)


def _student(teacher: LoadedModel) -> Any:
    return build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=CPU, seed=0
    ).model


def _trainer(setup, plan: TrainPlan, teacher_kind: str, *, ctx: RunContext | None = None):
    teacher, data = setup
    vocab = len(teacher.tokenizer)
    answer: Any = None
    if plan.loss is not None:
        answer = {
            "projected": lambda: HFTeacher(teacher.model, vocab_size=vocab),
            "logits": lambda: LogitsTeacher(teacher.model, vocab),
            "sparse": lambda: HFTeacher(teacher.model, vocab_size=vocab, top_k=16),
        }[teacher_kind]()
    log: dict[int, dict[str, float]] = {}
    trainer = Trainer(
        _student(teacher),
        data,
        plan,
        ctx=ctx or RunContext(),
        on_metrics=lambda step, values: log.setdefault(step, {}).update(values),
        teacher=answer,
        vocab_size=vocab,
    )
    return trainer, log


@pytest.mark.parametrize(
    ("teacher_kind", "loss"),
    [
        ("projected", LossConfig(ce_weight=0.5)),
        ("logits", LossConfig(kind="jsd", beta=0.3, ce_weight=0.2, temperature=2.0)),
        ("sparse", LossConfig(kind="reverse_kl", ce_weight=0.3)),
        ("none", None),
    ],
)
def test_fused_and_logits_train_to_the_same_weights(setup, teacher_kind: str, loss) -> None:
    """Three AdamW steps of 2 accumulated micro-batches each, over masked blocks: the two
    strategies report the same losses and end at the same weights (fp32)."""
    plan = PLAN.updated({"loss": loss})
    runs = {}
    for strategy in ("logits", "fused"):
        trainer, log = _trainer(setup, plan.updated({"loss_strategy": strategy}), teacher_kind)
        assert trainer.loss_strategy.name == strategy
        trainer.fit()
        runs[strategy] = (trainer.model.state_dict(), log)
    if teacher_kind != "none":
        reason = _trainer(setup, plan.updated({"loss_strategy": "fused"}), teacher_kind)[
            0
        ].loss_strategy.reason
        expect = {
            "projected": "hidden states projected",
            "logits": "answers with its own",
            "sparse": "top-16",
        }
        assert expect[teacher_kind] in reason
    (w_logits, log_logits), (w_fused, log_fused) = runs["logits"], runs["fused"]
    assert sorted(log_logits) == sorted(log_fused) == [1, 2, 3]
    for step in log_logits:
        for key in ("train/loss", "train/ce", "train/grad_norm"):
            assert log_fused[step][key] == pytest.approx(log_logits[step][key], rel=2e-5), key
    moved = max(
        float((w_logits[k] - v).abs().max()) for k, v in _student(setup[0]).state_dict().items()
    )
    gap = max(float((w_logits[k] - w_fused[k]).abs().max()) for k in w_logits)
    assert moved > 1e-2  # the steps did move the weights ...
    assert gap < 1e-5  # ... and both strategies moved them to the same place


def test_gradients_of_one_micro_step_match_to_fp32_rounding(setup) -> None:
    """The strategies called directly on one masked micro-batch: same loss parts, same
    gradient on every parameter (lm_head/embedding included), to fp32 rounding."""
    teacher, data = setup
    vocab = len(teacher.tokenizer)
    ids, mask, labels = (
        data.train.input_ids[:4],
        data.train.attention_mask[:4],
        data.train.labels[:4],
    )
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    n_valid = int((shifted != -100).sum()) + 17  # as if another micro-batch held 17 more
    batch = MicroBatch(None, ids, mask, shifted, n_valid)
    for answer in (
        HFTeacher(teacher.model, vocab_size=vocab),
        HFTeacher(teacher.model, vocab_size=vocab, top_k=8),
    ):
        grads: list[tuple[LossOutput, dict[str, Tensor]]] = []
        for name in ("logits", "fused"):
            model = _student(teacher)
            choice = choose_strategy(name, model, answer)
            out = choice.strategy(
                LossSetup(model, answer, LossSpec(ce_weight=0.4), vocab_size=vocab), batch
            )
            out.total.backward()
            grads.append((out, {k: p.grad for k, p in model.named_parameters()}))
        (a, ga), (b, gb) = grads
        for part in ("total", "kd", "ce"):
            assert float(getattr(b, part).detach()) == pytest.approx(
                float(getattr(a, part).detach()), rel=1e-6
            )
        assert ga.keys() == gb.keys()
        for key in ga:
            scale = float(ga[key].abs().max())
            assert float((ga[key] - gb[key]).abs().max()) <= 1e-5 * scale + 1e-9, key


@pytest.mark.parametrize("strategy", ["fused", "logits"])
def test_every_strategy_runs_through_the_model_forward(setup, strategy: str) -> None:
    """Forward hooks on the student's top module and backbone (and the teacher's) fire on
    every training micro-step; under the fused strategy the top module's output holds
    logits for no position (the loss made them chunk by chunk), under logits for all. (A
    fused loss that bypassed the wrapped module's forward would break DDP's gradient
    all-reduce.)"""
    trainer, _ = _trainer(setup, PLAN.updated({"loss_strategy": strategy}), "projected")
    assert trainer.loss_strategy.name == strategy
    seen: dict[str, list[tuple[int, ...]]] = {"student": [], "backbone": [], "teacher": []}

    def hook(name: str):
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            if name == "teacher" or torch.is_grad_enabled():  # training, not evaluation
                logits = getattr(output, "logits", None)
                seen[name].append(() if logits is None else tuple(logits.shape))

        return record

    teacher = trainer.teacher
    assert isinstance(teacher, HFTeacher)
    handles = [
        trainer.model.register_forward_hook(hook("student")),
        trainer.model.base_model.register_forward_hook(hook("backbone")),
        teacher.model.register_forward_hook(hook("teacher")),
    ]
    try:
        trainer.fit()
    finally:
        for h in handles:
            h.remove()
    micro_steps = PLAN.max_steps * PLAN.optim.grad_accum
    assert len(seen["student"]) == len(seen["backbone"]) == micro_steps
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    positions = 0 if strategy == "fused" else trainer.data.train.seq_len
    assert set(seen["student"]) == {(PLAN.optim.batch_size, positions, vocab)}
    assert (PLAN.optim.batch_size, positions, t_vocab) in set(seen["teacher"])


# --------------------------------------------------------------------------- eligibility


def _tiny(kind: str) -> Any:
    """A tiny real transformers model of a family whose logits are transformed."""
    import transformers as tf

    common = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    if kind == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8))
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.25))
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0))
    if kind == "granite_neutral":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=1.0))
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "llama":
        return llama
    if kind == "subclass":
        return DoubledLlama(tf.LlamaConfig(**common))
    if kind == "hooked":  # a forward hook that rescales the logits: only the probe can tell
        llama.register_forward_hook(_halve_logits)
        return llama
    if kind == "wrapped_head":
        llama.lm_head = ScaledLinear(16, 64, bias=False)
        return llama
    if kind == "biased_head":
        llama.lm_head = torch.nn.Linear(16, 64, bias=True)
        return llama
    raise AssertionError(kind)


def _halve_logits(module: torch.nn.Module, args: Any, output: Any) -> Any:
    output.logits = output.logits * 0.5
    return output


class ScaledLinear(torch.nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


def _doubled_llama_class() -> type:
    from transformers import LlamaForCausalLM

    class _DoubledLlama(LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    return _DoubledLlama


DoubledLlama = _doubled_llama_class()


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("gemma2", "config.final_logit_softcapping=30.0"),
        ("cohere", "config.logit_scale=0.25"),
        ("granite", "config.logits_scaling=4.0"),
        ("subclass", "not a transformers model's own"),
        ("hooked", "differ from lm_head(backbone output)"),
        ("wrapped_head", "ScaledLinear, not a plain nn.Linear"),
    ],
)
def test_ineligible_models_fall_back_or_are_refused(kind: str, why: str) -> None:
    model = _tiny(kind)
    ok, reason = fused_eligibility(model)
    assert not ok and why in reason, reason
    auto = choose_strategy("auto", model, None)
    assert auto.name == "logits" and auto.fell_back and why in auto.reason
    with pytest.raises(ConfigError) as info:
        choose_strategy("fused", model, None)
    assert info.value.field == "loss.strategy"
    assert why in str(info.value) and "loss.strategy=logits" in str(info.value)


@pytest.mark.parametrize("kind", ["llama", "granite_neutral", "biased_head"])
def test_plain_heads_are_eligible_and_fused_matches_the_logits(kind: str) -> None:
    """A plain head, a neutral scaling (Granite with logits_scaling=1) and a head with a
    bias all take the fused loss, with the same value and gradients as the logits path."""
    model = _tiny(kind)
    ok, reason = fused_eligibility(model)
    assert ok, reason
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    batch = MicroBatch(None, ids, torch.ones_like(ids), labels, int((labels != -100).sum()))
    results = []
    for name in ("logits", "fused"):
        model.zero_grad(set_to_none=True)
        out = choose_strategy(name, model, None).strategy(LossSetup(model, None, None), batch)
        out.total.backward()
        results.append((float(out.total.detach()), [p.grad.clone() for p in model.parameters()]))
    (va, ga), (vb, gb) = results
    assert vb == pytest.approx(va, rel=1e-6)
    for a, b in zip(ga, gb, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()) + 1e-9


def test_trainer_falls_back_says_why_and_refuses_explicit_fused(setup) -> None:
    """Through the Trainer: auto on a soft-capped student trains with logits and alerts
    once with the reason; an explicit fused is refused before any step."""
    _, data = setup
    model = _tiny("gemma2")
    small = DataBundle(
        train=TokenBlocks(
            input_ids=data.train.input_ids[:8] % 64,
            attention_mask=data.train.attention_mask[:8],
            labels=torch.where(data.train.labels[:8] == -100, -100, data.train.labels[:8] % 64),
        ),
        val=TokenBlocks(
            input_ids=data.val.input_ids[:2] % 64,
            attention_mask=data.val.attention_mask[:2],
            labels=data.val.labels[:2] % 64,
        ),
        report={},
    )
    events: list[Event] = []
    ctx = RunContext(sink=events.append)
    plan = PLAN.updated({"loss": None, "limits.max_steps": 1})
    trainer = Trainer(model, small, plan, ctx=ctx, on_metrics=lambda s, v: None, vocab_size=64)
    assert trainer.loss_strategy.as_dict()["strategy"] == "logits"
    assert "final_logit_softcapping" in trainer.loss_strategy.as_dict()["reason"]
    alerts = [e.payload["message"] for e in events if e.kind == "alert"]
    assert len(alerts) == 1 and "final_logit_softcapping" in alerts[0]
    trainer.fit()
    assert trainer.step == 1
    with pytest.raises(ConfigError, match=r"loss\.strategy=logits"):
        Trainer(
            model,
            small,
            plan.updated({"loss_strategy": "fused"}),
            ctx=RunContext(),
            on_metrics=lambda s, v: None,
            vocab_size=64,
        )


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        choose_strategy("fast", _tiny("llama"), None)
    assert info.value.field == "loss.strategy" and "auto, fused, logits" in str(info.value)
    with pytest.raises(ValueError, match=r"loss\.strategy"):
        load_config({"loss": {"strategy": "fast"}})


def test_run_summary_records_the_strategy(tiny_config: dict[str, Any], tiny_teacher_dir) -> None:
    """The job records each phase's strategy and reason in the run's summary (and store)."""
    from foundry_kernel.run._job import run_job
    from foundry_kernel.store import RunStore

    tiny_config["limits"]["max_steps"] = 2
    tiny_config["eval"]["every_steps"] = 2
    cfg = load_config(tiny_config)
    store = RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id))
    stored = store.get_run(run_id).summary
    for phase in ("distill", "baseline"):
        entry = summary[f"{phase}_loss_strategy"]
        assert entry["strategy"] == "fused" and entry["requested"] == "auto", entry
        assert "plain lm_head" in entry["reason"]
        assert stored[f"{phase}_loss_strategy"] == entry
    assert "hidden states projected" in summary["distill_loss_strategy"]["reason"]
