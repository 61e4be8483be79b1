"""How a training micro-step turns a batch into a loss: one explicit, swappable strategy.

The Trainer owns the loop (accumulation, clipping, the optimizer, checkpoints, stops); a
:class:`LossStrategy` owns one thing, the forward pass and loss of one micro-batch. An
experiment on that step (another loss path, a dropped mask) is then a strategy handed to
the Trainer through its plan (``TrainPlan.loss_strategy``), not a subclass overriding a
private method, which breaks silently whenever the loop changes.

Two built-ins, chosen by ``loss.strategy`` (``auto`` | ``fused`` | ``logits``):

``logits``  The model's forward returns logits ``[B, T, V]``; the chunked losses score them
            against the teacher's dense logits or sparse top-k targets (plain
            cross-entropy without a teacher). Works with every causal LM. Nothing reads
            the logits after the loss, so by default (``loss.logits_grad=inplace``) the
            loss writes its gradient over them (``training._losses``, "In-place
            gradients"); anything that needs them (a metric) must be computed before.
``fused``   The model's forward runs with ``logits_to_keep`` set to no position, so its lm_head
            projects nothing; the backbone's final hidden states are caught by a forward
            hook on the backbone, and the fused-linear losses project them through the
            lm_head weight chunk by chunk: the student's ``[B, T, V]`` logits never exist.
            The call still goes through the top module's ``forward``, so its hooks fire and
            a wrapper (DDP) sees the forward it must see to all-reduce gradients. An
            in-process teacher whose head qualifies too is projected the same way, so its
            logits never exist either; any other teacher answers as usual (dense logits or
            top-k targets, both supported).

``auto`` (the default) is ``fused`` where :func:`fused_eligibility` allows it and ``logits``
otherwise, and says why. Evaluation and generation (held-out metrics, on-policy samples)
always use the model's logits: they are not micro-steps.

A strategy may own trainable parameters: an ``extra`` attribute holding an ``nn.Module``
(optional; the protocol does not require it). The Trainer then trains them with their own
AdamW on the student's schedule, clips them with the student's gradients, sums their
gradients over ranks each step under DDP (FSDP2 is refused), and saves and restores them
and their optimizer state in every checkpoint, so a resumed run continues exactly
(``training._extra``). They are not part of the student: the export leaves them out. The
hidden-state loss (``training._hidden.HiddenStateLoss``, ``loss.hidden``) is built this
way: it wraps the phase's strategy, and its projections are its ``extra``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundry_kernel.data._blocks import IGNORE_INDEX
from foundry_kernel.errors import ConfigError
from foundry_kernel.teachers._interface import HFTeacher, Teacher
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._losses import (
    LossOutput,
    LossSpec,
    SparseMass,
    distillation_loss,
    fused_linear_cross_entropy,
    fused_linear_distillation_loss,
    fused_linear_sparse_distillation_loss,
    inplace_refusal,
    sparse_distillation_loss,
)
from foundry_kernel.training._precision import autocast

log = logging.getLogger("foundry.train")

__all__ = [
    "STRATEGY_NAMES",
    "FusedLinearLoss",
    "LogitsLoss",
    "LossSetup",
    "LossStrategy",
    "MicroBatch",
    "StrategyChoice",
    "StrategyName",
    "choose_strategy",
    "fused_eligibility",
]

StrategyName = Literal["auto", "fused", "logits"]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)
LogitsGrad = Literal["inplace", "copy"]


# --------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on the model's device, and what makes its loss exact under
    gradient accumulation.

    ``labels`` are already aligned with the positions (``labels[:, t]`` is the token
    position ``t`` predicts; ``IGNORE_INDEX`` = not trained on). ``num_valid`` is the count
    of valid labels over the whole accumulation window: every strategy divides its token sum
    by it, so the micro-batches' gradients add up to the full batch's.
    """

    index: Tensor | None  # training block indices (a logit cache looks them up); None on-policy
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T]
    num_valid: int
    on_policy: bool = False
    # No padding anywhere in this batch: the student runs with ``attention_mask=None`` (so
    # SDPA may take its causal kernel); teachers still get the mask they may need.
    pad_free: bool = False
    # This micro-batch's own valid-label count when the caller counted it on the host (no
    # device sync); None: counted here.
    local_valid: int | None = None
    local_tokens: int | None = None  # this micro-batch's real (unpadded) tokens, host-counted

    @property
    def model_mask(self) -> Tensor | None:
        """The attention mask to hand the student's forward (None when pad-free)."""
        return None if self.pad_free else self.attention_mask


@dataclass(frozen=True)
class LossSetup:
    """What a strategy may use besides the batch; fixed for a training phase.

    ``spec`` None means plain hard-label cross-entropy (no teacher). On on-policy steps the
    Trainer hands a setup whose spec has ``ce_weight=0``. ``logits_grad`` is
    ``loss.logits_grad``: whether the logits strategy lets the loss write its gradient over
    the model's logits (it reads nothing from them after the loss).
    """

    model: nn.Module
    teacher: Teacher | None
    spec: LossSpec | None
    sparse_mass: SparseMass = "tail"
    vocab_size: int | None = None
    amp_dtype: torch.dtype | None = None
    logits_grad: LogitsGrad = "inplace"


@runtime_checkable
class LossStrategy(Protocol):
    """Turns a micro-batch into a loss; the Trainer calls ``backward`` on ``total``.

    A strategy runs the model's forward (through the top module, so hooks and wrappers see
    it) and returns the loss divided by ``batch.num_valid``, with ``kd`` and ``ce`` as
    detached parts for logging. It must not step the optimizer or touch gradients.
    ``name`` is what the run's summary records.
    """

    name: str

    def __call__(self, setup: LossSetup, batch: MicroBatch) -> LossOutput: ...


# --------------------------------------------------------------------------- built-ins


class LogitsLoss:
    """The model's logits ``[B, T, V]``, then the chunked loss over them.

    The loss is the last reader of the logits here: with ``setup.logits_grad == "inplace"``
    it may write its gradient over them. Keep it that way: anything computed from the
    logits (a metric, an agreement count) goes before the loss call, or the setup says
    ``copy``. When the loss had to copy anyway (the model's last op saved its output, say),
    the reason is logged once.
    """

    name = "logits"

    def __init__(self) -> None:
        self._told = False

    def __call__(self, setup: LossSetup, batch: MicroBatch) -> LossOutput:
        device = batch.input_ids.device
        with autocast(device, setup.amp_dtype):
            logits = setup.model(input_ids=batch.input_ids, attention_mask=batch.model_mask)
            logits = logits.logits
        if setup.spec is None:
            flat = logits[..., : setup.vocab_size].float().flatten(0, 1)
            ce = F.cross_entropy(flat, batch.labels.flatten(), ignore_index=-100, reduction="sum")
            ce = ce / batch.num_valid
            zero = torch.zeros((), device=device)
            return LossOutput(total=ce, kd=zero, ce=ce.detach(), n_tokens=_n_valid(batch))
        assert setup.teacher is not None
        signal = setup.teacher.signal(
            batch.index, batch.input_ids, _teacher_mask(setup.teacher, batch)
        )
        inplace = setup.logits_grad == "inplace"
        if inplace and not self._told and torch.is_grad_enabled() and logits.requires_grad:
            why = inplace_refusal(logits)
            if why is not None:
                log.info("logits strategy: the loss keeps its own gradient buffer: %s", why)
            self._told = True
        if isinstance(signal, SparseTargets):
            return sparse_distillation_loss(
                logits,
                signal,
                batch.labels,
                setup.spec,
                mass=setup.sparse_mass,
                num_valid_tokens=batch.num_valid,
                vocab_size=setup.vocab_size,
                inplace=inplace,
            )
        return distillation_loss(
            logits,
            signal,
            batch.labels,
            setup.spec,
            num_valid_tokens=batch.num_valid,
            vocab_size=setup.vocab_size,
            inplace=inplace,
        )


class FusedLinearLoss:
    """Backbone hidden states through the model's forward, then the fused-linear loss.

    ``project_teacher``: an in-process teacher (:class:`HFTeacher` with full logits) is run
    the same way and its hidden states projected chunk by chunk inside the loss; otherwise
    the teacher's ``signal`` (dense logits or top-k targets) is used as it comes.
    """

    name = "fused"

    def __init__(self, *, project_teacher: bool = False) -> None:
        self.project_teacher = project_teacher

    def __call__(self, setup: LossSetup, batch: MicroBatch) -> LossOutput:
        head = _plain_head(setup.model)
        hidden = _hidden_states(setup.model, batch, setup.amp_dtype)
        # The teacher answers outside the student's autocast (it has its own precision);
        # the projections run under it, at the precision the model's lm_head would use.
        project = autocast(batch.input_ids.device, setup.amp_dtype)
        if setup.spec is None:
            with project:
                return fused_linear_cross_entropy(
                    hidden,
                    head.weight,
                    batch.labels,
                    bias=head.bias,
                    num_valid_tokens=batch.num_valid,
                    vocab_size=setup.vocab_size,
                )
        teacher = setup.teacher
        assert teacher is not None
        if self.project_teacher and isinstance(teacher, HFTeacher):
            with torch.no_grad():
                t_hidden = _hidden_states(teacher.model, batch, teacher.amp_dtype)
            t_head = _plain_head(teacher.model)
            vocab = setup.vocab_size if setup.vocab_size is not None else teacher.vocab_size
            with project:
                return fused_linear_distillation_loss(
                    hidden,
                    head.weight,
                    t_hidden,
                    batch.labels,
                    setup.spec,
                    student_bias=head.bias,
                    teacher_weight=t_head.weight,
                    teacher_bias=t_head.bias,
                    num_valid_tokens=batch.num_valid,
                    vocab_size=vocab,
                )
        signal = teacher.signal(batch.index, batch.input_ids, _teacher_mask(teacher, batch))
        with project:
            if isinstance(signal, SparseTargets):
                return fused_linear_sparse_distillation_loss(
                    hidden,
                    head.weight,
                    signal,
                    batch.labels,
                    setup.spec,
                    student_bias=head.bias,
                    mass=setup.sparse_mass,
                    num_valid_tokens=batch.num_valid,
                    vocab_size=setup.vocab_size,
                )
            return fused_linear_distillation_loss(
                hidden,
                head.weight,
                signal,
                batch.labels,
                setup.spec,
                student_bias=head.bias,
                num_valid_tokens=batch.num_valid,
                vocab_size=setup.vocab_size,
            )


def _teacher_mask(teacher: Teacher, batch: MicroBatch) -> Tensor:
    """The mask a teacher is handed: none for an in-process model on a pad-free batch (as
    for the student: SDPA's causal kernel, and no all-ones check that syncs the device);
    the real mask for every other teacher (a server or cache may read it)."""
    if batch.pad_free and type(teacher) is HFTeacher:
        return None  # type: ignore[return-value]  # HFTeacher passes it to the model as is
    return batch.attention_mask


def _n_valid(batch: MicroBatch) -> int:
    if batch.local_valid is not None:
        return batch.local_valid
    return int((batch.labels != IGNORE_INDEX).sum())


def _plain_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()  # type: ignore[operator]  # checked by eligibility
    assert isinstance(head, nn.Linear)
    return head


# --------------------------------------------------------------------------- hidden states


def _last_hidden(output: Any) -> Tensor | None:
    """The backbone's final hidden states from whatever its forward returned."""
    value = getattr(output, "last_hidden_state", None)
    if value is None and isinstance(output, tuple) and output:
        value = output[0]
    if value is None and isinstance(output, Tensor):
        value = output
    return value if isinstance(value, Tensor) else None


class _HiddenCatcher:
    """A forward hook on the backbone, held for one call, that keeps its final hidden states
    (after the final norm: exactly what the lm_head would be given)."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.value: Tensor | None = None
        self.calls = 0

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        self.value = _last_hidden(output)

    @contextlib.contextmanager
    def catching(self) -> Iterator[_HiddenCatcher]:
        handle = self.backbone.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                f"{type(self.backbone).__name__} ran no forward or returned no hidden states; "
                "set loss.strategy=logits"
            )
        return value


def _no_positions(device: torch.device) -> Tensor:
    """``logits_to_keep`` that keeps no position: the lm_head projects a ``[B, 0, H]`` slice."""
    return torch.empty(0, dtype=torch.long, device=device)


def _hidden_states(model: nn.Module, batch: MicroBatch, amp: torch.dtype | None) -> Tensor:
    """Run ``model``'s own forward with no logits kept; return its backbone's hidden states."""
    device = batch.input_ids.device
    catcher = _HiddenCatcher(model.base_model)  # type: ignore[arg-type]  # eligibility checked
    with autocast(device, amp), catcher.catching():
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.model_mask,
            logits_to_keep=_no_positions(device),
        )
    return catcher.take()


# --------------------------------------------------------------------------- eligibility

# Config attributes with which a transformers family transforms its logits after the lm_head
# (read from the families' modeling code): the fused loss projects with the bare lm_head,
# so with any of these set it would train against different logits than the model makes.
_SOFT_CAPS = {
    "final_logit_softcapping": "soft-caps its logits, tanh (Gemma 2/3/4, VaultGemma, T5Gemma)",
    "logits_soft_cap": "soft-caps its logits, tanh (RecurrentGemma)",
}
_SCALES = {
    "logit_scale": "multiplies its logits (Cohere, Cohere 2)",
    "logits_scaling": "divides or multiplies its logits (Granite family, HyperCLOVA X)",
    "output_multiplier": "multiplies its logits (Muse)",
    "lm_head_multiplier": "multiplies its logits (Falcon-H1)",
}


def _logit_transform(config: Any) -> str | None:
    """The first logit transform the model's config (or its text config) switches on."""
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            configs.append(text())
    for cfg in configs:
        for attr, what in _SOFT_CAPS.items():
            value = getattr(cfg, attr, None)
            if value is not None and value != 0:
                return f"config.{attr}={value!r}: the model {what}"
        for attr, what in _SCALES.items():
            value = getattr(cfg, attr, None)
            if value is not None and value != 1:
                return f"config.{attr}={value!r}: the model {what}"
    return None


def fused_eligibility(model: nn.Module, *, probe: bool = True) -> tuple[bool, str]:
    """Whether the fused-linear loss gives this model's own loss, and why (or why not).

    Eligible when: ``get_output_embeddings()`` is a plain ``nn.Linear`` (a bias is handled);
    ``base_model`` is a separate backbone whose output that head projects; the config
    switches on none of the known logit transforms (soft-capping, scaling); ``forward`` is
    a transformers model class's own (a forward defined elsewhere may do anything to the
    logits) and takes ``logits_to_keep``. Then, with ``probe``, two tiny forwards check it
    on the model itself: with a hook catching the backbone's output, the model's logits
    equal ``lm_head(hidden)`` (any transform, a forward hook included, shows up here), and
    ``logits_to_keep`` with no position leaves no logits.
    """
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return False, (
            f"{name}.get_output_embeddings() is {type(head).__name__}, not a plain nn.Linear "
            "lm_head (a wrapped or custom head may compute something else)"
        )
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return False, f"{name} has no separate backbone (base_model) feeding its lm_head"
    transform = _logit_transform(getattr(model, "config", None))
    if transform is not None:
        return False, f"{name} {transform}, which the fused loss would skip"
    forward = type(model).forward
    where = f"{getattr(forward, '__module__', '?')}.{getattr(forward, '__qualname__', '?')}"
    if not where.startswith("transformers.models."):
        return False, (
            f"{name}.forward is {where}, not a transformers model's own: what it does to the "
            "logits after the lm_head is unknown"
        )
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return False, f"{name}.forward takes no logits_to_keep (cannot skip the full logits)"
    if probe:
        problem = _probe(model, backbone, head)
        if problem is not None:
            return False, f"{name}: {problem}"
    shape = "x".join(str(n) for n in head.weight.shape)
    bias = " with bias" if head.bias is not None else ""
    return True, f"{name} has a plain lm_head ({shape}{bias}) and no logit transform"


def _probe(model: nn.Module, backbone: nn.Module, head: nn.Linear) -> str | None:
    """Check on four tokens that the model's logits are ``head(backbone output)`` and that
    keeping no position keeps no logits. No gradient, eval mode (restored after)."""
    weight = head.weight
    if weight.device.type == "meta":
        return "its weights are on the meta device (nothing to probe)"
    ids = (torch.arange(1, 5, device=weight.device) % weight.shape[0]).unsqueeze(0)
    mask = torch.ones_like(ids)
    catcher = _HiddenCatcher(backbone)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), catcher.catching():
            full = model(input_ids=ids, attention_mask=mask).logits
            hidden = catcher.take()
            none = model(
                input_ids=ids, attention_mask=mask, logits_to_keep=_no_positions(ids.device)
            ).logits
            catcher.take()
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        return f"a probe forward failed ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        model.train(was_training)
    if none is None or none.shape[:2] != (1, 0):
        got = None if none is None else tuple(none.shape)
        return f"logits_to_keep with no position still made logits of shape {got}"
    with torch.no_grad():
        # Read the head again: a sharded teacher (FSDP2) holds its gathered weight only
        # after a forward, and the one read above may be this rank's shard.
        weight = head.weight
        ref = F.linear(hidden.to(weight.dtype), weight, head.bias).float()
    if full is None or full.shape != ref.shape:
        got = None if full is None else tuple(full.shape)
        return f"its logits {got} are not lm_head(backbone output) {tuple(ref.shape)}"
    gap = float((full.float() - ref).abs().max())
    scale = float(ref.abs().max())
    if not math.isfinite(gap) or gap > 1e-5 * max(scale, 1e-6):
        return (
            f"its logits differ from lm_head(backbone output) by up to {gap:.3g} (of "
            f"{scale:.3g}): the forward, or a hook on it, transforms them"
        )
    return None


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a phase trains with, what was asked for, and why it is this one."""

    strategy: LossStrategy
    requested: str
    reason: str

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def fell_back(self) -> bool:
        return self.requested == "auto" and self.name != "fused"

    def as_dict(self) -> dict[str, str]:
        """What the run's summary records."""
        return {"strategy": self.name, "requested": self.requested, "reason": self.reason}


def _teacher_projection(teacher: Teacher | None) -> tuple[bool, str]:
    """Whether the fused step can project the teacher's hidden states too, and why."""
    if teacher is None:
        return False, "none (plain cross-entropy)"
    if not isinstance(teacher, HFTeacher) or type(teacher).signal is not HFTeacher.signal:
        return False, f"{type(teacher).__name__} answers with its own signal"
    if teacher.top_k is not None:
        return False, f"top-{teacher.top_k} targets"
    ok, why = fused_eligibility(teacher.model)
    if not ok:
        return False, f"its logits ({why})"
    return True, "hidden states projected chunk by chunk"


def choose_strategy(
    requested: str | LossStrategy, model: nn.Module, teacher: Teacher | None
) -> StrategyChoice:
    """Resolve ``loss.strategy`` for this model and teacher.

    ``logits``: always. ``fused``: the fused strategy, or a :class:`ConfigError` naming why
    this model cannot use it and the fix. ``auto``: fused where eligible, else logits with
    the reason. A :class:`LossStrategy` object is used as given.
    """
    if not isinstance(requested, str):
        if not isinstance(requested, LossStrategy):
            raise ConfigError(
                f"loss strategy {requested!r} is neither a name ({', '.join(STRATEGY_NAMES)}) "
                "nor a LossStrategy (a callable (setup, batch) -> LossOutput with a name)",
                field="loss.strategy",
            )
        return StrategyChoice(requested, "custom", f"given: {type(requested).__name__}")
    if requested not in STRATEGY_NAMES:
        raise ConfigError(
            f"unknown loss.strategy {requested!r}; expected one of {', '.join(STRATEGY_NAMES)}",
            field="loss.strategy",
        )
    if requested == "logits":
        return StrategyChoice(LogitsLoss(), requested, "asked for (loss.strategy=logits)")
    ok, why = fused_eligibility(model)
    if not ok:
        if requested == "fused":
            raise ConfigError(
                f"loss.strategy=fused cannot train this student: {why}. Set "
                "loss.strategy=logits (or auto, which falls back by itself).",
                field="loss.strategy",
            )
        return StrategyChoice(LogitsLoss(), requested, f"fell back to logits: {why}")
    project, t_why = _teacher_projection(teacher)
    return StrategyChoice(
        FusedLinearLoss(project_teacher=project), requested, f"{why}; teacher: {t_why}"
    )
