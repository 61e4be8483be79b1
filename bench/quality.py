"""``python -m bench.quality``: the sweep that chose the distillation defaults (issue 17).

Why a sweep and not one corpus: a default tuned to the built-in corpus can hurt on a
user's own text (a 600 KB corpus of licences and package documentation once gave "closed
-75% of the gap"). So every candidate setting is run, end to end, by the real job
(teacher built by Foundry on that corpus, student distilled, CE-only twin on the same
batches), on several corpora of different sizes and kinds that every machine of this kind
has, and a default is kept only if it helps on all of them:

- ``python-docs``: English prose (the built-in default, the stdlib's pydoc topics and
  docstrings, ~2 MB);
- ``python-code``: Python source (``builtin:python-stdlib``, first 400 modules);
- ``debian-docs``: ~600 KB of licence texts and package documentation from
  ``/usr/share/common-licenses`` and ``/usr/share/doc`` (plain-text files only);
- ``api-jsonl``: generated prompt/completion JSONL, the prompt a stdlib function's
  signature, the completion its docstring (the loss covers completions only).

Each run is a real ``run_sync`` of the config below (the default job with the variant's
overrides); CPU training is deterministic, so the figures repeat exactly on this machine
kind whatever the load (only the wall times vary). Results are appended, one JSON object
per run, to ``--out`` (default ``runs/bench/quality.jsonl``) so an interrupted sweep keeps
what it measured, and ``--table`` renders them as the Markdown table in
``docs/quality-sweep.md``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from foundry_kernel.paths import default_cache_dir

#: Variant name -> config overrides (dotted keys) on top of the default job.
VARIANTS: dict[str, dict[str, Any]] = {
    "old-default": {"loss.ce_weight": 0.5, "loss.temperature": 1.0, "limits.max_steps": 300},
    "ce0.2": {"loss.ce_weight": 0.2, "loss.temperature": 1.0, "limits.max_steps": 300},
    "ce0": {"loss.ce_weight": 0.0, "loss.temperature": 1.0, "limits.max_steps": 300},
    "ce0.2-T2": {
        "loss.ce_weight": 0.2,
        "loss.temperature": 2.0,
        "loss.scale_by_t2": True,
        "limits.max_steps": 300,
    },
    "ce0.2-rkl": {"loss.ce_weight": 0.2, "loss.kind": "reverse_kl", "limits.max_steps": 300},
    "ce0.2-jsd": {
        "loss.ce_weight": 0.2,
        "loss.kind": "jsd",
        "loss.beta": 0.5,
        "limits.max_steps": 300,
    },
    "ce0.2-600": {"loss.ce_weight": 0.2, "loss.temperature": 1.0, "limits.max_steps": 600},
    "ce0-600": {"loss.ce_weight": 0.0, "loss.temperature": 1.0, "limits.max_steps": 600},
    "ce0.2-offline-600": {
        "loss.ce_weight": 0.2,
        "distill.mode": "offline",
        "limits.max_steps": 600,
    },
    "new-default": {},
    # The teacher trains until early stopping or teacher.build.steps, however many passes
    # over the corpus that takes (recipe 2 capped it at 4 passes).
    "teacher-uncapped": {"teacher.build.max_epochs": 1000.0},
    # A shorter first run (the default job's took 12 min on a quiet machine, goal 10).
    "teacher500-student500": {"teacher.build.steps": 500, "limits.max_steps": 500},
}
#: Variants whose run also trains the CE-only twin (one per student budget is enough:
#: the twin depends only on the student, the data and the steps, never on the loss).
WITH_BASELINE = (
    "old-default",
    "ce0.2-600",
    "new-default",
    "teacher-uncapped",
    "teacher500-student500",
)

DEBIAN_LICENSES = Path("/usr/share/common-licenses")
DEBIAN_DOCS = Path("/usr/share/doc")
DEBIAN_BYTES = 600_000


def corpora(root: Path) -> dict[str, dict[str, Any]]:
    """Corpus name -> its ``data`` settings (the student's data and the teacher's), the
    generated ones written under ``root`` first (deterministic: same files every time)."""
    root.mkdir(parents=True, exist_ok=True)
    debian = root / "debian-docs"
    if not debian.is_dir():
        _write_debian_corpus(debian)
    api = root / "api.jsonl"
    if not api.is_file():
        _write_api_jsonl(api)
    return {
        "python-docs": {"source": "builtin:python-docs"},
        "python-code": {"source": "builtin:python-stdlib", "max_documents": 400},
        "debian-docs": {"source": str(debian / "*.txt")},
        "api-jsonl": {
            "source": str(api),
            "prompt_field": "prompt",
            "completion_field": "completion",
        },
    }


def _debian_files() -> Iterator[Path]:
    """Licence texts first, then package docs (README*, *.txt, *.md), in a fixed order."""
    if DEBIAN_LICENSES.is_dir():
        yield from sorted(p for p in DEBIAN_LICENSES.iterdir() if p.is_file())
    if DEBIAN_DOCS.is_dir():
        for path in sorted(DEBIAN_DOCS.rglob("*")):
            name = path.name.lower()
            plain = name.startswith("readme") or name.endswith((".txt", ".md"))
            if path.is_file() and not path.is_symlink() and plain and not name.endswith(".gz"):
                yield path


def _write_debian_corpus(dest: Path) -> None:
    """Up to ``DEBIAN_BYTES`` of distinct UTF-8 plain text from the Debian docs."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    total = 0
    for n, path in enumerate(_debian_files()):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < 500 or text in seen:
            continue
        seen.add(text)
        (tmp / f"{n:04d}-{path.name}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
        if total >= DEBIAN_BYTES:
            break
    tmp.rename(dest)


def _write_api_jsonl(dest: Path, limit: int = 6000) -> None:
    """Prompt: ``module.function(signature)``; completion: its docstring."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80 and not node.name.startswith("_"):
                    prompt = f"{path.stem}.{node.name}({ast.unparse(node.args)})\n"
                    rows.append(json.dumps({"prompt": prompt, "completion": doc + "\n"}))
        if len(rows) >= limit:
            break
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text("\n".join(rows[:limit]) + "\n", encoding="utf-8")
    tmp.rename(dest)


def job_config(corpus: Mapping[str, Any], overrides: Mapping[str, Any], runs_dir: Path) -> Any:
    """The default job on ``corpus`` (student and teacher alike) with ``overrides``."""
    from foundry_kernel import load_config

    data = dict(corpus)
    build = {"data": data["source"]}
    if "max_documents" in data:
        build["max_documents"] = data["max_documents"]
    raw = {
        "name": "quality-sweep",
        "runs_dir": str(runs_dir),
        "data": data,
        "teacher": {"build": build},
    }
    return load_config(raw, overrides)


def run_one(
    corpus_name: str,
    corpus: Mapping[str, Any],
    variant: str,
    runs_dir: Path,
    threads: int | None = None,
) -> dict[str, Any]:
    from foundry_kernel import run_sync
    from foundry_kernel.summary import RunSummary

    overrides = dict(VARIANTS[variant])
    overrides["eval.baseline"] = variant in WITH_BASELINE
    if threads is not None:
        overrides["threads"] = threads
    config = job_config(corpus, overrides, runs_dir)
    t0 = time.perf_counter()
    handle = run_sync(config)
    seconds = time.perf_counter() - t0
    summary = RunSummary.parse(handle.result or {})
    row: dict[str, Any] = {
        "corpus": corpus_name,
        "variant": variant,
        "state": str(handle.state),
        "error": None if handle.error is None else handle.error.message,
        "seconds": round(seconds, 1),
        "steps": config.limits.max_steps,
        "overrides": VARIANTS[variant],
    }
    for role in ("teacher", "student", "baseline"):
        part = summary.role(role)
        row[role] = None if part is None else {"val_ppl": part.val_ppl, "val_loss": part.val_loss}
    row["gap_closed"] = summary.gap_closed
    row["teacher_check"] = (
        None if summary.teacher_check is None else summary.teacher_check.to_dict()
    )
    row["data"] = {k: (summary.data or {}).get(k) for k in ("docs", "tokens")}
    return row


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table: corpus x variant -> teacher, KD and CE-only held-out perplexity
    and gap closed (the CE-only twin of the same corpus and student steps)."""
    twins: dict[tuple[str, int], Mapping[str, Any]] = {}
    for row in rows:
        if row.get("baseline"):
            twins[(row["corpus"], row["steps"])] = row["baseline"]
    lines = [
        "| corpus | variant | steps | teacher ppl | reference ppl | KD ppl | CE-only ppl "
        "| gap closed | KD beats CE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["state"] != "completed":
            lines.append(
                f"| {row['corpus']} | {row['variant']} | {row['steps']} | "
                f"{row['state']}: {row['error']} |||||"
            )
            continue
        t, s = row["teacher"], row["student"]
        b = row.get("baseline") or twins.get((row["corpus"], row["steps"]))
        check = row.get("teacher_check") or {}
        ref = check.get("reference_ppl")
        gap = None
        if b and t and s:
            span = b["val_loss"] - t["val_loss"]
            gap = None if abs(span) < 1e-9 else (b["val_loss"] - s["val_loss"]) / span
        cells = [
            row["corpus"],
            row["variant"],
            str(row["steps"]),
            f"{t['val_ppl']:.1f}",
            "-" if ref is None else f"{ref:.1f}",
            f"{s['val_ppl']:.1f}",
            "-" if not b else f"{b['val_ppl']:.1f}",
            "-" if gap is None else f"{gap:.0%}",
            "-" if not b else ("yes" if s["val_ppl"] < b["val_ppl"] else "**no**"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--corpora", default="python-docs,python-code,debian-docs,api-jsonl")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("runs/bench/quality.jsonl"))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench/quality-runs"))
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the job's)")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        print(table(rows), end="")
        return 0
    available = corpora(default_cache_dir() / "corpora")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.corpora.split(","):
        for variant in args.variants.split(","):
            row = run_one(name, available[name], variant, args.runs_dir, args.threads)
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            s, b = row.get("student") or {}, row.get("baseline") or {}
            print(
                f"{name:12} {variant:18} {row['state']:9} {row['seconds']:7.1f}s "
                f"teacher {(row.get('teacher') or {}).get('val_ppl', math.nan):7.2f} "
                f"KD {s.get('val_ppl', math.nan):7.2f} CE {b.get('val_ppl', math.nan):7.2f} "
                f"gap {row.get('gap_closed')}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
