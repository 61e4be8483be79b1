"""The run's Runtime: one set of device/precision rules, applied once, read by every phase
(the preflight used to count fp32 activations where training then ran under bf16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from foundry_kernel import run_sync
from foundry_kernel._runtime import (
    CPU_BF16_MIN_HIDDEN,
    Runtime,
    autocast_dtype,
    resolve_device,
    resolve_runtime,
    weights_dtype,
)
from foundry_kernel.config import load_config
from foundry_kernel.errors import ModelError

CPU = torch.device("cpu")


def test_rules_on_cpu() -> None:
    assert weights_dtype("auto", CPU) == torch.float32
    assert weights_dtype("bfloat16", CPU) == torch.bfloat16
    assert autocast_dtype("float32", CPU, 4096) is None
    assert autocast_dtype("bfloat16", CPU, 16) == torch.bfloat16
    assert autocast_dtype("auto", CPU, CPU_BF16_MIN_HIDDEN - 1) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ModelError, match="device=cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


def test_runtime_is_frozen_and_sizes_follow_its_dtypes() -> None:
    config = load_config(None, {"device": "cpu", "optim.precision": "bfloat16"})
    rt = resolve_runtime(config, teacher_hidden=128, student_hidden=64)
    assert rt == Runtime(CPU, torch.float32, torch.bfloat16, torch.bfloat16)
    assert (rt.activation_bytes, rt.teacher_weight_bytes, rt.teacher_activation_bytes) == (
        2,
        4,
        2,
    )
    with pytest.raises(AttributeError):
        rt.student_amp = None  # type: ignore[misc]
    assert rt.describe()["student_autocast"] == "bfloat16"


def test_the_preflight_counts_what_training_runs_with(
    tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    """bf16 autocast on a CPU: the run records it, and the preflight's logits estimate is
    in 2-byte elements, the same Runtime the Trainer used."""
    cfg = {**tiny_config, "optim": {**tiny_config["optim"], "precision": "bfloat16"}}
    cfg["limits"] = {**cfg.get("limits", {}), "max_steps": 2}
    cfg["eval"] = {**cfg["eval"], "baseline": False}
    cfg["loss"] = {**cfg.get("loss", {}), "strategy": "logits"}  # logits exist: count them
    handle = run_sync(cfg)
    assert handle.state.value == "completed", handle.error
    summary = handle.result
    assert summary is not None
    assert summary["runtime"] == {
        "device": "cpu",
        "teacher_dtype": "float32",
        "student_autocast": "bfloat16",
        "teacher_autocast": "bfloat16",
    }
    tokens = cfg["optim"]["batch_size"] * cfg["data"]["seq_len"]
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    assert summary["preflight"]["parts"]["student_logits"] == 2 * tokens * vocab * 2
    assert summary["preflight"]["parts"]["teacher_logits"] == tokens * vocab * 2
