"""Tokenizers Foundry trains itself, and the check that a teacher and student can be paired.

Distillation compares the teacher's and the student's distributions token by
token, which only means something if both index the same vocabulary. A student
loaded from a separate checkpoint with a different tokenizer would otherwise
train silently against scrambled targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from foundry_kernel.errors import ConfigError, DataError, ModelError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
#: 256 byte symbols + the special tokens: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
#: Text encoded by both tokenizers of a pair: equal vocabularies can still split text
#: differently (other merges or pre-tokenizer), and this catches the common cases.
_PROBE_TEXT = "Hello, world! The list object's append() method: x = [1, 2]\n\tcafé 日本 🙂"
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Byte-level means every string - any script, emoji, stray control bytes -
    encodes and decodes back exactly, with no unknown token. The result is a
    deterministic function of the texts (in order) and ``vocab_size``, so a
    cached teacher and a rebuilt one agree. ``<|endoftext|>`` is bos, eos and
    unk; ``<|pad|>`` pads. No special tokens are added when encoding: packing
    places eos between documents itself.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
            field="teacher.build.vocab_size",
        )
    counted = _CountingIterator(texts)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(counted, trainer=trainer)
    if counted.chars == 0:
        raise DataError("cannot train a tokenizer on an empty corpus (no text was given)")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # The default "clean-up" deletes spaces before punctuation on decode, which
        # would break the exact round trip byte-level BPE is chosen for.
        clean_up_tokenization_spaces=False,
    )


class _CountingIterator:
    """Passes texts through while counting characters, so an empty corpus is caught
    without first materialising a generator into memory."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = iter(texts)
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.chars += len(text)
            yield text


def check_tokenizer_pair(teacher_tok: Any, student_tok: Any) -> None:
    """Raise ``ModelError`` unless both tokenizers map text to the same ids.

    Compares the full vocabularies (added tokens included), the special tokens,
    and the encoding of a probe string; the message names the first differences.
    """
    problems = [
        *_vocab_differences(teacher_tok.get_vocab(), student_tok.get_vocab()),
        *_special_token_differences(teacher_tok, student_tok),
        *_probe_differences(teacher_tok, student_tok),
    ]
    if problems:
        raise ModelError(
            "the student's tokenizer does not match the teacher's, so their token "
            "distributions cannot be compared: "
            + "; ".join(problems)
            + ". Use a student that shares the teacher's tokenizer (e.g. student.init="
            "'fresh' or 'from_teacher')."
        )


def _vocab_differences(teacher: dict[str, int], student: dict[str, int]) -> list[str]:
    if teacher == student:
        return []
    problems = []
    if len(teacher) != len(student):
        problems.append(f"vocabulary sizes differ (teacher {len(teacher)}, student {len(student)})")
    by_id_teacher = {i: tok for tok, i in teacher.items()}
    by_id_student = {i: tok for tok, i in student.items()}
    for token_id in sorted(set(by_id_teacher) | set(by_id_student)):
        a, b = by_id_teacher.get(token_id), by_id_student.get(token_id)
        if a != b:
            problems.append(f"first differing id {token_id}: teacher {a!r}, student {b!r}")
            break
    return problems


def _special_token_differences(teacher_tok: Any, student_tok: Any) -> list[str]:
    problems = []
    for attr in _SPECIAL_ATTRS:
        a, b = getattr(teacher_tok, attr, None), getattr(student_tok, attr, None)
        a_id, b_id = (
            getattr(teacher_tok, f"{attr}_id", None),
            getattr(student_tok, f"{attr}_id", None),
        )
        if (a, a_id) != (b, b_id):
            problems.append(f"{attr} differs (teacher {a!r}={a_id}, student {b!r}={b_id})")
    return problems


def _probe_differences(teacher_tok: Any, student_tok: Any) -> list[str]:
    a = teacher_tok.encode(_PROBE_TEXT, add_special_tokens=False)
    b = student_tok.encode(_PROBE_TEXT, add_special_tokens=False)
    if a == b:
        return []
    first = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return [
        f"they split the same text differently from token {first} "
        f"(teacher {a[first : first + 3]}, student {b[first : first + 3]})"
    ]


__all__ = [
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "check_tokenizer_pair",
    "train_bpe_tokenizer",
]
