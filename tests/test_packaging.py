"""Foundry installed from a wheel, outside the checkout: the shipped notebooks are package
data, so ``foundry dashboard`` and ``foundry run distill`` work with no source tree.

How the test gets a "fresh" environment in seconds: the wheel is built from a copy of the
tracked files (nothing of the checkout leaks in: no ``build/`` left behind) and installed
``--no-deps`` into a new venv; that venv borrows this one's third-party packages through
a ``.pth`` line (the editable install of the checkout is not one of them: an editable
finder is a ``.pth`` *file*, and ``.pth`` files in borrowed folders are not executed). The
commands run from an empty folder, with ``PYTHONPATH`` cleared, and the test checks that
``foundry_kernel`` and ``widgets`` are imported from the new venv.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_notebook_runner import tiny_overrides

from foundry_kernel.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
PIP = (sys.executable, "-m", "pip")


def _tracked_files() -> list[str]:
    git = shutil.which("git")
    assert git is not None, "git is needed to list the tracked files"
    done = subprocess.run(
        [git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    )
    return [p for p in done.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (found,) = dist.glob("foundry-*.whl")
    return found


def test_the_wheel_holds_two_packages_and_the_notebooks(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"foundry_kernel", "widgets"}  # no generic `bench`, nothing else
    assert "widgets/notebooks/distill.ipynb" in names
    assert "widgets/notebooks/dashboard.ipynb" in names
    assert "widgets/jupyter/voila/templates/foundry/index.html.j2" in names  # no CDN page
    assert "foundry_kernel/py.typed" in names
    assert "foundry_kernel/teachers/_vllm_guard/foundry_vllm_guard.py" in names  # the gate


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_paths()["purelib"])
    (purelib / "borrowed.pth").write_text(f"{ours}\n", encoding="utf-8")
    done = subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return env


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def _bin(venv: Path, name: str) -> str:
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / name)


def test_the_installed_packages_are_imported_from_the_venv(venv: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            _bin(venv, "python"),
            "-c",
            "import foundry_kernel, widgets; "
            "print(foundry_kernel.__file__); print(widgets.__file__)",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for line in done.stdout.split():
        assert Path(line).is_relative_to(venv), line


@pytest.fixture
def dashboard(venv: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = subprocess.Popen(
        [_bin(venv, "foundry"), "dashboard", "--runs-dir", str(runs)],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"open: http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
            if match:
                url = match
                break
        assert url is not None, "foundry dashboard printed no URL:\n" + "".join(seen)
        yield int(url.group(1)), url.group(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_foundry_dashboard_from_the_wheel(dashboard: tuple[int, str]) -> None:
    port, token = dashboard
    assert _status(port, f"/?token={token}") == 200
    assert _status(port, "/") in (302, 401, 403)  # refused without the token


def test_foundry_run_distill_from_the_wheel(
    venv: Path, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"config_overrides": tiny_overrides()}), encoding="utf-8")
    runs = tmp_path / "runs"
    done = subprocess.run(
        [
            *(_bin(venv, "foundry"), "run", "distill", "-f", str(params)),
            *("-p", "max_steps", "2", "--runs-dir", str(runs), "--timeout", "300"),
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with RunStore(runs, read_only=True) as store:
        (record,) = store.list_runs()
    assert record.state == "completed"
    assert (runs / record.run_id / "distill.ipynb").is_file()
