"""Where and in which precision one run computes: one frozen value, resolved once.

Why one value: the device, the teacher's weight dtype and the autocast dtypes used to be
decided in three places (model loading, the job, the preflight) whose rules had drifted
apart: the preflight counted fp32 activations where the job then chose bf16 autocast on
a bf16-capable CPU, and it ran before autocast was decided at all. Now the rules live
here, :func:`resolve_runtime` applies them once per run, and every phase (loading, the
preflight, training, evaluation) reads the same :class:`Runtime`.

The rules:

* device: ``auto`` is CUDA when one is visible; ``cuda`` without one is an error.
* teacher weights: ``auto`` is bf16 on a bf16-capable GPU, fp32 elsewhere (on a CPU,
  autocast is the faster lever and keeps fp32 weights exact).
* autocast (per model, because it depends on the model's width): ``auto`` picks bf16
  where it pays: CUDA with bf16, or an AVX512-BF16 CPU at widths from 256 up (measured:
  1.6x at hidden 256, nothing at 128). The student's weights and optimizer state are
  always fp32 (master weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foundry_kernel.config import RunConfig
from foundry_kernel.errors import ModelError

__all__ = [
    "Runtime",
    "autocast_dtype",
    "resolve_device",
    "resolve_runtime",
    "weights_dtype",
]

_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Autocast pays on a CPU with native bf16 only from this width up (measured).
CPU_BF16_MIN_HIDDEN = 256


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={name!r} but no CUDA GPU is visible; set device=cpu or auto")
    return torch.device(name)


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a frozen model's weights are loaded in (``teacher.dtype``)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _WEIGHT_DTYPES[name]


def _cpu_has_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def autocast_dtype(precision: str, device: torch.device, hidden_size: int) -> torch.dtype | None:
    """The autocast dtype of a model ``hidden_size`` wide (``optim.precision``); None = fp32."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_bf16() and hidden_size >= CPU_BF16_MIN_HIDDEN else None


def _itemsize(dtype: torch.dtype | None) -> int:
    return 4 if dtype is None else torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Runtime:
    """The device and precisions of one run (see the module docstring for the rules)."""

    device: torch.device
    teacher_dtype: torch.dtype
    student_amp: torch.dtype | None
    teacher_amp: torch.dtype | None

    @property
    def activation_bytes(self) -> int:
        """Bytes per student activation (and logit) under its autocast."""
        return _itemsize(self.student_amp)

    @property
    def teacher_weight_bytes(self) -> int:
        return _itemsize(self.teacher_dtype)

    @property
    def teacher_activation_bytes(self) -> int:
        """Bytes per teacher activation: its autocast dtype, or its weights' dtype."""
        return min(_itemsize(self.teacher_amp), self.teacher_weight_bytes)

    def describe(self) -> dict[str, str]:
        """The run's record of it: ``{"device": "cpu", "teacher_dtype": "float32", ...}``."""

        def name(dtype: torch.dtype | None) -> str:
            return "float32 (no autocast)" if dtype is None else str(dtype).removeprefix("torch.")

        return {
            "device": str(self.device),
            "teacher_dtype": str(self.teacher_dtype).removeprefix("torch."),
            "student_autocast": name(self.student_amp),
            "teacher_autocast": name(self.teacher_amp),
        }


def resolve_runtime(
    config: RunConfig,
    *,
    teacher_hidden: int,
    student_hidden: int,
    device: torch.device | None = None,
) -> Runtime:
    """Apply the rules to one run's config and its two models' widths."""
    where = device if device is not None else resolve_device(config.device)
    precision = config.optim.precision
    return Runtime(
        device=where,
        teacher_dtype=weights_dtype(config.teacher.dtype, where),
        student_amp=autocast_dtype(precision, where, student_hidden),
        teacher_amp=autocast_dtype(precision, where, teacher_hidden),
    )
