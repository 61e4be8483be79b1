"""``python -m bench [loss|throughput|overheads|mfu|cache|scaling|lora|all] [--quick] [--json P]``.

Runs the chosen benchmarks in this one process (the loss benchmark starts one fresh child
process per contender and point), prints each table as it completes and a summary at the
end, and writes everything, with the machine's load before and after, to one JSON file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = ("loss", "throughput", "overheads", "mfu", "cache", "scaling", "lora")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Foundry benchmarks: loss memory/time, training throughput, controller "
        "overhead, MFU, the offline logit cache, data-parallel scaling and full vs LoRA "
        "training, each side by side "
        "with its baselines in one run.",
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

    from bench import cache, lora, loss_memory, mfu, overheads, scaling, throughput
    from bench.common import GiB, clean_floats, environment, machine_snapshot, write_json

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
    for name in which:
        t0 = time.perf_counter()
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
        doc[name] = section
        doc["timings_s"][name] = round(time.perf_counter() - t0, 1)
        tables.append((name, text))
        printer(f"\n## {name}\n{text}\n")
        write_json(path, clean_floats(doc))  # after every section: a late failure keeps the rest
    doc["meta"]["machine_after"] = machine_snapshot()
    write_json(path, clean_floats(doc))
    doc["meta"]["json_path"] = str(path)
    printer(f"machine after: {doc['meta']['machine_after']['uptime']}")
    printer(f"wrote {path}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_benchmarks(args, printer=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
