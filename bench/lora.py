"""Full fine-tuning against a LoRA student: the same model, the same data, side by side.

Both contenders train the same seeded Llama (``bench.common.build_llama``) on the same
random token blocks with the real ``Trainer`` (plain cross-entropy: the student's own cost,
no teacher in the picture), one contender per child process, so that one's freed memory
cannot hide the other's peak:

``full``  every weight trains (AdamW state for every parameter);
``lora``  ``foundry_kernel._lora.apply_lora`` with ``student.lora`` rank 16 on every linear
          layer (``all-linear``): the base frozen, the adapters trained.

Figures per contender: trainable and total parameters, the peak memory growth of the
child from just before the model is built (CPU: ``VmHWM`` reset, ``bench.common.CpuMeter``;
CUDA: ``max_memory_allocated``) and the median training tokens/s over the timed steps
(after ``warmup`` untimed ones).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from bench.common import (
    CpuMeter,
    Figure,
    ModelShape,
    Printer,
    Target,
    build_llama,
    fmt_bytes,
    fmt_ratio,
    median,
    random_tokens,
    ratio,
    table,
)

CONTENDERS = ("full", "lora")
FULL_SHAPE = ModelShape(hidden=512, layers=4, heads=8, intermediate=1408, vocab=8192, seq_len=128)
QUICK_SHAPE = ModelShape(hidden=64, layers=2, heads=2, intermediate=176, vocab=512, seq_len=32)
RANK = 16


def measure(name: str, shape: ModelShape, *, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """One contender in this process: build, (adapt), train ``warmup + steps`` steps."""
    import torch

    from foundry_kernel import _lora
    from foundry_kernel._context import RunContext
    from foundry_kernel.config import LimitsConfig, LoraConfig, OptimConfig
    from foundry_kernel.data._blocks import DataBundle, TokenBlocks
    from foundry_kernel.training._trainer import Trainer, TrainPlan

    ids = random_tokens(batch * (steps + warmup), shape.seq_len, shape.vocab, seed=0)
    ones = torch.ones_like(ids)
    data = DataBundle(
        train=TokenBlocks(ids, ones, ids.clone()),
        val=TokenBlocks(ids[:batch], ones[:batch], ids[:batch].clone()),
        report={},
    )
    meter = CpuMeter()
    meter.start()
    model: Any = build_llama(shape, seed=0)
    if name == "lora":
        model = _lora.apply_lora(model, LoraConfig(rank=RANK, target_modules="all-linear"), seed=0)
    counts = _lora.param_counts(model)
    plan = TrainPlan(
        optim=OptimConfig(batch_size=batch, lr=1e-3, warmup_steps=1),
        limits=LimitsConfig(max_steps=steps + warmup),
    )
    rates: list[float] = []

    def sink(step: int, values: dict[str, float]) -> None:
        if "tokens_per_s" in values and step > warmup:
            rates.append(values["tokens_per_s"])

    trainer = Trainer(model, data, plan, ctx=RunContext(), on_metrics=sink)
    trainer.fit()
    return {
        "contender": name,
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "peak_bytes": meter.peak(),
        "memory_method": meter.method,
        "tokens_per_s": median(rates),
        "loss_strategy": trainer.loss_strategy.name,
    }


def run(
    *, quick: bool = False, steps: int | None = None, printer: Printer = print
) -> dict[str, Any]:
    """Both contenders, each in its own child process (``python -m bench.lora --child``)."""
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    timed = steps or (2 if quick else 6)
    warmup = 1 if quick else 2
    batch = 2 if quick else 8
    results: dict[str, Any] = {}
    for name in CONTENDERS:
        printer(f"lora bench: {name} ...")
        args = [
            sys.executable,
            "-m",
            "bench.lora",
            "--child",
            name,
            "--steps",
            str(timed),
            "--warmup",
            str(warmup),
            "--batch",
            str(batch),
            *(["--quick"] if quick else []),
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            results[name] = {"contender": name, "status": "error", "error": done.stderr[-2000:]}
            continue
        results[name] = {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
    return {
        "shape": shape.to_dict(),
        "rank": RANK,
        "target_modules": "all-linear",
        "batch": batch,
        "steps": timed,
        "warmup": warmup,
        "results": results,
    }


def render(section: dict[str, Any]) -> str:
    rows = []
    res = section["results"]
    for name in CONTENDERS:
        r = res.get(name, {})
        if r.get("status") != "ok":
            rows.append([name, "error", "-", "-", "-"])
            continue
        rows.append(
            [
                name,
                f"{r['trainable_params']:,}",
                f"{r['total_params']:,}",
                fmt_bytes(r["peak_bytes"]),
                f"{r['tokens_per_s']:.0f}",
            ]
        )
    text = table(["contender", "trainable", "total", "peak memory", "tokens/s"], rows)
    full, lora = res.get("full", {}), res.get("lora", {})
    if full.get("status") == lora.get("status") == "ok":
        text += (
            f"\nlora vs full: memory {fmt_ratio(ratio(lora['peak_bytes'], full['peak_bytes']))}, "
            f"tokens/s {fmt_ratio(ratio(lora['tokens_per_s'], full['tokens_per_s']))}, "
            f"trainable {lora['trainable_params'] / full['trainable_params']:.2%}"
        )
    return text


def targets_of(section: dict[str, Any]) -> list[Target]:
    """LoRA must train fewer parameters in less memory than full fine-tuning (issue 13)."""
    res = section["results"]
    full, lora = res.get("full", {}), res.get("lora", {})
    if not full.get("status") == lora.get("status") == "ok":
        why = "a contender failed: " + ", ".join(
            n for n in CONTENDERS if res.get(n, {}).get("status") != "ok"
        )
        return [Target("lora", "LoRA: less peak memory than full fine-tuning", why, None, 13)]
    mem = ratio(lora["peak_bytes"], full["peak_bytes"])
    share = lora["trainable_params"] / full["trainable_params"]
    return [
        Target(
            "lora",
            "LoRA student: less peak memory than full fine-tuning, same model and batches",
            f"{fmt_ratio(mem)} ({fmt_bytes(lora['peak_bytes'])} vs "
            f"{fmt_bytes(full['peak_bytes'])})",
            None if mem is None else mem < 1.0,
            13,
        ),
        Target(
            "lora",
            "LoRA student: under 10% of the parameters trainable",
            f"{share:.2%} ({lora['trainable_params']:,} of {full['trainable_params']:,})",
            share < 0.10,
            13,
        ),
    ]


def figures_of(section: dict[str, Any]) -> list[Figure]:
    res = section["results"]
    full, lora = res.get("full", {}), res.get("lora", {})
    if not full.get("status") == lora.get("status") == "ok":
        return []
    speed = ratio(lora["tokens_per_s"], full["tokens_per_s"])
    return [Figure("lora", "LoRA vs full training tokens/s", fmt_ratio(speed))]


def _child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=CONTENDERS, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    shape = QUICK_SHAPE if a.quick else FULL_SHAPE
    out = measure(a.child, shape, steps=a.steps, warmup=a.warmup, batch=a.batch)
    print(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1:])
