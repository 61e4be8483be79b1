"""``foundry run NOTEBOOK``: execute notebooks headless with papermill, one store run each.

    foundry run distill -p max_steps 100 -p loss.beta 0.5
    foundry run distill --grid loss.beta=0,0.5,1 --jobs 2
    foundry run distill -f sweep.yaml        # a mapping, or a list of them

Why a runner on top of papermill:

- **Refuse before a kernel starts.** papermill only warns about parameters the notebook
  does not declare, and a typo then silently runs the defaults for an hour. Every name
  must be declared in the notebook's ``parameters`` cell or be a dotted config field
  (``loss.beta``, gathered into the notebook's ``config_overrides``), and the config the
  notebook will build is validated against the schema, for every member of a batch,
  before the first kernel starts.
- **The executed notebook is part of the run's record.** The runner creates the run in
  the store first, passes its ``run_id`` and ``runs_dir`` to the notebook, and has
  papermill write the executed notebook into ``runs/<run_id>/``. The notebook starts that
  prepared run (``foundry_kernel.start(config, resume=run_id)``: a run with no
  checkpoint starts from scratch).
- **Batches.** Parameter sets (a ``--grid`` product or a YAML list) run with bounded
  parallelism, each papermill execution in its own kernel process, each its own run
  sharing one ``batch_id``. A failing member does not stop the others; the exit code is
  1 if any failed; a summary table ends the output.
- **Parameters are plain data, written as literals.** papermill writes each parameter as
  Python source in an injected cell, and a type it has no rule for (bytes from a YAML
  ``!!binary``, a set, a date) as ``"<str(value)>"`` without escaping: a YAML tag ran
  code in the kernel. So parameter files and ``-p`` values are read by
  ``plaindata`` (no tags, anchors or aliases; bounded size and depth; JSON types only),
  every parameter set is rebuilt from plain types (``check_plain``), and before any run
  exists the cell papermill will inject is parsed with ``ast`` and must be exactly one
  literal assignment per parameter, equal to the checked value.
- **Progress while a notebook runs.** The kernel's run keeps its progress snapshot in
  ``<run dir>/progress.json``; a thread per execution prints it on stderr as the one
  progress line every view shows (``phase · n/N · elapsed < ETA · rates``), at each
  phase change and at most every 10 s, so a long notebook is never a silent wait.
- **Stopping is recorded.** SIGTERM or SIGINT stops the kernels this command started
  (terminate, wait, kill, bounded; jupyter_client starts them in their own session, so
  they would outlive it) and marks every unfinished run ``cancelled`` with the reason;
  the exit code is 128 + the signal number. Whatever ends the batch, no run it created
  stays ``pending`` or ``running``.

Nothing here imports the widgets: a notebook may, the runner does not.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import itertools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import yaml

from foundry_kernel.config import RunConfig, load_config, parse_plain_value
from foundry_kernel.errors import ConfigError, FoundryError
from foundry_kernel.paths import allowed_roots, default_runs_dir, new_run_id, resolve_within
from foundry_kernel.plaindata import brief, check_plain, load_plain_yaml, read_text_capped
from foundry_kernel.progress import poll_progress, progress_lines, read_progress
from foundry_kernel.store import TERMINAL_STATES, RunState, RunStore
from widgets.resources import (
    SHIPPED_NOTEBOOKS,
    edited_shipped_notebook,
    shipped_name,
    shipped_notebook,
)

__all__ = [
    "CONFIG_SHORTCUTS",
    "DEFAULT_TIMEOUT_S",
    "MAX_PARAMETER_SETS",
    "add_commands",
    "build_parser",
    "injected_assignments",
    "main",
    "notebook_config",
    "papermill_injection",
    "parameter_sets",
    "run_command",
]

CONFIG_SHORTCUTS: dict[str, str] = {
    "max_steps": "limits.max_steps",
    "loss_kind": "loss.kind",
    "distill_mode": "distill.mode",
    "top_k": "loss.top_k",
    "teacher_backend": "teacher.backend",
    "seed": "seed",
}
"""Top-level notebook parameters that set a config field (papermill names cannot hold
dots). ``config_overrides`` is applied after them, so a dotted field wins."""
OVERRIDES = "config_overrides"
CONFIG_PATH = "config_path"
RUNS_DIR = "runs_dir"
RUN_ID = "run_id"
HEADLESS = "headless"
SET_BY_RUNNER = (RUN_ID,)
DESCRIPTION = "Execute a notebook headless with papermill, as runs in the store."
DEFAULT_TIMEOUT_S = 24 * 3600.0
"""papermill's per-cell execution timeout: a backstop; ``limits.timeout_s`` is the real
limit of a run."""
MAX_PARAMETER_SETS = 1000
"""Most runs one ``foundry run`` may plan (``-f`` sets x ``--grid`` product): a typo'd
grid of 10 axes x 10 values would otherwise build 10**10 sets before refusing."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
KILL_GRACE_S = 5.0
"""Seconds a kernel gets to exit after SIGTERM before SIGKILL (and again after it)."""
_POLL_S = 0.2
PROGRESS_EVERY_S = 10.0
"""A member's progress line at each phase change and at most this often (a log, not a
terminal: ``foundry distill``'s rule for logs)."""
PROGRESS_POLL_S = 1.0
"""How often a member's progress file is read (the run rewrites it at most every 2 s)."""
_PREFLIGHT_RUN_ID = "00000000-000000-preflight-00000000"


# --------------------------------------------------------------------------- the config


def notebook_config(
    *,
    config_path: str | Path | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    runs_dir: str | Path | None = None,
    **shortcuts: Any,
) -> RunConfig:
    """The run config a notebook builds from its parameters (shared with the runner).

    Order: the config file (or defaults), the shortcut parameters (``max_steps``, ...)
    that are not None, then ``config_overrides`` (dotted keys), then ``runs_dir``.
    """
    unknown = sorted(set(shortcuts) - set(CONFIG_SHORTCUTS))
    if unknown:
        raise ConfigError(
            f"unknown config parameter(s) {unknown}; known: {sorted(CONFIG_SHORTCUTS)}",
            field=unknown[0],
        )
    overrides: dict[str, Any] = {
        CONFIG_SHORTCUTS[name]: value for name, value in shortcuts.items() if value is not None
    }
    if config_overrides:
        if not isinstance(config_overrides, Mapping):
            raise ConfigError(
                f"{OVERRIDES} must be a mapping of dotted fields, got {brief(config_overrides)}",
                field=OVERRIDES,
            )
        overrides.update(config_overrides)
    if runs_dir is not None:
        overrides["runs_dir"] = str(runs_dir)
    source = None
    if config_path is not None:
        source = resolve_within(config_path, allowed_roots(), field=CONFIG_PATH, must_exist=True)
    return load_config(source, overrides)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Declared:
    """A notebook's parameters cell: names and literal defaults."""

    defaults: dict[str, Any]
    expressions: frozenset[str] = frozenset()

    def require(self, *names: str, notebook: Path) -> None:
        missing = [n for n in names if n not in self.defaults]
        if missing:
            raise ConfigError(
                f"{notebook.name} does not declare {missing} in its parameters cell; "
                "foundry run passes the prepared run through them (use papermill directly "
                "for other notebooks)",
                field="notebook",
            )


def check_notebook(path: str | Path) -> Path:
    """A shipped notebook by name (``distill``), or an existing ``.ipynb`` under the
    allowed roots (see ``paths.allowed_roots``).

    A shipped notebook - by name, or its package file given as a path - runs only as it
    shipped: edits made to it in JupyterLab are refused with the way out (your own copy
    by path), never executed headless.
    """
    if isinstance(path, str) and path.removesuffix(".ipynb") in SHIPPED_NOTEBOOKS:
        return _pristine(path.removesuffix(".ipynb"))
    resolved = resolve_within(path, allowed_roots(), field="notebook", must_exist=True)
    if resolved.suffix != ".ipynb" or not resolved.is_file():
        raise ConfigError(f"notebook: {str(path)!r} is not an .ipynb file", field="notebook")
    name = shipped_name(resolved)
    return resolved if name is None else _pristine(name)


def _pristine(name: str) -> Path:
    """The shipped notebook ``name``, refused when it no longer is what shipped."""
    edited = edited_shipped_notebook(name)
    if edited is not None:
        raise ConfigError(
            f"notebook: {edited}. `foundry run {name}` executes the shipped notebook only: "
            f"restore it (reinstall Foundry, or `git checkout` it in a checkout), and to run "
            f"your changes save a copy elsewhere and pass its path (foundry run my-{name}.ipynb)",
            field="notebook",
        )
    return shipped_notebook(name)


def _clean_input(notebook: Path) -> Any:
    """The notebook to execute, without what a Jupyter frontend saved into it.

    papermill clears outputs, not the widget state JupyterLab stores in the notebook's
    metadata (megabytes after a panel session), which every executed copy carried.
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def declared_parameters(notebook: Path) -> Declared:
    """Names and defaults of the notebook's ``parameters`` cell (papermill's parser)."""
    from papermill.inspection import inspect_notebook

    found = inspect_notebook(str(notebook))
    if not found:
        raise ConfigError(
            f"{notebook.name} has no cell tagged 'parameters' (or it declares nothing)",
            field="notebook",
        )
    defaults: dict[str, Any] = {}
    expressions = set()
    for name, info in found.items():
        text = str(info.get("default", "None"))
        try:
            defaults[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            defaults[name] = text  # an expression: its value is unknown before running
            expressions.add(name)
    return Declared(defaults, frozenset(expressions))


def _parse_value(text: str, name: str) -> Any:
    """A command-line value as YAML plain data, like ``--set`` (``config.parse_plain_value``)."""
    return parse_plain_value(text, field=name)


def _check_type(name: str, value: Any, declared: Declared) -> None:
    """A value must have its default's type; None, and defaults that are expressions or
    None, accept anything (the notebook decides)."""
    default = declared.defaults[name]
    if value is None or default is None or name in declared.expressions:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"parameter {name}: {brief(value)} is a {type(value).__name__}; the notebook's "
            f"default {brief(default)} is a {type(default).__name__}",
            field=name,
        )


def _unknown(name: str, declared: Declared, notebook: Path) -> ConfigError:
    allowed = sorted(n for n in declared.defaults if n not in SET_BY_RUNNER)
    hint = difflib.get_close_matches(name, allowed, n=1)
    fix = f"did you mean {hint[0]!r}? " if hint else ""
    dotted = " or a dotted config field like loss.beta" if OVERRIDES in declared.defaults else ""
    return ConfigError(
        f"unknown parameter {brief(name)} for {notebook.name}; {fix}allowed: "
        f"{', '.join(allowed)}{dotted}",
        field=name,
    )


@dataclass
class Member:
    """One notebook execution: its parameters, the config they make, its run."""

    index: int
    label: str
    params: dict[str, Any]
    config: RunConfig
    run_id: str = ""
    run_dir: Path | None = None
    output: Path | None = None
    error: str | None = None
    seconds: float = 0.0
    started: bool = False
    state: str = "pending"
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_member(
    index: int,
    given: Mapping[str, Any],
    declared: Declared,
    notebook: Path,
    runs_dir: Path,
    *,
    label_keys: Sequence[str] | None = None,
) -> Member:
    """Check one parameter set and build its config, naming the member in any error.

    ``label_keys`` limits the member's label to those (flattened) parameters: in a batch,
    the ones that vary between members.
    """
    label = _label(given, label_keys)
    try:
        params, config = _resolve(given, declared, notebook, runs_dir)
    except ConfigError as exc:
        raise ConfigError(f"parameter set {index} ({label}): {exc}", field=exc.field) from None
    return Member(index, label, params, config)


def _flat(given: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters with ``config_overrides`` spread into its dotted fields."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == OVERRIDES and isinstance(value, Mapping):
            out.update({str(k): v for k, v in value.items()})
        else:
            out[key] = value
    return out


def varying_keys(sets: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """Parameters whose values differ between the sets (None for a single set)."""
    if len(sets) < 2:
        return None
    flats = [_flat(s) for s in sets]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    missing = object()
    return [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]


def _label(given: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A short description of a parameter set for progress lines and the summary."""
    flat = _flat(given)
    shown = flat if keys is None else {k: flat.get(k) for k in keys}
    text = ", ".join(f"{k}={_short(v)}" for k, v in shown.items()) or "defaults"
    return text if len(text) <= 120 else text[:117] + "..."


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else brief(value, 40)
    return text if len(text) <= 40 else text[:37] + "..."


def _resolve(
    given: Mapping[str, Any], declared: Declared, notebook: Path, runs_dir: Path
) -> tuple[dict[str, Any], RunConfig]:
    given = check_plain(dict(given))  # whoever built the set: nothing but plain types
    plain = {k: v for k, v in given.items() if "." not in k}
    dotted = {k: v for k, v in given.items() if "." in k}
    for name, value in plain.items():
        if name in SET_BY_RUNNER:
            raise ConfigError(f"parameter {name} is set by foundry run itself", field=name)
        if name not in declared.defaults:
            raise _unknown(name, declared, notebook)
        _check_type(name, value, declared)
    if dotted and OVERRIDES not in declared.defaults:
        raise _unknown(next(iter(dotted)), declared, notebook)
    params = dict(plain)
    overrides = plain.get(OVERRIDES, declared.defaults.get(OVERRIDES)) or {}
    if dotted:
        params[OVERRIDES] = overrides = {**dict(overrides), **dotted}
    for shortcut, name in CONFIG_SHORTCUTS.items():
        # config_overrides is applied last in the notebook: it would silently win
        if shortcut in plain and isinstance(overrides, Mapping) and name in overrides:
            raise ConfigError(
                f"{name} given twice: as {shortcut} and in {OVERRIDES}; give it once",
                field=name,
            )
    params[RUNS_DIR] = str(runs_dir)
    if HEADLESS in declared.defaults and HEADLESS not in plain:
        # Explicit: a `!foundry run` from a JupyterLab cell passes the session's
        # JPY_SESSION_NAME on to papermill's kernel, which would then look interactive.
        params[HEADLESS] = True
    merged = {**declared.defaults, **params}
    config_args = {k: merged[k] for k in (CONFIG_PATH, OVERRIDES, RUNS_DIR) if k in merged}
    config_args.update({k: merged[k] for k in CONFIG_SHORTCUTS if k in merged})
    return params, notebook_config(**config_args)


def parameter_sets(
    pairs: Sequence[Sequence[str]], files: Sequence[Path], grid: Sequence[str]
) -> list[dict[str, Any]]:
    """``-f`` sets x ``--grid`` product, each with the ``-p`` values on top."""
    fixed = {name: _parse_value(value, name) for name, value in pairs}
    file_sets = [_read_sets(path) for path in files]
    axes = [_grid_axis(spec) for spec in grid]
    count = math.prod(len(sets) for sets in file_sets) * math.prod(len(v) for _, v in axes)
    if count > MAX_PARAMETER_SETS:
        raise ConfigError(
            f"these -f files and --grid axes make {count:,} parameter sets; at most "
            f"{MAX_PARAMETER_SETS:,} runs can be planned at once",
            field="grid",
        )
    bases: list[dict[str, Any]] = [{}]
    for sets in file_sets:
        bases = [{**b, **f} for b in bases for f in sets]
    for key, _ in axes:
        if key in fixed:
            raise ConfigError(f"{key} is given by both -p and --grid", field=key)
    names = [key for key, _ in axes]
    combos = [
        dict(zip(names, values, strict=True)) for values in itertools.product(*(v for _, v in axes))
    ]
    return [{**base, **fixed, **combo} for base in bases for combo in combos]


def _grid_axis(spec: str) -> tuple[str, list[Any]]:
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--grid {brief(spec)} must look like key=v1,v2,...", field="grid")
    return key, [_parse_value(v, key) for v in values.split(",")]


def _read_sets(path: Path) -> list[dict[str, Any]]:
    """A params file: plain YAML (``plaindata``), a mapping or a non-empty list of them."""
    resolved = resolve_within(path, allowed_roots(), field="params file", must_exist=True)
    where = f"params file {brief(str(path), 200)}"
    text = read_text_capped(resolved, field="params file")
    try:
        loaded = load_plain_yaml(text, source=where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}", field="params file") from None
    sets = [loaded] if isinstance(loaded, dict) else loaded
    if not isinstance(sets, list) or not all(isinstance(s, dict) for s in sets) or not sets:
        raise ConfigError(
            f"{where}: must hold a mapping of parameters or a list of mappings",
            field="params file",
        )
    return sets


# --------------------------------------------------------------------------- injection


def papermill_injection(nb: Any, params: Mapping[str, Any]) -> str:
    """The source of the cell papermill injects for ``params`` (its own code path:
    ``parameterize_notebook``, as ``execute_notebook`` calls it)."""
    from papermill.parameterize import parameterize_notebook

    injected = parameterize_notebook(nb, dict(params))
    (cell,) = [c for c in injected.cells if "injected-parameters" in c.metadata.get("tags", [])]
    return str(cell.source)


def injected_assignments(source: str) -> dict[str, Any]:
    """``name = <literal>`` statements of an injected cell as a dict; anything else (a
    call, an operator between literals, a second statement per name) is refused."""
    out: dict[str, Any] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConfigError(f"the injected parameters do not parse: {exc.msg}") from None
    for node in tree.body:
        if (
            not isinstance(node, ast.Assign)
            or len(node.targets) != 1
            or not isinstance(node.targets[0], ast.Name)
            or node.targets[0].id in out
        ):
            raise ConfigError(
                f"the injected parameters hold a statement other than name = value: "
                f"{brief(ast.unparse(node), 120)}"
            )
        target = node.targets[0]
        try:
            out[target.id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise ConfigError(
                f"parameter {target.id}: papermill would write {brief(ast.unparse(node.value))}, "
                "which is not a literal"
            ) from None
    return out


def same_plain(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``1 == 1.0 == True`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_plain(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_plain(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _check_injection(nb: Any, member: Member) -> None:
    """Refuse a parameter set unless papermill writes it as exactly its literals.

    Checked with a stand-in run id before any run exists (the real one is a validated
    ``[a-z0-9_-]`` id, written the same way).
    """
    params = {**member.params, RUN_ID: _PREFLIGHT_RUN_ID}
    written = injected_assignments(papermill_injection(nb, params))
    if not same_plain(written, params):
        differ = sorted(k for k in params if not same_plain(written.get(k), params[k]))
        raise ConfigError(
            f"parameter set {member.index} ({member.label}): papermill would not write "
            f"{differ or sorted(written)} as the given values",
            field=(differ or ["notebook"])[0],
        )


# --------------------------------------------------------------------------- executing


def _prepare(members: list[Member], store: RunStore, notebook: Path) -> str | None:
    """Create each member's run (sharing a batch id when there are several)."""
    batch_id = new_run_id("batch") if len(members) > 1 else None
    for member in members:
        record = store.create_run(
            member.config.to_dict(), name=member.config.name, kind="distill", batch_id=batch_id
        )
        member.run_id = record.run_id
        member.params[RUN_ID] = record.run_id
        member.run_dir = store.run_dir(record.run_id)
        member.output = member.run_dir / f"{notebook.stem}.ipynb"
        store.add_event(
            record.run_id, "notebook", f"foundry run {notebook.name} with {member.label}"
        )
    return batch_id


class _Stop:
    """SIGTERM / SIGINT while the batch runs: remembered here, acted on by the main loop.

    The handler only records the signal (it may land between any two bytecodes, even
    inside a store write); ``_run_all`` then stops the kernels and ``_record_outcome``
    marks the runs. Installed only in the main thread (``signal`` allows no other).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[_Stop]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def reason(self) -> str:
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal"
        return f"foundry run was stopped by {name}"


def _format_safe(path: Path | str) -> str:
    """papermill ``str.format``s its paths with the parameters: braces in a folder name
    would pull parameter values into the path, so they are escaped."""
    return str(path).replace("{", "{{").replace("}", "}}")


def _execute(
    member: Member, notebook: Path, timeout_s: float, stop: _Stop, tag: str = ""
) -> Member:
    """Run one member's notebook with papermill; failures become ``member.error``.
    Its run's progress lines go to stderr meanwhile, each after ``tag``."""
    if stop.requested:  # queued behind --jobs when the signal came: never started
        return member
    member.started = True
    t0 = time.monotonic()
    with _progress_of(member, tag or f"[{member.index}]"):
        _papermill(member, notebook, timeout_s)
    member.seconds = time.monotonic() - t0
    return member


def _papermill(member: Member, notebook: Path, timeout_s: float) -> None:
    """One papermill execution into the member's run folder."""
    import papermill
    from papermill.exceptions import PapermillException, PapermillExecutionError

    try:
        papermill.execute_notebook(
            _clean_input(notebook),
            _format_safe(member.output or ""),
            parameters=member.params,
            progress_bar=False,
            log_output=False,
            execution_timeout=timeout_s,
        )
    except PapermillExecutionError as exc:
        member.error = f"cell [{exc.exec_count}] raised {exc.ename}: {exc.evalue}"
    except (PapermillException, TimeoutError, RuntimeError, OSError) as exc:
        # kernel start failure, dead kernel (RuntimeError), a cell over the timeout
        member.error = f"{type(exc).__name__}: {exc}"


@contextmanager
def _progress_of(member: Member, tag: str) -> Iterator[None]:
    """While the body runs (papermill executing the member's notebook), a thread prints
    the progress of the member's run on stderr: the kernel's run controller keeps it in
    ``<run dir>/progress.json`` (the run is the one ``_prepare`` created: the notebook
    starts it by its id), read every PROGRESS_POLL_S and printed as the one progress
    line at each phase change and at most every PROGRESS_EVERY_S, after ``tag``."""
    run_dir = member.run_dir
    if run_dir is None:
        yield
        return
    over = threading.Event()

    def follow() -> None:
        snapshots = poll_progress(
            lambda: read_progress(run_dir, now=time.time()), over.wait, poll_s=PROGRESS_POLL_S
        )
        for line in progress_lines(snapshots, every_s=PROGRESS_EVERY_S):
            _say(f"{tag} {line}")

    watcher = threading.Thread(
        target=follow, name=f"foundry-run-progress-{member.index}", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        over.set()
        watcher.join()


def _record_outcome(member: Member, store: RunStore, stop: _Stop) -> None:
    """Make the store agree with what happened: a run the notebook never finished is
    ``failed``, or ``cancelled`` when a signal stopped the batch (with the reason)."""
    record = store.get_run(member.run_id)
    if record.state not in TERMINAL_STATES:
        state: RunState
        if stop.requested:
            when = "while its notebook ran" if member.started else "before its notebook started"
            state, reason = RunState.CANCELLED, f"{stop.reason} {when}"
        else:
            state = RunState.FAILED
            reason = member.error or "the notebook ended without finishing the run"
        store.set_state(member.run_id, state, error=reason)
        store.add_event(member.run_id, state.value, reason)
    if member.output is not None:
        store.update_summary(member.run_id, {"notebook": str(member.output)})
    record = store.get_run(member.run_id)
    member.state, member.summary = record.state, record.summary
    if member.state != "completed" and member.error is None:
        member.error = record.error or member.state


def _child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


def _stop_kernels(baseline: set[int], grace_s: float = KILL_GRACE_S) -> int:
    """Terminate, wait, kill (bounded: 2 x ``grace_s``) every process started since
    ``baseline`` was taken - papermill's kernels - and everything they started."""
    procs: list[psutil.Process] = []
    for child in psutil.Process().children():
        if child.pid in baseline:
            continue
        try:
            procs += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def _run_all(
    members: list[Member], notebook: Path, jobs: int, timeout_s: float, stop: _Stop
) -> None:
    """Execute with ``jobs`` kernels at once; on a stop signal, stop every kernel (also
    one a worker starts while the others are being stopped) until all workers return."""
    total = len(members)
    baseline = _child_pids()
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, total)))
    try:
        pending: set[Future[Member]] = set()
        for member in members:
            _say(f"[{member.index}/{total}] {member.run_id}: {member.label}")
            # the run's lines: a batch member's after its label (the settings that vary)
            tag = f"[{member.index}/{total}]" + (f" {member.label} ·" if total > 1 else "")
            pending.add(pool.submit(_execute, member, notebook, timeout_s, stop, tag))
        announced = False
        while pending:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                m = future.result()
                outcome = "ok" if m.error is None else f"FAILED - {m.error}"
                if m.started:
                    _say(f"[{m.index}/{total}] {m.run_id}: {outcome} ({m.seconds:.0f} s)")
            if stop.requested:
                if not announced:
                    _say(f"{stop.reason}: stopping the kernels, cancelling unfinished runs")
                    announced = True
                _stop_kernels(baseline)
    finally:
        pool.shutdown(wait=True)


def _say(text: str) -> None:
    print(f"foundry run: {text}", file=sys.stderr, flush=True)


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def summary_table(members: Sequence[Member], batch_id: str | None) -> str:
    """One line per member: state, key metrics, time, parameters."""
    head = f"{'run id':<44} {'state':<10} {'student':>8} {'CE-only':>8} {'agree':>6} {'time':>6}"
    lines = [f"batch {batch_id}" if batch_id else "", head + "  parameters"]
    for m in members:
        student = m.summary.get("student") or {}
        baseline = m.summary.get("baseline") or {}
        ppl = _num(student.get("val_ppl"), "8.2f")
        base = _num(baseline.get("val_ppl"), "8.2f")
        agree = _num(m.summary.get("agreement"), "6.1%")
        lines.append(
            f"{m.run_id:<44} {m.state:<10} {ppl:>8} {base:>8} {agree:>6} "
            f"{m.seconds:5.0f}s  {m.label}"
        )
    for m in members:
        if m.error:
            lines.append(f"{m.run_id}: {m.error}")
        if m.output is not None:
            lines.append(f"{m.run_id}: executed notebook {m.output}")
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------- command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "notebook",
        nargs="?",
        default="distill",
        help="the notebook to execute: a shipped one by name (default: distill, as shipped) "
        "or the path of your own .ipynb",
    )
    parser.add_argument(
        "-p",
        "--parameter",
        dest="parameters",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter or a dotted config field (value parsed as YAML); repeatable",
    )
    parser.add_argument(
        "-f",
        "--parameters-file",
        dest="files",
        type=Path,
        action="append",
        default=[],
        metavar="PARAMS.yaml",
        help="YAML: a mapping of parameters, or a list of mappings (one run each)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run every combination of these values (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="notebooks executed at once")
    parser.add_argument(
        "--runs-dir", type=Path, help="run store (default: $FOUNDRY_RUNS_DIR, the project's runs/)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds one cell may run before papermill stops it",
    )


def add_commands(subparsers: Any) -> None:
    """Add ``foundry run`` to the ``foundry`` command line (``handler`` convention)."""
    parser = subparsers.add_parser(
        "run",
        help="execute a notebook headless with papermill, as a run in the store",
        description=DESCRIPTION,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run_command)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``foundry run``'s arguments (tests, ``python -m``)."""
    parser = argparse.ArgumentParser(prog="foundry run", description=DESCRIPTION)
    _add_arguments(parser)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Validate everything, then execute; exit 0 if every run completed, 2 on bad usage,
    128 + the signal number when SIGTERM/SIGINT stopped the batch."""
    try:
        members, notebook, runs_dir = _plan(args)
    except FoundryError as exc:
        print(f"foundry run: error: {exc}", file=sys.stderr)
        return 2
    print(f"foundry run: run store {runs_dir}", file=sys.stderr, flush=True)
    stop = _Stop()
    batch_id = None
    with RunStore(runs_dir) as store, stop.installed():
        try:
            batch_id = _prepare(members, store, notebook)
            _run_all(members, notebook, args.jobs, args.timeout, stop)
        finally:  # whatever ended the batch, no run it created stays pending or running
            for member in members:
                if member.run_id:
                    _record_outcome(member, store, stop)
    print(summary_table(members, batch_id))
    if stop.signum is not None:
        return 128 + stop.signum
    return 0 if all(m.state == "completed" for m in members) else 1


def _plan(args: argparse.Namespace) -> tuple[list[Member], Path, Path]:
    """Everything that can be refused, refused before any kernel or run exists."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}", field="jobs")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}", field="timeout")
    notebook = check_notebook(args.notebook)
    given_runs_dir = args.runs_dir or default_runs_dir()
    resolve_within(given_runs_dir, allowed_roots(), field="--runs-dir")
    runs_dir = given_runs_dir.expanduser().absolute()
    sets = parameter_sets(args.parameters, args.files, args.grid)  # before papermill loads
    declared = declared_parameters(notebook)
    declared.require(RUN_ID, RUNS_DIR, notebook=notebook)
    keys = varying_keys(sets)
    members = [
        resolve_member(i, given, declared, notebook, runs_dir, label_keys=keys)
        for i, given in enumerate(sets, start=1)
    ]
    from papermill.iorw import load_notebook_node

    nb = load_notebook_node(str(notebook))
    for member in members:
        _check_injection(nb, member)
    return members, notebook, runs_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``foundry run`` without the rest of the CLI: ``main(["nb.ipynb", "-p", "x", "1"])``."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
