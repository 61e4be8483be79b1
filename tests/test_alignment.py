"""Byte-offset alignment of two tokenizations (``foundry_kernel.data._alignment``).

Real fast tokenizers trained here on a small corpus, in four conventions: byte-level BPE
(two vocabulary sizes, one adding a BOS token), SentencePiece-style Metaspace (``▁``, an
unknown token for unseen characters: the character-offset path), and byte-level BPE
without a word pre-split (merges that cross word boundaries). Hand-made cases pin the
tricky spots; a hypothesis property checks every group on random text.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from foundry_kernel._token_bytes import byte_alphabet, prefix_assignment, token_byte_table
from foundry_kernel.data._alignment import (
    TokenSpans,
    _spans_from_offsets,
    _trim_utf8,
    align,
    cross_tokenize_blocks,
    encode_spans,
)
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.data._tokenizer import train_bpe_tokenizer

CORPUS = [
    "The list object's append() method: x = [1, 2]\n\tdef f(): return None\n",
    "of the of the of the hello world, hello there. café naïve 日本語 🙂 emoji\n",
    "    indented  code  with   spaces\tand tabs; Ünïcödé résumé Ελληνικά\n",
] * 30


def _wrap(backend: Tokenizer, **specials: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials
    )


def _metaspace() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return _wrap(backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _cross_word() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return _wrap(backend, eos_token="<|endoftext|>")


def _with_bos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    bos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    return tok


@pytest.fixture(scope="module")
def toks() -> dict[str, Any]:
    return {
        "small": train_bpe_tokenizer(CORPUS, 300),
        "large_bos": _with_bos(train_bpe_tokenizer(CORPUS, 420)),
        "metaspace": _metaspace(),
        "cross_word": _cross_word(),
    }


def _bytes_of(spans: TokenSpans, idx: tuple[int, ...]) -> tuple[int, int]:
    return spans.starts[idx[0]], spans.ends[idx[-1]]


def _check_groups(text: str, a: TokenSpans, b: TokenSpans) -> list[Any]:
    """Every group covers equal bytes on both sides; groups partition both sides'
    non-special tokens, in order, and tile the text."""
    groups = align(a, b)
    total = len(text.encode("utf-8"))
    for spans, side in ((a, "a"), (b, "b")):
        seen = [i for g in groups for i in getattr(g, side)]
        visible = [i for i in range(len(spans)) if not spans.zero_width(i)]
        assert seen == visible, (side, seen, visible)
    pos = 0
    for g in groups:
        assert _bytes_of(a, g.a) == _bytes_of(b, g.b) == (g.start, g.end)
        assert g.start == pos and g.end > g.start
        pos = g.end
    assert pos == total or not groups
    return groups


# --------------------------------------------------------------------------- byte spans


def test_byte_alphabet_is_a_bijection_and_space_is_g_dot() -> None:
    alphabet = byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == 32 and alphabet["Ċ"] == 10 and alphabet["a"] == 97


def test_byte_level_tokens_splitting_a_character_get_exact_byte_spans(toks: Any) -> None:
    tok = toks["small"]
    text = "x 日本 🙂"
    spans = encode_spans(tok, text)
    data = text.encode("utf-8")
    table = token_byte_table(tok)
    assert b"".join(table[i] or b"" for i in spans.ids) == data
    # the spans tile the text and each token's bytes are exactly its slice
    assert spans.starts[0] == 0 and spans.ends[-1] == len(data)
    for i, token_id in enumerate(spans.ids):
        assert data[spans.starts[i] : spans.ends[i]] == table[token_id]
    # some token holds part of a character (its char offsets overlap its neighbour's)
    partial = [p for p in (table[i] or b"" for i in spans.ids) if p and p[-1] >= 0x80]
    assert partial, "the corpus should split a multi-byte character somewhere"


def test_offsets_path_fuses_overlapping_tokens_and_fills_gaps() -> None:
    text = "ab 日c"  # bytes: a b ' ' e6 97 a5 c  (7)
    offsets = [(0, 1), (1, 2), (3, 4), (3, 4), (4, 5), (0, 0)]  # the space is dropped
    spans = _spans_from_offsets(text, [1, 2, 3, 4, 5, 6], offsets, 7)
    assert list(zip(spans.starts, spans.ends, strict=True)) == [
        (0, 1),
        (1, 2),
        (2, 6),  # the dropped space goes to the next token; the two halves of 日 fused
        (2, 6),
        (6, 7),
        (7, 7),  # zero-width (a special): where the text stands
    ]


def test_bos_on_one_side_does_not_shift_the_other(toks: Any) -> None:
    """TRL #4393: string buffers never re-synced after one side's BOS. Here the BOS is a
    zero-width token and the groups are those without it, shifted by one index."""
    text = "hello world, of the list"
    a = encode_spans(toks["small"], text)
    with_bos = encode_spans(toks["large_bos"], text, add_special_tokens=True)
    without = encode_spans(toks["large_bos"], text, add_special_tokens=False)
    assert with_bos.zero_width(0) and len(with_bos) == len(without) + 1
    groups_bos = _check_groups(text, a, with_bos)
    groups_plain = _check_groups(text, a, without)
    assert [(g.start, g.end, g.a) for g in groups_bos] == [
        (g.start, g.end, g.a) for g in groups_plain
    ]
    assert [tuple(i - 1 for i in g.b) for g in groups_bos] == [g.b for g in groups_plain]


def test_hand_made_groups_merge_across_word_boundaries() -> None:
    # student: "of" " the" " list"; teacher: "of the" " li" "st" (a merge across words)
    a = TokenSpans([1, 2, 3], [0, 2, 6], [2, 6, 11])
    b = TokenSpans([0, 7, 8, 9], [0, 0, 6, 9], [0, 6, 9, 11])  # BOS first
    groups = align(a, b)
    assert [(g.a, g.b, g.start, g.end) for g in groups] == [
        ((0, 1), (1,), 0, 6),
        ((2,), (2, 3), 6, 11),
    ]


def test_whitespace_conventions_align_on_equal_bytes(toks: Any) -> None:
    text = "    indented  code\twith  spaces ÜnÏ 日本"
    spans = {name: encode_spans(tok, text) for name, tok in toks.items()}
    for other in ("metaspace", "cross_word", "large_bos"):
        groups = _check_groups(text, spans["small"], spans[other])
        assert len(groups) >= 3
    # Metaspace writes spaces as ▁ and meets an unseen character (its unknown token): the
    # offsets path still tiles the text
    assert spans["metaspace"].ends[-1] == len(text.encode("utf-8"))


def test_cross_word_tokenizer_really_merges_across_words(toks: Any) -> None:
    table = token_byte_table(toks["cross_word"])
    assert any(p and b" " in p.strip(b" ") for p in table), "no merge crossed a space"


def test_trim_utf8_drops_partial_characters_at_both_ends() -> None:
    data = "日本".encode()  # e6 97 a5 e6 9c ac
    assert _trim_utf8(data[1:]) == (2, 5)  # leading continuation bytes, cut trailing char
    assert _trim_utf8(data) == (0, 6)
    assert _trim_utf8(b"ab") == (0, 2)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("abcdefhilnorstw .,()[]_\n\t") + list("éÜ日本🙂語λ")),
        min_size=1,
        max_size=60,
    ),
    pair=st.sampled_from(
        [
            ("small", "large_bos"),
            ("small", "metaspace"),
            ("metaspace", "cross_word"),
            ("cross_word", "large_bos"),
        ]
    ),
    bos=st.booleans(),
)
def test_property_groups_cover_equal_bytes_and_partition_tokens(
    toks: Any, text: str, pair: tuple[str, str], bos: bool
) -> None:
    a = encode_spans(toks[pair[0]], text)
    b = encode_spans(toks[pair[1]], text, add_special_tokens=bos)
    _check_groups(text, a, b)


# --------------------------------------------------------------------------- blocks


def _blocks(tok: Any, texts: list[str], seq_len: int) -> TokenBlocks:
    ids: list[int] = []
    for text in texts:
        ids += [*tok(text, add_special_tokens=False).input_ids, tok.eos_token_id]
    n = -(-len(ids) // seq_len)
    ids += [tok.pad_token_id] * (n * seq_len - len(ids))
    t = torch.tensor(ids).view(n, seq_len)
    mask = (t != tok.pad_token_id).long()
    return TokenBlocks(t, mask, torch.where(mask.bool(), t, IGNORE_INDEX))


def test_cross_tokenized_blocks_pair_positions_predicting_the_same_bytes(toks: Any) -> None:
    student, teacher = toks["small"], toks["large_bos"]
    texts = ["hello world, of the list 日本", "café naïve 🙂 emoji", "def f(): return None"]
    blocks = _blocks(student, texts, 16)
    view = cross_tokenize_blocks(blocks, student, teacher, max_len=64)
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    eos_pairs = 0
    for n in range(len(blocks)):
        _row, pairs = view.pairs_of([n])
        s_ids = blocks.input_ids[n].tolist()
        t_ids = view.teacher_ids[n].tolist()
        for s_pos, t_pos, _m, _k, s_tok, t_tok in pairs.tolist():
            assert s_ids[s_pos + 1] == s_tok and t_ids[t_pos + 1] == t_tok
            if s_tok == student.eos_token_id:
                eos_pairs += 1
                assert t_tok == teacher.eos_token_id
                continue
            # both predict from the same byte: the texts before them are equal, since the
            # block start (the teacher may read a BOS first: zero bytes)
            before_s = b"".join(s_table[i] or b"" for i in s_ids[: s_pos + 1])
            before_t = b"".join(t_table[i] or b"" for i in t_ids[: t_pos + 1])
            assert before_s.endswith(before_t) or before_t.endswith(before_s)
            assert len(before_s) - len(before_t) in range(0, 4)  # only a trimmed partial char
    assert eos_pairs >= 2
    assert 0.3 < view.report["aligned_fraction"] <= 1.0
    assert view.teacher_ids[0, 0] == teacher.eos_token_id  # the teacher's own BOS convention


def test_identical_tokenizers_align_every_position(toks: Any) -> None:
    tok = toks["small"]
    blocks = _blocks(tok, ["hello world, of the list", "x = [1, 2]"], 12)
    view = cross_tokenize_blocks(blocks, tok, tok, max_len=12)
    assert torch.equal(
        view.teacher_ids, blocks.input_ids.masked_fill(blocks.attention_mask == 0, tok.pad_token_id)
    )
    scored = int((blocks.labels[:, 1:] != IGNORE_INDEX).sum())
    assert view.report["aligned_positions"] == scored
    assert view.report["group_shapes"]["one_to_one"] == scored


def test_prefix_assignment_is_identity_for_one_tokenizer_and_prefix_otherwise(toks: Any) -> None:
    tok = toks["small"]
    assign, twin = prefix_assignment(tok, tok)
    assert assign == list(range(len(tok))) and all(twin)
    big, small = toks["large_bos"], toks["small"]
    assign, twin = prefix_assignment(big, small)
    t_table, s_table = token_byte_table(big), token_byte_table(small)
    for t, s in enumerate(assign):
        if t_table[t]:
            assert s >= 0 and t_table[t].startswith(s_table[s] or b"\0")
            assert twin[t] == (t_table[t] == s_table[s])
