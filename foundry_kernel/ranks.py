"""Per-rank figures of a data-parallel run, and which rank holds the others back.

Rank 0 records every rank's throughput and memory with each training step, as metrics
named ``[prefix]rank/<r>/<figure>`` (``tokens_per_s``, ``rss_mb``, ``vram_mb``): one
all-reduce carries them with the step's loss (see the Trainer), so no rank writes to the
store but rank 0. This module turns those rows into one typed value per rank for the
panel, the dashboard and the CLI, and flags a *straggler*: in data parallelism every
optimizer step waits for the slowest rank, so one slow GPU or a crowded node slows the
whole job, and its own figures are the only place it shows.

A rank is a straggler when its median throughput over the recent steps is below
``1 - tolerance`` times the median of the *other* ranks (with two ranks: the other one),
so one slow rank is flagged and the fast ones are not.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "FIGURES",
    "STRAGGLER_TOLERANCE",
    "RankFigures",
    "parse_rank_metric",
    "rank_figures",
    "rank_metric",
]

FIGURES = ("tokens_per_s", "rss_mb", "vram_mb")
STRAGGLER_TOLERANCE = 0.2  # 20 % below the others' median throughput
_NAME = re.compile(r"^(?P<prefix>(?:[\w.-]+/)*?)rank/(?P<rank>\d{1,5})/(?P<figure>[a-z_]+)$")


def rank_metric(rank: int, figure: str, prefix: str = "") -> str:
    """The metric name under which rank 0 records ``figure`` of ``rank``."""
    if figure not in FIGURES:
        raise ValueError(f"unknown per-rank figure {figure!r}; choose one of {FIGURES}")
    return f"{prefix}rank/{rank}/{figure}"


def parse_rank_metric(name: str) -> tuple[str, int, str] | None:
    """``(prefix, rank, figure)`` of a per-rank metric name, or None for any other name."""
    match = _NAME.match(name)
    if match is None or match["figure"] not in FIGURES:
        return None
    return match["prefix"], int(match["rank"]), match["figure"]


@dataclass(frozen=True)
class RankFigures:
    """One rank's recent figures (medians over the steps given); None where not recorded
    (``vram_mb`` on a CPU run)."""

    rank: int
    tokens_per_s: float | None
    rss_mb: float | None
    vram_mb: float | None
    straggler: bool = False


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v == v]  # drop NaN
    return statistics.median(finite) if finite else None


def rank_figures(
    rows: Iterable[tuple[str, float]] | Mapping[str, Sequence[float]],
    *,
    prefix: str = "",
    tolerance: float = STRAGGLER_TOLERANCE,
) -> list[RankFigures]:
    """Per-rank figures from metric ``(name, value)`` rows (or ``name -> values``), in
    rank order; empty for a single-process run. Only names under ``prefix`` count (the
    student's phase is ``""``, the CE-only baseline's ``"baseline/"``)."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    pairs = (
        ((name, v) for name, values in rows.items() for v in values)
        if isinstance(rows, Mapping)
        else rows
    )
    series: dict[int, dict[str, list[float]]] = {}
    for name, value in pairs:
        parsed = parse_rank_metric(name)
        if parsed is None or parsed[0] != prefix:
            continue
        _, rank, figure = parsed
        series.setdefault(rank, {}).setdefault(figure, []).append(float(value))
    medians = {
        rank: {figure: _median(values) for figure, values in figures.items()}
        for rank, figures in series.items()
    }
    out = []
    for rank in sorted(medians):
        mine = medians[rank].get("tokens_per_s")
        others = [
            v for r, m in medians.items() if r != rank and (v := m.get("tokens_per_s")) is not None
        ]
        reference = _median(others)
        slow = mine is not None and reference is not None and mine < (1 - tolerance) * reference
        out.append(
            RankFigures(
                rank=rank,
                tokens_per_s=mine,
                rss_mb=medians[rank].get("rss_mb"),
                vram_mb=medians[rank].get("vram_mb"),
                straggler=slow,
            )
        )
    return out
