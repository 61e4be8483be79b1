"""The BPE recipe, and a script that trains it in a child process.

Why a child process: ``tokenizers``' trainer is one Rust call. It pulls the texts from a
Python iterator (where a run's cancel can land, by raising), but once they are counted
it computes every merge without returning to Python: ~2 s for 11 MB of text on a busy
2-core machine, growing with the corpus. A thread cannot be stopped inside that call, so
for a large corpus Foundry runs the trainer here, in a process it can kill: a cancel then
lands within a poll interval whatever the corpus size, and nothing keeps computing after
the run has stopped.

This file imports only the standard library and ``tokenizers``, so the child starts in a
fraction of a second and does not depend on how Foundry itself was put on ``sys.path``
(it is run by path: ``python _bpe_child.py OUT VOCAB_SIZE SPECIAL...``). The parent writes
one JSON string per line on stdin, closes it, and reads the trained tokenizer's JSON from
``OUT`` once the child exited with status 0 (written to a temporary name, then renamed,
so a killed child never leaves a half-written file under that name).

Run by path, the child has this folder first on its ``sys.path``; nothing here shadows
what it imports (the standard library's ``json``/``os``/``sys`` and ``tokenizers``).

The in-process path (small corpora, library callers) uses the very same
:func:`new_backend` and :func:`new_trainer`, so both give identical tokenizers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def new_backend() -> Tokenizer:
    """An untrained byte-level BPE (GPT-2 style pre-tokenization and decoding)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def new_trainer(vocab_size: int, special_tokens: Sequence[str]) -> trainers.BpeTrainer:
    """The trainer Foundry uses: every byte in the alphabet, merges seen at least twice."""
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def _stdin_texts() -> Iterator[str]:
    for line in sys.stdin.buffer:
        text = json.loads(line)
        if not isinstance(text, str):
            raise TypeError(f"expected one JSON string per line, got {type(text).__name__}")
        yield text


def main(argv: Sequence[str]) -> int:
    """``OUT VOCAB_SIZE SPECIAL...``: train on stdin, write the tokenizer JSON to OUT."""
    if len(argv) < 2:
        print("usage: _bpe_child.py OUT VOCAB_SIZE [SPECIAL_TOKEN ...]", file=sys.stderr)
        return 2
    out, vocab_size, specials = argv[0], int(argv[1]), argv[2:]
    backend = new_backend()
    backend.train_from_iterator(_stdin_texts(), trainer=new_trainer(vocab_size, specials))
    partial = f"{out}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(backend.to_str())
    os.replace(partial, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
