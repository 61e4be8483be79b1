"""The dashboard's data layer (widgets.report) and its view (widgets/dashboard.py).

One real tiny run (trained by the real pipeline) plus a few runs written straight into
the store for what a single run cannot show: a batch with a grid, a failed member whose
name is HTML, and a long curve with NaN/inf values. ``build_demo_store`` is reused by the
server and browser tests.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import ipywidgets as W
import pytest
from conftest import tiny_config_dict

from foundry_kernel.errors import StoreError
from foundry_kernel.store import DB_FILENAME, RunStore
from widgets import report

REPO = Path(__file__).resolve().parents[1]
BATCH_ID = "b-demo-grid"
HTML_NAME = "<b>bold</b> & <script>alert(1)</script>"


def build_demo_store(root: Path) -> dict[str, Any]:
    """A runs folder with one real run, a 3-member batch (one failed) and a long run."""
    import foundry_kernel as fk

    handle = fk.run_sync(fk.load_config(tiny_config_dict(root)))
    assert str(handle.state) == "completed", handle
    ids: dict[str, Any] = {"real": handle.id, "batch": BATCH_ID, "members": []}
    with RunStore(root) as store:
        real = store.get_run(handle.id)
        for i, beta in enumerate((0.0, 0.5, 1.0)):
            config = copy.deepcopy(real.config)
            config["loss"]["beta"] = beta
            config["name"] = f"grid-{i}"
            name = HTML_NAME if i == 2 else f"grid-{i}"
            run_id = store.create_run(config, name=name, batch_id=BATCH_ID).run_id
            store.set_state(run_id, "running")
            summary = copy.deepcopy(real.summary)
            summary["student"]["val_ppl"] = 300.0 - 10 * i  # the failed one is "best"
            # the grid tells the "distillation hurt" story: a CE-only twin better than the
            # distilled student, and a gap closed that agrees (negative), in log-perplexity
            summary["student"]["val_loss"] = math.log(summary["student"]["val_ppl"])
            summary["baseline"]["val_ppl"] = 200.0
            summary["baseline"]["val_loss"] = math.log(200.0)
            teacher_loss = math.log(summary["teacher"]["val_ppl"])
            summary["gap_closed"] = (math.log(200.0) - summary["student"]["val_loss"]) / (
                math.log(200.0) - teacher_loss
            )
            store.update_summary(run_id, summary)
            store.log_metrics(run_id, 1, {"train/loss": 3.0 - i})
            failed = i == 2
            store.set_state(
                run_id,
                "failed" if failed else "completed",
                error="out of memory <in step 3>" if failed else None,
            )
            ids["members"].append(run_id)
        long_id = store.create_run(real.config, name="long").run_id
        rows = [(s, "train/loss", 1.0 / s, 1000.0 + s) for s in range(1, 5001)]
        rows[10] = (11, "train/loss", float("nan"), 1011.0)
        rows[20] = (21, "train/loss", float("inf"), 1021.0)
        rows += [(s, "mem/gpu0_used_mb", 100.0 + s, 1000.0 + 0.5 * s) for s in range(100)]
        store.log_metrics_many(long_id, rows)
        ids["long"] = long_id
    return ids


def db_fingerprint(root: Path) -> tuple[str, int, int]:
    """sha256 + mtime of the database file and the WAL's size: what a write would change.

    The ``-shm`` file is left out on purpose: every reader, even ``mode=ro``, records its
    read marks there; it is an index, not data.
    """
    db = root / DB_FILENAME
    wal = root / (DB_FILENAME + "-wal")
    return (
        hashlib.sha256(db.read_bytes()).hexdigest(),
        db.stat().st_mtime_ns,
        wal.stat().st_size if wal.exists() else -1,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report") / "runs"
    ids = build_demo_store(root)
    ids["root"] = root
    return ids


@pytest.fixture
def store(demo: dict[str, Any]) -> Any:
    with RunStore(demo["root"], read_only=True) as opened:
        yield opened


# --- report: runs table -------------------------------------------------------------------


def test_runs_table_row_of_a_real_run(store: RunStore, demo: dict[str, Any]) -> None:
    rows = {row["run_id"]: row for row in report.runs_table(store)}
    row = rows[demo["real"]]
    summary = store.get_run(demo["real"]).summary
    assert row["state"] == "completed"
    assert row["teacher"] == "built-in tiny teacher"
    assert row["student"] == "new, 1 layer × 16 wide"
    assert row["teacher_params"] == summary["teacher"]["params"] > row["student_params"] > 0
    assert row["size_ratio"] == pytest.approx(row["student_params"] / row["teacher_params"])
    assert row["student_ppl"] == pytest.approx(summary["student"]["val_ppl"])
    assert row["baseline_ppl"] == pytest.approx(summary["baseline"]["val_ppl"])
    assert row["agreement"] == pytest.approx(summary["agreement"])
    assert row["gap_closed"] == pytest.approx(summary["gap_closed"])
    assert row["duration_s"] > 0
    assert all(key in row and key in report.LABELS for key in report.RUN_COLUMNS)


def test_runs_table_is_newest_first_and_filters_batches(
    store: RunStore, demo: dict[str, Any]
) -> None:
    everything = report.runs_table(store)
    assert [r["run_id"] for r in everything][-1] == demo["real"]
    members = report.runs_table(store, batch_id=BATCH_ID)
    assert {r["run_id"] for r in members} == set(demo["members"])


def test_a_run_without_results_still_gets_a_row(store: RunStore, demo: dict[str, Any]) -> None:
    row = report.run_row(store.get_run(demo["long"]), now=0.0)
    assert row["state"] == "pending"
    assert row["student_ppl"] is None and row["duration_s"] is None
    assert report.fmt("student_ppl", row["student_ppl"]) == "—"


def test_fmt_speaks_plainly() -> None:
    assert report.fmt("params", 11568) == "11.6 K"
    assert report.fmt("params", 7_000_000_000) == "7 B"
    assert report.fmt("size_ratio", 0.388) == "39% of the teacher"
    assert report.fmt("agreement", 0.7379) == "73.8%"
    assert report.fmt("duration_s", 65) == "1 min 5 s"
    assert report.fmt("duration_s", 3725) == "1 h 2 min"
    assert report.fmt("student_ppl", 395.04) == "395.0"
    assert report.fmt("student_ppl", float("nan")) == "—"
    assert report.fmt("best", True) == "★ best"
    assert "lower is better" in report.LABELS["student_ppl"]


def test_metric_labels_are_plain_language() -> None:
    assert report.metric_label("val/ppl") == "held-out perplexity (lower is better)"
    assert report.metric_label("baseline/val/loss") == "held-out loss, student without teacher"
    assert report.metric_label("mem/gpu1_used_mb") == "GPU 1 memory used (MB)"
    assert report.metric_label("something/else") == "something/else"


# --- report: curves -----------------------------------------------------------------------


def test_metric_series_of_a_real_run(store: RunStore, demo: dict[str, Any]) -> None:
    series = report.metric_series(store, demo["real"], [*report.LOSS_METRICS, "no/such"])
    assert {"train/loss", "train/kd", "train/ce", "val/loss", "baseline/train/loss"} <= set(series)
    assert "no/such" not in series
    xs, ys = series["train/loss"]
    assert xs == sorted(xs) and len(xs) == 6
    assert all(y is not None and math.isfinite(y) for y in ys)


def test_long_curves_are_decimated_keep_the_end_and_show_gaps(
    store: RunStore, demo: dict[str, Any]
) -> None:
    xs, ys = report.metric_series(store, demo["long"], ["train/loss"], max_points=500)["train/loss"]
    assert len(xs) <= 501 and xs[-1] == 5000 and ys[-1] == pytest.approx(1 / 5000)
    full = report.metric_series(store, demo["long"], ["train/loss"], max_points=10_000)
    _, full_ys = full["train/loss"]
    assert full_ys[10] is None and full_ys[20] is None  # NaN and inf become gaps


def test_memory_series_uses_seconds(store: RunStore, demo: dict[str, Any]) -> None:
    real = report.memory_series(store, demo["real"])
    assert "mem/rss_mb" in real and real["mem/rss_mb"][0][0] == 0.0
    xs, ys = report.memory_series(store, demo["long"])["mem/gpu0_used_mb"]
    assert xs[:3] == [0.0, 0.5, 1.0] and ys[0] == 100.0
    with pytest.raises(ValueError, match="x must be"):
        report.metric_series(store, demo["long"], ["train/loss"], x="wall")


# --- report: comparison, samples, batches -------------------------------------------------


def test_comparison_teacher_vs_students(store: RunStore, demo: dict[str, Any]) -> None:
    run = store.get_run(demo["real"])
    rows = report.comparison(run)
    assert [r["role"] for r in rows] == ["teacher", "student", "baseline"]
    teacher, student, baseline = rows
    assert teacher["size_ratio"] == 1.0 and teacher["speed_vs_teacher"] == 1.0
    assert student["val_ppl"] == pytest.approx(run.summary["student"]["val_ppl"])
    assert "without the teacher" in baseline["model"]
    assert all(key in report.LABELS for key in report.COMPARISON_COLUMNS)
    no_baseline = {k: v for k, v in run.summary.items() if k != "baseline"}
    assert [r["role"] for r in report.comparison(no_baseline)] == ["teacher", "student"]
    assert report.comparison({}) == []
    assert (
        report.comparison({"teacher": "garbage", "student": {"val_ppl": "x"}})[0]["val_ppl"] is None
    )


def test_samples_side_by_side(store: RunStore, demo: dict[str, Any]) -> None:
    rows = report.samples(store.get_run(demo["real"]))
    assert rows and rows[0]["prompt"] == "The list"
    sampled = {f"{role}_sampled" for role in ("teacher", "student", "baseline")}
    assert set(rows[0]) == {*report.SAMPLE_COLUMNS, *sampled}  # greedy and seeded sampled
    table = report.sample_table(store.get_run(demo["real"]))
    assert [r["model"] for r in table] == ["Teacher", "Distilled student", "CE-only student"]
    assert all(r["sampled"] for r in table)
    assert len(report.sample_history(store.get_run(demo["real"]))) == 2  # steps 3 and 6
    assert report.samples({"samples": [{"prompt": "p"}, "junk"]}) == [
        {"prompt": "p", "teacher": "", "student": "", "baseline": ""}
    ]


def test_batch_comparison_names_the_grid_and_the_best(
    store: RunStore, demo: dict[str, Any]
) -> None:
    assert report.batch_ids(store) == [BATCH_ID]
    rows = report.batch_comparison(store, BATCH_ID)
    assert [r["run_id"] for r in rows] == demo["members"]
    assert [r["settings"] for r in rows] == ["loss.beta=0.0", "loss.beta=0.5", "loss.beta=1.0"]
    # the failed member has the lowest perplexity but cannot be the best
    assert [r["best"] for r in rows] == [False, True, False]
    assert rows[2]["state"] == "failed"
    assert report.batch_comparison(store, "no-such-batch") == []


def test_varying_settings_ignores_names_and_paths() -> None:
    configs = [
        {"name": "a", "runs_dir": "/x", "loss": {"beta": 0.1}, "seed": 1},
        {"name": "b", "runs_dir": "/y", "loss": {"beta": 0.1}, "seed": 2},
    ]
    assert report.varying_settings(configs) == ["seed"]


def test_report_queries_never_write(demo: dict[str, Any]) -> None:
    root = demo["root"]
    before = db_fingerprint(root)
    with RunStore(root, read_only=True) as store:
        for run_id in [demo["real"], demo["long"], *demo["members"]]:
            report.comparison(store.get_run(run_id))
            report.metric_series(store, run_id, report.LOSS_METRICS)
            report.memory_series(store, run_id)
        report.runs_table(store)
        report.batch_comparison(store, BATCH_ID)
    assert db_fingerprint(root) == before


# --- the dashboard view -------------------------------------------------------------------


def _walk(widget: W.Widget) -> list[W.Widget]:
    out = [widget]
    for child in getattr(widget, "children", ()):
        out.extend(_walk(child))
    return out


@pytest.fixture
def dashboard(demo: dict[str, Any]) -> Any:
    from widgets.dashboard import build_dashboard

    board = build_dashboard(demo["root"])
    yield board
    assert board.store is not None
    board.store.close()


def test_dashboard_refuses_a_writable_store(demo: dict[str, Any]) -> None:
    from widgets.dashboard import Dashboard

    with RunStore(demo["root"]) as writable, pytest.raises(ValueError, match="read_only"):
        Dashboard(writable)


def test_dashboard_offers_nothing_but_pickers(dashboard: Any) -> None:
    """No Text inputs, no buttons: the only widgets a viewer can act on select what to
    display (Dropdowns, a multi-select of run ids, checkboxes, the smoothing slider)."""
    interactive = [
        w
        for w in _walk(dashboard.root)
        if isinstance(w, (W.ValueWidget, W.Button)) and not isinstance(w, W.HTML)
    ]
    assert {type(w) for w in interactive} == {
        W.Dropdown,
        W.SelectMultiple,
        W.Checkbox,
        W.FloatSlider,
    }
    assert not any(isinstance(w, (W.Text, W.Textarea, W.Button)) for w in _walk(dashboard.root))


def test_dashboard_shows_runs_charts_and_escapes_html(dashboard: Any, demo: dict[str, Any]) -> None:
    from widgets.dashboard import figure_of

    html_out = " ".join(w.value for w in _walk(dashboard.root) if isinstance(w, W.HTML))
    assert "&lt;b&gt;bold&lt;/b&gt;" in html_out and "<script>alert" not in html_out
    dashboard.run_picker.value = demo["real"]
    charts = [figure_of(w) for w in _walk(dashboard.run_view) if isinstance(w, W.Output)]
    titles = [c["layout"]["title"]["text"] for c in charts]
    assert titles[0] == "Training loss" and len(charts) == 4, titles
    for spec in charts:
        assert spec["layout"]["yaxis"]["title"]["text"]
    loss = charts[0]["data"]
    assert {t["name"] for t in loss} >= {"training loss (total)", "held-out loss"}
    assert len(loss[0]["x"]) == 6
    assert charts[0]["config"]["showSendToCloud"] is False  # no "share to Plotly Cloud"
    # plain JSON in the widget state: no multi-megabyte plotly.js bundle per chart
    assert all(len(json.dumps(c)) < 100_000 for c in charts)


def test_dashboard_callbacks_only_read(dashboard: Any, demo: dict[str, Any]) -> None:
    """Drive every picker option (what a viewer's comm messages can do): the store is
    unchanged, and ids that are not in the store are ignored."""
    root = demo["root"]
    before = db_fingerprint(root)
    for _, run_id in dashboard.run_picker.options:
        dashboard.run_picker.value = run_id
        assert dashboard.run_view.children, run_id
    shown = dashboard.run_view.children
    dashboard.show_run("../../etc/passwd")
    dashboard.show_run(12345)
    dashboard.show_batch("'; DROP TABLE runs; --")
    assert dashboard.run_view.children is shown
    assert db_fingerprint(root) == before


def test_dashboard_without_runs_says_so(tmp_path: Path) -> None:
    from widgets.dashboard import build_dashboard

    board = build_dashboard(tmp_path / "empty")
    assert board.store is None
    assert "No runs yet" in board.root.children[0].value


def test_dashboard_module_imports_no_control_code() -> None:
    source = (REPO / "widgets" / "dashboard.py").read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    forbidden = {
        "widgets.panel",
        "widgets.form",
        "foundry_kernel.run._control",
        "foundry_kernel.cli",
    }
    assert not imported & forbidden
    # the read-only view and its queries; never the panel, the form or the run controls
    allowed = {"widgets", "widgets.report", "widgets.plot_text", "widgets.html_report"}
    assert {name for name in imported if name.startswith("widgets")} <= allowed


def test_importing_the_dashboard_does_not_load_the_panel() -> None:
    code = "import sys, widgets.dashboard; sys.exit('widgets.panel' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0


# --- issue 15: strings typed by users are text in figures; damaged rows are shown -------

PAYLOADS: tuple[str, ...] = (
    '<a href="https://evil.example/phish">phish</a>',
    "<img src=x onerror=\"window.__pwned='img'\">",
    "<script>window.__pwned='script'</script>",
    "<b>bold</b><i>it</i><sup>up</sup><br>next",
    '<a href="javascript:alert(1)">js-link</a>',
    '</text><a xlink:href="https://evil.example/svg">svg-break</a>',
    '<span style="font-size:90px">huge</span>',
    "<svg onload=alert(2)><iframe src=javascript:alert(3)>",
    "&lt;b&gt;entity&lt;/b&gt; &amp; &#60;",
)
"""Markup plotly.js renders in titles, ticks, legends and hover text (``<a href>``,
``<b>``, ``<span style>``, ...), markup a browser would run, and entities plotly would
decode (``&lt;`` shows as ``<`` unless its ``&`` is escaped)."""
PAYLOAD_BATCH = "b-payloads"


def build_payload_store(root: Path) -> dict[str, Any]:
    """Runs written through the store's API whose names, grid values, samples and a
    metric name each hold one payload; no training (the strings are the point)."""
    ids: dict[str, Any] = {"members": []}
    with RunStore(root) as store:
        for i, payload in enumerate(PAYLOADS):
            config = {"name": f"p{i}", "teacher": {"source": "builtin:tiny-teacher"}}
            config["data"] = {"source": payload}  # the grid: differs in every member
            run_id = store.create_run(config, name=payload, batch_id=PAYLOAD_BATCH).run_id
            store.set_state(run_id, "running")
            store.update_summary(
                run_id,
                {
                    "teacher": {"params": 2000, "val_ppl": 50.0},
                    "student": {"params": 1000, "val_ppl": 80.0 + i},
                    "baseline": {"params": 1000, "val_ppl": 95.0},
                    "samples": [{"prompt": payload, "teacher": payload, "student": payload}],
                },
            )
            store.log_metrics(run_id, 1, {"train/loss": 3.0, "val/loss": 3.5})
            store.log_metrics(run_id, 2, {"train/loss": 2.0, "val/loss": 2.5})
            # metric names reach the memory chart's legend through metric_label()
            store.log_metrics_many(
                run_id,
                [(s, f"mem/{p}_mb", 100.0 + s, 1000.0 + s) for p in PAYLOADS for s in range(3)],
            )
            store.set_state(run_id, "completed")
            ids["members"].append(run_id)
    return ids


DAMAGE: dict[str, tuple[str, str]] = {
    # name: (column, SQL value)      what the row holds instead of what the store wrote
    "bad-json": ("config", '\'{"name": "bad-json", \''),
    "list-json": ("summary", "'[1, 2, 3]'"),
    "far-future": ("created_at", "1e300"),
    "text-time": ("started_at", "'yesterday'"),
    "bad-state": ("state", "'exploded'"),
}
EXPECTED_DAMAGE = {
    "bad-json": "config is not valid JSON",
    "list-json": "summary is a JSON list, not an object",
    "far-future": "created_at 1e+300 is not a time between 1970 and 3000",
    "text-time": "started_at 'yesterday' is not a time between 1970 and 3000",
    "bad-state": "state 'exploded' is not one of",
}


def add_damaged_rows(root: Path) -> dict[str, str]:
    """Five runs created by the store, then damaged with plain sqlite3 (as a hand edit,
    a disk error or another writer would), plus two metric rows that are not points.
    The newest completed run is damaged, so the dashboard opens on a damaged run."""
    ids: dict[str, str] = {}
    with RunStore(root) as store:
        for name in DAMAGE:
            run_id = store.create_run({"name": name}, name=name).run_id
            store.set_state(run_id, "running")
            store.update_summary(run_id, {"student": {"val_ppl": 70.0}})
            store.log_metrics(run_id, 1, {"train/loss": 1.5})
            store.set_state(run_id, "completed")
            ids[name] = run_id
    conn = sqlite3.connect(root / DB_FILENAME)
    try:
        with conn:
            for name, (column, value) in DAMAGE.items():
                conn.execute(f"UPDATE runs SET {column} = {value} WHERE run_id = ?", (ids[name],))
            conn.execute(
                "INSERT INTO metrics (run_id, name, step, value, time) VALUES (?, ?, ?, ?, ?)",
                (ids["bad-json"], "train/loss", "two", 1.0, 1.0),
            )
            conn.execute(
                "INSERT INTO metrics (run_id, name, step, value, time) VALUES (?, ?, ?, ?, ?)",
                (ids["bad-json"], "train/loss", 3, "lots", 2.0),
            )
    finally:
        conn.close()
    return ids


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("payloads") / "runs"
    build_payload_store(root)
    return root


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("damaged") / "runs"
    ids = build_payload_store(root)
    healthy = ids["members"]
    return {"root": root, "healthy": healthy, "damaged": add_damaged_rows(root)}


def test_plot_text_escapes_exactly_what_plotly_reads_as_markup() -> None:
    from widgets.plot_text import plot_safe, plot_text

    assert plot_text('<a href="x">&lt;</a>') == '&lt;a href="x"&gt;&amp;lt;&lt;/a&gt;'
    assert plot_text("plain 'quotes' \"stay\"") == "plain 'quotes' \"stay\""
    import numpy as np

    spec = {"data": [{"x": np.array(["<b>", "a"]), "y": np.arange(2.0), "name": "<i>"}]}
    safe = plot_safe(spec)
    assert (
        list(safe["data"][0]["x"]) == ["&lt;b&gt;", "a"] and safe["data"][0]["name"] == "&lt;i&gt;"
    )
    assert safe["data"][0]["y"] is spec["data"][0]["y"]  # numbers are not copied
    assert spec["data"][0]["name"] == "<i>"  # the input is left as it was


def test_dashboard_figures_hold_no_markup(payloads: Path) -> None:
    """Issue 15, finding 7: every string in every figure of the dashboard is escaped (no
    '<' left for plotly.js to parse), and unescaping gives back what the user typed."""
    import html as html_lib

    from widgets.dashboard import build_dashboard, figure_of

    board = build_dashboard(payloads)
    try:
        specs = []
        for _, run_id in board.run_picker.options:
            board.run_picker.value = run_id
            specs += [figure_of(w) for w in _walk(board.run_view) if isinstance(w, W.Output)]
        specs += [figure_of(w) for w in _walk(board.batch_view) if isinstance(w, W.Output)]
    finally:
        assert board.store is not None
        board.store.close()
    strings = [s for spec in specs for s in _strings(spec)]
    assert not [s for s in strings if "<" in s or ">" in s]
    shown = {html_lib.unescape(s) for s in strings}
    for payload in PAYLOADS:
        assert any(payload in s for s in shown), payload  # batch ticks and memory legend


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return []


def test_damaged_rows_are_listed_flagged_with_the_good_ones(damaged: dict[str, Any]) -> None:
    """Issue 15, finding 9: one corrupt row used to crash list_runs (JSONDecodeError) and
    with it ``foundry runs`` and the dashboard."""
    with RunStore(damaged["root"], read_only=True) as store:
        records = {r.run_id: r for r in store.list_runs()}
        for run_id in damaged["healthy"]:
            assert not records[run_id].damaged and records[run_id].summary["student"]
        for name, run_id in damaged["damaged"].items():
            record = records[run_id]
            assert record.damaged and EXPECTED_DAMAGE[name] in " ".join(record.damage), record
            assert record.name == name  # what could be read is kept
        assert records[damaged["damaged"]["bad-json"]].summary == {"student": {"val_ppl": 70.0}}
        assert records[damaged["damaged"]["list-json"]].summary == {}
        assert records[damaged["damaged"]["far-future"]].started_at is not None

        # acting on a damaged run is refused with what is wrong; showing it is allowed
        bad = damaged["damaged"]["bad-json"]
        with pytest.raises(StoreError, match=r"damaged record: config is not valid JSON"):
            store.get_run(bad)
        assert store.get_run(bad, damaged_ok=True).damage == records[bad].damage
        # the two metric rows that are not points: one skipped, one a gap (NaN)
        points = store.metrics(bad, ["train/loss"])
        assert [p.step for p in points] == [1, 3] and math.isnan(points[1].value)

        rows = {row["run_id"]: row for row in report.runs_table(store)}
        assert len(rows) == len(PAYLOADS) + len(DAMAGE)
        far = rows[damaged["damaged"]["far-future"]]
        assert report.fmt("started", far["started"]) != "—"  # started_at is still good
        assert "1970 and 3000" in far["damage"] and rows[damaged["healthy"][0]]["damage"] == ""
        columns = report.with_damage_column(report.RUN_COLUMNS, rows.values())
        assert columns[-1] == "damage"
        assert [label for label, _ in report.run_choices(rows.values())].count(
            next(label for label, _ in report.run_choices([far]))
        ) == 1
        assert report.fmt("started", 1e300) == "1e+300"  # an odd value is shown, not raised
        for run_id in damaged["damaged"].values():
            record = store.get_run(run_id, damaged_ok=True)
            report.comparison(record), report.samples(record), report.run_row(record)
            report.metric_series(store, run_id, report.LOSS_METRICS)


def test_the_dashboard_renders_a_store_with_damaged_rows(damaged: dict[str, Any]) -> None:
    from widgets.dashboard import build_dashboard

    board = build_dashboard(damaged["root"])
    try:
        page = " ".join(w.value for w in _walk(board.root) if isinstance(w, W.HTML))
        assert "Damaged record" in page and "config is not valid JSON" in page
        # the newest completed run (by the row's own created_at, 1e300) is a damaged one
        assert board.run_picker.value == damaged["damaged"]["far-future"]
        assert "1970 and 3000" in board.run_view.children[0].value
        for _, run_id in board.run_picker.options:
            board.run_picker.value = run_id
            assert board.message.value == "", board.message.value
            assert board.run_view.children
        status = board.run_view.children[0].value
        assert "Damaged record" not in status  # the last option is a healthy payload run
    finally:
        assert board.store is not None
        board.store.close()


def _foundry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "foundry_kernel.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def test_foundry_runs_and_show_survive_damaged_rows(damaged: dict[str, Any]) -> None:
    root = str(damaged["root"])
    listing = _foundry("runs", "--runs-dir", root)
    assert listing.returncode == 0, listing.stderr
    assert "Traceback" not in listing.stderr
    lines = listing.stdout.splitlines()
    for name, run_id in damaged["damaged"].items():
        line = next(line for line in lines if line.startswith(run_id))
        assert f"DAMAGED: {EXPECTED_DAMAGE[name]}" in line, line
    assert all(any(line.startswith(r) for line in lines) for r in damaged["healthy"])
    assert f"{len(DAMAGE)} run record(s) are damaged" in listing.stderr

    as_json = _foundry("runs", "--runs-dir", root, "--json")
    assert as_json.returncode == 0, as_json.stderr

    def no_nan(text: str) -> None:
        raise AssertionError(f"{text} is not JSON")

    records = {r["run_id"]: r for r in json.loads(as_json.stdout, parse_constant=no_nan)}
    assert records[damaged["damaged"]["far-future"]]["created_at"] is None
    assert records[damaged["healthy"][0]]["damage"] == []

    for name, run_id in damaged["damaged"].items():
        shown = _foundry("show", run_id, "--runs-dir", root)  # human-readable by default
        assert shown.returncode == 0, shown.stderr
        assert "DAMAGED" in shown.stdout and EXPECTED_DAMAGE[name] in shown.stdout
        assert f"run {run_id} has a damaged record" in shown.stderr
        raw = _foundry("show", run_id, "--runs-dir", root, "--json")
        assert raw.returncode == 0, raw.stderr
        assert EXPECTED_DAMAGE[name] in " ".join(json.loads(raw.stdout)["damage"])


def test_resuming_a_damaged_run_is_refused_not_run_on_blanks(damaged: dict[str, Any]) -> None:
    """get_run refuses damaged records by default, so a resume never rebuilds a run from
    a blanked config ({} would validate to the defaults and train something else)."""
    bad = damaged["damaged"]["bad-json"]
    proc = _foundry("distill", "--resume", bad, "--runs-dir", str(damaged["root"]))
    assert proc.returncode == 2, proc.stderr
    assert "damaged record: config is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_teacher_built_on_the_users_corpus_is_named_as_theirs(tmp_path: Path) -> None:
    """Issue 16: Foundry's teacher recipe trained on a user's own corpus was labelled
    'built-in tiny teacher' on the dashboard; the model card named a relative path."""
    from foundry_kernel.config import load_config
    from foundry_kernel.run._job import model_card

    mine = {"source": "builtin:tiny-teacher", "build": {"data": "corpora/notes.txt"}}
    assert report.describe_teacher({"teacher": mine}) == "tiny teacher built on notes.txt"
    assert report.describe_teacher({"teacher": {"source": "builtin:tiny-teacher"}}) == (
        "built-in tiny teacher"
    )
    results = {
        "teacher": {"params": 100, "val_ppl": 10.0, "tokens_per_s": 50.0},
        "student": {"params": 25, "val_ppl": 20.0, "agreement": 0.5, "tokens_per_s": 90.0},
    }
    corpus = tmp_path / "notes.txt"
    corpus.write_text("text\n", encoding="utf-8")
    built = load_config(overrides=[f"teacher.build.data={corpus}"])
    assert f"built on `{corpus}`" in model_card(built, results)
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    relative = os.path.relpath(folder)
    card = model_card(load_config(overrides=[f"teacher.source={relative}"]), results)
    assert f"Teacher: `{folder.absolute()}`" in card and f"`{relative}`" not in card
