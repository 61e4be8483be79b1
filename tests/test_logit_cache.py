"""Tests for foundry_kernel.teachers._logit_cache: capture, resume, staleness, tampering, atomicity.

The "teacher" is a seeded random dense model: block i always gets the same logits
(generator seeded with i), whatever the batch it is asked in, so an interrupted and
resumed capture must produce byte-identical shards to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from foundry_kernel._context import RunContext
from foundry_kernel.data._blocks import TokenBlocks
from foundry_kernel.errors import CacheError, ConfigError, ModelError, RunCancelled, StaleCacheError
from foundry_kernel.teachers._logit_cache import (
    MANIFEST,
    CacheKey,
    LogitCache,
    capture,
    fingerprint_model_dir,
    fingerprint_tokenizer,
    fingerprint_tokens,
)
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._losses import LossSpec, sparse_distillation_loss

VOCAB = 300
SEQ = 6
K = 8


# --------------------------------------------------------------------------- fixtures


def make_blocks(n: int = 7, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # some padding
    return TokenBlocks(input_ids=ids, attention_mask=mask, labels=ids.clone())


def teacher_logits(index: int, seq: int = SEQ, vocab: int = VOCAB) -> Tensor:
    """Block ``index``'s dense logits: depends on the index only, never on batching."""
    g = torch.Generator().manual_seed(10_000 + index)
    return 3.0 * torch.randn(seq, vocab, generator=g)


class Teacher:
    """A recording teacher_fn; ``on_call(n)`` runs before the n-th call (1-based)."""

    def __init__(
        self,
        k: int = K,
        vocab: int = VOCAB,
        *,
        labels: bool = True,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        self.k, self.vocab, self.labels, self.on_call = k, vocab, labels, on_call
        self.calls: list[list[int]] = []

    @property
    def blocks_asked(self) -> list[int]:
        return [i for call in self.calls for i in call]

    def __call__(self, indices: Tensor, input_ids: Tensor, attention_mask: Tensor) -> SparseTargets:
        self.calls.append(indices.tolist())
        if self.on_call is not None:
            self.on_call(len(self.calls))
        return expected_targets(indices.tolist(), input_ids, self.k, self.vocab, self.labels)


def expected_targets(
    indices: list[int], input_ids: Tensor, k: int, vocab: int = VOCAB, labels: bool = True
) -> SparseTargets:
    seq = input_ids.shape[1]
    logits = torch.stack([teacher_logits(i, seq, vocab) for i in indices])
    return SparseTargets.from_logits(logits, k, input_ids if labels else None)


def key_for(blocks: TokenBlocks, k: int = K, **changes: Any) -> CacheKey:
    """The exact codec (format 1's layout), whose bytes these tests inspect; the compressed
    codec's own round trip, tampering and version tests are in tests/test_cache_codec.py."""
    key = CacheKey(
        teacher="teacher-a", tokenizer="tok-a", data=fingerprint_tokens(blocks), k=k, codec="exact"
    )
    return dataclasses.replace(key, **changes)


def run_capture(
    blocks: TokenBlocks, folder: Path, teacher: Teacher, key: CacheKey | None = None, **kw: Any
) -> LogitCache:
    options: dict[str, Any] = {"batch_size": 2, "shard_blocks": 3, **kw}
    return capture(blocks, teacher, key or key_for(blocks, teacher.k), folder, **options)


def manifest(folder: Path) -> Any:
    """The manifest as plain JSON (what another tool would read)."""
    return json.loads((folder / MANIFEST).read_text())


def shard_hashes(folder: Path) -> dict[str, str]:
    return {s["file"]: s["sha256"] for s in manifest(folder)["shards"]}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(("vocab", "id_dtype"), [(VOCAB, "U16"), (70_000, "I32")])
def test_round_trip(tmp_path: Path, vocab: int, id_dtype: str) -> None:
    blocks = make_blocks(vocab=vocab)
    teacher = Teacher(vocab=vocab)
    cache = run_capture(blocks, tmp_path, teacher)
    assert cache.num_blocks == 7 and cache.k == K and cache.positions == SEQ and cache.complete
    with safe_open(str(tmp_path / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("ids").get_dtype() == id_dtype
        assert f.get_slice("values").get_dtype() == "F16"

    order = [5, 0, 6, 3, 3]
    got = LogitCache.open(tmp_path, key_for(blocks)).targets(torch.tensor(order))
    want = expected_targets(order, blocks.input_ids[order], K, vocab)
    assert got.ids.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert torch.equal(got.ids, want.ids)
    # fp16 storage (~5e-4 relative) plus the per-position shift that restores the tail.
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=2e-3, atol=2e-3)
    assert got.label_logprobs is not None and want.label_logprobs is not None
    assert torch.equal(got.label_logprobs, want.label_logprobs)
    # The tail is the teacher's fp32 one, not a re-sum of the rounded values.
    torch.testing.assert_close(got.tail_logmass(), want.tail_logmass(), rtol=1e-4, atol=1e-5)


def test_tail_survives_where_rounded_values_would_lose_it(tmp_path: Path) -> None:
    """A peaked teacher (tail mass 1e-6..1e-3): re-summing fp16 values loses the tail.

    The cache returns the stored fp32 tail through tail_logmass() (relative error only
    from fp32 re-summation); plain fp16 values would be off by more than 100%."""
    blocks = make_blocks(n=2)

    def peaked(indices: Tensor, input_ids: Tensor, attention_mask: Tensor) -> SparseTargets:
        logits = torch.stack([teacher_logits(int(i)) for i in indices])
        logits[..., :K] += 15.0
        return SparseTargets.from_logits(logits, K)

    cache = capture(blocks, peaked, key_for(blocks), tmp_path, batch_size=2, shard_blocks=2)
    want = peaked(torch.arange(2), blocks.input_ids, blocks.attention_mask).tail_logmass().exp()
    assert want.max() < 1e-3
    naive = SparseTargets(cache.targets([0, 1]).ids, cache_values_fp16(tmp_path))
    got = cache.targets([0, 1]).tail_logmass().exp()
    assert ((got - want).abs() / want).max() < 1e-2
    assert ((naive.tail_logmass().exp() - want).abs() / want).max() > 1.0


def cache_values_fp16(folder: Path) -> Tensor:
    """The raw stored fp16 values of shard 0, as float32."""
    with safe_open(str(folder / "shard-00000.safetensors"), framework="pt") as f:
        return f.get_tensor("values").float()


def test_cache_targets_drive_the_sparse_loss_like_the_live_teacher(tmp_path: Path) -> None:
    blocks = make_blocks()
    cache = run_capture(blocks, tmp_path, Teacher())
    idx = [1, 4, 6]
    student = torch.randn(3, SEQ, VOCAB, generator=torch.Generator().manual_seed(3))
    labels = blocks.input_ids[idx]
    spec = LossSpec(kind="forward_kl", ce_weight=0.1)
    live = expected_targets(idx, labels, K)
    a = sparse_distillation_loss(student, cache.targets(idx), labels, spec)
    b = sparse_distillation_loss(student, live, labels, spec)
    torch.testing.assert_close(a.total, b.total, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- resume


def test_resume_after_cancel_asks_only_for_missing_blocks(tmp_path: Path) -> None:
    blocks = make_blocks()
    ctx = RunContext("capture-test")
    first = Teacher(on_call=lambda n: ctx.cancel("user") if n == 3 else None)
    progress: list[tuple[int, int]] = []
    with pytest.raises(RunCancelled):
        run_capture(
            blocks, tmp_path / "a", first, ctx=ctx, on_progress=lambda d, t: progress.append((d, t))
        )
    # Calls 1-2 filled shard 0 (blocks 0-2), call 3 ran (blocks 3-4 of shard 1) and then the
    # check before call 4 stopped it: shard 1 was never written, shard 0 is usable.
    assert first.calls == [[0, 1], [2], [3, 4]]
    assert progress == [(0, 7), (2, 7), (3, 7), (5, 7)]
    m = manifest(tmp_path / "a")
    files = [s["file"] for s in m["shards"]]
    assert m["complete"] is False and files == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match=r"incomplete \(3 of 7 blocks"):
        LogitCache.open(tmp_path / "a", key_for(blocks))

    second = Teacher()
    resumed = run_capture(
        blocks, tmp_path / "a", second, on_progress=lambda d, t: progress.append((d, t))
    )
    assert second.blocks_asked == [3, 4, 5, 6]
    assert progress[4:] == [(3, 7), (5, 7), (6, 7), (7, 7)]

    whole = run_capture(blocks, tmp_path / "b", Teacher())
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    for i in range(7):
        assert torch.equal(resumed.targets([i]).logprobs, whole.targets([i]).logprobs)

    third = Teacher()
    run_capture(blocks, tmp_path / "a", third)
    assert third.calls == []  # complete: nothing left to ask


def test_resume_keeps_the_existing_shard_size(tmp_path: Path) -> None:
    blocks = make_blocks()
    ctx = RunContext()
    with pytest.raises(RunCancelled):
        run_capture(
            blocks, tmp_path, Teacher(on_call=lambda n: ctx.cancel() if n == 2 else None), ctx=ctx
        )
    second = Teacher()
    run_capture(blocks, tmp_path, second, shard_blocks=5)
    assert manifest(tmp_path)["shard_blocks"] == 3
    assert second.blocks_asked == [3, 4, 5, 6]


# --------------------------------------------------------------------------- stale keys


@pytest.mark.parametrize(
    ("part", "change", "words"),
    [
        ("teacher", {"teacher": "teacher-b"}, "another teacher model"),
        ("tokenizer", {"tokenizer": "tok-b"}, "another tokenizer"),
        ("k", {"k": K + 1}, f"k={K} \\(now k={K + 1}\\)"),
        ("version", {"version": 99}, "cache format 2"),
        ("codec", {"codec": "compressed"}, "the 'exact' codec \\(now 'compressed'\\)"),
    ],
)
def test_stale_key_is_refused(
    tmp_path: Path, part: str, change: dict[str, Any], words: str
) -> None:
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    stale = key_for(blocks, **change)
    with pytest.raises(StaleCacheError, match=words) as info:
        LogitCache.open(tmp_path, stale)
    assert info.value.differences == [part]
    assert "Delete that folder" in str(info.value) and "another cache folder" in str(info.value)
    teacher = Teacher(k=stale.k)
    with pytest.raises(StaleCacheError):
        run_capture(blocks, tmp_path, teacher, key=stale)
    assert teacher.calls == []


def test_stale_data_is_refused(tmp_path: Path) -> None:
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    other = make_blocks(seed=1)
    with pytest.raises(StaleCacheError, match="other training data") as info:
        run_capture(other, tmp_path, Teacher())
    assert info.value.differences == ["data"]
    with pytest.raises(StaleCacheError):
        LogitCache.open(tmp_path, key_for(other))


def test_key_must_fingerprint_the_blocks(tmp_path: Path) -> None:
    blocks = make_blocks()
    with pytest.raises(ConfigError, match="fingerprint_tokens"):
        run_capture(blocks, tmp_path, Teacher(), key=key_for(blocks, data="something-else"))


# --------------------------------------------------------------------------- tampering


def test_tampered_shard_is_refused_and_recaptured(tmp_path: Path) -> None:
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    before = shard_hashes(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one value byte: same size, still parseable
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001.*SHA-256 does not match"):
        LogitCache.open(tmp_path, key_for(blocks))

    again = Teacher()
    run_capture(blocks, tmp_path, again)
    assert again.blocks_asked == [3, 4, 5]
    assert shard_hashes(tmp_path) == before
    LogitCache.open(tmp_path, key_for(blocks))


def test_missing_or_truncated_shard_is_refused(tmp_path: Path) -> None:
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    (tmp_path / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00002.*missing"):
        LogitCache.open(tmp_path, key_for(blocks))
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CacheError, match="bytes, the manifest recorded"):
        LogitCache.open(tmp_path, key_for(blocks), allow_incomplete=True)


def test_unreadable_manifest_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="holds no logit cache"):
        LogitCache.open(tmp_path, key_for(make_blocks()))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"):
        LogitCache.open(tmp_path, key_for(make_blocks()))


# --------------------------------------------------------------------------- crafted manifests
# Issue 15, finding 8: the hash was checked on the shard named by the entry's base name,
# while the entry's full path was read; "../evil/shard-00000.safetensors" next to the
# genuine shard trained a student on poisoned targets without a warning.


def poisoned_shard(tmp_path: Path, blocks: TokenBlocks) -> Path:
    """A valid shard 0 for the same blocks from another teacher, in ``tmp_path/evil``."""

    def liar(indices: Tensor, input_ids: Tensor, attention_mask: Tensor) -> SparseTargets:
        logits = torch.stack([teacher_logits(int(i) + 777) for i in indices])
        return SparseTargets.from_logits(logits, K, input_ids)

    capture(blocks, liar, key_for(blocks), tmp_path / "evil-src", batch_size=2, shard_blocks=3)
    evil = tmp_path / "evil" / "shard-00000.safetensors"
    evil.parent.mkdir()
    evil.write_bytes((tmp_path / "evil-src" / "shard-00000.safetensors").read_bytes())
    return evil


def set_shard_entry(folder: Path, slot: int, **fields: Any) -> None:
    """Edit shard ``slot``'s manifest entry as an attacker with write access would."""
    raw = manifest(folder)
    entry = next(s for s in raw["shards"] if s["index"] == slot)
    entry.update(fields)
    (folder / MANIFEST).write_text(json.dumps(raw))


def genuine_cache(tmp_path: Path) -> tuple[TokenBlocks, Path, Path]:
    blocks = make_blocks()
    folder = tmp_path / "cache"
    run_capture(blocks, folder, Teacher())
    evil = poisoned_shard(tmp_path, blocks)
    genuine = folder / "shard-00000.safetensors"
    # the crafted shard passes every check that looks at the genuine file's size
    assert evil.stat().st_size == genuine.stat().st_size
    assert evil.read_bytes() != genuine.read_bytes()
    return blocks, folder, evil


@pytest.mark.parametrize(
    "entry",
    [
        "../evil/shard-00000.safetensors",
        "..\\evil\\shard-00000.safetensors",
        "ABSOLUTE",
        "./shard-00000.safetensors",
        "sub/../shard-00000.safetensors",
        "shard-00001.safetensors",  # another slot's file
    ],
)
def test_a_manifest_entry_naming_another_path_is_refused(
    tmp_path: Path, entry: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocks, folder, evil = genuine_cache(tmp_path)
    entry = str(evil) if entry == "ABSOLUTE" else entry
    set_shard_entry(folder, 0, file=entry)
    started = time.perf_counter()
    with pytest.raises(CacheError, match=re.escape(repr(entry))) as refused:
        LogitCache.open(folder, key_for(blocks))
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert "shard 0" in str(refused.value) and "capture" in str(refused.value)
    print(f"crafted entry {entry!r} refused in {elapsed_ms:.1f} ms")

    # a resumed capture drops the entry and re-captures shard 0 under its own name
    again = Teacher()
    with caplog.at_level("WARNING", logger="foundry.logit_cache"):
        cache = run_capture(blocks, folder, again)
    assert again.blocks_asked == [0, 1, 2]
    assert any("re-capturing" in r.message and repr(entry) in r.message for r in caplog.records)
    assert manifest(folder)["shards"][0]["file"] == "shard-00000.safetensors"
    want = expected_targets([0], blocks.input_ids[[0]], K)
    assert torch.equal(cache.targets([0]).ids, want.ids)


def test_a_shard_linked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    """The manifest's hash even matches the link's target: only confinement refuses it."""
    blocks, folder, evil = genuine_cache(tmp_path)
    link = folder / "shard-00000.safetensors"
    link.unlink()
    link.symlink_to(evil)
    set_shard_entry(
        folder, 0, sha256=hashlib.sha256(evil.read_bytes()).hexdigest(), bytes=evil.stat().st_size
    )
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors is a link to .*outside"):
        LogitCache.open(folder, key_for(blocks))


def test_a_symlinked_cache_folder_still_opens(tmp_path: Path) -> None:
    """Confinement is to the resolved folder: a cache on another disk via a link works."""
    blocks = make_blocks()
    run_capture(blocks, tmp_path / "real", Teacher())
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    cache = LogitCache.open(tmp_path / "link", key_for(blocks))
    assert torch.equal(cache.targets([4]).ids, expected_targets([4], blocks.input_ids[[4]], K).ids)


def test_a_shard_swapped_after_open_is_refused_on_first_use(tmp_path: Path) -> None:
    """What is read is what is hashed: open() verified the genuine file, then it was
    replaced by the poisoned one (same size); the first read of it is refused."""
    blocks, folder, evil = genuine_cache(tmp_path)
    cache = LogitCache.open(folder, key_for(blocks))
    cache.targets([4])  # shard 1 is mapped and verified; shard 0 not yet
    evil.replace(folder / "shard-00000.safetensors")
    started = time.perf_counter()
    with pytest.raises(CacheError, match=r"shard-00000.*SHA-256 does not match"):
        cache.targets([0])
    print(f"swapped shard refused on first use in {(time.perf_counter() - started) * 1000:.1f} ms")
    assert torch.equal(cache.targets([4]).ids, expected_targets([4], blocks.input_ids[[4]], K).ids)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("index", "0", "index must be a non-negative integer"),
        ("file", ["shard-00000.safetensors"], "file must be a string"),
        ("sha256", "../../etc/passwd", "sha256 must be 64 lowercase hex digits"),
        ("bytes", -1, "bytes must be a non-negative integer"),
    ],
)
def test_malformed_shard_entries_are_an_unreadable_manifest(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    set_shard_entry(tmp_path, 0, **{field: value})
    with pytest.raises(CacheError, match=rf"unreadable.*{re.escape(message)}"):
        LogitCache.open(tmp_path, key_for(blocks))


def test_a_shard_whose_header_lies_about_its_tensors_is_refused(tmp_path: Path) -> None:
    """A shard with a consistent manifest hash but offsets past its end is refused
    before any tensor is viewed (the parser checks every extent)."""
    blocks = make_blocks()
    run_capture(blocks, tmp_path, Teacher())
    shard = tmp_path / "shard-00000.safetensors"
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__")
    header["ids"]["data_offsets"][1] += 10**9
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    crafted = data[:8] + text + data[8 + length :]
    shard.write_bytes(crafted)
    set_shard_entry(tmp_path, 0, sha256=hashlib.sha256(crafted).hexdigest())
    cache = LogitCache.open(tmp_path, key_for(blocks))
    with pytest.raises(CacheError, match="tensor 'ids' lies outside the file"):
        cache.targets([0])


# --------------------------------------------------------------------------- size, atomicity


def _header_bytes(path: Path) -> int:
    """safetensors layout: 8-byte little-endian header length, then the JSON header."""
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + int(length)


@pytest.mark.parametrize("labels", [True, False])
def test_bytes_per_token_formula(tmp_path: Path, labels: bool) -> None:
    blocks = make_blocks()
    cache = run_capture(blocks, tmp_path, Teacher(labels=labels))
    tokens = 7 * SEQ
    per_token = K * (2 + 2) + 4 + (4 if labels else 0)  # u16 ids, f16 values, f32 tail[, label]
    headers = sum(_header_bytes(p) for p in tmp_path.glob("shard-*.safetensors"))
    assert cache.bytes_per_token == pytest.approx(
        (tokens * per_token + headers) / tokens, abs=1e-12
    )
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.safetensors"))
    assert cache.bytes_per_token == pytest.approx(on_disk / tokens, abs=1e-12)


def test_crash_in_teacher_leaves_a_valid_manifest(tmp_path: Path) -> None:
    blocks = make_blocks()

    def crash(n: int) -> None:
        if n == 4:
            raise RuntimeError("teacher fell over")

    with pytest.raises(RuntimeError, match="fell over"):
        run_capture(blocks, tmp_path, Teacher(on_call=crash))
    assert temp_files(tmp_path) == []
    m = manifest(tmp_path)
    assert m["complete"] is False and len(m["shards"]) == 1
    partial = LogitCache.open(tmp_path, key_for(blocks), allow_incomplete=True)
    assert partial.targets([2]).ids.shape == (1, SEQ, K)
    with pytest.raises(CacheError, match="never captured"):
        partial.targets([3])

    # A kill -9 mid-write would leave a temp file; the next capture sweeps it away.
    (tmp_path / ".shard-00001.safetensors.deadbeef.tmp").write_bytes(b"half a shard")
    (tmp_path / ".manifest.json.cafebabe.tmp").write_text("{")
    run_capture(blocks, tmp_path, Teacher())
    assert temp_files(tmp_path) == []
    assert LogitCache.open(tmp_path, key_for(blocks)).complete


# --------------------------------------------------------------------------- teacher output checks


def test_teacher_output_is_validated(tmp_path: Path) -> None:
    blocks = make_blocks()
    with pytest.raises(ModelError, match=r"shape \(2, 6, 5\).*expected \[2, positions, 8\]"):
        run_capture(blocks, tmp_path / "k", Teacher(k=5), key=key_for(blocks, k=K))
    flip = Teacher(on_call=lambda n: setattr(flip, "labels", n == 1))
    with pytest.raises(ModelError, match="inconsistent with earlier batches"):
        run_capture(blocks, tmp_path / "labels", flip)
    with pytest.raises(ModelError, match=r"token ids in \[.*expected \[0, 100\)"):
        run_capture(blocks, tmp_path / "vocab", Teacher(), vocab_size=100)


def test_bad_arguments_and_indices(tmp_path: Path) -> None:
    blocks = make_blocks()
    with pytest.raises(ConfigError, match="batch_size"):
        run_capture(blocks, tmp_path, Teacher(), batch_size=0)
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        key_for(blocks, k=0)
    cache = run_capture(blocks, tmp_path, Teacher())
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        cache.targets([7])


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_tokens() -> None:
    blocks = make_blocks()
    base = fingerprint_tokens(blocks)
    same = TokenBlocks(blocks.input_ids.int(), blocks.attention_mask.int(), blocks.labels)
    assert fingerprint_tokens(same) == base
    ids = blocks.input_ids.clone()
    ids[3, 2] += 1
    assert fingerprint_tokens(TokenBlocks(ids, blocks.attention_mask, blocks.labels)) != base
    mask = blocks.attention_mask.clone()
    mask[0, 0] = 0
    assert fingerprint_tokens(TokenBlocks(blocks.input_ids, mask, blocks.labels)) != base
    flat = blocks.input_ids.reshape(1, -1)
    reshaped = TokenBlocks(flat, blocks.attention_mask.reshape(1, -1), flat)
    assert fingerprint_tokens(reshaped) != base


def test_fingerprint_model_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * (3 * 4096 + 7))  # ~3 MiB: head, middle, tail
    base = fingerprint_model_dir(tmp_path)
    assert fingerprint_model_dir(tmp_path) == base

    def changed_at(offset: int) -> str:
        data = bytearray(weights.read_bytes())
        data[offset] ^= 1
        weights.write_bytes(bytes(data))
        try:
            return fingerprint_model_dir(tmp_path)
        finally:
            data[offset] ^= 1
            weights.write_bytes(bytes(data))

    size = weights.stat().st_size
    assert changed_at(10) != base
    assert changed_at(size - 1) != base
    assert changed_at(size // 2) == base  # documented: the middle is not read
    (tmp_path / "config.json").write_text('{"hidden_size": 9}')
    assert fingerprint_model_dir(tmp_path) != base
    weights.unlink()
    with pytest.raises(ModelError, match=r"no \*\.safetensors or \*\.bin"):
        fingerprint_model_dir(tmp_path)
    with pytest.raises(ModelError, match=r"no config\.json"):
        fingerprint_model_dir(tmp_path / "nowhere")


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int], eos: str = "</s>") -> None:
        self.vocab, self.eos_token = vocab, eos
        self.all_special_tokens = [eos]

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_fingerprint_tokenizer() -> None:
    vocab = {"a": 0, "b": 1, "</s>": 2, "<pad>": 3}
    base = fingerprint_tokenizer(FakeTokenizer(vocab))
    assert fingerprint_tokenizer(FakeTokenizer(dict(reversed(vocab.items())))) == base
    assert fingerprint_tokenizer(FakeTokenizer({**vocab, "c": 4})) != base
    assert fingerprint_tokenizer(FakeTokenizer({**vocab, "a": 1, "b": 0})) != base
    assert fingerprint_tokenizer(FakeTokenizer(vocab, eos="<pad>")) != base


def test_key_digest_is_stable_and_key_specific() -> None:
    blocks = make_blocks()
    key = key_for(blocks)
    assert key.digest() == key_for(blocks).digest() and len(key.digest()) == 16
    assert key.digest() != key_for(blocks, k=K + 1).digest()


# --------------------------------------------------------------------------- read-ahead


class _Live:
    """The live side of a CachedTeacher, never asked in these tests."""

    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_read_ahead_answers_like_a_direct_read_and_raises_its_errors_there(
    tmp_path: Path,
) -> None:
    """``CachedTeacher.prefetch`` decodes on its reader thread; ``signal`` then returns that
    very answer (equal to a direct read), still answers blocks never announced, raises a
    read-ahead's error itself (a shard swapped after open), and ``close`` stops the thread."""
    from foundry_kernel.teachers._interface import CachedTeacher

    blocks, folder, evil = genuine_cache(tmp_path)
    cache = LogitCache.open(folder, key_for(blocks))
    live = _Live()
    teacher = CachedTeacher(cache, live)  # type: ignore[arg-type]
    ids, mask = blocks.input_ids, blocks.attention_mask
    index = torch.tensor([4, 5])
    teacher.prefetch(index)
    ahead = teacher.signal(index, ids[index], mask[index])
    assert not teacher._ahead  # the read-ahead was used, not a second read
    direct = cache.targets(index)
    assert torch.equal(ahead.ids, direct.ids) and torch.equal(ahead.logprobs, direct.logprobs)
    never = teacher.signal(torch.tensor([3]), ids[[3]], mask[[3]])
    assert torch.equal(never.ids, cache.targets([3]).ids)
    assert cache.shards_read == {1: 1}  # one thread or two, the shard was read once
    evil.replace(folder / "shard-00000.safetensors")
    teacher.prefetch(torch.tensor([0]))
    with pytest.raises(CacheError, match=r"shard-00000.*SHA-256 does not match"):
        teacher.signal(torch.tensor([0]), ids[[0]], mask[[0]])
    reader = teacher._reader
    assert reader is not None
    teacher.close()
    assert teacher._reader is None and live.closed
    with pytest.raises(RuntimeError, match="shutdown"):
        reader.submit(int)


def test_read_ahead_forgets_announcements_never_asked_for(tmp_path: Path) -> None:
    from foundry_kernel.teachers._interface import CachedTeacher

    blocks, folder, _ = genuine_cache(tmp_path)
    teacher = CachedTeacher(LogitCache.open(folder, key_for(blocks)), _Live())  # type: ignore[arg-type]
    teacher.max_ahead = 2
    for i in range(5):
        teacher.prefetch(torch.tensor([i]))
    assert list(teacher._ahead) == [(3,), (4,)]
    teacher.close()


def test_the_capture_counts_its_blocks_as_the_runs_progress(tmp_path: Path) -> None:
    """Each batch is the run's ``n/N blocks`` (a ``count`` event), so the capture phase's
    progress line moves; a reused cache says at once that it holds every block."""
    from foundry_kernel.progress import ProgressTracker, RunPlan, format_progress

    events: list[Any] = []
    ctx = RunContext(sink=events.append)
    ctx.set_phase("capture")
    blocks = make_blocks(n=7)
    run_capture(blocks, tmp_path, Teacher(), ctx=ctx)
    counts = [e.payload for e in events if e.kind == "count"]
    assert counts[0]["done"] == 0 and counts[-1]["done"] == 7  # first and last always
    assert {(c["unit"], c["total"], c["phase"]) for c in counts} == {("blocks", 7, "capture")}
    assert [c["done"] for c in counts] == sorted(c["done"] for c in counts)
    tracker = ProgressTracker("r", RunPlan(max_steps=10, eval_every=5))
    shown = []
    for e in events:
        tracker.observe(e.kind, e.payload, e.time)
        if e.kind == "count" and e.payload["done"] < 7:
            shown.append(format_progress(tracker.snapshot(e.time)))
    assert shown and all(re.match(r"capture · \d/7 blocks", x) for x in shown), shown
    events.clear()
    ctx.set_phase("capture")
    run_capture(blocks, tmp_path, Teacher(), ctx=ctx)  # all cached: nothing asked
    assert [e.payload["done"] for e in events if e.kind == "count"] == [7]
