"""LoRA students through ``peft``: a frozen base, trainable low-rank adapters.

Why ``peft`` and why this shape: ``peft.get_peft_model`` injects its ``lora.Linear`` layers
into the transformers model *in place*, so the model the Trainer trains stays the
transformers model itself (``peft_model.base_model.model``): its forward is transformers'
own, the fused-linear loss still sees a plain ``lm_head`` (unless the user targets it, and
then the strategy falls back by itself), and DDP/FSDP2 wrap it like any other student. The
``PeftModel`` around it is kept here (:func:`handle`) for what only peft knows: the adapter
folder a user loads with ``PeftModel.from_pretrained``, and ``merge_and_unload`` for the
merged export.

Only adapters train: peft freezes every other weight, the Trainer's optimizer takes only
parameters that require gradients, and its checkpoints hold only those (the frozen base of
a 7B student is gigabytes per checkpoint; a resume rebuilds it from its source, which is
deterministic, and loads the adapters and the optimizer over it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from foundry_kernel._models import seeded_init
from foundry_kernel.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

    from foundry_kernel.config import LoraConfig

__all__ = [
    "ParamCounts",
    "apply_lora",
    "handle",
    "is_lora",
    "linear_module_names",
    "lora_copy",
    "param_counts",
    "peft_config",
    "save_adapter",
    "save_base",
    "save_merged",
    "target_modules",
]

ADAPTER = "default"  # peft's adapter name; one adapter per student
_HANDLES: weakref.WeakKeyDictionary[nn.Module, PeftModel] = weakref.WeakKeyDictionary()
"""transformers model (with adapters injected) -> the PeftModel that holds it."""


@dataclass(frozen=True)
class ParamCounts:
    """A student's parameters: all of them (tied ones once) and those that train."""

    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def param_counts(model: nn.Module) -> ParamCounts:
    """Unique parameters, and the trainable share (``requires_grad``): the preflight counts
    gradients and AdamW moments for the trainable ones only."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamCounts(total=total, trainable=trainable)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``lm_head``...):
    what a ``student.lora.target_modules`` list can name."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
    return sorted(names)


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 family uses Conv1D (a linear layer with transposed weights)
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _targets(model: nn.Module, cfg: LoraConfig) -> list[str] | str:
    """``target_modules`` as peft takes it, checked against the model first so a mistake
    names the config field and what the model has, not peft's internals."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    wanted = cfg.target_modules
    if wanted == "all-linear":
        return "all-linear"
    if wanted == "auto":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(str(model_type))
        if default is None:
            raise ConfigError(
                f"student.lora.target_modules='auto': peft has no default target modules "
                f"for model type {model_type!r}; set student.lora.target_modules to "
                f"'all-linear' or to a list of this model's linear layers: "
                f"{linear_module_names(model)}",
                field="student.lora.target_modules",
            )
        return default if isinstance(default, str) else list(default)
    names = [name for name, m in model.named_modules() if _is_linear(m)]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"student.lora.target_modules: {missing} name no linear layer of this "
            f"{type(model).__name__}; its linear layers are {linear_module_names(model)}",
            field="student.lora.target_modules",
        )
    return list(wanted)


def peft_config(model: nn.Module, cfg: LoraConfig) -> Any:
    """``peft.LoraConfig`` for ``model`` from the run's ``student.lora`` section."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # annotated int, used as a float
        lora_dropout=cfg.dropout,
        target_modules=_targets(model, cfg),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int) -> nn.Module:
    """Inject adapters into ``model`` (in place) and freeze everything else; returns the
    transformers model to train (the same object). The adapters' initialisation draws from
    torch's global generator, so it runs seeded (``seeded_init``): a resume rebuilds the
    very same adapters before loading the checkpoint's over them, and concurrent runs do
    not disturb each other's draws."""
    from peft import get_peft_model

    config = peft_config(model, cfg)
    wrapped = seeded_init(lambda: get_peft_model(model, config), seed)
    inner: nn.Module = wrapped.base_model.model
    _HANDLES[inner] = wrapped
    return inner


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries adapters injected by :func:`apply_lora`."""
    return model in _HANDLES


def target_modules(model: nn.Module) -> list[str]:
    """The module names peft put adapters on (as resolved from 'auto'/'all-linear')."""
    targets = getattr(handle(model).peft_config[ADAPTER], "target_modules", None) or ()
    return [targets] if isinstance(targets, str) else sorted(targets)


def handle(model: nn.Module) -> PeftModel:
    """The PeftModel holding ``model`` (for saving and merging)."""
    try:
        return _HANDLES[model]
    except KeyError:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters") from None


def lora_copy(
    model_config: Any, cfg: LoraConfig, state: dict[str, torch.Tensor], *, seed: int
) -> nn.Module:
    """A plain (unwrapped, unsharded) LoRA student from a full state dict with the adapters'
    keys, for the export of a data-parallel run (rank 0 gathers the full state)."""
    from transformers import AutoModelForCausalLM

    from foundry_kernel._models import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK:
        plain = AutoModelForCausalLM.from_config(model_config)
    inner = apply_lora(plain, cfg, seed=seed)
    inner.load_state_dict(state)
    return inner


def save_adapter(model: nn.Module, folder: Path, *, base: str) -> None:
    """The peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base_model, folder)`` loads; ``base`` is recorded as
    the adapter's ``base_model_name_or_path`` (what ``AutoPeftModelForCausalLM`` loads)."""
    peft = handle(model)
    peft.peft_config[ADAPTER].base_model_name_or_path = base
    peft.save_pretrained(str(folder))


def save_base(model: nn.Module, folder: Path) -> None:
    """The frozen base alone, as an ordinary model folder: the adapters are removed
    (``unload``, no merge) *in place*, so call it last (the export is the student's last
    use; a copy would double a large student's memory)."""
    base = _HANDLES.pop(model).unload()
    base.save_pretrained(str(folder))


def save_merged(model: nn.Module, folder: Path) -> None:
    """An ordinary model folder with the adapters folded into the weights: it reloads with
    ``AutoModelForCausalLM`` and needs no peft. ``merge_and_unload`` works *in place* (see
    :func:`save_base`): after it ``model`` is the merged plain model."""
    merged = _HANDLES.pop(model).merge_and_unload()
    merged.save_pretrained(str(folder))
