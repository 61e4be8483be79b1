"""One self-contained HTML file of chosen runs, for stakeholders without a server.

``foundry dashboard --export report.html`` and the dashboard's download link write it:
the runs table, each run's plain-language verdict and warnings, its charts, its samples,
and for several runs an overlay of their curves, the settings that differ, and a
parallel-coordinates view of a grid. plotly.js is embedded inline from the installed
``plotly`` package (no CDN), so the file opens with no network and no kernel.

Why a separate module: the numbers come from the read-only queries of
:mod:`widgets.report`; this module only lays them out, with no ipywidgets, so the CLI and
the dashboard produce the same file. Everything a user typed (run names, grid values,
samples) is HTML-escaped in the page and passed through :func:`plot_safe` in the charts,
and chart JSON is embedded with every ``<`` written as ``\\u003c`` so no string can close
the ``<script>`` element that holds it.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from foundry_kernel.errors import StoreError
from foundry_kernel.paths import default_runs_dir
from foundry_kernel.store import DB_FILENAME, RunRecord, RunStore
from widgets import report
from widgets.plot_text import plot_safe

__all__ = [
    "OVERLAY_METRICS",
    "PLOTLY_CONFIG",
    "chart_html",
    "default_run_ids",
    "notices_html",
    "overlay_figure",
    "parallel_figure",
    "render_report",
    "sample_history_html",
    "samples_section_html",
    "samples_table_html",
    "write_report",
]

#: plotly.js 3's "Share chart..." uploads the data to Plotly Cloud: never offered.
PLOTLY_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "showSendToCloud": False,
    "showEditInChartStudio": False,
    "plotlyServerURL": "",
    "modeBarButtonsToRemove": ["sendChartToCloud", "sendDataToCloud"],
}

#: Curves worth overlaying across runs: (metric, chart title, y axis title).
OVERLAY_METRICS: dict[str, tuple[str, str]] = {
    "train/loss": ("Training loss", "loss (lower is better)"),
    "val/ppl": ("Held-out perplexity during training", "perplexity (lower is better)"),
    "val/loss": ("Held-out loss during training", "loss (lower is better)"),
}

_LEVEL_STYLES = {
    "good": "border-color:#15803d;background:#f0fdf4;color:#14532d",
    "warning": "border-color:#c2410c;background:#fff7ed;color:#7c2d12",
    "info": "border-color:#1d4ed8;background:#eff6ff;color:#1e3a8a",
}
_LEVEL_TITLES = {"good": "Result", "warning": "Warning", "info": "Note"}
_MAX_POINTS = 600  # a curve in a file needs no more points than a screen has pixels

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111827}
h1{margin:0 0 4px 0} h2{margin:28px 0 4px 0;border-bottom:1px solid #e5e7eb}
h3{margin:18px 0 4px 0} .note{color:#4b5563;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:4px 0 12px 0}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}
.notice{border:1px solid;border-left-width:5px;border-radius:4px;padding:6px 10px;margin:6px 0}
.sample{font-family:ui-monospace,monospace;font-size:12px;max-height:7.5em;overflow:auto;
 white-space:pre-wrap;word-break:break-word;max-width:36em}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:8px}
.chart{min-height:340px}
.state-completed{color:#15803d;font-weight:600}.state-failed,.state-timed_out{color:#b91c1c;
font-weight:600}.state-running{color:#2563eb;font-weight:600}
"""


# --- figures (also used by the dashboard) -------------------------------------------------


def _layout(title: str, x_title: str, y_title: str, *, log_y: bool = False) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}, "type": "log" if log_y else "linear"},
        "template": "plotly_white",
        "height": 340,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 90},
        "legend": {"orientation": "h", "y": -0.3},
    }


def overlay_figure(
    store: RunStore,
    runs: Sequence[RunRecord],
    metric: str,
    *,
    smoothing: float = 0.0,
    log_y: bool = False,
    max_points: int = _MAX_POINTS,
) -> go.Figure:
    """One metric of several runs on one chart (a tracker's "overlay runs"), optionally
    EMA-smoothed (:func:`report.ema`, the raw curve kept faint) and on a log scale."""
    title, y_title = OVERLAY_METRICS.get(metric, (report.metric_label(metric), metric))
    fig = go.Figure(
        layout=_layout(f"{title}: runs overlaid", "training step", y_title, log_y=log_y)
    )
    for run in runs:
        series = report.metric_series(store, run.run_id, [metric], max_points=max_points)
        if metric not in series:
            continue
        xs, ys = series[metric]
        label = f"{run.name} ({run.run_id})"
        if smoothing > 0:
            fig.add_scatter(
                x=xs, y=ys, name=label, mode="lines", opacity=0.25, showlegend=False,
                legendgroup=run.run_id, hoverinfo="skip",
            )  # fmt: skip
            ys = report.ema(ys, smoothing)
        fig.add_scatter(x=xs, y=ys, name=label, mode="lines", legendgroup=run.run_id)
    if not fig.data:
        fig.add_annotation(
            text="no values recorded yet", showarrow=False, xref="paper", yref="paper"
        )
    return fig


def parallel_figure(data: Mapping[str, Any]) -> go.Figure | None:
    """A grid as parallel coordinates (hyperparameters -> held-out perplexity, gap
    closed), coloured by perplexity; None when :func:`report.parallel_data` found none."""
    dims = list(data.get("dimensions", ()))
    if len(dims) < 3:  # at least one varying setting plus the two results
        return None
    ppl = dims[-2]["values"]
    plotted = []
    for dim in dims:
        values = [v if v is not None else float("nan") for v in dim["values"]]
        entry: dict[str, Any] = {"label": dim["label"], "values": values}
        if "tickvals" in dim:
            entry.update(tickvals=dim["tickvals"], ticktext=dim["ticktext"])
        plotted.append(entry)
    fig = go.Figure(
        layout={
            "title": {"text": "Grid: settings -> held-out perplexity and gap closed"},
            "template": "plotly_white",
            "height": 380,
            "margin": {"l": 80, "r": 80, "t": 80, "b": 30},
        }
    )
    fig.add_trace(
        go.Parcoords(
            dimensions=plotted,
            line={
                "color": [v if v is not None else float("nan") for v in ppl],
                "colorscale": "Viridis",
                "reversescale": True,
                "showscale": True,
                "colorbar": {"title": {"text": "perplexity"}},
            },
        )
    )
    return fig


def _line_figure(series: Mapping[str, report.Series], title: str, y_title: str) -> go.Figure:
    fig = go.Figure(layout=_layout(title, "training step", y_title))
    for name, (xs, ys) in series.items():
        fig.add_scatter(
            x=xs,
            y=ys,
            name=report.metric_label(name),
            mode="lines+markers" if len(xs) <= 50 else "lines",
            line={"dash": "dot" if "/val/" in name else None},
        )
    if not series:
        fig.add_annotation(
            text="no values recorded yet", showarrow=False, xref="paper", yref="paper"
        )
    return fig


def _comparison_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    colours = {"teacher": "#6b7280", "student": "#2563eb", "baseline": "#ea580c"}
    fig = go.Figure(
        layout=_layout(
            "Held-out perplexity: teacher vs students (lower is better)", "", "perplexity"
        )
    )
    fig.add_bar(
        x=[str(r["model"]).split(" (")[0] for r in rows],
        y=[r["val_ppl"] for r in rows],
        marker={"color": [colours.get(str(r["role"]), "#111827") for r in rows]},
    )
    return fig


def _script_json(value: Any) -> str:
    """JSON safe inside ``<script>``: no ``<`` at all, so no ``</script>`` or ``<!--``."""
    return json.dumps(value, allow_nan=False, default=str).replace("<", "\\u003c")


def _spec(fig: go.Figure) -> dict[str, Any]:
    # NaN is not JSON: plotly's own encoder writes null for it (a gap), as wanted here
    spec: dict[str, Any] = plot_safe(json.loads(fig.to_json()))
    return spec


def chart_html(fig: go.Figure, element_id: str) -> str:
    """A ``<div>`` and the script that draws ``fig`` into it (plotly.js loaded once in
    the page's head)."""
    spec = _spec(fig)
    payload = _script_json(
        {"data": spec.get("data", []), "layout": spec.get("layout", {}), "config": PLOTLY_CONFIG}
    )
    safe_id = html.escape(element_id)
    return (
        f'<div class="chart" id="{safe_id}"></div><script>(function(){{var f={payload};'
        f'Plotly.newPlot("{safe_id}",f.data,f.layout,f.config);}})();</script>'
    )


# --- html pieces --------------------------------------------------------------------------


def _cell(key: str, value: Any) -> str:
    text = html.escape(report.fmt(key, value))
    if key == "state" and isinstance(value, str):
        return f'<span class="state-{html.escape(value)}">{text}</span>'
    return text


def _table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], empty: str) -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="note">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(report.LABELS.get(c, c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(c, row.get(c))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def notices_html(notices: Iterable[report.Notice]) -> str:
    """Verdict and warnings as coloured boxes with a word for the level (not colour only)."""
    parts = []
    for level, text in notices:
        style = _LEVEL_STYLES.get(level, _LEVEL_STYLES["info"])
        title = _LEVEL_TITLES.get(level, "Note")
        parts.append(
            f'<div class="notice notice-{html.escape(level)}" style="{style}">'
            f"<b>{title}:</b> {html.escape(text)}</div>"
        )
    return "".join(parts)


def _sample_box(text: str) -> str:
    """A continuation, whitespace visible and compact (:func:`report.visible_text`), in a
    box a few lines tall at most that scrolls; the raw text on hover."""
    return (
        f'<div class="sample" title="{html.escape(text)}">'
        f"{html.escape(report.visible_text(text))}</div>"
    )


def _sample_cell(text: str) -> str:
    return f"<td>{_sample_box(text)}</td>"


def samples_table_html(rows: Sequence[Mapping[str, str]]) -> str:
    """Prompt | Model | Greedy | Sampled (:func:`report.sample_table` rows): each prompt
    once, spanning the models that continued it, so teacher, distilled and CE-only read
    one under the other. The Sampled column is left out for runs that never had one."""
    if not rows:
        return '<p class="note">No samples.</p>'
    columns = [c for c in report.SAMPLE_TABLE_COLUMNS if c != "sampled"]
    if any(row.get("sampled") for row in rows):
        columns.append("sampled")
    head = "".join(f"<th>{html.escape(report.LABELS.get(c, c))}</th>" for c in columns)
    body: list[str] = []
    for row, span in zip(rows, report.prompt_spans(rows), strict=True):
        cells = [f'<td rowspan="{span}">{_sample_box(row.get("prompt", ""))}</td>'] if span else []
        cells.append(f"<td>{html.escape(row.get('model', ''))}</td>")
        cells += [_sample_cell(row.get(c, "")) for c in columns[2:]]
        body.append(f'<tr class="{"first" if span else "more"}">{"".join(cells)}</tr>')
    return (
        f'<table class="samples"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def sample_history_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """Step | (Prompt) | Greedy | Sampled (:func:`report.sample_history` rows): one
    model's continuations at each validation, so its learning shows in words. The prompt
    is named once above the table when every row has the same one."""
    if not rows:
        return (
            '<p class="note">No samples during training (runs before they were kept, or '
            "eval.checkpoint_samples=0).</p>"
        )
    prompts = list(dict.fromkeys(str(row.get("prompt", "")) for row in rows))
    columns = list(report.SAMPLE_HISTORY_COLUMNS)
    intro = ""
    if len(prompts) == 1:
        columns.remove("prompt")
        intro = (
            f'<p class="note">Prompt: <span class="prompt">'
            f"{html.escape(report.visible_text(prompts[0]))}</span></p>"
        )
    head = "".join(f"<th>{html.escape(report.LABELS.get(c, c))}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(row.get(c, '')))}</td>"
            if c == "step"
            else _sample_cell(str(row.get(c, "")))
            for c in columns
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'{intro}<table class="samples sample-history"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def samples_section_html(run: RunRecord) -> str:
    """What a reader judges the models by: the final samples (teacher, distilled, CE-only;
    greedy and sampled) and the distilled student's samples over training (the CE-only
    twin's folded away), with how to read them. The dashboard and the report share it."""
    parts = [
        "<h3>Sample generations</h3>",
        f'<p class="note">Each model continues the same prompt. '
        f"{html.escape(report.sampling_note(run))}</p>",
        samples_table_html(report.sample_table(run)),
        "<h3>Samples over training</h3>",
        '<p class="note">The distilled student at each validation, same prompt and seed: '
        "what it learned, in words.</p>",
        sample_history_html(report.sample_history(run, "distill")),
    ]
    baseline = report.sample_history(run, "baseline")
    if baseline:
        parts.append(
            "<details><summary>The CE-only student over training</summary>"
            f"{sample_history_html(baseline)}</details>"
        )
    return f'<div class="samples-section">{"".join(parts)}</div>'


def _differences_html(runs: Sequence[RunRecord]) -> str:
    rows = report.config_differences(runs)
    if not rows:
        return '<p class="note">The chosen runs have the same settings.</p>'
    head = "<th>Setting</th>" + "".join(
        f"<th>{html.escape(run.name)}<br><span class='note'>{html.escape(run.run_id)}</span></th>"
        for run in runs
    )
    body = "".join(
        f"<tr><td>{html.escape(row['setting'])}</td>"
        + "".join(f"<td>{html.escape(report.fmt('', row.get(run.run_id)))}</td>" for run in runs)
        + "</tr>"
        for row in rows
    )
    return f"<table class='differences'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_section(store: RunStore, run: RunRecord, index: int) -> str:
    row = report.run_row(run)
    parts = [
        f"<h2>{html.escape(run.name)} <span class='note'>{html.escape(run.run_id)} · "
        f"{_cell('state', run.state)} · {html.escape(report.recipe(run.config))}</span></h2>",
        notices_html(report.run_warnings(run)),
    ]
    if run.error:
        parts.append(notices_html([("warning", f"The run stopped: {run.error}")]))
    parts.append(
        _table(
            ("teacher", "student", "duration_s", "gap_closed", "verdict"),
            [row],
            empty="",
        )
    )
    comparison = report.comparison(run)
    parts.append("<h3>Teacher vs students</h3>")
    parts.append(_table(report.COMPARISON_COLUMNS, comparison, "No results yet."))
    loss = report.metric_series(store, run.run_id, report.LOSS_METRICS, max_points=_MAX_POINTS)
    ppl = report.metric_series(store, run.run_id, report.PPL_METRICS, max_points=_MAX_POINTS)
    figures = [
        _line_figure(loss, "Training loss", "loss (lower is better)"),
        _line_figure(ppl, "Held-out perplexity during training", "perplexity (lower is better)"),
    ]
    if comparison:
        figures.append(_comparison_figure(comparison))
    charts = "".join(chart_html(f, f"run{index}-chart{i}") for i, f in enumerate(figures))
    parts.append(f'<div class="charts">{charts}</div>')
    parts.append(samples_section_html(run))
    return "".join(parts)


def default_run_ids(store: RunStore) -> list[str]:
    """All finished (completed) runs, newest first: what a report holds unless told."""
    return [run.run_id for run in store.list_runs() if run.state == "completed"]


def render_report(
    store: RunStore, run_ids: Sequence[str] | None = None, *, now: float | None = None
) -> str:
    """The whole report as one HTML string (plotly.js inline). ``run_ids`` default to
    :func:`default_run_ids`; an id not in the store is a clear error naming it."""
    known = {run.run_id: run for run in store.list_runs()}
    chosen = list(run_ids) if run_ids else default_run_ids(store)
    missing = [rid for rid in chosen if rid not in known]
    if missing:
        raise StoreError(
            f"--runs: no run {', '.join(missing)} in {store.root}; `foundry runs` lists them"
        )
    runs = [known[rid] for rid in dict.fromkeys(chosen)]
    stamp = datetime.fromtimestamp(time.time() if now is None else now).strftime("%Y-%m-%d %H:%M")
    rows = [report.run_row(run) for run in runs]
    columns = report.with_damage_column(report.RUN_COLUMNS, rows)
    body = [
        "<h1>Foundry: distillation results</h1>",
        f'<p class="note">{len(runs)} run{"s" if len(runs) != 1 else ""} from '
        f"<code>{html.escape(store.root.name)}</code>, written {stamp}. Perplexity: how "
        "surprised a model is by text it never saw (lower is better). This file needs no "
        "network and no server.</p>",
        "<h2>Runs</h2>",
        _table(columns, rows, "No finished runs to report."),
    ]
    if len(runs) > 1:
        body.append("<h2>Runs side by side</h2>")
        overlays = [
            chart_html(overlay_figure(store, runs, metric), f"overlay-{i}")
            for i, metric in enumerate(("train/loss", "val/ppl"))
        ]
        body.append(f'<div class="charts">{"".join(overlays)}</div>')
        body.append("<h3>Settings that differ</h3>")
        body.append(_differences_html(runs))
        parallel = parallel_figure(report.parallel_data(runs))
        if parallel is not None:
            body.append(chart_html(parallel, "parallel"))
    body += [_run_section(store, run, i) for i, run in enumerate(runs)]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # no outside fetches at all: the page needs none, and a viewer's browser is told so
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:; "
        'font-src data:">'
        f"<title>Foundry report · {len(runs)} runs</title><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>"
    )


def write_report(
    runs_dir: Path | str | None, target: Path | str, run_ids: Sequence[str] | None = None
) -> Path:
    """Render the report of ``runs_dir``'s store (opened read-only) into ``target``."""
    root = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if not (root / DB_FILENAME).is_file():
        raise StoreError(
            f"--runs-dir: no run store in {root} (no {DB_FILENAME}); run something first"
        )
    with RunStore(root, read_only=True) as store:
        text = render_report(store, run_ids)
    path = Path(target).expanduser()
    path.write_text(text, encoding="utf-8")
    return path
