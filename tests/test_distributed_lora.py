"""A LoRA student under data parallelism: 2 real torchrun processes on gloo against 1.

The worker (``tests/dist_workers/lora_worker.py``) trains the data-parallel tests' tiny
Llama student with peft adapters on every linear layer, the fused loss, ``grad_accum=2``:
an uninterrupted run, a run stopped during step 3 (a sharded, adapter-only DCP
checkpoint) and its resumed continuation. The single-process reference runs here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import one_intra_op_thread, torchrun_prefix

from foundry_kernel._world import World

WORKER = Path(__file__).parent / "dist_workers" / "lora_worker.py"
TOL = 1e-5  # fp32 rounding of another summation order


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lora_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The whole module on one intra-op thread, as its ranks run (conftest)."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return worker.train(World(), "ddp")


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    strategy = request.param
    out = tmp_path_factory.mktemp(f"lora-{strategy}")
    args = [
        *torchrun_prefix(),
        str(WORKER),
        "--strategy",
        strategy,
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, check=False)
    if done.returncode != 0:
        ranks_said = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
        pytest.fail("\n".join(ranks_said[-60:]) + "\n" + done.stderr[-3000:])
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return strategy, out, ranks


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ranks_train_the_adapters_one_process_trains(launched, reference) -> None:
    strategy, _out, ranks = launched
    run = ranks[0]["full"]
    assert run["loss_strategy"] == "fused" == reference["loss_strategy"]
    assert sorted(run["curve"]) == sorted(reference["curve"])
    for step, loss in run["curve"].items():
        assert abs(loss - reference["curve"][step]) < TOL, (strategy, step)
    assert _max_diff(run["weights"], reference["weights"]) < TOL
    assert all("lora_" in n for n in run["trainable"])
    assert run["optimizer_numel"] * (2 if strategy == "fsdp2" else 1) >= sum(
        v.numel() for k, v in reference["weights"].items() if "lora_" in k
    )


def test_the_base_stays_frozen_and_the_adapters_in_sync(launched) -> None:
    strategy, _out, ranks = launched
    run = ranks[0]["full"]
    for name, before in run["frozen_before"].items():
        assert torch.equal(run["weights"][name], before), f"frozen {name} moved"
    moved = [k for k in run["weights"] if "lora_B" in k and float(run["weights"][k].abs().max())]
    assert moved
    if strategy == "ddp":  # each rank's own copy of the adapters: identical
        a, b = ranks[0]["full"]["local_adapters"], ranks[1]["full"]["local_adapters"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_adapter_checkpoint_resumes_exactly(launched, reference) -> None:
    import torch.distributed.checkpoint as dcp

    strategy, out, ranks = launched
    stopped, resumed = ranks[0]["stopped"], ranks[0]["resumed"]
    # a stop on one rank stops both after that step (the step's reduced flags)
    assert stopped["ended"] == "cancelled" and stopped["step"] == worker.STOP_AT
    folders = sorted(p for p in (out / "ckpt").glob("step-*") if p.is_dir())
    keys = dcp.FileSystemReader(str(folders[-1])).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:3]
    assert sorted(resumed["curve"]) == list(range(worker.STOP_AT + 1, worker.base.MAX_STEPS + 1))
    for step, loss in resumed["curve"].items():
        assert abs(loss - ranks[0]["full"]["curve"][step]) < TOL, (strategy, step)
    assert _max_diff(resumed["weights"], ranks[0]["full"]["weights"]) < TOL
