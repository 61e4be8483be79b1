"""Foundry's JupyterLab workbench: the control panel, live charts and result displays.

Start here (in a notebook)::

    from widgets import DistillPanel
    DistillPanel()          # a form, Start/Cancel, live loss and memory charts

Headless notebooks (papermill, nbval) use :func:`run_headless`, which waits for the run
and leaves static charts and a summary in the executed notebook. The engine
(``foundry_kernel``) never imports this package.
"""

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
