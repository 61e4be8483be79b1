"""One registry of metric names: every name a run records is in it, and the workbench's
labels and charts come from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundry_kernel import run_sync
from foundry_kernel.metrics import BASELINE, METRICS, lookup
from foundry_kernel.store import RunStore
from widgets.charts import metric_trace
from widgets.report import metric_label


def test_every_recorded_name_is_registered(tiny_config: dict[str, Any], runs_dir: Path) -> None:
    handle = run_sync(tiny_config)
    assert handle.state.value == "completed", handle.error
    with RunStore(runs_dir, read_only=True) as store:
        names = store.metric_names(handle.id)
    assert {"train/loss", "val/ppl", "baseline/val/ppl", "mem/rss_mb"} <= set(names)
    assert [n for n in names if lookup(n) is None] == []


def test_readers_derive_from_the_registry() -> None:
    for metric in METRICS:
        assert metric_label(metric.name) == metric.description
        trace = metric_trace(metric.name)
        if trace is not None:
            assert trace.label == metric.label
    baseline = lookup(f"{BASELINE}val/loss")
    assert baseline is not None and baseline.label == "CE-only val loss"
    assert metric_trace("train/lr") is None  # registered, not charted
    assert lookup("no/such") is None and metric_label("no/such") == "no/such"
    gpu = lookup("mem/gpu3_used_mb")
    assert gpu is not None and gpu.index == 3 and metric_label(gpu.name) == "GPU 3 memory used (MB)"
