"""Tests for the logit cache's codecs (foundry_kernel.teachers._cache_codec) and format 2.

Round trips check the documented error bounds (hypothesis: random sorted log-prob rows,
extreme and -inf values, k=1, ids above 65535, ties); version handling reads the format-1
fixture written by the v1 writer (tests/fixtures/logit-cache-v1) and refuses unknown
formats by number; tampering with a compressed shard or with the manifest's codec record
is refused; a realistic (Zipf-shaped) teacher at k=128 stays under 150 B/token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import Tensor

from foundry_kernel.errors import CacheError, StaleCacheError
from foundry_kernel.teachers._cache_codec import (
    CompressedCodec,
    ExactCodec,
    codec_from_params,
    codec_named,
)
from foundry_kernel.teachers._logit_cache import (
    CACHE_FORMAT_VERSION,
    MANIFEST,
    CacheKey,
    LogitCache,
    capture,
    fingerprint_tokens,
)
from foundry_kernel.teachers._targets import TAIL_FLOOR, SparseTargets, log1mexp
from tests.test_logit_cache import K, Teacher, expected_targets, make_blocks

FIXTURE = Path(__file__).parent / "fixtures" / "logit-cache-v1"
CODEC = CompressedCodec()
TAIL_BOUND = CODEC.tail_step / 2 + 1e-5  # the grid's half step, plus fp32 re-summation


def key_for(blocks: Any, k: int = K, codec: str = "compressed", **changes: Any) -> CacheKey:
    key = CacheKey(
        teacher="teacher-a", tokenizer="tok-a", data=fingerprint_tokens(blocks), k=k, codec=codec
    )
    return dataclasses.replace(key, **changes)


def round_trip(ids: Tensor, values: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encode one shard's arrays with the compressed codec and decode every block back:
    (ids, values relative to each position's top-1, tail, the true tail)."""
    tail = SparseTargets(ids, values).tail_logmass()
    tensors = CODEC.encode({"ids": ids, "values": values, "tail": tail}, vocab)
    reader = CODEC.reader(tensors, ids.shape[1], ids.shape[2], "test shard")
    out = reader.blocks(torch.arange(ids.shape[0]))
    return out.ids, out.values, out.tail, tail


def check_bounds(ids: Tensor, values: Tensor, vocab: int) -> None:
    """Every documented bound holds for these (sorted-descending) rows."""
    got_ids, got_values, got_tail, tail = round_trip(ids, values, vocab)
    # ids: exact, as a set per position (ties among equal codes are served in id order)
    assert torch.equal(got_ids.sort(-1).values, ids.sort(-1).values)
    # served sorted descending, aligned with their ids
    assert bool((got_values[..., :-1] >= got_values[..., 1:]).all())
    # values: d = top1 - value within (knee + d) * (exp(step / 2 knee) - 1), matched by id
    want = values.gather(-1, ids.argsort(-1))
    got = got_values.gather(-1, got_ids.argsort(-1))
    top = values.amax(-1, keepdim=True)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "-inf must decode to -inf, finite to finite"
    d = (top - want)[finite].double()
    d_hat = (-got)[finite].double()
    bound = (CODEC.knee + d) * math.expm1(CODEC.step / (2 * CODEC.knee))
    far = d > CODEC.knee * math.expm1(254 * CODEC.step / CODEC.knee)  # past the last code
    assert bool(((d_hat - d).abs() <= bound + 1e-4)[~far].all())
    # tail: within half the grid step, in log (above the floor, where it is clamped)
    kept = tail > TAIL_FLOOR + 1
    errors = torch.cat([(got_tail - tail)[kept].abs(), torch.zeros(1)])
    assert float(errors.max()) <= TAIL_BOUND


def sorted_rows(draw: st.DrawFn, vocab: int, k: int, positions: int) -> tuple[Tensor, Tensor]:
    """Random top-k rows: distinct ids below ``vocab``, log-probs sorted descending."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(positions)])
    logits = scale * torch.randn(positions, k, generator=g)
    if draw(st.booleans()):  # ties: a few repeated values
        logits = torch.round(logits * 2) / 2
    values = logits.log_softmax(-1) + math.log(draw(st.sampled_from([1.0, 0.5, 1e-3, 1 - 1e-7])))
    values, _ = values.sort(-1, descending=True)
    return ids.unsqueeze(0), values.unsqueeze(0)


@st.composite
def rows(draw: st.DrawFn) -> tuple[Tensor, Tensor, int]:
    vocab = draw(st.sampled_from([2, 300, 65536, 70_000, 2**20]))
    k = draw(st.integers(1, min(vocab, 64)))
    ids, values = sorted_rows(draw, vocab, k, draw(st.integers(1, 5)))
    return ids, values, vocab


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_compressed_round_trip_is_within_its_bounds(case: tuple[Tensor, Tensor, int]) -> None:
    ids, values, vocab = case
    check_bounds(ids, values, vocab)


def test_extreme_rows() -> None:
    """-inf entries, probabilities far below the last code, k=1, the largest int32 id."""
    ids = torch.tensor([[[5, 9, 2, 7], [0, 1, 2, 3], [2**31 - 2, 4, 8, 6]]])
    values = torch.tensor(
        [
            [
                [-0.01, -5.0, -float("inf"), -float("inf")],
                [-1e-6, -30.0, -400.0, -1e6],
                [-1.3863, -1.3863, -1.3863, -1.3863],  # four-way tie
            ]
        ]
    )
    check_bounds(ids, values, 2**31 - 1)
    got_ids, got_values, _, _ = round_trip(ids, values, 2**31 - 1)
    assert torch.isinf(got_values[0, 0, 2:]).all()
    assert got_ids[0, 2].tolist() == [4, 6, 8, 2**31 - 2]  # a tie is served in id order
    one = round_trip(ids[..., :1], values[..., :1], 2**31 - 1)
    assert torch.equal(one[0], ids[..., :1]) and torch.equal(one[1], torch.zeros(1, 3, 1))


def test_tail_keeps_both_ends() -> None:
    """The stored one of (top mass, tail mass) is the smaller: a tiny tail (1e-9) and a
    tiny top-k mass (1e-9) both come back within half a grid step in log."""
    for log_top in (math.log1p(-1e-9), -0.7, -1.0, math.log(1e-9)):
        values = torch.tensor([[[log_top]]])
        _, _, got, tail = round_trip(torch.tensor([[[3]]]), values, 10)
        assert abs(float(got - tail)) <= TAIL_BOUND
        top = log1mexp(got.double())
        assert abs(float(top) - log_top) <= TAIL_BOUND + 1e-6


# --------------------------------------------------------------------------- served targets


def test_served_targets_drive_the_sparse_loss_close_to_the_exact_cache(tmp_path: Path) -> None:
    blocks = make_blocks()
    exact = capture(
        blocks,
        Teacher(),
        key_for(blocks, codec="exact"),
        tmp_path / "x",
        batch_size=2,
        shard_blocks=3,
    )
    packed = capture(
        blocks, Teacher(), key_for(blocks), tmp_path / "c", batch_size=2, shard_blocks=3
    )
    order = [5, 0, 6, 3, 3]
    want = expected_targets(order, blocks.input_ids[order], K)
    a, b = exact.targets(order), packed.targets(order)
    assert torch.equal(b.ids.sort(-1).values, want.ids.sort(-1).values)
    assert b.label_logprobs is not None and want.label_logprobs is not None
    torch.testing.assert_close(b.label_logprobs, want.label_logprobs, rtol=1e-3, atol=1e-3)
    # per id: the top-1's bound twice (own code + the shift) plus the tail's
    got = b.logprobs.gather(-1, b.ids.argsort(-1))
    ref = want.logprobs.gather(-1, want.ids.argsort(-1))
    d = want.logprobs[..., :1] - ref
    bound = 2 * CODEC.value_error_bound(d) + TAIL_BOUND
    assert bool(((got - ref).abs() <= bound).all())
    assert float((b.tail_logmass() - want.tail_logmass()).abs().max()) <= TAIL_BOUND
    assert a.logprobs.shape == b.logprobs.shape
    assert packed.bytes_per_token < exact.bytes_per_token
    assert packed.codec.params() == CODEC.params() and packed.format_version == 2


# --------------------------------------------------------------------------- versions


def v1_key() -> CacheKey:
    """The key the v1 fixture was captured with, as a caller of today would build it."""
    raw = json.loads((FIXTURE / MANIFEST).read_text())["key"]
    return CacheKey(teacher=raw["teacher"], tokenizer=raw["tokenizer"], data=raw["data"], k=8)


def test_a_format_1_cache_written_by_the_v1_writer_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    shutil.copytree(FIXTURE, folder)
    assert CACHE_FORMAT_VERSION == 2
    assert v1_key().codec == "compressed"  # what a caller captures with today: still read
    cache = LogitCache.open(folder, v1_key())
    assert cache.format_version == 1 and isinstance(cache.codec, ExactCodec)
    order = [6, 0, 4]
    got = cache.targets(order)
    blocks = make_blocks()
    assert fingerprint_tokens(blocks) == v1_key().data
    want = expected_targets(order, blocks.input_ids[order], K)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=2e-3, atol=2e-3)
    with safe_open(str(folder / "shard-00002.safetensors"), framework="pt") as f:
        stored = f.get_tensor("values")[0].float()  # block 6
    assert float((got.logprobs[0] - stored).abs().max()) < 2e-3


def test_a_format_1_cache_is_not_resumed_into(tmp_path: Path) -> None:
    """Capturing into a format-1 folder is refused naming the format (shards of two
    formats never mix); reading it stays possible, as above."""
    folder = tmp_path / "v1"
    shutil.copytree(FIXTURE, folder)
    teacher = Teacher()
    with pytest.raises(StaleCacheError, match="cache format 1 \\(this Foundry writes 2\\)"):
        capture(make_blocks(), teacher, v1_key(), folder, batch_size=2, shard_blocks=3)
    assert teacher.calls == []


def test_an_unknown_format_is_refused_naming_it(tmp_path: Path) -> None:
    blocks = make_blocks()
    capture(blocks, Teacher(), key_for(blocks), tmp_path, batch_size=2, shard_blocks=3)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    raw["key"]["version"] = 3
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(StaleCacheError, match="cache format 3 \\(this Foundry writes 2\\)"):
        LogitCache.open(tmp_path, key_for(blocks))


# --------------------------------------------------------------------------- tampering


def compressed_cache(tmp_path: Path) -> tuple[Any, Path]:
    blocks = make_blocks()
    capture(blocks, Teacher(), key_for(blocks), tmp_path, batch_size=2, shard_blocks=3)
    return blocks, tmp_path


def edit_manifest(folder: Path, change: Any) -> None:
    raw = json.loads((folder / MANIFEST).read_text())
    change(raw)
    (folder / MANIFEST).write_text(json.dumps(raw))


def test_a_changed_payload_byte_is_refused(tmp_path: Path) -> None:
    blocks, folder = compressed_cache(tmp_path)
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001.*SHA-256 does not match"):
        LogitCache.open(folder, key_for(blocks))
    lazy = LogitCache.open(folder, key_for(blocks), verify="lazy")
    lazy.targets([0])
    with pytest.raises(CacheError, match=r"shard-00001.*SHA-256 does not match"):
        lazy.targets([3])


def test_a_changed_codec_parameter_in_the_manifest_is_refused(tmp_path: Path) -> None:
    """The shard's metadata (covered by its hash) records the codec it was written with;
    a manifest whose record differs is refused on the shard's first use, before decoding."""
    blocks, folder = compressed_cache(tmp_path)
    edit_manifest(folder, lambda raw: raw["codec"].update(step=0.2))
    cache = LogitCache.open(folder, key_for(blocks), verify="lazy")
    with pytest.raises(CacheError, match=r"was written with codec .*manifest records"):
        cache.targets([0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["codec"].update(name="exact"), "not the exact layout's"),
        (lambda raw: raw["codec"].update(name="zip"), "unknown logit cache codec 'zip'"),
        (lambda raw: raw["codec"].update(level="nine"), "malformed"),
        (lambda raw: raw["codec"].update(extra=1), "unknown or changed fields"),
        (lambda raw: raw.pop("codec"), "codec"),
        (lambda raw: raw["key"].update(codec="exact"), "is not its key's codec"),
    ],
)
def test_a_changed_codec_record_is_an_unreadable_manifest(
    tmp_path: Path, change: Any, message: str
) -> None:
    blocks, folder = compressed_cache(tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(CacheError, match=message):
        LogitCache.open(folder, key_for(blocks))


def test_codec_lookup() -> None:
    assert codec_named("exact") == ExactCodec() and codec_named("compressed") == CODEC
    assert codec_from_params(CODEC.params()) == CODEC
    with pytest.raises(CacheError, match="unknown logit cache codec 'lz'"):
        codec_named("lz")
    with pytest.raises(CacheError, match="out of range"):
        CompressedCodec(step=0)
    with pytest.raises(ValueError, match="cache codec must be one of"):
        CacheKey(teacher="t", tokenizer="t", data="d", k=1, codec="zip")


# --------------------------------------------------------------------------- size


def zipf_teacher(vocab: int, k: int) -> Any:
    """A teacher shaped like a language model's next-token distribution: a shared Zipf
    prior over the vocabulary (s = 1.1, ids shuffled) plus per-position context (Gaussian,
    sd 2.5). Its top-128 of 1024 leaves a tail mass of 0.2-30 % (the built-in teacher's:
    0.01-33 %), and it compresses a little worse than that teacher (~144 vs ~137 B/token)."""
    g = torch.Generator().manual_seed(7)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    prior = prior[torch.randperm(vocab, generator=g)]

    def answer(indices: Tensor, input_ids: Tensor, attention_mask: Tensor) -> SparseTargets:
        gens = [torch.Generator().manual_seed(1000 + int(i)) for i in indices]
        noise = torch.stack(
            [2.5 * torch.randn(input_ids.shape[1], vocab, generator=r) for r in gens]
        )
        return SparseTargets.from_logits(prior + noise, k)

    return answer


def test_bytes_per_token_at_k128_is_under_150_on_a_realistic_teacher(tmp_path: Path) -> None:
    blocks = make_blocks(n=8, seq=128, vocab=1024)
    teacher = zipf_teacher(1024, 128)
    packed = capture(
        blocks,
        teacher,
        key_for(blocks, k=128),
        tmp_path / "c",
        batch_size=4,
        shard_blocks=4,
        vocab_size=1024,
    )
    exact = capture(
        blocks,
        teacher,
        key_for(blocks, k=128, codec="exact"),
        tmp_path / "x",
        batch_size=4,
        shard_blocks=4,
        vocab_size=1024,
    )
    tail = packed.targets(list(range(8))).tail_logmass().exp()
    assert (
        1e-5 < float(tail.min()) and float(tail.max()) < 0.5
    )  # the built-in teacher: 7.6e-5..0.33
    assert exact.bytes_per_token == pytest.approx(4 * 128 + 4, abs=1)
    print(f"zipf teacher, k=128: {packed.bytes_per_token:.1f} B/token compressed")
    assert packed.bytes_per_token <= 150


@pytest.mark.parametrize("codec", [CompressedCodec(), ExactCodec()], ids=lambda c: c.name)
def test_a_repeated_id_is_refused_as_it_is_decoded(codec: Any) -> None:
    """Each reader checks that no id repeats within a position (a repeat would count its
    probability twice), which is what lets the cache mark its targets ``ids_distinct``
    and the loss skip its own per-step sort."""
    ids = torch.tensor([[[3, 1, 2], [4, 4, 0]]])
    values = torch.tensor([[[-0.5, -1.0, -2.0], [-0.5, -1.0, -2.0]]])
    tail = torch.log(-torch.expm1(torch.logsumexp(values, -1)))
    encoded = codec.encode({"ids": ids, "values": values, "tail": tail}, 8)
    reader = codec.reader(encoded, 2, 3, "shard-x")
    with pytest.raises(CacheError, match="shard-x: a position's top-k ids repeat"):
        reader.blocks(torch.tensor([0]))
    fine = codec.reader(
        codec.encode({"ids": ids[:, :1], "values": values[:, :1], "tail": tail[:, :1]}, 8),
        1,
        3,
        "shard-y",
    )
    assert sorted(fine.blocks(torch.tensor([0])).ids[0, 0].tolist()) == [1, 2, 3]


def test_cache_targets_say_their_ids_are_distinct_and_the_loss_trusts_only_that(
    tmp_path: Path,
) -> None:
    from foundry_kernel.errors import LossInputError
    from foundry_kernel.training._losses import LossSpec, sparse_distillation_loss

    blocks = make_blocks()
    teacher = Teacher()
    key = CacheKey("t", "tok", fingerprint_tokens(blocks), K)
    cache = capture(blocks, teacher, key, tmp_path / "c", batch_size=2, shard_blocks=3)
    served = cache.targets([0, 1])
    assert served.ids_distinct and served.to(torch.device("cpu")).ids_distinct
    # a producer that did not check: the loss still sorts and refuses a repeat
    ids = served.ids.clone()
    ids[0, 0, 1] = ids[0, 0, 0]
    logits = torch.randn(2, served.ids.shape[1], 300, requires_grad=True)
    labels = blocks.labels[[0, 1]]
    with pytest.raises(LossInputError, match="repeat within a position"):
        sparse_distillation_loss(logits, SparseTargets(ids, served.logprobs), labels, LossSpec())
    out = sparse_distillation_loss(logits, served, labels, LossSpec())
    assert torch.isfinite(out.total)
