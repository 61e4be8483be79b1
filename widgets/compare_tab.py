"""The panel's compare tab: this panel's runs, live, plus any runs of the store overlaid.

A panel knows its own runs through their handles; runs of another panel, another kernel
or ``foundry distill`` on the command line exist only in the run store they wrote to (the
one default store every entry point agrees on, :func:`foundry_kernel.paths.default_runs_dir`).
The tab lists that store's runs; the ones picked are read from it (train and validation
loss) and drawn on the same chart as the panel's own, and the ones still running are
read again every :data:`POLL_INTERVAL_S` (only their new rows), so a run training in a
terminal moves on the chart as the panel's own do.

The store is opened read-only and only while a list or curve is read: the tab never
writes, and a store that does not exist yet (nothing run) is a sentence, not an error.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as ipw

from foundry_kernel.errors import FoundryError
from foundry_kernel.store import RunStore
from widgets.charts import CompareChart

__all__ = ["POLL_INTERVAL_S", "CompareTab"]

POLL_INTERVAL_S = 2.0
"""How often the picked runs that are still running are read again from the store."""
MAX_LISTED = 200
"""The newest runs of the store offered in the picker."""
_CURVES = (("train/loss", "train"), ("val/loss", "val"))
_TERMINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})


@dataclass
class _Picked:
    """A store run on the chart: its label there, the last step read per curve, whether it
    may still gain points."""

    label: str
    last: dict[str, int]
    live: bool = True
    shown: bool = True


class CompareTab:
    """The compare chart with a picker of the store's other runs above it.

    ``runs_dir`` gives the store to read (the panel's, which follows its form); ``own``
    gives the ids the panel already draws from their handles (left out of the picker);
    ``label_for`` names a run on the chart (the panel's ``#N name`` for runs of this
    kernel, so a run has one name in every panel).
    """

    def __init__(
        self,
        chart: CompareChart,
        *,
        runs_dir: Callable[[], Path],
        own: Callable[[], set[str]],
        label_for: Callable[[str, str], str],
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.chart = chart
        self._runs_dir = runs_dir
        self._own = own
        self._label_for = label_for
        self.poll_interval_s = float(poll_interval_s)
        self._lock = threading.Lock()
        self._picked: dict[str, _Picked] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.picker = ipw.SelectMultiple(
            options=[], rows=4, description="store runs", layout=ipw.Layout(width="620px")
        )
        self.picker.style.description_width = "80px"
        self.picker.add_class("foundry-compare-picker")
        self.picker.observe(self._on_pick, names="value")
        self.refresh_button = ipw.Button(description="Refresh list", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh_list())
        self.note = ipw.HTML()
        self.note.add_class("foundry-compare-note")
        controls = ipw.HBox(
            [self.picker, ipw.VBox([self.refresh_button, self.note])],
            layout=ipw.Layout(align_items="flex-start"),
        )
        self.widget = ipw.VBox([controls, chart.widget])
        self.widget.add_class("foundry-compare")

    # -- the list ---------------------------------------------------------------------

    def refresh_list(self) -> int:
        """Re-read the store's runs into the picker (picked ones stay picked); returns
        how many are offered."""
        root = self._runs_dir()
        try:
            with RunStore(root, read_only=True) as store:
                runs = store.list_runs(limit=MAX_LISTED)
        except (FoundryError, OSError) as exc:
            self.picker.options = []
            self._say(f"No runs to add yet from {root} ({exc}).")
            return 0
        own = self._own()
        options = [
            (f"{run.name or run.run_id} · {run.state} · {run.run_id}", run.run_id)
            for run in runs
            if run.run_id not in own
        ]
        kept = tuple(v for v in self.picker.value if v in {rid for _, rid in options})
        self.picker.options = options
        self.picker.value = kept
        self._say(
            f"{len(options)} other run(s) in {root}: pick any to overlay them "
            "(running ones update every few seconds)."
        )
        return len(options)

    def _say(self, text: str) -> None:
        self.note.value = f'<span style="font-size:12px;color:#555">{html.escape(text)}</span>'

    # -- picking ----------------------------------------------------------------------

    def _on_pick(self, change: dict[str, object]) -> None:
        new = change.get("new") or ()
        self.show(tuple(str(v) for v in new) if isinstance(new, Iterable) else ())

    def show(self, run_ids: Iterable[str]) -> None:
        """Overlay exactly these store runs (others picked before are hidden, not lost)."""
        wanted = set(run_ids)
        names = {rid: text.split(" · ")[0] for text, rid in self.picker.options}
        with self._lock:
            for run_id, picked in self._picked.items():
                if picked.shown != (run_id in wanted):
                    picked.shown = run_id in wanted
                    self.chart.set_visible(picked.label, picked.shown)
            for run_id in wanted - set(self._picked):
                label = self._label_for(run_id, names.get(run_id, run_id))
                self.chart.add_run(label)
                self._picked[run_id] = _Picked(label, {})
        self.poll()
        self._ensure_poller()

    @property
    def picked(self) -> dict[str, str]:
        """Store runs on the chart now: run id -> their label."""
        with self._lock:
            return {rid: p.label for rid, p in self._picked.items() if p.shown}

    def poll(self) -> int:
        """Read the new points of the picked runs that may still gain some; returns how
        many points were added."""
        with self._lock:
            due = [(rid, p) for rid, p in self._picked.items() if p.live and p.shown]
        if not due:
            return 0
        added = 0
        try:
            with RunStore(self._runs_dir(), read_only=True) as store:
                for run_id, picked in due:
                    added += self._read(store, run_id, picked)
        except (FoundryError, OSError) as exc:
            self._say(f"Could not read the store: {exc}")
            return added
        self.chart.flush(force=True)
        return added

    def _read(self, store: RunStore, run_id: str, picked: _Picked) -> int:
        # the state is read first: rows written before a run ended are all read after it
        state = str(store.get_run(run_id, damaged_ok=True).state)
        added = 0
        for name, part in _CURVES:  # one query per curve: each has its own last step
            rows = store.metrics(run_id, [name], since_step=picked.last.get(name, -1))
            for row in rows:
                self.chart.add(f"{picked.label}|{part}", row.step, row.value)
            if rows:
                picked.last[name] = rows[-1].step
                added += len(rows)
        picked.live = state not in _TERMINAL
        return added

    # -- following running runs -------------------------------------------------------

    def _ensure_poller(self) -> None:
        with self._lock:
            if self._thread is not None or not any(p.live for p in self._picked.values()):
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._poll_loop, name="foundry-compare-poller", daemon=True
            )
            self._thread.start()

    def _poll_loop(self) -> None:
        """Read the picked running runs until none is left running (or :meth:`close`)."""
        while not self._stop.wait(self.poll_interval_s):
            self.poll()
            with self._lock:
                if not any(p.live and p.shown for p in self._picked.values()):
                    self._thread = None
                    return
        with self._lock:
            self._thread = None

    def close(self) -> None:
        """Stop following the picked runs (the panel closes its widgets)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
