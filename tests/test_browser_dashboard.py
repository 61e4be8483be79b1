"""The dashboard in a real browser (Debian's Chromium driven by Playwright).

A stakeholder opens the printed URL with its token and sees the runs table and the
charts, and can pick another run; the same URL without the token lands on the login
page and shows nothing. Screenshots go to ``test-artifacts/`` (gitignored).
Skipped only when Chromium or Playwright is missing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_report import build_demo_store

from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import ServerProcess
from widgets import launchers as servers
from widgets import report

CHROMIUM = Path("/usr/bin/chromium")
if shutil.which(str(CHROMIUM)) is None:
    pytest.skip(
        f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """Browser, driver, server and kernels all end with the module."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    extra = [p for p in me.children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(extra, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("browser") / "runs"
    ids = build_demo_store(root)
    with servers.serve_dashboard(root, log_dir=root.parent / "logs") as server:
        yield {"server": server, "root": root, **ids}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=ARGS,
            # Voila scrolls inside its own container: a tall window shows the whole page
            viewport={"width": 1400, "height": 4200},
        )
        try:
            yield context
        finally:
            context.close()


def test_without_the_token_the_dashboard_is_refused(served: dict[str, Any], browser: Any) -> None:
    server: ServerProcess = served["server"]
    page = browser.new_page()
    try:
        response = page.goto(server.base_url, timeout=TIMEOUT_MS)
        assert response is not None and response.ok  # the login page itself
        assert "/login" in page.url
        page.wait_for_selector("input[type=password]", timeout=TIMEOUT_MS)
        assert page.locator(".js-plotly-plot").count() == 0
        assert "All runs" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-without-token.png"))
    finally:
        page.close()


def test_with_the_token_the_runs_table_and_charts_show(
    served: dict[str, Any], browser: Any
) -> None:
    server: ServerProcess = served["server"]
    page = browser.new_page()
    try:
        started = time.perf_counter()
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_selector(".js-plotly-plot", timeout=TIMEOUT_MS)
        first_chart_s = time.perf_counter() - started
        page.get_by_text("All runs").wait_for(timeout=TIMEOUT_MS)
        runs_table = page.locator("table", has_text="Student size vs teacher").first
        body = runs_table.inner_text()
        assert "tiny" in body and "grid-0" in body and "completed" in body
        assert "failed" not in body  # failed runs are hidden by default, and counted
        assert "1 failed hidden" in page.locator(".foundry-hidden").first.inner_text()
        batch = page.locator("table", has_text="Settings that differ in this batch").first
        batch_body = batch.inner_text()
        assert "failed" in batch_body
        assert "<b>bold</b>" in batch_body  # a run name with HTML is shown as text, not markup

        # pick the real run: its loss chart gets one point per training step
        with RunStore(served["root"], read_only=True) as store:
            label = dict((v, k) for k, v in report.run_choices(report.runs_table(store)))[
                served["real"]
            ]
        picker = page.locator(".widget-dropdown", has_text="Run:").locator("select").first
        picker.select_option(label=label)
        loss = page.locator(
            ".js-plotly-plot", has_text="Training loss", has_not_text="runs overlaid"
        ).first
        loss.locator(".scatterlayer path.point").nth(5).wait_for(timeout=TIMEOUT_MS)
        assert page.locator(".js-plotly-plot").count() >= 5  # 4 for the run, 1 for the batch
        assert page.get_by_text("Sample generations").count() == 1

        # nothing to type into, nothing to press but the charts' own zoom/pan/download
        # tools (which run in the browser only), and no "share to Plotly Cloud" button
        widgets = page.locator(".jupyter-widgets")
        assert widgets.locator("input[type=text], textarea").count() == 0
        assert widgets.locator("button:not(.modebar-btn)").count() == 0
        assert page.locator(".modebar-btn").count() > 0
        assert page.locator('[data-title="Share chart..."]').count() == 0

        ARTIFACTS.mkdir(exist_ok=True)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        print(f"dashboard: first chart {first_chart_s:.1f} s after opening the URL")
    finally:
        page.close()


def test_exported_report_renders_offline(
    served: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    """Issue 16: the exported report opens with every outside request blocked."""
    from widgets.html_report import write_report

    target = write_report(served["root"], tmp_path / "report.html")
    blocked: list[str] = []

    def only_files(route: Any) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page = browser.new_page()
    try:
        page.route("**/*", only_files)
        page.goto(target.as_uri(), timeout=TIMEOUT_MS)
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=TIMEOUT_MS)
        traces = page.evaluate(
            "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".map(d => (d.data || []).length)"
        )
        # every chart drew (a run without a perplexity curve says so in an empty chart)
        assert len(traces) >= 5 and traces[0] == 3 and sum(traces) > len(traces), traces
        assert page.locator(".js-plotly-plot .main-svg").count() >= len(traces)
        assert page.locator(".scatterlayer .trace").count() > 0
        assert page.locator(".notice").first.is_visible()
        notices = page.locator(".notice").all_inner_texts()
        # the real run's verdict, and the grid's warning that distillation hurt there
        assert any("Distillation helped" in text for text in notices), notices
        assert any(text.startswith("Warning: Distillation did not help") for text in notices)
        assert page.locator("table.samples").first.is_visible()
        assert "⏎" in page.locator("table.samples").first.inner_text()
        # samples that read: greedy next to sampled, the history per validation, and no
        # row taller than a few lines whatever the text (newlines are shown as marks)
        heads = page.locator("table.samples").first.locator("th").all_inner_texts()
        assert heads == ["Prompt", "Model", "Greedy", "Sampled (seeded)"], heads
        assert page.locator("table.sample-history").first.is_visible()
        tallest = page.evaluate(
            "Math.max(...Array.from(document.querySelectorAll('table.samples tr'))"
            ".map(r => r.getBoundingClientRect().height))"
        )
        assert 0 < tallest < 160, tallest
        assert page.evaluate("window.__pwned === undefined")
        assert not blocked, blocked
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-offline.png"), full_page=True)
        section = page.locator(".samples-section").first
        section.screenshot(path=str(ARTIFACTS / "report-samples.png"))
    finally:
        page.close()


def test_dashboard_overlay_filter_and_hide_failed(served: dict[str, Any], browser: Any) -> None:
    server: ServerProcess = served["server"]
    page = browser.new_page()
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_selector(".js-plotly-plot", timeout=TIMEOUT_MS)
        hidden = page.locator(".foundry-hidden").first
        hidden.wait_for(timeout=TIMEOUT_MS)
        assert "1 failed hidden" in hidden.inner_text()
        runs_table = page.locator("table", has_text="Student size vs teacher").first
        assert "failed" not in runs_table.inner_text()
        page.get_by_label("hide failed runs").click()
        page.locator("table", has_text="Student size vs teacher").filter(
            has_text="failed"
        ).first.wait_for(timeout=TIMEOUT_MS)

        # overlay three runs: one chart with a trace per run, the settings that differ
        select = page.locator(".widget-select-multiple select").first
        labels = select.locator("option").all_inner_texts()
        grid = [label for label in labels if "grid-" in label][:2]
        real = [label for label in labels if label.startswith("tiny")][:1]
        select.select_option(label=[*grid, *real])
        overlay = page.locator(".js-plotly-plot", has_text="runs overlaid").first
        overlay.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function(
            "() => { const d = Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".find(e => (e.textContent||'').includes('runs overlaid'));"
            " return d && d.data && d.data.length === 3; }",
            timeout=TIMEOUT_MS,
        )
        page.locator("table.foundry-differences", has_text="loss.beta").first.wait_for(
            timeout=TIMEOUT_MS
        )
        assert page.locator('a[download="runs.csv"]').count() == 1
        widgets = page.locator(".jupyter-widgets")
        assert widgets.locator("input[type=text], textarea").count() == 0
        assert widgets.locator("button:not(.modebar-btn)").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "dashboard-overlay-filter.png"))
    finally:
        page.close()


def test_a_run_where_distillation_hurt_says_so_in_words(
    served: dict[str, Any], browser: Any
) -> None:
    """Issue 16: a grid member whose distilled student is worse than its CE-only twin shows a
    warning sentence (with the numbers and what to try), never a bare negative percentage."""
    server: ServerProcess = served["server"]
    with RunStore(served["root"], read_only=True) as store:
        choices = report.run_choices(report.runs_table(store))
        label = next(text for text, run_id in choices if run_id == served["members"][0])
        expected = report.run_warnings(store.get_run(served["members"][0]))
    assert expected and expected[0][0] == "warning", expected
    page = browser.new_page()
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_selector(".js-plotly-plot", timeout=TIMEOUT_MS)
        picker = page.locator(".widget-dropdown", has_text="Run:").locator("select").first
        picker.select_option(label=label)
        sentence = expected[0][1]  # the engine's words for this run, with its numbers
        assert sentence.startswith("Distillation did not help here"), sentence
        assert "higher than the same student trained alone (300.0 vs 200.0)" in sentence
        notice = page.locator(".notice-warning", has_text=sentence[:120]).first
        notice.wait_for(timeout=TIMEOUT_MS)
        text = notice.inner_text()
        assert text == f"Warning: {sentence}", text  # a word for the level, not colour only
        assert "Try:" in text  # and what to do about it
        ARTIFACTS.mkdir(exist_ok=True)
        notice.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        status = page.locator(".widget-html", has=notice).first
        status.screenshot(path=str(ARTIFACTS / "dashboard-warning.png"))
    finally:
        page.close()
