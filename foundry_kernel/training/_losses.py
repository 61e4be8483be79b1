"""Distillation losses: the divergences the anchors define, computed memory-lean.

Notation: ``p`` is the teacher distribution and ``q`` the student's, both
``softmax(logits / temperature)``. Every divergence is summed over the vocabulary
per token, then summed over *valid* tokens and divided by a normalizer (see
:func:`distillation_loss`).

Four entry points (and two fused variants, below):

* :func:`token_divergence` - the plain reference path. Dense torch ops, autograd for
  gradients. It exists so the fast paths have something independent to be checked
  against and for small inputs.
* :func:`distillation_loss` - the production path over precomputed logits. It works on
  ``spec.chunk_tokens`` valid rows at a time inside a custom autograd function that
  computes the loss *and its analytic gradient* in the forward pass, and keeps only that
  gradient (in the student logits' dtype) for backward. The fp32 full-vocabulary
  log-probabilities of teacher and student therefore exist for one chunk at a time,
  instead of the five or six ``[tokens, vocab]`` fp32 tensors autograd would keep. With
  ``inplace=True`` (the Trainer's default, ``loss.logits_grad``) that gradient is written
  over the logits themselves, so not even one extra ``[tokens, vocab]`` buffer exists; see
  "In-place gradients" below for when that is allowed and how misuse is caught.
* :func:`fused_linear_distillation_loss` - as above, but it also owns the student's
  ``lm_head`` projection, so full student logits never exist at all (Liger-style).
* :func:`sparse_distillation_loss` - the same divergences against a teacher that only
  gave its top-k log-probabilities (:class:`~foundry_kernel.teachers._targets.SparseTargets`, from
  vLLM or the offline logit cache), compared on the k ids (+ one tail bucket).

:func:`fused_linear_sparse_distillation_loss` and :func:`fused_linear_cross_entropy` are the
sparse loss and plain hard-label cross-entropy with the lm_head fused in the same way; the
Trainer's ``fused`` loss strategy (``foundry_kernel.training._strategy``) uses all three.

Gradients used by the chunked paths, with ``z = student_logits / tau`` and, for any
per-element "gradient wrt probabilities" ``g``, the softmax Jacobian
``dL/dz = q * (g - <q, g>)``:

* forward KL ``KL(p||q)``:        ``dL/dz = q - p``
* reverse KL ``KL(q||p)``:        ``g = log q - log p``
* JSD(beta), ``m = beta p + (1-beta) q``: ``g = (1 - beta) (log q - log m)``
  (the terms from ``dm/dq`` cancel exactly)
* skew forward, ``m = a p + (1-a) q``: ``g = -(1 - a) p / m``
* skew reverse, ``m = (1-a) p + a q``: ``g = log q - log m - a q / m``
* TVD ``1/2 sum |p - q|``:         ``g = 1/2 sign(q - p)`` (subgradient 0 at ties)
* hard-label CE at tau=1:         ``dL/dlogits = softmax(logits) - onehot(label)``

and ``dL/dlogits = dL/dz / tau``; the tau**2 option multiplies the KD term (value and
gradient) by ``tau**2``, which is why Hinton added it: it cancels the ``1/tau**2`` that
softening puts on the KD gradient, keeping it on the scale of the CE gradient.

In-place gradients (the logits path: :func:`distillation_loss`, :func:`sparse_distillation_loss`)
---------------------------------------------------------------------------------------------
The chunked logits path makes the whole gradient in forward. Kept in a buffer of its own
(``inplace=False``, "copy") it is one more ``[tokens, vocab]`` tensor: at a 128k vocabulary
and 4k tokens that is 2 GiB in fp32, 0.2x of what plain PyTorch peaks at. Written over the
logits (``inplace=True``) it costs nothing: each chunk is read (gathered into a temporary)
before its gradient is scattered back into the same rows, rows without a target and
columns past ``vocab_size`` are zeroed, and backward returns that storage, scaled in place.
The values and gradients are bit-for-bit those of the copy path (tested per divergence).

What it costs the caller: **after the call the logits tensor holds the gradient, not the
logits.** A function cannot see whether its caller reads its argument later, so the public
functions default to the copy (``inplace=False``); a caller that has read all it needs
from the logits opts in. The engine's own caller, the ``logits`` training strategy,
computes nothing from the logits after the loss and opts in unless ``loss.logits_grad:
copy``. Even when asked, the loss copies instead (and reports ``LossOutput.logits_grad ==
"copy"``) whenever :func:`inplace_refusal` names a reason, i.e. when the storage may be
needed by someone else:

* no gradient is wanted (grad mode off, or the logits do not require grad): nothing is
  written at all;
* the tensor is a leaf (the caller's own data; its ``.grad`` would alias it) or a view of
  one, or ``retain_grad()`` was called on it (the caller reads it after backward);
* it does not cover its whole storage exactly (a slice such as ``logits[:, :-1]``, a
  strided or offset view, a non-contiguous tensor): the rest belongs to the tensor it views;
* it is a tensor subclass (DTensor, a wrapper) whose storage semantics we do not know;
* the op that produced it (its ``grad_fn``, and for a view the base's ``grad_fn``) saved
  this very storage for its own backward: ``tanh``/``sigmoid``/``exp``/``softmax`` as the
  last op, or a custom Function that saved it. (Gemma-2-style soft-capping ends with a
  multiplication by a constant, which saves nothing, so it stays in place.)

Two checks catch what inspection cannot. The writes go through an alias that shares the
tensor's version counter, so any *other* autograd node that saved the logits (a second
loss over them computed before this one) fails its backward with PyTorch's "modified by an
inplace operation" error instead of silently using the gradient as logits; and the loss
records the version it left and refuses, in backward, a gradient someone overwrote in
between. What no check can see is a plain read of the values after the call (metrics,
top-1 agreement): compute those before the loss, or keep ``inplace=False``. (Liger's
cross-entropy, the model for this, has its Triton kernel store the gradient over any
contiguous input - a leaf, rows sliced from a bigger tensor, an op's saved output alike -
through a raw pointer, so no version counter moves and nothing can notice; it has no
opt-out, and a code comment is where the overwrite is written down.)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from foundry_kernel.config import LossConfig
from foundry_kernel.data._blocks import IGNORE_INDEX
from foundry_kernel.errors import ConfigError, LossInputError
from foundry_kernel.teachers._targets import SparseTargets, log1mexp

__all__ = [
    "IGNORE_INDEX",
    "LossKind",
    "LossOutput",
    "LossSpec",
    "SparseMass",
    "distillation_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distillation_loss",
    "fused_linear_sparse_distillation_loss",
    "inplace_refusal",
    "sparse_distillation_loss",
    "token_divergence",
    "trusted_labels",
]

LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
_KINDS: tuple[str, ...] = get_args(LossKind)

"""Label value that marks a position as not trained on (prompt or padding), as in HF/TRL."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LossSpec:
    """What to compute. Validated on construction so a bad config fails before any model loads.

    ``jsd_normalized``: the interior of the generalized JSD behaves like
    ``beta * KL(p||q)`` as beta -> 0 and like ``(1 - beta) * KL(q||p)`` as beta -> 1, so it
    tends to 0 at both ends while the endpoints are special-cased to the full KLs: the
    curve jumps. Dividing the interior by ``beta * (1 - beta)`` removes the jump: the
    normalized interior tends to ``KL(p||q)`` as beta -> 0 and to ``KL(q||p)`` as beta -> 1
    (first-order expansion of ``m`` around ``q`` resp. ``p``; the other KL term is
    ``O(beta**2)`` resp. ``O((1 - beta)**2)``). At beta = 1/2 it is 4x the plain JSD. The
    endpoints themselves are unchanged.
    """

    kind: LossKind = "forward_kl"
    beta: float = 0.5
    jsd_normalized: bool = False
    skew_alpha: float = 0.1
    temperature: float = 1.0
    scale_by_t2: bool = False
    ce_weight: float = 0.0
    chunk_tokens: int = 256

    @classmethod
    def from_config(cls, loss: LossConfig) -> LossSpec:
        """The loss functions' view of the ``loss`` config section."""
        return cls(
            kind=loss.kind,
            beta=loss.beta,
            jsd_normalized=loss.jsd_normalized,
            skew_alpha=loss.skew_alpha,
            temperature=loss.temperature,
            scale_by_t2=loss.scale_by_t2,
            ce_weight=loss.ce_weight,
            chunk_tokens=loss.chunk_tokens,
        )

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(
                f"unknown loss kind {self.kind!r}; expected one of {', '.join(_KINDS)}",
                field="loss.kind",
            )
        _check_range("beta", self.beta, 0.0, 1.0, closed=True)
        _check_range("skew_alpha", self.skew_alpha, 0.0, 1.0, closed=False)
        _check_range("ce_weight", self.ce_weight, 0.0, 1.0, closed=True)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"temperature must be a positive finite number, got {self.temperature!r}",
                field="loss.temperature",
            )
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
            raise ConfigError(
                f"chunk_tokens must be an integer, got {self.chunk_tokens!r}",
                field="loss.chunk_tokens",
            )
        if self.chunk_tokens < 1:
            raise ConfigError(
                f"chunk_tokens must be >= 1, got {self.chunk_tokens}", field="loss.chunk_tokens"
            )

    @property
    def kd_scale(self) -> float:
        """Factor on the KD term: tau**2 when Hinton's scaling is on, else 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0


def _check_range(name: str, value: float, low: float, high: float, *, closed: bool) -> None:
    """Reject out-of-range mixing weights early; NaN fails both comparisons and is rejected."""
    ok = low <= value <= high if closed else low < value < high
    if not ok:
        brackets = ("[", "]") if closed else ("(", ")")
        raise ConfigError(
            f"{name} must be in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}",
            field=f"loss.{name}",
        )


@dataclass
class LossOutput:
    """Result of one loss call.

    ``total`` carries the gradient; ``kd`` (already multiplied by tau**2 when
    ``scale_by_t2``, before the ``1 - ce_weight`` weight) and ``ce`` are detached, for
    logging. All three are divided by the same normalizer, so under gradient
    accumulation with a global ``num_valid_tokens`` they sum across micro-batches.
    ``hidden`` (detached, unweighted) is the hidden-state term when a strategy adds one
    (``training._hidden``; ``total`` then holds it times ``loss.hidden.weight``), else None.
    ``logits_grad`` says how a logits-path loss kept its gradient: ``"inplace"`` (written
    over the student logits, which now hold it), ``"copy"`` (a buffer of its own; the logits
    are untouched) or None (no gradient made, or not a logits-path loss).
    """

    total: Tensor
    kd: Tensor
    ce: Tensor
    n_tokens: int
    hidden: Tensor | None = None
    logits_grad: str | None = None


# --------------------------------------------------------------------------- shared helpers

# Labels already validated where the batches were built (the Trainer checks its blocks
# once): the per-call range check, a host sync per micro-step, is skipped inside.
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("foundry_trusted", default=False)


@contextlib.contextmanager
def trusted_labels() -> Iterator[None]:
    """Skip the label range check (``IGNORE_INDEX`` or in ``[0, vocab)``) of the losses
    called inside: for callers that validated every label once, where the batches are built
    (``Trainer`` does). Shapes and dtypes are still checked (free: no host sync)."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for everything (bf16/fp16 softmax over 100k entries is too coarse); fp64 stays fp64
    so tests can check gradients to ~1e-12."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _log_mix(log_a: Tensor, w_a: float, log_b: Tensor, w_b: float) -> Tensor:
    """``log(w_a * a + w_b * b)`` in log space, so tiny probabilities do not underflow.

    When autograd is recording, entries where both inputs are ``-inf`` (vocabulary
    entries masked out in both models) are routed around ``logaddexp``: its backward
    there is ``0 * nan = nan``, which would poison the student's gradient.
    """
    la = log_a + math.log(w_a)
    lb = log_b + math.log(w_b)
    if not (torch.is_grad_enabled() and (la.requires_grad or lb.requires_grad)):
        return torch.logaddexp(la, lb)
    both_empty = torch.isneginf(la) & torch.isneginf(lb)
    mixed = torch.logaddexp(la.masked_fill(both_empty, 0.0), lb.masked_fill(both_empty, 0.0))
    return mixed.masked_fill(both_empty, -math.inf)


def _guarded_log_ratio(w: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """``log_a - log_b`` where ``w > 0``, else 0: the convention ``0 * log 0 = 0``.

    Masked vocabulary entries (``-inf`` logits) otherwise give ``-inf - -inf = nan``. The
    ``where`` sits *before* any multiplication so autograd never sees ``0 * inf`` either.
    """
    return torch.where(w > 0, log_a - log_b, 0.0)


def _kl_rows(w: Tensor, log_w: Tensor, log_other: Tensor) -> Tensor:
    """Per-row ``sum_v w * (log w - log other)`` with ``0 * log 0 = 0``."""
    return (w * _guarded_log_ratio(w, log_w, log_other)).sum(-1)


def _resolve_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """Pick the vocabulary width both sides are compared over.

    Models are often saved with the embedding padded past the tokenizer (e.g. 152064 vs
    151936 within one family); the extra rows are never real tokens, so slicing both to
    the tokenizer's size is exact. A mismatch without ``vocab_size`` is refused rather than
    guessed, because slicing two truly different vocabularies compares unrelated tokens.
    """
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise LossInputError(
                f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) "
                "differ; if one model's embedding is padded beyond the shared tokenizer, pass "
                "vocab_size=<tokenizer vocabulary size> to compare the first vocab_size logits",
                argument="vocab_size",
            )
        return student_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise LossInputError(
            f"vocab_size must be a positive integer, got {vocab_size!r}", argument="vocab_size"
        )
    if vocab_size > min(student_vocab, teacher_vocab):
        raise LossInputError(
            f"vocab_size={vocab_size} exceeds the logits' width (student {student_vocab}, "
            f"teacher {teacher_vocab})",
            argument="vocab_size",
        )
    return vocab_size


# --------------------------------------------------------------------------- plain reference path


def _forward_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    return _kl_rows(log_p.exp(), log_p, log_q)


def _reverse_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    return _kl_rows(log_q.exp(), log_q, log_p)


def _jsd(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    beta = spec.beta
    if beta == 0.0:
        return _forward_kl(log_q, log_p, spec)
    if beta == 1.0:
        return _reverse_kl(log_q, log_p, spec)
    log_m = _log_mix(log_q, 1.0 - beta, log_p, beta)
    value = beta * _kl_rows(log_p.exp(), log_p, log_m) + (1.0 - beta) * _kl_rows(
        log_q.exp(), log_q, log_m
    )
    return value / (beta * (1.0 - beta)) if spec.jsd_normalized else value


def _skew_forward_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    alpha = spec.skew_alpha
    log_m = _log_mix(log_p, alpha, log_q, 1.0 - alpha)
    return _kl_rows(log_p.exp(), log_p, log_m)


def _skew_reverse_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    alpha = spec.skew_alpha
    log_m = _log_mix(log_p, 1.0 - alpha, log_q, alpha)
    return _kl_rows(log_q.exp(), log_q, log_m)


def _tvd(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_PLAIN: dict[str, Callable[[Tensor, Tensor, LossSpec], Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def _tempered_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / tau)`` in the compute dtype."""
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    spec: LossSpec,
    *,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token divergence ``D(p, q)`` of ``spec.kind`` at ``spec.temperature``: shape ``[...]``.

    The plain path: dense ops, differentiable by autograd, memory ~6 fp32 copies of the
    logits. It deliberately excludes the tau**2 factor, the CE term and any reduction, so
    it is the bare divergence the anchors write down; :func:`distillation_loss` adds those.
    """
    v = _resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    _check_leading_shapes(student_logits.shape[:-1], teacher_logits.shape[:-1], "teacher_logits")
    log_q = _tempered_log_probs(student_logits[..., :v], spec.temperature)
    log_p = _tempered_log_probs(teacher_logits[..., :v].detach(), spec.temperature)
    return _PLAIN[spec.kind](log_q, log_p, spec)


# --------------------------------------------------------------------------- analytic kernels
# Each returns (per-row value [c], dL/dz [c, V]) with z = student_logits / tau.


def _softmax_backward(q: Tensor, g: Tensor) -> Tensor:
    """``q * (g - <q, g>)``: pull a gradient wrt probabilities back through softmax, in place
    on ``g`` (callers hand over a temporary). Entries with ``q == 0`` get exactly 0."""
    inner = torch.linalg.vecdot(q, g, dim=-1).unsqueeze(-1)
    return g.sub_(inner).mul_(q)


def _grad_forward_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    p = log_p.exp()
    value = _kl_rows(p, log_p, log_q)
    return value, log_q.exp().sub_(p)


def _grad_reverse_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    q = log_q.exp()
    r = _guarded_log_ratio(q, log_q, log_p)
    value = torch.linalg.vecdot(q, r, dim=-1)
    return value, _softmax_backward(q, r)


def _grad_jsd(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    beta = spec.beta
    if beta == 0.0:
        return _grad_forward_kl(log_q, log_p, spec)
    if beta == 1.0:
        return _grad_reverse_kl(log_q, log_p, spec)
    log_m = _log_mix(log_q, 1.0 - beta, log_p, beta)
    q = log_q.exp()
    r_q = _guarded_log_ratio(q, log_q, log_m)
    value = beta * _kl_rows(log_p.exp(), log_p, log_m)
    value += (1.0 - beta) * torch.linalg.vecdot(q, r_q, dim=-1)
    grad = _softmax_backward(q, r_q.mul_(1.0 - beta))
    if spec.jsd_normalized:
        norm = beta * (1.0 - beta)
        value /= norm
        grad /= norm
    return value, grad


def _grad_skew_forward_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    alpha = spec.skew_alpha
    log_m = _log_mix(log_p, alpha, log_q, 1.0 - alpha)
    p = log_p.exp()
    r_p = _guarded_log_ratio(p, log_p, log_m)
    value = torch.linalg.vecdot(p, r_p, dim=-1)
    # p / m = exp(log p - log m) is bounded by 1 / alpha; 0 where p == 0 (r_p guarded to 0).
    ratio = r_p.exp_().mul_(p > 0)
    return value, _softmax_backward(log_q.exp(), ratio.mul_(-(1.0 - alpha)))


def _grad_skew_reverse_kl(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    alpha = spec.skew_alpha
    log_m = _log_mix(log_p, 1.0 - alpha, log_q, alpha)
    q = log_q.exp()
    r_q = _guarded_log_ratio(q, log_q, log_m)
    value = torch.linalg.vecdot(q, r_q, dim=-1)
    # g = log q - log m - alpha * q / m; where q == 0 the softmax Jacobian zeroes it anyway.
    g = r_q.exp().mul_(-alpha).add_(r_q)
    return value, _softmax_backward(q, g)


def _grad_tvd(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor]:
    q = log_q.exp()
    diff = q - log_p.exp()
    value = 0.5 * diff.abs().sum(-1)
    return value, _softmax_backward(q, diff.sign_().mul_(0.5))


_ANALYTIC: dict[str, Callable[[Tensor, Tensor, LossSpec], tuple[Tensor, Tensor]]] = {
    "forward_kl": _grad_forward_kl,
    "reverse_kl": _grad_reverse_kl,
    "jsd": _grad_jsd,
    "skew_forward_kl": _grad_skew_forward_kl,
    "skew_reverse_kl": _grad_skew_reverse_kl,
    "tvd": _grad_tvd,
}


@dataclass(frozen=True)
class _Plan:
    """Everything a chunked forward needs besides the tensors autograd must see."""

    spec: LossSpec
    rows: tuple[Tensor, ...]  # index tensors (one per leading dim) of the valid positions
    targets: Tensor  # [M] labels of the valid positions
    vocab: int
    normalizer: float

    @property
    def n_rows(self) -> int:
        return int(self.targets.numel())

    @property
    def kd_coef(self) -> float:
        """d total / d (per-token KD value)."""
        return (1.0 - self.spec.ce_weight) * self.spec.kd_scale / self.normalizer

    @property
    def ce_coef(self) -> float:
        """d total / d (per-token CE value)."""
        return self.spec.ce_weight / self.normalizer

    def chunks(self) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
        """Yield (row indices, targets) for ``chunk_rows(...)`` valid rows at a time."""
        size = chunk_rows(self.spec.chunk_tokens, self.vocab)
        for start in range(0, self.n_rows, size):
            stop = start + size
            yield tuple(i[start:stop] for i in self.rows), self.targets[start:stop]


CHUNK_BUDGET_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 16


def chunk_rows(chunk_tokens: int, vocab: int) -> int:
    """Rows per chunk: ``loss.chunk_tokens`` at most, and few enough that one fp32
    vocabulary-wide temporary stays near 32 MiB.

    A chunk keeps about eight such temporaries alive; at a 128k vocabulary 1024 rows make
    that ~4 GiB, more than a plain full-logits loss at 1k tokens. Measured by
    ``python -m bench loss`` at 128k x 4096 tokens: fused loss 4.17 GiB at 1024 rows vs
    0.67 GiB at 65 rows (same time); logits loss 5.99 vs 2.55 GiB and faster.
    """
    budget = max(CHUNK_BUDGET_BYTES // (4 * max(vocab, 1)), MIN_CHUNK_ROWS)
    return max(1, min(chunk_tokens, budget))


def _chunk_loss_and_grad(
    student: Tensor, teacher: Tensor, targets: Tensor, plan: _Plan, *, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """KD sum, CE sum and d total / d student_logits for one chunk ``[c, V]`` of valid rows.

    The returned gradient already includes every coefficient (1 - ce_weight, tau**2,
    1/tau, 1/normalizer, ce_weight), so callers only copy or project it.
    """
    spec = plan.spec
    tau = spec.temperature
    s = student.to(_compute_dtype(student))
    # Hard-label CE at tau = 1, always computed for logging: logsumexp - logit[label].
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    ce_sum = (lse.squeeze(-1) - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    # At tau = 1 the CE normalizer is the student's log-partition: reuse it.
    log_q = s - lse if tau == 1.0 else torch.log_softmax(s / tau, dim=-1)
    log_p = _tempered_log_probs(teacher, tau)
    if not with_grad:
        return _PLAIN[spec.kind](log_q, log_p, spec).sum(), ce_sum, None
    value, grad = _ANALYTIC[spec.kind](log_q, log_p, spec)
    del log_q, log_p
    grad.mul_(plan.kd_coef / tau)
    if plan.ce_coef > 0.0:
        grad.add_(s.sub(lse).exp_(), alpha=plan.ce_coef)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] -= plan.ce_coef
    return value.sum(), ce_sum, grad


def _finish(plan: _Plan, kd_sum: Tensor, ce_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn the accumulated sums into (total, kd, ce) scalars."""
    kd = kd_sum * (plan.spec.kd_scale / plan.normalizer)
    ce = ce_sum / plan.normalizer
    w = plan.spec.ce_weight
    total = (1.0 - w) * kd + w * ce
    return total, kd, ce


def _scale_grad(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """Apply the upstream scalar in place: exact (and the same bits) when it is 1, with no
    host sync (the former ``torch.equal`` test stalled a GPU once per backward) and no
    copy. The saved buffer therefore serves one backward: see :func:`_spend`."""
    if grad is None:
        return None
    return grad.mul_(grad_output.to(grad.dtype))


def _spend(ctx: Any) -> None:
    """Refuse a second backward through one loss call (``retain_graph``): its saved
    gradient was scaled in place by the first."""
    if getattr(ctx, "spent", False):
        raise RuntimeError(
            "backward ran twice through one chunked loss call; call the loss again instead "
            "of retain_graph=True (its saved gradient is scaled in place)"
        )
    ctx.spent = True


# --------------------------------------------------------------------------- chunked logits path

GradMode = Literal["none", "copy", "inplace"]
"""How :class:`_ChunkedDistillation` keeps the gradient: not at all, in a buffer of its own,
or over the student logits."""


def inplace_refusal(student: Tensor) -> str | None:
    """Why the gradient may NOT be written over ``student`` (None: it may).

    The rules of the module docstring ("In-place gradients"), cheapest first; each names
    a way the storage could still be needed after the loss. Passing all of them does not
    prove the caller will not read the values later: that is the caller's promise, made by
    asking for ``inplace=True``.
    """
    if not (torch.is_grad_enabled() and student.requires_grad):
        return "no gradient is needed (grad mode is off or the logits do not require grad)"
    if type(student) is not Tensor:
        return f"a tensor subclass ({type(student).__name__}) whose storage is not ours to reuse"
    base = student._base
    if student.is_leaf or (base is not None and base.is_leaf):
        return "a leaf tensor (or a view of one): its values are the caller's own data"
    if student.retains_grad or (base is not None and base.retains_grad):
        return "retain_grad() was called on it: the caller reads it after backward"
    storage = student.untyped_storage()
    if (
        not student.is_contiguous()
        or student.storage_offset() != 0
        or storage.nbytes() != student.numel() * student.element_size()
    ):
        return (
            "it does not cover its whole storage (a slice, strided or offset view): the rest "
            "belongs to the tensor it views"
        )
    for node in (student.grad_fn, None if base is None else base.grad_fn):
        saver = _saved_this_storage(node, storage.data_ptr())
        if saver is not None:
            return f"{saver} saved this storage for its own backward"
    return None


def _saved_this_storage(node: Any, data_ptr: int) -> str | None:
    """The name of ``node`` when a tensor it saved for backward lives in the storage at
    ``data_ptr``, else None.

    A built-in op saves its own output as ``_saved_result*`` (tanh, exp, softmax...); an
    in-place op whose formula needs its input saves a clone of it, so the other ``_saved_*``
    fields cannot alias the output and are not unpacked (under saved-tensor hooks, e.g.
    CPU offloading, unpacking a saved lm_head weight would copy it). A custom Function
    (Python, or ``torch.compile``'s) is looked at whole: its ``saved_tensors`` and its ctx
    attributes.
    """
    if node is None:
        return None
    custom = hasattr(node, "saved_tensors")
    names = ["saved_tensors"] if custom else [n for n in dir(node) if n.startswith("_saved_result")]
    values: list[Any] = []
    for name in names:
        try:
            values.append(getattr(node, name))
        except RuntimeError:  # freed after an earlier backward: it needs nothing now
            continue
    if custom:
        values.extend(getattr(node, "__dict__", {}).values())
    for value in values:
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, Tensor) and item.untyped_storage().data_ptr() == data_ptr:
                return type(node).__name__
    return None


def _grad_mode(student: Tensor, inplace: bool, argument: str = "inplace") -> GradMode:
    """Resolve a loss call's ``inplace`` request into what it will do (see module docstring)."""
    if not isinstance(inplace, bool):
        raise LossInputError(f"inplace must be True or False, got {inplace!r}", argument=argument)
    if not (torch.is_grad_enabled() and student.requires_grad):
        return "none"
    if inplace and inplace_refusal(student) is None:
        return "inplace"
    return "copy"


def _zero_untouched(buf: Tensor, plan: _Plan) -> None:
    """Give gradient 0 where no chunk wrote one: positions without a target (their logits are
    still there) and vocabulary columns past ``plan.vocab``. Writes those rows only."""
    if plan.vocab < buf.shape[-1]:
        buf[..., plan.vocab :] = 0
    lead = buf.shape[:-1]
    if plan.n_rows == lead.numel():  # every position has a target (valid rows are unique)
        return
    untouched = torch.ones(lead, dtype=torch.bool, device=buf.device)
    untouched[plan.rows] = False
    buf[untouched] = 0


class _ChunkedDistillation(torch.autograd.Function):
    """Loss over precomputed student logits; the gradient is made in forward, chunk by chunk.

    ``teacher_rows(rows)`` gives the teacher's targets for a chunk of rows (dense logits
    or sparse top-k) and ``chunk_fn`` computes that chunk's loss and gradient, so dense
    and sparse losses share this one driver. Only the gradient wrt the student logits
    (same shape and dtype as them) is kept; the teacher never receives a gradient.

    ``mode`` (:func:`_grad_mode`): ``"copy"`` keeps it in a new buffer, saved for backward;
    ``"inplace"`` scatters it over the student logits through ``student.detach()`` (same
    storage, same version counter, so the writes are visible to autograd's checks) and
    keeps that alias with the version it left; ``"none"`` computes the loss only.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher_rows: Callable[[tuple[Tensor, ...]], Any],
        chunk_fn: Callable[..., tuple[Tensor, Tensor, Tensor | None]],
        plan: _Plan,
        mode: GradMode,
    ) -> tuple[Tensor, Tensor, Tensor]:
        with_grad = mode != "none"
        grad: Tensor | None = None
        if mode == "copy":
            grad = torch.zeros_like(student, memory_format=torch.contiguous_format)
        elif mode == "inplace":
            grad = student.detach()
        cdt = _compute_dtype(student)
        kd_sum = torch.zeros((), dtype=cdt, device=student.device)
        ce_sum = torch.zeros((), dtype=cdt, device=student.device)
        s_view = student.detach()[..., : plan.vocab]
        g_view = None if grad is None else grad[..., : plan.vocab]
        for rows, targets in plan.chunks():
            # Advanced indexing gathers the chunk into a temporary before any write below,
            # so in place, each chunk reads logits and only then gets its gradient.
            kd_c, ce_c, g = chunk_fn(
                s_view[rows], teacher_rows(rows), targets, plan, with_grad=with_grad
            )
            kd_sum += kd_c
            ce_sum += ce_c
            if g_view is not None and g is not None:
                g_view[rows] = g.to(g_view.dtype)
        total, kd, ce = _finish(plan, kd_sum, ce_sum)
        ctx.mode = mode
        if mode == "inplace":
            assert grad is not None
            _zero_untouched(grad, plan)
            ctx.inplace_grad, ctx.version = grad, grad._version
            ctx.save_for_backward(None)
        else:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(
        ctx: Any, grad_total: Tensor, _grad_kd: Tensor, _grad_ce: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        _spend(ctx)
        if ctx.mode == "inplace":
            grad, ctx.inplace_grad = ctx.inplace_grad, None  # free it with the graph
            if grad._version != ctx.version:
                raise RuntimeError(
                    "the student logits were modified after the loss wrote its gradient over "
                    f"them (version {grad._version}, expected {ctx.version}); do not change "
                    "the logits between the loss and backward, or call the loss with "
                    "inplace=False (loss.logits_grad=copy)"
                )
        else:
            (grad,) = ctx.saved_tensors
        return _scale_grad(grad, grad_total), None, None, None, None


def _valid_rows(
    labels: Tensor, lead_shape: torch.Size, vocab: int
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Indices and targets of positions whose label is not IGNORE_INDEX, with range checks."""
    if labels.shape != lead_shape:
        raise LossInputError(
            f"labels shape {tuple(labels.shape)} does not match the logits' leading shape "
            f"{tuple(lead_shape)}; labels must already be aligned with the logit positions",
            argument="labels",
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise LossInputError(
            f"labels must be an integer tensor, got {labels.dtype}", argument="labels"
        )
    valid = labels != IGNORE_INDEX
    rows = valid.nonzero(as_tuple=True)
    targets = labels[rows].long()
    if _TRUSTED.get():
        return rows, targets
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise LossInputError(
            f"labels must be {IGNORE_INDEX} or in [0, {vocab}); found values in "
            f"[{int(targets.min())}, {int(targets.max())}] (tokenizer/model vocabulary mismatch?)",
            argument="labels",
        )
    return rows, targets


def _normalizer(num_valid_tokens: int | Tensor | None, n_local: int) -> float:
    """Divisor for the token sums: the global count when given (exact gradient accumulation)."""
    if num_valid_tokens is None:
        return float(max(n_local, 1))
    n = int(num_valid_tokens.item() if isinstance(num_valid_tokens, Tensor) else num_valid_tokens)
    if n < n_local:
        raise LossInputError(
            f"num_valid_tokens={n} is smaller than the {n_local} valid tokens in this call; it "
            "must be the count over the whole gradient-accumulation window",
            argument="num_valid_tokens",
        )
    return float(max(n, 1))


def _check_leading_shapes(student: torch.Size, teacher: torch.Size, what: str) -> None:
    if student != teacher:
        raise LossInputError(
            f"{what} leading shape {tuple(teacher)} does not match the student's {tuple(student)}",
            argument="inputs",
        )


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    spec: LossSpec,
    *,
    num_valid_tokens: int | Tensor | None = None,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> LossOutput:
    """KD (+ optional CE) loss over logits ``[..., V]``, chunked and memory-lean.

    ``labels[..., t]`` is the token that ``logits[..., t, :]`` predicts: the caller has
    already applied the causal shift (``logits[:, :-1]`` with ``labels[:, 1:]``).
    Positions labelled ``IGNORE_INDEX`` (prompt, padding) contribute nothing.

    ``total = (1 - ce_weight) * kd + ce_weight * ce``, where ``kd`` is the per-token
    divergence (times tau**2 if ``scale_by_t2``) and ``ce`` the hard-label cross-entropy
    at tau = 1, both summed over valid tokens and divided by ``num_valid_tokens`` when
    given - pass the valid-token count of the whole gradient-accumulation window there,
    which makes accumulated micro-batch gradients equal the full-batch gradient - else by
    this call's valid-token count (at least 1).

    ``inplace``: False (default) keeps the gradient in a buffer of its own and leaves
    ``student_logits`` untouched. True writes it over ``student_logits`` (no second
    ``[..., V]`` buffer: at 128k x 4k tokens the peak drops from ~0.2x to ~0.05x of plain
    PyTorch's); pass True only if nothing reads the logits after this call: from then on
    they hold the gradient. The loss still copies when :func:`inplace_refusal` names a
    reason (a leaf, a slice, a producer that saved them...); ``LossOutput.logits_grad``
    says which it did. Details and the checks that catch misuse: the module docstring.
    """
    v = _resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    lead = student_logits.shape[:-1]
    _check_leading_shapes(lead, teacher_logits.shape[:-1], "teacher_logits")
    mode = _grad_mode(student_logits, inplace)
    rows, targets = _valid_rows(labels.to(student_logits.device), lead, v)
    plan = _Plan(spec, rows, targets, v, _normalizer(num_valid_tokens, targets.numel()))
    t_view = teacher_logits.detach()[..., : plan.vocab]
    total, kd, ce = _ChunkedDistillation.apply(
        student_logits, lambda rows: t_view[rows], _chunk_loss_and_grad, plan, mode
    )
    return LossOutput(total=total, kd=kd, ce=ce, n_tokens=plan.n_rows, logits_grad=_reported(mode))


def _reported(mode: GradMode) -> str | None:
    return None if mode == "none" else mode


# --------------------------------------------------------------------------- fused linear path


@dataclass(frozen=True)
class _Teacher:
    """Teacher side of the fused path: precomputed logits, or hidden states and an lm_head."""

    tensor: Tensor  # logits [..., Vt] or hidden [..., Ht]
    weight: Tensor | None
    bias: Tensor | None

    def logits(self, rows: tuple[Tensor, ...], vocab: int) -> Tensor:
        """Teacher logits for ``rows``, restricted to the shared vocabulary."""
        if self.weight is None:
            return self.tensor[..., :vocab][rows]
        return _project(self.tensor[rows], self.weight[:vocab], _vsl(self.bias, vocab))


def _vsl(bias: Tensor | None, vocab: int) -> Tensor | None:
    return None if bias is None else bias[:vocab]


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` in the weights' dtype (as the model's lm_head would)."""
    hidden = hidden.to(weight.dtype)
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


class _FusedLinearDistillation(torch.autograd.Function):
    """Student logits are made chunk by chunk from hidden states and never exist in full.

    Like :class:`_ChunkedDistillation`, the driver is shared: ``teacher_rows(rows)`` gives
    the teacher's side of a chunk (dense logits, sparse top-k, or nothing for plain
    cross-entropy) and ``chunk_fn`` that chunk's loss and its gradient wrt the chunk's
    logits, which is then projected back onto hidden states, weight and bias.

    Saved for backward: the gradients wrt the hidden states, lm_head weight and bias (each
    the size and dtype of its input). The weight gradient is accumulated across chunks in
    the weight's dtype with addmm (each chunk's product is itself accumulated in fp32 by the
    matmul), to avoid a second fp32 copy of a vocabulary-sized matrix.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher_rows: Callable[[tuple[Tensor, ...]], Any],
        chunk_fn: Callable[..., tuple[Tensor, Tensor, Tensor | None]],
        plan: _Plan,
    ) -> tuple[Tensor, Tensor, Tensor]:
        v = plan.vocab
        w_v, b_v = weight[:v], _vsl(bias, v)
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        with_grad = any(g is not None for g in (grad_h, grad_w, grad_b))
        cdt = _compute_dtype(weight)
        kd_sum = torch.zeros((), dtype=cdt, device=hidden.device)
        ce_sum = torch.zeros((), dtype=cdt, device=hidden.device)
        for rows, targets in plan.chunks():
            h_c = hidden[rows].to(weight.dtype)
            kd_c, ce_c, g = chunk_fn(
                _project(h_c, w_v, b_v), teacher_rows(rows), targets, plan, with_grad=with_grad
            )
            kd_sum += kd_c
            ce_sum += ce_c
            if g is None:
                continue
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[rows] = (g @ w_v).to(grad_h.dtype)
            if grad_w is not None:
                grad_w[:v].addmm_(g.T, h_c)
            if grad_b is not None:
                grad_b[:v] += g.sum(0).to(grad_b.dtype)
        total, kd, ce = _finish(plan, kd_sum, ce_sum)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(
        ctx: Any, grad_total: Tensor, _grad_kd: Tensor, _grad_ce: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        _spend(ctx)
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (
            _scale_grad(grad_h, grad_total),
            _scale_grad(grad_w, grad_total),
            _scale_grad(grad_b, grad_total),
            None,
            None,
            None,
        )


def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    """Shape checks that would otherwise surface as an opaque matmul error mid-loop."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise LossInputError(
            f"{who} hidden size {hidden.shape[-1]} does not match its lm_head weight "
            f"{tuple(weight.shape)} (expected [vocab, hidden])",
            argument="inputs",
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise LossInputError(
            f"{who} lm_head bias shape {tuple(bias.shape)} does not match vocab {weight.shape[0]}",
            argument="inputs",
        )


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor,
    labels: Tensor,
    spec: LossSpec,
    *,
    student_bias: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    num_valid_tokens: int | Tensor | None = None,
    vocab_size: int | None = None,
) -> LossOutput:
    """Same loss as :func:`distillation_loss`, with the student's lm_head fused in.

    ``student_hidden`` is ``[..., H]`` (the final hidden states, already aligned with
    ``labels`` like the logits would be) and ``student_weight`` the lm_head ``[V, H]``.
    ``teacher`` is the teacher's logits ``[..., Vt]`` when ``teacher_weight`` is None,
    otherwise its final hidden states ``[..., Ht]`` projected with ``teacher_weight``
    ``[Vt, Ht]`` (and ``teacher_bias``) chunk by chunk without gradient. Gradients flow
    to ``student_hidden``, ``student_weight`` and ``student_bias``.
    """
    _check_linear(student_hidden, student_weight, student_bias, "student")
    if teacher_weight is not None:
        _check_linear(teacher, teacher_weight, teacher_bias, "teacher")
        teacher_vocab = teacher_weight.shape[0]
    else:
        teacher_vocab = teacher.shape[-1]
    v = _resolve_vocab(student_weight.shape[0], teacher_vocab, vocab_size)
    lead = student_hidden.shape[:-1]
    _check_leading_shapes(lead, teacher.shape[:-1], "teacher")
    rows, targets = _valid_rows(labels.to(student_hidden.device), lead, v)
    plan = _Plan(spec, rows, targets, v, _normalizer(num_valid_tokens, targets.numel()))
    side = _Teacher(
        teacher.detach(),
        None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    total, kd, ce = _FusedLinearDistillation.apply(
        student_hidden,
        student_weight,
        student_bias,
        lambda rows: side.logits(rows, v),
        _chunk_loss_and_grad,
        plan,
    )
    return LossOutput(total=total, kd=kd, ce=ce, n_tokens=plan.n_rows)


# --------------------------------------------------------------------------- sparse top-k path

SparseMass = Literal["tail", "renormalize"]
"""How :func:`sparse_distillation_loss` treats the probability mass outside the top-k."""
_MASSES: tuple[str, ...] = get_args(SparseMass)


@dataclass(frozen=True)
class _SparseTeacher:
    """The teacher's side of the sparse loss, indexed like the student's leading dims."""

    ids: Tensor  # [..., k] int64
    logprobs: Tensor  # [..., k] log p at tau = 1
    tail: Tensor | None  # [...] log tail mass (mass="tail" only)

    def rows(self, rows: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
        return (
            self.ids[rows],
            self.logprobs[rows],
            None if self.tail is None else self.tail[rows],
        )


def _sparse_teacher_logp(logprobs: Tensor, tail: Tensor | None, tau: float) -> Tensor:
    """Teacher log-probabilities on the k (+1 tail) atoms at temperature ``tau``.

    Both modes are a log-softmax of ``log p / tau`` over the atoms: over the k ids alone
    ("renormalize"), or over the k ids and the tail bucket as a single atom ("tail"). At
    tau = 1 the latter only repairs rounding (the k+1 masses already sum to 1).
    """
    atoms = logprobs if tail is None else torch.cat([logprobs, tail.unsqueeze(-1)], dim=-1)
    return torch.log_softmax(atoms / tau, dim=-1)


def _sparse_student_logp(
    s: Tensor, lse: Tensor, ids: Tensor, tau: float, *, with_tail: bool
) -> Tensor:
    """Student log-probabilities on the same atoms, from its full-vocabulary logits ``s``.

    "renormalize": ``log_softmax(s[ids] / tau)``, i.e. the full softmax gathered at the ids
    and renormalised over them. "tail": the full softmax at tau gathered at the ids, plus
    ``log(1 - sum)`` for the rest of the vocabulary; this vector is not renormalised (it
    sums to 1 except where the tail sits on the e^-30 floor).
    """
    z_ids = s.gather(-1, ids)
    if not with_tail:
        return torch.log_softmax(z_ids / tau, dim=-1)
    lse_tau = lse if tau == 1.0 else torch.logsumexp(s / tau, dim=-1)
    log_q = z_ids / tau - lse_tau.unsqueeze(-1)
    tail = log1mexp(torch.logsumexp(log_q, dim=-1))
    return torch.cat([log_q, tail.unsqueeze(-1)], dim=-1)


def _sparse_rows(
    s: Tensor, teacher: tuple[Tensor, Tensor, Tensor | None], targets: Tensor, spec: LossSpec
) -> tuple[Tensor, Tensor]:
    """Per-row KD divergence (no tau**2) and hard-label CE at tau = 1 for one chunk."""
    ids, logprobs, tail = teacher
    lse = torch.logsumexp(s, dim=-1)
    ce = lse - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    tau = spec.temperature
    log_q = _sparse_student_logp(s, lse, ids, tau, with_tail=tail is not None)
    log_p = _sparse_teacher_logp(
        logprobs.to(s.dtype), None if tail is None else tail.to(s.dtype), tau
    )
    return _PLAIN[spec.kind](log_q, log_p, spec), ce


def _sparse_chunk_loss_and_grad(
    student: Tensor,
    teacher: tuple[Tensor, Tensor, Tensor | None],
    targets: Tensor,
    plan: _Plan,
    *,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """KD sum, CE sum and d total / d student_logits for one chunk, by local autograd.

    The chunk's small graph (a few ``[c, V]`` temporaries) is built, differentiated and
    dropped here, so only the returned gradient outlives the chunk. Autograd rather than
    an analytic kernel because the tail bucket couples every vocabulary entry through
    ``log(1 - sum q_ids)``; the divergence formulas themselves are the shared ``_PLAIN``.
    """
    s = student.detach().to(_compute_dtype(student))
    if not with_grad:
        kd, ce = _sparse_rows(s, teacher, targets, plan.spec)
        return kd.sum(), ce.sum(), None
    s.requires_grad_()
    with torch.enable_grad():
        kd, ce = _sparse_rows(s, teacher, targets, plan.spec)
        kd_sum, ce_sum = kd.sum(), ce.sum()
        objective = plan.kd_coef * kd_sum
        if plan.ce_coef > 0.0:
            objective = objective + plan.ce_coef * ce_sum
        (grad,) = torch.autograd.grad(objective, s)
    return kd_sum.detach(), ce_sum.detach(), grad


def _check_sparse_ids(ids: Tensor, vocab: int, *, distinct: bool = False) -> None:
    """Refuse top-k ids the student cannot score: out of range, or repeated in a position.

    Checked on the valid rows only (the ones the loss reads). A repeated id would count
    its probability twice and could push the student's top-k mass past 1.
    """
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise LossInputError(
            f"teacher top-k ids must be in [0, {vocab}) (the student's vocabulary); found "
            f"ids in [{low}, {high}]. Teacher and student must share one tokenizer; if the "
            "student's embedding is padded, pass vocab_size=<tokenizer vocabulary size>",
            argument="targets",
        )
    if distinct:  # the producer checked (SparseTargets.ids_distinct): no sort per step
        return
    ordered = ids.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise LossInputError(
            "teacher top-k ids repeat within a position; each position needs k distinct ids",
            argument="targets",
        )


def _sparse_teacher(
    targets: SparseTargets, lead: torch.Size, mass: str, device: torch.device
) -> _SparseTeacher:
    """Validate the targets' shape and mode, and move what the loss reads to ``device``."""
    if mass not in _MASSES:
        raise ConfigError(
            f"unknown sparse mass mode {mass!r}; expected one of {', '.join(_MASSES)}",
            field="loss.top_k_mass",
        )
    if targets.ids.shape[:-1] != lead:
        raise LossInputError(
            f"sparse targets cover positions {tuple(targets.ids.shape[:-1])} but the student "
            f"logits cover {tuple(lead)}; both must be [B, T] for the same (shifted) positions",
            argument="targets",
        )
    if targets.k < 1:
        raise LossInputError("sparse targets hold no ids (k = 0)", argument="targets")
    tail = targets.tail_logmass().to(device) if mass == "tail" else None
    return _SparseTeacher(
        targets.ids.detach().to(device).long(), targets.logprobs.detach().to(device), tail
    )


def sparse_distillation_loss(
    student_logits: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    spec: LossSpec,
    *,
    mass: SparseMass = "tail",
    num_valid_tokens: int | Tensor | None = None,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> LossOutput:
    """KD (+ optional CE) loss against a teacher's top-k log-probabilities.

    ``student_logits`` is ``[B, T, V']``; ``targets`` holds the teacher's top-k ids and
    log-probabilities for the same ``[B, T]`` positions (normalised over the teacher's full
    vocabulary at temperature 1); ``labels`` are aligned as in :func:`distillation_loss`.
    With ``q = log_softmax(student_logits[..., :vocab_size] / tau)`` over the full
    (sliced) vocabulary, both distributions are reduced to the same few atoms:

    * ``mass="tail"`` - k + 1 atoms: the k ids and one bucket for everything else. Teacher
      tail = ``exp(targets.tail_logmass())``; student = ``q`` gathered at the ids plus
      ``1 - sum`` of those, its log computed stably and floored at ``TAIL_FLOOR`` like the
      teacher's. At tau != 1 the teacher's top-k log-probabilities are divided by tau,
      the tail bucket is treated as *one* atom of log-mass ``tail / tau``, and the k + 1
      vector is renormalised. That is an approximation (the true tempered tail is a sum
      over the tail tokens of ``p_i^(1/tau)``, which top-k data cannot give); it is exact
      at tau = 1. The student side is always exact.
    * ``mass="renormalize"`` - k atoms: the teacher's ``log_softmax(logprobs / tau)`` over
      its ids, and the student's ``q`` restricted to the same ids and renormalised (equal to
      ``log_softmax(student_logits[ids] / tau)``). Only the shape of the top-k is matched;
      the student gets no signal about the mass it puts elsewhere.

    ``spec.kind`` (with beta, jsd_normalized, skew_alpha) is then applied to the two atom
    vectors with the same per-row formulas as the dense loss. ``scale_by_t2``, the
    ``ce_weight`` mix (CE on the student's full logits at tau = 1), masking
    (``IGNORE_INDEX`` rows contribute nothing) and the ``num_valid_tokens`` normaliser are
    exactly those of :func:`distillation_loss`. With k = V: "renormalize" equals the dense
    loss against logits ``logprobs`` at any tau; "tail" does at tau = 1 up to the
    teacher's fp32 rounding of its normalisation (``sum(exp(logprobs))`` misses 1 by
    ~1e-7, which reads as a tail of that mass), but not at tau = 2, where that atom
    becomes ~3e-4 of the tempered mass (forward KL moved by ~1e-3 relative).

    Memory: valid rows are processed ``chunk_rows(spec.chunk_tokens, V)`` at a time; each
    chunk's loss is differentiated by plain autograd *inside the forward pass* (a small
    graph over that chunk only), and only the resulting gradient wrt the student logits is
    kept for backward, as in the dense path. So the full-vocabulary softmax of all rows is
    never alive at once. ``inplace`` is that of :func:`distillation_loss`: True writes the
    gradient over ``student_logits`` (when :func:`inplace_refusal` allows), False (default)
    keeps a buffer of its own.

    Raises :class:`~foundry_kernel.errors.ConfigError` (a ``ValueError``) when the targets'
    ``[B, T]`` differ from the logits', when an id is outside ``[0, vocab)`` or repeats
    within a position, or for an unknown ``mass``.
    """
    v = _resolve_vocab(student_logits.shape[-1], student_logits.shape[-1], vocab_size)
    lead = student_logits.shape[:-1]
    teacher = _sparse_teacher(targets, lead, mass, student_logits.device)
    mode = _grad_mode(student_logits, inplace)
    rows, labels_v = _valid_rows(labels.to(student_logits.device), lead, v)
    _check_sparse_ids(teacher.ids[rows], v, distinct=targets.ids_distinct)
    plan = _Plan(spec, rows, labels_v, v, _normalizer(num_valid_tokens, labels_v.numel()))
    total, kd, ce = _ChunkedDistillation.apply(
        student_logits, teacher.rows, _sparse_chunk_loss_and_grad, plan, mode
    )
    return LossOutput(total=total, kd=kd, ce=ce, n_tokens=plan.n_rows, logits_grad=_reported(mode))


def fused_linear_sparse_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    spec: LossSpec,
    *,
    student_bias: Tensor | None = None,
    mass: SparseMass = "tail",
    num_valid_tokens: int | Tensor | None = None,
    vocab_size: int | None = None,
) -> LossOutput:
    """:func:`sparse_distillation_loss` with the student's lm_head fused in.

    ``student_hidden`` ``[B, T, H]`` and ``student_weight`` ``[V, H]`` (+ ``student_bias``)
    replace the student logits; each chunk's logits are projected, scored against the
    teacher's top-k exactly as the unfused loss does, and dropped, so the student's
    ``[B, T, V]`` logits never exist. Same validation, same value, same gradients.
    """
    _check_linear(student_hidden, student_weight, student_bias, "student")
    width = student_weight.shape[0]
    v = _resolve_vocab(width, width, vocab_size)
    lead = student_hidden.shape[:-1]
    teacher = _sparse_teacher(targets, lead, mass, student_hidden.device)
    rows, labels_v = _valid_rows(labels.to(student_hidden.device), lead, v)
    _check_sparse_ids(teacher.ids[rows], v, distinct=targets.ids_distinct)
    plan = _Plan(spec, rows, labels_v, v, _normalizer(num_valid_tokens, labels_v.numel()))
    total, kd, ce = _FusedLinearDistillation.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher.rows,
        _sparse_chunk_loss_and_grad,
        plan,
    )
    return LossOutput(total=total, kd=kd, ce=ce, n_tokens=plan.n_rows)


# --------------------------------------------------------------------------- plain cross-entropy


def _ce_chunk_loss_and_grad(
    student: Tensor, _teacher: None, targets: Tensor, plan: _Plan, *, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """CE sum of one chunk and its gradient ``(softmax - onehot) / normalizer``; no KD term."""
    s = student.to(_compute_dtype(student))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    ce_sum = (lse.squeeze(-1) - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    kd_sum = torch.zeros((), dtype=s.dtype, device=s.device)
    if not with_grad:
        return kd_sum, ce_sum, None
    grad = (s - lse).exp_().mul_(plan.ce_coef)
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, targets] -= plan.ce_coef
    return kd_sum, ce_sum, grad


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    num_valid_tokens: int | Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
) -> LossOutput:
    """Hard-label cross-entropy through the lm_head, chunk by chunk (no teacher).

    What ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=IGNORE_INDEX,
    reduction="sum") / num_valid_tokens`` computes, without the ``[..., V]`` logits: the
    CE-only baseline and the built-in teacher's training use it under the fused strategy.
    ``total`` and ``ce`` are that value; ``kd`` is 0.
    """
    _check_linear(hidden, weight, bias, "model")
    width = weight.shape[0]
    v = _resolve_vocab(width, width, vocab_size)
    lead = hidden.shape[:-1]
    rows, targets = _valid_rows(labels.to(hidden.device), lead, v)
    spec = LossSpec(ce_weight=1.0, chunk_tokens=chunk_tokens)
    plan = _Plan(spec, rows, targets, v, _normalizer(num_valid_tokens, targets.numel()))
    total, kd, ce = _FusedLinearDistillation.apply(
        hidden, weight, bias, lambda rows: None, _ce_chunk_loss_and_grad, plan
    )
    return LossOutput(total=total, kd=kd, ce=ce, n_tokens=plan.n_rows)
