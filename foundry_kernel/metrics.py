"""The names of the metrics a run records, with what they mean: one registry.

Why one registry: the trainer and the resource sampler write these names, and the panel's
live charts, the dashboard's tables and its charts read them; each reader used to keep its
own table of names and labels, and they drifted. Readers derive what they show from
:data:`METRICS` (and :func:`lookup` for the prefixed and per-GPU forms).

A name is ``[prefix]base``: ``baseline/`` for the CE-only student, ``teacher_build/`` for
the built-in teacher's own training; per-GPU memory is ``mem/gpu<N>_<what>_mb``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any, Literal

__all__ = [
    "BASELINE",
    "METRICS",
    "TEACHER_BUILD",
    "Metric",
    "event_values",
    "lookup",
    "names_in",
]

Group = Literal["loss", "eval", "optim", "memory", "speed"]
BASELINE = "baseline/"
TEACHER_BUILD = "teacher_build/"


@dataclass(frozen=True)
class Metric:
    """One metric: ``label`` is short (a legend), ``description`` reads on its own (a table)."""

    name: str
    label: str
    description: str
    group: Group
    better: Literal["lower", "higher"] | None = None
    prefix: str = ""  # "", BASELINE or TEACHER_BUILD: whose run phase it measures
    index: int | None = None  # the GPU, for per-GPU memory


METRICS: tuple[Metric, ...] = (
    Metric("train/loss", "train loss", "training loss (total)", "loss", "lower"),
    Metric("train/kd", "KD", "training loss: imitating the teacher (KD)", "loss", "lower"),
    Metric("train/ce", "CE", "training loss: predicting the text (CE)", "loss", "lower"),
    Metric(
        "train/hidden",
        "hidden",
        "training loss: matching the teacher's hidden states (loss.hidden, unweighted)",
        "loss",
        "lower",
    ),
    Metric("val/loss", "val loss", "held-out loss", "loss", "lower"),
    Metric("val/ppl", "val perplexity", "held-out perplexity (lower is better)", "eval", "lower"),
    Metric(
        "val/agreement",
        "agreement",
        "agreement with the teacher (higher is better)",
        "eval",
        "higher",
    ),
    Metric("val/kl", "val KL", "distance from the teacher (KL, lower is better)", "eval", "lower"),
    Metric("train/lr", "learning rate", "learning rate", "optim"),
    Metric("train/grad_norm", "grad norm", "gradient norm before clipping", "optim"),
    Metric("train/on_policy", "on-policy", "1 for a step on the student's own samples", "optim"),
    Metric("tokens_per_s", "tokens/s", "training speed (tokens per second)", "speed", "higher"),
    Metric("mem/rss_mb", "process RSS", "process memory (RSS, MB)", "memory"),
    Metric("mem/rss_peak_mb", "peak RSS", "peak process memory (RSS, MB)", "memory"),
    Metric(
        "mem/torch_allocated_mb", "torch allocated", "torch allocated (MB, live tensors)", "memory"
    ),
    Metric(
        "mem/torch_reserved_mb",
        "torch reserved",
        "torch reserved (MB, allocated + allocator cache)",
        "memory",
    ),
    Metric(
        "mem/torch_max_allocated_mb", "torch peak allocated", "torch peak allocated (MB)", "memory"
    ),
)
_BY_NAME = {m.name: m for m in METRICS}
_PREFIX_WORDS = {
    BASELINE: ("CE-only ", ", student without teacher"),
    TEACHER_BUILD: ("teacher build ", ", teacher build"),
}
_GPU = re.compile(r"mem/gpu(\d+)_([a-z_]+)_mb")


def lookup(name: str) -> Metric | None:
    """The registry's entry for ``name`` (prefixed and per-GPU forms included), or None for
    a name Foundry does not record (what a reader then shows is its own choice)."""
    for prefix, (short, long) in _PREFIX_WORDS.items():
        if name.startswith(prefix):
            base = lookup(name.removeprefix(prefix))
            if base is None or base.prefix:
                return None
            label = base.label.removeprefix("train ") if prefix == TEACHER_BUILD else base.label
            return replace(
                base,
                name=name,
                label=f"{short}{label}",
                description=f"{base.description}{long}",
                prefix=prefix,
            )
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    gpu = _GPU.fullmatch(name)
    if gpu:
        index, what = int(gpu.group(1)), gpu.group(2).replace("_", " ")
        # NVML's figure is the whole GPU's (every process on it), unlike torch's: say so
        label = f"GPU{index} NVML {what}" if what == "used" else f"GPU{index} {what}"
        return Metric(name, label, f"GPU {index} memory {what} (MB)", "memory", index=index)
    return None


def names_in(group: Group, *, prefixes: tuple[str, ...] = ("", BASELINE)) -> tuple[str, ...]:
    """The registered names of one group, for the given run phases, in registry order."""
    return tuple(f"{prefix}{m.name}" for prefix in prefixes for m in METRICS if m.group == group)


def event_values(payload: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The numbers of a ``step``/``eval`` event: its flat fields (but ``step`` and
    ``max_steps``) and its nested ``metrics`` mapping, as the trainer emits them; what the
    run's handle keeps and the exporters send."""
    for key, value in payload.items():
        if key in ("step", "max_steps"):
            continue
        if key == "metrics" and isinstance(value, Mapping):
            for name, inner in value.items():
                if _is_number(inner):
                    yield str(name), float(inner)
        elif _is_number(value):
            yield key, float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
