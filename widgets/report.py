"""Read-only queries behind the stakeholder dashboard: plain data, no widgets, no plotting.

Why a separate module: the Voila dashboard must hold nothing a viewer could misuse, so
everything it shows is computed here from a :class:`~foundry_kernel.store.RunStore`
opened with ``read_only=True``; these functions only ever call the store's read methods.
Keeping them free of ipywidgets/plotly also lets them be tested (and reused by the CLI or
a report generator) without a kernel.

Every value comes with a plain-language label (:data:`LABELS`, :func:`metric_label`)
written for a reader who is not an ML engineer, and :func:`fmt` turns raw values into
short display strings. Missing or malformed summary fields become ``None`` instead of
raising: a run that failed half-way must still get a row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any

from foundry_kernel.metrics import lookup, names_in
from foundry_kernel.ranks import parse_rank_metric, rank_figures
from foundry_kernel.store import RunRecord, RunStore
from foundry_kernel.summary import ROLES, ModelResult, RunSummary

__all__ = [
    "BATCH_COLUMNS",
    "COMPARISON_COLUMNS",
    "LABELS",
    "LOSS_METRICS",
    "PPL_METRICS",
    "RUN_COLUMNS",
    "SAMPLE_COLUMNS",
    "Series",
    "batch_comparison",
    "batch_ids",
    "comparison",
    "fmt",
    "memory_series",
    "metric_label",
    "metric_series",
    "run_choices",
    "runs_table",
    "samples",
    "with_damage_column",
]

Series = tuple[list[float], list[float | None]]
"""``(x, y)`` of one curve; non-finite values are ``None`` so plots show a gap."""

DEFAULT_MAX_POINTS = 1500
"""A chart needs no more points than a screen has pixels; a 100k-step run is decimated."""

LABELS: dict[str, str] = {
    "name": "Run",
    "run_id": "Run id",
    "state": "State",
    "started": "Started",
    "duration_s": "Duration",
    "teacher": "Teacher (large model)",
    "student": "Student (small model)",
    "teacher_params": "Teacher size (parameters)",
    "student_params": "Student size (parameters)",
    "size_ratio": "Student size vs teacher",
    "student_ppl": "Student: held-out perplexity (lower is better)",
    "teacher_ppl": "Teacher: held-out perplexity (lower is better)",
    "baseline_ppl": "Student trained without teacher: held-out perplexity",
    "agreement": "Student agrees with teacher's next word (higher is better)",
    "gap_closed": "Share of the gap to the teacher closed by distillation (higher is better)",
    "settings": "Settings that differ in this batch",
    "best": "Best in batch",
    "model": "Model",
    "params": "Size (parameters)",
    "val_ppl": "Held-out perplexity (lower is better)",
    "tokens_per_s": "Generation speed (tokens per second, higher is better)",
    "speed_vs_teacher": "Speed vs teacher",
    "prompt": "Prompt",
    "baseline": "Student trained without teacher",
    "error": "Error",
    "damage": "Damaged record: what could not be read",
    "rank": "Process (rank)",
    "train_tokens_per_s": "Training speed (tokens per second, this rank)",
    "rss_mb": "Memory (RSS, MB)",
    "vram_mb": "GPU memory (MB)",
    "straggler": "Slowing the others down",
}

RUN_COLUMNS: tuple[str, ...] = (
    "name",
    "state",
    "started",
    "duration_s",
    "teacher",
    "student",
    "size_ratio",
    "student_ppl",
    "baseline_ppl",
    "agreement",
    "gap_closed",
)
COMPARISON_COLUMNS: tuple[str, ...] = (
    "model",
    "params",
    "size_ratio",
    "val_ppl",
    "agreement",
    "tokens_per_s",
    "speed_vs_teacher",
)
SAMPLE_COLUMNS: tuple[str, ...] = ("prompt", "teacher", "student", "baseline")
BATCH_COLUMNS: tuple[str, ...] = (
    "name",
    "state",
    "settings",
    "student_ppl",
    "baseline_ppl",
    "agreement",
    "gap_closed",
    "duration_s",
    "best",
)

LOSS_METRICS: tuple[str, ...] = names_in("loss")
PPL_METRICS: tuple[str, ...] = tuple(n for n in names_in("eval") if n.endswith("/ppl"))

# Flattened config keys that always differ between runs (or say nothing about the recipe).
_SETTINGS_NOISE = frozenset({"name", "runs_dir", "schema_version"})


# --- formatting ---------------------------------------------------------------------------


def metric_label(name: str) -> str:
    """A readable label for a metric name (the registry's description, ``baseline/...`` and
    per-GPU names included); another ``mem/..._mb`` name is read as memory in MB."""
    metric = lookup(name)
    if metric is not None:
        return metric.description
    if name.startswith("mem/") and name.endswith("_mb"):
        return f"{name.removeprefix('mem/').removesuffix('_mb').replace('_', ' ')} (MB)"
    return name


def _fmt_count(value: float) -> str:
    """11568 -> '11.6 K'; people compare model sizes by order of magnitude."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= limit:
            return f"{value / limit:.3g} {suffix}"
    return f"{value:.0f}"


def _fmt_duration(seconds: float) -> str:
    """65 -> '1 min 5 s'; 3725 -> '1 h 2 min'."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _fmt_number(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "teacher_params": _fmt_count,
    "student_params": _fmt_count,
    "params": _fmt_count,
    "size_ratio": lambda v: f"{v:.0%} of the teacher",
    "speed_vs_teacher": lambda v: f"{v:.2g}× the teacher",
    "agreement": lambda v: f"{v:.1%}",
    "gap_closed": lambda v: f"{v:.0%}",
    "duration_s": _fmt_duration,
    "started": lambda v: datetime.fromtimestamp(v).strftime("%Y-%m-%d %H:%M"),
    "damage": str,
    "best": lambda v: "★ best" if v else "",
}


def fmt(key: str, value: Any) -> str:
    """Display text for one cell: ``—`` for missing, units and percentages where apt."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    formatter = _FORMATTERS.get(key)
    if formatter is not None:
        try:
            return formatter(value)
        except (TypeError, ValueError, OverflowError, OSError):
            # a value of the wrong kind (a time past year 9999, text where a number
            # belongs) is shown as it is: one odd cell must not take the page down
            return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return _fmt_number(float(value))
    return str(value)


# --- small readers ------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


#: A role that did not report (no baseline, a run that failed before evaluation).
_NOTHING = ModelResult(params=None, val_ppl=None, val_loss=None)


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _summary_of(run: RunRecord | Mapping[str, Any]) -> Mapping[str, Any]:
    return run.summary if isinstance(run, RunRecord) else run


DEFAULT_TEACHER_DATA = "builtin:python-docs"
"""The corpus Foundry's own teacher is built on unless ``teacher.build.data`` says otherwise."""


def describe_teacher(config: Mapping[str, Any]) -> str:
    """'built-in tiny teacher', 'tiny teacher built on notes.txt' (Foundry's recipe on the
    user's corpus: that is their teacher, not the built-in one), or the model's folder/hub
    name, never a long absolute path."""
    teacher = _section(config, "teacher")
    source = teacher.get("source")
    if not isinstance(source, str) or not source:
        return "—"
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:").replace("-", " ")
        data = _section(teacher, "build").get("data", DEFAULT_TEACHER_DATA)
        if not isinstance(data, str) or data == DEFAULT_TEACHER_DATA:
            return f"built-in {name}"
        corpus = data.removeprefix("builtin:") if data.startswith("builtin:") else _leaf(data)
        return f"{name} built on {corpus}"
    return _leaf(source)


def _leaf(path: str) -> str:
    return PurePath(path.replace("\\", "/")).name or path


def describe_student(config: Mapping[str, Any]) -> str:
    """How the student was made, in words (fresh with its shape, or where it came from)."""
    student = _section(config, "student")
    init = student.get("init", "fresh")
    if init == "pretrained":
        source = student.get("source")
        return f"pretrained {PurePath(str(source)).name}" if source else "pretrained"
    if init == "from_teacher":
        return "cut from the teacher"
    layers, hidden = student.get("num_layers"), student.get("hidden_size")
    if isinstance(layers, int) and isinstance(hidden, int):
        plural = "layer" if layers == 1 else "layers"
        return f"new, {layers} {plural} × {hidden} wide"
    return "new"


def duration_s(run: RunRecord, *, now: float | None = None) -> float | None:
    """Wall time from start to end, or to ``now`` while the run is still going."""
    if run.started_at is None:
        return None
    end = run.ended_at
    if end is None:
        end = time.time() if now is None else now
    return max(0.0, end - run.started_at)


# --- runs table ---------------------------------------------------------------------------


def run_row(run: RunRecord, *, now: float | None = None) -> dict[str, Any]:
    """One row of the runs table: raw values keyed as in :data:`LABELS`."""
    summary = RunSummary.parse(run.summary)
    teacher, student, baseline = (summary.role(p) or _NOTHING for p in ROLES)
    return {
        "run_id": run.run_id,
        "name": run.name,
        "kind": run.kind,
        "state": run.state,
        "batch_id": run.batch_id,
        "started": run.started_at if run.started_at is not None else run.created_at,
        "duration_s": duration_s(run, now=now),
        "teacher": describe_teacher(run.config),
        "student": describe_student(run.config),
        "teacher_params": _number(teacher.params),
        "student_params": _number(student.params),
        "size_ratio": _ratio(_number(student.params), _number(teacher.params)),
        "teacher_ppl": teacher.val_ppl,
        "student_ppl": student.val_ppl,
        "baseline_ppl": baseline.val_ppl,
        "agreement": summary.agreement,
        "gap_closed": summary.gap_closed,
        "error": run.error,
        "damage": "; ".join(run.damage),
    }


def runs_table(
    store: RunStore, *, batch_id: str | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """Every run (or one batch's), newest first, as rows for the runs table."""
    return [run_row(run, now=now) for run in store.list_runs(batch_id=batch_id)]


def with_damage_column(
    columns: Sequence[str], rows: Iterable[Mapping[str, Any]]
) -> tuple[str, ...]:
    """``columns`` plus ``damage`` when a row's record is damaged (healthy stores keep
    their table as it was; a damaged row says what could not be read)."""
    extra = ("damage",) if any(row.get("damage") for row in rows) else ()
    return (*columns, *extra)


def run_choices(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(label, run_id)`` pairs for a run picker from :func:`runs_table` rows, same order."""
    return [
        (
            f"{row['name']} · {row['state']} · {fmt('started', row['started'])} · {row['run_id']}"
            + (" · damaged record" if row.get("damage") else ""),
            row["run_id"],
        )
        for row in rows
    ]


# --- curves -------------------------------------------------------------------------------


def _decimate(points: Sequence[tuple[float, float | None]], max_points: int) -> list[Any]:
    """Every k-th point plus the last one, so the end of a curve is always current."""
    if max_points < 2 or len(points) <= max_points:
        return list(points)
    stride = math.ceil(len(points) / (max_points - 1))
    kept = list(points[::stride])
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def _series(points: Sequence[tuple[float, float | None]], max_points: int) -> Series:
    kept = _decimate(points, max_points)
    return [x for x, _ in kept], [y for _, y in kept]


def metric_series(
    store: RunStore,
    run_id: str,
    names: Iterable[str],
    *,
    x: str = "step",
    max_points: int = DEFAULT_MAX_POINTS,
) -> dict[str, Series]:
    """Curves of the named metrics that the run has; ``x`` is ``"step"`` or ``"time"``.

    ``x="time"`` gives seconds since the run's first value of any of these metrics: the
    step column of sampled metrics (memory) is a sample counter, not a training step.
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    wanted = list(dict.fromkeys(names))
    rows = store.metrics(run_id, wanted)
    t0 = min((row.time for row in rows), default=0.0)
    grouped: dict[str, list[tuple[float, float | None]]] = {}
    for row in rows:
        xv = float(row.step) if x == "step" else row.time - t0
        grouped.setdefault(row.name, []).append((xv, _number(row.value)))
    out: dict[str, Series] = {}
    for name in wanted:
        if name in grouped:
            points = sorted(grouped[name], key=lambda p: p[0])
            out[name] = _series(points, max_points)
    return out


def memory_series(
    store: RunStore, run_id: str, *, max_points: int = DEFAULT_MAX_POINTS
) -> dict[str, Series]:
    """Every ``mem/*`` metric of the run (RSS, per-GPU use) against seconds since start."""
    names = [name for name in store.metric_names(run_id) if name.startswith("mem/")]
    if not names:
        return {}
    return metric_series(store, run_id, names, x="time", max_points=max_points)


RANK_COLUMNS: tuple[str, ...] = ("rank", "train_tokens_per_s", "rss_mb", "vram_mb", "straggler")


def rank_rows(
    store: RunStore, run_id: str, *, prefix: str = "", last_steps: int = 20
) -> list[dict[str, Any]]:
    """One row per rank of a data-parallel run (medians over its last ``last_steps``
    recorded steps), with the straggler flag of :func:`foundry_kernel.ranks.rank_figures`;
    empty for a single-process run."""
    names = [n for n in store.metric_names(run_id) if parse_rank_metric(n) is not None]
    if not names:
        return []
    rows = store.metrics(run_id, names)
    last = max(row.step for row in rows)
    recent = [(row.name, row.value) for row in rows if row.step > last - last_steps]
    pairs = [(name, v) for name, value in recent if (v := _number(value)) is not None]
    return [
        {
            "rank": f.rank,
            "train_tokens_per_s": f.tokens_per_s,
            "rss_mb": f.rss_mb,
            "vram_mb": f.vram_mb,
            "straggler": f.straggler,
        }
        for f in rank_figures(pairs, prefix=prefix)
    ]


# --- one run's results --------------------------------------------------------------------

_ROLES: tuple[tuple[str, str], ...] = (
    ("teacher", "Teacher (large model)"),
    ("student", "Distilled student (learned from the teacher)"),
    ("baseline", "Student trained without the teacher (CE-only)"),
)


def comparison(run: RunRecord | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Teacher vs distilled student vs CE-only student: size, perplexity, agreement, speed.

    Takes a run (or its summary). Roles missing from the summary (no baseline, a run that
    failed before evaluation) are left out.
    """
    summary = RunSummary.parse(_summary_of(run))
    teacher = summary.teacher or _NOTHING
    t_params, t_speed = _number(teacher.params), teacher.tokens_per_s
    rows = []
    for role, label in _ROLES:
        part = summary.role(role)
        if part is None:
            continue
        params, speed = _number(part.params), part.tokens_per_s
        rows.append(
            {
                "role": role,
                "model": label,
                "params": params,
                "size_ratio": _ratio(params, t_params),
                "val_ppl": part.val_ppl,
                "agreement": part.agreement,
                "tokens_per_s": speed,
                "speed_vs_teacher": _ratio(speed, t_speed),
            }
        )
    return rows


def samples(run: RunRecord | Mapping[str, Any]) -> list[dict[str, str]]:
    """The run's sample generations, one row per prompt, missing texts as empty strings."""
    rows = RunSummary.parse(_summary_of(run)).samples
    return [{key: row.get(key) or "" for key in SAMPLE_COLUMNS} for row in rows]


# --- batches ------------------------------------------------------------------------------


def batch_ids(store: RunStore) -> list[str]:
    """Distinct batch ids, newest batch first."""
    seen: dict[str, None] = {}
    for run in store.list_runs():
        if run.batch_id is not None:
            seen.setdefault(run.batch_id, None)
    return list(seen)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def varying_settings(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted config keys whose values differ between the given configs (a batch's grid)."""
    flats = [_flatten(config) for config in configs]
    keys = sorted({key for flat in flats for key in flat} - _SETTINGS_NOISE)
    missing = object()
    return [key for key in keys if len({repr(flat.get(key, missing)) for flat in flats}) > 1]


def batch_comparison(store: RunStore, batch_id: str) -> list[dict[str, Any]]:
    """The members of a batch side by side: what differed, how each did, which is best.

    ``best`` marks the completed member with the lowest student perplexity.
    """
    runs = sorted(store.list_runs(batch_id=batch_id), key=lambda r: (r.created_at, r.run_id))
    keys = varying_settings([run.config for run in runs])
    rows = []
    for run in runs:
        flat = _flatten(run.config)
        row = run_row(run)
        row["settings"] = ", ".join(f"{key}={flat.get(key)}" for key in keys) or "—"
        row["best"] = False
        rows.append(row)
    ranked = [r for r in rows if r["state"] == "completed" and r["student_ppl"] is not None]
    if ranked:
        min(ranked, key=lambda r: r["student_ppl"])["best"] = True
    return rows
