"""End to end in a real browser: JupyterLab, distill.ipynb, Start, live chart, Cancel.

Debian's Chromium (``/usr/bin/chromium``) driven by Playwright; a tool's own browser
download cannot work here. The server runs on 127.0.0.1 with a token, its own settings,
workspaces, runs and Jupyter folders, and is stopped (terminate, wait, kill) whatever
happens. Screenshots go to ``test-artifacts/browser-lab/``.

This is the proof of the panel's update path: every cell has finished when Start is
pressed, and the loss chart still gains points (the panel's updater thread pushes them
through the kernel's IOPub thread) and Cancel still lands (a widget callback served
while the run trains in its worker thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_notebook_runner import NOTEBOOK, tiny_overrides

from foundry_kernel.store import RunStore

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser-lab"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_MS = 180_000  # generous: 2 shared cores, a kernel importing torch and transformers

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is missing (pip install playwright)"
)
pytest.importorskip("jupyterlab")
pytest.importorskip("papermill")

TRACE_POINTS_JS = """
([chart, name, min]) => {
  const plots = document.querySelectorAll(`.foundry-run .foundry-chart-${chart} .js-plotly-plot`);
  for (const el of plots) {
    const trace = (el.data || []).find((t) => t.name === name);
    if (trace && trace.y && trace.y.length >= min) return trace.y.length;
  }
  return false;
}
"""
"""Points of one trace as plotly.js holds them in the browser (false until ``min``)."""


def _points(page: Any, chart: str, name: str, at_least: int) -> int:
    """Wait until a trace in the browser has ``at_least`` points; return how many."""
    return int(page.wait_for_function(TRACE_POINTS_JS, arg=[chart, name, at_least]).json_value())


COMPARE_POINTS_JS = """
([suffix, min]) => {
  for (const el of document.querySelectorAll('.foundry-chart-compare .js-plotly-plot')) {
    const trace = (el.data || []).find((t) => (t.name || '').endsWith(suffix));
    if (trace && trace.y && trace.y.length >= min) return trace.y.length;
  }
  return false;
}
"""
"""Points of the compare chart's trace whose name ends with ``suffix``."""


def _compare_points(page: Any, suffix: str, at_least: int) -> int:
    """Wait until the compare chart's trace has ``at_least`` points; return how many."""
    found = page.wait_for_function(COMPARE_POINTS_JS, arg=[suffix, at_least])
    return int(found.json_value())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LONG_RUN = {"eval.every_steps": 10_000, "eval.max_batches": 1}
"""A run that trains until Cancel and does not evaluate on the way."""


def _prepare_root(root: Path, runs_dir: Path, extra: dict[str, Any] = LONG_RUN) -> Path:
    """A copy of distill.ipynb with small, long-running parameters (Cancel stops it)."""
    import papermill

    overrides = tiny_overrides(**extra)
    target = root / "distill.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(target),
        parameters={
            "config_overrides": overrides,
            "max_steps": 100_000,
            "runs_dir": str(runs_dir),
        },
        prepare_only=True,
        progress_bar=False,
    )
    return target


def _lab_settings(settings: Path) -> None:
    """No news or update toasts over the notebook."""
    folder = settings / "@jupyterlab" / "apputils-extension"
    folder.mkdir(parents=True)
    (folder / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8"
    )


def _server_env(tmp: Path, runs_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.pop("FOUNDRY_HEADLESS", None)
    env.update(
        FOUNDRY_RUNS_DIR=str(runs_dir),
        FOUNDRY_SHUTDOWN_GRACE_S="3",
        JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"),
        JUPYTER_DATA_DIR=str(tmp / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
        IPYTHONDIR=str(tmp / "ipython"),
    )
    return env


def _wait_for_server(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def lab(tmp_path: Path, tiny_teacher_dir: Path, request: Any) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on 127.0.0.1 with a token, serving a prepared distill.ipynb
    (its overrides: ``LONG_RUN``, or the test's ``@pytest.mark.parametrize("lab", [...],
    indirect=True)``)."""
    root = tmp_path / "root"
    root.mkdir()
    runs_dir = tmp_path / "runs"
    _prepare_root(root, runs_dir, getattr(request, "param", LONG_RUN))
    settings, workspaces = tmp_path / "settings", tmp_path / "workspaces"
    _lab_settings(settings)
    workspaces.mkdir()
    token, port = secrets.token_hex(16), _free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={workspaces}",
        f"--LabApp.user_settings_dir={settings}",
    ]
    log = tmp_path / "lab.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, cwd=root, env=_server_env(tmp_path, runs_dir), stdout=sink, stderr=sink
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_for_server(f"{base}/api/status?token={token}", proc, log)
            yield {"base": base, "token": token, "runs_dir": runs_dir, "log": log, "root": root}
        finally:
            _stop(proc)


def _shot(page: Any, name: str, show: str | None = None) -> None:
    """Screenshot after scrolling ``show`` into view (the notebook scrolls, not the page).
    A live view re-renders its HTML at each refresh, so the element found may be replaced
    before it scrolls: it is looked up again, a few times."""
    if show is not None:
        for attempt in range(3):
            try:
                page.locator(show).first.scroll_into_view_if_needed(timeout=30_000)
                break
            except sync_api.Error:
                if attempt == 2:
                    raise
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


@contextlib.contextmanager
def _browser_page(profile: Path, failure_shot: str) -> Iterator[Any]:
    """A page of a fresh headless chromium; a screenshot named ``failure_shot`` if the
    body fails, and the browser closed either way."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1100},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(STEP_MS)
            yield page
        except BaseException:
            if context.pages:
                _shot(context.pages[0], failure_shot)
            raise
        finally:
            context.close()


def test_start_watch_and_cancel_a_run_in_jupyterlab(lab: dict[str, Any], tmp_path: Path) -> None:
    url = f"{lab['base']}/lab/tree/distill.ipynb?reset&token={lab['token']}"
    with _browser_page(tmp_path / "profile", "failure.png") as page:
        _drive(page, url, lab)


def _run_all_cells(page: Any) -> None:
    """Run > Run All Cells, retried: the menu item stays disabled until the notebook is
    the shell's current widget, and a click on it then does nothing."""
    executing = ".jp-InputPrompt:has-text('[*]'), .jp-InputPrompt:has-text('[1]')"
    for _attempt in range(3):
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        item = page.locator(".lm-Menu-item:not(.lm-mod-disabled)", has_text="Run All Cells")
        try:
            item.first.click(timeout=10_000)
            page.wait_for_selector(executing, timeout=20_000)
            return
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
    raise AssertionError("Run All Cells did not start the notebook")


def _open_panel(page: Any, url: str) -> Any:
    """The notebook at ``url`` run to its idle panel; returns the panel's Start button."""
    page.goto(url)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    _run_all_cells(page)
    start = page.locator(".foundry-panel button", has_text="Start")
    start.wait_for(state="visible")
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    return start


def _drive(page: Any, url: str, lab: dict[str, Any]) -> None:
    start = _open_panel(page, url)
    _shot(page, "01-panel.png", ".foundry-panel")
    assert start.is_enabled()

    start.click()
    first = _points(page, "loss", "train loss", 2)
    _points(page, "loss", "train loss", first + 2)  # it keeps gaining points
    memory = _points(page, "memory", "process RSS", 2)
    _points(page, "memory", "process RSS", memory + 2)  # the memory chart moves too
    status = page.locator(".foundry-run .foundry-status").first
    assert "running" in status.inner_text()
    _shot(page, "02-training.png", ".foundry-run .foundry-chart-loss")
    _shot(page, "02b-memory.png", ".foundry-run .foundry-chart-memory")

    page.locator(".foundry-panel button", has_text="Cancel").click()
    page.wait_for_selector('.foundry-run .foundry-status [data-state="cancelled"]')
    page.wait_for_selector(".foundry-run .foundry-outcome .foundry-warning")
    _shot(page, "03-cancelled.png", ".foundry-run .foundry-chart-loss")
    assert _points(page, "loss", "train loss", first + 2)  # the chart is kept

    with RunStore(lab["runs_dir"], read_only=True) as store:
        (record,) = store.list_runs()
    assert record.state == "cancelled"


def test_compare_tab_and_a_page_reload_keep_the_curves(lab: dict[str, Any], tmp_path: Path) -> None:
    """The compare tab overlays the live run, and a reload redraws every chart from the
    kernel (it used to show an empty compare plot, and empty axes after a reload)."""
    url = f"{lab['base']}/lab/tree/distill.ipynb?reset&token={lab['token']}"
    with _browser_page(tmp_path / "profile", "failure-reload.png") as page:
        _drive_compare_and_reload(page, url, lab["root"] / "distill.ipynb")


def _typed_values_are_kept(page: Any, start: Any) -> None:
    """A bad number stays as typed, with the error beside it (bounded boxes used to
    clamp lr=-0.01 to 0 in the browser and blame 0.0), and Start stays off until fixed."""
    box = page.locator(".foundry-field-optim-lr input").first
    was = box.input_value()
    box.fill("-0.01")
    box.press("Tab")
    error = page.locator(".foundry-field-optim-lr .foundry-field-error")
    error.filter(has_text="-0.01").wait_for()
    assert box.input_value() == "-0.01" and start.is_disabled()
    _shot(page, "07-form-keeps-the-typed-value.png", ".foundry-field-optim-lr")
    box.fill(was)
    box.press("Tab")
    page.wait_for_function("(el) => !el.disabled", arg=start.element_handle())
    assert box.input_value() == was


def _saved_with_widgets(notebook: Path) -> bool:
    """Whether the file on disk holds the panel's widget view (saved after Run All)."""
    return "application/vnd.jupyter.widget-view+json" in notebook.read_text(encoding="utf-8")


def _drive_compare_and_reload(page: Any, url: str, notebook: Path) -> None:
    page.goto(url)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    start = page.locator(".foundry-panel button", has_text="Start")
    for attempt in range(2):
        _run_all_cells(page)
        try:
            start.wait_for(state="visible", timeout=90_000 if attempt == 0 else STEP_MS)
            break
        except sync_api.TimeoutError:
            # Lab sometimes starts two kernels for one new session and the cells queued
            # on the one it drops never run (no execution count): run them again
            assert page.locator(".jp-InputPrompt:has-text('[1]')").count() == 0
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    _typed_values_are_kept(page, start)
    start.click()
    first = _points(page, "loss", "train loss", 2)

    # the compare tab, selected while the run trains: it holds the run and keeps growing
    page.locator(".foundry-panel .lm-TabBar-tab", has_text="compare").click()
    seen = _compare_points(page, " train", 2)
    seen = _compare_points(page, " train", seen + 2)
    _shot(page, "04-compare-live.png", ".foundry-panel .foundry-chart-compare")

    # save (the widget views are outputs of the file) and reload: the curves come back
    # from the kernel's state, with every point so far, and still move
    deadline = time.monotonic() + 60
    while not _saved_with_widgets(notebook):
        assert time.monotonic() < deadline, "the notebook was not saved"
        page.locator(".jp-Notebook .jp-InputPrompt").first.click()
        page.keyboard.press("Escape")
        page.keyboard.press("Control+s")
        time.sleep(2)
    page.reload()
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    # Lab renders the outputs of cells out of view lazily: show the panel's cell
    page.locator(".jp-Cell", has_text="DistillPanel(config)").scroll_into_view_if_needed()
    page.locator(".foundry-panel .foundry-chart-compare").first.scroll_into_view_if_needed()
    after = _compare_points(page, " train", seen)
    _compare_points(page, " train", after + 2)
    _shot(page, "05-compare-after-reload.png", ".foundry-panel .foundry-chart-compare")
    page.locator(".foundry-panel .lm-TabBar-tab", has_text="#1").click()
    # the run tab's chart comes back with its points (its growing after the reload while
    # it was hidden failed once in seven loaded runs: open in issue 16, not asserted here)
    _points(page, "loss", "train loss", first + 2)
    _shot(page, "06-loss-after-reload.png", ".foundry-run .foundry-chart-loss")

    page.locator(".foundry-panel button", has_text="Cancel").click()
    page.wait_for_selector('.foundry-run .foundry-status [data-state="cancelled"]')


EVAL_ROWS_JS = """
(min) => {
  const rows = document.querySelectorAll('.foundry-run .foundry-evals tbody tr');
  return rows.length >= min ? rows.length : false;
}
"""
"""Rows of the run's evaluation table in the page (false until ``min``)."""

STATUS_JS = """
(el) => /running · distill · \\d+\\/100000 steps/.test(el.innerText) && el.innerText.includes(' < ')
"""
"""The status line of a training run: phase, n/N and elapsed < ETA (it updates every
refresh, so the test waits for the line rather than reading it once)."""

VISIBLE_JS = """(el) => getComputedStyle(el).visibility === 'visible'"""

LOG_TAIL_JS = """
() => {
  const box = document.querySelector('.foundry-run .foundry-log .foundry-log-tail');
  if (!box) return false;
  const pre = box.querySelector('pre').getBoundingClientRect();
  const view = box.getBoundingClientRect();
  return pre.bottom <= view.bottom + 1;  // the end of the log (its newest line) is in view
}
"""


@pytest.mark.parametrize(
    "lab", [{"eval.every_steps": 2, "eval.max_batches": 1}], indirect=True, ids=["evals"]
)
def test_a_live_run_shows_its_progress_line_and_a_growing_eval_table(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """While the run trains: the progress line (phase, n/N, elapsed < ETA), the bar, and
    the evaluation table gaining a row at each evaluation, the best one starred."""
    url = f"{lab['base']}/lab/tree/distill.ipynb?reset&token={lab['token']}"
    with _browser_page(tmp_path / "profile", "failure-evaltable.png") as page:
        start = _open_panel(page, url)
        # forward KL: beta does not apply, and says so
        beta = page.locator(".foundry-field-loss-beta input").first
        assert beta.is_disabled()
        assert "loss.kind=jsd" in page.locator(".foundry-field-loss-beta").first.inner_text()
        start.click()
        rows = int(page.wait_for_function(EVAL_ROWS_JS, arg=2).json_value())
        assert rows >= 2
        status = page.locator(".foundry-run .foundry-status").first
        page.wait_for_function(STATUS_JS, arg=status.element_handle())
        text = status.inner_text()
        assert "running" in text and "distill" in text and "/100000" in text, text
        assert " < " in text, text  # elapsed < ETA
        bar = page.locator(".foundry-run .foundry-progress-bar").first
        page.wait_for_function(VISIBLE_JS, arg=bar.element_handle())
        table = page.locator(".foundry-run .foundry-evals").first
        assert "★" in table.inner_text() and "val ppl" in table.inner_text()
        assert "a run is in progress" in page.locator(".foundry-start-reason").inner_text()
        assert page.wait_for_function(LOG_TAIL_JS).json_value()
        _shot(page, "panel-progress-evaltable.png", ".foundry-run .foundry-evals")
        memory = page.locator(".foundry-run .foundry-memory").first.inner_text()
        assert "process RSS" in memory and "preflight estimate" in memory, memory
        _shot(page, "panel-memory-estimate.png", ".foundry-run .foundry-memory")
        page.locator(".foundry-panel button", has_text="Cancel").click()
        page.wait_for_selector('.foundry-run .foundry-status [data-state="cancelled"]')
        assert page.locator(".foundry-run .foundry-evals tbody tr").count() >= rows


PANEL_TRACE_JS = """
([index, prefix, min]) => {
  const panel = document.querySelectorAll('.foundry-panel')[index];
  if (!panel) return false;
  for (const el of panel.querySelectorAll('.foundry-chart-compare .js-plotly-plot')) {
    const trace = (el.data || []).find(
      (t) => (t.name || '').startsWith(prefix) && (t.name || '').endsWith(' train')
        && t.visible !== false);
    if (trace && trace.y && trace.y.length >= min) return trace.y.length;
  }
  return false;
}
"""
"""Points of the train curve whose name starts with ``prefix`` on panel ``index``'s
compare chart (false until ``min``)."""


def _panel_points(page: Any, index: int, prefix: str, at_least: int) -> int:
    found = page.wait_for_function(PANEL_TRACE_JS, arg=[index, prefix, at_least])
    return int(found.json_value())


def _cli_run(runs_dir: Path, tmp_path: Path) -> str:
    """``foundry distill`` into the Lab's store (a terminal beside the notebook)."""
    import yaml
    from conftest import tiny_config_dict

    cfg = tiny_config_dict(
        runs_dir,
        limits={"max_steps": 12},
        eval={"every_steps": 4, "baseline": False},
        checkpoint={"every_steps": None},
    )
    cfg["name"] = "from-cli"
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "foundry_kernel.cli", "distill", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(json.loads(proc.stdout)["run_id"])


def _add_second_panel(notebook: Path) -> None:
    """A second panel in a cell below the first (a user comparing two settings)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    at = next(
        i for i, c in enumerate(nb["cells"]) if "DistillPanel(config)" in "".join(c["source"])
    )
    cell = {
        "cell_type": "code",
        "execution_count": None,
        "id": "second-panel",
        "metadata": {},
        "outputs": [],
        "source": [
            "if not headless:\n",
            "    second = DistillPanel(config)\n",
            "    display(second.widget)",
        ],
    }
    nb["cells"].insert(at + 1, cell)
    notebook.write_text(json.dumps(nb), encoding="utf-8")


def test_the_compare_tab_overlays_another_panels_run_and_a_cli_run(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 16: one panel's compare tab with its own live run, the live run of a second
    panel and a run ``foundry distill`` finished in the same store, all on one chart; the
    other panel's run keeps moving there (read from the store)."""
    cli_id = _cli_run(lab["runs_dir"], tmp_path)
    _add_second_panel(lab["root"] / "distill.ipynb")
    url = f"{lab['base']}/lab/tree/distill.ipynb?reset&token={lab['token']}"
    with _browser_page(tmp_path / "profile", "failure-compare-store.png") as page:
        page.goto(url)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        _run_all_cells(page)
        panels = page.locator(".foundry-panel")
        panels.nth(1).wait_for(state="visible")
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        first, second = panels.nth(0), panels.nth(1)

        first.locator("button", has_text="Start").click()
        _points(page, "loss", "train loss", 2)
        second.scroll_into_view_if_needed()
        second.locator("button", has_text="Start").click()
        second.locator(".foundry-run .foundry-status").first.wait_for()

        second.locator(".lm-TabBar-tab", has_text="compare").click()
        second.locator("button", has_text="Refresh list").click()
        picker = second.locator(".foundry-compare-picker select")
        page.wait_for_function(  # the list re-read: the first panel's run is in it now
            "(el) => el.options.length >= 2", arg=picker.element_handle()
        )
        labels = [t.replace("\xa0", " ") for t in picker.locator("option").all_inner_texts()]
        chosen = [i for i, t in enumerate(labels) if "from-cli" in t or "· running ·" in t]
        assert len(chosen) == 2, labels  # the CLI's run and the first panel's live one
        picker.select_option(index=chosen)

        _panel_points(page, 1, f"from-cli ({cli_id[-6:]})", 12)  # all its 12 steps
        own = _panel_points(page, 1, "#2 ", 2)
        other = _panel_points(page, 1, "#1 ", 2)
        _panel_points(page, 1, "#1 ", other + 2)  # the other panel's run moves here too
        _panel_points(page, 1, "#2 ", own + 2)
        second.locator(".foundry-chart-compare").first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        second.locator(".foundry-compare").first.screenshot(
            path=str(ARTIFACTS / "08-compare-two-panels-and-cli.png")
        )

        for panel in (first, second):
            panel.locator("button", has_text="Cancel").click()
        page.wait_for_function(
            "() => document.querySelectorAll("
            "'.foundry-run .foundry-status [data-state=\"cancelled\"]').length >= 2"
        )
