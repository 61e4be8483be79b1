"""Many real runs alive in one process: separate state, separate results, no cross-talk."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from conftest import tiny_config_dict

from foundry_kernel import load_config, start
from foundry_kernel.store import RunStore


def test_ten_concurrent_runs_finish_with_their_own_results(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    """Runs 0 and 1 share a seed: identical curves prove no run disturbs another."""
    threads_before = threading.active_count()
    seeds = [7, 7, 1, 2, 3, 4, 5, 6, 8, 9]
    handles = []
    for i, seed in enumerate(seeds):
        cfg: dict[str, Any] = tiny_config_dict(
            runs_dir, eval={"baseline": False}, limits={"max_steps": 5}
        )
        cfg.update(seed=seed, name=f"c{i}")
        handles.append(start(load_config(cfg)))
    for h in handles:
        assert str(h.wait(300)) == "completed", h.error and h.error.message
    assert len({h.id for h in handles}) == len(seeds)
    with RunStore(runs_dir, read_only=True) as store:
        curves = {h.id: [r.value for r in store.metrics(h.id, ["train/loss"])] for h in handles}
        for h in handles:
            assert [r.step for r in store.metrics(h.id, ["train/loss"])] == [1, 2, 3, 4, 5]
            assert store.get_run(h.id).state == "completed"
    a, b = handles[0].id, handles[1].id
    assert curves[a] == curves[b]
    distinct = {tuple(curves[h.id]) for h in handles[1:]}
    assert len(distinct) == len(seeds) - 1
    for h in handles:
        h.join(10)
    assert threading.active_count() <= threads_before + 1  # at most an idle watchdog/sampler
