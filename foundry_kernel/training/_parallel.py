"""Data-parallel wrapping of the student and the frozen teacher: DDP or FSDP2, nothing else.

The one rule this module exists for (TRL #5282): every use of the student's parameters in a
training micro-step happens *inside the forward of the wrapped module*. A fused loss reads
``lm_head.weight`` outside the HF model's forward; run outside the wrapper, DDP would never
prepare its gradient all-reduce and FSDP2 would see a sharded weight. So the student is
held by a :class:`StepModule` whose ``forward(fn, *args)`` calls ``fn(hf_model, *args)``:
the Trainer passes the whole loss computation (or a generation, or an evaluation forward)
as ``fn``, and DDP/FSDP2 wrap the step module.

Gradients are *summed* over ranks, not averaged: the loss of each rank is already divided
by the valid-token count of the whole optimizer step over all ranks, so the sum of the
ranks' gradients is the single-process gradient. DDP gets a sum comm hook; FSDP2 gets a
gradient divide factor of 1.

A single process (``World()``) gets its model back unwrapped: the single-process path is
today's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from foundry_kernel._world import World
from foundry_kernel.config import DistributedConfig

__all__ = [
    "StepModule",
    "fsdp_mixed_precision",
    "full_state_dict",
    "is_fsdp",
    "shard_teacher",
    "through",
    "unwrap",
    "wrap_student",
]


class StepModule(nn.Module):
    """Holds the HF model as ``inner``; its forward runs a callable with it.

    The callable is a micro-step's whole loss (forward, head projection, teacher signal),
    a generation loop or an evaluation forward: whatever it does to ``inner``'s parameters
    happens while the wrapper's forward is running, so DDP's reducer and FSDP2's
    all-gathers/reduce-scatters see it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.inner, *args, **kwargs)


class _Through(nn.Module):
    """A model-shaped view of a wrapped student: calling it calls the HF model through the
    wrapper's forward (for evaluation and sampling, which call ``model(...)``). Attribute
    reads it does not have (``config``, ``generation_config``) come from the HF model."""

    def __init__(self, wrapped: nn.Module, inner: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        object.__setattr__(self, "_inner_ref", inner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(_call_model, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner_ref"), name)


def _call_model(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def through(wrapped: nn.Module) -> nn.Module:
    """What evaluation and generation call: the HF model itself for a single process, else
    a view whose calls go through the wrapper's forward."""
    inner = unwrap(wrapped)
    return inner if wrapped is inner else _Through(wrapped, inner)


def unwrap(module: nn.Module) -> nn.Module:
    """The HF model inside a DDP/FSDP2/step wrapper (itself if it is not wrapped)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(module, _Through):
            module = module.wrapped
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, StepModule):
            module = module.inner
        else:
            return module
    return module


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` (a wrapper or the step module) was sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_mixed_precision(cfg: DistributedConfig, amp_dtype: torch.dtype | None) -> bool:
    """Whether FSDP2 gathers parameters in bf16 (``distributed.mixed_precision``; ``auto``
    follows the plan's autocast dtype)."""
    if cfg.mixed_precision == "off":
        return False
    if cfg.mixed_precision == "bfloat16":
        return True
    return amp_dtype == torch.bfloat16


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, one FSDP2 unit each: the classes transformers names in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ...), else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    longest: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(longest):
            longest = list(m)
    return longest


def _sum_allreduce_hook(process_group: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM without the default hook's division by world size."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def _mesh(world: World, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.world_size,))


def wrap_student(
    model: nn.Module, world: World, cfg: DistributedConfig, amp_dtype: torch.dtype | None
) -> nn.Module:
    """The student as this world trains it: unchanged for one process; a DDP or FSDP2
    (per decoder layer, then the step module as root) wrapper around a :class:`StepModule`.

    Call it before the optimizer is made (FSDP2 replaces the parameters with shards).
    """
    if not world.distributed:
        return model
    device = _device_of(model)
    step = StepModule(model)
    if cfg.strategy == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # rotary caches are identical by construction
        )
        import torch.distributed as dist

        # DDP checks the hook's annotations as objects; this module's are strings.
        _sum_allreduce_hook.__annotations__.update(
            bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
        )
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if fsdp_mixed_precision(cfg, amp_dtype)
        else MixedPrecisionPolicy()
    )
    mesh = _mesh(world, device)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(step, mesh=mesh, mp_policy=mp)
    # Sum, not mean: each rank's loss is globally normalised. Plain SUM collectives (a
    # factor alone would use PREMUL_SUM, which gloo lacks); a factor of 1 divides nothing.
    # Both setters act on one unit only: every unit gets them.
    for unit in step.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return step


def shard_teacher(model: nn.Module, world: World, cfg: object = None) -> nn.Module:
    """The frozen teacher sharded with FSDP2 across ranks (``teacher.placement=shard``): no
    gradients, eval mode, never given to an optimizer. Call it under ``no_grad``: each
    forward all-gathers one layer at a time. The root keeps its parameters (embeddings,
    head) gathered after the forward, so a fused loss may project with the head weight.

    A single process gets the model back frozen, not sharded. ``cfg`` (the run's config
    or its ``distributed`` section) is accepted and unused: a frozen teacher needs no
    mixed-precision policy for gradients it never has.
    """
    model.requires_grad_(False)
    model.eval()
    if not world.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    del cfg
    mesh = _mesh(world, _device_of(model))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The student's full, unsharded CPU state dict (the HF model's own keys) on rank 0,
    None on the others; for one ``save_pretrained`` folder whatever the strategy. A
    collective under FSDP2: every rank must call it. ``model`` is the HF model the
    Trainer was given (``trainer.model``), its wrapper (``trainer.wrapped``) or the view
    :func:`through` made of it."""
    if isinstance(model, _Through):
        model = model.wrapped
    inner = unwrap(model)
    if not world.distributed:
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    root = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(root, options=options)
    if not world.is_main:
        return None
    prefix = "inner." if isinstance(root, StepModule) else ""
    return {k.removeprefix(prefix): v for k, v in state.items() if isinstance(v, torch.Tensor)}
