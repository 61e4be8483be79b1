"""Issue 16's dashboard queries (widgets.report) and the offline HTML report
(widgets.html_report), on a store written straight through the store's API (no training):
a grid over loss kind and temperature, a failed run, a run whose distillation hurt with a
near-chance teacher, and samples that are mostly newlines.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from foundry_kernel.store import RunStore
from widgets import html_report, report

REPO = Path(__file__).resolve().parents[1]
EVIL = '<img src=x onerror="window.__pwned=1">'


def _config(name: str, kind: str, temperature: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "teacher": {"source": "builtin:tiny-teacher", "build": {"vocab_size": 1024}},
        "loss": {"kind": kind, "beta": 0.5, "temperature": temperature, "ce_weight": 0.5},
        "distill": {"mode": extra.pop("mode", "online")},
        "data": {"source": "builtin:python-docs"},
        **extra,
    }


def _summary(student: float, baseline: float, teacher: float, **extra: Any) -> dict[str, Any]:
    return {
        "teacher": {"params": 4000, "val_ppl": teacher, "val_loss": 3.0},
        "student": {"params": 1000, "val_ppl": student, "val_loss": 4.0, "agreement": 0.4},
        "baseline": {"params": 1000, "val_ppl": baseline, "val_loss": 4.2},
        "gap_closed": extra.pop("gap_closed", 0.3),
        **extra,
    }


def build_views_store(root: Path) -> dict[str, str]:
    """Five runs: a 3-member grid (forward KL T=1, JSD T=1, JSD T=2), a failed run and a
    run that hurt with a near-chance teacher; returns name -> run id."""
    ids: dict[str, str] = {}
    grid = [
        ("fkl-t1", "forward_kl", 1.0, 90.0),
        ("jsd-t1", "jsd", 1.0, 80.0),
        ("jsd-t2", "jsd", 2.0, 85.0),
    ]
    with RunStore(root) as store:
        for name, kind, temperature, ppl in grid:
            run_id = store.create_run(
                _config(f"{name} sweep", kind, temperature), name=name, batch_id="b-grid"
            ).run_id
            store.set_state(run_id, "running")
            samples = [
                {
                    "prompt": "To open a file",
                    "teacher": "\n\n\n\n\n\n\n\nopen()",
                    "student": "Annnnn.   Annnn.",
                    "baseline": "\t",
                    "student_sampled": "with open(path) as f:",
                    "teacher_sampled": "open(name)\n\n\n",
                    "baseline_sampled": EVIL,
                }
            ]
            history = [
                {"step": 2, "prompt": "To open a file", "greedy": "Annnnn.", "sampled": "\n" * 40},
                {"step": 5, "prompt": "To open a file", "greedy": "open()", "sampled": EVIL},
            ]
            settings = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 32, "seed": 0}
            store.update_summary(
                run_id,
                _summary(
                    ppl,
                    100.0,
                    40.0,
                    samples=samples,
                    distill_sample_history=history,
                    sample_settings=settings,
                ),
            )
            for step in range(1, 6):
                store.log_metrics(
                    run_id, step, {"train/loss": 5.0 / step + ppl / 100, "val/ppl": ppl + 10 / step}
                )
            store.set_state(run_id, "completed")
            ids[name] = run_id
        failed = store.create_run(_config("broken", "forward_kl", 1.0), name="broken").run_id
        store.set_state(failed, "running")
        store.set_state(failed, "failed", error="out of memory")
        ids["broken"] = failed
        hurt = store.create_run(
            _config("hurt", "reverse_kl", 1.0, mode="offline"), name=EVIL
        ).run_id
        store.set_state(hurt, "running")
        check = {
            "standing": "near_chance",
            "teacher_ppl": 900.0,
            "chance_ppl": 1024.0,
            "message": "the teacher is barely better than chance (held-out perplexity 900.0, "
            "chance 1024)",
        }
        store.update_summary(
            hurt, _summary(175.0, 100.0, 900.0, gap_closed=-0.75, teacher_check=check)
        )
        store.log_metrics(hurt, 1, {"train/loss": 6.0})
        store.set_state(hurt, "completed")
        ids["hurt"] = hurt
    return ids


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("views") / "runs"
    return {"root": root, **build_views_store(root)}


@pytest.fixture
def store(views: dict[str, Any]) -> Any:
    with RunStore(views["root"], read_only=True) as opened:
        yield opened


def test_recipe_tells_forward_kl_from_jsd(store: RunStore, views: dict[str, Any]) -> None:
    rows = {row["run_id"]: row for row in report.runs_table(store)}
    assert rows[views["fkl-t1"]]["recipe"] == "forward KL · T=1 · CE 0.5 · online · python-docs"
    assert rows[views["jsd-t2"]]["recipe"] == "JSD β=0.5 · T=2 · CE 0.5 · online · python-docs"
    assert (
        "reverse KL" in rows[views["hurt"]]["recipe"] and "offline" in rows[views["hurt"]]["recipe"]
    )
    assert "recipe" in report.RUN_COLUMNS and "verdict" in report.RUN_COLUMNS
    assert rows[views["hurt"]]["verdict"] == "did not help"
    assert rows[views["jsd-t1"]]["verdict"] == "helped"
    assert rows[views["broken"]]["verdict"] is None


def test_tags_come_from_name_grid_and_settings(store: RunStore, views: dict[str, Any]) -> None:
    tags = report.tags_of(store.get_run(views["jsd-t2"]))
    assert tags == ["jsd-t2", "sweep", "jsd", "online", "python-docs", "batch:b-grid"]


def test_filter_hides_failed_by_default_and_counts_them(store: RunStore) -> None:
    rows = report.runs_table(store)
    kept, hidden = report.filter_rows(rows)
    assert hidden == 1 and len(kept) == len(rows) - 1
    assert all(r["state"] != "failed" for r in kept)
    everything, none_hidden = report.filter_rows(rows, hide_failed=False)
    assert len(everything) == len(rows) and none_hidden == 0
    failed_only, _ = report.filter_rows(rows, states=["failed"])  # asked for: shown
    assert [r["name"] for r in failed_only] == ["broken"]
    offline, _ = report.filter_rows(rows, modes=["offline"])
    assert [r["name"] for r in offline] == [EVIL]
    tagged, _ = report.filter_rows(rows, tag="jsd")
    assert {r["name"] for r in tagged} == {"jsd-t1", "jsd-t2"}


def test_differences_only_lists_what_varies(store: RunStore, views: dict[str, Any]) -> None:
    runs = [store.get_run(views[n]) for n in ("fkl-t1", "jsd-t1", "jsd-t2")]
    rows = {row["setting"]: row for row in report.config_differences(runs)}
    assert set(rows) == {"loss.kind", "loss.temperature"}  # beta, ce weight, data: same
    assert [rows["loss.kind"][r.run_id] for r in runs] == ["forward_kl", "jsd", "jsd"]
    assert [rows["loss.temperature"][r.run_id] for r in runs] == [1.0, 1.0, 2.0]
    assert report.config_differences(runs[:1]) == []


def test_parallel_data_of_a_grid(store: RunStore, views: dict[str, Any]) -> None:
    runs = store.list_runs(batch_id="b-grid")
    data = report.parallel_data(runs)
    dims = {d["label"]: d for d in data["dimensions"]}
    assert list(dims) == [
        "loss.kind",
        "loss.temperature",
        "student held-out perplexity",
        "gap closed",
    ]
    order = [store.get_run(rid).name for rid in data["run_ids"]]
    kind = dims["loss.kind"]
    assert kind["ticktext"] == ["forward_kl", "jsd"]
    assert [kind["ticktext"][v] for v in kind["values"]] == [
        "jsd" if n.startswith("jsd") else "forward_kl" for n in order
    ]
    ppl = dict(zip(order, dims["student held-out perplexity"]["values"], strict=True))
    assert ppl == {"fkl-t1": 90.0, "jsd-t1": 80.0, "jsd-t2": 85.0}
    # failed runs are left out; one completed run is no grid
    assert report.parallel_data([store.get_run(views["broken"]), runs[0]])["dimensions"] == []
    fig = html_report.parallel_figure(data)
    assert fig is not None and fig.data[0].type == "parcoords"


def test_csv_and_json_downloads_hold_raw_values(store: RunStore, views: dict[str, Any]) -> None:
    rows = report.runs_table(store)
    columns = ("run_id", "name", "state", "student_ppl", "gap_closed", "tags")
    parsed = list(csv.DictReader(io.StringIO(report.table_csv(columns, rows))))
    by_id = {r["run_id"]: r for r in parsed}
    assert len(parsed) == len(rows)
    assert by_id[views["hurt"]]["name"] == EVIL  # raw text; the CSV is not HTML
    assert float(by_id[views["jsd-t1"]]["student_ppl"]) == 80.0
    assert by_id[views["broken"]]["student_ppl"] == ""
    assert by_id[views["jsd-t2"]]["tags"].split() == report.tags_of(store.get_run(views["jsd-t2"]))
    records = json.loads(report.table_json(columns, rows))
    assert {r["run_id"]: r["gap_closed"] for r in records}[views["hurt"]] == -0.75
    assert report.table_json(("x",), [{"x": float("nan")}]) == '[\n {\n  "x": null\n }\n]'


def test_warnings_are_sentences_never_bare_numbers(store: RunStore, views: dict[str, Any]) -> None:
    notices = report.run_warnings(store.get_run(views["hurt"]))
    levels = [level for level, _ in notices]
    text = " ".join(t for _, t in notices)
    assert levels[0] == "warning" and "Distillation did not help" in text
    assert "barely better than chance" in text and "-75%" not in text
    good = report.run_warnings(store.get_run(views["jsd-t1"]))
    assert good[0][0] == "good" and good[0][1].startswith("Distillation helped")
    # no teacher check stored: chance is read from the vocabulary, and a teacher barely
    # better than the CE-only student is called out
    chance = {"teacher": {"val_ppl": 700.0}, "student": {"val_ppl": 750.0}}
    cfg = {"teacher": {"build": {"vocab_size": 1024}}}
    assert "barely better than chance" in report.run_warnings(chance, cfg)[-1][1]
    close = {
        "teacher": {"val_ppl": 95.0},
        "student": {"val_ppl": 80.0},
        "baseline": {"val_ppl": 100.0},
    }
    assert (
        "only barely better than the student trained without it"
        in (report.run_warnings(close, cfg)[-1][1])
    )


def test_visible_text_and_sample_columns() -> None:
    assert report.visible_text("\n\n\n\nopen()") == "⏎×4open()"
    assert report.visible_text("a\nb\tc    d ") == "a⏎b⇥c·×4d·"
    assert report.visible_text("") == "∅ (nothing generated)"
    assert report.visible_text("x" * 500, max_chars=10) == "x" * 9 + "…"
    rows = [{"prompt": "p", "teacher": "t", "student": "s", "student_sampled": "ss"}]
    assert report.sample_columns(rows) == ("prompt", "teacher", "student", "student_sampled")


def test_sample_tables_read_prompt_model_greedy_sampled(
    store: RunStore, views: dict[str, Any]
) -> None:
    run = store.get_run(views["jsd-t1"])
    rows = report.sample_table(run)
    assert [r["model"] for r in rows] == ["Teacher", "Distilled student", "CE-only student"]
    assert {r["prompt"] for r in rows} == {"To open a file"}
    assert rows[1] == {
        "prompt": "To open a file",
        "model": "Distilled student",
        "greedy": "Annnnn.   Annnn.",
        "sampled": "with open(path) as f:",
    }
    assert report.prompt_spans(rows) == [3, 0, 0]
    assert report.prompt_spans([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "b"}]) == [1, 2, 0]
    assert [h["step"] for h in report.sample_history(run)] == [2, 5]
    assert report.sample_history(run, "baseline") == []
    assert "temperature 0.8, top-p 0.95 (seed 0" in report.sampling_note(run)
    # an older run: greedy only, no history, no settings; a damaged one: nothing
    old = {"samples": [{"prompt": "p", "teacher": "t", "student": "s"}]}
    assert report.sample_table(old) == [
        {"prompt": "p", "model": "Teacher", "greedy": "t", "sampled": ""},
        {"prompt": "p", "model": "Distilled student", "greedy": "s", "sampled": ""},
    ]
    assert report.sample_history({"distill_sample_history": ["junk", {"step": "x"}]}) == []
    assert "drawn at random" in report.sampling_note(old)

    section = html_report.samples_section_html(run)
    heads = re.findall(r"<th>(.*?)</th>", section)
    assert heads[:4] == ["Prompt", "Model", "Greedy", "Sampled (seeded)"]
    assert heads[4:] == ["Step", "Greedy", "Sampled (seeded)"]  # one prompt: named above
    assert section.count('rowspan="3"') == 1  # the prompt once, for its three models
    assert "Samples over training" in section and "⏎×40" in section  # not 40 blank lines
    assert "\n" not in re.sub(r'title="[^"]*"', "", section)  # raw newlines only on hover
    assert EVIL not in section and html.escape(EVIL) in section
    assert "Sampled" not in html_report.samples_table_html(report.sample_table(old))
    assert "No samples during training" in html_report.samples_section_html(
        store.get_run(views["hurt"])
    )


def test_notebook_summary_shows_both_sample_tables(store: RunStore, views: dict[str, Any]) -> None:
    from widgets.display import summary_html

    page = summary_html(store.get_run(views["jsd-t1"]).summary)
    assert "Prompt" in page and "Model" in page and "Sampled (seeded)" in page
    assert "Samples over training" in page and "⏎×40" in page and "CE-only student" in page
    assert EVIL not in page and html.escape(EVIL) in page
    assert "Samples over training" not in summary_html({"samples": [{"prompt": "p"}]})


def test_ema_smooths_and_keeps_gaps() -> None:
    assert report.ema([1.0, None, 3.0], 0.0) == [1.0, None, 3.0]
    smooth = report.ema([0.0, 10.0, 10.0, 10.0], 0.5)
    assert smooth[0] == 0.0 and 0 < smooth[1] < smooth[2] < smooth[3] < 10.0
    with pytest.raises(ValueError, match="smoothing weight"):
        report.ema([1.0], 1.0)


def test_html_report_is_self_contained_and_escaped(store: RunStore, views: dict[str, Any]) -> None:
    from plotly.offline import get_plotlyjs

    page = html_report.render_report(store)
    assert page.count(get_plotlyjs()) == 1  # plotly.js inline, once
    ours = page.replace(get_plotlyjs(), "")  # (the bundle itself names its CDN in a string)
    assert "cdn.plot.ly" not in ours and "https://" not in ours
    assert page.count("<script src") == 0 and "Plotly.newPlot" in page
    assert EVIL not in page and html.escape(EVIL) in page
    # chart JSON cannot close its <script>: every '<' in it is \u003c
    for script in re.findall(r"<script>(\(function.*?)</script>", page):
        assert "<" not in script
    assert "broken" not in page  # failed runs are not in the default report
    assert "Distillation did not help" in page and "⏎×8open()" in page
    assert "Sampled (seeded)" in page and "Settings that differ" in page
    assert "Samples over training" in page and "⏎×40" in page
    with pytest.raises(Exception, match="no run nope"):
        html_report.render_report(store, ["nope"])
    one = html_report.render_report(store, [views["broken"]])
    assert "out of memory" in one and "Runs side by side" not in one


def test_foundry_dashboard_export(views: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "foundry_kernel.cli", "dashboard", "--runs-dir"]
    proc = subprocess.run(
        [*cmd, str(views["root"]), "--export", str(target), "--runs", views["jsd-t1"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "report written to" in proc.stdout
    page = target.read_text(encoding="utf-8")
    assert "jsd-t1" in page and "fkl-t1" not in page
    bad = subprocess.run(
        [*cmd, str(views["root"]), "--runs", views["jsd-t1"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "add --export" in bad.stderr


# --- the dashboard's new views ------------------------------------------------------------


def test_dashboard_filters_overlay_and_downloads(views: dict[str, Any]) -> None:
    import base64

    import ipywidgets as W

    from widgets.dashboard import build_dashboard, figure_of

    board = build_dashboard(views["root"])
    try:
        assert "1 failed hidden" in board.table_view.value
        assert board.state_filter.value == board.tag_filter.value == "any"
        assert "broken" not in board.table_view.value
        board.hide_failed.value = False
        assert "broken" in board.table_view.value and "failed hidden" not in board.table_view.value
        board.tag_filter.value = "jsd"
        shown = board.table_view.value
        assert "jsd-t1" in shown and "fkl-t1" not in shown and "JSD β=0.5 · T=2" in shown
        link = re.search(r'download="runs.csv" href="data:text/csv;charset=utf-8;base64,([^"]+)"',
                         board.downloads.value)  # fmt: skip
        assert link is not None
        csv_text = base64.b64decode(link.group(1)).decode()
        assert "jsd-t1" in csv_text and "fkl-t1" not in csv_text  # the table as filtered
        board.tag_filter.value = "any"

        board.overlay_picker.value = (views["fkl-t1"], views["jsd-t1"], views["jsd-t2"])
        board.smoothing.value = 0.5
        board.log_scale.value = True
        charts = [figure_of(w) for w in board.overlay_view.children if isinstance(w, W.Output)]
        overlay, parallel = charts
        assert overlay["layout"]["yaxis"]["type"] == "log"
        assert len([t for t in overlay["data"] if t.get("showlegend") is not False]) == 3
        assert parallel["data"][0]["type"] == "parcoords"
        diffs = board.overlay_view.children[1].value
        assert "loss.kind" in diffs and "loss.temperature" in diffs and "loss.beta" not in diffs
        board.offer_report.value = True
        assert 'download="foundry-report.html"' in board.overlay_view.children[-1].value

        board.show_run(views["hurt"])  # not listed by id? it is; warnings are shown
        board.run_picker.value = views["hurt"]
        status = board.run_view.children[0].value
        assert "Distillation did not help" in status and "barely better than chance" in status
        board.run_picker.value = views["jsd-t1"]
        shown = "".join(getattr(w, "value", "") for w in board.run_view.children)
        assert "Samples over training" in shown and "Sampled (seeded)" in shown
    finally:
        assert board.store is not None
        board.store.close()


def test_dashboard_refresh_keeps_running_runs_live(tmp_path: Path) -> None:
    from widgets.dashboard import build_dashboard

    root = tmp_path / "runs"
    with RunStore(root) as store:
        run_id = store.create_run(_config("live", "jsd", 1.0), name="live").run_id
        store.set_state(run_id, "running")
        store.log_metrics(run_id, 1, {"train/loss": 5.0})
    board = build_dashboard(root)
    try:
        board.overlay_picker.value = (run_id,)
        before = board.table_view.value
        with RunStore(root) as store:
            store.log_metrics(run_id, 2, {"train/loss": 4.0})
            store.set_state(run_id, "completed")
            new = store.create_run(_config("new", "jsd", 1.0), name="newcomer").run_id
        board.refresh()
        assert "completed" in board.table_view.value and before != board.table_view.value
        assert new in dict((v, k) for k, v in board.run_picker.options)
        from widgets.dashboard import figure_of

        overlay = figure_of(board.overlay_view.children[0])
        assert overlay["data"][0]["x"] == [1.0, 2.0]  # the new point reached the chart
    finally:
        board.close()
        assert board.store is not None
        board.store.close()
