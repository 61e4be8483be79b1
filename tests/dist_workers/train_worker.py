"""A torchrun worker for tests/test_distributed_train.py: real gloo process groups, real
tiny transformers models, the real Trainer.

``python -m torch.distributed.run --nproc-per-node 2 tests/dist_workers/train_worker.py
--strategy ddp --out DIR`` runs every scenario the test compares and writes each rank's
results to ``DIR/rank{r}.pt``. The builders are imported by the test too (by file path), so
the single-process reference trains exactly the same models on exactly the same blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from foundry_kernel._context import RunContext
from foundry_kernel._world import World, close_world, init_world
from foundry_kernel.config import (
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OnPolicyConfig,
    OptimConfig,
)
from foundry_kernel.data._blocks import DataBundle, TokenBlocks
from foundry_kernel.errors import RunCancelled
from foundry_kernel.training._parallel import full_state_dict, shard_teacher
from foundry_kernel.training._trainer import Trainer, TrainPlan, _loss_parts

VOCAB = 64
SEQ = 12
MAX_STEPS = 5
STOP_AT = 3  # the stop lands during this step (1-based): the run ends with this many


def tiny_llama(seed: int, hidden: int, layers: int) -> LlamaForCausalLM:
    """A real Llama, fp32, identical in every process that builds it with the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def student() -> LlamaForCausalLM:
    return tiny_llama(0, 16, 2)


def teacher() -> LlamaForCausalLM:
    return tiny_llama(1, 24, 1).eval()


def blocks(n: int, seed: int, *, padded: bool = False) -> TokenBlocks:
    """Blocks with a prompt of 0-6 tokens masked out of the labels, a different length per
    block: the ranks' shares hold different numbers of valid tokens. ``padded``: every
    third block ends in 3 padding positions (masked out of attention and labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for i in range(n):
        labels[i, : (i * 5) % 7] = -100
        if padded and i % 3 == 0:
            mask[i, -3:] = 0
            labels[i, -3:] = -100
    return TokenBlocks(ids, mask, labels)


def bundle(*, padded: bool = False) -> DataBundle:
    return DataBundle(
        train=blocks(24, 0, padded=padded), val=blocks(8, 1, padded=padded), report={}
    )


def plan(strategy: str, loss_strategy: str, *, max_steps: int = MAX_STEPS) -> TrainPlan:
    return TrainPlan(
        optim=OptimConfig(batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1),
        limits=LimitsConfig(max_steps=max_steps),
        eval=EvalConfig(every_steps=100, max_batches=2),
        checkpoint=CheckpointConfig(every_steps=None, on_stop=True, keep_last=2),
        loss=LossConfig(ce_weight=0.5),
        seed=3,
        loss_strategy=loss_strategy,
        distributed=DistributedConfig(strategy=strategy),  # type: ignore[arg-type]
    )


def train(
    world: World,
    strategy: str,
    loss_strategy: str,
    *,
    ckpt: Path | None = None,
    resume: bool = False,
    stop_rank: int | None = None,
    bypass: bool = False,
    shard: bool = False,
    on_policy: bool = False,
    padded: bool = False,
    max_steps: int = MAX_STEPS,
) -> dict[str, Any]:
    """One run; returns its loss curve, validation metrics, final full weights (rank 0)
    and how it ended. ``stop_rank`` cancels that rank's context during step STOP_AT.
    ``bypass`` runs the loss on the inner model, outside the wrapper's forward (the TRL
    #5282 bug, reproduced on purpose: the test shows it would be caught). ``shard``
    places the teacher sharded (FSDP2) across the ranks; ``on_policy`` trains every step
    on the student's own samples; ``padded`` trains on partly padded blocks."""
    ctx = RunContext()
    curve: dict[int, dict[str, float]] = {}
    the_plan = plan(strategy, loss_strategy, max_steps=max_steps)
    if on_policy:
        the_plan = dataclasses.replace(
            the_plan, on_policy=OnPolicyConfig(fraction=1.0, prompt_tokens=4, max_new_tokens=6)
        )
    live = teacher()
    if shard:
        live = shard_teacher(live, world, the_plan.distributed)
    trainer = Trainer(
        student(),
        bundle(padded=padded),
        the_plan,
        ctx=ctx,
        on_metrics=lambda step, values: curve.setdefault(step, {}).update(values),
        teacher=live,
        vocab_size=VOCAB,
        ckpt_dir=ckpt,
        world=world,
    )
    if stop_rank is not None and world.rank == stop_rank:
        real = trainer._micro_step
        calls = 0

        def micro(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2 * (STOP_AT - 1) + 1:  # the first micro-batch of step STOP_AT
                ctx.cancel("cancelled by the test")
            return real(*args, **kwargs)

        trainer._micro_step = micro  # type: ignore[method-assign]
    if bypass:

        def outside(batch: Any, *, on_policy: bool = False) -> torch.Tensor:
            total, kd, ce, hidden = _loss_parts(
                trainer.model, trainer.loss_strategy.strategy, trainer._setup, batch
            )
            total.backward()
            return torch.stack([total.detach(), kd.detach(), ce.detach(), hidden.detach()])

        trainer._micro_step = outside  # type: ignore[method-assign]
    ended = "finished"
    try:
        trainer.fit(resume=resume)
    except RunCancelled:
        ended = "cancelled"
    local = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {
        "curve": curve,
        "val": dict(trainer.last_eval),
        "weights": full_state_dict(trainer.model, world),  # as the job and bench call it
        "via_wrapper": full_state_dict(trainer.wrapped, world),
        "local": local if strategy == "ddp" else None,
        "ended": ended,
        "loss_strategy": trainer.loss_strategy.name,
        "step": trainer.step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one-process-ckpt", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_world(backend="gloo", device_type="cpu", timeout_s=120)
    out: dict[str, Any] = {"world_size": world.world_size}
    for loss_strategy in ("logits", "fused"):
        out[f"full_{loss_strategy}"] = train(world, args.strategy, loss_strategy)
    for loss_strategy in ("logits", "fused"):
        out[f"shard_{loss_strategy}"] = train(world, args.strategy, loss_strategy, shard=True)
    out["on_policy"] = train(world, args.strategy, "logits", on_policy=True)
    out["padded"] = train(world, args.strategy, "logits", padded=True)
    from_one = args.out / "ckpt_from_one"
    if world.is_main:
        shutil.copytree(args.one_process_ckpt, from_one)
    world.barrier()
    out["from_one"] = train(world, args.strategy, "logits", ckpt=from_one, resume=True)
    if args.strategy == "ddp":
        out["bypass_fused"] = train(world, "ddp", "fused", bypass=True)
    ckpt = args.out / "ckpt"
    out["stopped"] = train(world, args.strategy, "logits", ckpt=ckpt, stop_rank=1)
    world.barrier()
    if world.is_main:  # the checkpoint of the stopped run, for the 2 -> 1 resume
        shutil.copytree(ckpt, args.out / "ckpt_at_stop")
    world.barrier()
    again = args.out / "ckpt_again"  # resumed with nothing left to do: the final save
    if world.is_main:  # finds its step already checkpointed
        shutil.copytree(args.out / "ckpt_at_stop", again)
    world.barrier()
    out["again"] = train(world, args.strategy, "logits", ckpt=again, resume=True, max_steps=STOP_AT)
    out["resumed"] = train(world, args.strategy, "logits", ckpt=ckpt, resume=True)
    torch.save(out, args.out / f"rank{world.rank}.pt")
    world.barrier()  # nobody tears its connections down while another rank still works
    close_world(world)


if __name__ == "__main__":
    main()
