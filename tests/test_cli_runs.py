"""``foundry runs`` (labelled columns, the settings that differ, ``--prune``) and ``foundry
show`` (human-readable by default, ``--json`` raw), on runs written straight into a store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from _fake_runs import RESULTS, finished_run

from foundry_kernel.cli import main
from foundry_kernel.config import varying_settings
from foundry_kernel.errors import StoreError
from foundry_kernel.store import RunStore


def _grid(root: Path) -> dict[str, str]:
    """Three runs that differ in loss.temperature (and one failed): a small grid."""
    with RunStore(root) as store:
        ids = {
            "t1": finished_run(store, overrides=["name=t1", "loss.temperature=1"]),
            "t2": finished_run(store, overrides=["name=t2", "loss.temperature=2"]),
            "bad": finished_run(
                store, overrides=["name=bad", "loss.temperature=2"], state="failed", results={}
            ),
        }
        store.add_event(ids["t1"], "warning", "loss spiked", step=3)
    return ids


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_prints_labelled_columns_and_the_differing_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _grid(tmp_path / "runs")
    code, out, _ = _cli(capsys, "runs", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    header, rule, *rows = out.strip().splitlines()
    labels = header.split("  ")
    for label in ("id", "name", "state", "started", "duration", "mode", "loss", "gap closed"):
        assert label in [x.strip() for x in labels if x.strip()], label
    assert "loss.temperature" in header and "student ppl" in header and "CE-only ppl" in header
    assert set(rule) <= {"-", " "}
    assert len(rows) == 3
    t1 = next(r for r in rows if r.startswith(ids["t1"]))
    today = datetime.now().strftime("%Y-%m-%d")
    assert today in t1 and "completed" in t1 and "online" in t1 and "forward_kl" in t1
    assert "20.00" in t1 and "30.00" in t1 and "37%" in t1 and "yes" in t1
    bad = next(r for r in rows if r.startswith(ids["bad"]))
    assert "failed" in bad and "37%" not in bad
    # the columns line up under their labels
    col = header.index("loss.temperature")
    assert t1[col:].startswith("1.0") and next(r for r in rows if ids["t2"] in r)[col:].startswith(
        "2.0"
    )


def test_differing_settings_ignore_names_and_identical_values() -> None:
    a = {"name": "a", "runs_dir": "/x", "loss": {"temperature": 1.0, "kind": "jsd"}, "seed": 0}
    b = {"name": "b", "runs_dir": "/y", "loss": {"temperature": 2.0, "kind": "tvd"}, "seed": 0}
    own_columns = ("distill.mode", "loss.kind")  # foundry runs shows these in their own
    assert varying_settings([a, b], ignore=own_columns) == ["loss.temperature"]
    assert varying_settings([a], ignore=own_columns) == []


def test_runs_json_keeps_the_machine_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _grid(tmp_path / "runs")
    code, out, _ = _cli(capsys, "runs", "--runs-dir", str(tmp_path / "runs"), "--json")
    listed = json.loads(out)
    assert code == 0 and {r["run_id"] for r in listed} == set(ids.values())
    assert all(isinstance(r["created_at"], float) for r in listed)


def test_prune_lists_by_default_and_deletes_with_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    ids = _grid(root)
    code, out, _ = _cli(capsys, "runs", "--runs-dir", str(root), "--prune")
    assert code == 0 and "would delete 1 run(s)" in out and ids["bad"] in out
    assert ids["t1"] not in out and "--yes" in out
    assert (root / ids["bad"]).is_dir()  # a dry run deletes nothing
    code, out, _ = _cli(capsys, "runs", "--runs-dir", str(root), "--prune", "--yes")
    assert code == 0 and "deleted 1 run(s)" in out
    assert not (root / ids["bad"]).exists()
    with RunStore(root, read_only=True) as store:
        assert {r.run_id for r in store.list_runs()} == {ids["t1"], ids["t2"]}
        assert [e.message for e in store.events(ids["t1"])] == ["loss spiked"]


def test_prune_by_state_and_age(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    ids = _grid(root)
    args = ["runs", "--runs-dir", str(root), "--prune", "--state", "completed"]
    code, out, _ = _cli(capsys, *args, "--older-than", "1")
    assert code == 0 and "no completed runs to prune" in out  # all created just now
    code, out, _ = _cli(capsys, *args, "--older-than", "0", "--yes")
    assert code == 0 and "deleted 2 run(s)" in out
    with RunStore(root, read_only=True) as store:
        assert [r.run_id for r in store.list_runs()] == [ids["bad"]]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--state", "running"], "--state 'running': only finished runs"),
        (["--older-than", "-1"], "--older-than"),
    ],
)
def test_prune_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    _grid(tmp_path / "runs")
    code, _, err = _cli(capsys, "runs", "--runs-dir", str(tmp_path / "runs"), "--prune", *args)
    assert code == 2 and fragment in err


def test_delete_runs_refuses_live_runs_and_read_only_stores(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as store:
        live = finished_run(store, state="running")
        done = finished_run(store)
        with pytest.raises(StoreError, match=f"run {live} is running"):
            store.delete_runs([done, live])
        assert {r.run_id for r in store.list_runs()} == {live, done}  # nothing deleted
    with RunStore(root, read_only=True) as ro, pytest.raises(StoreError, match="read-only"):
        ro.delete_runs([done])
    assert (root / done).is_dir()


def test_show_is_readable_and_json_is_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _grid(tmp_path / "runs")
    code, out, _ = _cli(capsys, "show", ids["t2"], "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    assert out.startswith(f"run {ids['t2']} (t2)")
    assert "state     completed" in out
    assert datetime.now().strftime("%Y-%m-%d") in out and "duration" in out
    assert "loss.temperature  2.0" in out.replace("   ", "  ")  # vs its default 1.0
    assert "Distillation helped" in out and "gap closed: 37%" in out
    assert "paths:" in out and str(tmp_path / "runs" / ids["t2"]) in out
    assert len(out.splitlines()) < 60 and "{" not in out.split("config")[0]
    code, out, _ = _cli(capsys, "show", ids["t1"], "--runs-dir", str(tmp_path / "runs"))
    assert "1 warning" in out and "step 3 warning: loss spiked" in out
    code, out, _ = _cli(capsys, "show", ids["t1"], "--runs-dir", str(tmp_path / "runs"), "--json")
    data = json.loads(out)
    assert data["summary"]["gap_closed"] == RESULTS["gap_closed"]
    assert (
        data["events"][0]["message"] == "loss spiked" and data["events"][0]["time"] <= time.time()
    )


def test_runs_and_show_as_subprocesses(tmp_path: Path) -> None:
    """The console entry point, as a user types it (no Traceback, exit 0)."""
    ids = _grid(tmp_path / "runs")
    for args in (["runs"], ["show", ids["t1"]]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "foundry_kernel.cli",
                *args,
                "--runs-dir",
                str(tmp_path / "runs"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert ids["t1"] in done.stdout
