"""A torchrun worker for tests/test_distributed_lora.py: a LoRA student (peft) trained by the
real Trainer under DDP or FSDP2 on real gloo process groups.

``python -m torch.distributed.run --nproc-per-node 2 tests/dist_workers/lora_worker.py
--strategy ddp --out DIR`` writes each rank's results to ``DIR/rank{r}.pt``: an
uninterrupted run, a run stopped during step 3 (its sharded, adapter-only checkpoint) and
its resumed continuation. The test builds the single-process reference with the same
builders (imported by file path).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from foundry_kernel import _lora
from foundry_kernel._context import RunContext
from foundry_kernel._world import World, close_world, init_world
from foundry_kernel.config import LoraConfig
from foundry_kernel.errors import RunCancelled
from foundry_kernel.training._parallel import full_state_dict
from foundry_kernel.training._trainer import Trainer

WORKER_DIR = Path(__file__).parent


def _train_worker() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_worker", WORKER_DIR / "train_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _train_worker()  # the tiny Llama builders, blocks and plan of the data-parallel tests
LORA = LoraConfig(rank=4, alpha=8, target_modules="all-linear")
STOP_AT = base.STOP_AT


def student() -> torch.nn.Module:
    return _lora.apply_lora(base.student(), LORA, seed=5)


def train(
    world: World,
    strategy: str,
    *,
    ckpt: Path | None = None,
    resume: bool = False,
    stop: bool = False,
) -> dict[str, Any]:
    ctx = RunContext()
    curve: dict[int, float] = {}
    model = student()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer = Trainer(
        model,  # type: ignore[arg-type]
        base.bundle(),
        base.plan(strategy, "fused"),
        ctx=ctx,
        on_metrics=lambda step, values: curve.update(
            {step: values["train/loss"]} if "train/loss" in values else {}
        ),
        teacher=base.teacher(),
        vocab_size=base.VOCAB,
        ckpt_dir=ckpt,
        world=world,
    )
    if stop and world.rank == 1:
        real = trainer._micro_step
        calls = 0

        def micro(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2 * (STOP_AT - 1) + 1:
                ctx.cancel("cancelled by the test")
            return real(*args, **kwargs)

        trainer._micro_step = micro  # type: ignore[method-assign]
    ended = "finished"
    try:
        trainer.fit(resume=resume)
    except RunCancelled:
        ended = "cancelled"
    weights = full_state_dict(trainer.model, world)
    return {
        "curve": curve,
        "ended": ended,
        "step": trainer.step,
        "loss_strategy": trainer.loss_strategy.name,
        "weights": weights,
        "frozen_before": frozen_before if world.is_main else None,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "optimizer_numel": sum(
            p.numel() for g in trainer.optimizer.param_groups for p in g["params"]
        ),
        # this rank's own adapters (DDP: the full tensors; each rank must hold the same)
        "local_adapters": {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
        }
        if strategy == "ddp"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_world(backend="gloo", device_type="cpu", timeout_s=120)
    out: dict[str, Any] = {"world_size": world.world_size}
    out["full"] = train(world, args.strategy)
    ckpt = args.out / "ckpt"
    out["stopped"] = train(world, args.strategy, ckpt=ckpt, stop=True)
    world.barrier()
    out["resumed"] = train(world, args.strategy, ckpt=ckpt, resume=True)
    torch.save(out, args.out / f"rank{world.rank}.pt")
    world.barrier()
    close_world(world)


if __name__ == "__main__":
    main()
