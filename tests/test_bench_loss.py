"""``bench.loss_memory.targets_of``: the loss benchmark's goals judged from its rows.

The rows are made here (no child processes): the point is that each verdict follows from
the figures by the goal's threshold, including the bounds an out-of-memory side gives.
"""

from __future__ import annotations

from typing import Any

from bench.common import GiB
from bench.loss_memory import (
    DIVERGENCES,
    LOGITS_PEAK_GOAL,
    TARGET_POINT,
    TIME_GOAL,
    _add_ratios,
    targets,
    targets_of,
)

V, N = TARGET_POINT


def _row(scenario: str, name: str, peak: float, time_s: float, **kw: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "contender": name,
        "vocab": kw.pop("vocab", V),
        "tokens": kw.pop("tokens", N),
        "status": kw.pop("status", "ok"),
        "peak_bytes": int(peak * GiB),
        "time_s": time_s,
        "baseline": name.startswith("plain"),
        **kw,
    }


def _section(
    peak: dict[str, float] | None = None,
    time: dict[str, float] | None = None,
    plain_status: str = "ok",
    **kw: Any,
) -> dict[str, Any]:
    """Plain at 10 GiB / 10 s; every ours at 0.5 GiB / 10 s unless overridden."""
    peak, time = peak or {}, time or {}
    rows = [_row("logits", "plain_kl", 10.0, 10.0, status=plain_status, **kw)]
    rows.append(_row("sparse", "plain_sparse_kl", 10.0, 10.0, **kw))
    names = [f"ours_{s}{x}" for s in DIVERGENCES for x in ("", "_copy")]
    for name in names:
        rows.append(_row("logits", name, peak.get(name, 0.5), time.get(name, 10.0), **kw))
    for name in ("ours_sparse_kl", "ours_sparse_kl_copy"):
        rows.append(_row("sparse", name, peak.get(name, 0.5), time.get(name, 10.0), **kw))
    _add_ratios(rows)
    return {"results": rows, "targets": targets(rows, (rows[0]["vocab"], rows[0]["tokens"]))}


def _issue14(section: dict[str, Any]) -> dict[str, Any]:
    return {t.goal: t for t in targets_of(section) if t.issue == 14}


def test_every_divergence_and_sparse_get_a_peak_and_a_time_target() -> None:
    got = _issue14(_section())
    assert len(got) == 2 * (len(DIVERGENCES) + 1)
    assert all(t.met is True for t in got.values()), got
    peak = [t for t in got.values() if "peak" in t.goal]
    assert all(f"{LOGITS_PEAK_GOAL:.2f}x plain" in t.goal for t in peak)
    assert any("0.05x (512 MiB vs 10.00 GiB)" in t.figure for t in peak), peak


def test_a_divergence_over_the_peak_or_time_goal_is_missed() -> None:
    section = _section(
        peak={"ours_tvd": 1.5, "ours_sparse_kl": 0.9},  # 0.15x and 0.09x of plain
        time={"ours_jsd": 10.0 * TIME_GOAL + 0.5},
    )
    got = _issue14(section)
    missed = sorted(g for g, t in got.items() if t.met is False)
    assert len(missed) == 2, missed
    assert any(g.startswith("TVD") and "peak" in g for g in missed)
    assert any(g.startswith("JSD") and "time" in g for g in missed)
    sparse_peak = next(t for g, t in got.items() if g.startswith("sparse") and "peak" in g)
    assert sparse_peak.met is True and "0.09x" in sparse_peak.figure


def test_plain_out_of_memory_gives_an_upper_bound() -> None:
    """Plain OOM: its peak is a lower bound, so ours' ratio an upper bound; under the goal
    it is met, over it unproven (None), never a false 'missed'."""
    section = _section(peak={"ours_rkl": 3.0}, plain_status="oom")
    got = _issue14(section)
    kl = next(t for g, t in got.items() if g.startswith("KL:") and "peak" in g)
    rkl = next(t for g, t in got.items() if g.startswith("reverse KL") and "peak" in g)
    assert kl.met is True and "<=0.05x" in kl.figure and "(OOM)" in kl.figure
    assert rkl.met is None and "unproven" in rkl.figure


def test_ours_out_of_memory_is_missed_and_quick_sizes_are_not_judged() -> None:
    section = _section()
    for r in section["results"]:
        if r["contender"] == "ours_skew_fkl":
            r["status"] = "oom"
    got = _issue14(section)
    skew = next(t for g, t in got.items() if g.startswith("skew forward") and "peak" in g)
    assert skew.met is False and "out of memory" in skew.figure
    quick = targets_of(_section(vocab=2048, tokens=128))
    assert quick and all(t.met is None for t in quick)
    assert all("not measured" in t.figure for t in quick)


def test_issue6_targets_follow_the_entries() -> None:
    got = [t for t in targets_of(_section()) if t.issue == 6]
    # ours_kl only: the budget one was not run, the copy (opt-out) is not the goal's subject
    assert len(got) == 2 and all("ours_kl " in t.goal for t in got), got
    fifth = [t for t in got if "1/5" in t.goal]
    assert [t.met for t in fifth] == [True] and "0.05x" in fifth[0].figure
    assert len(_section()["targets"]) == 2  # the copy stays in the issue-6 table
    liger = [t for t in got if "Liger" in t.goal]
    assert all(t.met is None and "not measurable" in t.figure for t in liger)
