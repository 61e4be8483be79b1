"""The stakeholder dashboard's view: read-only tables and Plotly charts over the run store.

Why it is built this way: Voila forwards widget (comm) messages from any viewer to the
kernel, so every callback here can be triggered by anyone holding the page. The kernel
therefore holds only a :class:`RunStore` opened with ``read_only=True`` (the constructor
refuses anything else) and widgets that *select what to display*: Dropdowns and a
multi-select whose values can only be ids, states, modes or tags already in the store,
checkboxes (hide failed runs, log scale, offer the offline report) and a smoothing
slider. Every callback checks the value against what it listed and otherwise ignores it.
There is no Text input, no button that starts, stops or changes anything, no callback
that evaluates what a viewer sends, and downloads are ``data:`` links built from what is
shown (nothing is written on the server). While runs are running a timer re-reads the
store every :data:`REFRESH_S` seconds (read-only) so their rows and curves stay live.
All numbers come from :mod:`widgets.report`; this module only lays them out.

This module must not import the control panel (``widgets.panel`` and friends): the
dashboard kernel should not even have run-starting code loaded.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from foundry_kernel.errors import FoundryError
from foundry_kernel.paths import default_runs_dir
from foundry_kernel.store import DB_FILENAME, RunStore
from widgets import html_report, report
from widgets.plot_text import plot_safe

__all__ = [
    "Dashboard",
    "bar_figure",
    "build_dashboard",
    "chart",
    "figure_of",
    "html_table",
    "line_figure",
    "open_store",
]

_COLOURS = {"teacher": "#6b7280", "student": "#2563eb", "baseline": "#ea580c"}
_TABLE_CSS = (
    "border-collapse:collapse;font-size:13px;margin:4px 0 12px 0;"
    "font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif"
)
_CELL_CSS = (
    "border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top;"
    "line-height:1.4"
)
_HEAD_CSS = _CELL_CSS + ";background:#f3f4f6;font-weight:600"
_BODY_CSS = _CELL_CSS + ";white-space:nowrap"
_STATE_COLOURS = {
    "completed": "#15803d",
    "running": "#2563eb",
    "pending": "#6b7280",
    "cancelling": "#b45309",
    "cancelled": "#b45309",
    "failed": "#b91c1c",
    "timed_out": "#b91c1c",
}
_CHART_HEIGHT = 340
REFRESH_S = 10.0
"""How often the page re-reads the store while any run is running."""
_ANY = "any"
_LIVE_STATES = frozenset({"pending", "running", "cancelling"})
# plotly.js 3 shows a "Share chart..." button that uploads the data to Plotly Cloud: a
# results dashboard must not offer to send its numbers to a third party.
_PLOTLY_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "showSendToCloud": False,
    "showEditInChartStudio": False,
    "plotlyServerURL": "",
    "modeBarButtonsToRemove": ["sendChartToCloud", "sendDataToCloud"],
}


# --- pure renderers (strings and figures; easy to test) -----------------------------------


def _cell(key: str, value: Any, *, pre: bool = False) -> str:
    """One escaped cell: every string may come from a config a user typed."""
    text = html.escape(report.fmt(key, value))
    if key == "state" and isinstance(value, str):
        colour = _STATE_COLOURS.get(value, "#111827")
        return f'<span style="color:{colour};font-weight:600">{text}</span>'
    if pre:
        return f'<pre style="margin:0;white-space:pre-wrap;font-size:12px">{text}</pre>'
    return text


def html_table(
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    empty: str = "Nothing yet.",
    pre: bool = False,
) -> str:
    """An HTML table with plain-language headers; all content is HTML-escaped.

    ``pre=True`` keeps line breaks and spaces (generated text).
    """
    if not rows:
        return f'<p style="color:#6b7280">{html.escape(empty)}</p>'
    head = "".join(
        f'<th style="{_HEAD_CSS}">{html.escape(report.LABELS.get(c, c))}</th>' for c in columns
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td style="{_BODY_CSS}">{_cell(c, row.get(c), pre=pre)}</td>' for c in columns)
        for row in rows
    )
    return (
        f'<div style="overflow-x:auto"><table style="{_TABLE_CSS}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _heading(text: str, note: str = "") -> W.HTML:
    extra = f'<div style="color:#4b5563;font-size:13px">{html.escape(note)}</div>' if note else ""
    return W.HTML(f'<h3 style="margin:18px 0 2px 0">{html.escape(text)}</h3>{extra}')


def _colour_for(name: str) -> str | None:
    if name.startswith("baseline/"):
        return _COLOURS["baseline"]
    return None


def _layout(title: str, x_title: str, y_title: str, *, bottom: int = 50) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "template": "plotly_white",
        "height": _CHART_HEIGHT,
        "margin": {"l": 60, "r": 20, "t": 50, "b": bottom},
        "legend": {"orientation": "h", "y": -0.3},
    }


def line_figure(
    series: Mapping[str, report.Series], *, title: str, x_title: str, y_title: str
) -> go.Figure:
    """A titled line chart, one trace per metric, labelled for a non-engineer."""
    fig = go.Figure(layout=_layout(title, x_title, y_title, bottom=90))
    for name, (xs, ys) in series.items():
        fig.add_scatter(
            x=xs,
            y=ys,
            name=report.metric_label(name),
            mode="lines+markers" if len(xs) <= 50 else "lines",
            line={"color": _colour_for(name), "dash": "dot" if "/val/" in name else None},
        )
    if not series:
        fig.add_annotation(
            text="no values recorded yet", showarrow=False, xref="paper", yref="paper"
        )
    return fig


def bar_figure(
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str,
    y_title: str,
    colours: Sequence[str] | None = None,
) -> go.Figure:
    """A titled bar chart (perplexities side by side)."""
    fig = go.Figure(layout=_layout(title, "", y_title, bottom=80))
    fig.add_bar(
        x=list(labels), y=list(values), marker={"color": list(colours)} if colours else None
    )
    return fig


def chart(fig: go.Figure) -> W.Output:
    """A figure as an Output widget holding Plotly's mime bundle in its *state*.

    Why not ``go.FigureWidget``: in plotly 7 every FigureWidget carries the whole
    plotly.js bundle in its synced state (~4.7 MB each; a page with five charts sent
    ~25 MB over the websocket, again on every run change), and it would accept
    relayout/restyle messages from viewers. The mime bundle is plain JSON rendered by
    the ``jupyterlab-plotly`` extension whose script the browser loads (and caches) once.
    Setting ``outputs`` directly (rather than ``with out: display(fig)``) puts the chart in
    the widget state, which Voila sends to a page whenever it connects. Every string in it
    is escaped here (:func:`plot_safe`), the one exit of every figure on this page: Plotly
    renders tags in titles, labels and hover text, and run names are typed by users.
    """
    spec = plot_safe(json.loads(fig.to_json()))
    bundle = {
        "application/vnd.plotly.v1+json": {
            "data": spec.get("data", []),
            "layout": spec.get("layout", {}),
            "config": _PLOTLY_CONFIG,
        },
        "text/plain": str(fig.layout.title.text or "chart"),
    }
    out = W.Output(layout={"min_height": f"{_CHART_HEIGHT}px"})
    out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
    return out


def figure_of(widget: W.Output) -> dict[str, Any]:
    """The Plotly spec (data, layout) a :func:`chart` shows (for tests and reports)."""
    return dict(widget.outputs[0]["data"]["application/vnd.plotly.v1+json"])


def _comparison_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    return bar_figure(
        [str(r["model"]).split(" (")[0] for r in rows],
        [r["val_ppl"] for r in rows],
        title="Held-out perplexity: teacher vs students (lower is better)",
        y_title="perplexity",
        colours=[_COLOURS.get(str(r["role"]), "#111827") for r in rows],
    )


def _batch_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    labels = [f"{r['name']} ({r['settings']})" if r["settings"] != "—" else r["name"] for r in rows]
    return bar_figure(
        labels,
        [r["student_ppl"] for r in rows],
        title="Batch members: distilled student's held-out perplexity (lower is better)",
        y_title="perplexity",
        colours=[_COLOURS["student"]] * len(rows),
    )


# --- store --------------------------------------------------------------------------------


def open_store(runs_dir: Path | str | None = None) -> RunStore | None:
    """The run store opened READ-ONLY, or None when nothing has been run there yet."""
    root = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if not (root / DB_FILENAME).is_file():
        return None
    return RunStore(root, read_only=True)


# --- the dashboard ------------------------------------------------------------------------


class Dashboard:
    """The whole stakeholder view; ``root`` is the widget to display.

    Callbacks only read: they look up the chosen id among the ids listed at start-up,
    query :mod:`widgets.report` and replace what is shown.
    """

    def __init__(self, store: RunStore | None, *, runs_dir: Path | str | None = None) -> None:
        if store is not None and not store.read_only:
            raise ValueError("the dashboard only accepts a RunStore opened with read_only=True")
        self.store = store
        self.runs_dir = Path(runs_dir) if runs_dir else (store.root if store else None)
        self.message = W.HTML()
        self.run_picker = W.Dropdown(description="Run:", layout={"width": "640px"})
        self.batch_picker = W.Dropdown(description="Batch:", layout={"width": "640px"})
        self.run_view = W.VBox()
        self.batch_view = W.VBox()
        # filters of the runs table (values limited to what the store holds)
        self.state_filter = W.Dropdown(description="State:", layout={"width": "220px"})
        self.mode_filter = W.Dropdown(description="Mode:", layout={"width": "220px"})
        self.tag_filter = W.Dropdown(description="Tag:", layout={"width": "300px"})
        self.hide_failed = W.Checkbox(value=True, description="hide failed runs", indent=False)
        self.table_view = W.HTML()
        self.downloads = W.HTML()
        # overlay of any runs
        self.overlay_picker = W.SelectMultiple(
            description="Overlay:", rows=6, layout={"width": "640px"}
        )
        self.metric_picker = W.Dropdown(
            description="Curve:",
            options=[(title, name) for name, (title, _) in html_report.OVERLAY_METRICS.items()],
            value="train/loss",
            layout={"width": "420px"},
        )
        self.smoothing = W.FloatSlider(
            value=0.0, min=0.0, max=0.95, step=0.05, description="Smoothing:",
            continuous_update=False, readout_format=".2f",
        )  # fmt: skip
        self.log_scale = W.Checkbox(value=False, description="log scale", indent=False)
        self.offer_report = W.Checkbox(
            value=False, description="offer an offline HTML report of these runs", indent=False
        )
        self.overlay_view = W.VBox()
        self._run_ids: frozenset[str] = frozenset()
        self._batch_ids: frozenset[str] = frozenset()
        self._table: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.root = W.VBox(layout={"padding": "0 8px 24px 8px"})
        self._build()

    # -- layout --

    def _build(self) -> None:
        if self.store is None:
            where = html.escape(str(self.runs_dir or default_runs_dir()))
            self.root.children = (W.HTML(f"<p>No runs yet in <code>{where}</code>.</p>"),)
            return
        table = report.runs_table(self.store)
        self._table = table
        count = f"{len(table)} run{'s' if len(table) != 1 else ''}"
        self.header = W.HTML(
            f'<div style="color:#4b5563">{count} in the runs folder '
            f"<code>{html.escape(self.store.root.name)}</code> · read-only view</div>"
        )
        self.root.children = (
            self.header,
            self.message,
            _heading("All runs", "Newest first. Perplexity: how surprised a model is by new text."),
            W.HBox([self.state_filter, self.mode_filter, self.tag_filter, self.hide_failed]),
            self.table_view,
            self.downloads,
            _heading(
                "Compare runs",
                "Pick any runs (Ctrl/Shift-click) to overlay their curves and see only the "
                "settings that differ.",
            ),
            self.overlay_picker,
            W.HBox([self.metric_picker, self.smoothing, self.log_scale]),
            self.offer_report,
            self.overlay_view,
            _heading("One run in detail"),
            self.run_picker,
            self.run_view,
            _heading("Batches", "Runs started together with different settings."),
            self.batch_picker,
            self.batch_view,
        )
        self._setup_filters(table)
        self._setup_run_picker(table)
        self._setup_overlay(table)
        self._setup_batch_picker()
        self._schedule_refresh()

    def _setup_filters(self, table: Sequence[Mapping[str, Any]]) -> None:
        states = sorted({str(r["state"]) for r in table})
        modes = sorted({str(r["mode"]) for r in table if r.get("mode")})
        tags = sorted({t for r in table for t in r.get("tags") or ()})
        self.state_filter.options = [_ANY, *states]
        self.mode_filter.options = [_ANY, *modes]
        self.tag_filter.options = [_ANY, *tags]
        for picker in (self.state_filter, self.mode_filter, self.tag_filter):
            picker.value = _ANY  # shown as chosen, not a blank box
        for widget in (self.state_filter, self.mode_filter, self.tag_filter, self.hide_failed):
            widget.observe(self._on_filter, names="value")
        self.show_table()

    def _filtered(self) -> tuple[list[Mapping[str, Any]], int]:
        """The table rows the filters keep; a value not among the options is ignored."""
        state, mode, tag = self.state_filter.value, self.mode_filter.value, self.tag_filter.value
        return report.filter_rows(
            self._table,
            states=[state] if state in self.state_filter.options and state != _ANY else [],
            modes=[mode] if mode in self.mode_filter.options and mode != _ANY else [],
            tag=tag if tag in self.tag_filter.options and tag != _ANY else None,
            hide_failed=bool(self.hide_failed.value),
        )

    def show_table(self) -> None:
        """The runs table as filtered, with the hidden count and CSV/JSON downloads."""
        rows, hidden = self._filtered()
        note = ""
        if hidden:
            note = (
                f'<div class="foundry-hidden" style="color:#6b7280;font-size:13px">'
                f"{hidden} failed hidden (untick “hide failed runs” to show them)</div>"
            )
        columns = report.with_damage_column(report.RUN_COLUMNS, rows)
        self.table_view.value = note + html_table(columns, rows, empty="No runs match.")
        keys = ("run_id", *columns, "mode", "tags", "error")
        self.downloads.value = (
            '<div style="font-size:13px">Download this table: '
            + _data_link(report.table_csv(keys, rows), "runs.csv", "text/csv", "CSV")
            + " · "
            + _data_link(report.table_json(keys, rows), "runs.json", "application/json", "JSON")
            + "</div>"
        )

    def _setup_overlay(self, table: Sequence[Mapping[str, Any]]) -> None:
        self.overlay_picker.options = report.run_choices(table)
        completed = [r["run_id"] for r in table if r["state"] == "completed"][:3]
        self.overlay_picker.value = tuple(completed)
        for widget in (
            self.overlay_picker,
            self.metric_picker,
            self.smoothing,
            self.log_scale,
            self.offer_report,
        ):
            widget.observe(self._on_overlay, names="value")
        self.show_overlay()

    def show_overlay(self) -> None:
        """Overlay the chosen runs; ids, metrics or a smoothing not offered are ignored."""
        if self.store is None:
            return
        ids = [rid for rid in self.overlay_picker.value if rid in self._run_ids]
        metric = self.metric_picker.value
        smoothing = self.smoothing.value
        if metric not in html_report.OVERLAY_METRICS or not isinstance(smoothing, float):
            return
        smoothing = min(max(smoothing, 0.0), 0.95)
        if not ids:
            self._replace(self.overlay_view, (W.HTML('<p style="color:#6b7280">Pick runs.</p>'),))
            return
        try:
            runs = [self.store.get_run(rid, damaged_ok=True) for rid in ids]
            fig = html_report.overlay_figure(
                self.store, runs, metric, smoothing=smoothing, log_y=bool(self.log_scale.value)
            )
            children: list[W.Widget] = [chart(fig), W.HTML(_differences_html(runs))]
            parallel = html_report.parallel_figure(report.parallel_data(runs))
            if parallel is not None:
                children.append(chart(parallel))
            if self.offer_report.value:
                page = html_report.render_report(self.store, ids)
                children.append(
                    W.HTML(
                        "<div>"
                        + _data_link(page, "foundry-report.html", "text/html", "Download the "
                                     "offline report (one HTML file, opens without a server)")
                        + "</div>"
                    )
                )  # fmt: skip
        except FoundryError as exc:
            self._show_error(f"Could not compare these runs: {exc}")
            return
        self._replace(self.overlay_view, tuple(children))

    # -- live refresh (read-only re-reads while something is running) --

    def _schedule_refresh(self) -> None:
        if not any(r["state"] in _LIVE_STATES for r in self._table):
            return
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            return
        if loop.is_running():  # a kernel (Voila); a plain script refreshes by calling refresh()
            self._timer = loop.call_later(REFRESH_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            self.refresh()
        finally:
            self._schedule_refresh()

    def refresh(self) -> None:
        """Re-read the runs table and what is shown of running runs (their durations,
        states and curves), the viewer's choices kept."""
        if self.store is None:
            return
        live_before = {r["run_id"] for r in self._table if r["state"] in _LIVE_STATES}
        self._table = report.runs_table(self.store)
        known = {r["run_id"] for r in self._table}
        if known != self._run_ids:  # a new run appeared: offer it
            choices = report.run_choices(self._table)
            self._run_ids = frozenset(known)
            chosen, overlaid = self.run_picker.value, self.overlay_picker.value
            self.run_picker.unobserve(self._on_run, names="value")
            self.run_picker.options = choices
            self.run_picker.value = chosen if chosen in known else choices[0][1]
            self.run_picker.observe(self._on_run, names="value")
            self.overlay_picker.options = choices
            self.overlay_picker.value = tuple(r for r in overlaid if r in known)
        self.show_table()
        if self.run_picker.value in live_before | {
            r["run_id"] for r in self._table if r["state"] in _LIVE_STATES
        }:
            self.show_run(self.run_picker.value)
        if live_before & set(self.overlay_picker.value):
            self.show_overlay()

    def close(self) -> None:
        """Stop the refresh timer (the page is going away)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _setup_run_picker(self, table: Sequence[Mapping[str, Any]]) -> None:
        """List every run; preselect the newest completed one (the newest if none is)."""
        choices = report.run_choices(table)
        self._run_ids = frozenset(run_id for _, run_id in choices)
        self.run_picker.options = choices
        if not choices:
            self.run_picker.disabled = True
            return
        completed = [row["run_id"] for row in table if row["state"] == "completed"]
        self.run_picker.value = completed[0] if completed else choices[0][1]
        self.run_picker.observe(self._on_run, names="value")
        self.show_run(self.run_picker.value)

    def _setup_batch_picker(self) -> None:
        assert self.store is not None
        batches = report.batch_ids(self.store)
        self._batch_ids = frozenset(batches)
        if not batches:
            self.batch_picker.layout.display = "none"
            self.batch_view.children = (W.HTML('<p style="color:#6b7280">No batches yet.</p>'),)
            return
        self.batch_picker.options = batches
        self.batch_picker.value = batches[0]
        self.batch_picker.observe(self._on_batch, names="value")
        self.show_batch(batches[0])

    # -- callbacks (a viewer can trigger these: read only) --

    def _on_filter(self, change: Mapping[str, Any]) -> None:
        self.show_table()

    def _on_overlay(self, change: Mapping[str, Any]) -> None:
        self.show_overlay()

    def _on_run(self, change: Mapping[str, Any]) -> None:
        self.show_run(change.get("new"))

    def _on_batch(self, change: Mapping[str, Any]) -> None:
        self.show_batch(change.get("new"))

    def show_run(self, run_id: object) -> None:
        """Show one run's charts and results; ids not listed at start-up are ignored."""
        if self.store is None or not isinstance(run_id, str) or run_id not in self._run_ids:
            return
        try:
            children = self._run_children(run_id)
        except FoundryError as exc:
            self._show_error(f"Could not read run {run_id}: {exc}")
            return
        self._replace(self.run_view, children)

    def show_batch(self, batch_id: object) -> None:
        """Show one batch's members side by side; ids not listed at start-up are ignored."""
        if self.store is None or not isinstance(batch_id, str) or batch_id not in self._batch_ids:
            return
        try:
            rows = report.batch_comparison(self.store, batch_id)
        except FoundryError as exc:
            self._show_error(f"Could not read batch {batch_id}: {exc}")
            return
        self._replace(
            self.batch_view,
            (W.HTML(html_table(report.BATCH_COLUMNS, rows)), chart(_batch_figure(rows))),
        )

    # -- helpers --

    def _run_children(self, run_id: str) -> tuple[W.Widget, ...]:
        assert self.store is not None
        run = self.store.get_run(run_id, damaged_ok=True)  # shown, never acted on
        rows = report.comparison(run)
        row = report.run_row(run)
        columns = ("name", "state", "duration_s", "teacher", "student")
        status = html_table(report.with_damage_column(columns, [row]), [row])
        status += (
            f'<div style="font-size:13px;color:#374151">Settings: '
            f"{html.escape(report.recipe(run.config))}</div>"
        )
        status += html_report.notices_html(report.run_warnings(run))
        if run.error:
            status += f'<p style="color:#b91c1c">{html.escape(run.error)}</p>'
        loss = report.metric_series(self.store, run_id, report.LOSS_METRICS)
        ppl = report.metric_series(self.store, run_id, report.PPL_METRICS)
        memory = report.memory_series(self.store, run_id)
        figures = [
            line_figure(
                loss,
                title="Training loss",
                x_title="training step",
                y_title="loss (lower is better)",
            ),
            line_figure(
                ppl,
                title="Held-out perplexity during training",
                x_title="training step",
                y_title="perplexity (lower is better)",
            ),
            line_figure(memory, title="Memory use", x_title="seconds since start", y_title="MB"),
        ]
        if rows:
            figures.append(_comparison_figure(rows))
        charts = W.GridBox(
            [chart(fig) for fig in figures],
            layout={
                "grid_template_columns": "repeat(auto-fit, minmax(460px, 1fr))",
                "grid_gap": "8px",
            },
        )
        ranks = report.rank_rows(self.store, run_id)
        per_rank: tuple[W.Widget, ...] = ()
        if ranks:
            per_rank = (
                _heading(
                    "Processes (data parallel)",
                    "Medians over the last recorded steps; every step waits for the slowest "
                    "rank, flagged as a straggler when 20% below the others.",
                ),
                W.HTML(html_table(report.RANK_COLUMNS, ranks)),
            )
        return (
            W.HTML(status),
            *per_rank,
            _heading("Teacher vs students", "Same held-out text for all three models."),
            W.HTML(html_table(report.COMPARISON_COLUMNS, rows, empty="No results yet.")),
            charts,
            W.HTML(_SAMPLE_CSS + html_report.samples_section_html(run)),
        )

    def _replace(self, box: W.Box, children: tuple[W.Widget, ...]) -> None:
        """Swap what a box shows and close the old widgets so a long visit does not leak."""
        old = box.children
        box.children = children
        self.message.value = ""
        for widget in old:
            _close_tree(widget)

    def _show_error(self, text: str) -> None:
        self.message.value = f'<p style="color:#b91c1c">{html.escape(text)}</p>'


_SAMPLE_CSS = (
    "<style>.samples{border-collapse:collapse;font-size:13px;margin:4px 0 12px 0}"
    ".samples-section .note{color:#4b5563;font-size:13px}"
    ".samples-section h3{margin:18px 0 2px 0}"
    ".samples th{background:#f3f4f6}.samples th,.samples td"
    "{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}"
    ".samples .sample{font-family:monospace;font-size:12px;max-height:7.5em;overflow:auto;"
    "white-space:pre-wrap;word-break:break-word;max-width:36em}"
    ".notice{border:1px solid;border-left-width:5px;border-radius:4px;padding:6px 10px;"
    "margin:6px 0}</style>"
)


def _data_link(text: str, filename: str, mime: str, label: str) -> str:
    """A download link holding ``text`` itself (``data:`` URL): the server writes nothing."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return (
        f'<a class="foundry-download" download="{html.escape(filename)}" '
        f'href="data:{mime};charset=utf-8;base64,'
        f'{payload}" style="color:#2563eb">{html.escape(label)}</a>'
    )


def _differences_html(runs: Sequence[Any]) -> str:
    """The chosen runs' settings that differ (W&B's Run Comparer, differences only)."""
    rows = report.config_differences(runs)
    if len(runs) < 2:
        return ""
    if not rows:
        return '<p style="color:#6b7280">These runs have the same settings.</p>'
    head = f'<th style="{_HEAD_CSS}">Setting that differs</th>' + "".join(
        f'<th style="{_HEAD_CSS}">{html.escape(run.name)}</th>' for run in runs
    )
    body = "".join(
        f'<tr><td style="{_BODY_CSS}">{html.escape(row["setting"])}</td>'
        + "".join(
            f'<td style="{_BODY_CSS}">{html.escape(report.fmt("", row.get(run.run_id)))}</td>'
            for run in runs
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<div style="overflow-x:auto"><table class="foundry-differences" style="{_TABLE_CSS}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _close_tree(widget: W.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def build_dashboard(runs_dir: Path | str | None = None) -> Dashboard:
    """The dashboard over ``runs_dir`` (default :func:`~foundry_kernel.paths.default_runs_dir`)."""
    return Dashboard(open_store(runs_dir), runs_dir=runs_dir)
