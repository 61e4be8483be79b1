"""Is anyone watching? Deciding between live widgets and static output.

A live ``FigureWidget`` in a notebook executed by papermill or nbval is saved as a widget
reference that nothing can render later, so an executed notebook would lose its charts.
Headless kernels must therefore display static figures instead. A kernel cannot ask
whether a browser is attached, so the decision uses what the launcher leaves behind:
Jupyter Server sets ``JPY_SESSION_NAME`` for every notebook session it starts (JupyterLab,
Notebook 7); papermill, nbval and plain ``jupyter_client`` users do not. The operator can
force either mode with ``FOUNDRY_HEADLESS=1`` / ``FOUNDRY_HEADLESS=0``.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["PLOTLY_MIMETYPE", "in_ipython", "is_headless", "show_static", "static_bundle"]

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _shell() -> Any:
    """The running IPython shell, or None outside IPython (scripts, pytest)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def in_ipython() -> bool:
    """Whether display() calls go anywhere (an IPython shell or kernel is running)."""
    return _shell() is not None


def is_headless() -> bool:
    """True when no frontend can show live widgets (see the module docstring)."""
    flag = os.environ.get("FOUNDRY_HEADLESS", "").strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE:
        return False
    shell = _shell()
    if shell is None or getattr(shell, "kernel", None) is None:
        return True
    return not os.environ.get("JPY_SESSION_NAME")


_plotlyjs_shown = False  # one kernel runs one notebook: plotly.js goes in its first chart


def static_bundle(figure: Any, *, include_plotlyjs: bool | None = None) -> dict[str, Any]:
    """A figure as one display output: the plotly JSON mimetype (JupyterLab's plotly
    extension renders it), HTML for everything else (nbconvert, nbviewer, a browser
    opening the exported notebook) and a text title. No image export, so no kaleido.

    The HTML of the kernel's first figure embeds plotly.js inline (from the installed
    plotly package) and later ones reuse it: loading it from the CDN left the headless
    output notebook's charts blank offline. ``include_plotlyjs`` forces either way.
    """
    global _plotlyjs_shown
    embed = not _plotlyjs_shown if include_plotlyjs is None else include_plotlyjs
    title = figure.layout.title.text or "figure"
    bundle = {
        PLOTLY_MIMETYPE: json.loads(figure.to_json()),
        "text/html": figure.to_html(include_plotlyjs=embed, full_html=False),
        "text/plain": f"<plotly figure: {title}>",
    }
    _plotlyjs_shown = _plotlyjs_shown or embed
    return bundle


def show_static(figure: Any) -> None:
    """Display a plotly figure as static output that survives in a saved notebook.

    Built by hand rather than with ``fig.show(renderer=...)``, which re-emits its
    plotly.js loader as an extra output before every figure. Outside IPython there is
    nowhere to display to, so this does nothing.
    """
    if not in_ipython():
        return
    from IPython.display import display

    display(static_bundle(figure), raw=True)
