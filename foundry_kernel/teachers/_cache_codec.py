"""How a logit-cache shard stores its top-k targets: ``exact`` (format 1's layout) or
``compressed`` (about a quarter of the bytes).

A codec turns one shard's teacher answers (``ids`` int64 ``[n, P, k]``, ``values`` fp32
``[n, P, k]`` log-probabilities sorted descending, ``tail`` fp32 ``[n, P]`` log tail mass,
optional ``label`` fp32 ``[n, P]``) into named tensors that ``_logit_cache`` writes as one
safetensors file, and reads blocks of such a shard back as :class:`Decoded`. The cache
records the codec's :meth:`params` in the manifest and in every shard's metadata (which
the shard's SHA-256 covers); a shard is decoded with the parameters it was written with.

``exact`` (format 1's tensors, unchanged): ``ids`` uint16 when every id fits, else int32;
``values`` fp16; ``tail`` fp32; ``label`` fp32. 4k + 4 bytes per token (+4 with labels).

``compressed`` (picked by measurement on the built-in teacher's captured top-k, see
``bench/cache.py``; about 0.13 kB/token at k=128 where ``exact`` takes 0.52):

* **ids** are sorted per position and stored as gaps (``id - previous id``, the first from 0),
  split into byte planes (low bytes of all gaps, then the next bytes, ...; as many planes
  as the largest id needs) and deflated (zlib, raw, level 6, ``Z_FILTERED``) per block.
  Exact. Sorted gaps cost ~3.8 bits per id at k=128 of 1024 where the ids in rank order
  would cost ~10.
* **values** travel in the same (id) order, as one byte each: ``d = top1 - value >= 0``
  is companded, ``c = round(knee * log1p(d / knee) / step)`` (fine steps near the top-1,
  where the probability mass is, coarser ones far below it), clipped to 254; code 255
  is ``-inf``. The top-1 itself is not stored: values are served shifted so that their
  mass matches the stored tail, as ``exact`` does. Deflated like the ids.
  Error bound per value, relative to its position's top-1: ``|d_hat - d| <= (knee + d) *
  (exp(step / (2 * knee)) - 1)``, i.e. 0.051 nats at the top-1 and 0.30 nats ten nats
  below it with the defaults (step 0.1, knee 2). A served log-probability adds the shift
  error, a mass-weighted mean of those errors (so mostly the top entries') plus the tail's.
  Ties among equal codes are served in id order (the teacher's order among near-equal
  values is not kept).
* **tail**: one uint16 per position. Of the log top-k mass ``m`` and the log tail mass
  ``t`` (one is ``<= -ln 2``), the smaller is stored on a 15-bit grid of ``tail_step``
  (2^-10 nats) with a flag bit saying which; the other follows from it with no larger
  error. ``|error| <= tail_step / 2`` (4.9e-4 nats) for both, down to ``-32.6``.
* **label** (when the teacher gives it): fp16, relative error <= 2^-11.

Decoding a block is one inflate per stream plus vectorised numpy/torch work (a prefix
sum, a lookup table, a stable radix argsort of the byte codes to serve values sorted).
Blocks are independent, so the reader decodes only the blocks a batch asks for.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from foundry_kernel.errors import CacheError
from foundry_kernel.teachers._targets import log1mexp

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_CODEC",
    "Codec",
    "CompressedCodec",
    "Decoded",
    "ExactCodec",
    "codec_from_params",
    "codec_named",
]

CodecName = Literal["compressed", "exact"]
CODEC_NAMES: tuple[CodecName, ...] = ("compressed", "exact")
DEFAULT_CODEC: CodecName = "compressed"
_U16_IDS = 2**16
_NEG_INF_CODE = 255
_MAX_CODE = 254
_TAIL_FLAG = 1 << 15  # set: the stored quantity is the log top-k mass, else the log tail mass
_TAIL_MAX = _TAIL_FLAG - 1
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class Decoded:
    """Blocks of a shard as the reader serves them: ``ids`` int64 and ``values`` fp32
    ``[n, P, k]`` sorted by value descending (``values`` need not be normalised: the
    reader shifts them to ``tail``), ``tail`` fp32 ``[n, P]``, ``label`` fp32 or None.
    Every reader checks that no id repeats within a position (CacheError otherwise), so
    the cache can tell the loss it need not check again (``SparseTargets.ids_distinct``).
    """

    ids: Tensor
    values: Tensor
    tail: Tensor
    label: Tensor | None


class BlockReader(Protocol):
    def blocks(self, local: Tensor) -> Decoded:
        """The shard's blocks at these local (0-based, in-shard) indices, in that order."""
        ...


class Codec(Protocol):
    """What ``_logit_cache`` needs of a codec."""

    @property
    def name(self) -> str: ...

    def params(self) -> dict[str, Any]:
        """Everything decoding depends on, as JSON-able data (recorded and compared)."""
        ...

    def encode(self, arrays: Mapping[str, Tensor], id_limit: int) -> dict[str, Tensor]:
        """One shard's arrays -> the tensors its file holds (contiguous, CPU)."""
        ...

    def shapes(
        self, rows: int, positions: int, k: int, has_label: bool
    ) -> dict[str, tuple[int, ...] | None]:
        """Expected tensor shapes of a shard (None: any 1-D length)."""
        ...

    def reader(
        self, tensors: Mapping[str, Tensor], positions: int, k: int, where: str
    ) -> BlockReader:
        """A reader over one shard's (already hashed, shape-checked) tensors."""
        ...


# --------------------------------------------------------------------------- exact


@dataclass(frozen=True)
class ExactCodec:
    """Format 1's layout: ids uint16/int32, values fp16, tail fp32, label fp32."""

    name: Literal["exact"] = "exact"

    def params(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ids": "uint16 when they fit, else int32",
            "values": "float16",
            "tail": "float32",
            "label": "float32",
        }

    def encode(self, arrays: Mapping[str, Tensor], id_limit: int) -> dict[str, Tensor]:
        ids = arrays["ids"].to(torch.uint16 if id_limit <= _U16_IDS else torch.int32)
        out = {
            "ids": ids,
            "values": arrays["values"].to(torch.float16),
            "tail": arrays["tail"].to(torch.float32),
        }
        if "label" in arrays:
            out["label"] = arrays["label"].to(torch.float32)
        return {name: t.contiguous() for name, t in out.items()}

    def shapes(
        self, rows: int, positions: int, k: int, has_label: bool
    ) -> dict[str, tuple[int, ...] | None]:
        wanted: dict[str, tuple[int, ...] | None] = {
            "ids": (rows, positions, k),
            "values": (rows, positions, k),
            "tail": (rows, positions),
        }
        if has_label:
            wanted["label"] = (rows, positions)
        return wanted

    def reader(
        self, tensors: Mapping[str, Tensor], positions: int, k: int, where: str
    ) -> BlockReader:
        return _ExactReader(dict(tensors), where)


@dataclass
class _ExactReader:
    tensors: dict[str, Tensor]
    where: str

    def blocks(self, local: Tensor) -> Decoded:
        t = self.tensors
        label = t["label"][local].to(torch.float32) if "label" in t else None
        ids = t["ids"][local].to(torch.int64)
        ordered = ids.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise CacheError(f"{self.where}: a position's top-k ids repeat")
        return Decoded(
            ids,
            t["values"][local].to(torch.float32),
            t["tail"][local].to(torch.float32),
            label,
        )


# --------------------------------------------------------------------------- compressed


@dataclass(frozen=True)
class CompressedCodec:
    """Sorted-id gaps + companded one-byte values, deflated per block (module docstring)."""

    name: Literal["compressed"] = "compressed"
    step: float = 0.1
    knee: float = 2.0
    tail_step: float = 2.0**-10
    level: int = 6  # 9 packs 0.1 B/token tighter at k=128 and encodes 1.4x slower

    def __post_init__(self) -> None:
        if not (0 < self.step <= 1 and 0 < self.knee <= 100 and 0 < self.tail_step <= 0.01):
            raise CacheError(f"compressed codec parameters out of range: {asdict(self)}")
        if isinstance(self.level, bool) or self.level not in range(1, 10):
            raise CacheError(f"compressed codec level must be 1..9, got {self.level!r}")

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "compressor": "zlib-raw-filtered"}

    def value_error_bound(self, d: Tensor | float) -> Tensor | float:
        """The documented bound on ``|d_hat - d|`` for a value ``d`` nats below its top-1."""
        return (self.knee + d) * math.expm1(self.step / (2 * self.knee))

    # -- values

    def quantise(self, values: Tensor) -> Tensor:
        """fp32 log-probs [..., k] -> uint8 codes of ``top1 - value`` (255 = -inf)."""
        top = values.amax(dim=-1, keepdim=True)
        d = (top - values).to(torch.float64)
        finite = torch.isfinite(values)
        g = self.knee * torch.log1p(d.clamp(min=0).nan_to_num(posinf=0.0) / self.knee)
        codes = torch.round(g / self.step).clamp(max=_MAX_CODE)
        codes = torch.where(finite, codes, torch.full_like(codes, _NEG_INF_CODE))
        return codes.to(torch.uint8)

    def table(self) -> Tensor:
        """Code -> ``-d_hat`` (fp32; 255 -> -inf): the decoder's lookup table."""
        c = torch.arange(256, dtype=torch.float64)
        lut = -self.knee * torch.expm1(c * self.step / self.knee)
        lut[_NEG_INF_CODE] = -math.inf
        return lut.to(torch.float32)

    # -- tail

    def tail_codes(self, values: Tensor, tail: Tensor) -> Tensor:
        """The smaller of (log top-k mass, log tail mass) on the 15-bit grid, plus a flag."""
        top = torch.logsumexp(values.to(torch.float64), dim=-1)
        tail64 = tail.to(torch.float64)
        use_top = top < tail64
        x = torch.where(use_top, top, tail64)
        y = (-x - _LN2).clamp(min=0).nan_to_num(posinf=_TAIL_MAX * self.tail_step)
        code = torch.round(y / self.tail_step).clamp(max=_TAIL_MAX).to(torch.int32)
        code = code | (use_top.to(torch.int32) << 15)
        return code.to(torch.uint16)

    def tail_of(self, codes: Tensor) -> Tensor:
        raw = codes.to(torch.int32)
        x = -(raw & _TAIL_MAX).to(torch.float64) * self.tail_step - _LN2
        use_top = (raw & _TAIL_FLAG) != 0
        return torch.where(use_top, log1mexp(x), x).to(torch.float32)

    # -- shard

    def encode(self, arrays: Mapping[str, Tensor], id_limit: int) -> dict[str, Tensor]:
        ids = arrays["ids"].to(torch.int64)
        values = arrays["values"].to(torch.float32)
        n = ids.shape[0]
        if id_limit <= _U16_IDS:  # numpy sorts 16-bit keys by radix: ~10x torch.sort here
            perm = np.argsort(ids.numpy().astype(np.uint16), axis=-1, kind="stable")
            order = torch.from_numpy(perm)
            sorted_ids = ids.gather(-1, order)
        else:
            sorted_ids, order = ids.sort(dim=-1, stable=True)
        codes = self.quantise(values).gather(-1, order).numpy()
        gaps = torch.diff(sorted_ids, dim=-1, prepend=torch.zeros_like(sorted_ids[..., :1]))
        width = _id_bytes(id_limit)
        planes = _byte_planes(gaps.numpy(), width)  # [n, width, P*k] uint8
        streams: list[bytes] = []
        lengths = np.zeros((n, 2), dtype=np.int64)
        for b in range(n):
            for s, raw in enumerate((planes[b].tobytes(), codes[b].tobytes())):
                packed = _deflate(raw, self.level)
                streams.append(packed)
                lengths[b, s] = len(packed)
        payload = np.frombuffer(b"".join(streams), dtype=np.uint8).copy()
        out = {
            "payload": torch.from_numpy(payload),
            "streams": torch.from_numpy(lengths),
            "id_bytes": torch.tensor([width], dtype=torch.int64),
            "tail": self.tail_codes(values, arrays["tail"]),
        }
        if "label" in arrays:
            out["label"] = arrays["label"].to(torch.float16)
        return {name: t.contiguous() for name, t in out.items()}

    def shapes(
        self, rows: int, positions: int, k: int, has_label: bool
    ) -> dict[str, tuple[int, ...] | None]:
        wanted: dict[str, tuple[int, ...] | None] = {
            "payload": None,
            "streams": (rows, 2),
            "id_bytes": (1,),
            "tail": (rows, positions),
        }
        if has_label:
            wanted["label"] = (rows, positions)
        return wanted

    def reader(
        self, tensors: Mapping[str, Tensor], positions: int, k: int, where: str
    ) -> BlockReader:
        lengths = tensors["streams"]
        payload = tensors["payload"]
        width = int(tensors["id_bytes"][0])
        if width not in (1, 2, 3, 4):
            raise CacheError(f"{where}: id_bytes is {width}, not 1..4")
        if bool((lengths < 0).any()) or int(lengths.sum()) != payload.numel():
            raise CacheError(f"{where}: its stream lengths do not add up to its payload")
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.reshape(-1).cumsum(0)])
        return _CompressedReader(self, tensors, offsets, width, positions, k, where)


@dataclass
class _CompressedReader:
    codec: CompressedCodec
    tensors: Mapping[str, Tensor]
    offsets: Tensor  # [2n + 1] start of each stream in the payload
    width: int
    positions: int
    k: int
    where: str

    def __post_init__(self) -> None:
        self.lut = self.codec.table().numpy()
        self.payload = self.tensors["payload"].numpy()

    def _stream(self, block: int, which: int, size: int) -> np.ndarray:
        slot = 2 * block + which
        start, stop = int(self.offsets[slot]), int(self.offsets[slot + 1])
        try:
            raw = zlib.decompress(self.payload[start:stop].tobytes(), wbits=-15, bufsize=size)
        except zlib.error as exc:
            raise CacheError(f"{self.where}: block {block} does not inflate: {exc}") from exc
        if len(raw) != size:
            raise CacheError(
                f"{self.where}: block {block} inflates to {len(raw)} bytes, not {size}"
            )
        return np.frombuffer(raw, dtype=np.uint8)

    def blocks(self, local: Tensor) -> Decoded:
        n, pk = int(local.numel()), self.positions * self.k
        planes = np.empty((n, self.width, pk), dtype=np.uint8)
        codes = np.empty((n, pk), dtype=np.uint8)
        for row, block in enumerate(local.tolist()):
            planes[row] = self._stream(block, 0, self.width * pk).reshape(self.width, pk)
            codes[row] = self._stream(block, 1, pk)
        gaps = planes[:, 0].astype(np.int64)
        for plane in range(1, self.width):
            gaps |= planes[:, plane].astype(np.int64) << (8 * plane)
        shape = (n, self.positions, self.k)
        gaps = gaps.reshape(shape)
        if self.k > 1 and not bool((gaps[..., 1:] > 0).all()):  # sorted ids: a 0 gap repeats
            raise CacheError(f"{self.where}: a position's top-k ids repeat")
        ids_sorted = np.cumsum(gaps, axis=-1)
        codes = codes.reshape(shape)
        order = np.argsort(codes, axis=-1, kind="stable")  # radix sort of bytes: cheap
        ids = np.take_along_axis(ids_sorted, order, axis=-1)
        values = self.lut[np.take_along_axis(codes, order, axis=-1)]
        label = self.tensors.get("label")
        return Decoded(
            torch.from_numpy(ids),
            torch.from_numpy(values),
            self.codec.tail_of(self.tensors["tail"][local]),
            None if label is None else label[local].to(torch.float32),
        )


def _id_bytes(id_limit: int) -> int:
    """Bytes per gap: enough for the largest id (a gap never exceeds it)."""
    return max(1, math.ceil(max(id_limit - 1, 1).bit_length() / 8))


def _byte_planes(gaps: np.ndarray, width: int) -> np.ndarray:
    """``[n, P, k]`` non-negative ints -> ``[n, width, P*k]`` uint8, low byte plane first."""
    flat = gaps.reshape(gaps.shape[0], -1).astype(np.int64)
    return np.stack([((flat >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(width)], axis=1)


def _deflate(raw: bytes, level: int) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_FILTERED)
    return packer.compress(raw) + packer.flush()


# --------------------------------------------------------------------------- lookup


def codec_named(name: str) -> Codec:
    """The codec that writes new shards under this name, with today's parameters."""
    if name == "exact":
        return ExactCodec()
    if name == "compressed":
        return CompressedCodec()
    raise CacheError(f"unknown logit cache codec {name!r}; expected one of {list(CODEC_NAMES)}")


def codec_from_params(raw: Any) -> Codec:
    """The codec a manifest or shard records (its own parameters); CacheError if malformed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise CacheError(f"logit cache codec record {raw!r} is not an object with a name")
    name = raw["name"]
    if name == "exact":
        if raw != ExactCodec().params():
            raise CacheError(f"logit cache codec record {raw!r} is not the exact layout's")
        return ExactCodec()
    if name == "compressed":
        fields: dict[str, Any] = {key: raw.get(key) for key in ("step", "knee", "tail_step")}
        try:
            codec = CompressedCodec(
                step=float(fields["step"]),
                knee=float(fields["knee"]),
                tail_step=float(fields["tail_step"]),
                level=int(raw.get("level")),  # type: ignore[arg-type]
            )
        except (TypeError, ValueError) as exc:
            raise CacheError(f"logit cache codec record {raw!r} is malformed: {exc}") from exc
        if codec.params() != raw:
            raise CacheError(f"logit cache codec record {raw!r} has unknown or changed fields")
        return codec
    raise CacheError(f"unknown logit cache codec {name!r}; expected one of {list(CODEC_NAMES)}")
