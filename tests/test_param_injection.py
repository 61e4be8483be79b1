"""``foundry run`` parameters can never leave their Python literal (pen test, issue 15, #2).

papermill writes a parameter it has no rule for (bytes from ``!!binary``, a set, a date)
as ``"<str(value)>"`` without escaping, so a YAML tag in a parameters file or a ``-p``
value used to run code in the kernel before any Foundry code. These tests run the real
command line into a real kernel and papermill's real parameter injection.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_notebook_runner import NOTEBOOK, tiny_overrides

pytest.importorskip("papermill")

FOUNDRY = [sys.executable, "-m", "foundry_kernel.cli"]


def _payload(canary: Path) -> str:
    """Text that closes papermill's quotes, writes the canary, and reopens them."""
    # double quotes only: bytes' repr would escape a single quote with a backslash
    code = f'__import__("pathlib").Path("{canary}").write_text("pwned")'
    return f'"+str({code})+"'


def _binary(canary: Path) -> str:
    return "!!binary " + base64.b64encode(_payload(canary).encode()).decode()


def _foundry_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOUNDRY, "run", str(NOTEBOOK), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


@pytest.fixture
def tiny_file(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """The tiny config as dotted top-level parameters (so ``-p config_overrides`` adds to it)."""
    path = tmp_path / "tiny.yaml"
    dotted = {k: v for k, v in tiny_overrides().items() if k != "name"}  # no such parameter
    path.write_text(yaml.safe_dump(dotted), encoding="utf-8")
    return path


@pytest.mark.parametrize("where", ["params file", "-p config_overrides"])
def test_a_yaml_tag_cannot_run_code_in_the_kernel(
    where: str, tmp_path: Path, tiny_file: Path, runs_dir: Path
) -> None:
    """The exploit from the report, through the real CLI: refused, the canary never appears."""
    canary = tmp_path / "canary"
    args = ["-f", str(tiny_file), "-p", "max_steps", "2", "--runs-dir", str(runs_dir)]
    if where == "params file":
        evil = tmp_path / "evil.yaml"
        evil.write_text(f"headless: {_binary(canary)}\n", encoding="utf-8")
        args += ["-f", str(evil)]
    else:
        args += ["-p", "config_overrides", f"{{data.text_field: {_binary(canary)}}}"]
    proc = _foundry_run(*args, "--timeout", "120")
    assert not canary.exists(), "the parameter ran code in the kernel"
    assert proc.returncode == 2, proc.stderr
    assert "!!binary" in proc.stderr and "not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (runs_dir / "foundry.sqlite").exists()  # refused before any run was created


def _probe_notebook(path: Path) -> Path:
    """A notebook that records exactly what its kernel received, and completes its run."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell(
        "run_id = None\nruns_dir = None\ntext = None\nnested = None\nblock = None\n"
    )
    params.metadata["tags"] = ["parameters"]
    record = nbformat.v4.new_code_cell(
        "import json\n"
        "from pathlib import Path\n"
        "from foundry_kernel.store import RunStore\n"
        "received = {'text': text, 'nested': nested, 'block': block}\n"
        "Path(runs_dir, run_id, 'received.json').write_text(json.dumps(received))\n"
        "with RunStore(runs_dir) as store:\n"
        "    store.set_state(run_id, 'running')\n"  # the store's table: pending -> running first
        "    store.set_state(run_id, 'completed')\n"
    )
    nb.cells = [params, record]
    nbformat.write(nb, path)
    return path


def test_hostile_text_reaches_a_real_kernel_as_exactly_that_text(
    tmp_path: Path, runs_dir: Path
) -> None:
    """Plain text that looks like the exploit (quotes, backslashes, newlines, triple
    quotes) is not refused: it must arrive in the kernel verbatim, running nothing."""
    canary = tmp_path / "canary"
    text = _payload(canary)
    nested = {
        'a"b': ["\\", "\n", "'''", '"""', '\\"', "\r\n"],
        "k": [1, -2.5, True, None, "2026-11-29", "=", "{run_id}"],
        _payload(canary): {"deep": [[[_payload(canary)]]]},
    }
    block = f'line one "\nline \\two\\ {_payload(canary)}\n"""end'
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"nested": nested, "block": block}), encoding="utf-8")
    notebook = _probe_notebook(tmp_path / "probe.ipynb")
    argv = [*FOUNDRY, "run", str(notebook), "-p", "text", f"'{text}'", "-f", str(values)]
    proc = subprocess.run(
        [*argv, "--runs-dir", str(runs_dir), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists()
    (received_file,) = runs_dir.glob("*/received.json")
    received = json.loads(received_file.read_text(encoding="utf-8"))
    assert received == {"text": text, "nested": nested, "block": block}
