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

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any

from foundry_kernel.config import flatten_config, varying_settings
from foundry_kernel.metrics import lookup, names_in
from foundry_kernel.ranks import parse_rank_metric, rank_figures
from foundry_kernel.store import RunRecord, RunStore
from foundry_kernel.summary import MARGINAL_RATIO, ROLES, ModelResult, RunSummary

__all__ = [
    "BATCH_COLUMNS",
    "COMPARISON_COLUMNS",
    "FAILED_STATES",
    "LABELS",
    "LOSS_METRICS",
    "PPL_METRICS",
    "RUN_COLUMNS",
    "SAMPLE_COLUMNS",
    "SAMPLE_HISTORY_COLUMNS",
    "SAMPLE_MODELS",
    "SAMPLE_TABLE_COLUMNS",
    "Notice",
    "Series",
    "batch_comparison",
    "batch_ids",
    "comparison",
    "config_differences",
    "ema",
    "filter_rows",
    "fmt",
    "memory_series",
    "metric_label",
    "metric_series",
    "parallel_data",
    "prompt_spans",
    "recipe",
    "run_choices",
    "run_warnings",
    "runs_table",
    "sample_columns",
    "sample_history",
    "sample_table",
    "samples",
    "sampling_note",
    "table_csv",
    "table_json",
    "tags_of",
    "visible_text",
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
    "recipe": "Settings (loss, temperature, CE weight, mode, data)",
    "verdict": "Did distillation help?",
    "tags": "Tags",
    "setting": "Setting",
    "teacher_sampled": "Teacher (sampled)",
    "student_sampled": "Distilled student (sampled)",
    "baseline_sampled": "Student without teacher (sampled)",
    "greedy": "Greedy",
    "sampled": "Sampled (seeded)",
    "step": "Step",
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
    "verdict",
    "recipe",
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
SAMPLE_TABLE_COLUMNS: tuple[str, ...] = ("prompt", "model", "greedy", "sampled")
SAMPLE_HISTORY_COLUMNS: tuple[str, ...] = ("step", "prompt", "greedy", "sampled")
#: How the sample tables name each role (short: they sit in a narrow column).
SAMPLE_MODELS: dict[str, str] = {
    "teacher": "Teacher",
    "student": "Distilled student",
    "baseline": "CE-only student",
}
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
        "verdict": _verdict_word(summary),
        "recipe": recipe(run.config),
        "mode": _mode(run.config),
        "tags": tags_of(run),
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
    """The run's sample generations, one row per prompt, missing texts as empty strings;
    seeded sampled continuations (``student_sampled``...) are kept when the run has them."""
    rows = RunSummary.parse(_summary_of(run)).samples
    extra = [r + SAMPLED_SUFFIX for r in ROLES if any(row.get(r + SAMPLED_SUFFIX) for row in rows)]
    return [{key: row.get(key) or "" for key in (*SAMPLE_COLUMNS, *extra)} for row in rows]


def sample_table(run: RunRecord | Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per prompt and model (``SAMPLE_TABLE_COLUMNS``): teacher, distilled and
    CE-only continue the same prompt, greedy next to seeded sampled, so a reader compares
    the models down the column. Older runs kept greedy text only: their sampled is ""."""
    out: list[dict[str, str]] = []
    for row in RunSummary.parse(_summary_of(run)).samples:
        for role in ROLES:
            if role not in row and role + SAMPLED_SUFFIX not in row:
                continue  # a model the run did not have (no CE-only twin)
            out.append(
                {
                    "prompt": row.get("prompt", ""),
                    "model": SAMPLE_MODELS[role],
                    "greedy": row.get(role, ""),
                    "sampled": row.get(role + SAMPLED_SUFFIX, ""),
                }
            )
    return out


def prompt_spans(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """For a table that names each prompt once: how many rows (the models that continued
    it) the prompt's cell spans, on the first row of each run of equal prompts; 0 on the
    rows it already covers."""
    spans = [0] * len(rows)
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].get("prompt") != rows[start].get("prompt"):
            spans[start] = i - start
            start = i
    return spans


def sample_history(
    run: RunRecord | Mapping[str, Any], phase: str = "distill"
) -> list[dict[str, Any]]:
    """A training phase's samples at each validation (``SAMPLE_HISTORY_COLUMNS``), by
    step: the student's learning in words. Empty for runs that did not keep them."""
    steps = RunSummary.parse(_summary_of(run)).sample_history(phase)
    return [
        {"step": s.step, "prompt": s.prompt, "greedy": s.greedy, "sampled": s.sampled}
        for s in steps
    ]


def sampling_note(run: RunRecord | Mapping[str, Any]) -> str:
    """How to read the sample tables: greedy vs sampled (with the run's temperature,
    top-p and seed when recorded) and the whitespace marks."""
    settings = RunSummary.parse(_summary_of(run)).sample_settings or {}
    how = "drawn at random"
    temperature, top_p, seed = (_number(settings.get(k)) for k in ("temperature", "top_p", "seed"))
    if temperature is not None and top_p is not None:
        how = f"drawn at temperature {temperature:g}, top-p {top_p:g}"
    seeded = "" if seed is None else f" (seed {seed:g}: a re-run draws the same text)"
    return (
        "Greedy always takes the likeliest next token (a small model often repeats "
        f"itself); sampled is {how}{seeded}. ⏎ is a line break, ·×5 five spaces; hover a "
        "cell for the raw text."
    )


# --- batches ------------------------------------------------------------------------------


def batch_ids(store: RunStore) -> list[str]:
    """Distinct batch ids, newest batch first."""
    seen: dict[str, None] = {}
    for run in store.list_runs():
        if run.batch_id is not None:
            seen.setdefault(run.batch_id, None)
    return list(seen)


def batch_comparison(store: RunStore, batch_id: str) -> list[dict[str, Any]]:
    """The members of a batch side by side: what differed, how each did, which is best.

    ``best`` marks the completed member with the lowest student perplexity.
    """
    runs = sorted(store.list_runs(batch_id=batch_id), key=lambda r: (r.created_at, r.run_id))
    keys = varying_settings([run.config for run in runs])
    rows = []
    for run in runs:
        flat = flatten_config(run.config)
        row = run_row(run)
        row["settings"] = ", ".join(f"{key}={flat.get(key)}" for key in keys) or "—"
        row["best"] = False
        rows.append(row)
    ranked = [r for r in rows if r["state"] == "completed" and r["student_ppl"] is not None]
    if ranked:
        min(ranked, key=lambda r: r["student_ppl"])["best"] = True
    return rows


# --- issue 16: settings, tags, filters, differences, grids, downloads, warnings ----------

FAILED_STATES = frozenset({"failed", "timed_out"})
"""States a reader usually wants out of the way (the dashboard hides them by default)."""

_LOSS_NAMES = {
    "forward_kl": "forward KL",
    "reverse_kl": "reverse KL",
    "jsd": "JSD",
    "skew_forward_kl": "skew forward KL",
    "skew_reverse_kl": "skew reverse KL",
    "tvd": "TVD",
}
# losses whose formula reads loss.beta / loss.skew_alpha (elsewhere the field is unused)
_USES_BETA = frozenset({"jsd"})
_USES_ALPHA = frozenset({"skew_forward_kl", "skew_reverse_kl"})


def _mode(config: Mapping[str, Any]) -> str | None:
    mode = _section(config, "distill").get("mode")
    return mode if isinstance(mode, str) else None


def _short_source(source: Any) -> str | None:
    if not isinstance(source, str) or not source:
        return None
    return source.removeprefix("builtin:") if source.startswith("builtin:") else _leaf(source)


def recipe(config: Mapping[str, Any]) -> str:
    """The settings that tell runs apart at a glance: 'JSD β=0.5 · T=2 · CE 0.5 · online ·
    python-docs' (forward-KL and JSD runs used to look identical in the runs table).
    Only the fields the chosen loss reads are shown (β only for JSD)."""
    loss = _section(config, "loss")
    kind = loss.get("kind")
    parts: list[str] = []
    if isinstance(kind, str):
        name = _LOSS_NAMES.get(kind, kind)
        if kind in _USES_BETA and _number(loss.get("beta")) is not None:
            name += f" β={loss['beta']:g}"
        if kind in _USES_ALPHA and _number(loss.get("skew_alpha")) is not None:
            name += f" α={loss['skew_alpha']:g}"
        parts.append(name)
    if (temperature := _number(loss.get("temperature"))) is not None:
        parts.append(f"T={temperature:g}")
    if (ce := _number(loss.get("ce_weight"))) is not None:
        parts.append(f"CE {ce:g}")
    if (mode := _mode(config)) is not None:
        parts.append(mode.replace("_", "-"))
    if (data := _short_source(_section(config, "data").get("source"))) is not None:
        parts.append(data)
    return " · ".join(parts) or "—"


_TAG_SPLIT = re.compile(r"[\s,;]+")


def tags_of(run: RunRecord) -> list[str]:
    """Tags to filter by. The store keeps none of its own, so they are read from what a
    user already chose: a ``tags`` list in the config if there is one, the words of the
    config's ``name`` ('grid-0 lr-sweep' -> grid-0, lr-sweep), the loss kind, the mode,
    the data source, and ``batch:<id>`` for batch members. Read only, never written."""
    config = run.config
    found: list[str] = []
    listed = config.get("tags")
    if isinstance(listed, list | tuple):
        found += [str(t) for t in listed if isinstance(t, str | int | float)]
    name = config.get("name")
    if isinstance(name, str):
        found += [w for w in _TAG_SPLIT.split(name) if w]
    kind = _section(config, "loss").get("kind")
    if isinstance(kind, str):
        found.append(kind)
    if (mode := _mode(config)) is not None:
        found.append(mode)
    if (data := _short_source(_section(config, "data").get("source"))) is not None:
        found.append(data)
    if run.batch_id:
        found.append(f"batch:{run.batch_id}")
    return list(dict.fromkeys(t.strip() for t in found if t.strip()))


def _verdict_word(summary: RunSummary) -> str | None:
    """The verdict in two or three words for a table cell (the full sentence is shown
    with the run); None while the run has no held-out result."""
    verdict = summary.verdict
    if verdict is None:
        return None
    return {True: "helped", False: "did not help", None: "not measured"}[verdict.helped]


def filter_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    states: Iterable[str] = (),
    modes: Iterable[str] = (),
    tag: str | None = None,
    hide_failed: bool = True,
) -> tuple[list[Mapping[str, Any]], int]:
    """The rows a reader asked for, and how many failed runs were hidden.

    Empty ``states``/``modes`` mean "any"; ``tag`` keeps rows carrying it. Failed and
    timed-out runs are hidden unless asked for (``hide_failed=False`` or a failed state
    chosen explicitly); the count lets the page say "11 failed hidden".
    """
    wanted_states, wanted_modes = set(states), set(modes)
    kept: list[Mapping[str, Any]] = []
    hidden = 0
    for row in rows:
        if wanted_states and row.get("state") not in wanted_states:
            continue
        if wanted_modes and row.get("mode") not in wanted_modes:
            continue
        if tag and tag not in (row.get("tags") or ()):
            continue
        if hide_failed and row.get("state") in FAILED_STATES and not wanted_states:
            hidden += 1
            continue
        kept.append(row)
    return kept, hidden


def config_differences(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """W&B's "Run Comparer, differences only": one row per dotted setting whose value is
    not the same in every given run, ``{"setting": key, <run_id>: value, ...}``; a run
    without the setting shows None. Names and paths are left out (they always differ)."""
    flats = {run.run_id: flatten_config(run.config) for run in runs}
    keys = varying_settings([run.config for run in runs]) if len(runs) > 1 else []
    return [{"setting": key, **{rid: flat.get(key) for rid, flat in flats.items()}} for key in keys]


def parallel_data(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """A grid as parallel coordinates: each setting that varies among the completed runs
    (numbers as they are, anything else as categories with tick labels), then the
    distilled student's held-out perplexity and the gap closed.

    Returns ``{"run_ids": [...], "dimensions": [{"label", "values", "ticktext"?,
    "tickvals"?}, ...]}``; no dimensions when fewer than two runs completed.
    """
    done = [r for r in runs if r.state == "completed"]
    if len(done) < 2:
        return {"run_ids": [], "dimensions": []}
    flats = [flatten_config(r.config) for r in done]
    dims: list[dict[str, Any]] = []
    for key in varying_settings([r.config for r in done]):
        values = [flat.get(key) for flat in flats]
        numbers = [_number(v) for v in values]
        if all(n is not None for n in numbers):
            dims.append({"label": key, "values": numbers})
            continue
        cats = sorted({repr(v) if not isinstance(v, str) else v for v in values})
        index = {c: i for i, c in enumerate(cats)}
        dims.append(
            {
                "label": key,
                "values": [index[repr(v) if not isinstance(v, str) else v] for v in values],
                "tickvals": list(range(len(cats))),
                "ticktext": cats,
            }
        )
    summaries = [RunSummary.parse(r.summary) for r in done]
    dims.append(
        {
            "label": "student held-out perplexity",
            "values": [s.student.val_ppl if s.student else None for s in summaries],
        }
    )
    dims.append({"label": "gap closed", "values": [s.gap_closed for s in summaries]})
    return {"run_ids": [r.run_id for r in done], "dimensions": dims}


def _plain(value: Any) -> Any:
    """A cell for a download: lists joined, non-finite numbers blank."""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def table_csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """The rows as CSV with the column keys as header, raw values (not display text)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if (v := _plain(row.get(c))) is None else v for c in columns])
    return buffer.getvalue()


def table_json(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """The rows as a JSON list of objects (strict JSON: NaN and inf become null)."""
    records = [{c: _plain(row.get(c)) for c in columns} for row in rows]
    return json.dumps(records, indent=1, allow_nan=False, default=str)


Notice = tuple[str, str]
"""``(level, text)``: level is ``good``, ``warning`` or ``info`` (the verdict's levels)."""


def run_warnings(
    run: RunRecord | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> list[Notice]:
    """What a reader must not miss, in sentences: did distillation help (the verdict), and
    is the teacher worth distilling (no better than chance, no better than / barely better
    than the student trained without it). Never a bare percentage."""
    summary = RunSummary.parse(_summary_of(run))
    cfg = run.config if isinstance(run, RunRecord) else (config or {})
    out: list[Notice] = []
    verdict = summary.verdict
    if verdict is not None:
        out.append((verdict.level, verdict.text))
    verdict_text = verdict.text if verdict is not None else ""
    check = summary.teacher_check
    if check is not None and check.standing in ("near_chance", "no_better", "marginal"):
        if check.message and check.message not in verdict_text:
            out.append(("warning", check.message[0].upper() + check.message[1:] + "."))
        return out
    teacher, baseline = summary.teacher, summary.baseline
    t_ppl = teacher.val_ppl if teacher else None
    vocab = _number(_section(_section(cfg, "teacher"), "build").get("vocab_size"))
    if check is None and t_ppl is not None and vocab and t_ppl > 0.5 * vocab:
        out.append(
            (
                "warning",
                f"The teacher is barely better than chance: held-out perplexity {t_ppl:.1f} "
                f"with a vocabulary of {vocab:.0f} words (guessing gives {vocab:.0f}). It "
                "has learned almost nothing; train it longer (teacher.build.steps) or on "
                "more text (teacher.build.data).",
            )
        )
        return out
    b_ppl = baseline.val_ppl if baseline else None
    if (
        t_ppl is not None
        and b_ppl is not None
        and "than the student trained alone" not in verdict_text  # the verdict said it
    ):
        if t_ppl >= b_ppl:
            out.append(
                (
                    "warning",
                    f"The teacher is no better than the student trained without it "
                    f"(held-out perplexity {t_ppl:.1f} vs {b_ppl:.1f}): it has nothing to "
                    "teach; use a stronger teacher or a smaller student.",
                )
            )
        elif t_ppl > MARGINAL_RATIO * b_ppl:
            out.append(
                (
                    "warning",
                    f"The teacher is only barely better than the student trained without it "
                    f"(held-out perplexity {t_ppl:.1f} vs {b_ppl:.1f}): distillation has "
                    "little to pass on; use a stronger teacher or a smaller student.",
                )
            )
    return out


def ema(values: Sequence[float | None], weight: float) -> list[float | None]:
    """Exponential moving average (TensorBoard's smoothing slider): ``weight`` 0 keeps the
    curve, 0.99 is very smooth. Debiased at the start so the first points are not pulled
    to zero; gaps (None) stay gaps and do not reset the average."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight!r}")
    out: list[float | None] = []
    last, norm = 0.0, 0.0
    for value in values:
        if value is None:
            out.append(None)
            continue
        last = weight * last + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(last / norm)
    return out


SAMPLED_SUFFIX = "_sampled"


def sample_columns(rows: Sequence[Mapping[str, str]]) -> tuple[str, ...]:
    """The sample table's columns: prompt, then each role's greedy text followed by its
    seeded sampled continuation when the run stored one (``student_sampled``)."""
    columns: list[str] = ["prompt"]
    for role in ROLES:
        if any(role in row for row in rows):
            columns.append(role)
        sampled = role + SAMPLED_SUFFIX
        if any(row.get(sampled) for row in rows):
            columns.append(sampled)
    return tuple(columns)


_WS_RUN = re.compile(r"(\n+|\t+| {3,})")


def visible_text(text: str, *, max_chars: int = 400) -> str:
    """Generated text with its whitespace made visible and compact: a newline is '⏎', a
    run of them '⏎×7', a tab '⇥', three or more spaces '·×5'; the result is one line a
    table cell can wrap. A sample that is mostly newlines used to make a row hundreds
    of pixels tall with nothing visible. Longer than ``max_chars``: cut with '…'."""

    def mark(match: re.Match[str]) -> str:
        run = match.group(0)
        symbol = {"\n": "⏎", "\t": "⇥", " ": "·"}[run[0]]
        return symbol if len(run) == 1 else f"{symbol}×{len(run)}"

    shown = _WS_RUN.sub(mark, text.replace("\r\n", "\n").replace("\r", "\n"))
    if shown != shown.strip(" "):  # leading/trailing spaces are invisible too
        lead = len(shown) - len(shown.lstrip(" "))
        trail = len(shown) - len(shown.rstrip(" "))
        shown = "·" * lead + shown.strip(" ") + "·" * trail
    if not shown:
        return "∅ (nothing generated)"
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"
