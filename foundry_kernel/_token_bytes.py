"""Each token's exact byte string, and the tokens two vocabularies share.

Cross-tokenizer distillation compares a teacher and a student whose tokenizers differ. What
two tokens of different vocabularies can have in common is their *bytes*: a teacher token
and a student token that stand for the same byte string predict the same continuation.
This module reads those byte strings from the tokenizer itself, in the three encodings
fast tokenizers use:

* byte-level BPE (GPT-2, Llama-3, Qwen, Foundry's own): every token string is written in
  the 256-symbol byte alphabet (``Ġ`` = space); the inverse of that alphabet gives the
  bytes exactly, also for tokens that hold part of a multi-byte character;
* SentencePiece-style (Llama-2, Gemma, Mistral): ``▁`` is a space and ``<0xNN>`` byte
  fallback tokens are one byte each;
* anything else: the token decoded on its own, when that gives valid text.

Special tokens (BOS, EOS, PAD, ...) have no bytes (``None``): they mark structure, not text.
It sits in the base layer because both the data layer (the alignment) and the pairing
check (``_models.check_tokenizers``) use it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

__all__ = [
    "byte_alphabet",
    "prefix_assignment",
    "shared_token_pairs",
    "teacher_coverage",
    "token_byte_table",
]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


@functools.cache
def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: symbol -> byte value.

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 bytes are written as the characters U+0100, U+0101, ... in byte order, so
    every symbol is printable and none is whitespace (that is how ``Ġ`` U+0120 comes to
    mean the space, byte 32).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _style(tokenizer: Any) -> str:
    """``byte_level``, ``sentencepiece`` or ``decode``: how token strings encode bytes,
    read from the fast tokenizer's own decoder (and pre-tokenizer) definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode"
    spec = json.loads(backend.to_str())
    parts = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in parts:
        return "byte_level"
    if '"Metaspace"' in parts or _METASPACE in parts or '"ByteFallback"' in parts:
        return "sentencepiece"
    return "decode"


def _byte_level(piece: str) -> bytes | None:
    alphabet = byte_alphabet()
    try:
        return bytes(alphabet[ch] for ch in piece)
    except KeyError:  # a symbol outside the alphabet: an added token written as text
        return piece.encode("utf-8")


def _sentencepiece(piece: str) -> bytes:
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback is not None:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace(_METASPACE, " ").encode("utf-8")


def token_byte_table(tokenizer: Any) -> list[bytes | None]:
    """``table[id]`` = the bytes token ``id`` stands for; ``None`` for special tokens and
    for tokens whose bytes cannot be known (a lone decode that is not valid text)."""
    style = _style(tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", ()) or ())
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    table: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if token_id in specials or piece is None:
            table.append(None)
        elif style == "byte_level":
            table.append(_byte_level(piece))
        elif style == "sentencepiece":
            table.append(_sentencepiece(piece))
        else:
            text = tokenizer.decode([token_id])
            table.append(None if "\ufffd" in text else text.encode("utf-8"))
    return table


def shared_token_pairs(teacher_tok: Any, student_tok: Any) -> tuple[list[int], list[int]]:
    """``(teacher_ids, student_ids)``: the pairs of tokens with equal byte strings (one
    teacher token per byte string: the lowest id), plus the two EOS tokens as a pair (both
    mean "the document ends here") and special tokens of the same name. Sorted by student
    id."""
    by_bytes: dict[bytes, int] = {}
    for token_id, piece in enumerate(token_byte_table(teacher_tok)):
        if piece:
            by_bytes.setdefault(piece, token_id)
    pairs: dict[int, int] = {}
    for token_id, piece in enumerate(token_byte_table(student_tok)):
        if piece and piece in by_bytes:
            pairs[token_id] = by_bytes[piece]
    t_eos, s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
    if t_eos is not None and s_eos is not None:
        pairs[int(s_eos)] = int(t_eos)
    # Special tokens written the same (``<|endoftext|>``, ``<pad>``) are the same symbol;
    # with this, two identical tokenizers share their whole vocabulary.
    t_special = _specials_by_name(teacher_tok)
    for name, s_id in _specials_by_name(student_tok).items():
        if name in t_special and s_id not in pairs:
            pairs[s_id] = t_special[name]
    students = sorted(pairs)
    return [pairs[s] for s in students], students


def prefix_assignment(teacher_tok: Any, student_tok: Any) -> tuple[list[int], list[bool]]:
    """For every teacher token: the student token that its bytes begin with, the longest
    such (``-1``: none), and whether that is an exact twin (the same bytes).

    Specials: EOS goes to EOS, a special goes to the student's special of the same name.
    Built on the host once per run (a dictionary probe per prefix length).
    """
    s_table = token_byte_table(student_tok)
    by_bytes: dict[bytes, int] = {}
    for token_id, piece in enumerate(s_table):
        if piece:
            by_bytes.setdefault(piece, token_id)
    longest = max((len(p) for p in by_bytes), default=0)
    assign: list[int] = []
    exact: list[bool] = []
    for piece in token_byte_table(teacher_tok):
        found, twin = -1, False
        if piece:
            for size in range(min(len(piece), longest), 0, -1):
                hit = by_bytes.get(piece[:size])
                if hit is not None:
                    found, twin = hit, size == len(piece)
                    break
        assign.append(found)
        exact.append(twin)
    t_ids, s_ids = shared_token_pairs(teacher_tok, student_tok)
    for t, s_id in zip(t_ids, s_ids, strict=True):  # specials (and twins, again)
        if t < len(assign):
            assign[t], exact[t] = s_id, True
    return assign, exact


def _specials_by_name(tokenizer: Any) -> dict[str, int]:
    ids = sorted(set(getattr(tokenizer, "all_special_ids", ()) or ()))
    names = tokenizer.convert_ids_to_tokens(ids)
    return {name: i for i, name in zip(ids, names, strict=True) if name is not None}


def teacher_coverage(teacher_tok: Any, student_tok: Any) -> float:
    """Share of the teacher's (non-special) tokens whose exact bytes are a student token."""
    teacher = [p for p in token_byte_table(teacher_tok) if p]
    student = {p for p in token_byte_table(student_tok) if p}
    if not teacher:
        return 0.0
    return sum(1 for p in teacher if p in student) / len(teacher)
