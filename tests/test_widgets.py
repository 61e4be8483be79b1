"""The control panel and live charts, driven from Python (no browser).

Buttons are clicked with ``button.click()`` (what a browser click triggers in the
kernel), so these tests exercise the real callbacks, the real runs (tiny configs) and the
real updater thread. tests/test_browser_lab.py proves the same path in JupyterLab.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config_dict

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from foundry_kernel.config import load_config
from foundry_kernel.errors import FoundryError
from foundry_kernel.run._control import RunState
from widgets import DistillPanel, LiveCharts, decimate, is_headless
from widgets.charts import MAX_POINTS, MIN_INTERVAL_S
from widgets.panel import LOG_LINES

RUN_TIMEOUT_S = 120


def _updater_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "foundry-panel-updater"]


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _quick(runs_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny config without the CE-only baseline and checkpoints: seconds per run."""
    base = {"eval": {"baseline": False}, "checkpoint": {"every_steps": None}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return tiny_config_dict(runs_dir, **base)


# --------------------------------------------------------------------------- the form


def test_invalid_value_is_shown_next_to_its_field_and_disables_start(runs_dir: Path) -> None:
    panel = DistillPanel(_quick(runs_dir))
    assert panel.form.valid and not panel.start_button.disabled

    panel.form.set("loss.temperature", 0.0)  # schema: exclusiveMinimum 0
    temperature = panel.form.controls["loss.temperature"]
    assert "greater than 0" in temperature.error.value
    assert panel.start_button.disabled and panel.save_button.disabled
    others = [n for n, c in panel.form.controls.items() if c.error.value]
    assert others == ["loss.temperature"]

    panel.form.set("teacher.source", "builtin:nope")  # a string field's own validator
    assert "unknown built-in model" in panel.form.controls["teacher.source"].error.value

    panel.form.set("loss.temperature", 2.0)
    panel.form.set("teacher.source", "builtin:tiny-teacher")
    assert not temperature.error.value and not panel.start_button.disabled
    assert panel.config is not None and panel.config.loss.temperature == 2.0
    # Fields outside the form keep the given config (the tiny teacher recipe).
    assert panel.config.teacher.build.hidden_size == 32


def test_widgets_follow_the_schema(runs_dir: Path) -> None:
    import ipywidgets as ipw

    panel = DistillPanel(_quick(runs_dir))
    controls = panel.form.controls
    assert isinstance(controls["loss.kind"].input, ipw.Dropdown)
    assert "jsd" in controls["loss.kind"].input.options
    # unbounded boxes: the schema's bounds are the validator's to report, not to clamp
    assert type(controls["loss.beta"].input) is ipw.FloatText
    assert type(controls["limits.max_steps"].input) is ipw.IntText
    assert isinstance(controls["eval.baseline"].input, ipw.Checkbox)
    assert isinstance(controls["teacher.source"].input, ipw.Text)
    assert "temperature" in controls["loss.temperature"].input.tooltip.lower()

    timeout = controls["limits.timeout_s"]  # float | None: a switch turns it off
    assert timeout.value is None and timeout.input.disabled
    panel.form.set("limits.timeout_s", 120.0)
    assert panel.config is not None and panel.config.limits.timeout_s == 120.0
    panel.form.set("limits.timeout_s", None)
    assert panel.config is not None and panel.config.limits.timeout_s is None


def test_an_invalid_starting_config_is_shown_not_raised(runs_dir: Path) -> None:
    panel = DistillPanel({**_quick(runs_dir), "loss": {"beta": 3.0}})
    # the form keeps the value it was given and says what is wrong with it;
    # a field outside the form is reported in the panel's message area instead.
    assert not panel.form.valid and panel.form.controls["loss.beta"].value == 3.0
    assert "loss.beta" not in panel.form.message.value
    assert panel.form.controls["loss.beta"].error.value
    bad = DistillPanel({**_quick(runs_dir), "optim": {"max_grad_norm": -1}})
    assert not bad.form.valid and bad.start_button.disabled
    assert "optim.max_grad_norm" in bad.form.message.value


def test_save_config_round_trips_and_refuses_odd_paths(runs_dir: Path, tmp_path: Path) -> None:
    panel = DistillPanel(_quick(runs_dir))
    panel.form.set("loss.kind", "jsd")
    panel.save_path.value = str(tmp_path / "saved.yaml")
    panel.save_button.click()
    assert "saved.yaml" in panel.message.value
    assert load_config(tmp_path / "saved.yaml").loss.kind == "jsd"

    panel.save_path.value = str(tmp_path / "saved.txt")
    panel.save_button.click()
    assert "foundry-error" in panel.message.value and ".yaml" in panel.message.value


def test_a_start_that_fails_is_shown_in_the_panel(runs_dir: Path) -> None:
    def refuse(_config: Any) -> Any:
        raise FoundryError("the store is read-only here")

    panel = DistillPanel(_quick(runs_dir), start_fn=refuse)
    panel.start_button.click()
    assert "the store is read-only here" in panel.message.value
    assert panel.runs == [] and not panel.start_button.disabled


def test_headless_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FOUNDRY_HEADLESS", raising=False)
    assert is_headless()  # pytest: no IPython kernel at all
    monkeypatch.setenv("FOUNDRY_HEADLESS", "0")
    assert not is_headless()
    monkeypatch.setenv("FOUNDRY_HEADLESS", "1")
    assert is_headless()


# --------------------------------------------------------------------------- real runs


def test_start_button_runs_to_completion_and_draws_charts(runs_dir: Path) -> None:
    panel = DistillPanel(_quick(runs_dir, limits={"max_steps": 4}))
    panel.start_button.click()
    handle = panel.current
    assert handle is not None
    assert panel.start_button.disabled and not panel.cancel_button.disabled
    assert f"run store {runs_dir.absolute()}" in panel.message.value  # where it goes

    assert panel.wait(RUN_TIMEOUT_S), "the run or its updater did not finish"
    assert handle.state is RunState.COMPLETED
    view = panel.views[0]
    lengths = view.charts.trace_lengths()
    assert lengths["train/loss"] == 4 and lengths["train/kd"] == 4
    assert lengths["val/loss"] >= 1 and lengths["val/agreement"] >= 1
    assert lengths.get("mem/rss_mb", 0) >= 1  # the controller's sampler thread
    assert 'data-state="completed"' in view.status.value and "step 4/4" in view.status.value
    assert "foundry-summary" in view.outcome.value  # the results table
    assert "phase: distill" in view.log_view.value
    assert panel.compare.trace_lengths()[f"{view.label}|train"] == 4
    assert not panel.start_button.disabled and panel.cancel_button.disabled
    assert _updater_threads() == []  # the updater stops with the run


def test_cancel_button_then_a_second_run_keeps_both(runs_dir: Path) -> None:
    panel = DistillPanel(
        _quick(runs_dir, limits={"max_steps": 100_000}, eval={"every_steps": 10_000})
    )
    panel.start_button.click()
    first = panel.current
    assert first is not None
    _wait_for(lambda: (first.step or 0) >= 2 or first.done, RUN_TIMEOUT_S, "two steps")
    _wait_for(lambda: panel.views[0].charts.points("train/loss") >= 1, 5, "a drawn point")
    panel.cancel_button.click()
    assert panel.cancel_button.disabled  # asked once; the run stops at its next step
    assert panel.wait(RUN_TIMEOUT_S)
    assert first.state is RunState.CANCELLED
    cancelled = panel.views[0]
    assert 'data-state="cancelled"' in cancelled.status.value
    assert "foundry-warning" in cancelled.outcome.value and "cancelled" in cancelled.outcome.value
    kept = cancelled.charts.trace_lengths()["train/loss"]
    assert kept >= 2

    # Several runs: a second one, its own tab; the first keeps its charts.
    panel.form.set("limits.max_steps", 2)
    panel.form.set("eval.baseline", False)
    panel.start_button.click()
    assert panel.wait(RUN_TIMEOUT_S)
    assert [str(h.state) for h in panel.runs] == ["cancelled", "completed"]
    first_label, second_label = (v.label for v in panel.views)
    assert list(panel.tabs.titles) == ["compare", first_label, second_label]
    assert first_label != second_label and second_label.endswith(" tiny")
    assert cancelled.charts.trace_lengths()["train/loss"] == kept
    compare = panel.compare.trace_lengths()
    assert compare[f"{first_label}|train"] == kept and compare[f"{second_label}|train"] == 2
    assert _updater_threads() == []


def test_a_failed_run_shows_a_readable_error_box(runs_dir: Path, tmp_path: Path) -> None:
    # a folder that exists (the form checks that) whose pattern matches nothing: only
    # reading the corpus finds out, in the run
    (tmp_path / "corpus").mkdir()
    pattern = tmp_path / "corpus" / "*.no-such-corpus"
    panel = DistillPanel(_quick(runs_dir, data={"source": str(pattern)}))
    assert panel.form.valid
    panel.start_button.click()
    assert panel.wait(RUN_TIMEOUT_S)
    handle = panel.current
    assert handle is not None and handle.state is RunState.FAILED
    box = panel.views[0].outcome.value
    assert "foundry-error" in box and "failed" in box
    assert "no-such-corpus" in box and "matches no files" in box  # the engine's message
    assert "Traceback" not in box


def test_a_flood_of_steps_is_drawn_decimated_and_logged_bounded(runs_dir: Path) -> None:
    """A job that emits 5000 steps as fast as it can: every point reaches the kernel-side
    series, the browser gets at most MAX_POINTS per trace in few messages, and the log
    keeps LOG_LINES lines."""
    n = 5000

    def flood(config: Any, *, store: Any, run_id: str, ctx: Any, resume: bool = False) -> dict:
        ctx.set_phase("distill", max_steps=n)
        for step in range(1, n + 1):
            ctx.check()
            metrics = {"train/loss": 1.0 / step}
            if step % 10 == 0:
                metrics["val/loss"] = 2.0 / step  # logged every time: evals are not throttled
            ctx.emit("step", step=step, max_steps=n, prefix="", metrics=metrics)
        return {}

    import foundry_kernel

    panel = DistillPanel(
        _quick(runs_dir), start_fn=lambda cfg: foundry_kernel.start(cfg, job=flood)
    )
    t0 = time.monotonic()
    panel.start_button.click()
    assert panel.wait(RUN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    view = panel.views[0]
    assert view.charts.points("train/loss") == n
    assert view.charts.trace_lengths()["train/loss"] <= MAX_POINTS
    max_pushes = elapsed / MIN_INTERVAL_S + 2
    assert view.charts.pushes <= max_pushes
    assert view.charts.messages <= 2 * len(view.charts.figures) * view.charts.pushes
    assert view.log_view.value.count("\n") < LOG_LINES


# --------------------------------------------------------------------------- charts alone


def test_chart_updates_are_throttled_and_decimated() -> None:
    """10k points fed as fast as possible, flushing after every one."""
    now = [0.0]
    charts = LiveCharts(live=True, clock=lambda: now[0])
    n = 10_000
    for step in range(1, n + 1):
        now[0] += 0.001  # 10k points over 10 s of (fake) time
        charts.add("train/loss", step, 1.0 / step)
        charts.add("train/kd", step, 0.5 / step)
        if step % 100 == 0:
            charts.add("val/loss", step, 2.0 / step)
        charts.add_memory("mem/rss_mb", [(step * 0.5, 100.0 + step % 7)])
        charts.flush()
    charts.flush(force=True)
    simulated = n * 0.001
    assert charts.pushes <= simulated / MIN_INTERVAL_S + 2
    # At most one addTraces and one update message per figure per push.
    assert charts.messages <= 2 * len(charts.figures) * charts.pushes
    assert charts.points("train/loss") == n
    for name, length in charts.trace_lengths().items():
        assert length <= MAX_POINTS, name


def test_real_clock_throttle_bounds_messages() -> None:
    charts = LiveCharts(live=True)
    t0 = time.monotonic()
    for step in range(1, 10_001):
        charts.add("train/loss", step, float(step))
        charts.flush()
    elapsed = time.monotonic() - t0
    assert charts.pushes <= elapsed / MIN_INTERVAL_S + 1
    assert charts.messages <= 2 * charts.pushes


def test_decimation_keeps_extremes_and_the_last_point() -> None:
    import numpy as np

    x = np.arange(100_000, dtype=float)
    y = np.sin(x / 1000.0)
    y[54_321] = 50.0  # a spike a stride would miss
    y[77_777] = float("nan")
    t0 = time.perf_counter()
    dx, dy = decimate(x, y, MAX_POINTS)
    assert time.perf_counter() - t0 < 0.5
    assert len(dx) <= MAX_POINTS
    assert 50.0 in dy and dx[-1] == x[-1]
    assert np.all(np.diff(dx) > 0)
    _, short_y = decimate([1.0, 2.0], [3.0, 4.0], MAX_POINTS)
    assert list(short_y) == [3.0, 4.0]


def test_headless_charts_are_static_figures() -> None:
    import plotly.graph_objects as go

    charts = LiveCharts(live=False)
    charts.add("train/loss", 1, 2.0)
    charts.add("baseline/train/loss", 1, 2.5)
    figures = charts.static_figures()
    assert len(figures) == 1 and isinstance(figures[0], go.Figure)
    assert not isinstance(figures[0], go.FigureWidget)
    dashes = {t.name: t.line.dash for t in figures[0].data}
    assert dashes == {"train loss": "solid", "CE-only train loss": "dash"}
    with pytest.raises(RuntimeError):
        _ = charts.widget


def test_a_100k_step_history_still_pushes_quickly() -> None:
    """What keeps a long run smooth: a push re-decimates whole series, so its cost must
    stay small at 100k points (numpy buffers, no list conversion)."""
    charts = LiveCharts(live=True)
    n = 100_000
    names = ["train/loss", "train/kd", "train/ce", "val/loss", "mem/rss_mb"]
    for name in names:
        charts.extend(name, range(n), (1.0 / (i + 1) for i in range(n)))
    charts.flush(force=True)
    timings = []
    for extra in range(3):
        for name in names:
            charts.add(name, n + extra, 0.5)
        t0 = time.perf_counter()
        charts.flush(force=True)
        timings.append(time.perf_counter() - t0)
    assert min(timings) < 0.25  # ~10 ms here on an idle core; generous for shared CI
    assert all(length <= MAX_POINTS for length in charts.trace_lengths().values())


# --------------------------------------------------------------------------- labels are text


def _strings(value: Any) -> list[str]:
    """Every string in a figure's JSON (layout, traces): what plotly.js may render."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return []


LABEL_PAYLOADS = (
    '<a href="https://evil.example/phish">results</a>',
    "<img src=x onerror=alert(1)>",
    "<b>bold</b> &lt;i&gt; &amp;",
)


@pytest.mark.parametrize("live", [True, False])
def test_a_run_label_reaches_the_compare_chart_as_text(live: bool) -> None:
    """Issue 15, finding 7: a run's name is a legend entry; plotly.js renders tags in
    legends (an <a href> becomes a live link), so every string a ChartSet puts into a
    figure is escaped where the figure and its traces are created."""
    import html
    import json

    from widgets.charts import CompareChart

    chart = CompareChart(live=live)
    for label in LABEL_PAYLOADS:
        chart.add_run(label)
        chart.add(f"{label}|train", 1, 2.0)
        chart.add(f"{label}|val", 1, 2.5)
    chart.flush(force=True)
    figure = chart.figures["compare"]
    spec = json.loads(figure.to_json())
    markup = [s for s in _strings(spec) if "<" in s or ">" in s]
    assert not markup, markup
    names = [html.unescape(t.name) for t in figure.data]
    assert names == [f"{label} {part}" for label in LABEL_PAYLOADS for part in ("train", "val")]
    # a literal entity stays literal: plotly would otherwise show "&lt;i&gt;" as "<i>"
    assert "&amp;lt;i&amp;gt; &amp;amp;" in figure.data[4].name


def test_a_new_view_gets_every_point_from_the_widget_state() -> None:
    """Issue 16: plotly sends live changes as deltas and kept the synced state as it was
    at creation, so a reload drew empty axes (test_browser_lab proves it in a browser).
    The state a reconnecting frontend gets holds the current (decimated) data as plain
    lists, and a chart's widget is one box, so re-laying tabs keeps its views."""
    import json

    from widgets.charts import CompareChart

    chart = CompareChart(live=True, min_interval_s=0.0)
    chart.add_run("#1 a")
    assert chart.widget is chart.widget
    for step in range(5):
        chart.add("#1 a|train", step, 1.0 / (step + 1))
        chart.flush(force=True)
    state = chart.figures["compare"].get_state()
    (trace,) = state["_widget_data"]
    assert trace["name"] == "#1 a train"
    assert trace["y"] == [1.0 / (s + 1) for s in range(5)] and trace["x"] == list(range(5))
    assert state["_widget_layout"]["title"]["text"] == "Loss by run"
    json.dumps(state["_widget_data"])  # no binary buffers: a restored state's share one
    one = chart.figures["compare"].get_state("_last_trace_edit_id")
    assert set(one) == {"_last_trace_edit_id"}  # a single trait's update stays small


@pytest.mark.parametrize(
    ("field", "typed"),
    [("limits.max_steps", 0), ("optim.batch_size", 0), ("optim.lr", -0.01)],
)
def test_the_form_never_changes_a_typed_number(runs_dir: Path, field: str, typed: float) -> None:
    """Issue 16: Bounded* boxes clamped max_steps=0 and batch_size=0 to 1 (a run of the
    wrong size started), lr=-0.01 to 0 (the error then blamed 0.0)."""
    panel = DistillPanel(_quick(runs_dir))
    panel.form.set(field, typed)
    control = panel.form.controls[field]
    assert control.value == typed and control.input.value == typed
    assert not panel.form.valid and panel.start_button.disabled
    assert str(typed) in control.error.value, control.error.value  # the user's value
    assert "0.0 is" not in control.error.value


def test_a_missing_data_source_is_caught_in_the_form(runs_dir: Path, tmp_path: Path) -> None:
    panel = DistillPanel(_quick(runs_dir))
    assert panel.form.valid
    missing = tmp_path / "no-such-corpus.txt"
    panel.form.set("data.source", str(missing))
    error = panel.form.controls["data.source"].error.value
    assert not panel.form.valid and panel.start_button.disabled
    assert "no such file or folder" in error and "no-such-corpus.txt" in error
    panel.form.set("data.source", str(tmp_path / "nowhere" / "*.txt"))
    assert "not an existing folder" in panel.form.controls["data.source"].error.value
    missing.write_text("a corpus\n" * 50, encoding="utf-8")
    panel.form.set("data.source", str(missing))
    assert panel.form.valid and not panel.form.controls["data.source"].error.value
