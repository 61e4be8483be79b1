"""The ``foundry`` command line, run as a real subprocess (argument lists, never a shell)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for_step

from foundry_kernel.store import RunStore

FOUNDRY = [sys.executable, "-m", "foundry_kernel.cli"]


def _foundry(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOUNDRY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_distill_json_contract_and_store_commands(
    tmp_path: Path, tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    cfg = _write(tmp_path, tiny_config)
    proc = _foundry("distill", "--config", str(cfg), "--set", "loss.temperature=2", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "completed"
    assert summary["duration_s"] > 0
    for part in ("teacher", "student", "baseline"):
        assert summary[part]["params"] > 0 and summary[part]["val_ppl"] > 1
    assert 0 <= summary["agreement"] <= 1 and summary["val_kl"] >= 0
    assert "held-out perplexity" in proc.stderr  # the human summary goes to stderr
    runs_dir = tiny_config["runs_dir"]
    assert f"run store {Path(runs_dir).absolute()}" in proc.stderr  # where it went, said
    listed = json.loads(_foundry("runs", "--runs-dir", runs_dir, "--json").stdout)
    assert [r["run_id"] for r in listed] == [summary["run_id"]]
    assert listed[0]["config"]["loss"]["temperature"] == 2.0
    shown = _foundry("show", summary["run_id"], "--runs-dir", runs_dir, "--json")
    assert json.loads(shown.stdout)["state"] == "completed"
    table = _foundry("runs", "--runs-dir", runs_dir)
    assert summary["run_id"] in table.stdout and "completed" in table.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["distill", "--set", "optim.lr=-1"], "optim.lr"),
        (["distill", "--set", "loss.temprature=2"], "did you mean 'loss.temperature'"),
        (["distill", "--config", "missing.yaml"], "does not exist"),
        (["show", "../../etc/passwd"], "run_id"),
        (["distill", "--resume", "x; rm -rf /"], "run_id"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], fragment: str) -> None:
    proc = _foundry(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_run_exits_1(
    tmp_path: Path, tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    tiny_config["data"] = {"source": str(tmp_path / "nothing-*.txt")}
    proc = _foundry("distill", "--config", str(_write(tmp_path, tiny_config)), "--json")
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "failed"
    assert "matches no files" in proc.stderr


def test_schema_prints_json_schema() -> None:
    proc = _foundry("schema", timeout=60)
    schema = json.loads(proc.stdout)
    assert schema["title"] == "RunConfig"
    assert "loss" in schema["properties"]


def test_kill_9_then_resume_leaves_a_consistent_store(
    tmp_path: Path, tiny_config: dict[str, Any], tiny_teacher_dir: Path
) -> None:
    """A real child process is killed mid-run; --resume finishes with no lost or doubled step."""
    tiny_config["limits"]["max_steps"] = 250
    tiny_config["checkpoint"]["every_steps"] = 10
    tiny_config["eval"].update(every_steps=1000, baseline=False)
    cfg = _write(tmp_path, tiny_config)
    child = subprocess.Popen(
        [*FOUNDRY, "distill", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs_dir = Path(tiny_config["runs_dir"])
    try:
        run_id = wait_for_step(runs_dir, 25, timeout=240)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with RunStore(runs_dir, read_only=True) as store:
        killed_at = max(r.step for r in store.metrics(run_id, ["train/loss"]))
        assert store.get_run(run_id).state == "running"  # nobody could record the crash
    assert killed_at < 250
    proc = _foundry("distill", "--resume", run_id, "--runs-dir", str(runs_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    with RunStore(runs_dir, read_only=True) as store:
        steps = [r.step for r in store.metrics(run_id, ["train/loss"])]
        assert store.get_run(run_id).state == "completed"
    assert steps == list(range(1, 251))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_id"] == run_id
    # stderr is not a TTY: compact progress lines, per phase change and at most one per 10 s
    progress = [line for line in proc.stderr.splitlines() if line.startswith(f"[{run_id}] ")]
    assert "None" not in proc.stderr
    assert 3 <= len(progress) < 40, progress
    assert any(" · " in line and "/250 steps" in line and " < " in line for line in progress)
    assert any("evaluate/student" in line for line in progress), progress
