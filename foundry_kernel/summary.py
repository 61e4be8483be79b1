"""The result of one run, typed: what every renderer of a run's outcome reads.

Why one type: the CLI's ``--json``, the model card, the panel's summary table and the
dashboard each used to rebuild their own untyped dict from the stored summary, with their
own guesses about missing or malformed fields. Now the job writes its results through
:class:`ModelResult`, the store keeps them as JSON, and every reader turns that JSON back
into a :class:`RunSummary` with :meth:`RunSummary.parse`, which never raises: a field that
is missing or of the wrong kind (an old run, a run that failed before evaluation, a
damaged store row) reads as ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROLES", "ModelResult", "RunSummary"]

#: The three models a run measures, in the order every table shows them.
ROLES: tuple[str, ...] = ("teacher", "student", "baseline")


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


@dataclass(frozen=True)
class ModelResult:
    """One model's held-out numbers (the teacher has no agreement or KL with itself)."""

    params: int | None
    val_ppl: float | None
    val_loss: float | None
    tokens_per_s: float | None = None
    agreement: float | None = None
    val_kl: float | None = None
    backend: str | None = None  # the teacher's: "hf", "vllm", "cache"
    # Parameters that trained, when fewer than ``params`` (a LoRA student's adapters);
    # None: every parameter trained (or an older run).
    trainable_params: int | None = None
    # Held-out bits per byte of text: the figure comparable across tokenizers (a per-token
    # loss is not, when teacher and student tokenize differently: loss.cross_tokenizer).
    val_bpb: float | None = None

    _ALWAYS = ("params", "val_ppl", "val_loss")

    @classmethod
    def parse(cls, raw: Any) -> ModelResult | None:
        part = _mapping(raw)
        if part is None:
            return None
        return cls(
            params=_count(part.get("params")),
            val_ppl=_number(part.get("val_ppl")),
            val_loss=_number(part.get("val_loss")),
            tokens_per_s=_number(part.get("tokens_per_s")),
            agreement=_number(part.get("agreement")),
            val_kl=_number(part.get("val_kl")),
            backend=_text(part.get("backend")),
            trainable_params=_count(part.get("trainable_params")),
            val_bpb=_number(part.get("val_bpb")),
        )

    def to_dict(self) -> dict[str, Any]:
        """As stored and as ``--json`` prints it: unmeasured optional fields left out."""
        out: dict[str, Any] = {}
        names = ("params", "trainable_params", "val_ppl", "val_loss", "val_bpb", "agreement")
        for name in (*names, "val_kl", "tokens_per_s"):
            value = getattr(self, name)
            if value is not None or name in self._ALWAYS:
                out[name] = value
        if self.backend is not None:
            out["backend"] = self.backend
        return out


@dataclass(frozen=True)
class RunSummary:
    """A run's outcome: the three models, how they compare, samples, and where things are.

    ``raw`` keeps the stored mapping whole, for the parts only one reader needs (the data
    report, the preflight estimate, the runtime).
    """

    teacher: ModelResult | None = None
    student: ModelResult | None = None
    baseline: ModelResult | None = None
    gap_closed: float | None = None
    samples: tuple[Mapping[str, str], ...] = ()
    export_dir: str | None = None
    data: Mapping[str, Any] | None = None
    logit_cache: Mapping[str, Any] | None = None
    sequence: Mapping[str, Any] | None = None
    world_size: int | None = None  # processes that trained it (None: not recorded, older runs)
    strategy: str | None = None  # "ddp", "fsdp2", or "single" for one process
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any) -> RunSummary:
        summary = _mapping(raw) or {}
        world = _mapping(summary.get("distributed")) or {}
        samples = summary.get("samples")
        rows: list[Mapping[str, str]] = []
        if isinstance(samples, list):
            for row in samples:
                if isinstance(row, Mapping):
                    rows.append({str(k): str(v) for k, v in row.items() if v is not None})
        return cls(
            teacher=ModelResult.parse(summary.get("teacher")),
            student=ModelResult.parse(summary.get("student")),
            baseline=ModelResult.parse(summary.get("baseline")),
            gap_closed=_number(summary.get("gap_closed")),
            samples=tuple(rows),
            export_dir=_text(summary.get("export_dir")),
            data=_mapping(summary.get("data")),
            logit_cache=_mapping(summary.get("logit_cache")),
            sequence=_mapping(summary.get("sequence")),
            world_size=_count(world.get("world_size")),
            strategy=_text(world.get("strategy")),
            raw=summary,
        )

    def role(self, name: str) -> ModelResult | None:
        """``"teacher"``, ``"student"`` or ``"baseline"``."""
        if name not in ROLES:
            raise KeyError(f"no role {name!r}; roles: {', '.join(ROLES)}")
        result: ModelResult | None = getattr(self, name)
        return result

    @property
    def agreement(self) -> float | None:
        """The distilled student's top-1 agreement with the teacher."""
        return self.student.agreement if self.student else _number(self.raw.get("agreement"))

    @property
    def val_kl(self) -> float | None:
        return self.student.val_kl if self.student else _number(self.raw.get("val_kl"))

    def to_json(self, *, run_id: str, state: str, duration_s: float | None) -> dict[str, Any]:
        """The documented ``foundry distill --json`` object (README, "Command line")."""
        out: dict[str, Any] = {"run_id": run_id, "state": str(state), "duration_s": duration_s}
        for name in ROLES:
            result = self.role(name)
            out[name] = None if result is None else result.to_dict()
        out.update(
            agreement=self.agreement,
            val_kl=self.val_kl,
            gap_closed=self.gap_closed,
            export_dir=self.export_dir,
            data=None if self.data is None else dict(self.data),
            samples=[dict(row) for row in self.samples]
            if isinstance(self.raw.get("samples"), list)
            else None,
            logit_cache=None if self.logit_cache is None else dict(self.logit_cache),
            sequence=None if self.sequence is None else dict(self.sequence),
            world_size=self.world_size,
            strategy=self.strategy,
        )
        return out
