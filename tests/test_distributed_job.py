"""The run job's phases under data parallelism: real 2-process gloo groups via torchrun.

Each test starts ``python -m torch.distributed.run`` (torchrun) on its own free port with
``tests/dist_workers/job_worker.py``, which runs ``run_job`` on every rank against a real
SQLite store (read-only on ranks other than 0). Until the trainer's data-parallel branch
lands, each rank trains with the single-process trainer (the same full batch); the
assertions below hold both before and after, and the one that only holds after is
chosen by whether ``Trainer`` takes ``world=``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict, torchrun_prefix

from foundry_kernel._context import RunContext
from foundry_kernel._world import World
from foundry_kernel.config import RunConfig
from foundry_kernel.data._blocks import BatchSampler
from foundry_kernel.errors import ConfigError
from foundry_kernel.run._job import Job, _check_server_wait, run_job
from foundry_kernel.store import DB_FILENAME, RunStore
from foundry_kernel.supervisor import free_port

WORKER = Path(__file__).parent / "dist_workers" / "job_worker.py"
TIMEOUT_S = 240


def _torchrun(
    args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(WORKER),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        argv, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done


def _run(tmp_path: Path, cfg: dict[str, Any], env: dict[str, str] | None = None) -> list[Any]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    _torchrun(["job", str(config), str(out)], env=env)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def _store_rows(runs_dir: Path, run_id: str, name: str) -> list[tuple[int, float]]:
    with sqlite3.connect(runs_dir / DB_FILENAME) as db:
        return db.execute(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
            (run_id, name),
        ).fetchall()


def test_two_ranks_one_store_writer_and_one_ordinary_export(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = tiny_config_dict(
        runs,
        limits={"max_steps": 4},
        checkpoint={"every_steps": None},
        eval={"every_steps": 4, "baseline": True},
    )
    ranks = _run(tmp_path, cfg)
    run_id = ranks[0]["run_id"]
    # Rank 1's store was read-only: had it written anything the run would have failed.
    assert [row[0] for row in _store_rows(runs, run_id, "train/loss")] == [1, 2, 3, 4]
    assert [row[0] for row in _store_rows(runs, run_id, "baseline/train/loss")] == [1, 2, 3, 4]
    with RunStore(runs, read_only=True) as store:
        record = store.get_run(run_id)
    stored = record.summary
    assert stored["distributed"] == {
        "world_size": 2,
        "strategy": "ddp",
        "teacher_placement": "replicate",
        "backend": "gloo",
        "nodes": 1,
    }
    assert stored["samples"] and ranks[1]["summary"]["samples"] == []  # rank 0's summary
    assert stored["student"]["tokens_per_s"] > 0 and stored["baseline"]["val_ppl"] > 0

    from transformers import AutoModelForCausalLM

    export = Path(stored["export_dir"])
    loaded = AutoModelForCausalLM.from_pretrained(export).state_dict()
    trained = _sharded_checkpoint(runs / run_id / "checkpoints" / "distill", tmp_path)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, trained["model"][name]), name


def _sharded_checkpoint(directory: Path, scratch: Path) -> dict[str, Any]:
    """The newest torch.distributed.checkpoint folder read back as one full state dict
    (DCP's own converter), for comparing with the export."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    manifest = json.loads((directory / "latest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "dcp" and manifest["world_size"] == 2
    out = scratch / "full.pt"
    dcp_to_torch_save(directory / manifest["dir"], out)
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict)
    return state


def test_cache_placement_each_rank_reads_only_its_own_batches_shards(tmp_path: Path) -> None:
    """A fresh, shared FOUNDRY_CACHE_DIR: rank 0 builds the built-in teacher while rank 1
    waits for it, the capture is split across the ranks, and training reads lazily."""
    runs = tmp_path / "runs"
    cfg = tiny_config_dict(
        runs,
        limits={"max_steps": 3},
        checkpoint={"every_steps": None},
        eval={"every_steps": 3, "baseline": False},
        loss={"top_k": 8},
        distill={"mode": "offline", "cache_shard_blocks": 2},
    )
    ranks = _run(tmp_path, cfg, env={"FOUNDRY_CACHE_DIR": str(tmp_path / "cache")})
    with RunStore(runs, read_only=True) as store:
        stored = store.get_run(ranks[0]["run_id"]).summary
    assert stored["distributed"]["teacher_placement"] == "cache"
    reads = stored["logit_cache"]["reads"]
    assert [r["rank"] for r in reads] == [0, 1]
    for rank in reads:
        needed = sorted({b // 2 for b in rank["blocks"]})
        assert rank["blocks"] and rank["shards_read"] == needed  # nothing else was read
    teachers = list((tmp_path / "cache" / "teachers").iterdir())
    assert len([t for t in teachers if t.is_dir()]) == 1  # built once, no leftovers
    n_blocks = stored["data"]["blocks"]["train"]
    sampler = BatchSampler(n_blocks, 4, seed=0)
    batches = [sampler.next_indices().tolist() for _ in range(3)]
    for rank in reads:  # each rank takes its contiguous half of every batch
        start, stop = World(rank=rank["rank"], world_size=2).shard(4)
        assert rank["blocks"] == sorted({b for batch in batches for b in batch[start:stop]})


def test_each_node_gets_its_own_servers_url_and_key(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes 2 on 127.0.0.1) of 2 processes each: each node's
    local rank 0 starts a keyed HTTP server (a stand-in for vLLM), every rank reaches
    its own node's server with the key, and the key is never in any output."""
    port = str(free_port())
    out = tmp_path / "out"
    out.mkdir()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                str(WORKER),
                "endpoint",
                str(out),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    for agent in agents:
        try:
            logs.append(agent.communicate(timeout=TIMEOUT_S)[0])
        finally:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)[-6000:]
    seen = [json.loads((out / f"endpoint-{r}.json").read_text()) for r in range(4)]
    by_node: dict[int, set[str]] = {}
    for entry in seen:
        by_node.setdefault(entry["node"], set()).add(entry["url"])
        assert (entry["with_key"], entry["without_key"]) == (200, 401)
    assert sorted(by_node) == [0, 1]
    assert all(len(urls) == 1 for urls in by_node.values())  # one server per node
    assert by_node[0] != by_node[1]  # and not the other node's


def test_shard_placement_on_one_process_is_recorded_as_a_no_op(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = RunConfig.model_validate(
        tiny_config_dict(
            runs,
            teacher={"placement": "shard"},
            limits={"max_steps": 2},
            eval={"every_steps": 2, "baseline": False},
        )
    )
    with RunStore(runs) as store:
        run_id = store.create_run(cfg.model_dump(mode="json")).run_id
        summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id))
        stored = store.get_run(run_id).summary
    assert summary["teacher_sharded"] is False
    assert stored["distributed"] == {
        "world_size": 1,
        "strategy": "single",
        "teacher_placement": "shard",
        "backend": None,
        "nodes": 1,
    }


def test_a_node_server_must_start_within_the_collective_timeout(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(
        tiny_config_dict(
            tmp_path / "runs",
            teacher={"backend": "vllm", "server": {"start_timeout_s": 900}},
            loss={"top_k": 8},
            distributed={"timeout_s": 600},
        )
    )
    with RunStore(tmp_path / "runs") as store:
        run_id = store.create_run(cfg.model_dump(mode="json")).run_id
        one = Job(cfg, store, run_id, RunContext(run_id))
        _check_server_wait(one)  # one process waits on nobody
        two = Job(cfg, store, run_id, RunContext(run_id), World(rank=1, world_size=2))
        with pytest.raises(ConfigError) as err:
            _check_server_wait(two)
    assert err.value.field == "distributed.timeout_s"


def test_ranks_with_different_data_fail_clearly(tmp_path: Path) -> None:
    """Rank 1 reads another data set (its config says fewer documents): both ranks stop
    at the data phase naming rank 1, before any training."""
    runs = tmp_path / "runs"
    cfg = tiny_config_dict(runs, limits={"max_steps": 2})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**cfg, "data": {**cfg["data"], "max_documents": 30}}))
    out = tmp_path / "out"
    out.mkdir()
    argv = [
        *torchrun_prefix(),
        str(WORKER),
        "job",
        str(config),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOUNDRY_TEST_RANK1_CONFIG": str(other)}
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode != 0
    assert "data: rank(s) [1] built other train/val blocks than rank 0" in done.stderr + done.stdout
