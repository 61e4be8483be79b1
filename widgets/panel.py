"""The control panel: configure, start, watch, cancel and compare distillation runs.

How live updates reach the browser
----------------------------------
A run trains in a worker thread of the kernel (``foundry_kernel.start``) and the cell
that started it returns at once. A cell that is still executing would block widget
callbacks, and asyncio tasks created from a cell may not be resumed after it ends
(ipykernel #1510), so the panel uses a **background updater thread**: every
``update_interval_s`` (0.25 s, 4 Hz) it reads each live run's new events
(``handle.events_since``, its own cursor, so a user's ``handle.poll()`` still sees
everything) and memory samples, and pushes widget values and batched figure updates.
Setting widget traits from a thread is safe on ipykernel >= 7.1 (comm messages go
through the kernel's IOPub thread); ``with Output():`` is never used from it. The
thread exists only while a run of this panel is live: it makes a last refresh when the
run ends and exits, so an idle kernel has no panel thread. Proven in a real JupyterLab
by tests/test_browser_lab.py (the chart gains points and Cancel lands after every cell
has finished) and in-process by tests/test_widgets.py.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as ipw
import yaml

import foundry_kernel
from foundry_kernel import SAMPLE_INTERVAL_S, Event, RunHandle, RunState
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import RunConfig
from foundry_kernel.errors import ConfigError, FoundryError
from foundry_kernel.logs import Throttle
from foundry_kernel.metrics import BASELINE, lookup
from foundry_kernel.paths import allowed_roots, default_runs_dir, resolve_within
from foundry_kernel.progress import Progress, format_progress
from foundry_kernel.ranks import RankFigures, rank_figures
from widgets.charts import CompareChart, LiveCharts, metric_trace
from widgets.compare_tab import CompareTab
from widgets.display import error_html, outcome_html
from widgets.eval_table import EvalRow, eval_rows, eval_table_html
from widgets.form import PANEL_FIELDS, ConfigForm

__all__ = ["LOG_LINES", "DistillPanel", "RunView", "memory_text", "run_number"]

log = logging.getLogger("foundry.widgets")

LOG_LINES = 200
"""Lines the log view keeps (older ones scroll away: no flooding)."""
STEP_LOG_EVERY_S = 2.0
"""At most one training-step line per run this often; phases, alerts, evals always."""
UPDATE_INTERVAL_S = 0.25
MAX_PROCESSES = 64
"""The bound of the panel's world-size field (processes on this machine)."""

_STATE_COLORS = {
    "pending": "#757575",
    "running": "#1565c0",
    "cancelling": "#ef6c00",
    "cancelled": "#ef6c00",
    "completed": "#2e7d32",
    "failed": "#c62828",
    "timed_out": "#c62828",
}


_run_numbers: dict[str, int] = {}
_run_numbers_lock = threading.Lock()


def run_number(run_id: str) -> int:
    """The run's number in this kernel, the same in every panel that shows it.

    Process-wide, not per panel: two panels each numbering their own runs both showed
    "#1", and the compare chart and the tabs could not tell them apart."""
    with _run_numbers_lock:
        return _run_numbers.setdefault(run_id, len(_run_numbers) + 1)


_TORCH_MEMORY = ("mem/torch_allocated_mb", "mem/torch_reserved_mb", "mem/torch_max_allocated_mb")
_GPU_USED = re.compile(r"mem/gpu(\d+)_used_mb")


def _mb(value: float) -> str:
    return f"{value / 1024:.2f} GB" if value >= 1024 else f"{value:.0f} MB"


def _memory_label(name: str) -> str:
    metric = lookup(name)
    return name if metric is None else metric.label


def memory_text(
    metrics: Mapping[str, float],
    estimate_mb: float | None = None,
    *,
    sharing: int = 1,
    ranks: Sequence[RankFigures] = (),
    estimate_base_mb: float | None = None,
) -> str:
    """The latest memory figures, each named (by the metrics registry) for what it
    measures: the process's RSS (host memory), per GPU NVML's used (every process on that
    GPU, of its total), torch's allocated, reserved and peak allocated (this process's
    tensors, its allocator's cache, the most its tensors held), and the preflight's
    estimate. They differ, and are easy to confuse. Runs are threads of the kernel's
    process, so while ``sharing`` > 1 runs are live every figure but the estimate is theirs
    together, and the line says so (two panels show the same curve for that reason).
    A data-parallel run adds each rank's own RSS and GPU memory (``ranks``: rank 0 records
    them with every step, see :mod:`foundry_kernel.ranks`). ``estimate_base_mb``: on a CPU
    run, the RSS the estimate comes on top of (it counts tensors, not the interpreter)."""
    gpus = sorted(int(m.group(1)) for m in map(_GPU_USED.fullmatch, metrics) if m is not None)
    names = ["mem/rss_mb", *(f"mem/gpu{i}_used_mb" for i in gpus), *_TORCH_MEMORY]
    parts = []
    for name in (n for n in names if n in metrics):
        total = metrics.get(name.replace("_used_mb", "_total_mb")) if "_used_" in name else None
        of = "" if total is None else f" of {_mb(total)}"
        parts.append(f"{_memory_label(name)} {_mb(metrics[name])}{of}")
    if estimate_mb is not None:
        base = "" if estimate_base_mb is None else f" on top of {_mb(estimate_base_mb)} RSS"
        parts.append(f"preflight estimate {_mb(estimate_mb)}{base}")
    for r in ranks:
        own = [f"RSS {_mb(r.rss_mb)}" if r.rss_mb is not None else ""]
        own.append(f"GPU {_mb(r.vram_mb)}" if r.vram_mb is not None else "")
        if any(own):
            parts.append(f"rank {r.rank} " + ", ".join(x for x in own if x))
    if parts and sharing > 1:
        parts.append(f"process-wide: {sharing} live runs share this kernel")
    return "memory: " + " · ".join(parts) if parts else ""


_BAR_STYLES = {"completed": "success", "failed": "danger", "timed_out": "danger"}


class RunView:
    """One run in the panel: a progress bar and line, outcome box, evaluation table,
    charts, memory line and a bounded log (newest line in view).

    It keeps everything after the run ends, so finished and failed runs keep their charts.
    :meth:`refresh` is called by the panel's updater thread only.
    """

    def __init__(self, handle: RunHandle, *, label: str, compare: CompareChart | None) -> None:
        self.handle = handle
        self.label = label
        self.compare = compare
        self.charts = LiveCharts(live=True)
        self.bar = ipw.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=ipw.Layout(width="160px", visibility="hidden")
        )
        self.bar.add_class("foundry-progress-bar")
        self.status = ipw.HTML()
        self.status.add_class("foundry-status")
        self.outcome = ipw.HTML()
        self.outcome.add_class("foundry-outcome")
        self.evals = ipw.HTML()
        self.evals.add_class("foundry-eval-table")
        self.memory = ipw.HTML()
        self.memory.add_class("foundry-memory")
        self.log_view = ipw.HTML()
        self.log_view.add_class("foundry-log")
        head = ipw.HBox([self.bar, self.status], layout=ipw.Layout(align_items="center"))
        self.widget = ipw.VBox(
            [head, self.outcome, self.evals, self.charts.widget, self.memory, self.log_view]
        )
        self.widget.add_class("foundry-run")
        self.live = True
        self._seq = 0
        self._memory_seen: dict[str, int] = {}
        self._lines: deque[str] = deque(maxlen=LOG_LINES)
        self._lines_changed = False
        self._step_throttle = Throttle(STEP_LOG_EVERY_S)
        self._points: dict[int, dict[str, float]] = {}  # eval steps -> metrics there
        self._last_train: dict[str, tuple[int, dict[str, float]]] = {}  # prefix -> step's
        self._evals_changed = False
        self.estimate_mb: float | None = None
        """The preflight's memory estimate (MB), once the run has made it."""
        self.estimate_base_mb: float | None = None
        """On a CPU run, the process RSS when the estimate was made (the line's base)."""
        self._estimate_device = ""
        self._estimate_drawn = False
        if compare is not None:
            compare.add_run(label)
        self._render_status()

    # -- refresh (updater thread) ------------------------------------------------------

    def refresh(self) -> bool:
        """Pull new events and samples into the widgets; False once the run has ended.

        ``done`` is read *before* the events, so the final refresh sees every event the
        run emitted up to its end.
        """
        done = self.handle.done
        for seq, event in self.handle.events_since(self._seq):
            if seq > self._seq + 1 and self._seq:
                self._log(f"({seq - self._seq - 1} events dropped by the run's buffer)")
            self._seq = seq
            self._ingest(event)
        self._ingest_memory()
        self._draw_estimate(done=done)
        self.charts.flush(force=done)
        if self.compare is not None:
            self.compare.flush(force=done)
        self._render_status()
        self._render_evals(force=done)
        self._render_memory()
        self._render_log()
        if done:
            self.outcome.value = outcome_html(self.handle)
            self.live = False
        return not done

    def _ingest(self, event: Event) -> None:
        self.charts.ingest_event(event)
        if self.compare is not None:
            self.compare.ingest_event(self.label, event)
        payload = event.payload
        if event.kind == "phase":
            self._log(f"phase: {payload.get('phase')}")
        elif event.kind == "alert":
            self._log(f"alert: {payload.get('message')}")
        elif event.kind == "state":
            error = f" - {payload['error']}" if payload.get("error") else ""
            self._log(f"state: {payload.get('state')}{error}")
        elif event.kind == "step":
            self._log_step(payload)
            self._collect_eval(payload)
        elif event.kind == "preflight":
            self._mark_estimate(payload)

    def _collect_eval(self, payload: Mapping[str, Any]) -> None:
        """Keep what the evaluation table needs: each evaluation's metrics with the
        training step's loss parts at the same step (the distillation's and the twin's)."""
        prefix = str(payload.get("prefix") or "")
        step, metrics = payload.get("step"), payload.get("metrics")
        if prefix not in ("", BASELINE) or not isinstance(step, int):
            return
        if not isinstance(metrics, Mapping):
            return
        numbers = {str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if not any(k.endswith("val/loss") for k in numbers):
            self._last_train[prefix] = (step, numbers)
            return
        point = self._points.setdefault(step, {})
        trained = self._last_train.get(prefix)
        if trained is not None and trained[0] == step:
            point.update(trained[1])
        point.update(numbers)
        self._evals_changed = True

    def _mark_estimate(self, payload: Mapping[str, Any]) -> None:
        mb = payload.get("estimate_mb")
        if isinstance(mb, bool) or not isinstance(mb, int | float) or self.estimate_mb is not None:
            return
        self.estimate_mb = float(mb)
        self._estimate_device = str(payload.get("device") or "")

    def _draw_estimate(self, *, done: bool) -> None:
        """The estimate as a dashed line on the memory chart, once.

        On a GPU the estimate is of tensors and torch allocated measures those: the line is
        the estimate. On the CPU the tensors live in the process's RSS beside Python, torch
        and the libraries (hundreds of MB): a line at the estimate alone sat far below the
        RSS curve and read as "the run uses 100x its estimate". There the line is drawn on
        top of the RSS at the time of the estimate (the first sample after it, if it came
        first), where the RSS is expected to stay under."""
        if self.estimate_mb is None or self._estimate_drawn:
            return
        device = self._estimate_device
        where = f" ({device})" if device else ""
        rss = self.handle.metrics.get("mem/rss_mb")
        if device != "cuda" and isinstance(rss, int | float) and math.isfinite(rss):
            self.estimate_base_mb = float(rss)
            line, label = self.estimate_base_mb + self.estimate_mb, "RSS at preflight + estimate"
        elif device == "cuda" or done:
            line, label = self.estimate_mb, "preflight estimate"
        else:
            return  # no RSS sample yet: the next refresh draws it
        self._estimate_drawn = True
        self.charts.mark_estimate(line, f"{label}{where}")

    def eval_rows(self) -> list[EvalRow]:
        """The evaluation table's rows so far (see :func:`widgets.eval_table.eval_rows`)."""
        return eval_rows(self._points, teacher_loss=self._teacher_loss())

    def _teacher_loss(self) -> float | None:
        """The teacher's held-out loss on the run's batches: measured in the final
        evaluation, so known once the run completed; None across tokenizers (its loss is
        per token of another tokenizer: not comparable)."""
        if self.handle.config.loss.cross_tokenizer != "off":
            return None
        result = self.handle.result or {}
        teacher = result.get("teacher")
        loss = teacher.get("val_loss") if isinstance(teacher, Mapping) else None
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            return None
        return float(loss) if math.isfinite(loss) else None

    def _render_evals(self, *, force: bool = False) -> None:
        if not (self._evals_changed or force):
            return
        self._evals_changed = False
        value = eval_table_html(self.eval_rows())
        if value != self.evals.value:
            self.evals.value = value

    def _log_step(self, payload: Mapping[str, Any]) -> None:
        metrics = payload.get("metrics") or {}
        prefix = payload.get("prefix") or ""
        evals = {k: v for k, v in metrics.items() if "val/" in k}
        if not evals and self._step_throttle.check() is None:
            return
        shown = evals or {k: v for k, v in metrics.items() if k.endswith("train/loss")}
        values = ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if isinstance(v, float))
        self._log(f"{prefix}step {payload.get('step')}/{payload.get('max_steps')}: {values}")

    def _ingest_memory(self) -> None:
        names = [n for n in self.handle.metrics if n.startswith("mem/") and metric_trace(n)]
        for name in names:
            seen = self._memory_seen.get(name, -1)
            new = [(i, v) for i, v in self.handle.history(name) if i > seen]
            if new:
                self._memory_seen[name] = new[-1][0]
                self.charts.add_memory(name, ((i * SAMPLE_INTERVAL_S, v) for i, v in new))

    def _render_memory(self) -> None:
        memory = {k: v for k, v in self.handle.metrics.items() if k.startswith("mem/")}
        sharing = len(foundry_kernel.list_runs(live_only=True)) if not self.handle.done else 1
        h = self.handle
        ranks = rank_figures(
            {k: [v] for k, v in h.metrics.items()},
            prefix="baseline/" if h.phase == "baseline" else "",
        )
        text = memory_text(
            memory,
            self.estimate_mb,
            sharing=sharing,
            ranks=ranks,
            estimate_base_mb=self.estimate_base_mb,
        )
        value = f'<span style="font-size:11px;color:#424242">{html.escape(text)}</span>'
        if value != self.memory.value:
            self.memory.value = value

    def _log(self, text: str) -> None:
        self._lines.append(f"{time.strftime('%H:%M:%S')} {text}")
        self._lines_changed = True

    def _render_log(self) -> None:
        if not self._lines_changed:
            return
        self._lines_changed = False
        body = html.escape("\n".join(self._lines))
        # column-reverse: the box's scroll starts at its end, so the newest line is the one
        # in view (a plain scroll box showed the oldest and hid the new ones below)
        self.log_view.value = (
            '<div class="foundry-log-tail" style="max-height:10em;overflow-y:auto;display:flex;'
            'flex-direction:column-reverse">'
            f'<pre style="font-size:11px;margin:0">{body}</pre></div>'
        )

    def status_text(self, progress: Progress | None = None) -> str:
        """The run's label, state and progress line (:func:`format_progress`): phase,
        ``n/N``, elapsed < ETA, rates; for an ended run how it ended, how long it took and
        the last step."""
        h = self.handle
        p = h.progress if progress is None else progress
        parts = [self.label]
        if not p.finished and p.phase != p.state:  # before a phase, the phase is the state
            parts.append(p.state)
        parts.append(format_progress(p))
        if p.finished and h.step is not None:
            parts.append(f"step {h.step}/{h.max_steps}")
        parts.extend(_rank_parts(h.metrics, "baseline/" if h.phase == "baseline" else ""))
        return " · ".join(parts)

    def _render_status(self) -> None:
        progress = self.handle.progress
        state = str(self.handle.state)
        color = _STATE_COLORS.get(state, "#000")
        value = (
            f'<span data-state="{state}" style="color:{color};font-weight:600">'
            f"{html.escape(self.status_text(progress))}</span>"
        )
        if value != self.status.value:
            self.status.value = value
        self._render_bar(progress)

    def _render_bar(self, progress: Progress) -> None:
        """The bar follows what the phase counts (a training phase's steps, an evaluation's
        batches); hidden while nothing is counted; full and coloured once the run ended."""
        if progress.finished:
            if progress.state == "completed":
                self.bar.value = 1.0
            self.bar.bar_style = _BAR_STYLES.get(progress.state, "warning")
            self.bar.layout.visibility = "visible"
            return
        fraction = progress.fraction
        if progress.step is not None and progress.max_steps:
            # a training phase: its steps, also while it validates (the validation's
            # batches would make the bar jump to full and back)
            fraction = min(1.0, progress.step / progress.max_steps)
        if fraction is None:
            self.bar.layout.visibility = "hidden"
            return
        self.bar.value = fraction
        self.bar.layout.visibility = "visible"


class DistillPanel:
    """Configure and run distillations from a notebook.

    ``config`` (a RunConfig, a dict - even an invalid one, whose errors are shown - or
    None for the defaults) seeds the form; fields outside the form are kept as given.
    Display it by ending a cell with it, or ``display(panel.widget)``.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any] | None = None,
        *,
        runs_dir: str | Path | None = None,
        fields: tuple[str, ...] = PANEL_FIELDS,
        update_interval_s: float = UPDATE_INTERVAL_S,
        start_fn: Callable[..., RunHandle] = foundry_kernel.start,
        save_path: str = "foundry-config.yaml",
    ) -> None:
        base = _base_dict(config)
        if runs_dir is not None:
            base["runs_dir"] = str(runs_dir)
        self.update_interval_s = update_interval_s
        self._start_fn = start_fn
        self._lock = threading.Lock()
        self._views: list[RunView] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.updater_cpu_s = 0.0
        """CPU seconds the updater thread has used (what the live UI costs the kernel)."""
        self.form = ConfigForm(base, fields)
        self.compare = CompareChart(live=True)
        self._runs_dir_arg = base.get("runs_dir")
        self.compare_tab = CompareTab(
            self.compare, runs_dir=self.store_dir, own=self._own_ids, label_for=_store_label
        )
        self._build(save_path)
        self.form.on_validated(lambda _form: self._sync_buttons())
        self._sync_buttons()
        self.compare_tab.refresh_list()

    # -- layout -----------------------------------------------------------------------

    def _build(self, save_path: str) -> None:
        self.start_button = ipw.Button(description="Start", button_style="success", icon="play")
        self.cancel_button = ipw.Button(description="Cancel", button_style="danger", icon="stop")
        self.save_button = ipw.Button(description="Save config", icon="save")
        self.save_path = ipw.Text(value=save_path, description="to", layout={"width": "280px"})
        self.save_path.style.description_width = "24px"
        self.start_button.on_click(self._on_start)
        self.cancel_button.on_click(self._on_cancel)
        self.save_button.on_click(self._on_save)
        # How many processes train the run (torchrun, children of this kernel); 1 keeps it
        # on the kernel's worker thread as before.
        self.processes = ipw.BoundedIntText(
            value=1, min=1, max=MAX_PROCESSES, description="processes", layout={"width": "160px"}
        )
        self.processes.style.description_width = "72px"
        self.message = ipw.HTML()
        self.message.add_class("foundry-message")
        self.start_reason = ipw.HTML(layout=ipw.Layout(margin="0 0 0 8px"))
        self.start_reason.add_class("foundry-start-reason")
        sections = [
            ipw.VBox(
                [ipw.HTML(f"<b>{name}</b>")] + [c.row for c in controls],
                layout=ipw.Layout(margin="0 16px 8px 0"),
            )
            for name, controls in self.form.sections().items()
        ]
        form = ipw.Box(sections, layout=ipw.Layout(display="flex", flex_flow="row wrap"))
        buttons = ipw.HBox(
            [
                self.processes,
                self.start_button,
                self.cancel_button,
                self.save_button,
                self.save_path,
                self.start_reason,
            ],
            layout=ipw.Layout(align_items="center"),
        )
        self.tabs = ipw.Tab(children=[self.compare_tab.widget], titles=["compare"])
        self.widget = ipw.VBox([form, self.form.message, buttons, self.message, self.tabs])
        self.widget.add_class("foundry-panel")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Display as the panel's widget when a cell ends with the panel."""
        return self.widget._repr_mimebundle_(**kwargs)

    # -- public API -------------------------------------------------------------------

    @property
    def runs(self) -> list[RunHandle]:
        """Handles of this panel's runs, oldest first (finished ones included)."""
        with self._lock:
            return [view.handle for view in self._views]

    @property
    def views(self) -> list[RunView]:
        with self._lock:
            return list(self._views)

    @property
    def current(self) -> RunHandle | None:
        """The newest run, live or not."""
        with self._lock:
            return self._views[-1].handle if self._views else None

    @property
    def running(self) -> bool:
        current = self.current
        return current is not None and not current.done

    @property
    def config(self) -> RunConfig | None:
        """The validated config in the form (None while a field is invalid)."""
        return self.form.config

    def start(self) -> RunHandle:
        """Start a run with the form's config (what the Start button does)."""
        config = self.form.validate()
        if config is None:
            raise ConfigError(str(self.form.error), field=getattr(self.form.error, "field", None))
        if self.running:
            raise RuntimeError("a run of this panel is still live; cancel it first")
        nproc = int(self.processes.value)
        handle = (
            self._start_fn(config) if nproc == 1 else self._start_fn(config, nproc_per_node=nproc)
        )
        self.attach(handle)
        return handle

    def cancel(self) -> bool:
        """Ask the live run to stop at its next step (what the Cancel button does)."""
        current = self.current
        if current is None:
            return False
        asked = current.cancel("cancelled from the panel")
        self._sync_buttons()
        return asked

    def attach(self, handle: RunHandle) -> RunView:
        """Show a run in the panel (one started elsewhere works too) and follow it."""
        view = RunView(handle, label=_label(handle), compare=self.compare)
        with self._lock:
            self._views.append(view)
            children = [v.widget for v in self._views]
            titles = [v.label for v in self._views]
        # The compare tab stays first: a tab that moves gets a new view, and the browser's
        # plotly view it replaces broke the figure's updates (the compare tab was empty).
        self.tabs.children = [self.compare_tab.widget, *children]
        self.tabs.titles = ["compare", *titles]
        self.tabs.selected_index = len(children)
        self._ensure_updater()
        self._sync_buttons()
        return view

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is live and the updater has drawn their ends; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for view in self.views:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            view.handle.wait(left)
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not self.updater_alive and not any(v.live for v in self.views)

    @property
    def updater_alive(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def store_dir(self) -> Path:
        """The run store the form's config writes to (its ``runs_dir``, else the one
        default store): the compare tab lists its runs."""
        config = self.form.config
        configured = config.runs_dir if config is not None else self._runs_dir_arg
        return Path(configured).expanduser().absolute() if configured else default_runs_dir()

    def _own_ids(self) -> set[str]:
        return {view.handle.id for view in self.views}

    def close(self) -> None:
        """Stop following runs (they keep running) and close the widgets."""
        self._stop.set()
        self.compare_tab.close()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        _close_tree(self.widget)

    # -- buttons ----------------------------------------------------------------------

    def _on_start(self, _button: ipw.Button) -> None:
        self.message.value = ""
        try:
            handle = self.start()
        except (FoundryError, OSError, RuntimeError) as exc:
            self.message.value = error_html("Could not start the run", str(exc))
            return
        self.message.value = error_html(
            f"Run {handle.id} started", f"run store {handle.runs_dir}", level="info"
        )

    def _on_cancel(self, _button: ipw.Button) -> None:
        self.cancel()

    def _on_save(self, _button: ipw.Button) -> None:
        try:
            path = self.save_config(self.save_path.value)
        except (FoundryError, OSError) as exc:
            self.message.value = error_html("Could not save the config", str(exc))
            return
        self.message.value = error_html("Saved", f"config written to {path}", level="info")

    def save_config(self, path: str | Path) -> Path:
        """Write the form's config as YAML (or JSON) under an allowed folder."""
        config = self.form.validate()
        if config is None:
            raise ConfigError(f"not saved: {self.form.error}", field="config")
        target = resolve_within(path, allowed_roots(), field="save path")
        if target.suffix not in (".yaml", ".yml", ".json"):
            raise ConfigError(
                f"save path: {target.name!r} must end in .yaml, .yml or .json", field="save path"
            )
        data = config.to_dict()
        text = (
            _json_text(data) if target.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        return target

    def start_blocked(self) -> str:
        """Why Start is off ("" when it is on): a live run, or the first field error."""
        if self.running:
            return "a run is in progress (cancel it or wait for it to end)"
        if self.form.valid:
            return ""
        error = self.form.error
        if error is None:
            return "fix the config"
        field = getattr(error, "field", None)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = next((line for line in lines[1:] if ":" in line), lines[0] if lines else "")
        if field and field not in first:
            first = f"{field}: {first}"
        return f"fix: {first}"

    def _sync_buttons(self) -> None:
        why = self.start_blocked()
        self.start_button.disabled = bool(why)
        self.start_button.tooltip = why or "start a run with this config"
        reason = (
            f'<span style="color:#757575;font-size:12px">Start is off: {html.escape(why)}</span>'
            if why
            else ""
        )
        if reason != self.start_reason.value:
            self.start_reason.value = reason
        current = self.current
        self.cancel_button.disabled = (
            current is None or current.state.terminal or current.state is RunState.CANCELLING
        )
        self.save_button.disabled = not self.form.valid

    # -- the updater thread -----------------------------------------------------------

    def _ensure_updater(self) -> None:
        with self._lock:
            if self._thread is not None:
                return  # it re-reads the view list every round, so it picks up new runs
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._update_loop, name="foundry-panel-updater", daemon=True
            )
            self._thread.start()

    def _update_loop(self) -> None:
        """Refresh live runs at ``update_interval_s`` until none is left, then exit.

        The thread's decision to exit and ``_thread = None`` happen under the lock that
        :meth:`attach` takes, so a run attached at that moment starts a new updater
        instead of being missed.
        """
        while True:
            cpu0 = time.thread_time()
            try:
                self._refresh_once()
            except Exception as exc:  # noqa: BLE001 - the thread's boundary; see below
                # An exception here would end the thread and land in threading.excepthook
                # (the kernel's log, invisible in the notebook) with the UI frozen: show it.
                self._show_crash(exc)
                with self._lock:
                    self._thread = None
                return
            finally:
                self.updater_cpu_s += time.thread_time() - cpu0
            with self._lock:
                if self._stop.is_set() or not any(v.live for v in self._views):
                    self._thread = None
                    break
            self._stop.wait(self.update_interval_s)
        self._sync_buttons()

    def _refresh_once(self) -> None:
        for view in self.views:
            if view.live:
                view.refresh()
        self._sync_buttons()

    def _show_crash(self, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.error("panel updater stopped: %s", detail)
        self.message.value = error_html(
            "Live updates stopped (the run itself goes on)",
            f"{type(exc).__name__}: {exc}",
            detail=detail,
        )


def _rank_parts(metrics: Mapping[str, float], prefix: str) -> list[str]:
    """``2 ranks`` and, when one holds the others back, ``straggler: rank 1`` (from the
    latest step's per-rank figures, :func:`foundry_kernel.ranks.rank_figures`)."""
    ranks = rank_figures({k: [v] for k, v in metrics.items()}, prefix=prefix)
    if not ranks:
        return []
    parts = [f"{len(ranks)} ranks"]
    slow = [str(r.rank) for r in ranks if r.straggler]
    if slow:
        parts.append(f"straggler: rank {', '.join(slow)}")
    return parts


def _base_dict(config: RunConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return RunConfig().to_dict()
    if isinstance(config, RunConfig):
        return config.to_dict()
    return dict(config)


def _label(handle: RunHandle) -> str:
    """``#N name``, N unique in the kernel (:func:`run_number`)."""
    name = handle.config.name or handle.config.loss.kind
    return f"#{run_number(handle.id)} {name}"


def _store_label(run_id: str, name: str) -> str:
    """A store run's name on the compare chart: ``#N name`` as its own panel calls it when
    this kernel started it, else its name and the end of its id (runs of the CLI, other
    kernels)."""
    with _run_numbers_lock:
        number = _run_numbers.get(run_id)
    return f"#{number} {name}" if number is not None else f"{name} ({run_id[-6:]})"


def _json_text(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _close_tree(widget: ipw.Widget) -> None:
    """Close a widget and its descendants (``Widget.close_all`` would close every
    widget in the kernel, other panels' included)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()
