"""``python -m bench [NAME|all] [--quick] [--json P]``, NAME one of :data:`BENCHMARKS`.

Runs the chosen benchmarks in this one process (the loss benchmark starts one fresh child
process per contender and point), prints each table as it completes, and writes
everything, with the machine's load before and after, to one JSON file. At the end it
prints and writes (beside the JSON, ``.md``) one Markdown summary: every target each
benchmark checks (its module's ``targets_of``), with the figure and whether it is met, and
the headline figures that have no goal (``figures_of``). A benchmark that fails is
recorded as failed in the JSON and the summary, and the others still run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = ("loss", "throughput", "overheads", "mfu", "cache", "scaling", "lora", "ui")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Foundry benchmarks: loss memory/time, training throughput, controller "
        "overhead, MFU, the offline logit cache, data-parallel scaling, full vs LoRA "
        "training and the live UI's cost, each side by side with its baselines in one run, "
        "then one summary of every target.",
    )
    p.add_argument("which", nargs="?", default="all", choices=(*BENCHMARKS, "all"))
    p.add_argument("--quick", action="store_true", help="one tiny size each: proves it runs")
    p.add_argument("--json", type=Path, help="where to write the results (default: runs/bench/...)")
    p.add_argument("--threads", type=int, help="torch threads, here and in every child")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the loss and mfu benchmarks (mfu on cuda: a bf16 step on GPU-sized models)",
    )
    g = p.add_argument_group("loss")
    g.add_argument("--vocabs", type=_ints, help="e.g. 32000,128256")
    g.add_argument("--tokens", type=_ints, help="e.g. 1024,2048,4096,8192")
    g.add_argument("--hidden", type=int, help="hidden size of the 'hidden' scenario")
    g.add_argument("--mem-cap-gb", type=float, default=16.0, help="RSS cap per child (GiB)")
    g.add_argument("--loss-contenders", type=_names, help="subset, comma-separated")
    g.add_argument("--repeats", type=int, help="calls per contender and point (max)")
    g.add_argument("--jobs", type=int, help="children run side by side (default 1; 4 with --quick)")
    g = p.add_argument_group("throughput / overheads / mfu")
    g.add_argument("--steps", type=int, help="timed steps per round")
    g.add_argument("--warmup", type=int, help="warm-up steps per round (not timed)")
    g.add_argument("--rounds", type=int, help="rounds (fresh models each, interleaved)")
    g.add_argument(
        "--step-contenders",
        type=_names,
        help="subset of foundry,foundry_logits,foundry_nomask,trl,plain",
    )
    g.add_argument("--gemm-n", type=int, help="matrix size of the matmul peak")
    g = p.add_argument_group("cache")
    g.add_argument("--cache-ks", type=_ints, help="top-k values to capture, e.g. 32,64,128")
    return p


def default_json_path(which: str, quick: bool) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "bench" / f"bench-{which}{'-quick' if quick else ''}-{stamp}.json"


def run_benchmarks(
    args: argparse.Namespace, printer: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run what ``args`` asks for; returns the JSON document (also written to ``args.json``)."""
    import torch

    from bench import cache, lora, loss_memory, mfu, overheads, scaling, throughput, ui_overhead
    from bench.common import GiB, clean_floats, environment, machine_snapshot, write_json

    modules: dict[str, Any] = {
        "loss": loss_memory,
        "throughput": throughput,
        "overheads": overheads,
        "mfu": mfu,
        "cache": cache,
        "scaling": scaling,
        "lora": lora,
        "ui": ui_overhead,
    }

    if args.threads:
        torch.set_num_threads(args.threads)
    which = BENCHMARKS if args.which == "all" else (args.which,)
    path = args.json or default_json_path(args.which, args.quick)
    doc: dict[str, Any] = {
        "meta": {
            "argv": sys.argv[1:],
            "which": list(which),
            "quick": bool(args.quick),
            "environment": environment(),
            "machine_before": machine_snapshot(),
        },
        "timings_s": {},
    }
    mode = " (quick)" if args.quick else ""
    printer(f"bench: {', '.join(which)}{mode}; {doc['meta']['machine_before']['uptime']}")
    tables: list[tuple[str, str]] = []

    def one(name: str) -> tuple[dict[str, Any], str]:
        if name == "loss":
            section = loss_memory.run(
                quick=args.quick,
                vocabs=args.vocabs,
                tokens=args.tokens,
                contenders=args.loss_contenders,
                hidden=args.hidden,
                cap=int(args.mem_cap_gb * GiB),
                repeats=args.repeats,
                threads=args.threads,
                device=args.device,
                jobs=args.jobs,
                printer=printer,
            )
            text = loss_memory.render(section["results"])
            notes = loss_memory.render_notes(section["results"])
            text += "\n\nTargets (issue 6):\n" + loss_memory.render_targets(section["targets"])
            if notes:
                text += "\n\nNot measured:\n" + notes
        elif name == "throughput":
            section = throughput.run(
                quick=args.quick,
                contenders=args.step_contenders,
                steps=args.steps,
                warmup=args.warmup,
                rounds=args.rounds,
                printer=printer,
            )
            text = throughput.render(section)
        elif name == "overheads":
            section = overheads.run(
                quick=args.quick,
                steps=args.steps,
                warmup=args.warmup,
                rounds=args.rounds,
                printer=printer,
            )
            text = overheads.render(section)
        elif name == "scaling":
            section = scaling.run(quick=args.quick, steps=args.steps, printer=printer)
            text = scaling.render(section)
        elif name == "lora":
            section = lora.run(quick=args.quick, steps=args.steps, printer=printer)
            text = lora.render(section)
        elif name == "cache":
            section = cache.run(quick=args.quick, ks=args.cache_ks, printer=printer)
            text = cache.render(section)
        elif name == "ui":
            section = ui_overhead.run(quick=args.quick, steps=args.steps, printer=printer)
            text = ui_overhead.render(section)
        else:
            section = mfu.run(
                quick=args.quick,
                steps=args.steps,
                warmup=args.warmup,
                gemm_n=args.gemm_n,
                device=args.device,
                printer=printer,
            )
            text = mfu.render(section)
        return section, text

    failed: dict[str, str] = {}
    for name in which:
        t0 = time.perf_counter()
        try:
            section, text = one(name)
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the rest
            failed[name] = f"{type(exc).__name__}: {exc}"
            trace = traceback.format_exc()
            section, text = {"status": "error", "error": trace[-4000:]}, trace[-2000:]
        doc[name] = section
        doc["timings_s"][name] = round(time.perf_counter() - t0, 1)
        tables.append((name, text))
        printer(f"\n## {name}\n{text}\n")
        write_json(path, clean_floats(doc))  # after every section: a late failure keeps the rest
    doc["meta"]["machine_after"] = machine_snapshot()
    markdown = _summary(doc, which, modules, failed)
    doc["summary"]["markdown_path"] = str(path.with_suffix(".md"))
    write_json(path, clean_floats(doc))
    path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    doc["meta"]["json_path"] = str(path)
    printer(f"\n{markdown}")
    printer(f"machine after: {doc['meta']['machine_after']['uptime']}")
    printer(f"wrote {path} and {path.with_suffix('.md')}")
    if failed:
        printer(f"FAILED: {', '.join(failed)} (see the JSON)")
    return doc


def _summary(
    doc: dict[str, Any], which: Sequence[str], modules: dict[str, Any], failed: dict[str, str]
) -> str:
    """Gather every section's targets and figures into ``doc["summary"]``; the Markdown."""
    from bench.common import Figure, Target, render_summary

    targets: list[Target] = []
    figures: list[Figure] = []
    for name in which:
        if name in failed:
            why = f"failed: {failed[name][:200]}"
            targets.append(Target(name, "the benchmark runs", why, False))
            continue
        module = modules[name]
        if hasattr(module, "targets_of"):
            targets += module.targets_of(doc[name])
        if hasattr(module, "figures_of"):
            figures += module.figures_of(doc[name])
    meta = doc["meta"]
    notes = [
        f"run: `python -m bench {' '.join(meta['argv'])}`"
        + (" (--quick: tiny sizes, figures prove the path only)" if meta["quick"] else ""),
        f"machine before: {meta['machine_before']['uptime']}",
        f"machine after: {meta['machine_after']['uptime']}",
        "time per benchmark: " + ", ".join(f"{k} {v:.0f} s" for k, v in doc["timings_s"].items()),
    ]
    doc["summary"] = {
        "targets": [t.as_json() for t in targets],
        "figures": [f.as_json() for f in figures],
        "met": sum(t.met is True for t in targets),
        "missed": sum(t.met is False for t in targets),
        "not_measured": sum(t.met is None for t in targets),
        "failed": sorted(failed),
    }
    return render_summary(targets, figures, notes=notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run_benchmarks(args, printer=lambda s: print(s, flush=True))
    return 1 if doc["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
