"""One rank of the scaling benchmark, run by torchrun as ``-m bench.scaling_worker``.

Every rank builds the same tiny teacher and student (seeded), trains the shipped
:class:`~foundry_kernel.training._trainer.Trainer` data-parallel under
``distributed.strategy`` for warm-up plus timed steps, and writes its own JSON file
(``<out>.rank<r>.json``): step times as rank 0 saw them (steps are in lockstep: every step
ends in a collective), this rank's peak RSS, and a fingerprint of the final weights so the
driver can compare 1 and N processes. Run without torchrun it is the single-process point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import CpuMeter, ModelShape, build_llama, random_tokens


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scaling_worker")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    return p


def _fingerprint(state: dict[str, torch.Tensor]) -> tuple[str, list[float]]:
    """SHA-256 over the weights in name order, and the first values of each (for a
    numeric difference between runs that are not bit-identical)."""
    digest = hashlib.sha256()
    probe: list[float] = []
    for name in sorted(state):
        t = state[name].detach().float().contiguous().cpu()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes())
        probe.extend(t.flatten()[:16].tolist())
    return digest.hexdigest(), probe


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from foundry_kernel._context import RunContext
    from foundry_kernel._world import close_world, init_world
    from foundry_kernel.config import (
        CheckpointConfig,
        DistributedConfig,
        EvalConfig,
        LimitsConfig,
        LossConfig,
        OptimConfig,
    )
    from foundry_kernel.data._blocks import DataBundle, TokenBlocks
    from foundry_kernel.training._parallel import full_state_dict
    from foundry_kernel.training._trainer import Trainer, TrainPlan

    dist_cfg = DistributedConfig(strategy=args.strategy, backend="gloo", timeout_s=300)
    world = init_world(backend="gloo", device_type="cpu", timeout_s=dist_cfg.timeout_s)
    try:
        student_shape = ModelShape(
            hidden=args.hidden,
            layers=args.layers,
            heads=4,
            intermediate=args.hidden * 2,
            vocab=args.vocab,
            seq_len=args.seq,
        )
        teacher_shape = ModelShape(
            hidden=args.hidden * 2,
            layers=args.layers + 1,
            heads=4,
            intermediate=args.hidden * 4,
            vocab=args.vocab,
            seq_len=args.seq,
        )
        total = args.warmup + args.steps
        ids = random_tokens(args.batch * (total + 1), args.seq, args.vocab, seed=0)
        ones = torch.ones_like(ids)
        train = TokenBlocks(input_ids=ids, attention_mask=ones, labels=ids.clone())
        val = TokenBlocks(
            input_ids=ids[: args.batch],
            attention_mask=ones[: args.batch],
            labels=ids[: args.batch].clone(),
        )
        plan = TrainPlan(
            optim=OptimConfig(batch_size=args.batch, lr=1e-3, warmup_steps=1, max_grad_norm=1.0),
            limits=LimitsConfig(max_steps=total),
            eval=EvalConfig(every_steps=10**9, max_batches=1),
            checkpoint=CheckpointConfig(every_steps=None, on_stop=False),
            loss=LossConfig(kind="forward_kl", temperature=1.0, ce_weight=0.0),
            distributed=dist_cfg,
        )
        teacher = build_llama(teacher_shape, seed=1).eval().requires_grad_(False)
        student = build_llama(student_shape, seed=2)
        params = sum(p.numel() for p in student.parameters())
        stamps: list[float] = []

        def sink(step: int, values: dict[str, float]) -> None:
            if "train/loss" in values:
                stamps.append(time.perf_counter())

        trainer = Trainer(
            student,
            DataBundle(train=train, val=val, report={}),
            plan,
            ctx=RunContext(),
            on_metrics=sink,
            teacher=teacher,
            vocab_size=args.vocab,
            world=world,
        )
        meter = CpuMeter()
        meter.start()
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        state = full_state_dict(trainer.model, world)
        record: dict[str, Any] = {
            "rank": world.rank,
            "world_size": world.world_size,
            "strategy": args.strategy if world.distributed else "single",
            "student_params": params,
            "tokens_per_step": args.batch * args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "wall_s": wall,
            "peak_rss_growth_bytes": meter.peak(),
            "rss_method": meter.method,
            "loss_strategy": trainer.loss_strategy.name,
        }
        if world.is_main:
            timed = stamps[args.warmup :]
            start = stamps[args.warmup - 1] if args.warmup else t0
            record["timed_s"] = (timed[-1] - start) if timed else None
            if state is not None:
                record["weights_sha256"], record["weights_probe"] = _fingerprint(state)
        path = args.out.with_name(f"{args.out.name}.rank{world.rank}.json")
        path.write_text(json.dumps(record), encoding="utf-8")
        del trainer, student, teacher, state  # the DDP reducer holds the group: drop it first
    finally:
        close_world(world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
