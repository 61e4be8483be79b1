"""Per-rank figures of a data-parallel run and the straggler flag (foundry_kernel.ranks),
read from a real SQLite run store by the dashboard's data layer and shown by its view."""

from __future__ import annotations

import math
from pathlib import Path

import ipywidgets as W
import pytest
from conftest import tiny_config_dict

from foundry_kernel.config import load_config
from foundry_kernel.ranks import parse_rank_metric, rank_figures, rank_metric
from foundry_kernel.store import RunStore
from widgets import report


def test_names_round_trip_and_other_metrics_are_not_rank_figures() -> None:
    assert rank_metric(3, "rss_mb") == "rank/3/rss_mb"
    assert parse_rank_metric("rank/3/rss_mb") == ("", 3, "rss_mb")
    assert parse_rank_metric("baseline/rank/0/tokens_per_s") == ("baseline/", 0, "tokens_per_s")
    for other in ("train/loss", "rank/x/rss_mb", "rank/1/secret", "mem/rss_mb", "rank/1"):
        assert parse_rank_metric(other) is None
    with pytest.raises(ValueError, match="unknown per-rank figure"):
        rank_metric(0, "loss")


def test_one_slow_rank_is_flagged_and_the_fast_ones_are_not() -> None:
    rows = []
    for step in range(5):
        rows += [
            ("rank/0/tokens_per_s", 1000.0 + step),
            ("rank/1/tokens_per_s", 990.0),
            ("rank/2/tokens_per_s", 600.0),  # 40 % below the others
            ("rank/3/tokens_per_s", 1010.0),
            ("rank/2/rss_mb", 512.0),
        ]
    figures = rank_figures(rows)
    assert [f.rank for f in figures] == [0, 1, 2, 3]
    assert [f.straggler for f in figures] == [False, False, True, False]
    assert figures[0].tokens_per_s == 1002.0  # the median of its steps
    assert figures[2].rss_mb == 512.0 and figures[2].vram_mb is None


def test_two_ranks_flag_the_slower_only_past_the_tolerance() -> None:
    close = rank_figures({"rank/0/tokens_per_s": [100.0], "rank/1/tokens_per_s": [85.0]})
    assert not any(f.straggler for f in close)  # 15 % slower: within the 20 % tolerance
    far_rows = {"rank/0/tokens_per_s": [100.0], "rank/1/tokens_per_s": [70.0]}
    assert [f.straggler for f in rank_figures(far_rows)] == [False, True]
    assert not any(f.straggler for f in rank_figures(far_rows, tolerance=0.5))


def test_phases_are_kept_apart_and_nan_is_ignored() -> None:
    rows = {
        "rank/0/tokens_per_s": [100.0, math.nan],
        "rank/1/tokens_per_s": [100.0],
        "baseline/rank/0/tokens_per_s": [10.0],
        "baseline/rank/1/tokens_per_s": [100.0],
    }
    assert not any(f.straggler for f in rank_figures(rows))
    baseline = rank_figures(rows, prefix="baseline/")
    assert [f.straggler for f in baseline] == [True, False]
    assert rank_figures({"train/loss": [1.0]}) == []  # a single-process run has none
    with pytest.raises(ValueError, match="tolerance"):
        rank_figures(rows, tolerance=1.5)


def test_dashboard_shows_processes_of_a_stored_run(tmp_path: Path) -> None:
    from widgets.dashboard import Dashboard

    config = load_config(tiny_config_dict(tmp_path)).to_dict()
    with RunStore(tmp_path) as store:
        run_id = store.create_run(config, name="dp").run_id
        single = store.create_run(config, name="single").run_id
        store.set_state(run_id, "running")
        for step in range(1, 31):
            store.log_metrics(
                run_id,
                step,
                {
                    "train/loss": 3.0,
                    "rank/0/tokens_per_s": 900.0,
                    "rank/1/tokens_per_s": 400.0 if step > 10 else 900.0,
                    "rank/0/rss_mb": 700.0,
                    "rank/1/rss_mb": 710.0,
                },
            )
        store.log_metrics(single, 1, {"train/loss": 3.0})
    with RunStore(tmp_path, read_only=True) as store:
        rows = report.rank_rows(store, run_id)
        assert [(r["rank"], r["straggler"]) for r in rows] == [(0, False), (1, True)]
        assert rows[1]["train_tokens_per_s"] == 400.0  # the last 20 steps, not the first 10
        assert report.rank_rows(store, single) == []
        board = Dashboard(store)
        board.show_run(run_id)
        text = " ".join(w.value for w in board.run_view.children if isinstance(w, W.HTML))
        assert "Processes (data parallel)" in text and "Slowing the others down" in text
        board.show_run(single)
        text = " ".join(w.value for w in board.run_view.children if isinstance(w, W.HTML))
        assert "Processes (data parallel)" not in text


def test_the_panels_status_line_names_the_ranks_and_a_straggler() -> None:
    from widgets.panel import _rank_parts

    assert _rank_parts({"train/loss": 2.0}, "") == []
    both = {"rank/0/tokens_per_s": 900.0, "rank/1/tokens_per_s": 880.0}
    assert _rank_parts(both, "") == ["2 ranks"]
    slow = {**both, "rank/1/tokens_per_s": 300.0, "baseline/rank/0/tokens_per_s": 1.0}
    assert _rank_parts(slow, "") == ["2 ranks", "straggler: rank 1"]
