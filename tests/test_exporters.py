"""Opt-in exporters (``tracking.report_to``): real trackers, offline, read back.

One tiny real distillation run reports to TensorBoard, MLflow (a local ``sqlite:///``
store), W&B (offline) and Trackio (local) at once; each tracker's own files are then read
back with the tracker's own reader and compared with what Foundry's store recorded. A
tracker that is not installed is refused when the run starts; one that fails is a warning
on a run that still completes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import tiny_config_dict

import foundry_kernel as fk
from foundry_kernel._context import RunContext
from foundry_kernel.config import RunConfig, load_config
from foundry_kernel.errors import ConfigError
from foundry_kernel.exporters import check_installed, export_name
from foundry_kernel.run import _control as control
from foundry_kernel.store import RunStore

# --------------------------------------------------------------------------- config


def test_report_to_is_off_by_default_and_checked() -> None:
    assert load_config().tracking.report_to == []
    assert load_config(overrides=["tracking.report_to=tensorboard"]).tracking.report_to == [
        "tensorboard"
    ]
    both = load_config(overrides=["tracking.report_to=[mlflow, wandb]"]).tracking
    assert both.report_to == ["mlflow", "wandb"]
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["tracking.report_to=[tensorbord]"])
    assert info.value.field == "tracking.report_to"
    assert "did you mean 'tensorboard'?" in str(info.value)
    with pytest.raises(ConfigError, match="more than once"):
        load_config(overrides=["tracking.report_to=[wandb, wandb]"])
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["tracking.reportto=[wandb]"])
    assert "did you mean 'tracking.report_to'?" in str(info.value)


def test_tracking_locations_are_local_and_confined(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"tracking.mlflow_uri": "ftp://example"})
    assert info.value.field == "tracking.mlflow_uri" and "sqlite:///PATH" in str(info.value)
    for outside in ("sqlite:////etc/mlflow.db", "file:///etc/mlruns"):
        with pytest.raises(ConfigError, match="outside the allowed folders"):
            load_config(overrides={"tracking.mlflow_uri": outside})
    with pytest.raises(ConfigError, match="outside the allowed folders") as info:
        load_config(overrides={"tracking.dir": "/etc/tracking"})
    assert info.value.field == "tracking.dir"
    inside = f"sqlite:///{tmp_path / 'm.db'}"
    assert load_config(overrides={"tracking.mlflow_uri": inside}).tracking.mlflow_uri == inside


def test_metric_names_are_train_and_eval() -> None:
    assert export_name("train/loss") == "train/loss"
    assert export_name("val/ppl") == "eval/ppl"
    assert export_name("tokens_per_s") == "train/tokens_per_s"
    assert export_name("baseline/val/kl") == "baseline/eval/kl"
    assert export_name("baseline/train/ce") == "baseline/train/ce"
    assert export_name("teacher_build/train/loss") == "teacher_build/train/loss"
    assert export_name("teacher_build/tokens_per_s") == "teacher_build/train/tokens_per_s"
    assert export_name("teacher_reference/val/loss") == "teacher_reference/eval/loss"
    assert export_name("rank/1/tokens_per_s") == "train/rank/1/tokens_per_s"


@pytest.mark.parametrize(("tracker", "module"), [("trackio", "trackio"), ("mlflow", "alembic")])
def test_a_tracker_not_installed_is_refused_at_start_with_the_install_command(
    runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tracker: str,
    module: str,
) -> None:
    """All four trackers are in the dev extra; a user without one gets this, before
    anything is created. ``sys.modules[name] = None`` is Python's own way to make an
    import fail, so the check meets a missing package as a user's machine shows it."""
    check_installed(["tensorboard", "mlflow", "wandb", "trackio"])  # the dev extra has all
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError) as info:
        check_installed([tracker])
    message = str(info.value)
    assert info.value.field == "tracking.report_to"
    assert f"includes {tracker!r} but {module} is not installed" in message
    assert f"pip install 'foundry[{tracker}]'" in message
    cfg = tiny_config_dict(runs_dir, tracking={"report_to": ["tensorboard", tracker]})
    with pytest.raises(ConfigError, match=rf"foundry\[{tracker}\]"):
        fk.start(cfg)
    assert not runs_dir.exists()  # refused before the store was touched
    from foundry_kernel.cli import main as cli_main

    args = ["distill", "--runs-dir", str(runs_dir), "--set", f"tracking.report_to=[{tracker}]"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"pip install 'foundry[{tracker}]'" in err and "Traceback" not in err
    assert not runs_dir.exists()


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tiny distillation run reporting to all four trackers, offline. W&B keeps its
    service process (``wandb-core``) for the life of the process that used it, as it
    does in a kernel; the module shuts it down, so no later test finds a stray child."""
    runs_dir = tmp_path_factory.mktemp("exported") / "runs"
    uri = f"sqlite:///{runs_dir.parent / 'mlflow.db'}"
    cfg = tiny_config_dict(
        runs_dir,
        tracking={"report_to": ["tensorboard", "mlflow", "wandb", "trackio"], "mlflow_uri": uri},
    )
    handle = fk.run_sync(cfg)
    assert handle.state == fk.RunState.COMPLETED, handle.error
    with RunStore(runs_dir, read_only=True) as store:
        rows = store.metrics(handle.id)
        events = store.events(handle.id)
    history: dict[str, dict[int, float]] = {}
    for row in rows:
        history.setdefault(row.name, {})[row.step] = row.value
    assert not [e for e in events if e.kind == "alert" and "exporter" in e.message]
    yield {
        "run_id": handle.id,
        "runs_dir": runs_dir,
        "uri": uri,
        "history": history,
        "summary": handle.result or {},
        "config": handle.config,
    }
    import wandb

    wandb.teardown()
    left = [c for c in psutil.Process().children(recursive=True) if "wandb" in c.name()]
    assert not left, left


def _same(a: dict[int, float], b: dict[int, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a)


def test_tensorboard_event_files_hold_the_run(reported: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logdir = reported["runs_dir"] / "tracking" / "tensorboard" / reported["run_id"]
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    history = reported["history"]
    for ours, theirs in (
        ("train/loss", "train/loss"),
        ("val/ppl", "eval/ppl"),
        ("val/agreement", "eval/agreement"),
        ("baseline/train/loss", "baseline/train/loss"),
        ("baseline/val/ppl", "baseline/eval/ppl"),
        ("tokens_per_s", "train/tokens_per_s"),
    ):
        assert theirs in scalars, sorted(scalars)
        points = {e.step: e.value for e in acc.Scalars(theirs)}
        assert _same(points, history[ours]), (theirs, points, history[ours])
    assert sorted(history["train/loss"]) == [1, 2, 3, 4, 5, 6]
    student_ppl = reported["summary"]["student"]["val_ppl"]
    (final,) = acc.Scalars("summary/student.val_ppl")
    assert math.isclose(final.value, student_ppl, rel_tol=1e-5) and final.step == 6
    # the config as the HParams plugin's session, and as text
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["loss.kind"].string_value == "forward_kl"
    assert hparams["limits.max_steps"].number_value == 6
    assert json.loads(hparams["eval.sample_prompts"].string_value) == ["The list"]
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert reported["run_id"] in text and '"loss.kind": "forward_kl"' in text


def test_mlflow_sqlite_store_holds_the_run(reported: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=reported["uri"])
    experiment = client.get_experiment_by_name("foundry")
    assert experiment is not None
    (run,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`foundry.run_id` = '{reported['run_id']}'",
    )
    assert run.info.status == "FINISHED" and run.info.run_name == reported["run_id"]
    params = run.data.params
    assert params["loss.kind"] == "forward_kl" and params["limits.max_steps"] == "6"
    assert params["teacher.source"] == "builtin:tiny-teacher"
    history = reported["history"]
    for ours, theirs in (
        ("train/loss", "train/loss"),
        ("val/ppl", "eval/ppl"),
        ("baseline/val/ppl", "baseline/eval/ppl"),
    ):
        points = {m.step: m.value for m in client.get_metric_history(run.info.run_id, theirs)}
        assert _same(points, history[ours]), (theirs, points)
    summary = reported["summary"]
    assert math.isclose(
        run.data.metrics["summary/student.val_ppl"], summary["student"]["val_ppl"], rel_tol=1e-9
    )
    assert math.isclose(
        run.data.metrics["summary/teacher.val_ppl"], summary["teacher"]["val_ppl"], rel_tol=1e-9
    )


def test_wandb_offline_run_holds_the_run(reported: dict[str, Any]) -> None:
    (folder,) = (reported["runs_dir"] / "tracking" / "wandb").glob("offline-run-*")
    run = _wandb_run(next(folder.glob("run-*.wandb")))
    assert run["name"] == reported["run_id"] and run["project"] == "foundry"
    assert run["config"]["loss.kind"] == "forward_kl"
    assert run["config"]["limits.max_steps"] == 6
    assert math.isclose(
        run["summary"]["summary/student.val_ppl"], reported["summary"]["student"]["val_ppl"]
    )
    history = run["history"]
    losses = {int(row["step"]): row["train/loss"] for row in history if "train/loss" in row}
    assert _same(losses, reported["history"]["train/loss"])
    ppl = {int(row["step"]): row["eval/ppl"] for row in history if "eval/ppl" in row}
    assert _same(ppl, reported["history"]["val/ppl"])
    base = {
        int(row["baseline_step"]): row["baseline/train/loss"]
        for row in history
        if "baseline/train/loss" in row
    }
    assert _same(base, reported["history"]["baseline/train/loss"])
    assert run["exit_code"] == 0


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B run file: a 7-byte ``:W&B`` header, then LevelDB's log
    format (32 KiB blocks of chunks: crc32c, little-endian length, kind 1 full, 2 first,
    3 middle, 4 last). wandb 0.31 ships no Python reader of its own; the records are its
    protobufs (``wandb.proto.wandb_internal_pb2.Record``)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            parts = [chunk]
        elif kind in (3, 4):
            parts.append(chunk)
        if kind in (1, 4):
            yield b"".join(parts)


def _wandb_run(path: Path) -> dict[str, Any]:
    """Name, project, config, final summary, history rows and exit code of a run file."""
    from wandb.proto import wandb_internal_pb2

    def key(item: Any) -> str:
        return str(item.key or "/".join(item.nested_key))

    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit_code": None}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            for item in record.run.config.update:
                value = json.loads(item.value_json)
                out["config"][key(item)] = value.get("value") if isinstance(value, dict) else value
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


# --------------------------------------------------------------------------- failures


def _small_job(steps: int) -> control.JobFn:
    """A real little training loop emitting step events as the trainer does."""
    import torch

    def job(
        config: RunConfig, *, store: RunStore, run_id: str, ctx: RunContext, resume: bool = False
    ) -> dict[str, Any]:
        w = torch.zeros(8, 1, requires_grad=True)
        target = torch.ones(8, 1)
        opt = torch.optim.SGD([w], lr=0.1)
        for step in range(1, steps + 1):
            ctx.check()
            loss = ((w - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            metrics = {"train/loss": float(loss.detach())}
            store.log_metrics(run_id, step, metrics)
            ctx.emit("step", step=step, max_steps=steps, prefix="", metrics=metrics)
        return {"student": {"val_ppl": math.exp(float(loss.detach()))}}

    return job


def test_a_failing_tracker_is_a_warning_and_the_run_completes(tmp_path: Path) -> None:
    """TensorBoard cannot write where tracking.dir is a file: the run still completes,
    the store says why, and the tracker that works (MLflow) has every step."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file", encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'ok.db'}"
    cfg = load_config(
        None,
        {
            "runs_dir": str(tmp_path / "runs"),
            "tracking.report_to": ["tensorboard", "mlflow"],
            "tracking.dir": str(blocked),
            "tracking.mlflow_uri": uri,
        },
    )
    seen: list[fk.Event] = []
    handle = fk.run_sync(cfg, job=_small_job(5), on_event=seen.append)
    assert handle.state == fk.RunState.COMPLETED
    with RunStore(tmp_path / "runs", read_only=True) as store:
        alerts = [e.message for e in store.events(handle.id) if e.kind == "alert"]
    assert len(alerts) == 1 and "exporter 'tensorboard' failed to start" in alerts[0], alerts
    assert any(e.kind == "alert" and "tensorboard" in e.payload["message"] for e in seen)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("foundry")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5] and run.info.status == "FINISHED"


def test_a_rank_of_a_multi_process_run_does_not_export(tmp_path: Path) -> None:
    """Ranks run through ``attach`` (the launcher owns the run and exports rank 0's
    relayed events once): a rank's handle starts no exporter."""
    cfg = load_config(
        None, {"runs_dir": str(tmp_path / "runs"), "tracking.report_to": ["tensorboard"]}
    )
    with RunStore(tmp_path / "runs") as store:
        record = store.create_run(cfg.to_dict(), name=None)
        handle = control.attach(record.run_id, cfg, store=store, job=_small_job(3))
        handle.wait(60)
        assert handle.state == fk.RunState.COMPLETED
        assert [r.step for r in store.metrics(record.run_id, ["train/loss"])] == [1, 2, 3]
    assert not (tmp_path / "runs" / "tracking").exists()


def test_trackio_local_database_holds_the_run(reported: dict[str, Any]) -> None:
    from trackio.sqlite_storage import SQLiteStorage
    from trackio.utils import TRACKIO_DIR

    assert TRACKIO_DIR == reported["runs_dir"] / "tracking" / "trackio"
    run_id = reported["run_id"]
    assert run_id in SQLiteStorage.get_runs("foundry")
    config = SQLiteStorage.get_run_config("foundry", run_id)
    assert config is not None and config["loss.kind"] == "forward_kl"
    logs = SQLiteStorage.get_logs("foundry", run_id)
    losses = {int(row["step"]): row["train/loss"] for row in logs if "train/loss" in row}
    assert _same(losses, reported["history"]["train/loss"])
    ppl = {int(row["step"]): row["eval/ppl"] for row in logs if "eval/ppl" in row}
    assert _same(ppl, reported["history"]["val/ppl"])
    finals = [row["summary/student.val_ppl"] for row in logs if "summary/student.val_ppl" in row]
    assert finals and math.isclose(finals[-1], reported["summary"]["student"]["val_ppl"])
