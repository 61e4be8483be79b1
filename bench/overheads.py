"""Overheads: the in-kernel run controller against calling the training loop directly.

Both sides train the same models on the same data with the same ``Trainer``:

``direct``      ``Trainer(...).fit()`` with a bare ``RunContext`` and a metrics callback that
                does nothing but mark the step's end.
``controller``  ``foundry_kernel.run_sync(config, job=...)`` with a pipeline-free job that
                builds that same Trainer inside the run's worker thread, with the run's
                context (cancel/timeout checks, events buffered on the handle) and the
                store as the metrics sink (one SQLite write per step, as the pipeline
                does), the memory sampler on (every 0.5 s) and the watchdog on
                (``limits.timeout_s`` set).

Two figures:

* the median step time, with the two paths' steps interleaved one by one (the same
  turn-taking as the throughput benchmark): what the controller costs per step;
* the wall time of the whole call (models built, the run created in the store, worker
  thread started and joined, ``steps`` steps, the final evaluation), the two paths
  alternating: what it costs per run, fixed costs included. Both are called from a
  worker thread (see ``bench.common.in_worker_thread``).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    Printer,
    Target,
    fmt_ratio,
    in_worker_thread,
    median,
    ratio,
    summary,
    table,
)
from bench.throughput import (
    StepClock,
    StepConfig,
    Turns,
    Workload,
    config_for,
    foundry_trainer,
    make_workload,
)

PATHS = ("direct", "controller")


def run_direct(w: Workload, clock: StepClock) -> dict[str, Any]:
    def sink(step: int, values: dict[str, float]) -> None:
        if "train/loss" in values:
            clock.tick(values["train/loss"])

    trainer = foundry_trainer(w, on_metrics=sink)
    clock.begin()
    trainer.fit()
    return {"state": "completed"}


def run_controller(w: Workload, clock: StepClock, runs_dir: Path) -> dict[str, Any]:
    import foundry_kernel as fk
    from foundry_kernel.store import RunStore

    cfg = w.cfg

    def job(config: Any, *, store: Any, run_id: str, ctx: Any, resume: bool) -> dict[str, Any]:
        def sink(step: int, values: dict[str, float]) -> None:
            store.log_metrics(run_id, step, values)
            if "train/loss" in values:
                clock.tick(values["train/loss"])

        ctx.set_phase("distill", max_steps=cfg.warmup + cfg.steps)
        trainer = foundry_trainer(w, on_metrics=sink, ctx=ctx)
        clock.begin()
        trainer.fit()
        return {"steps": trainer.step}

    config = fk.load_config(
        {
            "name": "bench-overheads",
            "runs_dir": str(runs_dir),
            "limits": {"max_steps": cfg.warmup + cfg.steps, "timeout_s": 3600},
        }
    )
    store = RunStore(runs_dir)
    try:
        handle = fk.run_sync(config, job=job, store=store)
    finally:
        store.close()
    out: dict[str, Any] = {"state": str(handle.state)}
    if out["state"] != "completed" and handle.error is not None:
        out["note"] = handle.error.message
    return out


def _run(name: str, w: Workload, clock: StepClock, runs_dir: Path) -> dict[str, Any]:
    return run_direct(w, clock) if name == "direct" else run_controller(w, clock, runs_dir)


def _timed_call(name: str, w: Workload, runs_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    got = _run(name, w, StepClock(name), runs_dir)
    return {**got, "wall_s": time.perf_counter() - t0}


def measure(cfg: StepConfig, printer: Printer | None = None) -> dict[str, Any]:
    w = make_workload(cfg)
    n = cfg.warmup + cfg.steps
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overheads-") as tmp:
        # One untimed pass of each path first: lazy imports and first-call initialisation
        # (transformers' model code, SQLite, thread start-up) land on whichever runs first.
        one = make_workload(replace(cfg, warmup=0, steps=1))
        for name in PATHS:
            in_worker_thread(_run, name, one, StepClock(name), Path(tmp) / "warm")

        # Per step: both paths' steps interleaved.
        turns = Turns(PATHS)
        clocks = {p: StepClock(p, turns) for p in PATHS}
        results: dict[str, dict[str, Any]] = {}

        def body(name: str) -> None:
            try:
                results[name] = _run(name, w, clocks[name], Path(tmp) / "steps")
            except Exception as exc:  # noqa: BLE001 - reported
                results[name] = {"state": "failed", "note": f"{type(exc).__name__}: {exc}"}

        threads = {p: threading.Thread(target=body, args=(p,), daemon=True) for p in PATHS}
        turns.run(threads, n, notes)
        steps = {p: clocks[p].durations[cfg.warmup : n] for p in PATHS}
        for p in PATHS:
            if results.get(p, {}).get("state") != "completed" or len(clocks[p].durations) < n:
                notes[p] = (
                    f"{results.get(p, {}).get('state')}: {results.get(p, {}).get('note', '')}"
                )
            elif printer:
                printer(f"  {p:10s} median step {median(steps[p]) * 1000:8.1f} ms (interleaved)")

        # Whole call: alternate the two paths, fixed costs included.
        walls: dict[str, list[float]] = {p: [] for p in PATHS}
        short = make_workload(replace(cfg, warmup=0, steps=min(cfg.steps, 3)))
        for r in range(cfg.rounds):
            for name in PATHS if r % 2 == 0 else PATHS[::-1]:
                got = in_worker_thread(_timed_call, name, short, Path(tmp) / f"call{r}")
                walls[name].append(got["wall_s"])
                if got["state"] != "completed":
                    notes[name] = f"{got['state']}: {got.get('note', '')}"
        if printer:
            for p in PATHS:
                printer(
                    f"  {p:10s} whole call {median(walls[p]):.2f} s (median of {len(walls[p])})"
                )
    step_d, step_c = summary(steps["direct"]), summary(steps["controller"])
    wall_d, wall_c = median(walls["direct"]), median(walls["controller"])
    return {
        "direct": {"step_s": step_d, "wall_s": wall_d},
        "controller": {"step_s": step_c, "wall_s": wall_c},
        "step_ratio": ratio(step_c["median"], step_d["median"]),
        "wall_ratio": ratio(wall_c, wall_d),
        "wall_steps": short.cfg.steps,
        "notes": notes,
    }


def run(
    *,
    quick: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    printer: Printer = print,
) -> dict[str, Any]:
    cfg = config_for(quick, steps=steps, warmup=warmup, rounds=rounds or (1 if quick else 4))
    printer(
        f"overheads: run controller vs Trainer.fit, {cfg.warmup} warm-up + {cfg.steps} timed "
        f"steps interleaved; whole call x {cfg.rounds} each"
    )
    result = measure(cfg, printer)
    return {"config": cfg.to_dict(), **result}


def render(section: dict[str, Any]) -> str:
    rows = []
    for name in PATHS:
        s = section[name]
        rows.append(
            [
                "Trainer.fit (direct)" if name == "direct" else "run_sync (controller)",
                f"{s['step_s']['median'] * 1000:.1f} ms",
                f"{s['wall_s']:.2f} s",
                "base" if name == "direct" else fmt_ratio(section["step_ratio"]),
                "base" if name == "direct" else fmt_ratio(section["wall_ratio"]),
            ]
        )
    text = table(
        [
            "path",
            "median step",
            f"whole call ({section['wall_steps']} steps)",
            "step vs direct",
            "call vs direct",
        ],
        rows,
    )
    if section.get("notes"):
        text += "\n" + "\n".join(f"- {k}: {v}" for k, v in section["notes"].items())
    return text


# The controller (run_sync: store writes, events, memory samples, cancellation checks) must be
# nearly free: a step through it within 10 % of Trainer.fit called directly (issue 6).
CONTROLLER_STEP_CEILING = 1.10


def targets_of(section: dict[str, Any]) -> list[Target]:
    r = section.get("step_ratio")
    direct = section["direct"]["step_s"]["median"] * 1000
    controller = section["controller"]["step_s"]["median"] * 1000
    figure = "-" if r is None else f"{r:.2f}x ({controller:.1f} ms vs {direct:.1f} ms median step)"
    return [
        Target(
            "overheads",
            f"a step under the run controller <= {CONTROLLER_STEP_CEILING:.2f}x Trainer.fit's",
            figure,
            None if r is None else r <= CONTROLLER_STEP_CEILING,
            6,
        )
    ]


__all__: Sequence[str] = ("render", "run", "targets_of")
