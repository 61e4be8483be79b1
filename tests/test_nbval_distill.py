"""nbval over the shipped distill notebook, with small parameters injected by papermill.

How nbval gets small parameters: the notebook's defaults are real (a 300-step run on the
default teacher), and nbval executes a notebook as it is. Rather than teach the notebook
a test-only switch, ``papermill --prepare-only`` writes a copy with an
``injected-parameters`` cell (exactly what ``papermill -p`` would inject) and nbval runs
that copy with ``--nbval-lax``: every cell must run without error and the assertion cell
checks the result. This also proves plain papermill parameterizes the notebook.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_notebook_runner import NOTEBOOK, tiny_overrides

pytest.importorskip("nbval")
pytest.importorskip("papermill")

TIMEOUT_S = 300


def test_distill_notebook_passes_nbval_with_small_parameters(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    prepared = tmp_path / "distill.ipynb"
    runs_dir = tmp_path / "runs"
    overrides = yaml.safe_dump({"config_overrides": tiny_overrides()}, default_flow_style=True)
    prepare = [
        sys.executable,
        "-m",
        "papermill",
        "--prepare-only",
        str(NOTEBOOK),
        str(prepared),
        "-p",
        "max_steps",
        "3",
        "-p",
        "runs_dir",
        str(runs_dir),
        "-y",
        overrides,
    ]
    done = subprocess.run(prepare, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    nbval = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        f"--nbval-cell-timeout={TIMEOUT_S}",
        "-p",
        "no:cacheprovider",
        "-q",
        str(prepared),
    ]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        nbval, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2
    )
    report = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "failed" not in done.stdout, report
    assert any(runs_dir.glob("*/config.json")), "the notebook's run is in the store"
