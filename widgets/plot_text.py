"""Text for Plotly figures: every string a figure shows is shown as text, never as markup.

Why this exists: plotly.js renders a subset of HTML in titles, axis titles, tick labels
(a bar chart's categories), legends, annotations and hover labels: ``<br>``, ``<b>``,
``<i>``, ``<em>``, ``<s>``, ``<u>``, ``<sup>``, ``<sub>``, ``<span style=...>`` and
``<a href=...>``, the last one as a live link opening in a new tab. A run name or a grid
value such as ``<a href="https://evil.example/phish">results</a>`` typed by one user
therefore became a link on every viewer's dashboard (issue 15, finding 7). HTML tables
were escaped already; figures are a second renderer with its own rules.

The rule plotly.js follows (``svg_text_utils``): it first splits a string into tags and
the text between them, then decodes entities *in the text parts only*: ``&lt;``, ``&gt;``,
``&amp;``, ``&nbsp;``, ``&mu;``, ``&times;``, ``&plusmn;``, ``&deg;`` and numeric ones.
So escaping ``&``, ``<`` and ``>`` makes it show exactly the original characters and
never see a tag. Quotes are left as they are: outside a tag they mean nothing, and
plotly does not decode ``&quot;`` (it would show those six characters).

Every chart builder passes the figure's whole description (layout and traces) through
:func:`plot_safe` at the one place it leaves Python (``widgets.dashboard.chart``, and
``ChartSet`` when it creates a figure or a trace), rather than escaping strings one by
one where they are made: a label added later is covered without anyone remembering.
Builders therefore put plain text into figures, never markup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["plot_safe", "plot_text"]

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def plot_text(text: str) -> str:
    """``text`` as Plotly will show it literally: ``&``, ``<`` and ``>`` as entities."""
    return text.translate(_ESCAPES)


def plot_safe(value: Any) -> Any:
    """A copy of a figure description (dicts, lists, arrays) with every string escaped.

    Numbers, booleans, None and numeric arrays are returned as they are (an array is not
    copied); arrays of strings or objects (categories) are escaped element by element.
    """
    if isinstance(value, str):
        return plot_text(value)
    if isinstance(value, Mapping):
        return {key: plot_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plot_safe(item) for item in value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        items = [plot_safe(item) for item in value.ravel().tolist()]
        return np.array(items, dtype=object).reshape(value.shape)
    return value
