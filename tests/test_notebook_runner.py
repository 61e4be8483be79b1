"""``foundry run``: papermill executions of the shipped distill notebook as runs in the store.

Real kernels, real (tiny) runs: each execution starts its own ipykernel through papermill.
The runner is called as ``notebook_runner.main([...])``, what ``foundry run`` calls.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
import yaml
from conftest import tiny_config_dict

pytest.importorskip("papermill")

from foundry_kernel.run._control import run_sync
from foundry_kernel.store import RunStore
from widgets import runner as notebook_runner
from widgets.resources import shipped_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = shipped_notebook("distill")
PLOTLY = "application/vnd.plotly.v1+json"
CELL_TIMEOUT = "300"


def tiny_overrides(**extra: Any) -> dict[str, Any]:
    """The tiny test config as dotted ``config_overrides`` (no baseline, no checkpoints)."""
    cfg = tiny_config_dict(
        Path("unused"), eval={"baseline": False}, checkpoint={"every_steps": None}
    )
    cfg.pop("runs_dir")
    cfg["limits"].pop("max_steps")  # the notebook's max_steps parameter sets it
    out: dict[str, Any] = {}
    for section, values in cfg.items():
        if isinstance(values, dict):
            out.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            out[section] = values
    out.update(extra)
    return out


@pytest.fixture
def params_file(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """-f file with the tiny config (the fixture caches the tiny teacher first)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"config_overrides": tiny_overrides()}), encoding="utf-8")
    return path


def _outputs(notebook: Path) -> list[dict[str, Any]]:
    nb = nbformat.read(notebook, as_version=4)
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_foundry_run_writes_the_executed_notebook_into_the_run_folder(
    params_file: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(NOTEBOOK), "-f", str(params_file), "-p", "max_steps", "3"]
    argv += ["-p", "distill_mode", "offline", "-p", "top_k", "8"]  # a mode from the notebook
    code = notebook_runner.main([*argv, "--runs-dir", str(runs_dir), "--timeout", CELL_TIMEOUT])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"run store {runs_dir.absolute()}" in out.err
    with RunStore(runs_dir, read_only=True) as store:
        (record,) = store.list_runs()
    assert record.state == "completed" and record.batch_id is None
    executed = runs_dir / record.run_id / "distill.ipynb"
    assert record.summary["notebook"] == str(executed)
    assert record.summary["student"]["val_ppl"] > 0
    assert record.summary["logit_cache"]["k"] == 8
    outputs = _outputs(executed)
    charts = [o for o in outputs if PLOTLY in o.get("data", {})]
    assert len(charts) >= 2  # loss, validation (and memory): static, kept in the file
    loss = charts[0]["data"][PLOTLY]
    assert any(trace.get("name") == "train loss" for trace in loss["data"])
    text = "".join(o.get("text", "") for o in outputs)
    assert f"run {record.run_id} completed" in text and "checks passed" in text
    injected = nbformat.read(executed, as_version=4).cells[2]
    assert "injected-parameters" in injected.metadata.tags and record.run_id in injected.source
    assert record.run_id in out.out and "completed" in out.out  # the summary table


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-p", "max_step", "3"], "did you mean 'max_steps'"),
        (
            ["-p", "learning_rate", "1"],
            "allowed: config_overrides, config_path, distill_mode, headless",
        ),
        (["-p", "loss.beta", "7"], "loss.beta"),
        (["-p", "max_steps", "many"], "parameter max_steps: 'many' is a str"),
        (["-p", "run_id", "x"], "set by foundry run itself"),
        (["-p", "max_steps", "3", "-p", "limits.max_steps", "4"], "given twice"),
        (["--grid", "loss.temprature=1,2"], "did you mean 'loss.temperature'"),
        (["--grid", "loss.beta"], "must look like key=v1,v2"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        # plain data only (pen test #2, #3): the !!set used to crash with a TypeError
        # after its run was created, leaving it pending
        (["-p", "config_overrides", "{eval.sample_prompts: !!set {a: null}}"], "!!set"),
        (["-p", "headless", "!!binary aGk="], "YAML tag !!binary"),
        (["-p", "headless", "!!timestamp 2026-11-29"], "YAML tag !!timestamp"),
        (["-p", "seed", "&a 1"], "YAML anchor &a"),
        (["-p", "headless", "[*a]"], "YAML alias *a"),
        (["-p", "config_overrides", "{loss.beta: .nan}"], "not a finite number"),
        (["-p", "config_overrides", "{1: 2}"], "keys must be text"),
        (["-p", "headless", "x" * 20_000], "at most 16,384"),
        (["-p", "config_path", "/etc/hostname"], "outside the allowed folders"),
        (["-p", "config_path", '"c\\0.yaml"'], "NUL byte"),
        (["-p", "config_overrides", '{data.source: "a\\0b"}'], "NUL byte"),
        (["-p", "config_overrides", "{teacher.build.data: 'builtin:evil'}"], "builtin:evil"),
        (
            [
                "--grid",
                "seed=" + ",".join(map(str, range(40))),
                "--grid",
                "loss.beta=" + ",".join(["0.5"] * 26),
            ],
            "at most 1,000",
        ),
    ],
)
def test_bad_parameters_are_refused_before_any_kernel_starts(
    argv: list[str],
    expected: str,
    runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import jupyter_client.manager
    import papermill

    def no_kernel(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a kernel was started for refused parameters")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    monkeypatch.setattr(jupyter_client.manager.KernelManager, "start_kernel", no_kernel)
    code = notebook_runner.main([str(NOTEBOOK), *argv, "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (runs_dir / "foundry.sqlite").exists()  # no run was created either


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/etc/hostname", "outside"), ("README.md", "not an .ipynb"), ("nope.ipynb", "not found")],
)
def test_notebook_paths_are_checked(
    path: str, expected: str, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = path if path.startswith("/") else str(REPO / path)
    assert notebook_runner.main([target, "--runs-dir", str(runs_dir)]) == 2
    assert expected in capsys.readouterr().err


def test_parameter_sets_are_a_product_with_p_on_top(tmp_path: Path) -> None:
    sets_file = tmp_path / "sets.yaml"
    sets_file.write_text(yaml.safe_dump([{"max_steps": 5}, {"max_steps": 7}]), encoding="utf-8")
    sets = notebook_runner.parameter_sets(
        [["loss_kind", "jsd"]], [sets_file], ["loss.beta=0,0.5", "optim.lr=0.001"]
    )
    assert len(sets) == 4
    assert sets[0] == {"max_steps": 5, "loss_kind": "jsd", "loss.beta": 0, "optim.lr": 0.001}
    assert {s["loss.beta"] for s in sets} == {0, 0.5}
    assert notebook_runner.varying_keys(sets) == ["max_steps", "loss.beta"]


def test_a_grid_runs_in_parallel_as_one_batch_and_a_failure_does_not_stop_it(
    params_file: Path,
    runs_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "missing-corpus.txt"
    argv = [
        str(NOTEBOOK),
        "-f",
        str(params_file),
        "-p",
        "max_steps",
        "2",
        "--grid",
        f"data.source=builtin:python-docs,{missing}",
        "--jobs",
        "2",
        "--runs-dir",
        str(runs_dir),
        "--timeout",
        CELL_TIMEOUT,
    ]
    code = notebook_runner.main(argv)
    out = capsys.readouterr()
    assert code == 1  # one member failed
    with RunStore(runs_dir, read_only=True) as store:
        records = store.list_runs()
    assert len(records) == 2
    assert len({r.batch_id for r in records}) == 1 and records[0].batch_id
    by_source = {r.config["data"]["source"]: r for r in records}
    good, bad = by_source["builtin:python-docs"], by_source[str(missing)]
    assert good.state == "completed" and bad.state == "failed"
    assert "missing-corpus.txt" in (bad.error or "")
    for record in records:  # both executions are in their run folders
        assert (runs_dir / record.run_id / "distill.ipynb").is_file()
    # The failing cell's error, once, without papermill's traceback.
    assert "NotebookRunError" in out.err and "missing-corpus.txt" in out.err
    assert "Traceback" not in out.err and "-----" not in out.err
    assert good.run_id in out.out and bad.run_id in out.out and "FAILED" not in out.out
    summary = json.dumps(good.summary)
    assert "distill.ipynb" in summary


@pytest.mark.parametrize("name", ["distill.ipynb", "dashboard.ipynb"])
def test_papermill_sees_every_parameter(name: str) -> None:
    """papermill silently skips a parameter line it cannot parse (an '=' or a quote in its
    comment): then `-p` refuses a parameter the notebook plainly declares."""
    import ast

    from papermill.inspection import inspect_notebook

    path = NOTEBOOK.parent / name
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assigned = [
        t.id
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    ]
    assert assigned and list(inspect_notebook(str(path))) == assigned


@pytest.mark.slow
def test_ten_concurrent_headless_runs_finish_with_their_own_results(
    params_file: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten papermill kernels at once over one run store: ten completed runs, each with its
    own seed's result (equal to the same seed run alone in this process)."""
    seeds = list(range(10))
    overrides = {k: v for k, v in tiny_overrides().items() if k != "seed"}
    params_file.write_text(yaml.safe_dump({"config_overrides": overrides}), encoding="utf-8")
    argv = [str(NOTEBOOK), "-f", str(params_file), "-p", "max_steps", "3"]
    argv += ["--grid", "seed=" + ",".join(map(str, seeds)), "--jobs", "10"]
    code = notebook_runner.main([*argv, "--runs-dir", str(runs_dir), "--timeout", "600"])
    out = capsys.readouterr()
    assert code == 0, out.err
    with RunStore(runs_dir, read_only=True) as store:
        records = store.list_runs()
    assert len(records) == 10 and {r.state for r in records} == {"completed"}
    assert len({r.run_id for r in records}) == 10 and len({r.batch_id for r in records}) == 1
    by_seed = {r.config["seed"]: r for r in records}
    assert sorted(by_seed) == seeds
    for record in records:  # each execution and its metrics are its own
        assert (runs_dir / record.run_id / "distill.ipynb").is_file()
    losses = {s: by_seed[s].summary["student"]["val_loss"] for s in seeds}
    assert len(set(losses.values())) == 10  # ten different seeds, ten different students
    alone = run_sync(by_seed[3].config | {"runs_dir": str(runs_dir / "alone")})
    assert alone.result is not None
    assert alone.result["student"]["val_loss"] == pytest.approx(losses[3], abs=1e-6)


def test_runs_dir_is_confined_like_other_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = notebook_runner.main([str(NOTEBOOK), "--runs-dir", "/etc/foundry-runs"])
    err = capsys.readouterr().err
    assert code == 2 and "--runs-dir: '/etc/foundry-runs' is outside the allowed folders" in err
    assert not Path("/etc/foundry-runs").exists()


FOUNDRY = [sys.executable, "-m", "foundry_kernel.cli"]


def _wait_for_training(runs_dir: Path, *, steps: int, timeout: float) -> str:
    """The id of the first run that has logged ``steps`` training steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (runs_dir / "foundry.sqlite").exists():
            with RunStore(runs_dir, read_only=True) as store:
                for record in store.list_runs():
                    rows = store.metrics(record.run_id, ["train/loss"])
                    if record.state == "running" and len(rows) >= steps:
                        return record.run_id
        time.sleep(0.3)
    raise AssertionError(f"no run reached {steps} steps in {timeout} s")


def test_sigterm_stops_the_kernels_and_cancels_the_runs(params_file: Path, runs_dir: Path) -> None:
    """A real ``foundry run`` (two runs, one kernel at a time) gets SIGTERM while its first
    kernel trains: it stops that kernel and everything under it, marks the running run and
    the queued one ``cancelled`` with the reason, and exits 143. It used to exit at once
    and leave the run ``running`` and its kernel alive."""
    overrides = {k: v for k, v in tiny_overrides().items() if k != "seed"}
    overrides["eval.every_steps"] = 100_000
    params_file.write_text(yaml.safe_dump({"config_overrides": overrides}), encoding="utf-8")
    argv = [*FOUNDRY, "run", str(NOTEBOOK), "-f", str(params_file), "-p", "max_steps", "100000"]
    argv += ["--grid", "seed=0,1", "--jobs", "1", "--runs-dir", str(runs_dir)]
    child = subprocess.Popen(
        [*argv, "--timeout", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_training(runs_dir, steps=3, timeout=300)
        tree = psutil.Process(child.pid).children(recursive=True)
        assert tree, "the kernel should be a child of foundry run"
        t0 = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
        stopped_s = time.monotonic() - t0
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, err
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, f"left behind: {alive}"
    with RunStore(runs_dir, read_only=True) as store:
        by_seed = {r.config["seed"]: r for r in store.list_runs()}
    assert sorted(by_seed) == [0, 1]
    assert by_seed[0].state == "cancelled"
    assert by_seed[0].error == "foundry run was stopped by SIGTERM while its notebook ran"
    assert by_seed[1].state == "cancelled"
    assert by_seed[1].error == "foundry run was stopped by SIGTERM before its notebook started"
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert by_seed[0].run_id in out  # the summary table still ends the output
    print(f"\nSIGTERM: {len(tree)} processes stopped, exit after {stopped_s:.1f} s")


def test_an_edited_shipped_notebook_is_never_run_headless(
    tmp_path: Path,
    runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16: in an editable install JupyterLab autosaves into the package's own
    notebook, and `foundry run distill` executed the cell a user had added there. The
    shipped notebook runs only as shipped (by name, by its path, or by default), and the
    refusal names the way out: a copy of your own, by path."""
    import papermill

    from widgets import resources

    package = tmp_path / "package"
    package.mkdir()
    edited = package / "distill.ipynb"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("open('/tmp/leak', 'w')  # added in Lab"))
    nbformat.write(nb, edited)
    shipped = {"distill": edited, "dashboard": resources.shipped_notebook("dashboard")}
    monkeypatch.setattr(resources, "shipped_notebook", shipped.__getitem__)
    monkeypatch.setattr(notebook_runner, "shipped_notebook", shipped.__getitem__)

    def no_kernel(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the edited shipped notebook was executed")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    for named in (["distill"], [str(edited)], []):
        code = notebook_runner.main([*named, "-p", "max_steps", "1", "--runs-dir", str(runs_dir)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "was edited after it shipped" in err and "my-distill.ipynb" in err
    assert not (runs_dir / "foundry.sqlite").exists()
    # the same notebook as the user's own file (not the package's) runs: it is theirs
    own = tmp_path / "mine.ipynb"
    own.write_bytes(edited.read_bytes())
    assert notebook_runner.check_notebook(str(own)) == own.resolve()


def test_the_shipped_notebooks_are_as_shipped_and_run_without_lab_state(
    tmp_path: Path,
) -> None:
    """Each shipped notebook carries its cells' fingerprint (restamp after an edit on
    purpose: ``python -m widgets.resources``); what a frontend saved into a notebook -
    outputs, and the widget state that made an executed copy 5.5 MB - is not executed."""
    from widgets.resources import SHIPPED_NOTEBOOKS, edited_shipped_notebook

    for name in SHIPPED_NOTEBOOKS:
        assert edited_shipped_notebook(name) is None, "run: python -m widgets.resources"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"x": "y" * 1000}}
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="old\n")]
    code.execution_count = 7
    saved = tmp_path / "saved-by-lab.ipynb"
    nbformat.write(nb, saved)
    clean = notebook_runner._clean_input(saved)
    assert "widgets" not in clean.metadata
    assert all(c.outputs == [] and c.execution_count is None for c in clean.cells if "outputs" in c)
    assert [c.source for c in clean.cells] == [c.source for c in nb.cells]
