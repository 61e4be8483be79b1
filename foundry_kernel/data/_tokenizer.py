"""The byte-level BPE tokenizer Foundry trains for its built-in teacher.

(The check that a teacher and a student tokenizer can be paired is
``foundry_kernel._models.check_tokenizers``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import psutil
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from foundry_kernel._context import RunContext
from foundry_kernel.data import _bpe_child
from foundry_kernel.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
#: 256 byte symbols + the special tokens: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
IN_PROCESS_MAX_CHARS = 1_000_000
"""Up to this many characters a run trains its tokenizer in its own process; above, in a
child process that a cancel kills (see ``_bpe_child``). The trainer's merge step cannot be
interrupted and grows with the corpus: measured on a busy 2-core machine, ~2 s for 11 MB,
~0.2 s at this size, against ~0.3 s to start the child."""
POLL_S = 0.05
"""How often the parent looks at its child trainer (cancel, progress)."""


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, ctx: RunContext | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Byte-level means every string - any script, emoji, stray control bytes -
    encodes and decodes back exactly, with no unknown token. The result is a
    deterministic function of the texts (in order) and ``vocab_size``, so a
    cached teacher and a rebuilt one agree. ``<|endoftext|>`` is bos, eos and
    unk; ``<|pad|>`` pads. No special tokens are added when encoding: packing
    places eos between documents itself.

    With a run's ``ctx`` the training is cancellable: a cancel lands after the text being
    counted, and for a corpus over :data:`IN_PROCESS_MAX_CHARS` characters the trainer
    runs in a child process, killed on cancel, that heartbeats the run while it uses CPU
    (a child that stops making progress is left to the step watchdog). Both ways give
    the same tokenizer.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
            field="teacher.build.vocab_size",
        )
    if ctx is None:
        counted = _CountingIterator(texts)
        backend = _train_here(counted, vocab_size)
        chars = counted.chars
    else:
        corpus = list(texts)
        chars = sum(len(text) for text in corpus)
        if chars == 0:
            backend = None
        elif chars <= IN_PROCESS_MAX_CHARS:
            backend = _train_here(_checked(corpus, ctx), vocab_size)
        else:
            backend = _train_in_child(corpus, vocab_size, ctx)
    if chars == 0 or backend is None:
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


def _train_here(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    backend = _bpe_child.new_backend()
    trainer = _bpe_child.new_trainer(vocab_size, SPECIAL_TOKENS)
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _checked(texts: Sequence[str], ctx: RunContext) -> Iterator[str]:
    """The texts, with a stop point before each: an exception raised here propagates out
    of the Rust trainer unchanged."""
    for text in texts:
        ctx.check()
        yield text


def _train_in_child(corpus: Sequence[str], vocab_size: int, ctx: RunContext) -> Tokenizer:
    """Train in a child process (see ``_bpe_child``): the corpus goes to a file first, so
    the parent never blocks on a pipe to a child that may be stuck or dead."""
    with tempfile.TemporaryDirectory(prefix="foundry-bpe-") as tmp:
        folder = Path(tmp)
        corpus_path, out, err_path = (
            folder / "corpus.jsonl",
            folder / "tokenizer.json",
            folder / "stderr.txt",
        )
        with corpus_path.open("w", encoding="ascii") as handle:
            for text in corpus:
                ctx.check()
                handle.write(json.dumps(text) + "\n")  # ASCII escapes: one line per text
        ctx.check()
        with corpus_path.open("rb") as stdin, err_path.open("wb") as stderr:
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(_bpe_child.__file__)),
                    str(out),
                    str(vocab_size),
                    *SPECIAL_TOKENS,
                ],
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            _wait_for_child(child, ctx)
        finally:
            if child.poll() is None:  # cancelled, timed out or failed as hung: kill it
                child.kill()
            child.wait()
        if child.returncode != 0 or not out.is_file():
            detail = err_path.read_text(encoding="utf-8", errors="replace").strip()[-2000:]
            raise DataError(
                f"training the tokenizer failed in its child process (exit status "
                f"{child.returncode}): {detail or 'no message'}"
            )
        return Tokenizer.from_str(out.read_text(encoding="utf-8"))


def _wait_for_child(child: subprocess.Popen[bytes], ctx: RunContext) -> None:
    """Wait for the child; a stop request raises here (the caller kills the child).

    The run is heartbeaten only while the child uses CPU: a trainer that computes merges
    is progressing, one that is stopped or deadlocked is not, and the step watchdog
    (``limits.step_timeout_s``) must be able to tell them apart.
    """
    try:
        watched: psutil.Process | None = psutil.Process(child.pid)
    except psutil.Error:
        watched = None
    cpu = _cpu_seconds(watched)
    while True:
        try:
            child.wait(POLL_S)
            return
        except subprocess.TimeoutExpired:
            pass
        if ctx.stop_requested:
            ctx.check()  # raises RunCancelled / RunTimeout
        now = _cpu_seconds(watched)
        if now is not None and (cpu is None or now > cpu):
            ctx.heartbeat()
            cpu = now


def _cpu_seconds(process: psutil.Process | None) -> float | None:
    if process is None:
        return None
    try:
        times = process.cpu_times()
    except psutil.Error:  # it exited between two polls
        return None
    return float(times.user + times.system)


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
    "IN_PROCESS_MAX_CHARS",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "train_bpe_tokenizer",
]
