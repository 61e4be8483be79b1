"""Live training charts that stay smooth for a 100k-step run.

Every chart is a plotly figure; live ones are ``go.FigureWidget`` (plotly 7 renders them
through anywidget). Three rules keep a long run cheap for the kernel and the browser:

- **Batched**: all trace changes of one refresh go out in one ``fig.batch_update()``
  (one comm message per figure), new traces in one ``add_traces`` call.
- **Throttled**: :meth:`ChartSet.flush` pushes at most once per ``min_interval_s``
  (0.25 s: 4 Hz) however often it is called; points arriving in between are kept and
  go out with the next flush.
- **Decimated**: setting ``trace.y`` resends the whole array, so each trace is cut to at
  most ``max_points`` (2000) with min-max decimation, which keeps the spikes an engineer
  looks for (a stride would drop them). The full series stays in Python.

A view made after the figure was filled (a page reload, the notebook reopened on a
running kernel, a tab shown later) draws from the widget's state, not from the messages it
missed: :class:`StatefulFigureWidget` makes that state the figure's current data, and
:attr:`ChartSet.widget` is built once, so re-laying a panel's tabs keeps the live views.

Headless kernels (papermill, nbval) get plain ``go.Figure`` objects from the same class
and show them as static output, so an executed notebook keeps its charts.

Labels are text: a figure's layout and every new trace go through
:func:`widgets.plot_text.plot_safe` where they are created, so a run's name in
:class:`CompareChart`'s legend can never become Plotly markup (a link, bold text).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

from foundry_kernel.metrics import BASELINE, TEACHER_BUILD, lookup
from widgets.frontend import is_headless, show_static
from widgets.plot_text import plot_safe

__all__ = [
    "MAX_POINTS",
    "MIN_INTERVAL_S",
    "ChartSet",
    "CompareChart",
    "LiveCharts",
    "StatefulFigureWidget",
    "TraceSpec",
    "decimate",
    "metric_trace",
]

MAX_POINTS = 2000
"""Points per trace sent to the browser; the full series stays in the kernel."""
MIN_INTERVAL_S = 0.25
"""Smallest time between two pushes to the figures (4 Hz)."""
MEMORY_X_TITLE = "time (s)"
PY2JS_TRAITS = (
    "_py2js_addTraces",
    "_py2js_restyle",
    "_py2js_relayout",
    "_py2js_update",
    "_py2js_animate",
    "_py2js_deleteTraces",
    "_py2js_moveTraces",
)
"""FigureWidget traits whose every non-None assignment is one comm message (plotly sets
them to the message and back to None)."""


class StatefulFigureWidget(go.FigureWidget):
    """A ``FigureWidget`` whose synced state is always its current data and layout.

    Why: plotly sends each change to the open views as a delta message (addTraces,
    restyle) and leaves the synced ``_widget_data``/``_widget_layout`` as they were when
    the figure was created. A frontend that connects later - a page reload, a notebook
    reopened while its kernel trains - asks the kernel for the state and drew empty axes.
    Here the state handed out is built from the figure's data at that moment, under the
    lock its feeder holds while changing it; live views still get the cheap deltas.
    """

    def __init__(self, *args: Any, lock: threading.RLock | None = None, **kwargs: Any) -> None:
        self._state_lock = lock if lock is not None else threading.RLock()
        super().__init__(*args, **kwargs)

    def get_state(self, key: Any = None, drop_defaults: bool = False) -> dict[str, Any]:
        with self._state_lock:
            state: dict[str, Any] = super().get_state(key, drop_defaults=drop_defaults)
            if "_layout_obj" not in self.__dict__:
                return state  # still being built: plotly sets both just below
            current = {"_widget_data": self._data, "_widget_layout": self._layout_obj._props}
            for name, value in current.items():
                if name in state:
                    state[name] = _plain(value)
            return state


def _plain(value: Any) -> Any:
    """A JSON-ready copy of figure data, arrays as lists.

    Why not binary buffers as plotly's own serializer makes: its browser side builds a
    typed array from a buffer's whole ``ArrayBuffer``, ignoring the view's offset, and a
    page reload restores every widget from one message whose buffers are views into it;
    the restore failed and the panel showed "model not found".
    """
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass(frozen=True)
class TraceSpec:
    """Where a series is drawn and how."""

    chart: str
    label: str
    rank: int = 1000
    dash: str = "solid"
    mode: str = "lines"
    yaxis: str = "y"
    color: str | None = None


# What each chart draws: registry names (foundry_kernel.metrics) and their place; labels
# come from the registry. Validation points are sparse, so they get markers.
_CHARTED: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "train/kd", "train/ce", "train/hidden", "val/loss"),
    "eval": ("val/ppl", "val/agreement"),
    "memory": (
        "mem/rss_mb",
        "mem/torch_allocated_mb",
        "mem/torch_reserved_mb",
        "mem/torch_max_allocated_mb",
    ),
}
_PREFIX_STYLE = {"": ("solid", 0), BASELINE: ("dash", 100), TEACHER_BUILD: ("dot", 200)}
_SECOND_AXIS = frozenset({"val/agreement"})
_MARKERS = frozenset({"val/loss", "val/ppl", "val/agreement"})
_GPU_DASH = {"used": "solid", "total": "dot"}


_CHART_LAYOUTS: dict[str, dict[str, Any]] = {
    "loss": {"title": "Loss", "xaxis": {"title": "step"}, "yaxis": {"title": "loss"}},
    "eval": {
        "title": "Validation",
        "xaxis": {"title": "step"},
        "yaxis": {"title": "perplexity", "type": "log"},
        "yaxis2": {
            "title": "agreement",
            "overlaying": "y",
            "side": "right",
            "range": [0, 1],
            "showgrid": False,
        },
    },
    "memory": {
        "title": "Memory (MB)",
        "xaxis": {"title": MEMORY_X_TITLE},
        "yaxis": {"title": "MB"},
        "showlegend": True,  # even for one curve: "process RSS" is not the GPU's memory
    },
    "compare": {"title": "Loss by run", "xaxis": {"title": "step"}, "yaxis": {"title": "loss"}},
}


def metric_trace(name: str) -> TraceSpec | None:
    """The trace a metric is drawn as, or None for metrics no chart shows (lr, ...)."""
    metric = lookup(name)
    if metric is None:
        return None
    dash, offset = _PREFIX_STYLE.get(metric.prefix, ("solid", 300))
    base = name.removeprefix(metric.prefix)
    if metric.index is not None:  # per-GPU memory: GPU0 NVML used, GPU0 total, ...
        what = name.removeprefix(f"mem/gpu{metric.index}_").removesuffix("_mb")
        if what not in _GPU_DASH:
            return None
        rank = 10 + 2 * metric.index + (what == "total")
        return TraceSpec("memory", metric.label, rank, _GPU_DASH[what])
    if base == "mem/torch_max_allocated_mb":  # a peak: dotted, beside what it bounds
        return TraceSpec("memory", metric.label, offset + 4, "dot")
    charted = _CHARTED.get(metric.group, ())
    if base not in charted or (metric.group == "memory" and metric.prefix):
        return None
    return TraceSpec(
        metric.group,
        metric.label,
        offset + charted.index(base) + 1,
        dash,
        "lines+markers" if base in _MARKERS else "lines",
        "y2" if base in _SECOND_AXIS else "y",
    )


def decimate(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of ``(x, y)``: each bucket's min and max, in order.

    Why min-max rather than a stride: a loss spike or a memory peak is a single point, and
    it is exactly the point a person looks for. NaNs never win a bucket but don't break it.
    The last point is always kept, so the curve ends where the run is.
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    n = len(xa)
    if n <= max_points:
        return xa, ya
    buckets = max((max_points - 1) // 2, 1)
    size = -(-n // buckets)  # ceil
    rows = -(-n // size)
    padded = np.full(rows * size, np.nan)
    padded[:n] = ya
    grid = padded.reshape(rows, size)
    finite = np.isfinite(grid)
    lows = np.where(finite, grid, np.inf).argmin(axis=1)
    highs = np.where(finite, grid, -np.inf).argmax(axis=1)
    base = np.arange(rows) * size
    pairs = np.stack([np.minimum(lows, highs), np.maximum(lows, highs)], axis=1)
    keep = (pairs + base[:, None]).ravel()  # already in order: bucket by bucket
    keep = keep[np.concatenate([[True], keep[1:] != keep[:-1]])]  # min == max: once
    keep = keep[keep < n]
    if keep[-1] != n - 1:
        keep = np.append(keep, n - 1)
    return xa[keep], ya[keep]


class _Series:
    """A growing series in numpy buffers that double when full.

    Why not lists: every push converts the whole series for decimation, and turning a
    100k-element list into an array costs ~5 ms per series per push; a buffer's view is
    free, so a push stays ~1 ms per series however long the run.
    """

    __slots__ = ("_x", "_y", "n")

    def __init__(self) -> None:
        self._x = np.empty(256)
        self._y = np.empty(256)
        self.n = 0

    def extend(self, xs: Iterable[float], ys: Iterable[float]) -> None:
        xa = np.fromiter(xs, dtype=float)
        ya = np.fromiter(ys, dtype=float)
        if len(xa) != len(ya):
            raise ValueError(f"x and y differ in length ({len(xa)} != {len(ya)})")
        end = self.n + len(xa)
        if end > len(self._x):
            capacity = max(end, 2 * len(self._x))
            self._x = np.concatenate([self._x[: self.n], np.empty(capacity - self.n)])
            self._y = np.concatenate([self._y[: self.n], np.empty(capacity - self.n)])
        self._x[self.n : end] = xa
        self._y[self.n : end] = ya
        self.n = end

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.n]


class ChartSet:
    """Figures fed by named series, pushed in throttled, batched, decimated updates.

    Thread-safe: series may be fed and flushed from a background updater while the main
    thread reads them; one lock guards the data and each push.
    """

    def __init__(
        self,
        charts: Sequence[str],
        route: Callable[[str], TraceSpec | None],
        *,
        live: bool | None = None,
        max_points: int = MAX_POINTS,
        min_interval_s: float = MIN_INTERVAL_S,
        height: int = 300,
        width: int = 440,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = (not is_headless()) if live is None else bool(live)
        self.max_points = int(max_points)
        self.min_interval_s = float(min_interval_s)
        self._route = route
        self._clock = clock
        self._lock = threading.RLock()
        self._series: dict[str, _Series] = {}
        self._dirty: set[str] = set()
        self._traces: dict[str, int] = {}  # series name -> index in its figure
        self._last_push: float | None = None
        self._widget: ipw.Box | None = None
        self.pushes = 0
        self.messages = 0
        self.figures: dict[str, go.Figure] = {c: self._new_figure(c, height, width) for c in charts}

    # -- building -------------------------------------------------------------------

    def _new_figure(self, chart: str, height: int, width: int) -> go.Figure:
        # An explicit width: a FigureWidget does not size itself to its box (it renders at
        # plotly's 700 px default and would be clipped or leave the box half empty).
        layout = plot_safe(
            {
                **_CHART_LAYOUTS.get(chart, {"title": chart}),
                "height": height,
                "width": width,
                "margin": {"l": 55, "r": 55, "t": 40, "b": 40},
                "legend": {"orientation": "h", "y": -0.25},
                "uirevision": chart,  # keep the user's zoom across data updates
            }
        )
        fig = (
            StatefulFigureWidget(layout=layout, lock=self._lock)
            if self.live
            else go.Figure(layout=layout)
        )
        if self.live:
            fig.observe(self._count_message, names=list(PY2JS_TRAITS))
        return fig

    def _count_message(self, change: Mapping[str, Any]) -> None:
        if change.get("new") is not None:
            self.messages += 1

    @property
    def widget(self) -> ipw.Widget:
        """The live figures side by side (each in a box classed ``foundry-chart-NAME``).

        Built once: a new box each time would make a container that shows it again (a
        panel's tabs) drop the figure's view and make a new one, and plotly's dropped view
        keeps listening and throws on the next update before the new view gets it (the
        compare tab stayed empty).
        """
        if not self.live:
            raise RuntimeError("static charts have no widget; use show() or static_figures()")
        if self._widget is not None:
            return self._widget
        boxes = []
        for name, fig in self.figures.items():
            box = ipw.Box([fig], layout=ipw.Layout(flex="0 0 auto"))
            box.add_class(f"foundry-chart-{name}")
            boxes.append(box)
        self._widget = ipw.Box(boxes, layout=ipw.Layout(display="flex", flex_flow="row wrap"))
        return self._widget

    # -- feeding --------------------------------------------------------------------

    def add(self, name: str, x: float, y: float) -> bool:
        """Append one point; False if no chart draws ``name``."""
        return self.extend(name, (x,), (y,))

    def extend(self, name: str, xs: Iterable[float], ys: Iterable[float]) -> bool:
        """Append points to a series (pushed at the next flush)."""
        if self._route(name) is None:
            return False
        with self._lock:
            self._series.setdefault(name, _Series()).extend(xs, ys)
            self._dirty.add(name)
        return True

    def points(self, name: str) -> int:
        """How many points a series holds in the kernel (not decimated)."""
        with self._lock:
            series = self._series.get(name)
            return 0 if series is None else series.n

    def trace_lengths(self) -> dict[str, int]:
        """Points each drawn trace holds (what the browser received), by series name."""
        with self._lock:
            out = {}
            for name, index in self._traces.items():
                fig = self.figures[self._spec(name).chart]
                y = fig.data[index].y
                out[name] = 0 if y is None else len(y)
            return out

    # -- pushing --------------------------------------------------------------------

    def flush(self, *, force: bool = False) -> bool:
        """Push pending points to the figures unless the last push was too recent."""
        with self._lock:
            if not self._dirty:
                return False
            now = self._clock()
            due = self._last_push is None or now - self._last_push >= self.min_interval_s
            if not (force or due):
                return False
            self._last_push = now
            dirty, self._dirty = self._dirty, set()
            by_chart: dict[str, list[str]] = {}
            for name in dirty:
                by_chart.setdefault(self._spec(name).chart, []).append(name)
            for chart, names in by_chart.items():
                self._push(self.figures[chart], names)
            self.pushes += 1
            return True

    def _spec(self, name: str) -> TraceSpec:
        spec = self._route(name)
        assert spec is not None  # only routed names are ever stored
        return spec

    def _push(self, fig: go.Figure, names: list[str]) -> None:
        """One addTraces message for new series, one update message for the others."""
        new = sorted((n for n in names if n not in self._traces), key=lambda n: self._spec(n).rank)
        if new:
            first = len(fig.data)
            fig.add_traces([self._trace(n) for n in new])
            for offset, name in enumerate(new):
                self._traces[name] = first + offset
        old = [n for n in names if n not in new]
        if not old:
            return
        with fig.batch_update():
            for name in old:
                x, y = self._decimated(name)
                trace = fig.data[self._traces[name]]
                trace.x, trace.y = x, y

    def _decimated(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        series = self._series[name]
        return decimate(series.x, series.y, self.max_points)

    def _trace(self, name: str) -> go.Scatter:
        spec = self._spec(name)
        x, y = self._decimated(name)
        line: dict[str, Any] = {"dash": spec.dash}
        if spec.color is not None:
            line["color"] = spec.color
        return go.Scatter(
            plot_safe(
                {
                    "x": x,
                    "y": y,
                    "name": spec.label,  # a run's name in CompareChart: text, not markup
                    "mode": spec.mode,
                    "line": line,
                    "yaxis": spec.yaxis,
                    "legendrank": spec.rank,
                    "marker": {"size": 5},
                }
            )
        )

    # -- output ---------------------------------------------------------------------

    def static_figures(self) -> list[go.Figure]:
        """Plain figures with every pending point, skipping charts with no data."""
        self.flush(force=True)
        with self._lock:
            return [go.Figure(fig) for fig in self.figures.values() if fig.data]

    def show(self) -> None:
        """Display: the live widget, or static figures in a headless kernel."""
        if self.live:
            from IPython.display import display

            display(self.widget)
            return
        for fig in self.static_figures():
            show_static(fig)


class LiveCharts(ChartSet):
    """A run's charts: loss (KD, CE, validation; CE-only baseline dashed), validation
    perplexity and agreement, and memory (RSS always; GPU and torch memory when present).

    Feed it with :meth:`ingest_event` (step events) and :meth:`add_memory`.
    """

    def __init__(self, *, live: bool | None = None, **kwargs: Any) -> None:
        super().__init__(("loss", "eval", "memory"), metric_trace, live=live, **kwargs)

    def ingest_event(self, event: Any) -> int:
        """Take a run's ``step`` event (other kinds are ignored); returns points added."""
        if getattr(event, "kind", None) != "step":
            return 0
        payload = event.payload
        step = payload.get("step")
        metrics = payload.get("metrics")
        if not isinstance(step, int) or not isinstance(metrics, Mapping):
            return 0
        return sum(
            self.add(name, step, value)
            for name, value in metrics.items()
            if isinstance(value, int | float)
        )

    def add_memory(self, name: str, samples: Iterable[tuple[float, float]]) -> bool:
        """Memory samples as ``(seconds, MB)`` pairs."""
        pairs = list(samples)
        return self.extend(name, (t for t, _ in pairs), (v for _, v in pairs))

    def mark_estimate(self, mb: float, label: str) -> None:
        """A dashed horizontal line on the memory chart at ``mb`` (the preflight's
        estimate), so a curve that climbs past what the run was expected to need shows.
        A layout shape: it is part of the figure's state, so a reloaded view has it too."""
        with self._lock:
            self.figures["memory"].add_hline(
                y=float(mb),
                line={"dash": "dash", "color": "#6d4c41", "width": 1.5},
                annotation=plot_safe({"text": label, "font": {"size": 10}}),
                annotation_position="top left",
            )


_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)


class CompareChart(ChartSet):
    """Loss curves of several runs overlaid: train loss solid, validation loss dotted,
    one colour per run."""

    def __init__(self, *, live: bool | None = None, **kwargs: Any) -> None:
        self._labels: dict[str, int] = {}
        kwargs.setdefault("width", 900)
        super().__init__(("compare",), self._route_run, live=live, **kwargs)

    def _route_run(self, name: str) -> TraceSpec | None:
        label, _, part = name.rpartition("|")
        if label not in self._labels or part not in ("train", "val"):
            return None
        color = _PALETTE[self._labels[label] % len(_PALETTE)]
        if part == "train":
            return TraceSpec("compare", f"{label} train", self._labels[label] * 2, color=color)
        return TraceSpec(
            "compare",
            f"{label} val",
            self._labels[label] * 2 + 1,
            "dot",
            "lines+markers",
            color=color,
        )

    def add_run(self, label: str) -> None:
        """Register a run (its colour is fixed by the order of registration)."""
        with self._lock:
            self._labels.setdefault(label, len(self._labels))

    def set_visible(self, label: str, visible: bool) -> None:
        """Show or hide a run's curves (kept in the kernel either way)."""
        with self._lock:
            for part in ("train", "val"):
                index = self._traces.get(f"{label}|{part}")
                if index is not None:
                    spec = self._spec(f"{label}|{part}")
                    self.figures[spec.chart].data[index].visible = bool(visible)

    def ingest_event(self, label: str, event: Any) -> None:
        """Take a run's distillation-phase loss points from its ``step`` event."""
        if getattr(event, "kind", None) != "step" or event.payload.get("prefix"):
            return
        step = event.payload.get("step")
        metrics = event.payload.get("metrics") or {}
        if not isinstance(step, int):
            return
        for metric, part in (("train/loss", "train"), ("val/loss", "val")):
            value = metrics.get(metric)
            if isinstance(value, int | float):
                self.add(f"{label}|{part}", step, value)
