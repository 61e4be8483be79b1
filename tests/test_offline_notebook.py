"""Issue 16: the headless output notebook's charts render offline.

Static charts used to load plotly.js from its CDN, so an executed notebook opened without
network showed empty boxes. A tiny notebook executed by papermill (a headless kernel, as
``foundry run`` uses) shows two charts through :func:`widgets.frontend.show_static`; its
saved outputs must hold plotly.js exactly once and load nothing from outside.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

papermill = pytest.importorskip("papermill", reason="papermill is not installed")

CELL = """
import plotly.graph_objects as go
from widgets.frontend import show_static
for title in ("first", "second"):
    show_static(go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]), layout={"title": title}))
"""


def test_executed_notebook_embeds_plotlyjs_once_and_no_cdn(tmp_path: Path) -> None:
    from plotly.offline import get_plotlyjs

    source = tmp_path / "tiny.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, source)
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(source), str(out), kernel_name="python3", progress_bar=False)
    outputs = nbformat.read(out, as_version=4).cells[0].outputs
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(pages) == 2
    bundle = get_plotlyjs()
    assert bundle in pages[0] and bundle not in pages[1]  # embedded once, reused after
    text = json.dumps([p.replace(bundle, "") for p in pages])
    assert "cdn.plot.ly" not in text and "<script src" not in text
    assert all("Plotly.newPlot" in page for page in pages)
