"""The ``foundry`` command line.

Exit codes (a contract for scripts and CI):
  0 completed · 1 the run failed · 2 bad usage or config · 124 timed out · 130 cancelled.

``foundry distill --json`` ends stdout with one JSON object (see
``summary_json``): ``run_id``, ``state``, ``duration_s``, ``teacher``, ``student``,
``baseline`` (each with ``params`` and ``val_ppl``), ``agreement`` and ``val_kl``;
``logit_cache`` (offline mode: path, k, bytes_per_token, capture_seconds) and
``sequence`` (sequence mode: the teacher-written data) are null in other modes.
Progress goes to stderr, throttled, so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foundry_kernel import notebook_runner, servers, vllm_server
from foundry_kernel.config import json_schema, load_config
from foundry_kernel.context import Event
from foundry_kernel.errors import FoundryError
from foundry_kernel.logs import Throttle, configure_logging
from foundry_kernel.paths import default_runs_dir, validate_run_id
from foundry_kernel.store import RunRecord, RunStore

EXIT = {"completed": 0, "failed": 1, "timed_out": 124, "cancelled": 130}


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
    distill.add_argument("--runs-dir", type=Path, help="run store (default: runs_dir or ./runs)")
    distill.add_argument("--json", action="store_true", help="end stdout with a JSON summary")
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
    servers.add_commands(sub)
    notebook_runner.add_commands(sub)
    vllm_server.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except FoundryError as exc:
        print(f"foundry: error: {exc}", file=sys.stderr)
        return 2


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from foundry_kernel.control import run_sync

    overrides = list(args.overrides)
    if args.runs_dir is not None:
        overrides.append(f"runs_dir={args.runs_dir}")
    if args.resume:
        validate_run_id(args.resume)
        # The run's saved config (or --config) with the --set overrides on top; the
        # controller refuses overrides that would change what the run is.
        given = load_config(args.config) if args.config else None
        handle = run_sync(
            given, resume=args.resume, overrides=overrides, on_event=_progress_printer()
        )
    else:
        handle = run_sync(load_config(args.config, overrides), on_event=_progress_printer())
    summary = summary_json(handle.id, handle.state, handle.result or {}, handle.duration_s)
    if handle.error is not None:
        print(f"foundry: run {handle.id} {handle.state}: {handle.error}", file=sys.stderr)
    else:
        print(render_summary(summary), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, default=str))
    return EXIT.get(str(handle.state), 1)


def _progress_printer() -> Any:
    throttle = Throttle(5.0)

    def on_event(event: Event) -> None:
        p = event.payload
        if event.kind == "phase":
            print(f"[{event.run_id}] phase: {p.get('phase')}", file=sys.stderr)
        elif event.kind == "alert":
            print(f"[{event.run_id}] alert: {p.get('message')}", file=sys.stderr)
        elif event.kind == "step" and throttle.ready():
            metrics = p.get("metrics", {})
            loss = next((v for k, v in metrics.items() if k.endswith("train/loss")), None)
            print(
                f"[{event.run_id}] {p.get('prefix') or ''}step {p.get('step')}/"
                f"{p.get('max_steps')} loss {loss if loss is None else round(loss, 4)}",
                file=sys.stderr,
            )

    return on_event


def summary_json(
    run_id: str, state: str, result: dict[str, Any], duration_s: float | None
) -> dict[str, Any]:
    """The documented ``--json`` contract, built from a run's summary."""
    out: dict[str, Any] = {"run_id": run_id, "state": str(state), "duration_s": duration_s}
    for part in ("teacher", "student", "baseline"):
        out[part] = result.get(part)
    for key in (
        "agreement",
        "val_kl",
        "gap_closed",
        "export_dir",
        "data",
        "samples",
        "logit_cache",  # offline mode
        "sequence",  # sequence mode
    ):
        out[key] = result.get(key)
    return out


def render_summary(summary: dict[str, Any]) -> str:
    """A plain-language result a non-engineer can read."""
    lines = [f"run {summary['run_id']}: {summary['state']} in {summary['duration_s'] or 0:.0f} s"]
    rows = [(k, summary.get(k)) for k in ("teacher", "student", "baseline")]
    for name, part in rows:
        if part:
            lines.append(
                f"  {name:<9} {part['params']:>10,} params   held-out perplexity "
                f"{part['val_ppl']:8.2f}"
            )
    if summary.get("agreement") is not None:
        lines.append(f"  student agrees with the teacher on {summary['agreement']:.1%} of tokens")
    if summary.get("gap_closed") is not None:
        lines.append(
            f"  distillation closed {summary['gap_closed']:.0%} of the CE-only student's gap "
            "to the teacher"
        )
    if summary.get("export_dir"):
        lines.append(f"  student saved to {summary['export_dir']}")
    return "\n".join(lines)


def _open_store(runs_dir: Path | None) -> RunStore:
    return RunStore(runs_dir or default_runs_dir(), read_only=True)


def _record_json(rec: RunRecord) -> dict[str, Any]:
    return {
        "run_id": rec.run_id,
        "name": rec.name,
        "kind": rec.kind,
        "state": rec.state,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "error": rec.error,
        "batch_id": rec.batch_id,
        "summary": rec.summary,
        "config": rec.config,
    }


def _runs(args: argparse.Namespace) -> int:
    with _open_store(args.runs_dir) as store:
        records = store.list_runs()
    if args.json:
        print(json.dumps([_record_json(r) for r in records], default=str))
        return 0
    print(f"{'run id':<48} {'state':<10} {'teacher':>8} {'student':>8} {'baseline':>8}")
    for rec in records:
        ppl = [
            (rec.summary.get(k) or {}).get("val_ppl") for k in ("teacher", "student", "baseline")
        ]
        cells = [f"{v:8.2f}" if isinstance(v, int | float) else f"{'-':>8}" for v in ppl]
        print(f"{rec.run_id:<48} {rec.state:<10} {' '.join(cells)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    run_id = validate_run_id(args.run_id)
    with _open_store(args.runs_dir) as store:
        rec = store.get_run(run_id)
        events = store.events(run_id)
    data = _record_json(rec)
    data["events"] = [{"kind": e.kind, "message": e.message, "step": e.step} for e in events]
    if args.json:
        print(json.dumps(data, default=str))
    else:
        print(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
