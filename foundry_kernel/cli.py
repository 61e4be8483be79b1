"""The ``foundry`` command line.

Exit codes (a contract for scripts and CI):
  0 completed · 1 the run failed · 2 bad usage or config · 124 timed out · 130 cancelled.

``foundry distill --json`` ends stdout with one JSON object
(``foundry_kernel.summary.RunSummary.to_json``): ``run_id``, ``state``, ``duration_s``,
``teacher``, ``student``, ``baseline`` (each with ``params`` and ``val_ppl``), ``agreement``
and ``val_kl``;
``logit_cache`` (offline mode: path, k, bytes_per_token, capture_seconds) and
``sequence`` (sequence mode: the teacher-written data) are null in other modes;
``world_size`` (the number of processes that trained it: 1 for one process) and
``strategy`` (``distributed.strategy``, ``ddp`` or ``fsdp2``; ``single`` for one process).
Progress goes to stderr, throttled, so stdout stays machine-readable.

Several processes (README "Scaling out"): ``foundry distill --nproc-per-node N [--nnodes
M --node-rank R | --nnodes 1:4] [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--rdzv-conf
K=V] [--master-port P] ...`` runs ``python -m torch.distributed.run <those> -m
foundry_kernel distill <the rest>`` (an argument list, in its own session) and exits with
the run's code above; Ctrl-C asks every rank to stop at its next step boundary, a second
one kills them. ``torchrun --nproc-per-node N -m foundry_kernel distill ...`` is the same
run for users with a launcher of their own: rank 0 creates the run and prints the result;
under torchrun a rank exits 0 when the run completed, was cancelled or timed out (the
state is in the store) and 1 when it failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from foundry_kernel._context import Event
from foundry_kernel._run_state import TERMINAL_STATES
from foundry_kernel.config import (
    RunConfig,
    flatten_config,
    json_schema,
    load_config,
    varying_settings,
)
from foundry_kernel.errors import ConfigError, FoundryError
from foundry_kernel.logs import Throttle, configure_logging
from foundry_kernel.paths import default_runs_dir, runs_dir_for, validate_run_id
from foundry_kernel.progress import format_duration
from foundry_kernel.store import RunRecord, RunStore
from foundry_kernel.summary import ROLES, RunSummary
from foundry_kernel.teachers import _vllm_server as vllm_server

EXIT = {"completed": 0, "failed": 1, "timed_out": 124, "cancelled": 130}

# The workbench's commands live in ``widgets`` and are imported only when one is used: the
# engine imports nothing of Jupyter, and ``foundry distill`` does not pay for it. Each
# command's module parses its own arguments: ``main(argv)``, where ``argv`` starts with the
# command's name for the launchers (one ``main`` serves both) and without it for ``run``.
WORKBENCH_COMMANDS: dict[str, tuple[str, bool, str]] = {
    "run": (
        "widgets.runner",
        False,
        "execute a notebook headless with papermill, as a run in the store "
        "(`foundry run distill --help`)",
    ),
    "dashboard": (
        "widgets.launchers",
        True,
        "serve the read-only results dashboard (Voila) on 127.0.0.1, or --export an "
        "offline HTML report",
    ),
    "lab": ("widgets.launchers", True, "start JupyterLab on 127.0.0.1 with a token"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    distill = sub.add_parser("distill", help="run a distillation headless, in this process")
    distill.add_argument("--config", type=Path, help="YAML or JSON config file")
    distill.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set loss.temperature=2 (repeatable)",
    )
    distill.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run")
    distill.add_argument(
        "--runs-dir",
        type=Path,
        help="run store (default: runs_dir, $FOUNDRY_RUNS_DIR, the project's runs/)",
    )
    distill.add_argument("--json", action="store_true", help="end stdout with a JSON summary")
    _add_launch_arguments(distill)
    distill.set_defaults(handler=_distill)

    runs = sub.add_parser("runs", help="list runs in the store (or delete finished ones: --prune)")
    runs.add_argument("--runs-dir", type=Path)
    runs.add_argument("--json", action="store_true", help="the raw records, as JSON")
    runs.add_argument(
        "--prune", action="store_true", help="delete runs (a dry-run listing without --yes)"
    )
    runs.add_argument(
        "--state",
        default="failed,cancelled",
        help="with --prune: the states to delete, comma-separated (default failed,cancelled)",
    )
    runs.add_argument(
        "--older-than", type=float, metavar="DAYS", help="with --prune: created over DAYS ago"
    )
    runs.add_argument("--yes", action="store_true", help="with --prune: really delete them")
    runs.set_defaults(handler=_runs)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run_id")
    show.add_argument("--runs-dir", type=Path)
    show.add_argument("--json", action="store_true", help="the raw record, as JSON")
    show.set_defaults(handler=_show)

    export = sub.add_parser(
        "export", help="re-export a completed run's student (weights, tokenizer, model card)"
    )
    export.add_argument("run_id")
    export.add_argument("dir", type=Path, help="folder to write (must be empty or absent)")
    export.add_argument("--runs-dir", type=Path)
    export.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    export.set_defaults(handler=_export)

    schema = sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(handler=_schema)
    for name, (_module, _named, text) in WORKBENCH_COMMANDS.items():
        # add_help=False: ``foundry run --help`` reaches the command's own parser.
        sub.add_parser(name, help=text, add_help=False)
    vllm_server.add_commands(sub)
    return parser


LAUNCH_ARGUMENTS = (
    "nproc_per_node",
    "nnodes",
    "node_rank",
    "rdzv_endpoint",
    "rdzv_id",
    "rdzv_conf",
    "master_port",
)


def _add_launch_arguments(distill: argparse.ArgumentParser) -> None:
    """torchrun's launch arguments (given: Foundry runs the run under torchrun) and the
    hidden ones a notebook's supervisor passes to rank 0."""
    group = distill.add_argument_group("several processes (torchrun)")
    group.add_argument("--nproc-per-node", type=int, help="processes on this node")
    group.add_argument("--nnodes", help="nodes: a count (2) or an elastic range (1:4)")
    group.add_argument("--node-rank", type=int, help="this node's rank (0 .. nnodes-1)")
    group.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (many nodes)")
    group.add_argument("--rdzv-id", help="the job's id at the rendezvous (the same everywhere)")
    group.add_argument("--rdzv-conf", help="rendezvous options, e.g. join_timeout=60")
    group.add_argument("--master-port", type=int, help="one node's rendezvous port")
    hidden = argparse.SUPPRESS
    distill.add_argument("--attach", help=hidden)
    distill.add_argument("--attach-resume", action="store_true", help=hidden)
    distill.add_argument("--control-dir", type=Path, help=hidden)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    configure_logging(args.log_level)
    if args.command in WORKBENCH_COMMANDS:
        module, named, _text = WORKBENCH_COMMANDS[args.command]
        command_main = importlib.import_module(module).main
        return int(command_main([args.command, *rest] if named else rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.handler(args))
    except FoundryError as exc:
        print(f"foundry: error: {exc}", file=sys.stderr)
        return 2


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from foundry_kernel._world import launched_by_torchrun

    if args.attach is not None or launched_by_torchrun():
        return _distill_rank(args)
    if any(getattr(args, name) is not None for name in LAUNCH_ARGUMENTS):
        return _distill_launch(args)
    return _distill_here(args)


def _distill_launch(args: argparse.Namespace) -> int:
    """Run this distillation under torchrun (``--nproc-per-node`` and friends)."""
    import tempfile

    from foundry_kernel.run._launch import LaunchSpec, launch_foreground

    spec = LaunchSpec(
        nproc_per_node=1 if args.nproc_per_node is None else args.nproc_per_node,
        nnodes=str(args.nnodes or "1"),
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        rdzv_conf=args.rdzv_conf,
        master_port=args.master_port,
    )
    if args.resume:
        validate_run_id(args.resume)
    else:  # a bad config is refused here (exit 2), before any process starts
        load_config(args.config, _overrides(args))
    with tempfile.TemporaryDirectory(prefix="foundry-launch-") as control:
        return launch_foreground(spec, _worker_arguments(args), Path(control))


def _worker_arguments(args: argparse.Namespace) -> list[str]:
    """The user's non-launch arguments, as each rank's ``foundry distill`` gets them."""
    out = ["--log-level", args.log_level] if args.log_level != "WARNING" else []
    if args.config is not None:
        out += ["--config", str(Path(args.config).resolve())]
    for item in args.overrides:
        out += ["--set", item]
    if args.resume:
        out += ["--resume", args.resume]
    if args.runs_dir is not None:
        out += ["--runs-dir", str(Path(args.runs_dir).resolve())]
    if args.json:
        out.append("--json")
    return out


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.runs_dir is not None:
        overrides.append(f"runs_dir={args.runs_dir}")
    return overrides


def _distill_rank(args: argparse.Namespace) -> int:
    """One torchrun worker (``torch.distributed.elastic``'s ``record`` puts an uncaught
    exception in torchrun's error summary, naming the rank)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    code = record(_run_rank)(args)
    return 1 if code is None else int(code)


def _run_rank(args: argparse.Namespace) -> int:
    from foundry_kernel.run._worker import RankRequest, run_rank

    if args.resume:
        validate_run_id(args.resume)
    if args.attach:
        validate_run_id(args.attach)
    given = None
    if args.config is not None or not (args.resume or args.attach):
        given = (
            load_config(args.config) if args.resume else load_config(args.config, _overrides(args))
        )
    request = RankRequest(
        config=given,
        overrides=_overrides(args) if args.resume or args.attach else [],
        resume=args.resume,
        attach=args.attach,
        attach_resume=args.attach_resume,
        runs_dir=args.runs_dir,
        control_dir=args.control_dir,
    )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        _print_store(request.runs_dir or (given.runs_dir if given is not None else None))
    handle, world = run_rank(request, on_event=_progress_printer() if main_rank else None)
    if handle is None:
        return 2 if main_rank else 1
    if world.is_main and args.attach is None:
        _report(handle, args, world_size=world.world_size)
    return 1 if str(handle.state) == "failed" else 0


def _distill_here(args: argparse.Namespace) -> int:
    from foundry_kernel.run._control import run_sync

    overrides = list(args.overrides)
    if args.runs_dir is not None:
        overrides.append(f"runs_dir={args.runs_dir}")
    given_runs_dir = args.runs_dir
    if args.resume:
        validate_run_id(args.resume)
        _print_store(given_runs_dir)
        # The run's saved config (or --config) with the --set overrides on top; the
        # controller refuses overrides that would change what the run is.
        given = load_config(args.config) if args.config else None
        handle = run_sync(
            given, resume=args.resume, overrides=overrides, on_event=_progress_printer()
        )
    else:
        config = load_config(args.config, overrides)
        _print_store(config.runs_dir)
        handle = run_sync(config, on_event=_progress_printer())
    _report(handle, args, world_size=1)
    return EXIT.get(str(handle.state), 1)


def _report(handle: Any, args: argparse.Namespace, *, world_size: int) -> None:
    """The human summary on stderr and, with ``--json``, the result object on stdout."""
    result = RunSummary.parse(handle.result)
    run_id, state, duration = handle.id, str(handle.state), handle.duration_s
    if handle.error is not None:
        print(f"foundry: run {run_id} {state}: {handle.error}", file=sys.stderr)
    else:
        text = render_summary(result, run_id=run_id, state=state, duration_s=duration)
        print(text, file=sys.stderr)
    if args.json:
        payload = result.to_json(run_id=run_id, state=state, duration_s=duration)
        # the job records both in its summary; a run that ended before recording them
        # (a failure in the first phases) still says how it was launched
        if payload.get("world_size") is None:
            payload["world_size"] = world_size
        if payload.get("strategy") is None:
            strategy = handle.config.distributed.strategy
            payload["strategy"] = strategy if world_size > 1 else "single"
        print(json.dumps(payload, default=str))


def _print_store(configured: Path | None) -> None:
    """Say which store the run goes to: the default one depends on the folder."""
    print(f"foundry: run store {runs_dir_for(configured)}", file=sys.stderr, flush=True)


def _progress_printer() -> Any:
    """Progress on stderr as the one line every view shows (:mod:`foundry_kernel.progress`):
    on a terminal one line that updates in place (at most 4 times a second), elsewhere
    (a log, CI) a line per phase change and at most one per 10 s; alerts on lines of
    their own."""
    from foundry_kernel.progress import ProgressLines, format_progress
    from foundry_kernel.run._control import get

    tty = sys.stderr.isatty()
    lines = ProgressLines(every_s=10.0)
    redraw = Throttle(0.25)

    def on_event(event: Event) -> None:
        if event.kind == "alert":
            print(("\n" if tty else "") + f"[{event.run_id}] alert: {event.payload.get('message')}",
                  file=sys.stderr)  # fmt: skip
            return
        handle = get(event.run_id)
        if handle is None:
            return
        progress = handle.progress
        if tty:
            if redraw.ready() or event.kind in ("phase", "state"):
                end = "\n" if progress.finished else ""
                print(f"\r\x1b[2K{format_progress(progress)}", end=end, file=sys.stderr, flush=True)
            return
        text = lines.next(progress, event.time)
        if text is not None:
            print(f"[{event.run_id}] {text}", file=sys.stderr, flush=True)

    return on_event


def render_summary(
    summary: RunSummary, *, run_id: str, state: str, duration_s: float | None
) -> str:
    """A plain-language result a non-engineer can read."""
    lines = [f"run {run_id}: {state} in {duration_s or 0:.0f} s"]
    for name in ROLES:
        part = summary.role(name)
        if part is not None and part.params is not None and part.val_ppl is not None:
            lines.append(
                f"  {name:<9} {part.params:>10,} params   held-out perplexity {part.val_ppl:8.2f}"
            )
    if summary.agreement is not None:
        lines.append(f"  student agrees with the teacher on {summary.agreement:.1%} of tokens")
    if summary.gap_closed is not None:
        lines.append(
            f"  distillation closed {summary.gap_closed:.0%} of the CE-only student's gap "
            "to the teacher"
        )
    if summary.teacher_check is not None and summary.teacher_check.worth_distilling is False:
        lines.append(f"  teacher check: {summary.teacher_check.message}")
    verdict = summary.verdict
    if verdict is not None:
        lines.append(f"  {verdict.text}")
    if summary.export_dir:
        lines.append(f"  student saved to {summary.export_dir}")
    return "\n".join(lines)


def _open_store(runs_dir: Path | None, *, write: bool = False) -> RunStore:
    """Read-only unless the command deletes (``runs --prune --yes``)."""
    return RunStore(runs_dir or default_runs_dir(), read_only=not write)


def _record_json(rec: RunRecord) -> dict[str, Any]:
    """A record as JSON; ``damage`` lists what could not be read (empty when healthy)."""
    return {
        "run_id": rec.run_id,
        "name": rec.name,
        "kind": rec.kind,
        "state": rec.state,
        # a damaged created_at reads as NaN, which JSON cannot carry
        "created_at": rec.created_at if math.isfinite(rec.created_at) else None,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "error": rec.error,
        "batch_id": rec.batch_id,
        "summary": rec.summary,
        "config": rec.config,
        "damage": list(rec.damage),
    }


# --------------------------------------------------------------------------- runs / show


def _when(stamp: float | None) -> str:
    """A timestamp as local date and time (``-`` when absent or damaged)."""
    if stamp is None or not math.isfinite(stamp):
        return "-"
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _duration(rec: RunRecord, now: float | None = None) -> str:
    """How long the run ran (so far, for a live one): ``2h 05m``, ``3m 12s``, ``12s``."""
    start = rec.started_at
    if start is None or not math.isfinite(start):
        return "-"
    end = rec.ended_at if rec.ended_at is not None else (now or time.time())
    return format_duration(max(0.0, end - start))


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


#: Settings with columns of their own in ``foundry runs``.
_OWN_COLUMNS = ("distill.mode", "loss.kind")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned labelled columns, each as wide as its widest cell."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _ppl(result: Any) -> str:
    return "-" if result is None or result.val_ppl is None else f"{result.val_ppl:.2f}"


def _helped(summary: RunSummary) -> str:
    """The verdict in one word for a table cell (``foundry show`` prints the sentence)."""
    verdict = summary.verdict
    if verdict is None or verdict.helped is None:
        return "-"
    return "yes" if verdict.helped else "NO"


def runs_table(records: Sequence[RunRecord]) -> list[str]:
    """``foundry runs``: one labelled row per run, the settings that differ between them."""
    settings = varying_settings([r.config for r in records], ignore=_OWN_COLUMNS)
    headers = ["id", "name", "state", "started", "duration", "mode", "loss"]
    headers += [*settings, "student ppl", "CE-only ppl", "gap closed", "helped"]
    rows = []
    for rec in records:
        flat = flatten_config(rec.config)
        parsed = RunSummary.parse(rec.summary)
        gap = "-" if parsed.gap_closed is None else f"{parsed.gap_closed:.0%}"
        rows.append(
            [
                rec.run_id,
                rec.name if rec.name != rec.run_id else "",
                rec.state + (" (damaged)" if rec.damaged else ""),
                _when(rec.started_at if rec.started_at is not None else rec.created_at),
                _duration(rec),
                _shown(flat.get("distill.mode", "-")),
                _shown(flat.get("loss.kind", "-")),
                *(_shown(flat.get(k, "-")) for k in settings),
                _ppl(parsed.student),
                _ppl(parsed.baseline),
                gap,
                _helped(parsed),
            ]
        )
    lines = _table(headers, rows)
    # A damaged row says what is damaged on its own line of the table, so a reader of the
    # table alone (stderr is often not kept) sees why its cells are blank.
    body = len(lines) - len(records)
    return lines[:body] + [
        line + (f"  DAMAGED: {'; '.join(rec.damage)}" if rec.damaged else "")
        for line, rec in zip(lines[body:], records, strict=True)
    ]


def _runs(args: argparse.Namespace) -> int:
    if args.prune:
        return _prune(args)
    with _open_store(args.runs_dir) as store:
        records = store.list_runs()
    if args.json:
        print(json.dumps([_record_json(r) for r in records], default=str))
        return 0
    if not records:
        print(f"no runs in {store.root}")
        return 0
    print("\n".join(runs_table(records)))
    damaged = [rec for rec in records if rec.damaged]
    for rec in damaged:
        print(f"foundry: run {rec.run_id} is damaged: {'; '.join(rec.damage)}", file=sys.stderr)
    if damaged:
        print(
            f"foundry: {len(damaged)} run record(s) are damaged and shown with blanks; "
            "`foundry show RUN_ID` prints what could be read",
            file=sys.stderr,
        )
    return 0


def _prune_states(text: str) -> set[str]:
    states = {s.strip() for s in text.split(",") if s.strip()}
    bad = sorted(states - set(TERMINAL_STATES))
    if bad or not states:
        raise ConfigError(
            f"--state {text!r}: only finished runs can be pruned; choose from "
            f"{', '.join(sorted(TERMINAL_STATES))} (comma-separated)",
            field="--state",
        )
    return states


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _prune(args: argparse.Namespace) -> int:
    """``foundry runs --prune``: list (dry run) or, with ``--yes``, delete finished runs."""
    states = _prune_states(args.state)
    if args.older_than is not None and not (
        math.isfinite(args.older_than) and args.older_than >= 0
    ):
        raise ConfigError("--older-than: give a number of days, 0 or more", field="--older-than")
    cutoff = None if args.older_than is None else time.time() - args.older_than * 86400
    with _open_store(args.runs_dir, write=args.yes) as store:
        chosen = [
            rec
            for rec in store.list_runs()
            if rec.state in states and (cutoff is None or rec.created_at < cutoff)
        ]
        if not chosen:
            print(f"no {'/'.join(sorted(states))} runs to prune in {store.root}")
            return 0
        size = sum(_folder_bytes(store.run_dir(r.run_id)) for r in chosen)
        if not args.yes:
            print(f"would delete {len(chosen)} run(s), {size / 2**20:.1f} MiB, from {store.root}:")
            print("\n".join(runs_table(chosen)))
            print("run again with --yes to delete them (rows, metrics, events and run folders)")
            return 0
        deleted = store.delete_runs(r.run_id for r in chosen)
    skipped = len(chosen) - len(deleted)
    print(
        f"deleted {len(deleted)} run(s), {size / 2**20:.1f} MiB"
        + (f"; {skipped} in use and kept" if skipped else "")
    )
    return 0


def _results_lines(summary: RunSummary) -> list[str]:
    rows = []
    for name, label in (
        ("teacher", "teacher"),
        ("student", "distilled student"),
        ("baseline", "CE-only twin"),
    ):
        r = summary.role(name)
        if r is None:
            continue
        rows.append(
            [
                label,
                "-" if r.params is None else f"{r.params:,}",
                _ppl(r),
                "-" if r.agreement is None else f"{r.agreement:.1%}",
                "-" if r.val_kl is None else f"{r.val_kl:.3f}",
                "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
            ]
        )
    if not rows:
        return ["  no results (the run ended before its evaluation)"]
    table = _table(["model", "params", "held-out ppl", "agreement", "val KL", "tokens/s"], rows)
    lines = [f"  {line}" for line in table]
    if summary.gap_closed is not None:
        lines.append(
            f"  gap closed: {summary.gap_closed:.0%} of the CE-only twin's gap to the teacher"
        )
    verdict = summary.verdict
    if verdict is not None:
        mark = {"good": "verdict", "warning": "WARNING", "info": "note"}[verdict.level]
        lines.append(f"  {mark}: {verdict.text}")
    if summary.teacher_check is not None and summary.teacher_check.standing != "clear":
        lines.append(f"  teacher check: {summary.teacher_check.message}")
    return lines


def _events_lines(events: Sequence[Any], last: int = 8) -> list[str]:
    if not events:
        return ["  none"]
    counts: dict[str, int] = {}
    for e in events:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    lines = ["  " + ", ".join(f"{n} {kind}" for kind, n in counts.items())]
    for e in events[-last:]:
        step = "" if e.step is None else f" step {e.step}"
        lines.append(f"  {_when(e.time)}{step} {e.kind}: {e.message}")
    if len(events) > last:
        lines.append(f"  ({len(events) - last} earlier; `foundry show --json` lists all)")
    return lines


def show_text(rec: RunRecord, events: Sequence[Any], store_root: Path) -> str:
    """``foundry show``: what a person asks of one run, top to bottom."""
    summary = RunSummary.parse(rec.summary)
    flat = flatten_config(rec.config)
    defaults = flatten_config(RunConfig().to_dict())
    name = f" ({rec.name})" if rec.name != rec.run_id else ""
    lines = [f"run {rec.run_id}{name}", ""]
    state = rec.state + (f": {rec.error}" if rec.error else "")
    lines += [
        f"  state     {state}",
        f"  created   {_when(rec.created_at)}",
        f"  started   {_when(rec.started_at)}   ended {_when(rec.ended_at)}   "
        f"duration {_duration(rec)}",
        f"  mode      {_shown(flat.get('distill.mode', '-'))} · loss "
        f"{_shown(flat.get('loss.kind', '-'))} · teacher {_shown(flat.get('teacher.source', '-'))}"
        f" · data {_shown(flat.get('data.source', '-'))}",
    ]
    if rec.damaged:
        lines.append(f"  DAMAGED   {'; '.join(rec.damage)}")
    changed = [
        k
        for k in flat
        if k not in ("name", "runs_dir") and _shown(flat[k]) != _shown(defaults.get(k))
    ]
    lines += ["", "config (differences from the defaults):"]
    if changed:
        rows = [[k, _shown(flat[k]), _shown(defaults.get(k, "-"))] for k in changed]
        lines += [f"  {line}" for line in _table(["setting", "value", "default"], rows)]
    else:
        lines.append("  none: every setting is the default")
    lines += ["", "results (held-out):", *_results_lines(summary)]
    lines += ["", f"events ({len(events)}):", *_events_lines(events)]
    run_dir = store_root / rec.run_id
    lines += ["", "paths:", f"  run folder  {run_dir}"]
    if summary.export_dir:
        lines.append(f"  student     {summary.export_dir}")
    lines.append(f"  store       {store_root / 'foundry.sqlite'}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    run_id = validate_run_id(args.run_id)
    with _open_store(args.runs_dir) as store:
        rec = store.get_run(run_id, damaged_ok=True)
        events = store.events(run_id)
    if rec.damaged:
        print(
            f"foundry: run {run_id} has a damaged record: {'; '.join(rec.damage)}", file=sys.stderr
        )
    if args.json:
        data = _record_json(rec)
        data["events"] = [
            {"kind": e.kind, "message": e.message, "step": e.step, "time": e.time} for e in events
        ]
        print(json.dumps(data, default=str))
    else:
        print(show_text(rec, events, store.root))
    return 0


def _export(args: argparse.Namespace) -> int:
    from foundry_kernel.card import export_run

    run_id = validate_run_id(args.run_id)
    with _open_store(args.runs_dir) as store:
        out = export_run(store, run_id, args.dir, force=args.force)
    print(f"exported run {run_id}'s student to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
