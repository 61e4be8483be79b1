"""The notebooks Foundry ships as package data, found through :mod:`importlib.resources`.

Why package data and not a folder beside the source tree: after ``pip install foundry``
(a wheel, or a non-editable install) there is no source tree, and ``foundry dashboard`` /
``foundry run distill`` must still find their notebooks. ``importlib.resources`` finds them
in a wheel, an editable install and a checkout alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED_NOTEBOOKS", "shipped_notebook"]

SHIPPED_NOTEBOOKS = ("distill", "dashboard")


def shipped_notebook(name: str) -> Path:
    """The path of a shipped notebook by name (``"distill"``, ``"dashboard"``)."""
    stem = name.removesuffix(".ipynb")
    if stem not in SHIPPED_NOTEBOOKS:
        raise KeyError(f"no shipped notebook {name!r}; shipped: {', '.join(SHIPPED_NOTEBOOKS)}")
    path = Path(str(resources.files("widgets").joinpath("notebooks", f"{stem}.ipynb")))
    if not path.is_file():  # a broken install, not a user error
        raise FileNotFoundError(f"shipped notebook missing from the installation: {path}")
    return path
