"""A torchrun worker for tests/test_hidden_loss.py: the hidden-state loss's learned
projection under DDP (real gloo process group, real tiny Llamas, the real Trainer).

``python -m torch.distributed.run --nproc-per-node 2 tests/dist_workers/hidden_worker.py
--out DIR`` trains once with a sharded checkpoint in ``DIR/ckpt`` and writes each rank's
projection to ``DIR/rank{r}.pt``. The test calls :func:`train` with a single-process
``World()`` for the reference (loaded by file path: this is a script, not a package).
"""

from __future__ import annotations

import argparse
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
    HiddenLossConfig,
    LimitsConfig,
    LossConfig,
    OptimConfig,
)
from foundry_kernel.data._blocks import DataBundle, TokenBlocks
from foundry_kernel.training._trainer import Trainer, TrainPlan

VOCAB = 64
SEQ = 12


def tiny_llama(seed: int, hidden: int, layers: int) -> LlamaForCausalLM:
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


def blocks(n: int, seed: int) -> TokenBlocks:
    """Masked prompts of different lengths: the ranks' shares hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : (i * 5) % 7] = -100
    return TokenBlocks(ids, torch.ones_like(ids), labels)


def train(world: World, ckpt: Path | None) -> dict[str, Any]:
    plan = TrainPlan(
        optim=OptimConfig(batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1),
        limits=LimitsConfig(max_steps=4),
        eval=EvalConfig(every_steps=100, max_batches=1),
        checkpoint=CheckpointConfig(every_steps=None),
        loss=LossConfig(ce_weight=0.5, hidden=HiddenLossConfig(kind="cosine", weight=1.0)),
        seed=5,
        loss_strategy="logits",
        distributed=DistributedConfig(strategy="ddp"),
    )
    curve: dict[int, dict[str, float]] = {}
    trainer = Trainer(
        tiny_llama(0, 16, 2),
        DataBundle(train=blocks(24, 0), val=blocks(4, 1), report={}),
        plan,
        ctx=RunContext(),
        on_metrics=lambda step, values: curve.setdefault(step, {}).update(values),
        teacher=tiny_llama(1, 24, 2),
        vocab_size=VOCAB,
        ckpt_dir=ckpt,
        world=world,
    )
    module = trainer.extra.module
    assert module is not None
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer.fit()
    return {
        "initial": initial,
        "projection": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_world(backend="gloo", device_type="cpu", timeout_s=120)
    out = train(world, args.out / "ckpt")
    torch.save(out, args.out / f"rank{world.rank}.pt")
    world.barrier()
    close_world(world)


if __name__ == "__main__":
    main()
