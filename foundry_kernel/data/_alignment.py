"""Aligning two tokenizations of the same text by byte offsets.

Cross-tokenizer distillation (``loss.cross_tokenizer``) trains a student on blocks of its
own tokens while the teacher reads the same text in *its* tokens. To compare their
predictions we need the places where both tokenizations cut the text at the same byte:
a **group** is a run of consecutive student tokens and a run of consecutive teacher tokens
that cover exactly the same bytes, with no common cut strictly inside. Before a group both
models have read the same bytes, so the student position predicting the group's first
student token and the teacher position predicting its first teacher token predict from the
same byte offset.

Method (one pass per side, then one merge walk):

1. **Byte spans.** Each token gets ``[start, end)`` in UTF-8 bytes of the text. When the
   tokenizer's token strings give exact bytes (``_token_bytes``: byte-level BPE,
   SentencePiece byte fallback) and their concatenation is the text, spans are the running
   sum of the token lengths: exact even for tokens that hold part of a multi-byte
   character (whose character offsets overlap). Otherwise the fast tokenizer's character
   offsets are converted to bytes; overlapping tokens (parts of one character) are fused
   into one unit that no cut may split, and bytes no token claims (whitespace some
   tokenizers drop) are given to the following token, the usual leading-space convention
   (``Ġ``, ``▁``), so each side tiles its text.
2. **Zero-width tokens** (BOS, EOS and other specials the tokenizer adds; offsets
   ``(0, 0)``) take no bytes and belong to no group. This is what keeps one side's BOS
   from shifting the other side (the failure of string-buffer alignment, TRL #4393).
3. **Groups.** Walk the two unit lists together: skip units until both sides start at
   the same byte, then extend whichever side ends first until both end at the same byte.

For training, :func:`cross_tokenize_blocks` applies this to every packed student block:
the block's bytes are rebuilt from its tokens, each document piece (between the student's
EOS tokens) is encoded by the teacher's tokenizer with its own special-token convention,
the student's EOS becomes the teacher's EOS, and the aligned positions are precomputed once
(looked up per micro-batch by block index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from foundry_kernel._token_bytes import token_byte_table
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.errors import DataError

__all__ = [
    "PAIR_COLUMNS",
    "CrossTokenized",
    "Group",
    "TokenSpans",
    "align",
    "cross_tokenize_blocks",
    "encode_spans",
    "spans_from_encoding",
    "spans_from_ids",
]

Check = Callable[[], None]
PAIR_COLUMNS = (
    "student_pos",
    "teacher_pos",
    "student_len",
    "teacher_len",
    "student_token",
    "teacher_token",
)


def _no_check() -> None:
    return None


@dataclass(frozen=True)
class TokenSpans:
    """Token ids with their byte spans ``[starts[i], ends[i])``; zero width = special."""

    ids: list[int]
    starts: list[int]
    ends: list[int]

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.starts) == len(self.ends):
            raise ValueError("TokenSpans: ids, starts and ends must have one entry per token")

    def __len__(self) -> int:
        return len(self.ids)

    def zero_width(self, i: int) -> bool:
        return self.starts[i] >= self.ends[i]


@dataclass(frozen=True)
class Group:
    """Student tokens ``a`` and teacher tokens ``b`` (indices, consecutive non-special
    tokens of each side) covering the same bytes ``[start, end)``."""

    a: tuple[int, ...]
    b: tuple[int, ...]
    start: int
    end: int


# --------------------------------------------------------------------------- spans


def _char_to_byte(text: str) -> list[int]:
    """``out[c]`` = byte offset of character ``c`` (``out[len(text)]`` = total bytes)."""
    out = [0] * (len(text) + 1)
    total = 0
    for c, ch in enumerate(text):
        out[c] = total
        total += len(ch.encode("utf-8"))
    out[len(text)] = total
    return out


def spans_from_ids(
    ids: Sequence[int], table: Sequence[bytes | None], *, start: int = 0
) -> TokenSpans:
    """Spans as the running sum of each token's exact bytes, from byte ``start``; tokens
    with no bytes (specials, or bytes the table does not know) are zero-width."""
    starts, ends = [], []
    pos = start
    for token_id in ids:
        piece = table[token_id] if 0 <= token_id < len(table) else None
        width = len(piece) if piece else 0
        starts.append(pos)
        pos += width
        ends.append(pos)
    return TokenSpans(list(ids), starts, ends)


def spans_from_encoding(
    text: str,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    table: Sequence[bytes | None],
) -> TokenSpans:
    """Byte spans of one encoding of ``text`` (its ids and character offsets).

    Exact (running byte sums) when every token with non-empty offsets has known bytes and
    together they spell ``text``; from the offsets otherwise (see the module docstring).
    """
    data = text.encode("utf-8")
    visible = [i for i, (s, e) in enumerate(offsets) if e > s]
    pieces = [table[ids[i]] if 0 <= ids[i] < len(table) else None for i in visible]
    if all(p for p in pieces) and b"".join(p or b"" for p in pieces) == data:
        starts, ends = [], []
        pos = 0
        keep = set(visible)
        for i, token_id in enumerate(ids):
            piece = table[token_id] if i in keep else None
            starts.append(pos)
            pos += len(piece) if piece else 0
            ends.append(pos)
        return TokenSpans(list(ids), starts, ends)
    return _spans_from_offsets(text, ids, offsets, len(data))


def _spans_from_offsets(
    text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], total: int
) -> TokenSpans:
    """Offsets to byte spans that tile ``[0, total)``: overlapping tokens fused (they share
    their cluster's span), gaps given to the following token, the last one to the end."""
    to_byte = _char_to_byte(text)
    clusters: list[list[int]] = []  # token indices
    bounds: list[list[int]] = []  # [start, end] per cluster, bytes
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        bs, be = to_byte[min(s, len(text))], to_byte[min(e, len(text))]
        if clusters and bs < bounds[-1][1]:
            clusters[-1].append(i)
            bounds[-1][1] = max(bounds[-1][1], be)
        else:
            clusters.append([i])
            bounds.append([bs, be])
    for k in range(len(bounds)):
        bounds[k][0] = bounds[k - 1][1] if k else 0
    if bounds:
        bounds[-1][1] = total
    starts = [0] * len(ids)
    ends = [0] * len(ids)
    owner: dict[int, int] = {i: k for k, members in enumerate(clusters) for i in members}
    pos = 0
    for i in range(len(ids)):
        cluster = owner.get(i)
        if cluster is None:  # zero-width: where the text stands now
            starts[i] = ends[i] = pos
        else:
            starts[i], ends[i] = bounds[cluster]
            pos = bounds[cluster][1]
    return TokenSpans(list(ids), starts, ends)


def encode_spans(
    tokenizer: Any,
    text: str,
    *,
    add_special_tokens: bool = False,
    table: Sequence[bytes | None] | None = None,
) -> TokenSpans:
    """``text`` encoded by ``tokenizer`` (a fast tokenizer), with each token's byte span."""
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,
    )
    if table is None:
        table = token_byte_table(tokenizer)
    return spans_from_encoding(text, enc["input_ids"], enc["offset_mapping"], table)


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class _Unit:
    tokens: tuple[int, ...]
    start: int
    end: int


def _units(spans: TokenSpans) -> list[_Unit]:
    """Consecutive non-special tokens with the same span (a fused cluster) as one unit."""
    units: list[_Unit] = []
    for i in range(len(spans)):
        if spans.zero_width(i):
            continue
        s, e = spans.starts[i], spans.ends[i]
        if units and (units[-1].start, units[-1].end) == (s, e):
            units[-1] = _Unit((*units[-1].tokens, i), s, e)
        else:
            units.append(_Unit((i,), s, e))
    return units


def align(a: TokenSpans, b: TokenSpans) -> list[Group]:
    """The groups of ``a`` and ``b`` tokens that cover equal bytes (module docstring).

    Where both sides tile the same bytes, the groups partition both sides' non-special
    tokens; where they cover different ranges (a truncated side), tokens outside the
    common range belong to no group.
    """
    ua, ub = _units(a), _units(b)
    groups: list[Group] = []
    i = j = 0
    while i < len(ua) and j < len(ub):
        if ua[i].start < ub[j].start:
            i += 1
            continue
        if ub[j].start < ua[i].start:
            j += 1
            continue
        gi, gj = i, j
        ea, eb = ua[i].end, ub[j].end
        broken = False
        while ea != eb and not broken:
            if ea < eb:
                i += 1
                broken = i == len(ua) or ua[i].start != ea
                ea = ea if broken else ua[i].end
            else:
                j += 1
                broken = j == len(ub) or ub[j].start != eb
                eb = eb if broken else ub[j].end
        if broken:  # one side has a hole or ends here: resume the search from where we are
            continue
        groups.append(
            Group(
                a=tuple(t for u in ua[gi : i + 1] for t in u.tokens),
                b=tuple(t for u in ub[gj : j + 1] for t in u.tokens),
                start=ua[gi].start,
                end=ea,
            )
        )
        i += 1
        j += 1
    return groups


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class CrossTokenized:
    """The teacher's view of every student block, and where the two can be compared.

    ``teacher_ids``/``teacher_mask`` ``[N, W]``: block ``n`` in the teacher's tokens.
    Aligned pairs of block ``n`` are rows ``ptr[n]:ptr[n+1]`` of ``pairs`` ``[P, 6]``, one
    per group, columns :data:`PAIR_COLUMNS`: the student position whose logits predict the
    group's first token, the teacher position predicting from the same byte, the number of
    student and of teacher tokens in the group (0 and 0 when a side's tokens are not
    consecutive), and the group's first student and first teacher token.
    """

    teacher_ids: Tensor
    teacher_mask: Tensor
    ptr: Tensor
    pairs: Tensor
    report: dict[str, Any]

    def __len__(self) -> int:
        return int(self.teacher_ids.shape[0])

    def pairs_of(self, blocks: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Pairs of the given blocks: ``(row, pairs)``, ``row`` = each pair's block's place
        in ``blocks`` (its row in the micro-batch), ``pairs`` its :data:`PAIR_COLUMNS`."""
        rows, picks = [], []
        for r, n in enumerate(blocks):
            lo, hi = int(self.ptr[n]), int(self.ptr[n + 1])
            picks.append(torch.arange(lo, hi))
            rows.append(torch.full((hi - lo,), r, dtype=torch.long))
        pick = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
        row = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return row, self.pairs[pick]


def _trim_utf8(data: bytes) -> tuple[int, int]:
    """``[lo, hi)`` of ``data`` without a partial character at either end (a block can cut a
    multi-byte character: those bytes are not text the teacher can read)."""
    lo, hi = 0, len(data)
    while lo < hi and 0x80 <= data[lo] < 0xC0:
        lo += 1
    # a trailing lead byte whose continuation bytes were cut off
    k = hi - 1
    while k >= lo and 0x80 <= data[k] < 0xC0 and hi - k < 4:
        k -= 1
    if k >= lo and data[k] >= 0xC0:
        need = 2 if data[k] < 0xE0 else 3 if data[k] < 0xF0 else 4
        if hi - k < need:
            hi = k
    return lo, hi


@dataclass
class _TeacherSeq:
    ids: list[int]
    starts: list[int]
    ends: list[int]


def _teacher_view(
    pieces: list[tuple[int, int, int | None]],
    data: bytes,
    teacher_tok: Any,
    table: Sequence[bytes | None],
    eos: int,
) -> tuple[_TeacherSeq, dict[int, int]]:
    """The teacher's tokens for one block: each piece ``(lo, hi, student_eos_index)``
    encoded with the teacher's own special tokens (a BOS if it adds one), trailing EOS it
    adds dropped, then the teacher's EOS where the student had one. Returns the sequence
    and ``{student eos index: teacher eos index}``."""
    seq = _TeacherSeq([], [], [])
    eos_at: dict[int, int] = {}
    texts: list[tuple[int, str]] = []
    for lo, hi, _ in pieces:
        a, b = _trim_utf8(data[lo:hi])
        try:
            texts.append((lo + a, data[lo + a : lo + b].decode("utf-8")))
        except UnicodeDecodeError:  # not text (e.g. sampled bytes): the teacher skips it
            texts.append((lo + a, ""))
    encoded = teacher_tok(
        [t for _, t in texts],
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,
    )
    for (_lo, hi, eos_index), (base, text), ids, offsets in zip(
        pieces, texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if text:
            ids, offsets = list(ids), list(offsets)
            while ids and ids[-1] == eos and offsets[-1][1] <= offsets[-1][0]:
                ids.pop()
                offsets.pop()
            spans = spans_from_encoding(text, ids, offsets, table)
            seq.ids += spans.ids
            seq.starts += [base + s for s in spans.starts]
            seq.ends += [base + e for e in spans.ends]
        if eos_index is not None:
            eos_at[eos_index] = len(seq.ids)
            seq.ids.append(eos)
            seq.starts.append(hi)
            seq.ends.append(hi)
    return seq, eos_at


def cross_tokenize_blocks(
    blocks: TokenBlocks,
    student_tok: Any,
    teacher_tok: Any,
    *,
    max_len: int,
    check: Check = _no_check,
) -> CrossTokenized:
    """Every student block in the teacher's tokens, with its aligned positions.

    ``max_len`` caps the teacher's sequence (its context); what does not fit is not
    aligned. A student token whose bytes are unknown is refused (the block's text could not
    be rebuilt). ``check`` runs after every 64 blocks.
    """
    s_table = token_byte_table(student_tok)
    t_table = token_byte_table(teacher_tok)
    s_specials = set(student_tok.all_special_ids or ())
    s_eos, t_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
    if t_eos is None:
        raise DataError(
            "loss.cross_tokenizer: the teacher's tokenizer has no eos token, which marks the "
            "document boundaries of the student's blocks; use a teacher tokenizer with one"
        )
    t_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else t_eos
    n_blocks, width = blocks.input_ids.shape
    rows: list[list[int]] = []
    pair_lists: list[list[tuple[int, ...]]] = []
    aligned = scored = truncated = 0
    for n in range(n_blocks):
        if n % 64 == 0:
            check()
        real = int(blocks.attention_mask[n].sum())
        ids = blocks.input_ids[n, :real].tolist()
        labels = blocks.labels[n, :real].tolist()
        student = spans_from_ids(ids, s_table)
        unknown = [t for t in ids if t not in s_specials and not s_table[t]]
        if unknown:
            raise DataError(
                f"loss.cross_tokenizer: student token id {unknown[0]} has no known bytes, so "
                "its block's text cannot be rebuilt for the teacher; use a byte-level BPE or "
                "SentencePiece (byte-fallback) student tokenizer"
            )
        data = b"".join(s_table[t] or b"" for t in ids)
        pieces: list[tuple[int, int, int | None]] = []
        lo = 0
        for i, token_id in enumerate(ids):
            if student.zero_width(i):
                pieces.append((lo, student.starts[i], i if token_id == s_eos else None))
                lo = student.starts[i]
        pieces.append((lo, len(data), None))
        seq, eos_at = _teacher_view(pieces, data, teacher_tok, t_table, int(t_eos))
        if len(seq.ids) > max_len:
            truncated += 1
            seq = _TeacherSeq(seq.ids[:max_len], seq.starts[:max_len], seq.ends[:max_len])
        teacher = TokenSpans(seq.ids, seq.starts, seq.ends)
        pairs: list[tuple[int, ...]] = []
        for g in align(student, teacher):
            si, ti = g.a[0], g.b[0]
            if si == 0 or ti == 0 or labels[si] == IGNORE_INDEX:
                continue
            m, k = (len(g.a), len(g.b)) if _consecutive(g.a) and _consecutive(g.b) else (0, 0)
            pairs.append((si - 1, ti - 1, m, k, ids[si], seq.ids[ti]))
        for si, ti in eos_at.items():
            if si > 0 and 0 < ti < len(seq.ids) and labels[si] != IGNORE_INDEX:
                pairs.append((si - 1, ti - 1, 1, 1, ids[si], seq.ids[ti]))
        pairs.sort()
        aligned += len(pairs)
        scored += sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
        rows.append(seq.ids)
        pair_lists.append(pairs)
    return _pack(rows, pair_lists, t_pad, width, aligned, scored, truncated, max_len)


def _consecutive(tokens: tuple[int, ...]) -> bool:
    return list(tokens) == list(range(tokens[0], tokens[0] + len(tokens)))


def _pack(
    rows: list[list[int]],
    pair_lists: list[list[tuple[int, ...]]],
    pad: int,
    student_width: int,
    aligned: int,
    scored: int,
    truncated: int,
    max_len: int,
) -> CrossTokenized:
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    flat = [p for pairs in pair_lists for p in pairs]
    ptr = torch.tensor([0, *torch.tensor([len(p) for p in pair_lists]).cumsum(0).tolist()])
    cols = torch.tensor(flat, dtype=torch.long).reshape(-1, len(PAIR_COLUMNS))
    teacher_tokens = int(mask.sum())
    s_len, t_len = cols[:, 2], cols[:, 3]
    shapes = {
        "one_to_one": int(((s_len == 1) & (t_len == 1)).sum()),
        "student_finer": int(((s_len > 1) & (t_len == 1)).sum()),
        "teacher_finer": int(((s_len == 1) & (t_len > 1)).sum()),
        "many_to_many": int(((s_len > 1) & (t_len > 1)).sum()),
    }
    report = {
        "aligned_positions": aligned,
        "scored_positions": scored,
        "aligned_fraction": aligned / scored if scored else math.nan,
        "teacher_tokens": teacher_tokens,
        "teacher_width": width,
        "student_width": student_width,
        "teacher_tokens_per_student_token": teacher_tokens / max(1, scored + len(rows)),
        "group_shapes": shapes,
        "truncated_blocks": truncated,
        "teacher_max_len": max_len,
    }
    return CrossTokenized(
        teacher_ids=ids,
        teacher_mask=mask,
        ptr=ptr.long(),
        pairs=cols,
        report=report,
    )
