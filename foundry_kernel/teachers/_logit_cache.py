"""Offline logit cache: capture a teacher's top-k once, train any number of students on it.

Running the teacher is usually the expensive half of distillation. ``capture`` runs it
once over a fixed set of ``TokenBlocks`` and stores, per block and position, its top-k
token ids and log-probabilities (plus the tail mass and, when the teacher gives it, the
log-probability of the true next token). ``LogitCache`` then serves those as
:class:`~foundry_kernel.teachers._targets.SparseTargets` for any batch of block indices, for any
number of epochs and students, without the teacher loaded.

Layout of a cache folder::

    manifest.json             key (with the codec's name), shape, the codec's parameters,
                              the completed shards with SHA-256 + size
    shard-00000.safetensors   blocks [0, shard_blocks), encoded by the codec
    shard-00001.safetensors   ...

Format 2 (``CACHE_FORMAT_VERSION``): each cache has a codec (``CacheKey.codec``, from
``distill.cache_codec``), see :mod:`foundry_kernel.teachers._cache_codec` for the layouts and
their error bounds. Per shard of ``n`` blocks with ``P`` positions each:

* ``compressed`` (the default, ~137 B/token at k=128 on the built-in teacher): ``payload``
  uint8 (per block, two raw-deflate streams: the sorted ids' gaps as byte planes, and one
  companded byte per log-probability in id order), ``streams`` int64 ``[n, 2]`` (the
  streams' lengths), ``id_bytes`` int64 ``[1]``, ``tail`` uint16 ``[n, P]`` (the smaller of
  log top-k mass and log tail mass on a 2^-10 grid, with a flag), ``label`` fp16 ``[n, P]``
  (optional). Ids exact; log-probabilities within the codec's documented bound.
* ``exact`` (format 1's tensors): ``ids`` ``[n, P, k]`` uint16 when every id fits (vocab <=
  65536), else int32; ``values`` ``[n, P, k]`` float16 top-k log-probabilities; ``tail``
  ``[n, P]`` float32 log of the mass outside the top-k, computed from the teacher's fp32
  values *before* rounding (re-summing rounded values could miss a small tail entirely);
  ``label`` ``[n, P]`` float32, optional, the teacher's log p of the true next token.

Every shard's safetensors metadata records the format version and the codec's parameters
(the SHA-256 covers them); a shard whose record differs from the manifest's is refused on
first use, so an edited codec field cannot make a shard decode under wrong parameters.
Format 1 (no codec field; the exact layout) is still read by :meth:`LogitCache.open`;
capturing into a format-1 folder, or opening any other format, is refused naming the
format.

Robustness: every shard is written atomically (temp file + ``os.replace``) and then the
manifest is rewritten atomically to list it, so a crash or cancel at any point leaves a
valid manifest naming only complete shards, and ``capture`` resumes after them. Shards are
checked against their recorded SHA-256 on resume and on open: on open a mismatch is
refused, on resume the shard is captured again. Only safetensors and JSON are ever
parsed: nothing in a cache folder can execute code.

The manifest is input, not trusted: a shard entry must name exactly the file its index
is written to (``shard-00003.safetensors``; no folders, ``..`` or absolute paths) and that
name, symlinks resolved, must stay inside the cache folder. Training reads a shard
through one memory map whose every byte is hashed before the first tensor is taken from
it, so the bytes checked are the bytes used (a shard replaced after ``open`` is refused
on first use, not trusted because an earlier read of it matched).

Data parallelism (``capture(..., world=)``): the folder must be one that every rank sees
(a shared filesystem). Rank ``r`` captures the shards ``index % world_size == r`` and lists
each one it finishes in its own part file ``.part-<r>.json`` (never in the manifest, which
only rank 0 writes); rank 0 merges the parts into the manifest last, once every rank said it
finished, and the others wait for that complete manifest. All waits poll files with a stop
point each time, never a collective, and fail a rank whose part file stops changing for
``stall_s``. A capture interrupted under any world size resumes under any other: rank 0
folds the verified shards of old part files into the manifest before anyone starts.
Training opens the cache with ``verify="lazy"`` so that a rank hashes (and reads) only the
shards its own batches use; :attr:`LogitCache.shards_read` says which those were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor

from foundry_kernel._world import World
from foundry_kernel.atomic import atomic_write_bytes, atomic_write_text
from foundry_kernel.errors import CacheError, ConfigError, ModelError, StaleCacheError
from foundry_kernel.teachers._cache_codec import (
    CODEC_NAMES,
    DEFAULT_CODEC,
    BlockReader,
    Codec,
    ExactCodec,
    codec_from_params,
    codec_named,
)
from foundry_kernel.teachers._targets import SparseTargets

if TYPE_CHECKING:
    from foundry_kernel._context import RunContext
    from foundry_kernel.data._blocks import TokenBlocks

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheKey",
    "LogitCache",
    "TeacherFn",
    "capture",
    "fingerprint_model_dir",
    "fingerprint_tokenizer",
    "fingerprint_tokens",
]

log = logging.getLogger("foundry.logit_cache")

CACHE_FORMAT_VERSION = 2
_V1 = 1  # format 1: no codec field, the exact layout; still read
MANIFEST = "manifest.json"
_FORMAT_NAME = "foundry-logit-cache"
_MIB = 2**20
_HASH_CHUNK = 8 * _MIB
_FINGERPRINT_ROWS = 4096  # token rows hashed per step, so hashing never copies the data set
_PART = ".part-{rank}.json"
_POLL_S = 0.2
_ONE_PROCESS = World()
STALL_S = 600.0
"""A rank whose capture part file has not changed for this long is taken as lost."""

TeacherFn = Callable[[Tensor, Tensor, Tensor], SparseTargets]
"""``teacher_fn(indices, input_ids, attention_mask)`` -> top-k targets for those blocks."""


# --------------------------------------------------------------------------- key


@dataclass(frozen=True)
class CacheKey:
    """What a cache's contents depend on; a cache is only reused under an equal key.

    ``teacher``, ``tokenizer`` and ``data`` are fingerprints (see the ``fingerprint_*``
    helpers); ``codec`` is how shards store the targets (``compressed`` or ``exact``, see
    ``_cache_codec``); ``version`` is the on-disk format, bumped when the layout changes.
    """

    teacher: str
    tokenizer: str
    data: str
    k: int
    version: int = CACHE_FORMAT_VERSION
    codec: str = DEFAULT_CODEC

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"cache k must be a positive integer, got {self.k!r}", field="k")
        if self.codec not in CODEC_NAMES:
            raise ConfigError(
                f"cache codec must be one of {list(CODEC_NAMES)}, got {self.codec!r}",
                field="codec",
            )

    def digest(self) -> str:
        """A short stable id of the whole key (16 hex digits), e.g. to name its cache folder:
        a folder per key means a changed teacher or data set never meets a stale cache."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: CacheKey) -> list[str]:
        """Names of the fields where ``other`` differs from this key."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_dict(cls, raw: Any) -> CacheKey:
        """Parse a manifest's key; a malformed one is a corrupt cache, not a crash."""
        try:
            version = int(raw["version"])
            return cls(
                teacher=str(raw["teacher"]),
                tokenizer=str(raw["tokenizer"]),
                data=str(raw["data"]),
                k=int(raw["k"]),
                version=version,
                # format 1 had one layout, the one the exact codec still writes
                codec=str(raw["codec"]) if version != _V1 else "exact",
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CacheError(f"logit cache manifest has a malformed key: {exc}") from exc


# --------------------------------------------------------------------------- fingerprints


def fingerprint_tokens(blocks: TokenBlocks) -> str:
    """SHA-256 over the blocks' ``input_ids`` and ``attention_mask`` (values and shapes).

    Values are hashed as little-endian int64 whatever the stored dtype, so an int32 copy
    of the same tokens has the same fingerprint. Labels are left out: the teacher never
    sees them (its label log-probabilities follow ``input_ids``).
    """
    digest = hashlib.sha256(b"foundry-tokens-v1\0")
    for name, tensor in (
        ("input_ids", blocks.input_ids),
        ("attention_mask", blocks.attention_mask),
    ):
        digest.update(f"{name}{tuple(tensor.shape)}\0".encode())
        for start in range(0, int(tensor.shape[0]), _FINGERPRINT_ROWS):
            rows = tensor[start : start + _FINGERPRINT_ROWS].to("cpu", torch.int64)
            digest.update(rows.contiguous().numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def fingerprint_model_dir(path: Path) -> str:
    """SHA-256 over ``config.json`` and, per weight file, its name, size and end samples.

    Each ``*.safetensors`` / ``*.bin`` file contributes its name, byte size and the SHA-256
    of its first and last MiB. Not the whole file, because teachers are tens to hundreds
    of GB and hashing them would cost minutes on every capture and open. The samples still
    catch what actually happens: another checkpoint or revision (different size, or a
    different safetensors header, which sits in the first MiB and lists every tensor's
    name, dtype, shape and offset) and re-quantisation (different size and header). What it
    would miss is an edit of the same size in the middle of a file, i.e. deliberate
    tampering, which the cache does not defend against.
    """
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"cannot fingerprint teacher {path}: it has no config.json")
    weights = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in {".safetensors", ".bin"}
    )
    if not weights:
        raise ModelError(
            f"cannot fingerprint teacher {path}: no *.safetensors or *.bin weight files"
        )
    digest = hashlib.sha256(b"foundry-model-v1\0")
    digest.update(config.read_bytes())
    for weight in weights:
        size = weight.stat().st_size
        head, tail = _end_digests(weight, size)
        digest.update(f"\0{weight.name}\0{size}\0{head}\0{tail}".encode())
    return digest.hexdigest()


def _end_digests(path: Path, size: int) -> tuple[str, str]:
    """SHA-256 of the first and of the last MiB of a file (the same bytes when it is small)."""
    with path.open("rb") as handle:
        head = handle.read(_MIB)
        handle.seek(max(size - _MIB, 0))
        tail = handle.read(_MIB)
    return hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()


class _Tokenizer(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def fingerprint_tokenizer(tokenizer: _Tokenizer) -> str:
    """SHA-256 of the sorted vocabulary (token, id) items and the special tokens.

    The special tokens are hashed with their roles (bos/eos/unk/pad) as well as the full
    ``all_special_tokens`` list: the same vocabulary with another end-of-text token would
    produce different blocks and different teacher outputs.
    """
    roles = {role: _token_text(getattr(tokenizer, role, None)) for role in _SPECIAL_ROLES}
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", None) or [])
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "roles": roles,
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(b"foundry-tokenizer-v1\0" + text.encode("utf-8")).hexdigest()


def _token_text(token: object) -> str | None:
    return None if token is None else str(token)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class _Shard:
    """One completed shard as the manifest records it."""

    index: int
    file: str
    start: int
    stop: int
    sha256: str
    bytes: int


@dataclass
class _Manifest:
    """The cache's table of contents; rewritten atomically after every shard."""

    key: CacheKey
    num_blocks: int
    seq_len: int
    shard_blocks: int
    vocab_size: int | None
    positions: int | None = None  # per block; known once the teacher has answered
    has_label: bool | None = None
    shards: dict[int, _Shard] = field(default_factory=dict)
    complete: bool = False
    codec: Codec = field(default_factory=ExactCodec)  # what the shards are written with

    @classmethod
    def fresh(cls, layout: _Layout) -> _Manifest:
        """A new manifest for ``layout``, its shards written with today's codec."""
        return cls(
            layout.key,
            layout.num_blocks,
            layout.seq_len,
            layout.shard_blocks,
            layout.vocab_size,
            codec=codec_named(layout.key.codec),
        )

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_blocks / self.shard_blocks)

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_blocks
        return start, min(start + self.shard_blocks, self.num_blocks)

    def to_json(self) -> str:
        body = {
            "format": _FORMAT_NAME,
            "key": asdict(self.key),
            "k": self.key.k,
            "num_blocks": self.num_blocks,
            "seq_len": self.seq_len,
            "positions": self.positions,
            "shard_blocks": self.shard_blocks,
            "vocab_size": self.vocab_size,
            "codec": self.codec.params(),
            "has_label": self.has_label,
            "shards": [asdict(s) for _, s in sorted(self.shards.items())],
            "complete": self.complete,
        }
        return json.dumps(body, indent=1)

    @classmethod
    def read(cls, folder: Path) -> _Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise CacheError(f"{folder} holds no logit cache ({MANIFEST} is missing)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != _FORMAT_NAME:
                raise ValueError(f"format is {raw.get('format')!r}, not {_FORMAT_NAME!r}")
            shards = [_shard_from_json(s) for s in raw["shards"]]
            key = CacheKey.from_dict(raw["key"])
            return cls(
                key=key,
                num_blocks=int(raw["num_blocks"]),
                seq_len=int(raw["seq_len"]),
                shard_blocks=int(raw["shard_blocks"]),
                vocab_size=_optional_int(raw["vocab_size"]),
                positions=_optional_int(raw["positions"]),
                has_label=None if raw["has_label"] is None else bool(raw["has_label"]),
                shards={s.index: s for s in shards},
                complete=bool(raw["complete"]),
                codec=_manifest_codec(key, raw),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CacheError(f"logit cache manifest {path} is unreadable: {exc}") from exc

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / MANIFEST, self.to_json())


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _manifest_codec(key: CacheKey, raw: dict[str, Any]) -> Codec:
    """The codec a manifest records; format 1 predates the field (its layout is exact's).

    The record must name the key's codec: a codec field edited apart from the key (or
    the key apart from it) is refused here, and a parameter edited in the manifest only is
    refused when a shard, whose metadata records its own, is first read."""
    if key.version == _V1:
        return ExactCodec()
    codec = codec_from_params(raw["codec"])
    if codec.name != key.codec:
        raise ValueError(f"its codec {codec.name!r} is not its key's codec {key.codec!r}")
    return codec


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _shard_from_json(raw: Any) -> _Shard:
    """One manifest shard entry with its types checked (a string index or a list as a file
    name would otherwise surface later as a confusing error, or not at all)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a shard entry must be an object, got {raw!r}")
    shard = _Shard(**raw)
    for name in ("index", "start", "stop", "bytes"):
        value = getattr(shard, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"shard entry {raw!r}: {name} must be a non-negative integer")
    if not isinstance(shard.file, str):
        raise ValueError(f"shard entry {raw!r}: file must be a string")
    if not isinstance(shard.sha256, str) or not _SHA256_HEX.fullmatch(shard.sha256):
        raise ValueError(f"shard entry {raw!r}: sha256 must be 64 lowercase hex digits")
    return shard


def _check_key(found: CacheKey, wanted: CacheKey, folder: Path) -> None:
    """Refuse a cache captured under another key, naming what differs and the fix."""
    diffs = wanted.differences(found)
    if not diffs:
        return
    what = {
        "teacher": "another teacher model",
        "tokenizer": "another tokenizer",
        "data": "other training data (token blocks)",
        "k": f"k={found.k} (now k={wanted.k})",
        "version": f"cache format {found.version} (this Foundry writes {wanted.version})",
        "codec": f"the {found.codec!r} codec (now {wanted.codec!r})",
    }
    raise StaleCacheError(
        f"the logit cache in {folder} was captured for {', '.join(what[d] for d in diffs)}; "
        "it cannot be reused. Delete that folder to capture again, or use another cache "
        "folder.",
        differences=diffs,
    )


def _check_readable_key(found: CacheKey, wanted: CacheKey, folder: Path) -> None:
    """As :func:`_check_key`, except that a format-1 cache of an otherwise equal key is
    read (it is exact-codec data, whatever codec the caller would capture with now)."""
    if found.version == _V1 and set(wanted.differences(found)) <= {"version", "codec"}:
        log.info("reading %s: a format-%d logit cache (exact layout)", folder, _V1)
        return
    _check_key(found, wanted, folder)


def _shard_name(index: int) -> str:
    """The one file name a shard of this index is ever written to."""
    return f"shard-{index:05d}.safetensors"


def _shard_path(folder: Path, shard: _Shard) -> Path:
    """The shard's file, resolved once and confined to ``folder``; CacheError otherwise.

    Why so strict: the manifest is data anyone with write access to the folder (a shared
    cache, a copied archive) can edit. The entry must name exactly the file its index is
    written to, so separators, ``..``, drive letters and absolute paths are all refused
    by one comparison; then symlinks are resolved and the target must still sit directly
    in the (resolved) cache folder. Every later read uses the returned path.
    """
    expected = _shard_name(shard.index)
    if shard.file != expected:
        raise CacheError(
            f"logit cache manifest in {folder}: shard {shard.index}'s entry names file "
            f"{shard.file!r}, but shard {shard.index} can only be {expected!r} in the cache "
            "folder itself (no folders, '..' or absolute paths). The manifest was edited or "
            "crafted; delete the folder and capture again."
        )
    path = folder / expected
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise CacheError(f"logit cache shard {path}: the file is missing") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop is a RuntimeError before 3.13
        raise CacheError(f"logit cache shard {path} cannot be resolved: {exc}") from exc
    home = folder.resolve()
    if resolved.parent != home:
        raise CacheError(
            f"logit cache shard {path} is a link to {resolved}, outside the cache folder "
            f"{home}; refusing to read it. Delete the link and capture again."
        )
    return resolved


def _map_verified(path: Path, shard: _Shard) -> mmap.mmap:
    """Map the shard's file and hash every mapped byte; the caller reads only this map.

    ``ACCESS_COPY``: the map is private (writes would never reach the file) and writable,
    so torch can view it without copying and without warning about read-only memory.
    """
    size = path.stat().st_size
    if size != shard.bytes:
        raise CacheError(
            f"logit cache shard {path}: it has {size} bytes, the manifest recorded {shard.bytes}"
        )
    if size == 0:
        raise CacheError(f"logit cache shard {path} is empty")
    with path.open("rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(view) != shard.bytes or hashlib.sha256(view).hexdigest() != shard.sha256:
        view.close()
        raise CacheError(
            f"logit cache shard {path}: its SHA-256 does not match the manifest "
            "(modified or damaged on disk)"
        )
    return view


def _shard_problem(folder: Path, shard: _Shard, manifest: _Manifest) -> str | None:
    """Why a recorded shard cannot be trusted, or None when it is intact."""
    if (shard.start, shard.stop) != manifest.shard_range(shard.index):
        return (
            f"manifest entry {shard.file!r} claims blocks [{shard.start}, {shard.stop}), "
            f"not those of shard {shard.index}"
        )
    try:
        _map_verified(_shard_path(folder, shard), shard).close()
    except CacheError as exc:
        return str(exc)
    return None


def _shard_layout_problem(folder: Path, shard: _Shard, manifest: _Manifest) -> str | None:
    """The cheap checks of :func:`_shard_problem` (range, name, confinement, size), without
    reading the file: its hash is checked when it is first used."""
    if (shard.start, shard.stop) != manifest.shard_range(shard.index):
        return f"manifest entry {shard.file!r} claims blocks other than shard {shard.index}'s"
    try:
        path = _shard_path(folder, shard)
    except CacheError as exc:
        return str(exc)
    size = path.stat().st_size
    return None if size == shard.bytes else f"shard {path} has {size} bytes, not {shard.bytes}"


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8,
    "U16": torch.uint16,
    "I64": torch.int64,
    "I32": torch.int32,
    "F16": torch.float16,
    "F32": torch.float32,
}
"""The dtypes a shard is written with (see the module docstring); nothing else is read."""
_MAX_HEADER = 1 * _MIB


def _tensors_in(view: mmap.mmap, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a safetensors file held in ``view``, as zero-copy views into it, and
    its ``__metadata__`` (string values; empty when there is none).

    The format: 8 bytes little-endian header length, a JSON header naming each tensor's
    dtype, shape and ``[begin, end)`` offsets into the data that follows. Parsed here
    (rather than ``safe_open``, which opens the file by name again) so that what is read
    is exactly what was hashed; every offset and size is checked before it is used.
    """
    if len(view) < 8:
        raise CacheError(f"logit cache shard {path} is too short to be a safetensors file")
    length = int.from_bytes(view[:8], "little")
    if not 2 <= length <= min(_MAX_HEADER, len(view) - 8):
        raise CacheError(f"logit cache shard {path} has a malformed safetensors header")
    try:
        header = json.loads(view[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"logit cache shard {path}: unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise CacheError(f"logit cache shard {path}: the header is not a JSON object")
    base, data_size = 8 + length, len(view) - 8 - length
    tensors: dict[str, Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_view(view, path, name, entry, base, data_size)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CacheError(f"logit cache shard {path}: its metadata is not a JSON object")
    return tensors, metadata


def _tensor_view(
    view: mmap.mmap, path: Path, name: str, entry: Any, base: int, data_size: int
) -> Tensor:
    """One header entry as a tensor over ``view``, after checking its dtype and extent."""
    where = f"logit cache shard {path}: tensor {name!r}"
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{where} has a malformed header entry: {exc!r}") from exc
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size:
        raise CacheError(f"{where} lies outside the file")
    if end - begin != numel * itemsize:
        raise CacheError(f"{where}: {end - begin} bytes cannot hold shape {shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=dtype, count=numel, offset=base + begin).reshape(shape)


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class _Layout:
    """What the caller asked for; checked against an existing manifest on resume."""

    key: CacheKey
    num_blocks: int
    seq_len: int
    shard_blocks: int
    vocab_size: int | None


def capture(
    blocks: TokenBlocks,
    teacher_fn: TeacherFn,
    key: CacheKey,
    folder: Path,
    *,
    batch_size: int,
    shard_blocks: int,
    ctx: RunContext | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    vocab_size: int | None = None,
    world: World = _ONE_PROCESS,
    stall_s: float = STALL_S,
) -> LogitCache:
    """Run ``teacher_fn`` over every block not yet cached in ``folder``; return the cache.

    Under a distributed ``world`` every rank calls it with the same blocks and key and
    captures its own shards (see the module docstring); ``on_progress`` then counts this
    rank's blocks only.

    ``teacher_fn(indices, input_ids, attention_mask)`` gets ``batch_size`` blocks at a time
    (int64 block indices and their rows) and returns their top-``key.k`` targets, called
    under ``torch.no_grad()``. ``key.data`` must be ``fingerprint_tokens(blocks)``.

    Resumable: a folder whose manifest has the same key keeps its verified shards and
    continues with the missing ones (a shard whose hash no longer matches is captured
    again); a manifest with another key raises :class:`StaleCacheError`. ``ctx.check()``
    runs before every teacher call, so a cancel stops within one batch and leaves every
    completed shard usable. A shard (``shard_blocks`` blocks) is held in memory until it
    is written; ``on_progress(done_blocks, total_blocks)`` follows every batch.

    ``vocab_size``, when given, is checked against every id and recorded; ids are stored
    as uint16 whenever they fit.
    """
    _check_capture_args(blocks, key, batch_size, shard_blocks, vocab_size)
    layout = _Layout(key, len(blocks), blocks.seq_len, shard_blocks, vocab_size)
    if world.distributed:
        return _capture_distributed(
            blocks, teacher_fn, folder, layout, batch_size, ctx, on_progress, world, stall_s
        )
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(folder)
    manifest = _resume_or_start(folder, layout)
    progress = _Progress(on_progress, len(blocks), ctx)
    progress.advance(sum(s.stop - s.start for s in manifest.shards.values()))
    for index in range(manifest.num_shards):
        if index in manifest.shards:
            continue
        start, stop = manifest.shard_range(index)
        arrays = _capture_range(
            blocks, teacher_fn, manifest, (start, stop), batch_size, ctx, progress
        )
        manifest.shards[index] = _write_shard(folder, index, (start, stop), arrays, manifest)
        manifest.complete = len(manifest.shards) == manifest.num_shards
        manifest.write(folder)
    if not manifest.complete:  # nothing was missing, but the flag was never set (or reset)
        manifest.complete = True
        manifest.write(folder)
    return LogitCache(folder, manifest)


def _capture_distributed(
    blocks: TokenBlocks,
    teacher_fn: TeacherFn,
    folder: Path,
    layout: _Layout,
    batch_size: int,
    ctx: RunContext | None,
    on_progress: Callable[[int, int], None] | None,
    world: World,
    stall_s: float,
) -> LogitCache:
    """Each rank captures its shards (``index % world_size == rank``); rank 0 writes the
    manifest last. See the module docstring."""
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(folder)
        manifest = _resume_or_start(folder, layout)
        _fold_parts(folder, manifest)
        manifest.complete = len(manifest.shards) == manifest.num_shards
        manifest.write(folder)
    # The one collective: what is done already, and the layout rank 0 resumed with (its
    # shard size wins on resume). Every rank is here within moments of the others.
    head = world.broadcast_object(_manifest_head(manifest) if world.is_main else None)
    if not world.is_main:
        manifest = _manifest_from_head(head, layout.key, folder)
    mine = [i for i in range(manifest.num_shards) if i % world.world_size == world.rank]
    todo = [i for i in mine if i not in manifest.shards]
    progress = _Progress(on_progress, sum(_span_len(manifest, i) for i in mine), ctx)
    progress.advance(sum(_span_len(manifest, i) for i in mine if i in manifest.shards))
    done: dict[int, _Shard] = {}
    part = folder / _PART.format(rank=world.rank)
    _write_part(part, done, manifest, finished=False)
    for index in todo:
        span = manifest.shard_range(index)
        arrays = _capture_range(blocks, teacher_fn, manifest, span, batch_size, ctx, progress)
        done[index] = _write_shard(folder, index, span, arrays, manifest)
        _write_part(part, done, manifest, finished=False)
    _write_part(part, done, manifest, finished=True)
    log.info("rank %d captured shards %s", world.rank, sorted(done))
    if world.is_main:
        _merge_when_finished(folder, manifest, world, ctx, stall_s)
        return LogitCache(folder, manifest)
    _wait_for_manifest(folder, layout.key, world, ctx, stall_s)
    return LogitCache.open(folder, layout.key, verify="lazy")


def _span_len(manifest: _Manifest, index: int) -> int:
    start, stop = manifest.shard_range(index)
    return stop - start


def _manifest_head(manifest: _Manifest) -> dict[str, Any]:
    """The manifest as plain data (for the broadcast to the other ranks)."""
    return json.loads(manifest.to_json())


def _manifest_from_head(head: dict[str, Any], key: CacheKey, folder: Path) -> _Manifest:
    parsed = CacheKey.from_dict(head["key"])
    manifest = _Manifest(
        key=parsed,
        num_blocks=int(head["num_blocks"]),
        seq_len=int(head["seq_len"]),
        shard_blocks=int(head["shard_blocks"]),
        vocab_size=_optional_int(head["vocab_size"]),
        positions=_optional_int(head["positions"]),
        has_label=head["has_label"],
        shards={s["index"]: _shard_from_json(s) for s in head["shards"]},
        complete=bool(head["complete"]),
        codec=_manifest_codec(parsed, head),
    )
    _check_key(manifest.key, key, folder)
    return manifest


def _write_part(
    part: Path, done: dict[int, _Shard], manifest: _Manifest, *, finished: bool
) -> None:
    """This rank's progress: its finished shards and what its teacher answered with."""
    body = {
        "shards": [asdict(s) for _, s in sorted(done.items())],
        "positions": manifest.positions,
        "has_label": manifest.has_label,
        "finished": finished,
    }
    atomic_write_text(part, json.dumps(body))


def _read_part(part: Path) -> dict[str, Any] | None:
    """A part file, or None while it is absent or (never, being atomic) half-written."""
    try:
        raw = json.loads(part.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"logit cache part file {part} is unreadable: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise CacheError(f"logit cache part file {part} is malformed")
    return raw


def _fold_parts(folder: Path, manifest: _Manifest) -> None:
    """Adopt the verified shards that old part files (an interrupted distributed
    capture, of any world size) list, then delete those files."""
    for part in sorted(folder.glob(_PART.format(rank="*"))):
        raw = _read_part(part)
        for entry in (raw or {}).get("shards", ()):
            try:
                shard = _shard_from_json(entry)
            except (TypeError, ValueError) as exc:
                log.warning("ignoring an entry of %s: %s", part, exc)
                continue
            known = shard.index in manifest.shards
            if not known and _shard_problem(folder, shard, manifest) is None:
                manifest.shards[shard.index] = shard
        if raw is not None:
            _adopt_answers(manifest, raw, part)
        part.unlink(missing_ok=True)


def _adopt_answers(manifest: _Manifest, raw: dict[str, Any], where: Path) -> None:
    """Take another rank's positions/label presence, refusing a contradiction."""
    for name in ("positions", "has_label"):
        theirs, ours = raw.get(name), getattr(manifest, name)
        if theirs is None:
            continue
        if ours is None:
            setattr(manifest, name, theirs)
        elif ours != theirs:
            raise CacheError(
                f"logit cache: {where} records {name}={theirs!r}, the manifest {ours!r}: the "
                "ranks' teachers answered differently; delete the folder and capture again"
            )


class _Stall:
    """Fails a wait once the files it watches stop changing for ``stall_s``."""

    def __init__(self, stall_s: float, what: str) -> None:
        self.stall_s = stall_s
        self.what = what
        self.seen: object = None
        self.since = time.monotonic()

    def progress(self, state: object) -> None:
        if state != self.seen:
            self.seen, self.since = state, time.monotonic()
        elif time.monotonic() - self.since > self.stall_s:
            raise CacheError(f"logit cache capture: {self.what} for {self.stall_s:.0f} s")


def _merge_when_finished(
    folder: Path, manifest: _Manifest, world: World, ctx: RunContext | None, stall_s: float
) -> None:
    """Rank 0: wait (stop point per poll) for every rank's finished part, then write the
    complete manifest, and only then remove the parts."""
    parts = [folder / _PART.format(rank=r) for r in range(world.world_size)]
    stall = _Stall(stall_s, "a rank's part file did not change (a lost or stuck rank)")
    while True:
        raws = [_read_part(p) for p in parts]
        if all(r is not None and r.get("finished") for r in raws):
            break
        stall.progress([None if r is None else (len(r["shards"]), r.get("finished")) for r in raws])
        if ctx is not None:
            ctx.check()
        time.sleep(_POLL_S)
    for part, raw in zip(parts, raws, strict=True):
        assert raw is not None
        for entry in raw["shards"]:
            shard = _shard_from_json(entry)
            manifest.shards.setdefault(shard.index, shard)
        _adopt_answers(manifest, raw, part)
    missing = [i for i in range(manifest.num_shards) if i not in manifest.shards]
    if missing:
        raise CacheError(f"logit cache capture: shards {missing} were captured by no rank")
    manifest.complete = True
    manifest.write(folder)
    for part in parts:
        part.unlink(missing_ok=True)


def _wait_for_manifest(
    folder: Path, key: CacheKey, world: World, ctx: RunContext | None, stall_s: float
) -> None:
    """Ranks other than 0: wait (stop point per poll) for rank 0's complete manifest."""
    stall = _Stall(stall_s, "rank 0 wrote no complete manifest (a lost or stuck rank 0)")
    parts = [folder / _PART.format(rank=r) for r in range(world.world_size)]
    while True:
        manifest = _Manifest.read(folder)
        _check_key(manifest.key, key, folder)
        if manifest.complete:
            return
        stall.progress([p.is_file() and p.stat().st_mtime_ns for p in parts])
        if ctx is not None:
            ctx.check()
        time.sleep(_POLL_S)


def _check_capture_args(
    blocks: TokenBlocks, key: CacheKey, batch_size: int, shard_blocks: int, vocab: int | None
) -> None:
    for name, value in (("batch_size", batch_size), ("shard_blocks", shard_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise ConfigError(f"vocab_size must be a positive integer, got {vocab!r}", field="vocab")
    if len(blocks) == 0:
        raise ConfigError("cannot capture a logit cache for zero blocks", field="data")
    if key.data != fingerprint_tokens(blocks):
        raise ConfigError(
            "key.data is not the fingerprint of these blocks; build the key with "
            "data=fingerprint_tokens(blocks) so the cache can never be replayed on other data",
            field="key.data",
        )


def _remove_temp_files(folder: Path) -> None:
    """Delete what a killed atomic write left behind (``.manifest.json.*.tmp`` etc.)."""
    for pattern in (f".{MANIFEST}.*.tmp", ".shard-*.safetensors.*.tmp"):
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)


def _resume_or_start(folder: Path, layout: _Layout) -> _Manifest:
    """The manifest to continue: the folder's (verified, same key) or a fresh one."""
    if not (folder / MANIFEST).is_file():
        if any(folder.glob("shard-*.safetensors")):
            log.warning("%s has shards but no manifest; they will be overwritten", folder)
        manifest = _Manifest.fresh(layout)
        manifest.write(folder)
        return manifest
    manifest = _Manifest.read(folder)
    _check_key(manifest.key, layout.key, folder)
    _check_layout(manifest, layout, folder)
    for index, shard in list(manifest.shards.items()):
        problem = _shard_problem(folder, shard, manifest)
        if problem is not None:
            log.warning("re-capturing %s: %s", shard.file, problem)
            del manifest.shards[index]
            manifest.complete = False
    return manifest


def _check_layout(manifest: _Manifest, layout: _Layout, folder: Path) -> None:
    """Same key, so same data; the only free choices are shard size and vocab_size."""
    if (manifest.num_blocks, manifest.seq_len) != (layout.num_blocks, layout.seq_len):
        raise CacheError(
            f"the logit cache in {folder} holds {manifest.num_blocks} blocks of "
            f"{manifest.seq_len} tokens but these blocks are {layout.num_blocks} x "
            f"{layout.seq_len}; delete the folder or use another one"
        )
    if manifest.shard_blocks != layout.shard_blocks:
        log.info(
            "resuming %s with its own shard_blocks=%d (asked for %d)",
            folder,
            manifest.shard_blocks,
            layout.shard_blocks,
        )
    if layout.vocab_size is not None and manifest.vocab_size not in (None, layout.vocab_size):
        raise CacheError(
            f"the logit cache in {folder} was captured with vocab_size={manifest.vocab_size}, "
            f"not {layout.vocab_size}; delete the folder or use another one"
        )


class _Progress:
    """Counts captured blocks and reports them: to ``callback`` and, as the run's
    ``n/N blocks`` (``ctx.advance``), to the run's progress line."""

    def __init__(
        self,
        callback: Callable[[int, int], None] | None,
        total: int,
        ctx: RunContext | None = None,
    ) -> None:
        self.callback = callback
        self.total = total
        self.ctx = ctx
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.ctx is not None:
            self.ctx.advance(self.done, self.total, "blocks")


def _capture_range(
    blocks: TokenBlocks,
    teacher_fn: TeacherFn,
    manifest: _Manifest,
    span: tuple[int, int],
    batch_size: int,
    ctx: RunContext | None,
    progress: _Progress,
) -> dict[str, Tensor]:
    """The teacher's targets for blocks ``[start, stop)``, batch by batch, in storage form."""
    parts: list[dict[str, Tensor]] = []
    for indices in _batches(span, batch_size):
        if ctx is not None:
            ctx.check()
        with torch.no_grad():
            out = teacher_fn(indices, blocks.input_ids[indices], blocks.attention_mask[indices])
        parts.append(_storage_arrays(out, indices, manifest))
        progress.advance(len(indices))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _batches(span: tuple[int, int], batch_size: int) -> Iterator[Tensor]:
    start, stop = span
    for first in range(start, stop, batch_size):
        yield torch.arange(first, min(first + batch_size, stop), dtype=torch.int64)


def _storage_arrays(out: SparseTargets, indices: Tensor, manifest: _Manifest) -> dict[str, Tensor]:
    """Validate one teacher answer and convert it to what a shard stores (on CPU)."""
    where = f"blocks {int(indices[0])}..{int(indices[-1])}"
    _check_teacher_shape(out, len(indices), manifest, where)
    ids = out.ids.detach().to("cpu", torch.int64)
    low, high = int(ids.min()), int(ids.max())
    limit = manifest.vocab_size if manifest.vocab_size is not None else 2**31
    if low < 0 or high >= limit:
        raise ModelError(
            f"teacher returned token ids in [{low}, {high}] for {where}; expected [0, {limit})"
        )
    logprobs = out.logprobs.detach().to("cpu", torch.float32)
    tail = out.tail_logmass().detach().to("cpu", torch.float32)
    if torch.isnan(logprobs).any() or torch.isnan(tail).any():
        raise ModelError(f"teacher returned NaN log-probabilities (or tail mass) for {where}")
    arrays = {"ids": ids, "values": logprobs, "tail": tail}  # the codec rounds them
    if out.label_logprobs is not None:
        arrays["label"] = out.label_logprobs.detach().to("cpu", torch.float32)
    return arrays


def _check_teacher_shape(out: SparseTargets, n: int, manifest: _Manifest, where: str) -> None:
    """Every batch must agree on k, positions and label presence (recorded on first sight)."""
    if not isinstance(out, SparseTargets):
        raise ModelError(f"teacher_fn must return SparseTargets, got {type(out).__name__}")
    batch, positions, k = out.ids.shape
    if batch != n or k != manifest.key.k:
        raise ModelError(
            f"teacher returned targets of shape {tuple(out.ids.shape)} for {where}; expected "
            f"[{n}, positions, {manifest.key.k}]"
        )
    if manifest.positions is None:
        manifest.positions = positions
    label = out.label_logprobs
    has_label = label is not None
    if manifest.has_label is None:
        manifest.has_label = has_label
    label_ok = label is None or tuple(label.shape) == (n, positions)
    if positions != manifest.positions or has_label != manifest.has_label or not label_ok:
        raise ModelError(
            f"teacher output for {where} is inconsistent with earlier batches: "
            f"{positions} positions (cache: {manifest.positions}), label log-probs "
            f"{'present' if has_label else 'absent'} (cache: "
            f"{'present' if manifest.has_label else 'absent'})"
        )


def _write_shard(
    folder: Path, index: int, span: tuple[int, int], arrays: dict[str, Tensor], manifest: _Manifest
) -> _Shard:
    """Encode one shard with the manifest's codec, write it atomically, and describe it for
    the manifest. The shard's metadata records the codec too (the hash covers it)."""
    id_limit = manifest.vocab_size or int(arrays["ids"].max()) + 1
    tensors = manifest.codec.encode(arrays, id_limit)
    # One metadata entry: safetensors writes several in random (hash map) order, and equal
    # content should give equal bytes (so a resumed capture's shards equal a straight one's).
    about = {
        "start": span[0],
        "stop": span[1],
        "version": CACHE_FORMAT_VERSION,
        "codec": manifest.codec.params(),
    }
    metadata = {_FORMAT_NAME: json.dumps(about, sort_keys=True)}
    data = safetensors_save(tensors, metadata=metadata)
    name = _shard_name(index)
    atomic_write_bytes(folder / name, data)
    return _Shard(index, name, span[0], span[1], hashlib.sha256(data).hexdigest(), len(data))


# --------------------------------------------------------------------------- reading


class LogitCache:
    """A captured cache, served as ``SparseTargets`` for any batch of block indices.

    Build it with :meth:`open` (or get it from :func:`capture`). Shards are memory-mapped
    lazily, on first use, and hashed through that map before any row is taken from it;
    the map is file-backed (the OS pages it in and out), so a cache far larger than RAM
    is fine. Residual: a process that can write the shard file itself could still change
    bytes in place after they were hashed; the cache defends the folder's *names*
    (manifest entries, links), not a writer with access to its files.
    """

    def __init__(self, folder: Path, manifest: _Manifest) -> None:
        self.folder = folder
        self._manifest = manifest
        self._shards: dict[int, BlockReader] = {}
        self._reads: dict[int, int] = {}
        self._lock = threading.Lock()  # targets() and close() from more than one thread

    @property
    def shards_read(self) -> dict[int, int]:
        """How many times each shard was mapped and hashed (read from disk) so far: under
        data parallelism, the evidence that a rank read only its own batches' shards."""
        return dict(sorted(self._reads.items()))

    @classmethod
    def open(
        cls,
        folder: Path,
        key: CacheKey,
        *,
        allow_incomplete: bool = False,
        verify: Literal["all", "lazy"] = "all",
    ) -> LogitCache:
        """Open the cache in ``folder`` for ``key``, verifying the key and every shard's hash.

        ``verify="lazy"`` checks each shard's name and size now and its hash on first use
        (which happens anyway, see :meth:`_load_shard`), so a rank that trains on a few of
        the shards never reads the others.

        Raises :class:`StaleCacheError` for another key and :class:`CacheError` for a
        missing or unreadable manifest, a modified or missing shard, or - unless
        ``allow_incomplete`` - an interrupted capture (training on it would silently skip
        the missing blocks' teacher signal).
        """
        manifest = _Manifest.read(folder)
        _check_readable_key(manifest.key, key, folder)
        if not manifest.complete and not allow_incomplete:
            done = sum(s.stop - s.start for s in manifest.shards.values())
            raise CacheError(
                f"the logit cache in {folder} is incomplete ({done} of {manifest.num_blocks} "
                "blocks captured; the capture was interrupted). Run capture() again with the "
                "same folder to finish it."
            )
        for shard in manifest.shards.values():
            problem = (
                _shard_problem(folder, shard, manifest)
                if verify == "all"
                else _shard_layout_problem(folder, shard, manifest)
            )
            if problem is not None:
                raise CacheError(
                    f"refusing to load the logit cache in {folder}: {problem}. Run capture() "
                    "again to re-capture it, or delete the folder."
                )
        return cls(folder, manifest)

    @property
    def key(self) -> CacheKey:
        return self._manifest.key

    @property
    def num_blocks(self) -> int:
        return self._manifest.num_blocks

    @property
    def k(self) -> int:
        return self._manifest.key.k

    @property
    def positions(self) -> int:
        """Target positions per block (the teacher's ``T``)."""
        return self._manifest.positions or 0

    @property
    def complete(self) -> bool:
        return self._manifest.complete

    @property
    def bytes_per_token(self) -> float:
        """On-disk shard bytes per stored token position (headers included)."""
        shards = self._manifest.shards.values()
        positions = sum(s.stop - s.start for s in shards) * self.positions
        return sum(s.bytes for s in shards) / positions if positions else 0.0

    @property
    def codec(self) -> Codec:
        """The codec this cache's shards were written with."""
        return self._manifest.codec

    @property
    def format_version(self) -> int:
        """The on-disk format the cache was captured in (1 is still read)."""
        return self._manifest.key.version

    def targets(self, indices: Tensor | Sequence[int]) -> SparseTargets:
        """The cached targets of these blocks, in the given order: int64 ids, fp32 values.

        ``logprobs`` are the decoded values shifted by one constant per position so that
        ``tail_logmass()`` gives back the stored tail (the teacher's fp32 top-k mass, not a
        re-sum of rounded values). With the exact codec the shift is within the fp16
        rounding of the largest values; the compressed codec's bounds are in
        ``_cache_codec``. Each shard decodes only the blocks asked for.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("targets() needs at least one block index")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_blocks:
            raise IndexError(
                f"block indices must be in [0, {self.num_blocks}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        with self._lock:  # a prefetch thread and the training thread may both read
            return self._targets(idx)

    def _targets(self, idx: Tensor) -> SparseTargets:
        shard_of = idx // self._manifest.shard_blocks
        n, positions, k = int(idx.numel()), self.positions, self.k
        ids = torch.empty((n, positions, k), dtype=torch.int64)
        values = torch.empty((n, positions, k), dtype=torch.float32)
        tail = torch.empty((n, positions), dtype=torch.float32)
        label = torch.empty((n, positions)) if self._manifest.has_label else None
        for index in torch.unique(shard_of).tolist():
            rows = (shard_of == index).nonzero().reshape(-1)
            reader, start = self._reader(int(index), int(idx[rows[0]]))
            part = reader.blocks(idx[rows] - start)
            ids[rows], values[rows], tail[rows] = part.ids, part.values, part.tail
            if label is not None and part.label is not None:
                label[rows] = part.label
        return SparseTargets(ids, _match_tail(values, tail), label, ids_distinct=True)

    def _reader(self, index: int, block: int) -> tuple[BlockReader, int]:
        """Shard ``index``'s reader (loaded and verified on first use) and its first block."""
        shard = self._manifest.shards.get(index)
        if shard is None:
            raise CacheError(
                f"block {block} is not in the logit cache in {self.folder} (its shard was "
                "never captured); run capture() again to finish the cache"
            )
        reader = self._shards.get(index)
        if reader is None:
            reader = self._load_shard(shard)
            self._shards[index] = reader
        return reader, shard.start

    def _load_shard(self, shard: _Shard) -> BlockReader:
        """Map a shard, hash the very map its tensors are then viewed from, and check them.

        ``open`` verified every shard already; this second hash is what makes the check
        hold for the bytes used: a file swapped or edited after ``open`` is refused here.
        The shard's own codec record (inside the hashed bytes) must equal the manifest's.
        """
        path = _shard_path(self.folder, shard)
        self._reads[shard.index] = self._reads.get(shard.index, 0) + 1
        view = _map_verified(path, shard)
        tensors, metadata = _tensors_in(view, path)
        rows, positions, k = shard.stop - shard.start, self.positions, self.k
        codec = self._manifest.codec
        wanted = codec.shapes(rows, positions, k, bool(self._manifest.has_label))
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        matches = shapes.keys() == wanted.keys() and all(
            (len(shapes[n]) == 1) if want is None else shapes[n] == want
            for n, want in wanted.items()
        )
        if not matches:
            raise CacheError(
                f"logit cache shard {path} holds tensors {shapes}, the manifest describes "
                f"{wanted}; delete the folder and capture again"
            )
        if self.format_version != _V1:
            recorded = _shard_codec(metadata, path)
            if recorded != codec.params():
                raise CacheError(
                    f"logit cache shard {path} was written with codec {recorded}, but the "
                    f"manifest records {codec.params()}: the manifest was edited or belongs "
                    "to another cache; delete the folder and capture again"
                )
        return codec.reader(tensors, positions, k, f"logit cache shard {path}")

    def close(self) -> None:
        """Drop the shard memory maps (they are mapped and verified again on demand)."""
        with self._lock:
            self._shards.clear()


def _shard_codec(metadata: dict[str, Any], path: Path) -> Any:
    """The codec parameters a format-2 shard's metadata records."""
    try:
        return json.loads(metadata[_FORMAT_NAME])["codec"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"logit cache shard {path} records no codec: {exc!r}") from exc


def _match_tail(values: Tensor, tail: Tensor) -> Tensor:
    """Shift each position's log-probabilities so their mass is ``1 - exp(tail)``."""
    top = torch.log(-torch.expm1(tail.clamp(max=-1e-30)))
    return values + (top - torch.logsumexp(values, dim=-1)).unsqueeze(-1)
