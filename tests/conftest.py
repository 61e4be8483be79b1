"""Shared fixtures: tiny but real configs, teachers and stores.

Everything is built locally (no downloads): the tiny teacher is trained by
Foundry's own teacher builder on a few built-in documents and cached for the
session under a temporary FOUNDRY_CACHE_DIR.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread, as each torchrun rank of the distributed tests runs (their
    single-process references are compared with the ranks'), then the count before: a
    bare ``set_num_threads(1)`` in a fixture once left every later test on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    # One cache for the whole session (so the tiny teacher is built once), never the user's.
    if "FOUNDRY_TEST_CACHE" not in os.environ:
        root = Path(config.rootpath) / ".pytest_cache" / "foundry-cache"
        root.mkdir(parents=True, exist_ok=True)
        os.environ["FOUNDRY_TEST_CACHE"] = str(root)
    os.environ["FOUNDRY_CACHE_DIR"] = os.environ["FOUNDRY_TEST_CACHE"]
    # A run without runs_dir must never land in the repository or the user's ./runs.
    os.environ["FOUNDRY_RUNS_DIR"] = str(Path(os.environ["FOUNDRY_TEST_CACHE"]) / "default-runs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_BUILD: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "seq_len": 32,
    "batch_size": 8,
    "steps": 20,
    "lr": 1e-2,
    "max_documents": 40,
}


def tiny_config_dict(runs_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A complete run that trains in a few seconds on 2 cores."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "runs_dir": str(runs_dir),
        "teacher": {"source": "builtin:tiny-teacher", "build": dict(TINY_BUILD)},
        "student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
        "data": {"max_documents": 40, "seq_len": 32},
        "optim": {"batch_size": 4, "warmup_steps": 2, "lr": 1e-2},
        "eval": {
            "every_steps": 3,
            "max_batches": 2,
            "sample_tokens": 4,
            "sample_prompts": ["The list"],
        },
        "limits": {"max_steps": 6},
        "checkpoint": {"every_steps": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def tiny_config(runs_dir: Path) -> dict[str, Any]:
    return tiny_config_dict(runs_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir() -> Path:
    """A real Foundry-built teacher (tiny recipe), cached for the session."""
    from foundry_kernel._context import RunContext
    from foundry_kernel.config import TeacherBuild
    from foundry_kernel.paths import default_cache_dir
    from foundry_kernel.teachers._builtin import ensure_builtin_teacher

    return ensure_builtin_teacher(
        TeacherBuild(**TINY_BUILD),
        cache_dir=default_cache_dir(),
        ctx=RunContext(),
        device=torch.device("cpu"),
        amp_dtype=None,
    )


@pytest.fixture(scope="session")
def vllm_teacher_dir() -> Path:
    """The tiny teacher with one 32-wide head: vLLM's CPU attention has no kernel for
    head_dim 16 ("Unsupported CPU attention configuration")."""
    from foundry_kernel._context import RunContext
    from foundry_kernel.config import TeacherBuild
    from foundry_kernel.paths import default_cache_dir
    from foundry_kernel.teachers._builtin import ensure_builtin_teacher

    return ensure_builtin_teacher(
        TeacherBuild(**{**TINY_BUILD, "num_heads": 1}),
        cache_dir=default_cache_dir(),
        ctx=RunContext(),
        device=torch.device("cpu"),
        amp_dtype=None,
    )


def recorded_steps(runs_dir: Path, run_id: str) -> list[int]:
    """The optimizer steps whose training loss the run recorded, in order."""
    from foundry_kernel.store import RunStore

    with RunStore(runs_dir, read_only=True) as store:
        return [r.step for r in store.metrics(run_id, ["train/loss"])]


def wait_for_step(runs_dir: Path, minimum: int, timeout: float = 240) -> str:
    """Poll a store another process writes until its first run reaches ``minimum`` steps;
    returns that run's id. Bounded by ``timeout``."""
    import time

    from foundry_kernel.errors import StoreError
    from foundry_kernel.store import RunStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # the child may not have created the schema yet: look again
            with RunStore(runs_dir, read_only=True) as store:
                runs = store.list_runs()
        except StoreError:
            runs = []
        if runs and max(recorded_steps(runs_dir, runs[0].run_id), default=0) >= minimum:
            return runs[0].run_id
        time.sleep(0.2)
    raise AssertionError(f"no run reached step {minimum} in {timeout} s")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's interpreter; README's test command installs it, so a missing one fails."""
    from foundry_kernel.errors import TeacherServerError
    from foundry_kernel.teachers._vllm_server import find_vllm_python

    try:
        return find_vllm_python()
    except TeacherServerError as exc:
        pytest.fail(f"vLLM is not installed: {exc}")


def torchrun_prefix(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node N --master-port P`` with a free
    port of the test's own, so that tests launching ranks in parallel never collide."""
    from foundry_kernel.supervisor import free_port

    port = str(free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        port,
    ]
