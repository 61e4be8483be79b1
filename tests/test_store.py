"""Tests for foundry_kernel.store against real SQLite files in tmp_path."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from foundry_kernel import store as store_module
from foundry_kernel.errors import ConfigError, StoreError
from foundry_kernel.store import (
    DB_FILENAME,
    TERMINAL_STATES,
    MetricRow,
    RunStore,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SQLITE_COMPANIONS = {f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"}


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with RunStore(tmp_path / "runs") as opened:
        yield opened


def _open_paths_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve())
    return [f.path for f in psutil.Process().open_files() if f.path.startswith(prefix)]


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- creating and reading runs ------------------------------------------------------------


def test_create_run_makes_folder_config_and_row(store: RunStore) -> None:
    config = {"teacher": "gpt2", "lr": 1e-4, "layers": [1, 2], "note": "ünïcode"}
    record = store.create_run(config, name="Tiny GPT-2", batch_id="b1")
    assert record.state == "pending"
    assert record.name == "Tiny GPT-2"
    assert record.kind == "distill"
    assert record.batch_id == "b1"
    assert "-tiny-gpt-2-" in record.run_id
    run_dir = store.run_dir(record.run_id)
    assert run_dir == store.root / record.run_id
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8")) == config
    assert store.get_run(record.run_id) == record
    assert _names(run_dir) == {"config.json"}


def test_create_run_refuses_bad_config_and_leaves_nothing(store: RunStore) -> None:
    before = _names(store.root)
    with pytest.raises(ConfigError, match="config") as info:
        store.create_run({"fn": object()})
    assert info.value.field == "config"
    with pytest.raises(ConfigError):
        store.create_run(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert _names(store.root) == before


def test_create_run_with_unknown_parent_removes_its_folder(store: RunStore) -> None:
    before = _names(store.root)
    with pytest.raises(StoreError, match="20990101-000000-ghost-00000000"):
        store.create_run({}, parent_run_id="20990101-000000-ghost-00000000")
    assert _names(store.root) == before
    parent = store.create_run({}, name="parent")
    child = store.create_run({}, name="child", parent_run_id=parent.run_id, kind="eval")
    assert store.get_run(child.run_id).parent_run_id == parent.run_id


def test_get_run_unknown_names_the_id(store: RunStore) -> None:
    with pytest.raises(StoreError, match="20990101-000000-nope-00000000"):
        store.get_run("20990101-000000-nope-00000000")


def test_list_runs_newest_first_batch_and_limit(store: RunStore) -> None:
    ids = []
    for i in range(5):
        ids.append(store.create_run({"i": i}, batch_id="a" if i % 2 else "b").run_id)
        time.sleep(0.002)  # distinct created_at
    assert [r.run_id for r in store.list_runs()] == ids[::-1]
    assert [r.run_id for r in store.list_runs(batch_id="a")] == [ids[3], ids[1]]
    assert [r.run_id for r in store.list_runs(limit=2)] == ids[:-3:-1]
    assert store.list_runs(limit=0) == []
    with pytest.raises(StoreError, match="limit"):
        store.list_runs(limit=-1)


def test_set_state_timestamps_and_errors(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    store.set_state(run_id, "running")
    first = store.get_run(run_id)
    assert first.started_at is not None
    assert first.ended_at is None
    store.set_state(run_id, "failed", error="CUDA OOM at step 7")
    failed = store.get_run(run_id)
    assert failed.state == "failed"
    assert failed.error == "CUDA OOM at step 7"
    assert failed.ended_at is not None
    assert failed.is_terminal
    store.set_state(run_id, "running")  # resume
    resumed = store.get_run(run_id)
    assert resumed.started_at == first.started_at
    assert resumed.ended_at is None
    assert resumed.error is None
    for state in sorted(TERMINAL_STATES):
        other = store.create_run({}).run_id
        store.set_state(other, "running")
        store.set_state(other, state)
        assert store.get_run(other).ended_at is not None
    with pytest.raises(StoreError, match="unknown run state"):
        store.set_state(run_id, "exploded")
    with pytest.raises(StoreError, match="unknown run"):
        store.set_state("20990101-000000-00000000", "running")


def test_update_summary_merges(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    store.update_summary(run_id, {"best_loss": 2.0, "steps": 10})
    store.update_summary(run_id, {"best_loss": 1.5, "ppl": 4.2})
    assert store.get_run(run_id).summary == {"best_loss": 1.5, "steps": 10, "ppl": 4.2}
    with pytest.raises(StoreError, match="summary"):
        store.update_summary(run_id, {"bad": {1, 2}})
    assert store.get_run(run_id).summary["steps"] == 10


# --- metrics ------------------------------------------------------------------------------


def test_metrics_round_trip_filters_and_non_finite(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    for step in range(5):
        store.log_metrics(run_id, step, {"loss": 1.0 / (step + 1), "lr": 0.1}, time=100.0 + step)
    store.log_metrics(run_id, 5, {"loss": math.nan, "grad_norm": math.inf, "neg": -math.inf})
    assert store.metric_names(run_id) == ["grad_norm", "loss", "lr", "neg"]
    loss = store.metrics(run_id, ["loss"])
    assert [r.step for r in loss] == [0, 1, 2, 3, 4, 5]
    assert loss[0] == MetricRow("loss", 0, 1.0, 100.0)
    assert math.isnan(loss[-1].value)
    assert store.metrics(run_id, "grad_norm")[0].value == math.inf
    assert store.metrics(run_id, ["neg"])[0].value == -math.inf
    assert [r.step for r in store.metrics(run_id, ["loss"], since_step=3)] == [4, 5]
    everything = store.metrics(run_id)
    assert [(r.name, r.step) for r in everything] == sorted((r.name, r.step) for r in everything)
    assert store.metrics(run_id, []) == []


def test_log_metrics_is_idempotent(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    store.log_metrics(run_id, 3, {"loss": 1.0})
    store.log_metrics(run_id, 3, {"loss": 0.5})
    assert [(r.step, r.value) for r in store.metrics(run_id)] == [(3, 0.5)]


def test_resume_truncate_then_relog_has_no_duplicates(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    for step in range(1, 101):
        store.log_metrics(run_id, step, {"loss": 1.0, "acc": 0.1})
    assert store.truncate_metrics_after(run_id, 60) == 80
    rows = [(step, name, 2.0, 0.0) for step in range(61, 121) for name in ("loss", "acc")]
    store.log_metrics_many(run_id, rows)
    loss = store.metrics(run_id, ["loss"])
    assert [r.step for r in loss] == list(range(1, 121))
    assert {r.value for r in loss if r.step <= 60} == {1.0}
    assert {r.value for r in loss if r.step > 60} == {2.0}
    assert len(store.metrics(run_id)) == 240
    assert store.truncate_metrics_after(run_id, 1000) == 0


def test_bad_metric_batches_commit_nothing(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    with pytest.raises(StoreError, match="not a number"):
        store.log_metrics(run_id, 1, {"ok": 1.0, "bad": "high"})  # type: ignore[dict-item]
    with pytest.raises(StoreError, match="tuples"):
        store.log_metrics_many(run_id, [(1, "ok", 1.0, 0.0), (2, "short")])  # type: ignore[list-item]
    with pytest.raises(StoreError, match="step"):
        store.log_metrics(run_id, -1, {"ok": 1.0})
    with pytest.raises(StoreError, match="step"):
        store.log_metrics(run_id, 1.5, {"ok": 1.0})  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="metric name"):
        store.log_metrics(run_id, 1, {"": 1.0})
    assert store.metrics(run_id) == []


def test_metrics_for_unknown_run(store: RunStore) -> None:
    ghost = "20990101-000000-00000000"
    with pytest.raises(StoreError, match=ghost):
        store.log_metrics(ghost, 1, {"loss": 1.0})
    with pytest.raises(StoreError, match=ghost):
        store.metrics(ghost)


def test_events(store: RunStore) -> None:
    run_id = store.create_run({}).run_id
    store.add_event(run_id, "divergence", "loss became NaN", step=12)
    store.add_event(run_id, "resume", "resumed from step 10")
    events = store.events(run_id)
    assert [(e.kind, e.message, e.step) for e in events] == [
        ("divergence", "loss became NaN", 12),
        ("resume", "resumed from step 10", None),
    ]
    assert events[0].event_id < events[1].event_id
    assert all(e.run_id == run_id for e in events)


# --- validation, modes, schema ------------------------------------------------------------

BAD_IDS = ["../x", "..", "a/b", "C:\\evil\\..\\x", "..\\..\\x", "CON", "nul", "a\x00b", ""]

STORE_CALLS: list[Callable[[RunStore, str], object]] = [
    lambda s, r: s.run_dir(r),
    lambda s, r: s.get_run(r),
    lambda s, r: s.set_state(r, "running"),
    lambda s, r: s.update_summary(r, {}),
    lambda s, r: s.log_metrics(r, 1, {"a": 1.0}),
    lambda s, r: s.log_metrics_many(r, []),
    lambda s, r: s.truncate_metrics_after(r, 1),
    lambda s, r: s.metrics(r),
    lambda s, r: s.metric_names(r),
    lambda s, r: s.add_event(r, "k", "m"),
    lambda s, r: s.events(r),
    lambda s, r: s.create_run({}, parent_run_id=r),
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_run_ids_are_refused_everywhere(store: RunStore, bad: str) -> None:
    before = _names(store.root)
    for call in STORE_CALLS:
        with pytest.raises(ConfigError, match="run_id"):
            call(store, bad)
    assert _names(store.root) == before


def test_wal_mode_and_busy_timeout(store: RunStore) -> None:
    with contextlib.closing(sqlite3.connect(store.db_path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn = store._conn()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_read_only_missing_db_is_clear_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(StoreError, match=r"read-only.*no database"):
        RunStore(missing, read_only=True)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no database"):
        RunStore(tmp_path / "empty", read_only=True)
    assert _names(tmp_path / "empty") == set()


def test_read_only_refuses_every_write_and_creates_no_files(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with RunStore(root) as writer:
        run_id = writer.create_run({"a": 1}).run_id
        writer.log_metrics(run_id, 1, {"loss": 1.0})
    before = _names(root)
    run_files_before = _names(root / run_id)
    with RunStore(root, read_only=True) as reader:
        assert reader.get_run(run_id).config == {"a": 1}
        assert len(reader.metrics(run_id)) == 1
        writes: list[Callable[[], object]] = [
            lambda: reader.create_run({}),
            lambda: reader.set_state(run_id, "running"),
            lambda: reader.update_summary(run_id, {"x": 1}),
            lambda: reader.log_metrics(run_id, 2, {"loss": 1.0}),
            lambda: reader.log_metrics_many(run_id, [(2, "loss", 1.0, 0.0)]),
            lambda: reader.truncate_metrics_after(run_id, 0),
            lambda: reader.add_event(run_id, "k", "m"),
        ]
        for write in writes:
            with pytest.raises(StoreError, match=r"^read-only"):
                write()
        assert len(reader.metrics(run_id)) == 1
    # SQLite itself may add the -wal/-shm files a WAL reader needs; nothing else appears.
    assert _names(root) - before <= SQLITE_COMPANIONS
    assert _names(root / run_id) == run_files_before


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_FILENAME)) as raw, raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for read_only in (False, True):
        with pytest.raises(StoreError, match="v99, newer"):
            RunStore(tmp_path, read_only=read_only)
    assert not _open_paths_under(tmp_path)


def test_empty_database_is_created_read_write_but_refused_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_CREATION_WAIT_S", 0.3)
    sqlite3.connect(tmp_path / DB_FILENAME).close()  # an empty (v0) database file
    with pytest.raises(StoreError, match="is empty: no Foundry tables appeared within"):
        RunStore(tmp_path, read_only=True)
    with RunStore(tmp_path) as migrated:
        migrated.create_run({})
    with RunStore(tmp_path, read_only=True) as reader:
        assert len(reader.list_runs()) == 1


def test_a_reader_waits_for_a_writer_that_is_creating_the_database(tmp_path: Path) -> None:
    """A dashboard that opens the store between the writer creating the file and adding
    its tables used to fail with "schema v0, older than v1"; it now waits for the tables."""
    sqlite3.connect(tmp_path / DB_FILENAME).close()  # the writer has made the file only

    def create_later() -> None:
        time.sleep(0.5)
        with RunStore(tmp_path) as writer:
            writer.create_run({"late": True})

    creator = threading.Thread(target=create_later)
    creator.start()
    try:
        with RunStore(tmp_path, read_only=True) as reader:
            assert reader.list_runs() == [] or reader.list_runs()[0].config == {"late": True}
    finally:
        creator.join()


def test_adding_a_v2_migration_is_one_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RunStore(tmp_path) as v1:
        run_id = v1.create_run({}).run_id
    calls = []

    def to_v2(conn: sqlite3.Connection) -> None:
        calls.append(1)
        conn.execute("ALTER TABLE runs ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'")

    monkeypatch.setattr(store_module, "_MIGRATIONS", {**store_module._MIGRATIONS, 2: to_v2})
    monkeypatch.setattr(RunStore, "SCHEMA_VERSION", 2)
    with RunStore(tmp_path) as v2:
        assert v2.get_run(run_id).run_id == run_id
    with RunStore(tmp_path) as again:
        again.list_runs()
    assert calls == [1]
    with contextlib.closing(sqlite3.connect(tmp_path / DB_FILENAME)) as raw:
        version = raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == ("2",)


# --- lifecycle and file handles -----------------------------------------------------------


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run({}).run_id
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_run(run_id)
    assert "closed" in repr(store)


def test_close_releases_every_threads_file_handles(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run({}).run_id
    barrier = threading.Barrier(4)

    def read_and_wait() -> None:
        store.metrics(run_id)
        barrier.wait(timeout=10)  # all threads hold a connection at the same time
        barrier.wait(timeout=10)

    threads = [threading.Thread(target=read_and_wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=10)
    db_handles = [p for p in _open_paths_under(tmp_path) if p.endswith(DB_FILENAME)]
    assert len(db_handles) == 4  # main thread + 3 readers
    barrier.wait(timeout=10)
    for thread in threads:
        thread.join()
    store.close()
    assert _open_paths_under(tmp_path) == []


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    """A kernel that starts many short-lived threads must not pile up open files."""

    def run_threads(count: int) -> int:
        for _ in range(count):
            thread = threading.Thread(target=store.metrics, args=(run_id,))
            thread.start()
            thread.join()
        return len([p for p in _open_paths_under(tmp_path) if p.endswith(DB_FILENAME)])

    with RunStore(tmp_path) as store:
        run_id = store.create_run({}).run_id
        after_few = run_threads(3)
        after_many = run_threads(12)
        assert len(store._conns) == 2  # the main thread's and the last thread's
        # SQLite may park one closed descriptor for reuse while another connection in
        # this process holds locks on the file; it must not grow with the thread count.
        assert after_many == after_few <= 3


# --- concurrency --------------------------------------------------------------------------

N_WRITERS = 10
N_STEPS = 200
METRIC_NAMES = ("loss", "lr", "grad_norm")

# Runs in a separate interpreter: reads continuously until the stop file appears and
# checks that every snapshot holds whole steps (all metrics of a step or none).
READER_SCRIPT = """
import sys, time
from pathlib import Path
from foundry_kernel.store import RunStore
root, stop, n_names = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
reads = 0
with RunStore(root, read_only=True) as store:
    print("ready", flush=True)
    while not stop.exists():
        for run in store.list_runs():
            rows = store.metrics(run.run_id)
            assert len(rows) % n_names == 0, (run.run_id, len(rows))
            reads += 1
print(reads, flush=True)
"""


def _reader_loop(store: RunStore, run_ids: list[str], stop: threading.Event, out: dict) -> None:
    try:
        while not stop.is_set():
            for run_id in run_ids:
                rows = store.metrics(run_id)
                assert len(rows) % len(METRIC_NAMES) == 0
                store.get_run(run_id)
                out["reads"] = out.get("reads", 0) + 1
    except BaseException as exc:  # re-raised by the test thread  # noqa: BLE001
        out["error"] = exc


def _writer(store: RunStore, run_id: str, out: dict) -> None:
    try:
        store.set_state(run_id, "running")
        for step in range(N_STEPS):
            values = {name: step * 0.5 + i for i, name in enumerate(METRIC_NAMES)}
            store.log_metrics(run_id, step, values)
            if step % 50 == 0:
                store.add_event(run_id, "checkpoint", f"step {step}", step=step)
        store.update_summary(run_id, {"steps": N_STEPS})
        store.set_state(run_id, "completed")
    except BaseException as exc:  # noqa: BLE001
        out["error"] = exc


def test_concurrent_writers_with_thread_and_process_readers(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    store = RunStore(root)
    run_ids = [store.create_run({"i": i}, name=f"writer {i}").run_id for i in range(N_WRITERS)]
    stop_file = tmp_path / "stop"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", READER_SCRIPT, str(root), str(stop_file), str(len(METRIC_NAMES))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    ro_store = RunStore(root, read_only=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
        stop = threading.Event()
        reader_results: list[dict] = [{}, {}]
        readers = [
            threading.Thread(target=_reader_loop, args=(s, run_ids, stop, r))
            for s, r in zip((store, ro_store), reader_results, strict=True)
        ]
        writer_results: list[dict] = [{} for _ in run_ids]
        writers = [
            threading.Thread(target=_writer, args=(store, run_id, r))
            for run_id, r in zip(run_ids, writer_results, strict=True)
        ]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join(timeout=60)
        stop.set()
        stop_file.touch()
        for thread in readers:
            thread.join(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        ro_store.close()

    for result in writer_results + reader_results:
        if "error" in result:
            raise result["error"]
    assert proc.returncode == 0, err
    assert int(out.strip()) > 0
    assert all(r["reads"] > 0 for r in reader_results)
    for run_id in run_ids:
        rows = store.metrics(run_id)
        assert len(rows) == N_STEPS * len(METRIC_NAMES)
        assert sorted({r.step for r in rows}) == list(range(N_STEPS))
        assert len(store.events(run_id)) == N_STEPS // 50
        record = store.get_run(run_id)
        assert record.state == "completed"
        assert record.summary == {"steps": N_STEPS}
    store.close()
    assert _open_paths_under(tmp_path) == []


def test_the_store_enforces_the_state_table(store: RunStore) -> None:
    """Whoever writes (controller, notebook runner, stale-run sweep), the store records only
    changes in the table: a completed run never changes; an unfinished one may resume."""
    from foundry_kernel._run_state import InvalidTransition

    run_id = store.create_run({}).run_id
    with pytest.raises(InvalidTransition, match="from pending to completed"):
        store.set_state(run_id, "completed")  # never ran
    store.set_state(run_id, "running")
    store.set_state(run_id, "running")  # the same state again is a no-op
    store.set_state(run_id, "completed")
    for later in ("running", "pending", "failed", "cancelled"):
        with pytest.raises(InvalidTransition, match="from completed"):
            store.set_state(run_id, later)
    assert store.get_run(run_id).state == "completed"
    other = store.create_run({}).run_id
    store.set_state(other, "running")
    store.set_state(other, "cancelled")
    store.set_state(other, "running")  # a resume of an unfinished run
    store.set_state(other, "timed_out")
    with pytest.raises(InvalidTransition, match="from timed_out to cancelling"):
        store.set_state(other, "cancelling")
