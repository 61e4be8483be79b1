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

from dataclasses import dataclass

import torch
from torch import Tensor

TAIL_FLOOR = -30.0  # log of the smallest tail mass we keep apart from zero (e^-30 ~ 1e-13)


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
        top = torch.logsumexp(self.logprobs.float(), dim=-1).clamp(max=0.0)
        # log(1 - e^top) computed stably (log1mexp): -expm1 for top near 0, log1p otherwise.
        tail = torch.where(
            top > -0.6931,
            torch.log((-torch.expm1(top)).clamp(min=1e-38)),
            torch.log1p(-torch.exp(top)),
        )
        return tail.clamp(min=TAIL_FLOOR)

    def to(self, device: torch.device) -> SparseTargets:
        return SparseTargets(
            self.ids.to(device),
            self.logprobs.to(device),
            None if self.label_logprobs is None else self.label_logprobs.to(device),
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
        return cls(ids, values, label_lp)


TeacherSignal = Tensor | SparseTargets
"""Full logits [B, T, V], or sparse top-k targets: what a teacher returns for a batch."""
