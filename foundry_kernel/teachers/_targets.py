"""What a teacher hands the loss: full logits, or its top-k next-token log-probabilities.

A teacher served by vLLM, or read back from an offline logit cache, cannot give
the full vocabulary distribution at every position; it gives the k most likely
token ids with their log-probabilities (normalised over the whole vocabulary,
at temperature 1). ``SparseTargets`` carries exactly that, aligned with the
student's logits: position t describes the distribution of token t+1.

The probability mass outside the top-k (the *tail*) is not lost: it is
``1 - sum(exp(logprobs))``, kept explicitly so that the sparse losses can
either renormalise over the top-k or treat the tail as a (k+1)-th bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TAIL_FLOOR = -30.0  # log of the smallest tail mass we keep apart from zero (e^-30 ~ 1e-13)
_LN2 = math.log(2.0)
# log(1 - e^x) drops below TAIL_FLOOR once x exceeds this (about -9.4e-14).
_LOG1MEXP_CAP = math.log1p(-math.exp(TAIL_FLOOR))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - e^x)`` for ``x <= 0`` (the mass outside a set whose log-mass is ``x``),
    floored at ``TAIL_FLOOR``, with finite gradients.

    Two branches (``-expm1`` near 0, ``log1p`` further out), each fed only inputs where
    it is finite: ``torch.where`` routes a zero gradient to the unused branch, and
    ``0 * inf`` there would otherwise turn a student's gradient into NaN. Inputs above
    ``_LOG1MEXP_CAP`` (mass within e^-30 of 1, or above 1 by rounding) land on the
    floor, whose gradient is 0.
    """
    x = x.clamp(max=_LOG1MEXP_CAP)
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far).clamp(min=TAIL_FLOOR)


@dataclass(frozen=True)
class SparseTargets:
    """The teacher's top-k next-token log-probabilities for a batch of blocks.

    ``ids`` [B, T, k] (int64) and ``logprobs`` [B, T, k] (float32, sorted
    descending, log p under the full-vocabulary softmax at temperature 1).
    ``label_logprobs`` [B, T], when known, is the teacher's log p of the true
    next token (it may lie outside the top-k): enough for the teacher's
    held-out perplexity without its full logits.
    """

    ids: Tensor
    logprobs: Tensor
    label_logprobs: Tensor | None = None
    # True when the producer has made sure no id repeats within a position (the logit
    # cache checks as it decodes, on its read-ahead thread): the loss then skips its own
    # per-step check, a sort of every position's k ids.
    ids_distinct: bool = False

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 3:
            raise ValueError(
                f"SparseTargets needs ids and logprobs of one [B, T, k] shape, got "
                f"{tuple(self.ids.shape)} and {tuple(self.logprobs.shape)}"
            )

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def tail_logmass(self) -> Tensor:
        """log(1 - sum of the top-k probabilities) [B, T], floored at ``TAIL_FLOOR``."""
        return log1mexp(torch.logsumexp(self.logprobs.float(), dim=-1))

    def to(self, device: torch.device) -> SparseTargets:
        return SparseTargets(
            self.ids.to(device),
            self.logprobs.to(device),
            None if self.label_logprobs is None else self.label_logprobs.to(device),
            self.ids_distinct,
        )

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, labels: Tensor | None = None) -> SparseTargets:
        """Top-k of dense logits [B, T, V] (the in-process backend's sparse view)."""
        logp = logits.float().log_softmax(-1)
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        label_lp = None
        if labels is not None:
            safe = labels.clamp(min=0).unsqueeze(-1)
            label_lp = logp.gather(-1, safe).squeeze(-1)
        return cls(ids, values, label_lp, ids_distinct=True)  # topk never repeats an index


TeacherSignal = Tensor | SparseTargets
"""Full logits [B, T, V], or sparse top-k targets: what a teacher returns for a batch."""
