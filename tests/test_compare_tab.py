"""The panel's compare tab lists the store's other runs and overlays the ones picked:
runs of another panel or of ``foundry distill`` exist only in the store, so a compare tab
that only knew its own handles showed nothing of them (issue 16). A browser test in
``test_browser_lab.py`` drives the same with two panels and a CLI run."""

from __future__ import annotations

import time
from pathlib import Path

from _fake_runs import finished_run

from foundry_kernel.store import RunStore
from widgets import DistillPanel
from widgets.charts import CompareChart
from widgets.compare_tab import CompareTab


def _curve(store: RunStore, run_id: str, steps: range, *, val_every: int = 5) -> None:
    rows = [(s, "train/loss", 5.0 - 0.01 * s, 1000.0 + s) for s in steps]
    rows += [(s, "val/loss", 5.5 - 0.01 * s, 1000.0 + s) for s in steps if s % val_every == 0]
    store.log_metrics_many(run_id, rows)


def _tab(root: Path, own: set[str] | None = None, **kw: float) -> CompareTab:
    return CompareTab(
        CompareChart(live=True),
        runs_dir=lambda: root,
        own=lambda: set(own or ()),
        label_for=lambda run_id, name: f"{name} ({run_id[-6:]})",
        **kw,
    )


def _lengths(tab: CompareTab) -> dict[str, int]:
    return {
        t.name: len(t.y)
        for t in tab.chart.figures["compare"].data
        if t.y is not None and t.visible is not False
    }


def test_the_picker_lists_the_store_runs_but_the_panels_own(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as store:
        mine = finished_run(store, overrides=["name=mine"])
        cli = finished_run(store, overrides=["name=from-cli"])
        failed = finished_run(store, overrides=["name=broke"], state="failed")
    tab = _tab(root, own={mine})
    assert tab.refresh_list() == 2
    offered = dict((rid, text) for text, rid in tab.picker.options)
    assert set(offered) == {cli, failed}
    assert "from-cli · completed" in offered[cli] and "broke · failed" in offered[failed]
    assert str(root) in tab.note.value


def test_a_missing_store_is_a_sentence_not_an_error(tmp_path: Path) -> None:
    tab = _tab(tmp_path / "nothing-yet")
    assert tab.refresh_list() == 0
    assert tab.picker.options == ()
    assert "No runs to add yet" in tab.note.value


def test_picked_runs_are_drawn_and_a_running_one_keeps_growing(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as store:
        done = finished_run(store, overrides=["name=done"])
        _curve(store, done, range(1, 41))
        live = finished_run(store, overrides=["name=live"], state="running")
        _curve(store, live, range(1, 11))
    tab = _tab(root, poll_interval_s=0.05)
    tab.refresh_list()
    try:
        tab.picker.value = (done, live)  # what a click in the picker does
        lengths = _lengths(tab)
        assert lengths[f"done ({done[-6:]}) train"] == 40
        assert lengths[f"done ({done[-6:]}) val"] == 8
        assert lengths[f"live ({live[-6:]}) train"] == 10
        # the live run trains on in another process: its new rows reach the chart
        with RunStore(root) as store:
            _curve(store, live, range(11, 31))
            store.set_state(live, "completed")
        deadline = time.monotonic() + 10
        while _lengths(tab).get(f"live ({live[-6:]}) train") != 30:
            assert time.monotonic() < deadline, _lengths(tab)
            time.sleep(0.05)
        assert _lengths(tab)[f"live ({live[-6:]}) val"] == 6
        # it ended: the poller stops (and nothing is read twice)
        deadline = time.monotonic() + 10
        while tab._thread is not None:
            assert time.monotonic() < deadline, "the poller did not stop after the run ended"
            time.sleep(0.05)
        assert tab.poll() == 0
        assert _lengths(tab)[f"live ({live[-6:]}) train"] == 30
        # unpicked: hidden, not lost; picked again: back with every point
        tab.picker.value = (live,)
        assert f"done ({done[-6:]}) train" not in _lengths(tab)
        assert set(tab.picked) == {live}
        tab.picker.value = (done, live)
        assert _lengths(tab)[f"done ({done[-6:]}) train"] == 40
    finally:
        tab.close()


def test_the_panels_compare_tab_reads_the_panels_store(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as store:
        other = finished_run(store, overrides=["name=elsewhere"])
        _curve(store, other, range(1, 6))
    panel = DistillPanel({"runs_dir": str(root)})
    try:
        assert panel.store_dir() == root.absolute()
        assert [rid for _, rid in panel.compare_tab.picker.options] == [other]
        assert panel.tabs.children[0] is panel.compare_tab.widget
        panel.compare_tab.picker.value = (other,)
        names = [t.name for t in panel.compare.figures["compare"].data]
        assert names == [f"elsewhere ({other[-6:]}) train", f"elsewhere ({other[-6:]}) val"]
    finally:
        panel.close()
