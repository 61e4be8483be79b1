"""Tests for foundry_kernel.logs: shared format, per-run files, rotation, throttling."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from foundry_kernel.errors import ConfigError
from foundry_kernel.logs import (
    LOGGER_NAME,
    Throttle,
    bind_run,
    configure_logging,
    current_run_id,
    get_logger,
    run_log,
)

RUN_A = "20261129-091500-run-a-0000000a"
RUN_B = "20261129-091500-run-b-0000000b"


@pytest.fixture(autouse=True)
def clean_foundry_logger() -> Iterator[logging.Logger]:
    """Each test starts and ends with the logger as it found it (no shared handlers)."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _open_files_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve())
    return [f.path for f in psutil.Process().open_files() if f.path.startswith(prefix)]


# --- configure_logging --------------------------------------------------------------------


def test_configure_logging_is_idempotent_and_uses_the_format(
    clean_foundry_logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    configure_logging("info", stream=stream)
    configure_logging(logging.INFO)
    assert len(clean_foundry_logger.handlers) == 1
    log = get_logger("store")
    assert log.name == "foundry.store"
    log.info("hello %s", "world")
    log.debug("hidden")
    with bind_run(RUN_A):
        log.info("inside")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" INFO foundry.store [-] hello world")
    assert lines[1].endswith(f" INFO foundry.store [{RUN_A}] inside")


def test_configure_logging_changes_level(clean_foundry_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("WARNING", stream=stream)
    get_logger().info("quiet")
    configure_logging("DEBUG")
    get_logger().debug("loud")
    assert "quiet" not in stream.getvalue()
    assert "loud" in stream.getvalue()
    with pytest.raises(ConfigError, match="LOUDEST"):
        configure_logging("LOUDEST")


# --- run_log ------------------------------------------------------------------------------


def test_run_log_writes_only_its_runs_records(tmp_path: Path) -> None:
    log = get_logger("train")
    log.warning("before any run")
    with run_log(tmp_path, RUN_A) as path:
        assert current_run_id.get() == RUN_A
        log.info("step %d", 1)
        log.info("explicit other run", extra={"run_id": RUN_B})
    log.warning("after the run")
    assert current_run_id.get() is None
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "run.log"
    assert f"INFO foundry.train [{RUN_A}] step 1" in text
    assert "before" not in text
    assert "after" not in text
    assert "explicit other run" not in text


def test_run_log_gets_info_even_when_console_is_at_warning(tmp_path: Path) -> None:
    console = io.StringIO()
    configure_logging("WARNING", stream=console)
    with run_log(tmp_path, RUN_A, level="INFO") as path:
        get_logger().info("progress")
    assert "progress" in path.read_text(encoding="utf-8")
    assert "progress" not in console.getvalue()
    assert logging.getLogger(LOGGER_NAME).level == logging.WARNING  # restored


def test_run_log_rotates_at_max_bytes(tmp_path: Path) -> None:
    max_bytes = 600
    with run_log(tmp_path, RUN_A, max_bytes=max_bytes, backup_count=2):
        for i in range(200):
            get_logger().info("line %03d %s", i, "x" * 20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run.log", "run.log.1", "run.log.2"]
    for name in names:
        assert 0 < (tmp_path / name).stat().st_size <= max_bytes
    assert "line 199" in (tmp_path / "run.log").read_text(encoding="utf-8")


def test_run_log_removes_and_closes_its_handler(
    tmp_path: Path, clean_foundry_logger: logging.Logger
) -> None:
    before = list(clean_foundry_logger.handlers)
    with run_log(tmp_path, RUN_A):
        get_logger().info("x")
        assert len(clean_foundry_logger.handlers) == len(before) + 1
        handler = clean_foundry_logger.handlers[-1]
        assert _open_files_under(tmp_path)
    assert clean_foundry_logger.handlers == before
    assert isinstance(handler, logging.FileHandler)
    assert handler.stream is None
    assert _open_files_under(tmp_path) == []


def test_run_log_cleans_up_when_the_run_raises(
    tmp_path: Path, clean_foundry_logger: logging.Logger
) -> None:
    with pytest.raises(RuntimeError), run_log(tmp_path, RUN_A):
        raise RuntimeError("boom")
    assert clean_foundry_logger.handlers == []
    assert current_run_id.get() is None
    assert _open_files_under(tmp_path) == []


def test_run_log_refuses_bad_run_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_id"), run_log(tmp_path, "..\\..\\x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_two_runs_in_two_threads_write_only_their_own_files(tmp_path: Path) -> None:
    both_open = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(run_id: str) -> None:
        try:
            with run_log(tmp_path / run_id, run_id):
                both_open.wait(timeout=10)
                log = get_logger("train")
                for i in range(200):
                    log.info("from %s #%d", run_id, i)
                both_open.wait(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rid,)) for rid in (RUN_A, RUN_B)]
    for thread in threads:
        thread.start()
    get_logger().info("main thread, no run")
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    for own, other in ((RUN_A, RUN_B), (RUN_B, RUN_A)):
        lines = (tmp_path / own / "run.log").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 200
        assert all(f"[{own}] from {own} #" in line for line in lines)
        assert not any(other in line for line in lines)
    assert logging.getLogger(LOGGER_NAME).handlers == []


def test_worker_threads_need_bind_run(tmp_path: Path) -> None:
    """Threads start with an empty context: without bind_run their lines are not the run's."""

    def unbound() -> None:
        get_logger().info("unbound worker")

    def bound() -> None:
        with bind_run(RUN_A):
            get_logger().info("bound worker")

    with run_log(tmp_path, RUN_A) as path:
        for target in (unbound, bound):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    text = path.read_text(encoding="utf-8")
    assert "bound worker" in text
    assert "unbound worker" not in text


# --- throttling ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throttle_counts_with_a_fake_clock() -> None:
    clock = FakeClock()
    throttle = Throttle(1.0, clock=clock)
    assert throttle.ready()
    results = []
    for t in (0.1, 0.5, 0.99):
        clock.now = t
        results.append(throttle())
    assert results == [False, False, False]
    assert throttle.suppressed == 3
    clock.now = 1.0
    assert throttle.check() == 3
    assert throttle.suppressed == 0
    clock.now = 1.5
    assert throttle.check() is None
    clock.now = 2.0
    assert throttle.ready()
    assert throttle.total_suppressed == 4
    throttle.reset()
    assert throttle.ready()


def test_throttle_rejects_bad_intervals() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_interval_s"):
            Throttle(bad)
