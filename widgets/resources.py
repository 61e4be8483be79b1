"""The notebooks Foundry ships as package data, found through :mod:`importlib.resources`.

Why package data and not a folder beside the source tree: after ``pip install foundry``
(a wheel, or a non-editable install) there is no source tree, and ``foundry dashboard`` /
``foundry run distill`` must still find their notebooks. ``importlib.resources`` finds them
in a wheel, an editable install and a checkout alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "FINGERPRINT_KEY",
    "SHIPPED_NOTEBOOKS",
    "cells_fingerprint",
    "edited_shipped_notebook",
    "shipped_name",
    "shipped_notebook",
    "stamp",
]

FINGERPRINT_KEY = "cells_sha256"
"""``metadata.foundry.cells_sha256`` of a shipped notebook: the fingerprint of its cells as
shipped. JupyterLab keeps notebook metadata when it saves, so a cell added or changed in
Lab (an editable install serves the package's own file) no longer matches it."""

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


def cells_fingerprint(nb: Mapping[str, Any]) -> str:
    """SHA-256 of the cells' types and sources (not outputs, counts or metadata)."""
    digest = hashlib.sha256(b"foundry-notebook-cells-v1\n")
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else str(source)
        data = json.dumps([cell.get("cell_type"), text]).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def shipped_name(path: Path) -> str | None:
    """The shipped notebook's name when ``path`` is that very file, else None."""
    for name in SHIPPED_NOTEBOOKS:
        try:
            if path.samefile(shipped_notebook(name)):
                return name
        except OSError:
            continue
    return None


def edited_shipped_notebook(name: str) -> str | None:
    """Why the shipped notebook ``name`` is not as shipped (None when it is).

    Why this exists: with an editable install, the package's notebook is a file in the
    project that JupyterLab opens and autosaves, and ``foundry run distill`` executed a
    cell a user had added there (the output notebook grew to 5.5 MB).
    """
    path = shipped_notebook(name)
    nb = json.loads(path.read_text(encoding="utf-8"))
    expected = nb.get("metadata", {}).get("foundry", {}).get(FINGERPRINT_KEY)
    if expected is None:
        return f"{path} has no metadata.foundry.{FINGERPRINT_KEY} (it is not the shipped file)"
    if cells_fingerprint(nb) != expected:
        return f"{path} was edited after it shipped (its cells differ from the shipped ones)"
    return None


def stamp(path: Path) -> bool:
    """Write the cells' fingerprint into a shipped notebook; True if it changed.

    Run after editing a shipped notebook on purpose: ``python -m widgets.resources``.
    """
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    meta = nb.setdefault("metadata", {}).setdefault("foundry", {})
    fingerprint = cells_fingerprint(nb)
    if meta.get(FINGERPRINT_KEY) == fingerprint:
        return False
    meta[FINGERPRINT_KEY] = fingerprint
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


if __name__ == "__main__":
    for shipped in SHIPPED_NOTEBOOKS:
        changed = stamp(shipped_notebook(shipped))
        print(f"{shipped}: {'stamped' if changed else 'up to date'}")
