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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foundry_kernel._context import Event
from foundry_kernel.config import json_schema, load_config
from foundry_kernel.errors import FoundryError
from foundry_kernel.logs import Throttle, configure_logging
from foundry_kernel.paths import default_runs_dir, runs_dir_for, validate_run_id
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

    runs = sub.add_parser("runs", help="list runs in the store")
    runs.add_argument("--runs-dir", type=Path)
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=_runs)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run_id")
    show.add_argument("--runs-dir", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)

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


def _open_store(runs_dir: Path | None) -> RunStore:
    return RunStore(runs_dir or default_runs_dir(), read_only=True)


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


def _ppl_cell(summary: RunSummary, part: str) -> str:
    """One perplexity column; anything but a number (absent, or a malformed summary) is '-'."""
    result = summary.role(part)
    if result is not None and result.val_ppl is not None:
        return f"{result.val_ppl:8.2f}"
    return f"{'-':>8}"


def _runs(args: argparse.Namespace) -> int:
    with _open_store(args.runs_dir) as store:
        records = store.list_runs()
    if args.json:
        print(json.dumps([_record_json(r) for r in records], default=str))
        return 0
    print(f"{'run id':<48} {'state':<10} {'teacher':>8} {'student':>8} {'baseline':>8}")
    for rec in records:
        parsed = RunSummary.parse(rec.summary)
        cells = " ".join(_ppl_cell(parsed, k) for k in ROLES)
        flag = f"  DAMAGED: {'; '.join(rec.damage)}" if rec.damaged else ""
        print(f"{rec.run_id:<48} {rec.state:<10} {cells}{flag}")
    damaged = sum(rec.damaged for rec in records)
    if damaged:
        print(
            f"foundry: {damaged} run record(s) are damaged and shown with blanks; "
            "`foundry show RUN_ID` prints what could be read",
            file=sys.stderr,
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    run_id = validate_run_id(args.run_id)
    with _open_store(args.runs_dir) as store:
        rec = store.get_run(run_id, damaged_ok=True)
        events = store.events(run_id)
    data = _record_json(rec)
    data["events"] = [{"kind": e.kind, "message": e.message, "step": e.step} for e in events]
    if rec.damaged:
        print(
            f"foundry: run {run_id} has a damaged record: {'; '.join(rec.damage)}", file=sys.stderr
        )
    if args.json:
        print(json.dumps(data, default=str))
    else:
        print(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
