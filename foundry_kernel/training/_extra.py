"""A loss strategy's own trainable parameters (``strategy.extra``), as the Trainer holds them.

Why a separate holder: parameters such as the hidden-state loss's projections belong to the
training step, not to the student. They are trained with their own AdamW (the same
hyper-parameters and learning-rate schedule: AdamW is per-parameter, so this is the
optimizer one joint AdamW would be), because the distributed checkpoint maps the student's
optimizer state by the student's parameter names and these have none there. Under data
parallelism they are replicated: every rank starts from the same weights (built from the
seed), their gradients are summed over ranks once per step (the loss is already divided
by the global valid-token count, as the student's are), so every rank takes the same step.
FSDP2 is refused: its gradient clipping works on sharded tensors, and mixing in replicated
ones is not supported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from foundry_kernel._world import World
from foundry_kernel.config import OptimConfig
from foundry_kernel.errors import ConfigError

__all__ = ["ExtraParams", "strategy_extra"]


def strategy_extra(strategy: object) -> nn.Module | None:
    """The strategy's ``extra`` module when it has trainable parameters, else None."""
    extra = getattr(strategy, "extra", None)
    if not isinstance(extra, nn.Module):
        return None
    return extra if any(p.requires_grad for p in extra.parameters()) else None


class ExtraParams:
    """The extra module (or none: every method is then a no-op) and its optimizer."""

    def __init__(
        self, module: nn.Module | None, optim: OptimConfig, world: World, *, fsdp: bool
    ) -> None:
        self.module = module
        self.world = world
        self.params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None
        if not self.params:
            return
        if world.distributed and fsdp:
            raise ConfigError(
                "the loss strategy trains its own parameters (loss.hidden's projections), "
                "which distributed.strategy=fsdp2 does not support; use "
                "distributed.strategy=ddp, equal widths (no projection), or drop loss.hidden",
                field="distributed.strategy",
            )
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
        )

    def __bool__(self) -> bool:
        return self.optimizer is not None

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def sync_grads(self) -> None:
        """Sum the gradients over ranks (one collective of one flat vector)."""
        if self.optimizer is None or not self.world.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.world.all_reduce_sum(flat)
        at = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).clone()
            at += n

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any] | None:
        if self.optimizer is None or self.module is None:
            return None
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.optimizer is None or self.module is None:
            return
        if state is None:
            raise ConfigError(
                "the checkpoint holds no state for the loss strategy's own parameters "
                "(loss.hidden's projections): it was written by a run without them; resume "
                "with the same loss.hidden, or start a new run",
                field="loss.hidden",
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
