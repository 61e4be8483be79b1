"""The training loop: one class a reader can hold in their head.

``Trainer.fit`` trains a student by distillation from a teacher, or by plain
cross-entropy when there is no teacher (the teacher build and the CE-only
baseline use the very same loop). It reports through a metrics callback and
the run context's events, never by printing, and it checkpoints everything
needed for a resumed run to follow exactly the trajectory of an
uninterrupted one: weights, AdamW state and batch position. No RNG state: every random
draw is a function of the seed and the step (``foundry_kernel._isolation``), so concurrent
runs never read or restore each other's generator.

How one micro-batch becomes a loss is not the loop's business but a
:class:`~foundry_kernel.training._strategy.LossStrategy` chosen by ``plan.loss_strategy``
(``loss.strategy``): fused-linear where the model allows it, logits otherwise. The choice
and its reason are ``Trainer.loss_strategy``; the run's summary records them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from foundry_kernel._context import RunContext
from foundry_kernel._isolation import derive_seed, seeded_global_rng, uses_dropout
from foundry_kernel.config import (
    CheckpointConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OnPolicyConfig,
    OptimConfig,
    RunConfig,
)
from foundry_kernel.data._blocks import IGNORE_INDEX, BatchSampler, DataBundle
from foundry_kernel.errors import DivergenceError, RunCancelled, RunTimeout
from foundry_kernel.teachers._interface import Teacher, as_teacher, sample_continuations
from foundry_kernel.training._checkpoint import load_latest, save_checkpoint
from foundry_kernel.training._evaluate import evaluate_lm, shift_labels
from foundry_kernel.training._losses import LossSpec
from foundry_kernel.training._strategy import (
    LossSetup,
    LossStrategy,
    MicroBatch,
    StrategyChoice,
    choose_strategy,
)

log = logging.getLogger("foundry.train")
MetricsSink = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainPlan:
    """One training phase: the config's own sections (validated there, so a plan cannot
    hold a value the schema refuses) plus what the run resolved (the autocast dtypes).

    A distillation phase has a ``loss`` section; a CE-only phase (the baseline, the
    built-in teacher's build) has none. ``on_policy`` is set for GKD-style phases only.
    """

    optim: OptimConfig
    limits: LimitsConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loss: LossConfig | None = None  # None: plain cross-entropy (no teacher needed)
    on_policy: OnPolicyConfig | None = None
    seed: int = 0
    amp_dtype: torch.dtype | None = None
    teacher_amp_dtype: torch.dtype | None = None  # the teacher is wider: bf16 may pay for it alone
    # How a micro-step turns a batch into a loss (see training._strategy): None follows
    # ``loss.strategy`` ("auto" without a loss section); a name or a LossStrategy object
    # overrides it (the benchmark compares strategies this way).
    loss_strategy: str | LossStrategy | None = None

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        *,
        distill: bool,
        amp_dtype: torch.dtype | None,
        teacher_amp_dtype: torch.dtype | None = None,
    ) -> TrainPlan:
        on_policy = cfg.distill.mode == "on_policy"
        return cls(
            optim=cfg.optim,
            limits=cfg.limits,
            eval=cfg.eval,
            checkpoint=cfg.checkpoint,
            loss=cfg.loss if distill else None,
            on_policy=cfg.distill.on_policy if distill and on_policy else None,
            seed=cfg.seed,
            amp_dtype=amp_dtype,
            teacher_amp_dtype=teacher_amp_dtype,
            loss_strategy=cfg.loss.strategy,
        )

    def updated(self, changes: Mapping[str, Any]) -> TrainPlan:
        """A copy with changes named as in the config, ``{"limits.max_steps": 20}``
        (each changed section re-validated by its schema), or a plain field by name
        (``{"seed": 2, "loss": None}``)."""
        plain: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section, dot, name = key.partition(".")
            if dot:
                sections.setdefault(section, {})[name] = value
            else:
                plain[key] = value
        for section, values in sections.items():
            current = getattr(self, section)
            if current is None:
                raise ValueError(f"this plan has no {section!r} section to change")
            plain[section] = type(current).model_validate({**current.model_dump(), **values})
        return dataclasses.replace(self, **plain)

    @property
    def max_steps(self) -> int:
        return self.limits.max_steps

    @property
    def spec(self) -> LossSpec | None:
        """What the loss functions compute (None: plain cross-entropy)."""
        return None if self.loss is None else LossSpec.from_config(self.loss)

    @property
    def strategy(self) -> str | LossStrategy:
        if self.loss_strategy is not None:
            return self.loss_strategy
        return self.loss.strategy if self.loss is not None else "auto"

    def lr_at(self, step: int) -> float:
        """Linear warm-up then cosine decay to ``min_lr_ratio``; a pure function of the step."""
        o = self.optim
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        span = max(self.max_steps - o.warmup_steps, 1)
        progress = min((step - o.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine)


class Trainer:
    """Trains ``model`` on ``data.train`` under ``plan``; evaluates on ``data.val``."""

    def __init__(
        self,
        model: PreTrainedModel,
        data: DataBundle,
        plan: TrainPlan,
        *,
        ctx: RunContext,
        on_metrics: MetricsSink,
        teacher: Teacher | PreTrainedModel | None = None,
        vocab_size: int | None = None,
        ckpt_dir: Path | None = None,
        prefix: str = "",
    ) -> None:
        if plan.loss is not None and teacher is None:
            raise ValueError("a distillation plan needs a teacher")
        self.model = model
        self.data = data
        self.plan = plan
        self.ctx = ctx
        self.on_metrics = on_metrics
        self.teacher = as_teacher(teacher, vocab_size=vocab_size, amp_dtype=plan.teacher_amp_dtype)
        self.vocab_size = vocab_size
        self.ckpt_dir = ckpt_dir
        self.prefix = prefix
        self.device = next(model.parameters()).device
        self.step = 0
        self.skipped = 0
        self.sampler = BatchSampler(len(data.train), plan.optim.batch_size, seed=plan.seed)
        self.optimizer = self._make_optimizer()
        self.last_eval: dict[str, float] = {}
        self.dropout = uses_dropout(model)  # draws from torch's global RNG: see _step_rng
        if plan.optim.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.loss_strategy = self._choose_strategy()
        self._setup, self._on_policy_setup = self._loss_setups()

    def _choose_strategy(self) -> StrategyChoice:
        """Resolve ``plan.loss_strategy`` for this model and teacher (a ConfigError for an
        explicit ``fused`` the model cannot take), and say which it is and why."""
        choice = choose_strategy(self.plan.strategy, self.model, self.teacher)
        where = self.prefix.rstrip("/") or "training"
        log.info("%s loss strategy: %s (%s)", where, choice.name, choice.reason)
        if choice.fell_back:
            self.ctx.emit(
                "alert",
                level="info",
                message=f"{where}: loss strategy {choice.name}, {choice.reason}",
            )
        return choice

    def _loss_setups(self) -> tuple[LossSetup, LossSetup]:
        """What the strategy is handed: for ordinary steps, and for on-policy steps, whose
        hard labels (the student's own samples) would teach it nothing new (ce_weight 0)."""
        spec = self.plan.spec
        setup = LossSetup(
            model=self.model,
            teacher=self.teacher,
            spec=spec,
            sparse_mass=self.plan.loss.top_k_mass if self.plan.loss else "tail",
            vocab_size=self.vocab_size,
            amp_dtype=self.plan.amp_dtype,
        )
        on_policy = None if spec is None else dataclasses.replace(spec, ce_weight=0.0)
        return setup, dataclasses.replace(setup, spec=on_policy)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; norms and biases (1-D tensors) are not decayed."""
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.plan.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused_ok = self.device.type == "cuda"
        return torch.optim.AdamW(
            groups,
            lr=self.plan.optim.lr,
            betas=(self.plan.optim.beta1, self.plan.optim.beta2),
            fused=fused_ok,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        # An older checkpoint's "rng" (torch's process-global state) is ignored: restoring
        # it would reset the generator of every other run in the process.
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])

    def checkpoint(self) -> None:
        if self.ckpt_dir is not None:
            save_checkpoint(
                self.ckpt_dir,
                self.step,
                self.state_dict(),
                keep_last=self.plan.checkpoint.keep_last,
            )

    def try_resume(self) -> bool:
        """Continue from the newest checkpoint if there is one."""
        if self.ckpt_dir is None:
            return False
        state = load_latest(self.ckpt_dir)
        if state is None:
            return False
        self.load_state_dict(state)
        log.info("resumed %s at step %d", self.prefix or "training", self.step)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = False) -> dict[str, float]:
        """Train to ``plan.max_steps``; returns the final validation metrics."""
        if resume:
            self.try_resume()
        self.model.train()
        while self.step < self.plan.max_steps:
            step, at_start = self.step, self.sampler.state_dict()
            try:
                self._advance()
            except (RunCancelled, RunTimeout):
                self._stop_cleanly(at_start if self.step == step else None)
                raise
        self.checkpoint()
        return self.last_eval

    def _advance(self) -> None:
        """One optimizer step, its report, and the evaluation/checkpoint it is due."""
        self.ctx.check()
        t0 = time.perf_counter()
        metrics = self._train_step()
        self.ctx.heartbeat()
        if metrics is None:
            return
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
        self.step += 1
        self._report(metrics)
        if self.step % self.plan.eval.every_steps == 0 or self.step == self.plan.max_steps:
            self._report(self.evaluate())
        every = self.plan.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.plan.max_steps:
            self.checkpoint()

    def _stop_cleanly(self, rewind_to: dict[str, Any] | None) -> None:
        """A stop landed: drop partial gradients; if it landed mid-step, rewind that step's
        batches; keep a checkpoint of the last completed step (if asked), so a resume
        continues exactly where the run stood."""
        self.optimizer.zero_grad(set_to_none=True)
        if rewind_to is not None:
            self.sampler.load_state_dict(rewind_to)
        if self.plan.checkpoint.on_stop and self.step > 0:
            self.checkpoint()

    def evaluate(self) -> dict[str, float]:
        result = evaluate_lm(
            self.model,
            self.data.val,
            batch_size=self.plan.optim.batch_size,
            max_batches=self.plan.eval.max_batches,
            ctx=self.ctx,
            teacher=self.teacher,
            vocab_size=self.vocab_size,
            amp_dtype=self.plan.amp_dtype,
            teacher_amp_dtype=self.plan.teacher_amp_dtype,
        )
        self.model.train()
        result.pop("tokens", None)
        self.last_eval = {f"val/{k}": v for k, v in result.items()}
        return dict(self.last_eval)

    def _report(self, metrics: dict[str, float]) -> None:
        named = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        self.on_metrics(self.step, named)
        self.ctx.emit(
            "step", step=self.step, max_steps=self.plan.max_steps, prefix=self.prefix, metrics=named
        )

    def _train_step(self) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches; None if it was skipped."""
        plan = self.plan
        lr = plan.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rollout = self._on_policy_now()
        micro = [
            self._micro_batch(self.sampler.next_indices(), rollout, m)
            for m in range(plan.optim.grad_accum)
        ]
        n_valid = max(sum(int((mb[3] != IGNORE_INDEX).sum()) for mb in micro), 1)
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        tokens = 0
        for m, (idx, ids, mask, target) in enumerate(micro):
            self.ctx.check()
            with self._step_rng(m):
                parts = self._micro_step(idx, ids, mask, target, n_valid, on_policy=rollout)
            for k, v in parts.items():
                totals[k] += v
            tokens += int(mask.sum())
        grad_norm = self._clip()
        bad = self._nonfinite(totals, grad_norm)
        if bad is not None:
            self._handle_nonfinite(bad, totals)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {f"train/{k}": v for k, v in totals.items() if plan.loss is not None or k != "kd"}
        out.update({"train/lr": lr, "train/grad_norm": grad_norm, "tokens": float(tokens)})
        if plan.on_policy is not None:
            out["train/on_policy"] = float(rollout)
        return out

    def _step_rng(self, micro: int) -> AbstractContextManager[None]:
        """Dropout draws from torch's process-global generator; for a model with dropout
        the micro-step runs with it seeded from (seed, phase, step, micro) under the global
        RNG lock (``_isolation.seeded_global_rng``), so it is reproducible, resumable and
        undisturbed by other runs. Without dropout: nothing to do, no lock."""
        if not self.dropout:
            return contextlib.nullcontext()
        seed = derive_seed("dropout", self.plan.seed, self.prefix, self.step, micro)
        return seeded_global_rng(seed, [self.device])

    def _on_policy_now(self) -> bool:
        """Whether this step trains on student samples: a pure function of (seed, step), so
        a resumed run makes the same choices as an uninterrupted one."""
        op = self.plan.on_policy
        if op is None or op.fraction <= 0:
            return False
        return random.Random(f"{self.plan.seed}:{self.step}").random() < op.fraction

    def _micro_batch(
        self, idx: torch.Tensor, rollout: bool, micro: int
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block index, input ids, attention mask, shifted labels) on the device; for an
        on-policy step the blocks' first tokens are a prompt the student continues."""
        ids = self.data.train.input_ids[idx].to(self.device)
        mask = self.data.train.attention_mask[idx].to(self.device)
        if not rollout:
            return idx, ids, mask, shift_labels(self.data.train.labels[idx]).to(self.device)
        op = self.plan.on_policy
        assert op is not None
        prompt = op.prompt_tokens
        new = max(1, min(op.max_new_tokens, ids.shape[1] - prompt))
        prompts = ids[:, :prompt].tolist()
        continuations = sample_continuations(
            self.model,
            prompts,
            max_new_tokens=new,
            temperature=op.temperature,
            seed=self.plan.seed * 1_000_003 + self.step * 97 + micro,
            pad_token_id=None,
            check=self.ctx.check,
        )
        seq = torch.tensor(
            [p + c[:new] for p, c in zip(prompts, continuations, strict=True)], device=self.device
        )
        labels = seq.clone()
        labels[:, :prompt] = -100  # only the student's own tokens are scored
        return None, seq, torch.ones_like(seq), shift_labels(labels)

    def _micro_step(
        self,
        idx: torch.Tensor | None,
        ids: torch.Tensor,
        mask: torch.Tensor,
        target: torch.Tensor,
        n_valid: int,
        *,
        on_policy: bool = False,
    ) -> dict[str, float]:
        """Forward and loss by the phase's strategy, then backward (gradients accumulate)."""
        batch = MicroBatch(idx, ids, mask, target, n_valid, on_policy=on_policy)
        setup = self._on_policy_setup if on_policy else self._setup
        out = self.loss_strategy.strategy(setup, batch)
        out.total.backward()
        return {"loss": out.total.item(), "kd": out.kd.item(), "ce": out.ce.item()}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.plan.optim.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @staticmethod
    def _nonfinite(totals: dict[str, float], grad_norm: float) -> str | None:
        for name, value in totals.items():
            if not math.isfinite(value):
                return f"{name} loss"
        if not math.isfinite(grad_norm):
            return "gradient"
        return None

    def _handle_nonfinite(self, component: str, totals: dict[str, float]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"{self.prefix}step {self.step + 1}"
        if self.plan.limits.on_nonfinite == "skip" and self.skipped < self.plan.limits.max_skips:
            self.skipped += 1
            self.ctx.emit(
                "alert",
                level="warning",
                step=self.step + 1,
                component=component,
                message=f"non-finite {component} at {where}; step skipped "
                f"({self.skipped}/{self.plan.limits.max_skips})",
            )
            return None
        values = ", ".join(f"{k}={v:.4g}" for k, v in totals.items())
        raise DivergenceError(
            f"training diverged: non-finite {component} at {where} ({values}). Lower optim.lr, "
            "keep optim.max_grad_norm set, or set limits.on_nonfinite=skip.",
            step=self.step + 1,
            component=component,
        )
