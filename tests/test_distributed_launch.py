"""Starting a multi-process run: ``foundry distill --nproc-per-node``, ``fk.start(...,
nproc_per_node=)`` and two torchrun agents forming one job over a loopback rendezvous.

Real torchrun, real gloo process groups, the real pipeline on tiny models; every launch has
its own free port and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config_dict

from foundry_kernel.run import _control as control
from foundry_kernel.run._launch import LaunchSpec, torchrun_command
from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import free_port

FOUNDRY = [sys.executable, "-m", "foundry_kernel"]


def dist_config(runs_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The conftest tiny run, one thread per rank (two ranks share this machine's cores)."""
    cfg = tiny_config_dict(runs_dir, **sections)
    cfg["threads"] = 1
    return cfg


def write_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def processes_mentioning(needle: str) -> list[str]:
    """Live processes (zombies included) whose command line or environment carries
    ``needle``: a rank, an agent or a lifeline of the run under test."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                data = (entry / name).read_bytes()
            except OSError:
                continue
            if needle.encode() in data:
                found.append(f"{entry.name}: {data[:200]!r}")
                break
    return found


def zombie_children() -> list[int]:
    """This process's children that exited but were never reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def assert_nothing_left(needle: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while processes_mentioning(needle) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(needle) == []
    assert zombie_children() == []


def store_steps(runs_dir: Path, run_id: str, name: str = "train/loss") -> list[int]:
    with RunStore(runs_dir, read_only=True) as store:
        return [row.step for row in store.metrics(run_id, [name])]


def foundry(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOUNDRY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------- the command


def test_the_launch_command_is_an_argument_list_for_torchrun() -> None:
    spec = LaunchSpec(nproc_per_node=2, master_port=29999)
    cmd = torchrun_command(spec, ["--config", "a b.yaml", "--set", "x=1; rm -rf /"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--master-port") + 1] == "29999"
    assert cmd[cmd.index("--max-restarts") + 1] == "0"
    tail = cmd[cmd.index("foundry_kernel") - 1 :]
    assert tail == [
        "-m",
        "foundry_kernel",
        "distill",
        "--config",
        "a b.yaml",
        "--set",
        "x=1; rm -rf /",
    ]
    multi = LaunchSpec(nproc_per_node=1, nnodes="2", node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    args = multi.torchrun_args()
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--node-rank") + 1] == "1"
    assert "--master-port" not in args


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--nproc-per-node", "0"], "--nproc-per-node"),
        (["--nproc-per-node", "1", "--nnodes", "2"], "--rdzv-endpoint"),
        (["--nproc-per-node", "1", "--nnodes", "two"], "--nnodes"),
        (["--nproc-per-node", "2", "--set", "optim.lr=-1"], "optim.lr"),
    ],
)
def test_bad_launch_input_exits_2_before_any_process(args: list[str], fragment: str) -> None:
    proc = foundry("distill", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert "torch.distributed.run" not in proc.stderr


# --------------------------------------------------------------------------- running


def test_cli_nproc_per_node_2_runs_one_run_and_reports_world_size(
    tmp_path: Path, runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    cfg_path = write_config(tmp_path, dist_config(runs_dir))
    port = str(free_port())
    proc = foundry(
        "distill",
        "--nproc-per-node",
        "2",
        "--master-port",
        port,
        "--config",
        str(cfg_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert result["state"] == "completed"
    assert result["world_size"] == 2 and result["strategy"] == "ddp"
    assert result["student"]["val_ppl"] > 1
    assert proc.stdout.count('"run_id"') == 1
    with RunStore(runs_dir, read_only=True) as store:
        runs = store.list_runs()
    assert [(r.run_id, r.state) for r in runs] == [(result["run_id"], "completed")]
    assert store_steps(runs_dir, result["run_id"]) == list(range(1, 7))
    assert_nothing_left(str(cfg_path))


def test_start_from_the_panel_with_two_processes_returns_at_once_and_streams_metrics(
    runs_dir: Path, tiny_teacher_dir: Path
) -> None:
    from widgets.panel import DistillPanel

    panel = DistillPanel(dist_config(runs_dir), update_interval_s=0.2)
    panel.processes.value = 2  # the panel's world-size field
    t0 = time.monotonic()
    handle = panel.start()
    returned = time.monotonic() - t0
    assert returned < 1.0  # the cell gets its handle before torch is even imported
    seen_running: list[int | None] = []
    deadline = time.monotonic() + 180
    while not handle.done and time.monotonic() < deadline:
        if handle.step is not None:
            seen_running.append(handle.step)
        handle.wait(0.05)
    assert handle.state == "completed", handle.error
    assert seen_running, "no step was relayed while the run was live"
    assert [s for s, _ in handle.history("train/loss")] == list(range(1, 7))
    assert handle.result is not None and handle.result["student"]["val_ppl"] > 1
    with RunStore(runs_dir, read_only=True) as store:
        assert store.get_run(handle.id).state == "completed"
    outcomes = [
        json.loads((runs_dir / handle.id / "dist" / f"rank-{r}.json").read_text()) for r in (0, 1)
    ]
    assert [(o["rank"], o["world_size"], o["state"]) for o in outcomes] == [
        (0, 2, "completed"),
        (1, 2, "completed"),
    ]
    assert_nothing_left(handle.id)
    assert panel.wait(30)
    panel.close()
    # The lock went with the handle: a resume is refused because the run is completed,
    # not because someone still owns it.
    with pytest.raises(control.RunConflictError, match="is completed"):
        control.start(resume=handle.id, overrides={"runs_dir": str(runs_dir)}, nproc_per_node=2)


def _loss_curve(runs_dir: Path, run_id: str) -> list[float]:
    with RunStore(runs_dir, read_only=True) as store:
        return [row.value for row in store.metrics(run_id, ["train/loss"])]


def _val_metrics(runs_dir: Path, run_id: str) -> dict[str, float]:
    with RunStore(runs_dir, read_only=True) as store:
        summary = store.get_run(run_id).summary
    return {k: summary["student"][k] for k in ("val_loss", "agreement", "val_kl")}


def _exported(runs: Path, run_id: str) -> dict[str, Any]:
    """The exported student's weights, read from its safetensors files."""
    from safetensors.torch import load_file

    with RunStore(runs, read_only=True) as store:
        export = Path(store.get_run(run_id).summary["export_dir"])
    files = sorted(export.glob("*.safetensors"))
    assert files, f"no safetensors in {export}"
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(file))
    return state


def test_two_agents_on_loopback_form_one_job_equal_to_one_node_with_two_ranks(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    runs_two, runs_one = tmp_path / "two-nodes", tmp_path / "one-node"
    (tmp_path / "agents").mkdir()
    two_cfg = write_config(tmp_path / "agents", dist_config(runs_two))
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [
                *FOUNDRY,
                "distill",
                "--nproc-per-node",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "sim",
                "--rdzv-conf",
                "join_timeout=120",
                "--config",
                str(two_cfg),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [agent.communicate(timeout=240) for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in outs]
    printed = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs if out.strip()]
    assert len(printed) == 1 and printed[0]["world_size"] == 2  # one job, one rank 0
    run_two = printed[0]["run_id"]
    one_cfg = write_config(tmp_path, dist_config(runs_one))
    proc = foundry(
        "distill",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "--config",
        str(one_cfg),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_one = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    # The loss of every step, the held-out metrics and the exported weights (rank 0's one
    # save_pretrained folder) are the same job's.
    assert _loss_curve(runs_two, run_two) == pytest.approx(_loss_curve(runs_one, run_one), abs=1e-6)
    assert len(_loss_curve(runs_one, run_one)) == 6
    assert _val_metrics(runs_two, run_two) == pytest.approx(
        _val_metrics(runs_one, run_one), abs=1e-6
    )
    two, one = _exported(runs_two, run_two), _exported(runs_one, run_one)
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-6
    assert_nothing_left(str(two_cfg))
