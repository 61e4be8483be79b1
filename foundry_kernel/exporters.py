"""Opt-in exporters: a run's metrics, config and summary also sent to experiment trackers.

``tracking.report_to: [tensorboard, mlflow, wandb, trackio]`` (default ``[]``, as
transformers' ``report_to``) turns them on. Each tracker is an optional dependency
(``pip install 'foundry[NAME]'``), imported only on the export thread of a run that names
it; a missing one is a :class:`~foundry_kernel.errors.ConfigError` when the run starts
(:func:`check_installed`), never an ImportError deep inside a run.

What each tracker receives, under one naming (:func:`export_name`):

- the metrics of every step and evaluation as ``train/...`` and ``eval/...`` (the trainer's
  ``val/`` becomes ``eval/``; ``tokens_per_s`` is ``train/tokens_per_s``), the CE-only twin's
  as ``baseline/train/...`` and ``baseline/eval/...``, the built-in teacher's own training as
  ``teacher_build/...``: Foundry's own prefixes (:mod:`foundry_kernel.metrics`) kept in front;
- the config as hyperparameters, as dotted keys (:func:`~foundry_kernel.config.flatten_config`);
- the summary's numbers at the end as ``summary/<dotted key>`` (``summary/student.val_ppl``,
  ``summary/gap_closed``), and the final state.

Local by default: TensorBoard event files and W&B's offline runs go under ``tracking.dir``
(``<runs_dir>/tracking``), MLflow to ``sqlite:///<tracking dir>/mlflow.db`` unless
``tracking.mlflow_uri`` or ``MLFLOW_TRACKING_URI`` says otherwise, W&B offline unless
``WANDB_MODE`` says otherwise, Trackio to its local database in the tracking folder.

Why a thread of its own (:class:`ExportFeed`): a tracker may be slow (a network server, a
first-time SQLite migration, W&B's service process starting), and the training step must
never wait for it; the run controller hands events over through a queue. Why a failure only
disables the tracker: the numbers that matter are in Foundry's own store; a tracker that
fails is reported as a warning alert on the run and stops receiving, and the run goes on.
The end of a run waits for its trackers (at most ``FLUSH_S``), so once ``handle.wait()``
returns their files are complete.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

from foundry_kernel._run_state import TERMINAL_STATES
from foundry_kernel.config import EXPORTERS, RunConfig, flatten_config
from foundry_kernel.errors import ConfigError
from foundry_kernel.metrics import event_values

__all__ = [
    "EXPORTERS",
    "ExportFeed",
    "ExportSettings",
    "Exporter",
    "check_installed",
    "export_name",
    "make_exporters",
]

log = logging.getLogger("foundry.exporters")

#: The modules each tracker needs (MLflow's local SQLite store needs SQLAlchemy and Alembic,
#: which ``mlflow-skinny`` does not bring).
REQUIRES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
}
QUEUE_LEN = 100_000
"""Updates waiting for the trackers; past that, new step metrics are dropped (and said so)."""
FLUSH_S = 60.0
"""How long the end of a run waits for its trackers to take what is queued and finish."""
MAX_PARAM_CHARS = 500
"""Longest hyperparameter value sent (MLflow's oldest limit; a long prompt list is cut)."""

_OWN_SECTIONS = frozenset({"train", "val", "eval", "rank", "mem"})


# --------------------------------------------------------------------------- checks, names


def check_installed(report_to: list[str]) -> None:
    """Refuse a ``tracking.report_to`` naming a tracker that is not installed, with the
    install command; cheap (``importlib.util.find_spec``, nothing is imported)."""
    for name in report_to:
        missing = [module for module in REQUIRES[name] if not _importable(module)]
        if missing:
            raise ConfigError(
                f"tracking.report_to includes {name!r} but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed: "
                f"pip install 'foundry[{name}]' (or drop {name!r} from tracking.report_to)",
                field="tracking.report_to",
            )


def _importable(module: str) -> bool:
    """Whether ``import module`` would find it (a ``None`` in ``sys.modules``, Python's way
    to block an import, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _split_phase(name: str) -> tuple[str, str]:
    """``("baseline/", "val/ppl")`` from ``baseline/val/ppl``: a leading segment that is
    no section of the student's own names is the phase that wrote it (the CE-only twin,
    the teacher build, its reference model); ``("", name)`` for the student's."""
    head, slash, rest = name.partition("/")
    if slash and rest and head not in _OWN_SECTIONS:
        return head + "/", rest
    return "", name


def export_name(name: str) -> str:
    """A Foundry metric name as the trackers see it: ``train/...`` and ``eval/...``, after
    the phase prefix of the CE-only twin or the teacher build (module docstring)."""
    phase, base = _split_phase(name)
    if base.startswith("val/"):
        base = "eval/" + base.removeprefix("val/")
    elif not base.startswith(("train/", "eval/")):
        base = "train/" + base
    return phase + base


def step_key(name: str) -> str:
    """The step series an exported name is plotted against: ``step`` for the student's,
    ``baseline_step``, ``teacher_build_step``... for the other phases (their steps restart)."""
    phase, _ = _split_phase(name)
    return f"{phase.rstrip('/')}_step" if phase else "step"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def hyperparameters(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as flat hyperparameters: dotted keys, scalars kept, anything else (a
    list, None) as its JSON text, so every tracker can store and compare it."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in flatten_config(config.to_dict()).items():
        out[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    return out


def summary_numbers(summary: Mapping[str, Any] | None) -> dict[str, float]:
    """The summary's finite numbers as ``summary/<dotted key>`` (lists and text left out)."""
    flat = flatten_config(summary or {})
    numbers = {f"summary/{key}": _finite(value) for key, value in flat.items()}
    return {key: value for key, value in numbers.items() if value is not None}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ExportSettings:
    """Where one run's exports go, resolved from its config, store and id."""

    run_id: str
    project: str
    folder: Path
    mlflow_uri: str
    wandb_mode: str

    @classmethod
    def for_run(cls, config: RunConfig, runs_dir: Path, run_id: str) -> ExportSettings:
        tracking = config.tracking
        folder = Path(tracking.dir) if tracking.dir is not None else Path(runs_dir) / "tracking"
        folder = folder.expanduser().resolve()
        uri = tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        return cls(
            run_id=run_id,
            project=tracking.project,
            folder=folder,
            mlflow_uri=uri,
            wandb_mode=os.environ.get("WANDB_MODE") or "offline",
        )


# --------------------------------------------------------------------------- exporters


class Exporter(Protocol):
    """One tracker. Called on the run's export thread only, one call at a time; a call
    that raises disables this exporter for the rest of the run (:class:`ExportFeed`)."""

    name: str

    def start(self, config: Mapping[str, str | int | float | bool], run_id: str) -> None:
        """Open the tracker's run and record the config as its hyperparameters."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record exported metrics (:func:`export_name`) at a step of their phase."""

    def finish(self, summary: Mapping[str, float], state: str) -> None:
        """Record the summary's numbers and the run's final state; close the run."""


class TensorBoardExporter:
    """Event files in ``<tracking dir>/tensorboard/<run id>``: scalars, the config as text
    and as the HParams plugin's session, the summary as ``summary/...`` scalars."""

    name = "tensorboard"

    def __init__(self, settings: ExportSettings) -> None:
        self.logdir = settings.folder / "tensorboard" / settings.run_id
        self._writer: Any = None
        self._hparams: dict[str, Any] = {}
        self._last_step = 0

    def start(self, config: Mapping[str, str | int | float | bool], run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.logdir))
        self._hparams = dict(config)
        _, session_start, _ = hparams(self._hparams, {})
        self._writer.file_writer.add_summary(session_start)
        text = json.dumps(dict(config), indent=1)
        self._writer.add_text("config", f"Foundry run `{run_id}`\n\n```\n{text}\n```")
        self._writer.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)
        if step_key(next(iter(metrics), "")) == "step":
            self._last_step = max(self._last_step, step)

    def finish(self, summary: Mapping[str, float], state: str) -> None:
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        for name, value in summary.items():
            self._writer.add_scalar(name, value, global_step=self._last_step)
        experiment, _, session_end = hparams(self._hparams, dict(summary))
        # torch always writes STATUS_SUCCESS; the session ends with the run's own state
        end = session_end.value[0].metadata.plugin_data
        data = plugin_data_pb2.HParamsPluginData.FromString(end.content)
        data.session_end_info.status = {
            "completed": api_pb2.STATUS_SUCCESS,
            "failed": api_pb2.STATUS_FAILURE,
        }.get(state, api_pb2.STATUS_UNKNOWN)  # cancelled, timed out
        end.content = data.SerializeToString()
        self._writer.file_writer.add_summary(experiment)
        self._writer.file_writer.add_summary(session_end)
        self._writer.close()


class MlflowExporter:
    """An MLflow run (named by the Foundry run id, tagged ``foundry.run_id``) in the
    experiment ``tracking.project``, through ``MlflowClient`` (no global active run, so
    several Foundry runs in one kernel each keep their own). A resumed Foundry run continues
    its MLflow run."""

    name = "mlflow"

    def __init__(self, settings: ExportSettings) -> None:
        self.uri = settings.mlflow_uri
        self.project = settings.project
        self._client: Any = None
        self._run = ""
        self._last_step = 0

    def start(self, config: Mapping[str, str | int | float | bool], run_id: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.project)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(self.project)
        )
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`foundry.run_id` = '{run_id}'", max_results=1
        )
        if found:
            self._run = found[0].info.run_id
            client.update_run(self._run, status="RUNNING")
            logged = set(found[0].data.params)
        else:
            created = client.create_run(
                experiment_id, run_name=run_id, tags={"foundry.run_id": run_id}
            )
            self._run, logged = created.info.run_id, set()
        params = [
            Param(key, str(value)[:MAX_PARAM_CHARS])
            for key, value in config.items()
            if key not in logged
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self._run, params=params[i : i + 100])
        self._client = client

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self._client.log_batch(self._run, metrics=batch)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(metrics, step)
        if step_key(next(iter(metrics), "")) == "step":
            self._last_step = max(self._last_step, step)

    def finish(self, summary: Mapping[str, float], state: str) -> None:
        if summary:
            self._log(summary, self._last_step)
        status = {"completed": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self._client.set_terminated(self._run, status=status)


class WandbExporter:
    """A W&B run in ``tracking.project`` written under ``<tracking dir>/wandb``, offline
    unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it later). Each phase is
    plotted against its own step (``step``, ``baseline_step``, ``teacher_build_step``), since
    W&B's own step may only grow. Console capture is off: the kernel's output stays its own."""

    name = "wandb"

    def __init__(self, settings: ExportSettings) -> None:
        self.folder = settings.folder
        self.project = settings.project
        self.mode = settings.wandb_mode
        self._run: Any = None
        self._series: set[str] = set()

    def start(self, config: Mapping[str, str | int | float | bool], run_id: str) -> None:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        init: Any = wandb.init  # (its ``mode`` is a Literal; ours is $WANDB_MODE's text)
        run = init(
            project=self.project,
            name=run_id,
            dir=str(self.folder),
            mode=self.mode,
            config=dict(config),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        self._run = run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        by_series: dict[str, dict[str, float]] = {}
        for name, value in metrics.items():
            by_series.setdefault(step_key(name), {})[name] = value
        for series, values in by_series.items():
            if series not in self._series:  # each phase against its own step
                self._series.add(series)
                phase, _ = _split_phase(next(iter(values)))
                for section in ("train", "eval"):
                    self._run.define_metric(f"{phase}{section}/*", step_metric=series)
            self._run.log({**values, series: step})

    def finish(self, summary: Mapping[str, float], state: str) -> None:
        self._run.summary.update(dict(summary))
        self._run.finish(exit_code=0 if state == "completed" else 1)


class TrackioExporter:
    """A Trackio run in ``tracking.project``, in Trackio's local database. Trackio keeps one
    database folder per process, ``TRACKIO_DIR``, read when it is first imported: when that
    is unset and Trackio not yet imported, Foundry sets it to ``<tracking dir>/trackio``
    (beside the other trackers' files), else Trackio's own folder is used. No dashboard is
    embedded and no CPU/GPU sampler started (Foundry samples memory itself)."""

    name = "trackio"

    def __init__(self, settings: ExportSettings) -> None:
        self.folder = settings.folder / "trackio"
        self.project = settings.project
        self._run: Any = None
        self._last_step = 0

    def start(self, config: Mapping[str, str | int | float | bool], run_id: str) -> None:
        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(self.folder))
        import trackio

        self._run = trackio.init(
            project=self.project,
            name=run_id,
            config=dict(config),
            resume="allow",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)
        if step_key(next(iter(metrics), "")) == "step":
            self._last_step = max(self._last_step, step)

    def finish(self, summary: Mapping[str, float], state: str) -> None:
        if summary:
            self._run.log(dict(summary), step=self._last_step)
        self._run.finish()


_CLASSES: dict[str, Callable[[ExportSettings], Exporter]] = {
    "tensorboard": TensorBoardExporter,
    "mlflow": MlflowExporter,
    "wandb": WandbExporter,
    "trackio": TrackioExporter,
}


def make_exporters(settings: ExportSettings, report_to: list[str]) -> list[Exporter]:
    """One exporter per name in ``report_to`` (checked by :func:`check_installed`)."""
    return [_CLASSES[name](settings) for name in report_to]


# --------------------------------------------------------------------------- the feed


_Item = tuple[str, int, dict[str, float], str]  # ("log"|"finish", step, values, state)


class ExportFeed:
    """A run's exporters on a thread of their own: an event subscriber that only queues
    (never waits on a tracker), and a worker that starts, feeds and finishes each exporter.

    ``warn(message)`` reports a tracker's failure (the controller makes it a warning alert
    on the run); that exporter then gets nothing more. ``summary()`` is read when the run
    reaches its final state, on the thread that declared it.
    """

    def __init__(
        self,
        exporters: list[Exporter],
        config: RunConfig,
        run_id: str,
        *,
        warn: Callable[[str], None],
        summary: Callable[[], Mapping[str, Any] | None],
    ) -> None:
        self._exporters = list(exporters)
        self._config = config
        self._run_id = run_id
        self._warn = warn
        self._summary = summary
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=QUEUE_LEN)
        self._finished = threading.Event()  # a final state was queued
        self._dropped = 0
        self._thread = threading.Thread(
            target=self._work, name=f"foundry-export-{run_id}", daemon=True
        )
        self._thread.start()

    @property
    def names(self) -> list[str]:
        return [exporter.name for exporter in self._exporters]

    def __call__(self, event: Any) -> None:
        """The run's event subscriber (the worker thread, or whichever declared the state)."""
        if self._finished.is_set():
            return
        payload = event.payload
        if event.kind in ("step", "eval") and isinstance(payload.get("step"), int):
            values = {
                export_name(name): value
                for name, value in event_values(payload)
                if math.isfinite(value)
            }
            if values:
                self._put(("log", payload["step"], values, ""), block=False)
        elif event.kind == "state" and str(payload.get("state")) in TERMINAL_STATES:
            self._finished.set()
            self._put(("finish", 0, summary_numbers(self._summary()), str(payload["state"])))

    def _put(self, item: _Item, *, block: bool = True) -> None:
        try:
            self._queue.put(item, block=block, timeout=FLUSH_S if block else None)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                self._warn(
                    f"exporters ({', '.join(self.names)}) fall behind: {QUEUE_LEN} updates "
                    "queued; later step metrics are dropped for them (the run's store has all)"
                )

    def close(self, timeout: float = FLUSH_S) -> bool:
        """Wait (bounded) for the trackers to take what is queued; True if they did."""
        if not self._finished.is_set():  # ended without a final state: close them anyway
            self._finished.set()
            self._put(("finish", 0, {}, "failed"))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        config = hyperparameters(self._config)
        live = [e for e in self._exporters if self._call(e, "start", e.start, config, self._run_id)]
        while True:
            kind, step, values, state = self._queue.get()
            for exporter in list(live):
                if kind == "log":
                    ok = self._call(exporter, "log", exporter.log, values, step)
                else:
                    ok = self._call(exporter, "finish", exporter.finish, values, state)
                if not ok:
                    live.remove(exporter)
            if kind == "finish":
                return

    def _call(self, exporter: Exporter, what: str, fn: Callable[..., None], *args: Any) -> bool:
        """One tracker call; a failure disables the tracker and is reported, never raised:
        this is the boundary to third-party code on a thread nobody else watches."""
        try:
            fn(*args)
        except Exception as exc:
            log.debug("exporter %s failed to %s", exporter.name, what, exc_info=True)
            self._warn(
                f"exporter {exporter.name!r} failed to {what} ({type(exc).__name__}: "
                f"{str(exc)[:300]}); it is off for the rest of run {self._run_id}"
            )
            return False
        return True
