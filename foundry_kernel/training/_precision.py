"""Mixed precision in one place, so every model call agrees on when autocast applies."""

from __future__ import annotations

import contextlib

import torch


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """Mixed precision when asked for, a no-op otherwise."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
