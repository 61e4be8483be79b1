"""Hidden-state losses: match chosen student layers to chosen teacher layers.

Why: the logit loss tells the student *what* the teacher predicts; matching intermediate
hidden states also tells it *how* the teacher gets there (DistilBERT's cosine loss,
Minitron's layer losses). It is most natural with ``student.init=from_teacher``, where each
student layer starts as a copy of a known teacher layer.

Hidden-state index ``0`` is the input of the first decoder layer (the embeddings, with
whatever the family adds: learned positions, Gemma's scaling); index ``i >= 1`` is the
output of decoder layer ``i`` itself (1-based), before any final norm (transformers'
``output_hidden_states`` applies the final norm to its last entry; here every index is a
layer's own output, so a student layer and the teacher layer it was cut from compare like
with like). For each chosen pair ``(t, s)`` and every valid position (label not
``IGNORE_INDEX``), with ``P`` a learned ``nn.Linear(d_s, d_t)`` when the widths differ and
the identity when they are equal::

    cosine:  sum_valid (1 - cos(P h_s, h_t))                     / num_valid
    mse:     sum_valid mean_over_d_t (P h_s - h_t)^2               / num_valid

averaged over the pairs; ``total = logit loss + loss.hidden.weight * hidden``. ``num_valid``
is the whole step's valid-token count (all micro-batches, all ranks), as for every other
term, so the value is exact under gradient accumulation and data parallelism.

How it plugs in: :class:`HiddenStateLoss` wraps any :class:`LossStrategy` (``logits``,
``fused`` or a custom one). For one micro-step it registers forward hooks on the chosen
decoder layers of the student and of the in-process teacher, runs the inner strategy
unchanged (so the teacher answers through ``teacher.signal`` on the logits path and through
``_hidden_states`` on the fused path, and both ways fire the hooks, on on-policy steps
too), removes the hooks, and adds the hidden term. The projections are the strategy's
``extra`` module: the Trainer trains, checkpoints and synchronises them (see
``training._strategy``). They are a training aid: the exported student does not contain
them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundry_kernel import _models
from foundry_kernel._isolation import derive_seed
from foundry_kernel.config import HiddenLossConfig
from foundry_kernel.data._blocks import IGNORE_INDEX
from foundry_kernel.errors import ConfigError, ModelError
from foundry_kernel.teachers._interface import HFTeacher, Teacher
from foundry_kernel.training._losses import LossOutput
from foundry_kernel.training._strategy import LossSetup, LossStrategy, MicroBatch, StrategyChoice

__all__ = [
    "HiddenProjections",
    "HiddenStateLoss",
    "decoder_stack",
    "default_pairs",
    "hidden_state_loss",
    "resolve_pairs",
    "with_hidden_loss",
]

FIELD = "loss.hidden.layers"
Pair = tuple[int, int]  # (teacher index, student index)

# --------------------------------------------------------------------------- the layers


def decoder_stack(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers in order (``_models.decoder_stack``, which finds them in
    every family), with a :class:`ConfigError` naming ``loss.hidden`` if there are none."""
    try:
        return _models.decoder_stack(model)[1]  # type: ignore[arg-type]  # any HF model
    except ModelError as exc:
        raise ConfigError(
            f"loss.hidden: cannot find the decoder layers of {type(model).__name__}; drop "
            "loss.hidden",
            field="loss.hidden",
        ) from exc


def default_pairs(teacher_layers: int, student_layers: int) -> list[Pair]:
    """Each student index ``i`` in ``1..L_s`` with teacher index ``round(i * L_t / L_s)``
    (half up, at least 1: a student layer is never matched to the teacher's embeddings)."""
    return [
        (max(1, math.floor(i * teacher_layers / student_layers + 0.5)), i)
        for i in range(1, student_layers + 1)
    ]


def resolve_pairs(
    cfg: HiddenLossConfig,
    *,
    teacher_layers: int,
    student_layers: int,
    source_layers: Sequence[int] | None = None,
) -> list[Pair]:
    """The (teacher, student) index pairs a run matches.

    ``cfg.layers`` when given (checked against both depths); else, for a student cut from
    the teacher (``source_layers``: the 0-based teacher layer each student layer is a copy
    of), each student layer ``j`` with its source (index ``j + 1`` with ``source + 1``);
    else :func:`default_pairs`. Out-of-range indices: a :class:`ConfigError` naming
    ``loss.hidden.layers`` and both valid ranges.
    """
    if cfg.layers is not None:
        pairs = [(int(t), int(s)) for t, s in cfg.layers]
        bad = [[t, s] for t, s in pairs if t > teacher_layers or s > student_layers]
        if bad:
            raise ConfigError(
                f"{FIELD}: {bad} out of range; teacher indices are 0..{teacher_layers} and "
                f"student indices 0..{student_layers} (0 = the embeddings, i = after decoder "
                "layer i)",
                field=FIELD,
            )
        return pairs
    if source_layers is not None and len(source_layers) == student_layers:
        if all(0 <= src < teacher_layers for src in source_layers):
            return [(src + 1, j + 1) for j, src in enumerate(source_layers)]
    return default_pairs(teacher_layers, student_layers)


# --------------------------------------------------------------------------- the math


class HiddenProjections(nn.Module):
    """One map per pair from the student's width to the teacher's: a learned
    ``nn.Linear(d_s, d_t)`` where they differ, the identity where they are equal.
    Initialised from ``seed`` alone (uniform in ``+-1/sqrt(d_s)``, zero bias), so every rank
    and every resumed run starts from the same weights."""

    def __init__(self, widths: Sequence[tuple[int, int]], *, seed: int = 0) -> None:
        super().__init__()
        maps: list[nn.Module] = []
        for i, (d_s, d_t) in enumerate(widths):
            if d_s == d_t:
                maps.append(nn.Identity())
                continue
            linear = nn.Linear(d_s, d_t)
            g = torch.Generator().manual_seed(derive_seed("hidden-projection", seed, i))
            bound = 1.0 / math.sqrt(d_s)
            with torch.no_grad():
                linear.weight.copy_(torch.rand(d_t, d_s, generator=g) * 2 * bound - bound)
                linear.bias.zero_()
            maps.append(linear)
        self.maps = nn.ModuleList(maps)

    def forward(self, index: int, hidden: Tensor) -> Tensor:
        return self.maps[index](hidden)


def hidden_state_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    projections: HiddenProjections,
    labels: Tensor,
    *,
    kind: str,
    num_valid: int,
) -> Tensor:
    """The hidden-state term (see the module docstring): per pair, the sum over valid
    positions of ``1 - cos`` or of the per-dimension mean squared error, divided by
    ``num_valid``; the mean over pairs. Computed in at least fp32 (float64 stays float64)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need as many student as teacher states, >= 1 ({len(student)})")
    valid = (labels != IGNORE_INDEX).reshape(-1)
    terms = []
    for i, (h_s, h_t) in enumerate(zip(student, teacher, strict=True)):
        dtype = torch.promote_types(h_s.dtype, torch.float32)
        s = projections(i, h_s.to(dtype).reshape(-1, h_s.shape[-1])[valid])
        t = h_t.to(s.dtype).reshape(-1, h_t.shape[-1])[valid]
        if kind == "cosine":
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        elif kind == "mse":
            per_token = (s - t).pow(2).mean(dim=-1)
        else:
            raise ValueError(f"unknown hidden-state loss kind {kind!r}")
        terms.append(per_token.sum() / max(num_valid, 1))
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- capture


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    hidden = getattr(value, "hidden_states", None)
    return hidden if isinstance(hidden, Tensor) else None


class _Recorder:
    """Forward hooks on one model's decoder layers, held for one micro-step, keeping the
    hidden states at the chosen indices (0: the first layer's input; i: layer i's output)."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        self.stack = decoder_stack(model)
        self.indices = sorted(set(indices))
        self.values: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[_Recorder]:
        handles = []
        for index in self.indices:
            if index == 0:
                handles.append(
                    self.stack[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
            else:
                handles.append(self.stack[index - 1].register_forward_hook(self._hook(index)))
        self.values = {}
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        value = args[0] if args else kwargs.get("hidden_states")
        if isinstance(value, Tensor):
            self.values[0] = value

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _first_tensor(output)
            if value is not None:
                self.values[index] = value

        return hook

    def take(self, index: int, who: str) -> Tensor:
        value = self.values.get(index)
        if value is None:
            raise RuntimeError(
                f"the {who}'s hidden state {index} was not seen during the micro-step (its "
                "forward ran outside the loss strategy, or the layer returned no tensor)"
            )
        return value


# --------------------------------------------------------------------------- the strategy


class HiddenStateLoss:
    """A :class:`LossStrategy` that adds the hidden-state term to an inner strategy.

    ``extra`` holds the projections (trained by the Trainer, never exported). ``name`` is
    the inner strategy's, so the summary's ``loss_strategy`` still says which logit path
    ran; :meth:`describe` says what was added.
    """

    def __init__(
        self,
        inner: LossStrategy,
        cfg: HiddenLossConfig,
        pairs: Sequence[Pair],
        *,
        student_width: int,
        teacher_width: int,
        seed: int = 0,
    ) -> None:
        self.inner = inner
        self.cfg = cfg
        self.pairs = [(int(t), int(s)) for t, s in pairs]
        widths = [(student_width, teacher_width)] * len(self.pairs)
        self.extra = HiddenProjections(widths, seed=seed)
        self.name = inner.name

    def describe(self) -> str:
        learned = sum(p.numel() for p in self.extra.parameters())
        maps = "identity" if not learned else f"learned projections, {learned:,} parameters"
        pairs = ", ".join(f"{t}<-{s}" for t, s in self.pairs)
        return (
            f"hidden-state loss {self.cfg.kind} x {self.cfg.weight:g} on teacher<-student "
            f"indices {pairs} ({maps}; not exported)"
        )

    def __call__(self, setup: LossSetup, batch: MicroBatch) -> LossOutput:
        teacher = setup.teacher
        if not isinstance(teacher, HFTeacher):
            raise RuntimeError("loss.hidden needs an in-process (hf) teacher")
        student_rec = _Recorder(setup.model, [s for _, s in self.pairs])
        teacher_rec = _Recorder(teacher.model, [t for t, _ in self.pairs])
        with student_rec.recording(), teacher_rec.recording():
            out = self.inner(setup, batch)
        student = [student_rec.take(s, "student") for _, s in self.pairs]
        teacher_states = [teacher_rec.take(t, "teacher").detach() for t, _ in self.pairs]
        hidden = hidden_state_loss(
            student,
            teacher_states,
            self.extra,
            batch.labels,
            kind=self.cfg.kind,
            num_valid=batch.num_valid,
        )
        total = out.total + self.cfg.weight * hidden.to(out.total.dtype)
        return LossOutput(
            total=total,
            kd=out.kd,
            ce=out.ce,
            n_tokens=out.n_tokens,
            hidden=hidden.detach(),
            logits_grad=out.logits_grad,
        )


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    if callable(text):
        config = text()
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(width, int):
        raise ConfigError(
            f"loss.hidden: {type(model).__name__}'s config names no hidden_size",
            field="loss.hidden",
        )
    return width


def with_hidden_loss(
    choice: StrategyChoice,
    cfg: HiddenLossConfig | None,
    model: nn.Module,
    teacher: Teacher | None,
    *,
    source_layers: Sequence[int] | None = None,
    seed: int = 0,
) -> StrategyChoice:
    """The phase's strategy with the hidden-state term added when ``cfg`` asks for it
    (``choice`` unchanged otherwise). The pairs are resolved here, where both models are
    known: bad indices are a :class:`ConfigError` naming ``loss.hidden.layers``."""
    if cfg is None:
        return choice
    if not isinstance(teacher, HFTeacher):
        raise ConfigError(
            f"loss.hidden: needs an in-process (hf) teacher's hidden states; this phase's "
            f"teacher is {type(teacher).__name__}. Set teacher.backend=hf and "
            "distill.mode=online (or on_policy), or drop loss.hidden",
            field="loss.hidden",
        )
    t_layers, s_layers = len(decoder_stack(teacher.model)), len(decoder_stack(model))
    pairs = resolve_pairs(
        cfg, teacher_layers=t_layers, student_layers=s_layers, source_layers=source_layers
    )
    strategy = HiddenStateLoss(
        choice.strategy,
        cfg,
        pairs,
        student_width=_width(model),
        teacher_width=_width(teacher.model),
        seed=seed,
    )
    device = next(model.parameters()).device
    strategy.extra.to(device)
    return StrategyChoice(strategy, choice.requested, f"{choice.reason}; {strategy.describe()}")
