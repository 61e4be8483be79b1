"""The training loop: one class a reader can hold in their head.

``Trainer.fit`` trains a student by distillation from a teacher, or by plain
cross-entropy when there is no teacher (the teacher build and the CE-only
baseline use the very same loop). It reports through a metrics callback and
the run context's events, never by printing, and it checkpoints everything
needed for a resumed run to follow exactly the trajectory of an
uninterrupted one: weights, AdamW state and batch position. No RNG state: every random
draw is a function of the seed and the step (``foundry_kernel._isolation``), so concurrent
runs never read or restore each other's generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from foundry_kernel._context import RunContext
from foundry_kernel._isolation import derive_seed, seeded_global_rng, uses_dropout
from foundry_kernel.config import RunConfig
from foundry_kernel.data._blocks import BatchSampler, DataBundle
from foundry_kernel.errors import DivergenceError, RunCancelled, RunTimeout
from foundry_kernel.teachers._interface import Teacher, as_teacher, sample_continuations
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._checkpoint import load_latest, save_checkpoint
from foundry_kernel.training._evaluate import evaluate_lm, shift_labels
from foundry_kernel.training._losses import LossSpec, distillation_loss, sparse_distillation_loss
from foundry_kernel.training._precision import autocast

log = logging.getLogger("foundry.train")
MetricsSink = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class OnPolicyPlan:
    """GKD-style steps: the student continues a prompt, the teacher scores its tokens."""

    fraction: float
    prompt_tokens: int
    max_new_tokens: int
    temperature: float = 1.0


@dataclass(frozen=True)
class TrainPlan:
    """The knobs of one training phase, independent of where they came from."""

    max_steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    amp_dtype: torch.dtype | None = None
    teacher_amp_dtype: torch.dtype | None = None  # the teacher is wider: bf16 may pay for it alone
    gradient_checkpointing: bool = False
    loss: LossSpec | None = None  # None: plain cross-entropy (no teacher needed)
    sparse_mass: str = "tail"  # how top-k teacher targets treat the missing mass
    on_policy: OnPolicyPlan | None = None
    eval_every: int = 100
    eval_max_batches: int | None = None
    ckpt_every: int | None = None
    keep_last: int = 2
    ckpt_on_stop: bool = True
    on_nonfinite: str = "fail"
    max_skips: int = 10
    seed: int = 0

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        *,
        distill: bool,
        amp_dtype: torch.dtype | None,
        teacher_amp_dtype: torch.dtype | None = None,
    ) -> TrainPlan:
        o, lo = cfg.optim, cfg.loss
        spec = None
        if distill:
            spec = LossSpec(
                kind=lo.kind,
                beta=lo.beta,
                jsd_normalized=lo.jsd_normalized,
                skew_alpha=lo.skew_alpha,
                temperature=lo.temperature,
                scale_by_t2=lo.scale_by_t2,
                ce_weight=lo.ce_weight,
                chunk_tokens=lo.chunk_tokens,
            )
        on_policy = None
        if distill and cfg.distill.mode == "on_policy":
            op = cfg.distill.on_policy
            on_policy = OnPolicyPlan(
                fraction=op.fraction,
                prompt_tokens=op.prompt_tokens,
                max_new_tokens=op.max_new_tokens,
                temperature=op.temperature,
            )
        return cls(
            sparse_mass=lo.top_k_mass,
            on_policy=on_policy,
            max_steps=cfg.limits.max_steps,
            batch_size=o.batch_size,
            grad_accum=o.grad_accum,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=(o.beta1, o.beta2),
            warmup_steps=o.warmup_steps,
            min_lr_ratio=o.min_lr_ratio,
            max_grad_norm=o.max_grad_norm,
            amp_dtype=amp_dtype,
            teacher_amp_dtype=teacher_amp_dtype,
            gradient_checkpointing=o.gradient_checkpointing,
            loss=spec,
            eval_every=cfg.eval.every_steps,
            eval_max_batches=cfg.eval.max_batches,
            ckpt_every=cfg.checkpoint.every_steps,
            keep_last=cfg.checkpoint.keep_last,
            ckpt_on_stop=cfg.checkpoint.on_stop,
            on_nonfinite=cfg.limits.on_nonfinite,
            max_skips=cfg.limits.max_skips,
            seed=cfg.seed,
        )

    def lr_at(self, step: int) -> float:
        """Linear warm-up then cosine decay to ``min_lr_ratio``; a pure function of the step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.max_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


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
        self.sampler = BatchSampler(len(data.train), plan.batch_size, seed=plan.seed)
        self.optimizer = self._make_optimizer()
        self.last_eval: dict[str, float] = {}
        self.dropout = uses_dropout(model)  # draws from torch's global RNG: see _step_rng
        if plan.gradient_checkpointing:
            model.gradient_checkpointing_enable()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; norms and biases (1-D tensors) are not decayed."""
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.plan.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused_ok = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.plan.lr, betas=self.plan.betas, fused=fused_ok)

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
                self.ckpt_dir, self.step, self.state_dict(), keep_last=self.plan.keep_last
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
        if self.step % self.plan.eval_every == 0 or self.step == self.plan.max_steps:
            self._report(self.evaluate())
        every = self.plan.ckpt_every
        if every and self.step % every == 0 and self.step < self.plan.max_steps:
            self.checkpoint()

    def _stop_cleanly(self, rewind_to: dict[str, Any] | None) -> None:
        """A stop landed: drop partial gradients; if it landed mid-step, rewind that step's
        batches; keep a checkpoint of the last completed step (if asked), so a resume
        continues exactly where the run stood."""
        self.optimizer.zero_grad(set_to_none=True)
        if rewind_to is not None:
            self.sampler.load_state_dict(rewind_to)
        if self.plan.ckpt_on_stop and self.step > 0:
            self.checkpoint()

    def evaluate(self) -> dict[str, float]:
        result = evaluate_lm(
            self.model,
            self.data.val,
            batch_size=self.plan.batch_size,
            max_batches=self.plan.eval_max_batches,
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
            for m in range(plan.grad_accum)
        ]
        n_valid = max(sum(int((mb[3] != -100).sum()) for mb in micro), 1)
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
        with autocast(self.device, self.plan.amp_dtype):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        if self.plan.loss is None:
            flat = logits[..., : self.vocab_size].float().flatten(0, 1)
            loss = F.cross_entropy(flat, target.flatten(), ignore_index=-100, reduction="sum")
            loss = loss / n_valid
            loss.backward()
            value = loss.item()
            return {"loss": value, "ce": value}
        assert self.teacher is not None
        spec = self.plan.loss
        if on_policy:  # hard labels on the student's own samples would teach it nothing new
            spec = dataclasses.replace(spec, ce_weight=0.0)
        signal = self.teacher.signal(idx, ids, mask)
        if isinstance(signal, SparseTargets):
            out = sparse_distillation_loss(
                logits,
                signal,
                target,
                spec,
                mass=self.plan.sparse_mass,  # type: ignore[arg-type]  # checked by the config
                num_valid_tokens=n_valid,
                vocab_size=self.vocab_size,
            )
        else:
            out = distillation_loss(
                logits, signal, target, spec, num_valid_tokens=n_valid, vocab_size=self.vocab_size
            )
        out.total.backward()
        return {"loss": out.total.item(), "kd": out.kd.item(), "ce": out.ce.item()}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.plan.max_grad_norm or float("inf")
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
        if self.plan.on_nonfinite == "skip" and self.skipped < self.plan.max_skips:
            self.skipped += 1
            self.ctx.emit(
                "alert",
                level="warning",
                step=self.step + 1,
                component=component,
                message=f"non-finite {component} at {where}; step skipped "
                f"({self.skipped}/{self.plan.max_skips})",
            )
            return None
        values = ", ".join(f"{k}={v:.4g}" for k, v in totals.items())
        raise DivergenceError(
            f"training diverged: non-finite {component} at {where} ({values}). Lower optim.lr, "
            "keep optim.max_grad_norm set, or set limits.on_nonfinite=skip.",
            step=self.step + 1,
            component=component,
        )
