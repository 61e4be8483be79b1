"""Users' strings on the dashboard are text, in a real browser (issue 15, findings 7 and 9).

Run names, grid values, samples and metric names hold HTML and script payloads
(``test_report.PAYLOADS``: ``<a href>``, ``<img onerror>``, ``<script>``, ``<b>``,
``javascript:`` links, ``</text><a>``, ``<span style>``, entities); the runs folder also
holds rows damaged with plain sqlite3. The dashboard is served by Voila and opened in
Debian's Chromium (Playwright), and the test asserts what a viewer would get: no link
inside any plot, no element made from a payload, no dialog or popup, no script run, and
every payload visible as its own characters; the damaged rows are listed, flagged.

A control experiment first shows, with the same plotly.js build the dashboard uses, that
plotly *does* turn these strings into markup when they are not escaped (a live
``<a href>``, styled text, ``&lt;`` shown as ``<``), so the assertions can fail.
Skipped only when Chromium or Playwright is missing (as ``test_browser_dashboard``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plotly
import pytest
from test_browser_dashboard import (  # the module skips itself without Chromium/Playwright
    ARTIFACTS,
    TIMEOUT_MS,
    browser,  # noqa: F401  (fixture: one Chromium for the module)
    nothing_left_running,  # noqa: F401  (autouse fixture: no process outlives the module)
)
from test_report import EXPECTED_DAMAGE, PAYLOADS, add_damaged_rows, build_payload_store

from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import ServerProcess
from widgets import launchers as servers
from widgets import report
from widgets.plot_text import plot_text

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
"""plotly.js 4.1.1, the build jupyterlab-plotly bundles for the dashboard's charts."""

# What a payload would leave in the page if it were markup. Run inside the page.
_FINDINGS_JS = """
(root) => {
  const scope = root ? document.querySelectorAll(root) : [document];
  const inPlots = (sel) => [...scope].flatMap((el) => [...el.querySelectorAll(sel)]);
  const everywhere = (sel) => [...document.querySelectorAll(sel)];
  const attrs = (el) => [...el.attributes].map((a) => a.name);
  // the dashboard's own downloads: data: links it builds (a payload is escaped text)
  const ours = (el) => el.matches('a.foundry-download[download][href^="data:"]');
  return {
    links: inPlots('a').filter((a) => !a.classList.contains('modebar-btn') && !ours(a))
      .map((a) => a.outerHTML.slice(0, 200)),
    hrefs: inPlots('*').filter((el) => !el.classList.contains('modebar-btn') && !ours(el))
      .filter((el) => attrs(el).some((n) => /(^|:)href$/.test(n)))
      .map((el) => el.outerHTML.slice(0, 200)),
    styled_text: inPlots('tspan[style]').map((el) => el.outerHTML.slice(0, 200)),
    handlers: everywhere('*').filter((el) => attrs(el).some((n) => /^on/.test(n)))
      .map((el) => el.outerHTML.slice(0, 200)),
    payload_elements: everywhere('img[src="x"], iframe, svg[onload], span[style*="90px"]')
      .map((el) => el.outerHTML.slice(0, 200)),
    scripts: everywhere('script').filter((s) => s.textContent.includes('__pwned')).length,
    pwned: window.__pwned === undefined ? null : String(window.__pwned),
  };
}
"""


def _clean(findings: dict[str, Any]) -> bool:
    return not any(findings[key] for key in findings if key != "pwned") and not findings["pwned"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("escaping") / "runs"
    ids = build_payload_store(root)
    ids["damaged"] = add_damaged_rows(root)
    with servers.serve_dashboard(root, log_dir=root.parent / "logs") as server:
        yield {"server": server, "root": root, **ids}


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:  # noqa: F811  (the imported fixture)
    """A fresh page that records every dialog, popup and page error."""
    opened = browser.new_page()
    events: dict[str, list[str]] = {"dialogs": [], "popups": [], "errors": []}

    def on_dialog(dialog: Any) -> None:
        events["dialogs"].append(dialog.message)
        dialog.dismiss()

    opened.on("dialog", on_dialog)
    opened.on("popup", lambda popup: events["popups"].append(popup.url))
    opened.on("pageerror", lambda error: events["errors"].append(str(error)))
    opened.events = events
    try:
        yield opened
    finally:
        opened.close()


def _plot(page: Any, data: list[dict[str, Any]], layout: dict[str, Any]) -> None:
    page.evaluate(
        "([data, layout]) => Plotly.newPlot(document.getElementById('plot'), data, layout)",
        [data, layout],
    )


def test_plotly_renders_unescaped_labels_as_markup_and_escaped_ones_as_text(page: Any) -> None:
    """The rules the fix relies on, checked on plotly.js itself: tags in titles, tick
    labels and legends become markup (a live https link, bold/styled text), entities are
    decoded (``&lt;`` shows as ``<``); escaping ``& < >`` shows every string verbatim."""
    page.set_content('<div id="plot" style="width:900px;height:500px"></div>')
    page.add_script_tag(path=str(PLOTLY_JS))
    labels = list(PAYLOADS)

    def figure(text: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        data = [{"type": "bar", "x": [text(p) for p in labels], "y": list(range(len(labels)))}]
        data.append({"type": "scatter", "x": [text(labels[0])], "y": [0], "name": text(labels[0])})
        return data, {"title": {"text": text(labels[3])}, "showlegend": True}

    _plot(page, *figure(lambda s: s))
    raw = page.evaluate(_FINDINGS_JS, "#plot")
    # what the penetration test saw: a live link that opens in a new tab (plotly itself
    # drops the javascript: one, but not an https one)
    phish = 'target="_blank" xlink:href="https://evil.example/phish"'
    assert any(phish in link for link in raw["links"]), raw["links"]
    assert not any("javascript:" in link for link in raw["hrefs"])
    assert raw["styled_text"], raw  # <b>, <i>, <sup>, <span style> became styled text
    ticks = page.locator("#plot .xtick text").all_text_contents()
    assert any("<b>entity</b>" in t for t in ticks), ticks  # &lt; was decoded to <

    _plot(page, *figure(plot_text))
    escaped = page.evaluate(_FINDINGS_JS, "#plot")
    assert _clean(escaped), escaped
    ticks = page.locator("#plot .xtick text").all_text_contents()
    assert ticks == labels  # every payload, character for character
    assert labels[0] in page.locator("#plot .legendtext").all_text_contents()
    assert page.locator("#plot .gtitle").text_content() == labels[3]
    assert not page.events["dialogs"] and not page.events["popups"]


def test_the_dashboard_shows_payloads_as_text_and_damaged_rows_flagged(
    served: dict[str, Any], page: Any
) -> None:
    server: ServerProcess = served["server"]
    started = time.perf_counter()
    page.goto(server.url, timeout=TIMEOUT_MS)
    batch = page.locator(".js-plotly-plot", has_text="Batch members").first
    batch.wait_for(timeout=TIMEOUT_MS)
    ticks = batch.locator(".xtick text")
    page.wait_for_function(
        "n => document.querySelectorAll('.js-plotly-plot .xtick').length >= n",
        arg=len(PAYLOADS),
        timeout=TIMEOUT_MS,
    )
    rendered_s = time.perf_counter() - started

    # the batch chart's categories (name and grid value): ticks and hover, verbatim
    with RunStore(served["root"], read_only=True) as store:
        rows = report.batch_comparison(store, "b-payloads")
        choices = dict(report.run_choices(report.runs_table(store)))
    tick_text = ticks.all_text_contents()
    for payload in PAYLOADS:
        assert any(payload in t for t in tick_text), (payload, tick_text)
    batch.locator(".point path").first.hover(force=True)  # plotly listens on its drag layer
    hover = page.locator(".hoverlayer .hovertext").first
    hover.wait_for(timeout=TIMEOUT_MS)
    assert rows[0]["name"] in (hover.text_content() or "")

    # one payload run in detail: its memory chart's legend holds every payload
    label = next(label for label, run_id in choices.items() if run_id == served["members"][0])
    picker = page.locator(".widget-dropdown", has_text="Run:").locator("select").first
    picker.select_option(label=label)
    memory = page.locator(".js-plotly-plot", has_text="Memory use").first
    legend = memory.locator(".legendtext")
    page.wait_for_function(
        "n => [...document.querySelectorAll('.js-plotly-plot')].some(p =>"
        " p.textContent.includes('Memory use') && p.querySelectorAll('.legendtext').length >= n)",
        arg=len(PAYLOADS),
        timeout=TIMEOUT_MS,
    )
    legend_text = legend.all_text_contents()
    for payload in PAYLOADS:
        assert report.metric_label(f"mem/{payload}_mb") in legend_text, (payload, legend_text)

    # tables: escaped as before, and the damaged rows listed with what is wrong
    runs_table = page.locator("table", has_text="Student size vs teacher").first
    text = runs_table.inner_text()
    for payload in PAYLOADS:
        assert payload in text, payload
    assert "Damaged record" in text
    for name in served["damaged"]:
        assert EXPECTED_DAMAGE[name] in text, name
    samples = page.locator("table", has_text="Prompt").last.inner_text()
    assert PAYLOADS[0] in samples

    page.wait_for_timeout(500)  # let anything a payload could have started run
    findings = page.evaluate(_FINDINGS_JS, ".js-plotly-plot")
    assert _clean(findings), findings
    whole_page = page.evaluate(_FINDINGS_JS, ".jp-OutputArea, .widget-html")
    assert _clean(whole_page), whole_page
    assert page.events == {"dialogs": [], "popups": [], "errors": []}
    assert not re.search(r"Traceback|Error:", page.locator("body").inner_text())

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-payloads.png"))
    report_line = {"rendered_s": round(rendered_s, 1), "payloads": len(PAYLOADS)}
    print(f"payload dashboard: {json.dumps(report_line)}")
