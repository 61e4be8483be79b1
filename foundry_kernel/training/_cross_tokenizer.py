"""Cross-tokenizer distillation losses: ``loss.cross_tokenizer = aligned | uld | hybrid``.

The student trains on blocks of its own tokens; the teacher reads each block's text in its
own tokens (``data._alignment.cross_tokenize_blocks``, precomputed once per block and looked
up by ``MicroBatch.index``). KD is scored only at **aligned pairs**: a student position
whose next token starts at a byte where both tokenizations cut the text, with the teacher
position that predicts from the same byte. Notation per pair: ``q`` the student's
next-token distribution, ``p`` the teacher's, both ``softmax(logits / tau)``.

``aligned``
    Over the **shared vocabulary** ``S`` (pairs of teacher and student tokens with the same
    bytes, plus the two EOS tokens and same-named special tokens;
    ``_token_bytes.shared_token_pairs``) and one more outcome, the group's **actual
    continuation** ``X`` (its bytes): ``log p(X) = sum_k log p(t_k | t_<k, context)`` over
    the group's ``n`` teacher tokens and ``log q(X) = sum_k log q(s_k | s_<k, context)``
    over its ``m`` student tokens, each conditional at temperature ``tau`` - the teacher's
    probabilities merged over the span (and the student's, where the student splits it
    finer). Where ``X`` is itself a shared token (``m = 1``: the student token; ``n = 1``:
    the teacher token's twin) its entry is replaced by these values; otherwise ``X`` is an
    extra entry. Both sides' entries are then renormalised over ``S + X`` (``p_E``,
    ``q_E``) and ``loss.kind``'s divergence ``D(p_E, q_E)`` is taken. For a 1:1 group
    (``m = n = 1``) this is exactly ``D`` of the two distributions restricted to ``S``;
    with identical tokenizers ``S`` is the whole vocabulary and it is the ordinary loss.
    The first-position entries of ``S`` and ``X`` are treated as distinct outcomes (for
    ``m > 1`` the student's first token also begins ``X``: an approximation, documented in
    docs/cross-tokenizer.md).
``uld``
    Universal Logit Distillation (Boizard et al. 2024): both probability vectors sorted in
    decreasing order, the shorter padded with zeros to ``max(V_teacher, V_student)``,
    ``sum_i |p_sorted_i - q_sorted_i|`` (the closed-form optimal-transport distance for a
    uniform cost); no vocabulary mapping, and no merging (``p`` at the first position).
``hybrid``
    Per pair, with ``c = min(1, sum_{v in S + X} p(v))`` the teacher's mass on the entries
    the aligned comparison sees (before renormalising):
    ``c * aligned + (1 - c) * uld``. Where the shared tokens hold (almost) all of the
    teacher's mass the restriction loses nothing and the aligned divergence is used;
    where they hold little of it, ULD carries the part the mapping cannot see.

Reduction, as for the other strategies: ``kd = kd_scale * sum_pairs D / num_valid`` (the
global valid-label count: unaligned positions add 0 to KD but count in the divisor), ``ce``
= hard-label cross-entropy over every valid label / ``num_valid``, ``total = (1 - w) kd +
w ce`` with ``w = loss.ce_weight``. Plain autograd (the loss runs inside the DDP wrapper's
forward like any strategy), so it is exact under data parallelism and accumulation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from foundry_kernel.data._alignment import CrossTokenized
from foundry_kernel.teachers._interface import HFTeacher
from foundry_kernel.training._losses import LossOutput, LossSpec, chunk_rows, token_divergence
from foundry_kernel.training._precision import autocast
from foundry_kernel.training._strategy import LossSetup, MicroBatch

__all__ = [
    "CrossTokenizerLoss",
    "CrossTokenizerSetting",
    "SharedVocab",
    "aligned_divergence",
    "Continuation",
    "next_token_logp",
    "span_logprob",
    "uld_distance",
]

CrossTokenizerSetting = Literal["uld", "aligned", "hybrid"]


@dataclass(frozen=True)
class SharedVocab:
    """Teacher ids ``teacher`` and student ids ``student`` of the shared tokens (same
    order); ``student_column[id]`` / ``teacher_column[id]`` = a token's place in them, or
    -1."""

    teacher: Tensor
    student: Tensor
    student_column: Tensor
    teacher_column: Tensor

    @classmethod
    def of(
        cls,
        teacher_ids: list[int],
        student_ids: list[int],
        *,
        student_vocab: int,
        teacher_vocab: int,
    ) -> SharedVocab:
        t = torch.tensor(teacher_ids, dtype=torch.long)
        s = torch.tensor(student_ids, dtype=torch.long)
        if (t >= teacher_vocab).any() or (s >= student_vocab).any():
            raise ValueError("shared token ids must lie inside both vocabularies")
        places = torch.arange(len(s))
        s_col = torch.full((student_vocab,), -1, dtype=torch.long)
        s_col[s] = places
        t_col = torch.full((teacher_vocab,), -1, dtype=torch.long)
        t_col[t.flip(0)] = places.flip(0)  # a teacher id paired twice: its first place
        return cls(t, s, s_col, t_col)

    @classmethod
    def identity(cls, vocab: int) -> SharedVocab:
        """Every token shared with itself (two identical tokenizers)."""
        ids = list(range(vocab))
        return cls.of(ids, ids, student_vocab=vocab, teacher_vocab=vocab)

    def to(self, device: torch.device) -> SharedVocab:
        return SharedVocab(
            self.teacher.to(device),
            self.student.to(device),
            self.student_column.to(device),
            self.teacher_column.to(device),
        )

    def __len__(self) -> int:
        return int(self.teacher.numel())


@dataclass(frozen=True)
class Continuation:
    """Per aligned pair, the group's actual continuation ``X``: its log-probability under
    the student (differentiable) and the teacher, the group's token counts ``m``, ``n``
    (0, 0: no ``X`` entry) and its first student and teacher tokens."""

    student_logp: Tensor
    teacher_logp: Tensor
    student_len: Tensor
    teacher_len: Tensor
    student_token: Tensor
    teacher_token: Tensor


# --------------------------------------------------------------------------- the math


def uld_distance(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-row ULD: ``sum_i |sort(p)_i - sort(q)_i|`` (decreasing order), the shorter
    vector padded with zeros. Inputs are log-probabilities ``[P, V_student]``,
    ``[P, V_teacher]``."""
    q = student_logp.exp().sort(dim=-1, descending=True).values
    p = teacher_logp.exp().sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (p - q).abs().sum(-1)


def aligned_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    shared: SharedVocab,
    spec: LossSpec,
    cont: Continuation | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``D(p_E, q_E)`` over the shared vocabulary and the continuation entry (module
    docstring), and the teacher's mass ``c`` on those entries (clamped to 1).

    ``student_logp`` ``[P, V_s]`` and ``teacher_logp`` ``[P, V_t]`` are tempered
    log-probabilities at the pairs' first positions.
    """
    t_cols = teacher_logp[:, shared.teacher]  # [P, K]
    s_cols = student_logp[:, shared.student]
    neg = torch.full_like(t_cols[:, :1], -torch.inf)
    extra_t, extra_s = neg, neg.expand(s_cols.shape[0], 1)
    if cont is not None:
        has = (cont.student_len > 0) & (cont.teacher_len > 0)
        s_twin = shared.student_column[cont.student_token]
        t_twin = shared.teacher_column[cont.teacher_token]
        col = torch.where(
            cont.student_len == 1, s_twin, torch.where(cont.teacher_len == 1, t_twin, -1)
        )
        twin = has & (col >= 0)
        rows = torch.nonzero(twin).flatten()
        t_cols = t_cols.index_put((rows, col[rows]), cont.teacher_logp[rows])
        s_cols = s_cols.index_put((rows, col[rows]), cont.student_logp[rows])
        alone = (has & (col < 0)).unsqueeze(-1)
        extra_t = torch.where(alone, cont.teacher_logp.unsqueeze(-1), -torch.inf)
        extra_s = torch.where(alone, cont.student_logp.unsqueeze(-1), -torch.inf)
    teacher = torch.cat([t_cols, extra_t], dim=-1)
    student = torch.cat([s_cols, extra_s], dim=-1)
    coverage = torch.logsumexp(teacher, dim=-1).exp().clamp(max=1.0)
    plain = dataclasses.replace(spec, temperature=1.0)  # both sides are tempered already
    return token_divergence(student, teacher, plain), coverage


def next_token_logp(logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """``[B, T]``: at each position, the tempered log-probability of the token that follows
    it in ``ids`` (0 at the last position). Differentiable in ``logits``."""
    nxt = F.pad(ids[:, 1:], (0, 1), value=0).clamp(0, logits.shape[-1] - 1)
    z = logits / tau
    picked = z.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return F.pad(picked[:, :-1], (0, 1))


def span_logprob(next_logp: Tensor, row: Tensor, pos: Tensor, n: Tensor) -> Tensor:
    """``sum_{k<n} next_logp[row, pos + k]`` per pair (the log-probability of ``n`` actual
    tokens in a row from position ``pos``); 0 where ``n == 0``."""
    cum = F.pad(next_logp.cumsum(-1), (1, 0))
    end = (pos + n).clamp(max=cum.shape[-1] - 1)
    return cum[row, end] - cum[row, pos]


# --------------------------------------------------------------------------- the strategy


class CrossTokenizerLoss:
    """A :class:`~foundry_kernel.training._strategy.LossStrategy` for teacher and student
    with different tokenizers (module docstring): the student's logits on its block, the
    teacher's on its own tokenization of the same block (``view``, by block index)."""

    name = "cross_tokenizer"

    def __init__(
        self,
        setting: CrossTokenizerSetting,
        view: CrossTokenized,
        shared: SharedVocab,
        *,
        teacher_vocab: int,
    ) -> None:
        if setting not in ("uld", "aligned", "hybrid"):
            raise ValueError(f"unknown cross-tokenizer setting {setting!r}")
        self.setting = setting
        self.view = view
        self.shared = shared
        self.teacher_vocab = teacher_vocab
        self._on: dict[torch.device, SharedVocab] = {}

    def _shared_on(self, device: torch.device) -> SharedVocab:
        if device not in self._on:
            self._on[device] = self.shared.to(device)
        return self._on[device]

    def __call__(self, setup: LossSetup, batch: MicroBatch) -> LossOutput:
        device = batch.input_ids.device
        with autocast(device, setup.amp_dtype):
            logits = setup.model(input_ids=batch.input_ids, attention_mask=batch.model_mask).logits
        flat = logits[..., : setup.vocab_size].float()
        ce = F.cross_entropy(
            flat.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum"
        )
        ce = ce / batch.num_valid
        n_tokens = batch.local_valid
        if n_tokens is None:
            n_tokens = int((batch.labels != -100).sum())
        spec = setup.spec
        if spec is None:  # no teacher: plain cross-entropy
            zero = torch.zeros((), device=device)
            return LossOutput(total=ce, kd=zero, ce=ce.detach(), n_tokens=n_tokens)
        if batch.index is None or batch.on_policy:
            raise ValueError("cross-tokenizer distillation needs training blocks (by index)")
        kd_sum = self._kd_sum(setup, batch, flat, spec)
        kd = kd_sum * spec.kd_scale / batch.num_valid
        total = (1.0 - spec.ce_weight) * kd + spec.ce_weight * ce
        return LossOutput(total=total, kd=kd.detach(), ce=ce.detach(), n_tokens=n_tokens)

    def _teacher_logits(
        self, setup: LossSetup, blocks: list[int], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The teacher's logits on its tokenization of ``blocks`` (no gradient), and those
        token ids."""
        teacher = setup.teacher
        if not isinstance(teacher, HFTeacher):
            raise TypeError(
                "loss.cross_tokenizer needs the in-process teacher (teacher.backend=hf), got "
                f"{type(teacher).__name__}"
            )
        idx = torch.tensor(blocks, dtype=torch.long)
        ids = self.view.teacher_ids[idx].to(device)
        mask = self.view.teacher_mask[idx].to(device)
        with torch.no_grad(), autocast(device, teacher.amp_dtype):
            out = teacher.model(input_ids=ids, attention_mask=mask).logits
        return out[..., : self.teacher_vocab].float(), ids

    def _kd_sum(self, setup: LossSetup, batch: MicroBatch, flat: Tensor, spec: LossSpec) -> Tensor:
        """Sum over this micro-batch's aligned pairs of the per-pair KD term."""
        device = flat.device
        assert batch.index is not None
        blocks = [int(i) for i in batch.index.tolist()]
        row, pairs = (t.to(device) for t in self.view.pairs_of(blocks))
        if row.numel() == 0:
            return flat.sum() * 0.0
        s_pos, t_pos, s_len, t_len, s_tok, t_tok = pairs.unbind(-1)
        tau = spec.temperature
        t_logits, t_ids = self._teacher_logits(setup, blocks, device)
        s_next = next_token_logp(flat, batch.input_ids, tau)
        with torch.no_grad():
            t_next = next_token_logp(t_logits, t_ids, tau)
        cont = Continuation(
            student_logp=span_logprob(s_next, row, s_pos, s_len),
            teacher_logp=span_logprob(t_next, row, t_pos, t_len),
            student_len=s_len,
            teacher_len=t_len,
            student_token=s_tok,
            teacher_token=t_tok,
        )
        shared = self._shared_on(device)
        step = chunk_rows(spec.chunk_tokens, max(flat.shape[-1], t_logits.shape[-1]))
        total = flat.new_zeros(())
        for lo in range(0, row.numel(), step):
            sl = slice(lo, lo + step)
            r = row[sl]
            s_logp = torch.log_softmax(flat[r, s_pos[sl]] / tau, dim=-1)
            with torch.no_grad():
                t_logp = torch.log_softmax(t_logits[r, t_pos[sl]] / tau, dim=-1)
            part = Continuation(*(getattr(cont, f.name)[sl] for f in dataclasses.fields(cont)))
            total = total + self._rows(s_logp, t_logp, shared, spec, part).sum()
        return total

    def _rows(
        self,
        s_logp: Tensor,
        t_logp: Tensor,
        shared: SharedVocab,
        spec: LossSpec,
        cont: Continuation,
    ) -> Tensor:
        """Per-pair KD of the configured setting (module docstring)."""
        if self.setting == "uld":
            return uld_distance(s_logp, t_logp)
        aligned, coverage = aligned_divergence(s_logp, t_logp, shared, spec, cont)
        if self.setting == "aligned":
            return aligned
        return coverage * aligned + (1.0 - coverage) * uld_distance(s_logp, t_logp)
