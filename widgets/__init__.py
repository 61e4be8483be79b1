"""Foundry's JupyterLab workbench: the control panel, live charts and result displays.

Start here (in a notebook)::

    from widgets import DistillPanel
    DistillPanel()          # a form, Start/Cancel, live loss and memory charts

Headless notebooks (papermill, nbval) use :func:`run_headless`, which waits for the run
and leaves static charts and a summary in the executed notebook. The engine
(``foundry_kernel``) never imports this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported lazily: the Voila dashboard kernel imports ``widgets.dashboard`` on every page
# load and must not pay for (or expose) the control panel.
_EXPORTS = {
    "CompareChart": "widgets.charts",
    "LiveCharts": "widgets.charts",
    "decimate": "widgets.charts",
    "NotebookRunError": "widgets.display",
    "run_headless": "widgets.display",
    "show_run": "widgets.display",
    "summary_html": "widgets.display",
    "PANEL_FIELDS": "widgets.form",
    "ConfigForm": "widgets.form",
    "is_headless": "widgets.frontend",
    "DistillPanel": "widgets.panel",
    "RunView": "widgets.panel",
}

if TYPE_CHECKING:
    from widgets.charts import CompareChart, LiveCharts, decimate
    from widgets.display import NotebookRunError, run_headless, show_run, summary_html
    from widgets.form import PANEL_FIELDS, ConfigForm
    from widgets.frontend import is_headless
    from widgets.panel import DistillPanel, RunView

__all__ = [
    "PANEL_FIELDS",
    "CompareChart",
    "ConfigForm",
    "DistillPanel",
    "LiveCharts",
    "NotebookRunError",
    "RunView",
    "decimate",
    "is_headless",
    "run_headless",
    "show_run",
    "summary_html",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
