"""Cross-tokenizer distillation losses: ``loss.cross_tokenizer = aligned | uld | hybrid``.

The student trains on blocks of its own tokens; the teacher reads each block's text in its
own tokens (``data._alignment.cross_tokenize_blocks``, precomputed once per block and looked
up by ``MicroBatch.index``). KD is scored only at **aligned pairs**: a student position
whose next token starts at a byte where both tokenizations cut the text (a group's first
token), with the teacher position that predicts from the same byte. Notation per pair:
``q`` the student's next-token distribution, ``p`` the teacher's, both
``softmax(logits / tau)``; the group has ``m`` student tokens ``s_1..s_m`` and ``n``
teacher tokens ``t_1..t_n``.

``aligned``
    The teacher's distribution is carried onto the student's vocabulary, then compared
    with ``q`` by ``loss.kind``'s divergence:

    1. **Byte-prefix projection.** Each teacher token ``t`` goes to ``a(t)``, the longest
       student token whose bytes begin ``t``'s bytes (``_token_bytes.prefix_assignment``;
       an exact twin when the student has ``t``'s bytes; EOS to EOS, same-named specials
       to each other): ``p~(v) = sum_{t: a(t) = v} p(t)``. It is a distribution over the
       student's vocabulary (mass of teacher tokens with no student prefix is dropped and
       the rest renormalised).
    2. **The actual continuation, merged.** The teacher's mass for the group's actual text
       is moved from ``a(t_1)`` to the student's actual first token ``s_1``: for a
       one-token student group (``m = 1``) that mass is the product of the teacher's
       conditionals along the actual continuation, ``p(t_1) p(t_2 | t_1) ... p(t_n |
       t_<n)`` (the teacher's probability of spelling ``s_1``'s bytes as it does); for a
       one-token teacher group (``n = 1``, the student splits it finer) it is ``p(t_1)``;
       for ``m, n > 1`` nothing is moved. The moved mass is capped at what ``a(t_1)``
       holds, so ``p~`` stays a distribution.
    3. ``D(p~, q)`` over the student's whole vocabulary.

    With identical tokenizers ``a`` is the identity and step 2 moves nothing: the ordinary
    loss exactly.
``uld``
    Universal Logit Distillation (Boizard et al. 2024): both probability vectors sorted in
    decreasing order, the shorter padded with zeros to ``max(V_teacher, V_student)``,
    ``sum_i |p_sorted_i - q_sorted_i|`` (the closed-form optimal-transport distance for a
    uniform cost); no vocabulary mapping, no merging (``p`` at the first position).
``hybrid``
    Per pair, with ``c = sum_{t has an exact student twin} p(t)`` the teacher's mass on
    tokens the student shares byte for byte: ``c * aligned + (1 - c) * uld``. Where the
    teacher's mass sits on shared tokens, the projection is exact and ``aligned`` is used;
    where it sits on tokens the student lacks (the projection then approximates), ULD
    carries that share.

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
    "Continuation",
    "CrossTokenizerLoss",
    "CrossTokenizerSetting",
    "VocabMap",
    "aligned_divergence",
    "next_token_logp",
    "project_teacher",
    "span_logprob",
    "uld_distance",
]

CrossTokenizerSetting = Literal["uld", "aligned", "hybrid"]


@dataclass(frozen=True)
class VocabMap:
    """Teacher vocabulary -> student vocabulary: ``assign[t]`` = the student token teacher
    token ``t`` is projected on (-1: none), ``twin[t]`` = it has the very same bytes."""

    assign: Tensor
    twin: Tensor
    student_vocab: int

    @classmethod
    def of(cls, assign: list[int], twin: list[bool], *, student_vocab: int) -> VocabMap:
        a = torch.tensor(assign, dtype=torch.long)
        if (a >= student_vocab).any():
            raise ValueError("assigned student ids must lie inside the student's vocabulary")
        return cls(a, torch.tensor(twin, dtype=torch.bool) & (a >= 0), student_vocab)

    @classmethod
    def identity(cls, vocab: int) -> VocabMap:
        """Every token on itself (two identical tokenizers)."""
        return cls.of(list(range(vocab)), [True] * vocab, student_vocab=vocab)

    def to(self, device: torch.device) -> VocabMap:
        return VocabMap(self.assign.to(device), self.twin.to(device), self.student_vocab)

    @property
    def twins(self) -> int:
        return int(self.twin.sum())


@dataclass(frozen=True)
class Continuation:
    """Per aligned pair: the log of the teacher mass moved to the student's actual first
    token (``-inf``: nothing moves), that token, and the group's first teacher token."""

    moved_logp: Tensor
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


def project_teacher(
    teacher_logp: Tensor, vocab: VocabMap, cont: Continuation | None = None
) -> Tensor:
    """The teacher's probabilities ``[P, V_t]`` (as log-probabilities) carried onto the
    student's vocabulary ``[P, V_s]`` (steps 1 and 2 of the module docstring), not yet
    renormalised."""
    p = teacher_logp.exp()
    rows = p.shape[0]
    dump = vocab.student_vocab  # one extra column for teacher tokens with no student prefix
    index = torch.where(vocab.assign >= 0, vocab.assign, dump).expand(rows, -1)
    proj = p.new_zeros(rows, dump + 1).scatter_add_(1, index, p)[:, :dump]
    if cont is None:
        return proj
    source = vocab.assign[cont.teacher_token]
    moves = torch.isfinite(cont.moved_logp) & (source >= 0) & (source != cont.student_token)
    r = torch.nonzero(moves).flatten()
    if r.numel():
        src, dst = source[r], cont.student_token[r]
        amount = torch.minimum(cont.moved_logp[r].exp(), proj[r, src])
        proj = proj.index_put((r, src), -amount, accumulate=True)
        proj = proj.index_put((r, dst), amount, accumulate=True)
    return proj


def aligned_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    vocab: VocabMap,
    spec: LossSpec,
    cont: Continuation | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``D(p~, q)`` (module docstring) and the teacher's exact-twin mass ``c``.

    ``student_logp`` ``[P, V_s]`` and ``teacher_logp`` ``[P, V_t]`` are tempered
    log-probabilities at the pairs' first positions.
    """
    proj = project_teacher(teacher_logp, vocab, cont).clamp_min(0.0)
    coverage = (teacher_logp.exp() * vocab.twin).sum(-1)
    # A row whose teacher mass all fell on tokens with no student prefix has no target:
    # it scores 0 (a uniform stand-in keeps its arithmetic finite).
    empty = proj.sum(-1) <= 0
    proj = torch.where(empty.unsqueeze(-1), 1.0, proj)
    plain = dataclasses.replace(spec, temperature=1.0)  # both sides are tempered already
    # log(0) = -inf marks tokens the teacher gives nothing; token_divergence renormalises
    value = token_divergence(student_logp, proj.log(), plain)
    return torch.where(empty, 0.0, value), coverage


def next_token_logp(logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """``[B, T]``: at each position, the tempered log-probability of the token that follows
    it in ``ids`` (0 at the last position)."""
    nxt = F.pad(ids[:, 1:], (0, 1), value=0).clamp(0, logits.shape[-1] - 1)
    z = logits / tau
    picked = z.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return F.pad(picked[:, :-1], (0, 1))


def span_logprob(next_logp: Tensor, row: Tensor, pos: Tensor, n: Tensor) -> Tensor:
    """``sum_{k<n} next_logp[row, pos + k]`` per pair (the log-probability of ``n`` actual
    tokens in a row from position ``pos``); ``-inf`` where ``n == 0``."""
    cum = F.pad(next_logp.cumsum(-1), (1, 0))
    end = (pos + n).clamp(max=cum.shape[-1] - 1)
    total = cum[row, end] - cum[row, pos]
    return torch.where(n > 0, total, -torch.inf)


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
        vocab: VocabMap,
        *,
        teacher_vocab: int,
    ) -> None:
        if setting not in ("uld", "aligned", "hybrid"):
            raise ValueError(f"unknown cross-tokenizer setting {setting!r}")
        if vocab.assign.numel() != teacher_vocab:
            raise ValueError(
                f"the vocabulary map covers {vocab.assign.numel()} teacher tokens, the teacher "
                f"has {teacher_vocab}"
            )
        self.setting = setting
        self.view = view
        self.vocab = vocab
        self.teacher_vocab = teacher_vocab
        self._on: dict[torch.device, VocabMap] = {}

    def _vocab_on(self, device: torch.device) -> VocabMap:
        if device not in self._on:
            self._on[device] = self.vocab.to(device)
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
        with torch.no_grad():
            t_next = next_token_logp(t_logits, t_ids, tau)
            # teacher tokens whose mass moves to s_1: all n of a one-token student group,
            # t_1 alone of a one-token teacher group, none otherwise
            n_moved = torch.where(s_len == 1, t_len, torch.where(t_len == 1, 1, 0))
            moved = span_logprob(t_next, row, t_pos, n_moved)
        vocab = self._vocab_on(device)
        step = chunk_rows(spec.chunk_tokens, max(flat.shape[-1], t_logits.shape[-1]))
        total = flat.new_zeros(())
        for lo in range(0, row.numel(), step):
            sl = slice(lo, lo + step)
            r = row[sl]
            s_logp = torch.log_softmax(flat[r, s_pos[sl]] / tau, dim=-1)
            with torch.no_grad():
                t_logp = torch.log_softmax(t_logits[r, t_pos[sl]] / tau, dim=-1)
            part = Continuation(moved[sl], s_tok[sl], t_tok[sl])
            total = total + self._rows(s_logp, t_logp, vocab, spec, part).sum()
        return total

    def _rows(
        self,
        s_logp: Tensor,
        t_logp: Tensor,
        vocab: VocabMap,
        spec: LossSpec,
        cont: Continuation,
    ) -> Tensor:
        """Per-pair KD of the configured setting (module docstring)."""
        if self.setting == "uld":
            return uld_distance(s_logp, t_logp)
        aligned, coverage = aligned_divergence(s_logp, t_logp, vocab, spec, cont)
        if self.setting == "aligned":
            return aligned
        return coverage * aligned + (1.0 - coverage) * uld_distance(s_logp, t_logp)
