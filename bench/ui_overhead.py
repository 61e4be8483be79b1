"""The live UI's cost: training tokens/s headless against the same run driven by the panel.

``python -m bench.ui_overhead [--steps N] [--repeats R] [--json PATH]``

Both sides run the same small-but-real distillation config in this one process:

``headless``  ``foundry_kernel.run_sync(config)``: no widgets, no updater.
``panel``     ``DistillPanel(config).start()``: the panel's updater thread reads the run's
              events and memory samples at 4 Hz and pushes status, log and three live
              ``FigureWidget`` charts (batched, throttled, decimated). No browser is
              attached, so widget state is serialized but not sent over ZeroMQ; in a
              kernel that send happens on the IOPub thread, not the training thread.

Runs alternate (headless, panel, headless, ...) so that drift in the machine's load hits
both sides alike. Reported: the median per-step training tokens/s (first steps dropped as
warm-up) and the wall time per step between the first and last logged step (evaluations
included), each with its panel/headless ratio, and the CPU time the panel's updater
thread used as a share of the run's wall time (the cost that does not depend on noise
from other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WARMUP_STEPS = 5


def bench_config(runs_dir: Path, steps: int) -> dict[str, Any]:
    """Small enough for 2 CPU cores, big enough that a step is real work (~0.1 s)."""
    return {
        "name": "ui-bench",
        "seed": 0,
        "device": "cpu",
        "runs_dir": str(runs_dir),
        "teacher": {
            "source": "builtin:tiny-teacher",
            "build": {
                "vocab_size": 2048,
                "hidden_size": 128,
                "num_layers": 2,
                "num_heads": 2,
                "seq_len": 64,
                "batch_size": 8,
                "steps": 40,
                "lr": 1e-2,
                "max_documents": 120,
            },
        },
        "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
        "data": {"max_documents": 120, "seq_len": 64},
        "optim": {"batch_size": 16, "warmup_steps": 5, "lr": 5e-3},
        "eval": {
            "every_steps": 50,
            "max_batches": 2,
            "baseline": False,
            "sample_tokens": 4,
            "sample_prompts": ["The list"],
        },
        "limits": {"max_steps": steps},
        "checkpoint": {"every_steps": None},
    }


def _measure(handle: Any) -> dict[str, float]:
    """Median step tokens/s and wall seconds per step, from the run's own records."""
    from foundry_kernel.store import RunStore

    if str(handle.state) != "completed":
        raise RuntimeError(f"benchmark run {handle.id} ended {handle.state}: {handle.error}")
    with RunStore(handle.runs_dir, read_only=True) as store:
        rows = store.metrics(handle.id, ["tokens_per_s", "train/loss"])
    speed = [r.value for r in rows if r.name == "tokens_per_s" and r.step > WARMUP_STEPS]
    times = [r.time for r in rows if r.name == "train/loss" and r.step > WARMUP_STEPS]
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return {"tokens_per_s": statistics.median(speed), "s_per_step": per_step}


def run_headless(config: dict[str, Any]) -> dict[str, float]:
    import foundry_kernel

    return _measure(foundry_kernel.run_sync(config))


def run_panel(config: dict[str, Any]) -> dict[str, float]:
    from widgets import DistillPanel

    panel = DistillPanel(config)
    handle = panel.start()
    if not panel.wait(3600):
        raise RuntimeError("the panel's updater did not finish")
    result = _measure(handle)
    charts = panel.views[0].charts
    result.update(
        pushes=float(charts.pushes),
        messages=float(charts.messages),
        updater_cpu_share=panel.updater_cpu_s / (handle.duration_s or 1.0),
    )
    panel.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui_overhead", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (alternating)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import foundry_kernel
    from bench.common import load_average, table

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load_before = load_average()
    results: dict[str, list[dict[str, float]]] = {"headless": [], "panel": []}
    with tempfile.TemporaryDirectory(prefix="foundry-ui-bench-") as tmp:
        config = bench_config(Path(tmp) / "runs", args.steps)
        warm = foundry_kernel.run_sync(config)  # builds and caches the teacher, warms up
        print(f"  warm-up run (discarded): {warm.state} in {warm.duration_s:.0f} s", flush=True)
        for i in range(args.repeats):
            for side, fn in (("headless", run_headless), ("panel", run_panel)):
                t0 = time.perf_counter()
                results[side].append(fn(config))
                print(
                    f"  {side} #{i + 1}: {results[side][-1]} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    rows, summary = [], {}
    for key in ("tokens_per_s", "s_per_step"):
        head = statistics.median(r[key] for r in results["headless"])
        ui = statistics.median(r[key] for r in results["panel"])
        summary[key] = {"headless": head, "panel": ui, "ratio": ui / head}
        rows.append([key, f"{head:,.3f}", f"{ui:,.3f}", f"{ui / head:.3f}"])
    print(table(["metric (median)", "headless", "panel + charts", "panel/headless"], rows))
    pushes = statistics.median(r["pushes"] for r in results["panel"])
    messages = statistics.median(r["messages"] for r in results["panel"])
    share = statistics.median(r["updater_cpu_share"] for r in results["panel"])
    print(f"chart pushes per panel run: {pushes:.0f}, figure messages: {messages:.0f}")
    print(f"updater thread CPU: {share:.2%} of one core over the run's wall time")
    print(f"load average before/after: {load_before} / {load_average()}")
    if args.json:
        payload = {"steps": args.steps, "runs": results, "summary": summary}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
