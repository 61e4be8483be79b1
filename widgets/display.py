"""Readable results: summary tables, error boxes, and a run's charts as static output.

Used by the panel (inside widgets) and by headless notebooks (as display output), so
that a finished run reads the same in JupyterLab, in an executed papermill notebook and
in the run folder.
"""

from __future__ import annotations

import html
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foundry_kernel import RunHandle, RunState
from foundry_kernel.config import RunConfig
from foundry_kernel.progress import poll_progress, progress_lines
from foundry_kernel.store import RunStore
from foundry_kernel.summary import ROLES, RunSummary
from widgets import report
from widgets.charts import LiveCharts, metric_trace
from widgets.frontend import in_ipython

__all__ = [
    "NotebookRunError",
    "charts_from_store",
    "error_html",
    "run_headless",
    "show_run",
    "summary_html",
]

PROGRESS_EVERY_S = 10.0
"""Progress lines a headless run prints into the executed notebook (not per step)."""

_TABLE = 'style="border-collapse:collapse;margin:4px 0"'
_CELL = "padding:2px 10px;border-bottom:1px solid #ddd"
_BOX_STYLES = {
    "error": "border:1px solid #c62828;background:#fdecea;color:#611a15",
    "warning": "border:1px solid #ef6c00;background:#fff4e5;color:#663c00",
    "info": "border:1px solid #1565c0;background:#e8f1fb;color:#0d3c61",
}


class NotebookRunError(RuntimeError):
    """A run started by a headless notebook did not complete.

    Raised in the notebook's cell so that papermill stops with this message (its
    ``ename``/``evalue``) and ``foundry run`` exits non-zero.
    """


def error_html(title: str, message: str, *, level: str = "error", detail: str = "") -> str:
    """A boxed, escaped message; ``detail`` (a traceback) goes in a collapsed section."""
    style = _BOX_STYLES.get(level, _BOX_STYLES["error"])
    body = html.escape(message).replace("\n", "<br>")
    extra = ""
    if detail:
        extra = f"<details><summary>details</summary><pre>{html.escape(detail)}</pre></details>"
    return (
        f'<div class="foundry-{level}" style="{style};padding:6px 10px;border-radius:4px;'
        f'margin:4px 0"><b>{html.escape(title)}</b><br>{body}{extra}</div>'
    )


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return "–"


def summary_html(result: Mapping[str, Any] | RunSummary) -> str:
    """Teacher vs distilled student vs CE-only student, then samples side by side."""
    summary = result if isinstance(result, RunSummary) else RunSummary.parse(result)
    rows = []
    for name, label in zip(ROLES, ("teacher", "student", "CE-only"), strict=True):
        part = summary.role(name)
        if part is None:
            continue
        cells = [
            _fmt(part.params, ","),
            _fmt(part.val_ppl, ".2f"),
            _fmt(part.val_loss, ".4f"),
            _fmt(part.agreement, ".1%"),
            _fmt(part.val_kl, ".4f"),
            _fmt(part.tokens_per_s, ",.0f"),
        ]
        tds = "".join(f'<td style="{_CELL};text-align:right">{c}</td>' for c in cells)
        rows.append(f'<tr><th style="{_CELL};text-align:left">{label}</th>{tds}</tr>')
    head = "".join(
        f'<th style="{_CELL}">{h}</th>'
        for h in ("", "params", "val ppl", "val loss", "agreement", "val KL", "gen tok/s")
    )
    parts = [f'<table class="foundry-summary" {_TABLE}><tr>{head}</tr>{"".join(rows)}</table>']
    verdict = summary.verdict
    if verdict is not None:  # the sentence, never a bare "-75%" (it includes gap closed)
        level = {"good": "info"}.get(verdict.level, verdict.level)
        title = {"good": "Distillation helped", "warning": "Warning"}.get(verdict.level, "Note")
        parts.append(error_html(title, verdict.text, level=level))
    check = summary.teacher_check
    if check is not None and check.standing in ("near_chance", "no_better", "marginal"):
        if check.message and (verdict is None or check.message not in verdict.text):
            parts.append(error_html("Teacher", check.message, level="warning"))
    parts.append(_samples_html(summary))
    if summary.export_dir:
        parts.append(f"<p>Student saved to <code>{html.escape(summary.export_dir)}</code></p>")
    return "".join(parts)


_SAMPLE_CELL = (
    "font-family:monospace;font-size:12px;max-height:7.5em;overflow:auto;"
    "white-space:pre-wrap;word-break:break-word;max-width:32em"
)
_NOTE = "color:#555;font-size:12px;margin:2px 0"


def _sample_td(text: str, attrs: str = "") -> str:
    """One continuation: whitespace visible and compact (a sample of newlines used to make
    a tall empty row), a few lines at most, scrollable, the raw text on hover."""
    return (
        f'<td style="{_CELL};vertical-align:top"{attrs}><div style="{_SAMPLE_CELL}" '
        f'title="{html.escape(text)}">{html.escape(report.visible_text(text))}</div></td>'
    )


def _head(columns: Sequence[str]) -> str:
    return "".join(
        f'<th style="{_CELL};text-align:left">{html.escape(report.LABELS.get(c, c))}</th>'
        for c in columns
    )


def _samples_html(summary: RunSummary) -> str:
    """Prompt | Model | Greedy | Sampled: teacher, distilled and CE-only continue the same
    prompts, each prompt once; then the distilled student's samples at each validation
    (Step | Greedy | Sampled), so learning shows in words."""
    rows = report.sample_table(summary.raw)
    if not rows:
        return ""
    columns = ["prompt", "model", "greedy"]
    if any(r["sampled"] for r in rows):
        columns.append("sampled")
    body = []
    for row, span in zip(rows, report.prompt_spans(rows), strict=True):
        cells = _sample_td(row["prompt"], f' rowspan="{span}"') if span else ""
        cells += f'<td style="{_CELL};vertical-align:top">{html.escape(row["model"])}</td>'
        cells += "".join(_sample_td(row[c]) for c in columns[2:])
        body.append(f"<tr>{cells}</tr>")
    parts = [
        f'<p style="{_NOTE}">{html.escape(report.sampling_note(summary.raw))}</p>',
        f'<table class="foundry-samples" {_TABLE}><tr>{_head(columns)}</tr>{"".join(body)}</table>',
    ]
    history = report.sample_history(summary.raw, "distill")
    if history:
        multi = len({r["prompt"] for r in history}) > 1
        cols = ["step", *(["prompt"] if multi else []), "greedy", "sampled"]
        lines = "".join(
            f'<tr><td style="{_CELL};text-align:right;vertical-align:top">{r["step"]}</td>'
            + "".join(_sample_td(str(r[c])) for c in cols[1:])
            + "</tr>"
            for r in history
        )
        prompt = "" if multi else f": {html.escape(report.visible_text(history[0]['prompt']))}"
        parts += [
            f'<p style="{_NOTE}"><b>Samples over training</b> (distilled student){prompt}</p>',
            f'<table class="foundry-sample-history" {_TABLE}><tr>{_head(cols)}</tr>{lines}</table>',
        ]
    return "".join(parts)


def outcome_html(handle: RunHandle) -> str:
    """What a finished run amounts to: its summary, or why it stopped."""
    state = handle.state
    if state is RunState.COMPLETED:
        return summary_html(handle.result or {})
    message = handle.error.message if handle.error is not None else str(state)
    level = "warning" if state is RunState.CANCELLED else "error"
    return error_html(f"Run {handle.id} {state}", message, level=level)


def charts_from_store(store: RunStore, run_id: str, *, live: bool = False) -> LiveCharts:
    """A run's complete charts from the store (the handle keeps only recent history)."""
    charts = LiveCharts(live=live)
    names = [name for name in store.metric_names(run_id) if metric_trace(name) is not None]
    rows = store.metrics(run_id, names) if names else []  # ordered by name, then step
    t0 = min((row.time for row in rows if row.name.startswith("mem/")), default=0.0)
    for name, group in itertools.groupby(rows, key=lambda row: row.name):
        points = list(group)
        if name.startswith("mem/"):  # memory samples are numbered, not stepped: use time
            charts.extend(name, (r.time - t0 for r in points), (r.value for r in points))
        else:
            charts.extend(name, (r.step for r in points), (r.value for r in points))
    return charts


def show_run(run: RunHandle | str, *, runs_dir: str | Path | None = None) -> LiveCharts:
    """Display a run's charts (static in headless kernels) and its outcome."""
    run_id = run.id if isinstance(run, RunHandle) else run
    root = run.runs_dir if isinstance(run, RunHandle) else runs_dir
    if root is None:
        raise ValueError("show_run(run_id) needs runs_dir")
    with RunStore(root, read_only=True) as store:
        charts = charts_from_store(store, run_id)
        record = store.get_run(run_id, damaged_ok=True)  # shown, never acted on
    if in_ipython():
        from IPython.display import HTML, display

        charts.show()
        if record.damaged:
            title = f"Run {run_id}: part of its record could not be read"
            display(HTML(error_html(title, "; ".join(record.damage), level="warning")))
        if isinstance(run, RunHandle):
            display(HTML(outcome_html(run)))
        elif record.state == "completed":
            display(HTML(summary_html(record.summary)))
        else:
            display(HTML(error_html(f"Run {run_id} {record.state}", record.error or "")))
    return charts


def run_headless(
    config: RunConfig, *, run_id: str | None = None, timeout_s: float | None = None
) -> RunHandle:
    """Start a run, wait for it, show its charts and outcome; raise if it did not complete.

    Waiting matters: nbclient (papermill, nbval) ends the kernel after the last cell and
    does not wait for background threads, so a cell that only started the run would
    leave an executed notebook with nothing in it. ``run_id`` names a run that
    ``foundry run`` prepared in the store (the executed notebook sits in its folder);
    it is started from scratch with this config.
    """
    import foundry_kernel

    handle = foundry_kernel.start(config, resume=run_id) if run_id else foundry_kernel.start(config)
    print(f"run {handle.id} started · run store {handle.runs_dir}", flush=True)
    _wait_with_progress(handle, timeout_s)
    show_run(handle)
    if handle.state is not RunState.COMPLETED:
        message = handle.error.message if handle.error is not None else "no reason recorded"
        raise NotebookRunError(f"run {handle.id} {handle.state}: {message}")
    return handle


def _wait_with_progress(
    handle: RunHandle,
    timeout_s: float | None,
    *,
    every_s: float = PROGRESS_EVERY_S,
    poll_s: float = 1.0,
) -> None:
    """Wait for the run, printing the one progress line every view shows
    (``phase · n/N · elapsed < ETA · rates``): at each phase change and at most every
    ``every_s``, never the same line twice (``foundry_kernel.progress``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def over(seconds: float) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            handle.cancel(f"the notebook's wait_timeout_s ({timeout_s:g} s) ran out")
            handle.wait()
            return True
        handle.wait(seconds)
        return handle.done

    snapshots = poll_progress(lambda: handle.progress, over, poll_s=poll_s)
    for line in progress_lines(snapshots, every_s=every_s):
        print(f"  {line}", flush=True)
    print(f"run {handle.id} {handle.state} in {handle.duration_s or 0:.1f} s", flush=True)
