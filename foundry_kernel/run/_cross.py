"""The job's side of cross-tokenizer distillation (``loss.cross_tokenizer`` != off), and
bits per byte, the held-out figure every run reports because it compares across
tokenizers.

With different tokenizers the job builds its data with the **student's** tokenizer (the
labels are student tokens), then precomputes once, for the training and the held-out
blocks, the teacher's own tokenization of each block's text and the aligned positions
(``data._alignment.cross_tokenize_blocks``). The distillation phase trains with
``training._cross_tokenizer.CrossTokenizerLoss``; the teacher's held-out loss is measured
on its tokenization of the same held-out blocks. A per-token loss is then per token of
*different* tokenizers: the summary's comparable figure is ``val_bpb`` (nats summed over
the scored tokens / (ln 2 x their bytes)), and ``gap_closed`` is computed on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from foundry_kernel._models import LoadedModel, own_vocab_size
from foundry_kernel._token_bytes import prefix_assignment, token_byte_table
from foundry_kernel.data._alignment import CrossTokenized, cross_tokenize_blocks
from foundry_kernel.data._blocks import IGNORE_INDEX, DataBundle, TokenBlocks
from foundry_kernel.training._cross_tokenizer import CrossTokenizerLoss, VocabMap

__all__ = ["CrossSetup", "bits_per_byte", "prepare_cross_tokenizer", "scored_bytes"]

#: The teacher's sequence per block is capped at this many times the student's block
#: length (and at its context): a teacher with a much smaller vocabulary needs more tokens
#: for the same bytes; what does not fit is not aligned (counted in the report).
TEACHER_LEN_FACTOR = 4


@dataclass(frozen=True)
class CrossSetup:
    """What the job needs for a cross-tokenizer run, built once before training."""

    train: CrossTokenized
    val: CrossTokenized
    strategy: CrossTokenizerLoss
    teacher_vocab: int
    student_vocab: int
    report: dict[str, Any]

    def teacher_val_blocks(self) -> TokenBlocks:
        """The held-out blocks in the teacher's tokens (every real token is a label)."""
        ids, mask = self.val.teacher_ids, self.val.teacher_mask
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        return TokenBlocks(ids.clone(), mask.clone(), labels)


def prepare_cross_tokenizer(
    setting: str,
    teacher: LoadedModel,
    student: LoadedModel,
    data: DataBundle,
    *,
    check: Any,
) -> CrossSetup:
    """Both vocabularies, the shared tokens, the teacher's view of every block."""
    t_vocab = own_vocab_size(teacher, "teacher")
    s_vocab = own_vocab_size(student, "student")
    seq_len = data.train.seq_len
    context = getattr(teacher.model.config, "max_position_embeddings", None) or (
        TEACHER_LEN_FACTOR * seq_len
    )
    max_len = min(TEACHER_LEN_FACTOR * seq_len, int(context))
    train = cross_tokenize_blocks(
        data.train, student.tokenizer, teacher.tokenizer, max_len=max_len, check=check
    )
    val = cross_tokenize_blocks(
        data.val, student.tokenizer, teacher.tokenizer, max_len=max_len, check=check
    )
    assign, twin = prefix_assignment(teacher.tokenizer, student.tokenizer)
    assign = [a if a < s_vocab else -1 for a in assign[:t_vocab]]
    assign += [-1] * (t_vocab - len(assign))
    vocab = VocabMap.of(
        assign, twin[:t_vocab] + [False] * (t_vocab - len(twin)), student_vocab=s_vocab
    )
    strategy = CrossTokenizerLoss(
        setting,  # type: ignore[arg-type]  # the config's Literal, 'off' excluded by the caller
        train,
        vocab,
        teacher_vocab=t_vocab,
    )
    report = {
        "setting": setting,
        "teacher_vocab": t_vocab,
        "student_vocab": s_vocab,
        "teacher_tokens_with_student_twin": vocab.twins,
        "teacher_tokens_projected": int((vocab.assign >= 0).sum()),
        "train": train.report,
        "val": val.report,
        "comparable_metric": "val_bpb",
    }
    return CrossSetup(train, val, strategy, t_vocab, s_vocab, report)


def scored_bytes(blocks: TokenBlocks, table: Sequence[bytes | None], total: int) -> int:
    """Bytes of the tokens a held-out evaluation scores in the first ``total`` blocks (the
    valid labels after the shift); special tokens count 0 bytes."""
    if total <= 0:
        return 0
    lengths = torch.tensor([len(p) if p else 0 for p in table], dtype=torch.long)
    labels = blocks.labels[:total, 1:]
    valid = labels != IGNORE_INDEX
    ids = labels.clamp(0, len(table) - 1)
    return int(torch.where(valid, lengths[ids], 0).sum())


def bits_per_byte(loss: float, tokens: float, n_bytes: int) -> float | None:
    """Mean loss (nats per token) over ``tokens`` tokens as bits per byte of their text."""
    if n_bytes <= 0 or not math.isfinite(loss):
        return None
    return loss * tokens / (math.log(2) * n_bytes)


def byte_table(model: LoadedModel) -> list[bytes | None]:
    """The model's token byte table (``_token_bytes.token_byte_table``)."""
    return token_byte_table(model.tokenizer)
