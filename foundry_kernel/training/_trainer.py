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

Data parallelism (a ``World`` of N ranks, launched by torchrun) is the same loop with
W = N: every rank draws the same global batch and trains on its contiguous share, the loss
is divided by the valid-token count of the whole step (all micro-batches, all ranks:
counted on the host from the blocks every rank holds), the student is wrapped by
``training._parallel`` (DDP or FSDP2, the loss computed inside the wrapper's forward), and
each optimizer step ends with one all-reduce of one small vector that also carries every
rank's stop request, so all ranks stop after the same step. A single process keeps its
results bit for bit.
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

import psutil
import torch
from torch import Tensor
from transformers import PreTrainedModel

from foundry_kernel._context import RunContext
from foundry_kernel._isolation import derive_seed, seeded_global_rng, uses_dropout
from foundry_kernel._models import kept_layers
from foundry_kernel._world import World
from foundry_kernel.config import (
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OnPolicyConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
)
from foundry_kernel.data._blocks import IGNORE_INDEX, BatchSampler, DataBundle
from foundry_kernel.errors import ConfigError, DataError, DivergenceError, RunCancelled, RunTimeout
from foundry_kernel.teachers._interface import Teacher, as_teacher, sample_continuations
from foundry_kernel.training._checkpoint import (
    SHARDED,
    latest_format,
    load_full_state,
    load_latest,
    load_sharded,
    load_sharded_extra,
    save_checkpoint,
    save_sharded,
)
from foundry_kernel.training._evaluate import evaluate_lm, shift_labels
from foundry_kernel.training._extra import ExtraParams, strategy_extra
from foundry_kernel.training._hidden import decoder_stack, with_hidden_loss
from foundry_kernel.training._losses import LossSpec, trusted_labels
from foundry_kernel.training._parallel import through, wrap_student
from foundry_kernel.training._strategy import (
    LossSetup,
    LossStrategy,
    MicroBatch,
    StrategyChoice,
    choose_strategy,
)

log = logging.getLogger("foundry.train")
MetricsSink = Callable[[int, dict[str, float]], None]
# Called after each validation with the step and the plain student (the run's samples per
# checkpoint, training._samples.SampleHistory); one process only.
EvalHook = Callable[[int, PreTrainedModel], None]


@dataclass(frozen=True)
class EarlyStop:
    """Stop when held-out loss has not improved for ``patience`` evaluations in a row, and
    end with the weights of the best evaluation, not the last ones.

    Why: a model trained many epochs on a small corpus memorises it; its held-out loss
    turns up long before the step budget ends. Used by the built-in teacher's build (one
    process, no checkpoints: the best weights are kept as a copy in host memory).
    """

    patience: int
    min_delta: float = 0.0


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
    # Data parallelism (ignored by a single process): ddp or fsdp2, and fsdp2's precision.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The student's config section: where a from_teacher student's layers came from (the
    # hidden-state loss pairs each kept layer with its source). None: unknown (a student
    # handed over directly), and the hidden-state loss uses its evenly spaced default.
    student: StudentConfig | None = None
    # Early stopping on held-out loss (one process only); None: train every step.
    early_stop: EarlyStop | None = None

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
            distributed=cfg.distributed,
            student=cfg.student,
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
    """Trains ``model`` on ``data.train`` under ``plan``; evaluates on ``data.val``.

    With a distributed ``world`` the Trainer wraps the student itself (DDP or FSDP2, per
    ``plan.distributed``; see ``training._parallel``) before making the optimizer, so the
    caller hands it the plain HF model and reads the trained weights back with
    ``_parallel.full_state_dict(trainer.wrapped, world)``. Every rank draws the same global
    batch and trains on its contiguous share; only rank 0 reports metrics and events.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        data: DataBundle,
        plan: TrainPlan,
        *,
        ctx: RunContext,
        on_metrics: MetricsSink | None,
        teacher: Teacher | PreTrainedModel | None = None,
        vocab_size: int | None = None,
        ckpt_dir: Path | None = None,
        prefix: str = "",
        world: World | None = None,
        on_eval: EvalHook | None = None,
    ) -> None:
        if plan.loss is not None and teacher is None:
            raise ValueError("a distillation plan needs a teacher")
        self.world = World() if world is None else world
        if plan.optim.batch_size < self.world.world_size:
            raise ConfigError(
                f"optim.batch_size={plan.optim.batch_size} is the global number of blocks per "
                f"micro-batch, shared by {self.world.world_size} processes: each needs at "
                f"least one. Set optim.batch_size >= {self.world.world_size} or start fewer "
                "processes",
                field="optim.batch_size",
            )
        self.model = model
        self.data = data
        self.plan = plan
        self.ctx = ctx
        self.on_metrics = on_metrics
        self.on_eval = on_eval
        self.teacher = as_teacher(teacher, vocab_size=vocab_size, amp_dtype=plan.teacher_amp_dtype)
        self.vocab_size = vocab_size
        self.ckpt_dir = ckpt_dir
        self.prefix = prefix
        self.device = next(model.parameters()).device
        self.step = 0
        self.skipped = 0
        self.sampler = BatchSampler(len(data.train), plan.optim.batch_size, seed=plan.seed)
        self.last_eval: dict[str, float] = {}
        self.dropout = uses_dropout(model)  # draws from torch's global RNG: see _step_rng
        # A partly frozen student (LoRA): checkpoints hold only what trains (_model_state).
        self._frozen = any(not p.requires_grad for p in model.parameters())
        if plan.optim.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self._blocks = _BlockFacts.of(data.train, vocab_size or _vocab_rows(model))
        self.loss_strategy = self._choose_strategy()  # probes the plain model: before wrapping
        self._setup, self._on_policy_setup = self._loss_setups()
        self.wrapped = wrap_student(model, self.world, plan.distributed, plan.amp_dtype)
        self.optimizer = self._make_optimizer()
        # The strategy's own trainable parameters (loss.hidden's projections): trained,
        # checkpointed and kept in sync across ranks with the student (training._extra).
        self.extra = ExtraParams(
            strategy_extra(self.loss_strategy.strategy),
            plan.optim,
            self.world,
            fsdp=plan.distributed.strategy == "fsdp2",
        )
        self._group_stop: str | None = None
        self._rank_rate: float | None = None  # this rank's tokens/s in its previous step
        if plan.early_stop is not None and self.world.distributed:
            raise ValueError("early stopping keeps a host copy of the weights: one process only")
        # Early stopping: the best evaluation so far, its step and weights (host copies).
        self.best_eval: dict[str, float] = {}
        self.best_step: int | None = None
        self.stopped_early = False
        self._best_state: dict[str, Tensor] | None = None
        self._bad_evals = 0

    def _choose_strategy(self) -> StrategyChoice:
        """Resolve ``plan.loss_strategy`` for this model and teacher (a ConfigError for an
        explicit ``fused`` the model cannot take), and say which it is and why."""
        choice = choose_strategy(self.plan.strategy, self.model, self.teacher)
        if self.plan.loss is not None:
            choice = with_hidden_loss(
                choice,
                self.plan.loss.hidden,
                self.model,
                self.teacher,
                source_layers=_source_layers(self.plan.student, self.teacher),
                seed=self.plan.seed,
            )
        where = self.prefix.rstrip("/") or "training"
        log.info("%s loss strategy: %s (%s)", where, choice.name, choice.reason)
        if choice.fell_back and self.world.is_main:
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
            logits_grad=self.plan.loss.logits_grad if self.plan.loss else "inplace",
        )
        on_policy = None if spec is None else dataclasses.replace(spec, ce_weight=0.0)
        return setup, dataclasses.replace(setup, spec=on_policy)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; norms and biases (1-D tensors) are not decayed. Made after wrapping, over
        the parameters as the wrapper left them (FSDP2: this rank's shards)."""
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
    def _counters(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "sampler": self.sampler.state_dict()}

    def _model_state(self) -> dict[str, Tensor]:
        """The model's part of a checkpoint: its whole state dict, or - when part of it is
        frozen (a LoRA student's base) - only the parameters that train: the frozen ones
        are rebuilt from their source by the resumed run, identically."""
        if not self._frozen:
            return self.model.state_dict()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_model_state(self, state: Mapping[str, Tensor]) -> None:
        if not self._frozen:
            self.model.load_state_dict(state)
            return
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ConfigError(
                "the checkpoint's trainable parameters do not match this student's "
                f"({len(state)} saved, {len(trainable)} here; e.g. "
                f"{sorted(set(state) ^ trainable)[:3]}): student.lora changed since it was "
                "written; resume with the same student.lora, or start a new run",
                field="student.lora",
            )
        self.model.load_state_dict(state, strict=False)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "model": self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }
        if self.extra:
            state["extra"] = self.extra.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A one-process (one-file) checkpoint's state; in a distributed job every rank
        loads the full state and keeps its share (FSDP2 reshards it)."""
        if self.world.distributed:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self._load_model_state(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.extra.load_state_dict(state.get("extra"))
        self._load_counters(state)

    def _load_counters(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        # An older checkpoint's "rng" (torch's process-global state) is ignored: restoring
        # it would reset the generator of every other run in the process.
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])

    def checkpoint(self) -> None:
        """One file for a single process; a sharded DCP folder (a collective: every rank
        calls it at the same step) in a distributed job."""
        if self.ckpt_dir is None:
            return
        keep = self.plan.checkpoint.keep_last
        if not self.world.distributed:
            save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), keep_last=keep)
            return
        save_sharded(
            self.ckpt_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=self._counters(),
            world=self.world,
            keep_last=keep,
            extra=self.extra.state_dict(),
        )

    def try_resume(self) -> bool:
        """Continue from the newest checkpoint if there is one, whichever world wrote it: a
        sharded checkpoint reshards to this world (the global batch does not depend on the
        world size, so the trajectory continues unchanged)."""
        if self.ckpt_dir is None:
            return False
        kind = latest_format(self.ckpt_dir)
        if kind is None:
            return False
        if kind == SHARDED:
            counters = load_sharded(
                self.ckpt_dir, model=self.model, optimizer=self.optimizer, world=self.world
            )
            assert counters is not None
            if self.extra:
                self.extra.load_state_dict(load_sharded_extra(self.ckpt_dir))
            self._load_counters(counters)
        else:
            state = load_latest(self.ckpt_dir)
            assert state is not None
            self.load_state_dict(state)
        log.info("resumed %s at step %d", self.prefix or "training", self.step)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = False) -> dict[str, float]:
        """Train to ``plan.max_steps``; returns the final validation metrics."""
        if resume:
            self.try_resume()
        self.wrapped.train()
        while self.step < self.plan.max_steps and not self.stopped_early:
            step, at_start = self.step, self.sampler.state_dict()
            try:
                self._advance()
            except (RunCancelled, RunTimeout):
                # A single process may stop mid-step (rewind its batches); a group stop
                # comes after a finished (or skipped) step: nothing to rewind.
                mid_step = self.step == step and self._group_stop is None
                self._stop_cleanly(at_start if mid_step else None)
                raise
        if self._best_state is not None:  # early stopping: end on the best weights
            self.model.load_state_dict(self._best_state)
            self.last_eval = dict(self.best_eval)
        self.checkpoint()
        return self.last_eval

    def _track_best(self, metrics: Mapping[str, float]) -> None:
        """Early stopping's bookkeeping after an evaluation (``plan.early_stop``)."""
        rule = self.plan.early_stop
        loss = metrics.get("val/loss")
        if rule is None or loss is None or not math.isfinite(loss):
            return
        best = self.best_eval.get("val/loss", math.inf)
        if loss < best - rule.min_delta:
            self.best_eval, self.best_step, self._bad_evals = dict(metrics), self.step, 0
            self._best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            return
        self._bad_evals += 1
        if self._bad_evals >= rule.patience:
            self.stopped_early = True
            log.info(
                "%sheld-out loss has not improved for %d evaluations: stopped at step %d, "
                "keeping step %s",
                self.prefix,
                self._bad_evals,
                self.step,
                self.best_step,
            )

    def _advance(self) -> None:
        """One optimizer step, its report, and the evaluation/checkpoint it is due.

        A single process stops at any ``ctx.check``. A distributed rank never raises alone
        mid-step (the others would wait in a collective): its pending stop travels in the
        step's one all-reduce, and every rank stops together once that step is done."""
        if not self.world.distributed:
            self.ctx.check()
        t0 = time.perf_counter()
        metrics = self._train_step(t0)
        self.ctx.heartbeat()
        if metrics is not None:
            metrics["tokens_per_s"] = metrics.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
            self.step += 1
            self._report(metrics)
        if self._group_stop is not None:
            self._raise_group_stop(self._group_stop)
        if metrics is None:
            return
        if self.step % self.plan.eval.every_steps == 0 or self.step == self.plan.max_steps:
            evaluated = self.evaluate()
            self._report(evaluated)
            self._track_best(evaluated)
            if self.on_eval is not None and not self.world.distributed:
                # not under data parallelism: a sharded student generates only in lockstep
                self.on_eval(self.step, self.model)
        every = self.plan.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.plan.max_steps:
            self.checkpoint()

    def _raise_group_stop(self, reason: str) -> None:
        """Every rank raises the same stop after the same step (the reason came from the
        reduced flags, so it is identical on all ranks)."""
        self.ctx.cancel(reason)
        if reason == "timed_out":
            raise RunTimeout("the run's wall-clock limit (limits.timeout_s) was reached")
        raise RunCancelled(f"run stopped: {self.ctx.reason or reason}")

    def _stop_cleanly(self, rewind_to: dict[str, Any] | None) -> None:
        """A stop landed: drop partial gradients; if it landed mid-step, rewind that step's
        batches; keep a checkpoint of the last completed step (if asked), so a resume
        continues exactly where the run stood."""
        self.optimizer.zero_grad(set_to_none=True)
        self.extra.zero_grad()
        if rewind_to is not None:
            self.sampler.load_state_dict(rewind_to)
        if self.plan.checkpoint.on_stop and self.step > 0:
            self.checkpoint()

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics. In a distributed job the student is called through its wrapper
        and no stop is raised mid-evaluation (a rank must not leave the others in a
        collective); each rank evaluates its share of the batches and the sums are reduced
        (``evaluate_lm``), so every rank gets the one-process figures."""
        distributed = self.world.distributed
        chunk = {} if self.plan.loss is None else {"chunk_tokens": self.plan.loss.chunk_tokens}
        result = evaluate_lm(
            through(self.wrapped),  # type: ignore[arg-type]  # a model-shaped view
            self.data.val,
            batch_size=self.plan.optim.batch_size,
            max_batches=self.plan.eval.max_batches,
            ctx=None if distributed else self.ctx,
            teacher=None if self._cross_tokenizer else self.teacher,
            vocab_size=self.vocab_size,
            amp_dtype=self.plan.amp_dtype,
            teacher_amp_dtype=self.plan.teacher_amp_dtype,
            world=self.world,
            **chunk,
        )
        self.wrapped.train()
        result.pop("tokens", None)
        self.last_eval = {f"val/{k}": v for k, v in result.items()}
        return dict(self.last_eval)

    @property
    def _cross_tokenizer(self) -> bool:
        """The teacher reads other tokens than the student (``loss.cross_tokenizer``): its
        agreement and KL on the student's held-out blocks are not defined there."""
        loss = self.plan.loss
        return loss is not None and loss.cross_tokenizer != "off"

    def _report(self, metrics: dict[str, float]) -> None:
        """Metrics go to the store from rank 0 only; the step event goes to every rank's
        own context, so each rank's handle knows where it stopped."""
        named = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        if self.on_metrics is not None and self.world.is_main:
            self.on_metrics(self.step, named)
        self.ctx.emit(
            "step", step=self.step, max_steps=self.plan.max_steps, prefix=self.prefix, metrics=named
        )

    # ------------------------------------------------------------------ one step
    def _train_step(self, t0: float | None = None) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches; None if it was skipped.

        No host sync until the step's end: loss parts accumulate on the device, token
        counts come from the host's copy of the blocks, and one tensor (loss parts, tokens,
        stop flags, gradient norm, each rank's throughput and memory) is all-reduced and
        read back once."""
        plan = self.plan
        start = time.perf_counter() if t0 is None else t0
        lr = plan.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.extra.set_lr(lr)
        rollout = self._on_policy_now()
        global_idx = [self.sampler.next_indices() for _ in range(plan.optim.grad_accum)]
        rows = [_host_indices(idx) for idx in global_idx]
        micro = [
            self._micro_batch(idx, r, rollout, m)
            for m, (idx, r) in enumerate(zip(global_idx, rows, strict=True))
        ]
        self._announce_next_step()
        if rollout:  # the samples were drawn per rank: count their labels over all ranks
            n_valid = self._global_count(sum(mb.local_valid or 0 for mb in micro))
        else:  # every rank holds the whole global batch's labels on the host: no collective
            n_valid = sum(self._blocks.valid_of(r) for r in rows)
        n_valid = max(n_valid, 1)
        acc = torch.zeros(4, dtype=self._acc_dtype, device=self.device)
        with trusted_labels():  # validated once, in _BlockFacts.of
            for m, mb in enumerate(micro):
                if not self.world.distributed:
                    self.ctx.check()
                batch = dataclasses.replace(mb, num_valid=n_valid)
                with self._step_rng(m), self._grad_sync(last=m == len(micro) - 1):
                    acc += self._micro_step(batch, on_policy=rollout).to(acc.dtype)
        tokens = sum(mb.local_tokens or 0 for mb in micro)
        self.extra.sync_grads()  # before the clip: every rank then sees the same norm
        norm = self._clip()
        values = self._step_values(acc, norm, tokens, start)
        loss, kd, ce = values[0], values[1], values[2]
        totals = {"loss": loss, "kd": kd, "ce": ce}
        if plan.loss is not None and plan.loss.hidden is not None:
            totals["hidden"] = values[self._HIDDEN]
        grad_norm = values[3]
        if values[5] > 0 and math.isfinite(grad_norm):  # another rank's norm (FSDP2 shards)
            grad_norm = math.inf
        self._group_stop = self._reduced_stop(values)
        bad = self._nonfinite(totals, grad_norm)
        if bad is not None:
            self._handle_nonfinite(bad, totals)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.extra.step()
        self.extra.zero_grad()
        out = {f"train/{k}": v for k, v in totals.items() if plan.loss is not None or k != "kd"}
        out.update({"train/lr": lr, "train/grad_norm": grad_norm, "tokens": values[4]})
        if plan.on_policy is not None:
            out["train/on_policy"] = float(rollout)
        out.update(self._rank_metrics(values))
        return out

    @property
    def _acc_dtype(self) -> torch.dtype:
        """float64 where the device has it: the device sum of the fp32 parts then equals the
        Python float sum the loop reported before (bit for bit)."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    # Layout of the step's one reduced vector: 0-2 loss parts (each rank's share of the
    # globally normalised loss; they sum to the step's loss), 3 gradient norm (rank 0's
    # slot only: it is identical on every rank), 4 tokens, 5 ranks whose norm is not
    # finite, 6 ranks asking to cancel, 7 ranks past the deadline, 8 the hidden-state
    # loss part (0 without one), then per rank r the triple (tokens/s, RSS MB, VRAM MB)
    # at 9 + 3 r, zero in every other rank's rows.
    _HIDDEN = 8
    _FIXED = 9

    def _step_values(self, acc: Tensor, norm: Tensor, tokens: int, start: float) -> list[float]:
        world = self.world
        size = self._FIXED + (3 * world.world_size if world.distributed else 0)
        vec = torch.zeros(size, dtype=acc.dtype, device=self.device)
        vec[0:3] = acc[0:3]
        vec[self._HIDDEN] = acc[3]
        norm = norm.detach().to(acc.dtype)
        vec[3] = norm if world.is_main else 0.0
        vec[5] = (~torch.isfinite(norm)).to(acc.dtype)
        host = torch.zeros(size - 4, dtype=acc.dtype)  # filled on the host, copied once
        host[0] = float(tokens)
        if world.distributed:
            reason = self.ctx.pending_stop()
            host[2] = float(reason is not None and reason != "timed_out")
            host[3] = float(reason == "timed_out")
            row = self._FIXED - 4 + 3 * world.rank
            rate = self._rank_rate  # the previous step's, timed after its sync (see below)
            if rate is None:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
            host[row : row + 3] = torch.tensor([rate, *_memory_mb(self.device)])
        vec[4:] += host.to(self.device, non_blocking=self.device.type == "cuda")
        world.all_reduce_sum(vec)
        values = [float(v) for v in vec.tolist()]
        # This rank's throughput, timed once its work is done (the read above waited for
        # the device): on a GPU the host runs ahead of the device until then.
        self._rank_rate = tokens / max(time.perf_counter() - start, 1e-9)
        return values

    def _reduced_stop(self, values: list[float]) -> str | None:
        """The stop every rank takes after this step (None: go on). Only distributed runs
        carry stop flags; a single process stops at its own ``ctx.check``."""
        if not self.world.distributed:
            return None
        if values[7] > 0:
            return "timed_out"
        if values[6] > 0:
            return self.ctx.reason or "cancelled on another rank"
        return None

    def _rank_metrics(self, values: list[float]) -> dict[str, float]:
        if not self.world.distributed:
            return {}
        out: dict[str, float] = {}
        for r in range(self.world.world_size):
            at = self._FIXED + 3 * r
            out[f"rank/{r}/tokens_per_s"] = values[at]
            out[f"rank/{r}/rss_mb"] = values[at + 1]
            out[f"rank/{r}/vram_mb"] = values[at + 2]
        return out

    def _global_count(self, local: int) -> int:
        """A count summed over ranks (one collective, on the collective's device)."""
        if not self.world.distributed:
            return local
        box = torch.tensor([local], dtype=torch.long, device=self.device)
        return int(self.world.all_reduce_sum(box).item())

    def _grad_sync(self, *, last: bool) -> AbstractContextManager[None]:
        """Gradients are reduced across ranks on the last micro-batch only (DDP
        ``no_sync``; FSDP2 ``set_requires_gradient_sync``); nothing for one process."""
        if not self.world.distributed:
            return contextlib.nullcontext()
        if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if last else self.wrapped.no_sync()
        set_sync = getattr(self.wrapped, "set_requires_gradient_sync", None)
        if set_sync is not None:
            set_sync(last)
        return contextlib.nullcontext()

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

    def _to_device(self, t: Tensor) -> Tensor:
        """Host -> device: pinned and non-blocking on CUDA (the copies of all of a step's
        micro-batches are issued before its first forward); a plain ``.to`` elsewhere."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _announce_next_step(self) -> None:
        """Tell the teacher which blocks (this rank's share) the next step will ask for, so
        that one that reads its answers (the offline cache) reads them during this step.
        Not after the last step: a rank then reads only shards its own batches use."""
        last = self.step + 1 >= self.plan.max_steps
        if self.teacher is None or self._cross_tokenizer or last:
            return
        for idx in self.sampler.peek(self.plan.optim.grad_accum):
            start, stop = self.world.shard(len(idx))
            self.teacher.prefetch(idx[start:stop])

    def _micro_batch(self, idx: Tensor, rows: list[int], rollout: bool, micro: int) -> MicroBatch:
        """This rank's share of one global micro-batch (block indices ``idx``, the same as
        the host list ``rows``) on the device; ``num_valid`` is set by the caller. For an
        on-policy step the blocks' first tokens are a prompt the student continues."""
        start, stop = self.world.shard(len(rows))
        local, mine = idx[start:stop], rows[start:stop]
        train = self.data.train
        ids_h = train.input_ids[local]
        if not rollout:
            labels_h = shift_labels(train.labels[local])
            return MicroBatch(
                local,
                self._to_device(ids_h),
                self._to_device(train.attention_mask[local]),
                self._to_device(labels_h),
                0,
                pad_free=self._blocks.pad_free,
                local_valid=self._blocks.valid_of(mine),
                local_tokens=self._blocks.tokens_of(mine),
            )
        op = self.plan.on_policy
        assert op is not None
        prompt = op.prompt_tokens
        new = max(1, min(op.max_new_tokens, ids_h.shape[1] - prompt))
        prompts = ids_h[:, :prompt].tolist()
        seed = self.plan.seed * 1_000_003 + self.step * 97 + micro
        if self.world.distributed:  # each rank samples its own rows: its own stream
            seed = derive_seed("on_policy", seed, self.world.rank)
        continuations = sample_continuations(
            through(self.wrapped),  # type: ignore[arg-type]  # a model-shaped view
            prompts,
            max_new_tokens=new,  # exactly this many forwards on every rank (no early stop)
            temperature=op.temperature,
            seed=seed,
            pad_token_id=None,
            check=self.ctx.heartbeat if self.world.distributed else self.ctx.check,
        )
        seq_h = torch.tensor([p + c[:new] for p, c in zip(prompts, continuations, strict=True)])
        labels = seq_h.clone()
        labels[:, :prompt] = IGNORE_INDEX  # only the student's own tokens are scored
        target = shift_labels(labels)
        seq = self._to_device(seq_h)
        return MicroBatch(
            None,
            seq,
            torch.ones_like(seq),
            self._to_device(target),
            0,
            on_policy=True,
            pad_free=True,
            local_valid=int((target != IGNORE_INDEX).sum()),  # host tensor: no device sync
            local_tokens=int(seq_h.numel()),
        )

    def _micro_step(self, batch: MicroBatch, *, on_policy: bool = False) -> Tensor:
        """Forward and loss by the phase's strategy (inside the wrapper's forward when
        there is one), then backward (gradients accumulate). Returns the detached
        (total, kd, ce, hidden) on the device (hidden 0 without a hidden-state loss)."""
        setup = self._on_policy_setup if on_policy else self._setup
        strategy = self.loss_strategy.strategy
        if self.wrapped is self.model:
            total, kd, ce, hidden = _loss_parts(self.model, strategy, setup, batch)
        else:
            total, kd, ce, hidden = self.wrapped(_loss_parts, strategy, setup, batch)
        total.backward()
        return torch.stack([total.detach(), kd.detach(), ce.detach(), hidden.detach()])

    def _clip(self) -> Tensor:
        """Clip by the global gradient norm and return it (a device tensor; under FSDP2 the
        norm over every rank's shards)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        params += [p for p in self.extra.params if p.grad is not None]
        max_norm = self.plan.optim.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
        return full() if callable(full) else norm

    @staticmethod
    def _nonfinite(totals: dict[str, float], grad_norm: float) -> str | None:
        for name, value in totals.items():
            if not math.isfinite(value):
                return f"{name} loss"
        if not math.isfinite(grad_norm):
            return "gradient"
        return None

    def _handle_nonfinite(self, component: str, totals: dict[str, float]) -> None:
        """Skip or stop; the decision comes from reduced values, so every rank takes it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.extra.zero_grad()
        where = f"{self.prefix}step {self.step + 1}"
        if self.plan.limits.on_nonfinite == "skip" and self.skipped < self.plan.limits.max_skips:
            self.skipped += 1
            if self.world.is_main:
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


def _loss_parts(
    model: torch.nn.Module, strategy: LossStrategy, setup: LossSetup, batch: MicroBatch
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A micro-step's whole loss with ``model`` as the student: what runs inside the
    wrapper's forward (``StepModule``), so every use of the student's parameters, the
    fused loss's head weight included, is seen by DDP/FSDP2. Returns plain tensors (a
    wrapper finds its backward hooks on them): total, kd, ce and the hidden-state part
    (zero when the strategy adds none)."""
    out = strategy(dataclasses.replace(setup, model=model), batch)
    hidden = out.hidden if out.hidden is not None else torch.zeros_like(out.ce)
    return out.total, out.kd, out.ce, hidden


def _source_layers(student: StudentConfig | None, teacher: Teacher | None) -> list[int] | None:
    """The teacher layer each layer of a from_teacher student was cut from (the cut's own
    rule, ``_models.kept_layers``); None for any other student or an unknown one."""
    if student is None or student.init != "from_teacher":
        return None
    model = getattr(teacher, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return kept_layers(len(decoder_stack(model)), student.layers)


@dataclass(frozen=True)
class _BlockFacts:
    """What the hot loop needs to know about the training blocks, computed once on the host:
    per-block valid-label and real-token counts (so a step's counts need no device sync)
    and whether any block is padded (if none, the student gets ``attention_mask=None``).
    Building it validates every label once, so the losses need not per micro-batch."""

    valid: list[int]
    tokens: list[int]
    pad_free: bool

    @classmethod
    def of(cls, blocks: Any, vocab: int | None) -> _BlockFacts:
        labels = shift_labels(blocks.labels)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= (vocab or 2**62)))
        if bool(bad.any()):
            low, high = int(labels[labels != IGNORE_INDEX].min()), int(labels.max())
            raise DataError(
                f"training labels must be {IGNORE_INDEX} or in [0, {vocab}); found values in "
                f"[{low}, {high}] (tokenizer/model vocabulary mismatch?)"
            )
        return cls(
            valid=(labels != IGNORE_INDEX).sum(1).tolist(),
            tokens=blocks.attention_mask.sum(1).tolist(),
            pad_free=bool((blocks.attention_mask != 0).all()),
        )

    def valid_of(self, rows: list[int]) -> int:
        return sum(self.valid[i] for i in rows)

    def tokens_of(self, rows: list[int]) -> int:
        return sum(self.tokens[i] for i in rows)


def _host_indices(idx: Tensor) -> list[int]:
    """The sampler's block indices as a list: a host tensor (never on the device), read
    once per micro-batch for the host-side counts."""
    return [int(i) for i in idx.tolist()]


def _vocab_rows(model: torch.nn.Module) -> int | None:
    head = getattr(model, "get_output_embeddings", None)
    weight = getattr(head() if callable(head) else None, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) else None


def _memory_mb(device: torch.device) -> tuple[float, float]:
    """This process's resident memory and (CUDA) allocated device memory, in MB."""
    rss = psutil.Process().memory_info().rss / 2**20
    vram = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return rss, vram
