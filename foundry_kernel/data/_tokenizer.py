"""The byte-level BPE tokenizer Foundry trains for its built-in teacher.

(The check that a teacher and a student tokenizer can be paired is
``foundry_kernel._models.check_tokenizers``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from foundry_kernel.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
#: 256 byte symbols + the special tokens: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


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


__all__ = [
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "train_bpe_tokenizer",
]
