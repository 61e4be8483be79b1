"""The exported student's model card (``README.md``), in the Hugging Face Hub's format,
and ``foundry export``: a finished run's student folder re-exported with a fresh card.

Why a Hub-style card: the exported folder is an ordinary ``save_pretrained`` folder that a
user pushes to the Hub or hands to a colleague. The Hub reads the YAML front matter
(``base_model``, ``library_name``, ``tags``, ``model-index``) to link the model to its base
and show its results; a person reads the body: what was distilled from what, whether it
helped (``RunSummary.verdict``), how big and fast it is, and how to reproduce it.

The front matter is written with ``yaml.safe_dump`` and reads back with ``yaml.safe_load``
whatever the run's names and paths hold (quotes, colons, newlines).

This module imports neither torch nor transformers: ``foundry export`` is a file copy.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from foundry_kernel.atomic import replace_folder
from foundry_kernel.config import HUB_ID_RE, RunConfig, looks_like_path
from foundry_kernel.errors import FoundryError
from foundry_kernel.summary import ModelResult, RunSummary

__all__ = [
    "CARD_FILENAME",
    "METRICS_FILENAME",
    "ExportError",
    "base_model",
    "export_run",
    "framework_versions",
    "front_matter",
    "git_revision",
    "model_card",
    "provenance",
    "read_front_matter",
]

CARD_FILENAME = "README.md"
METRICS_FILENAME = "foundry-metrics.json"
TAGS = ("distillation", "foundry")
_GIT_TIMEOUT_S = 5.0


class ExportError(FoundryError):
    """``foundry export`` cannot re-export this run into that folder (the message says why
    and what to do)."""


# --------------------------------------------------------------------------- provenance


def framework_versions() -> dict[str, str]:
    """torch, transformers, foundry and python as installed here (read from package
    metadata, so neither torch nor transformers is imported)."""
    out: dict[str, str] = {}
    for name in ("torch", "transformers", "foundry"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    if out["foundry"] == "not installed":  # running from a checkout that is not installed
        from foundry_kernel import __version__

        out["foundry"] = __version__
    out["python"] = platform.python_version()
    return out


def git_revision(folder: Path | None = None) -> dict[str, Any] | None:
    """The commit of the git checkout holding ``folder`` (default: the working folder), and
    whether it had uncommitted changes to tracked files; None outside a git checkout or
    without git.

    Why a subprocess with an argument list and a timeout: ``.git`` may be a file (a
    worktree), refs may be packed; git itself knows. Never through a shell.
    """
    where = (folder or Path.cwd()).absolute()
    git = shutil.which("git")
    if git is None or not any((p / ".git").exists() for p in (where, *where.parents)):
        return None
    try:
        head = subprocess.run(
            [git, "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = head.stdout.strip()
    if not re.fullmatch(r"[0-9a-f]{40,64}", revision):
        return None
    dirty = None if status.returncode != 0 else bool(status.stdout.strip())
    return {"commit": revision, "dirty": dirty, "folder": str(where)}


def provenance(folder: Path | None = None) -> dict[str, Any]:
    """What the job records with its summary at export time (``summary["provenance"]``),
    so a card regenerated later (``foundry export``) names the versions and the revision
    the run was trained with, not those of the machine that re-exports it."""
    return {"versions": framework_versions(), "git": git_revision(folder)}


# --------------------------------------------------------------------------- names


def _card_location(source: str) -> str:
    """A hub id or built-in name as written; a local path made absolute.

    Why: the card travels with the exported student, away from the folder the run was
    started in, where a relative ``./teacher`` named nothing.
    """
    if source.startswith("builtin:") or not looks_like_path(source):
        return source
    return os.path.abspath(Path(source).expanduser())  # absolute, with no ".." left


def _code(text: str) -> str:
    """``text`` as inline Markdown code on one line: newlines shown as ``\\n``, and a
    backtick fence longer than any run of backticks inside it."""
    flat = text.replace("\r", "\\r").replace("\n", "\\n")
    longest = max((len(m) for m in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def _card_teacher(config: RunConfig) -> str:
    """The teacher as the card names it: its id or absolute location, and for Foundry's
    own recipe the corpus it was built on."""
    source = config.teacher.source
    if source.startswith("builtin:"):
        corpus = _card_location(config.teacher.build.data)
        return f"{_code(source)} (Foundry's recipe, built on {_code(corpus)})"
    return _code(_card_location(source))


def _init_source(config: RunConfig) -> str | None:
    """Where the student's weights started: its pretrained source, the teacher it was cut
    from (``from_teacher``), or None for a freshly initialised student."""
    student = config.student
    if student.init == "pretrained":
        return student.source
    if student.init == "from_teacher":
        return config.teacher.source
    return None


def base_model(config: RunConfig) -> str | None:
    """The front matter's ``base_model``: the student's init source when it is a Hub id.

    Why only a Hub id: the Hub links ``base_model`` to a repository and refuses a card
    whose ``base_model`` is not one; a local folder or Foundry's built-in teacher is named
    in the card's body instead.
    """
    source = _init_source(config)
    if source is None or source.startswith("builtin:") or looks_like_path(source):
        return None
    return source if HUB_ID_RE.fullmatch(source) else None


# --------------------------------------------------------------------------- front matter


def _metric(name: str, value: float | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"type": "perplexity", "value": round(value, 4), "name": name}


def front_matter(config: RunConfig, summary: RunSummary, *, model_name: str) -> dict[str, Any]:
    """The card's YAML metadata as a mapping (the Hub's model card metadata schema)."""
    meta: dict[str, Any] = {}
    base = base_model(config)
    if base is not None:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(TAGS)
    parts = [
        ("Held-out perplexity (distilled student, this model)", summary.student),
        ("Held-out perplexity (CE-only twin, same budget, not distilled)", summary.baseline),
        (f"Held-out perplexity (teacher {_card_location(config.teacher.source)})", summary.teacher),
    ]
    metrics = [m for n, r in parts if (m := _metric(n, r.val_ppl if r else None)) is not None]
    if metrics:
        meta["model-index"] = [
            {
                "name": model_name,
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Causal language modeling"},
                        "dataset": {
                            "name": _card_location(config.data.source),
                            "type": config.data.source,
                            "split": "held-out",
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return meta


def _dump_yaml(value: Any) -> str:
    """Safe YAML, keys in our order, one line per scalar however long."""
    text: str = yaml.safe_dump(
        value, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10**9
    )
    return text


def read_front_matter(card: str) -> dict[str, Any]:
    """The YAML front matter of a card, parsed with ``yaml.safe_load`` (``{}`` if none)."""
    if not card.startswith("---\n"):
        return {}
    end = card.find("\n---\n", 4)
    if end < 0:
        raise ValueError("the card's front matter has no closing '---' line")
    loaded = yaml.safe_load(card[4 : end + 1])
    return loaded if isinstance(loaded, dict) else {}


# --------------------------------------------------------------------------- body


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size_speed_table(summary: RunSummary, weights_bytes: int | None) -> list[str]:
    t = summary.teacher
    rows: list[tuple[str, ModelResult | None]] = [
        ("teacher", t),
        ("student (distilled, this model)", summary.student),
        ("student (CE only, same budget)", summary.baseline),
    ]
    lines = [
        "| model | parameters | share of teacher | held-out perplexity | agreement with teacher"
        " | generation tokens/s | speed vs teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        if r is None:
            continue
        share = f"{r.params / t.params:.0%}" if t and t.params and r.params else "-"
        speed = (
            f"{r.tokens_per_s / t.tokens_per_s:.2f}x"
            if t and t.tokens_per_s and r.tokens_per_s
            else "-"
        )
        agree = "-" if name == "teacher" else _num(r.agreement, ".1%")
        lines.append(
            f"| {name} | {_num(r.params, ',')} | {share} | {_num(r.val_ppl, '.2f')} | {agree} | "
            f"{_num(r.tokens_per_s, '.0f')} | {speed} |"
        )
    if weights_bytes:
        lines += ["", f"Weights in this folder: {weights_bytes / 2**20:.1f} MiB."]
    return lines


def _lora_card_line(config: RunConfig, student: ModelResult) -> list[str]:
    """The card's LoRA line: rank, alpha, what trained, and what the folder holds."""
    lora = config.student.lora
    if lora is None:
        return []
    share = ""
    trained, total = student.trainable_params, student.params
    if trained and total:
        share = f"; {trained:,} of {total:,} parameters trained ({trained / total:.2%})"
    held = {
        "merged": "adapters merged into the weights",
        "adapter": "the peft adapter (load it with peft.PeftModel.from_pretrained over its base)",
    }[lora.export]
    return [f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}{share}; this folder holds {held}."]


def _hidden_card_line(config: RunConfig) -> list[str]:
    """The card's line for a hidden-state loss: what was matched, and that the learned
    projections were a training aid, left out of this export."""
    hidden = config.loss.hidden
    if hidden is None:
        return []
    return [
        f"Hidden-state loss: {hidden.kind}, weight {hidden.weight}; its learned "
        "projections (where the widths differ) were a training aid and are not part of "
        "this export."
    ]


def _result_lines(config: RunConfig, summary: RunSummary) -> list[str]:
    """Gap closed next to the verdict (never a bare percentage), and the cross-tokenizer
    note where perplexities do not compare."""
    lines: list[str] = []
    verdict = summary.verdict
    if summary.gap_closed is not None:
        lines.append(
            f"Distillation closed {summary.gap_closed:.0%} of the gap between the CE-only "
            "student and the teacher (held-out loss)."
        )
    if verdict is not None:
        mark = {"good": "**Verdict:**", "warning": "**Warning:**", "info": "**Note:**"}
        lines.append(f"{mark[verdict.level]} {verdict.text}")
    if config.loss.cross_tokenizer != "off":
        parts = [("teacher", summary.teacher), ("student", summary.student)]
        parts.append(("CE-only student", summary.baseline))
        figures = ", ".join(
            f"{name} {m.val_bpb:.3f}" for name, m in parts if m is not None and m.val_bpb
        )
        lines.append(
            f"Teacher and student tokenize differently (loss.cross_tokenizer="
            f"{config.loss.cross_tokenizer}): perplexities are per token of each model's own "
            f"tokenizer and do not compare; bits per byte of the held-out text do: {figures}."
        )
    return [item for line in lines for item in ("", line)]


def _fence(text: str, lang: str) -> list[str]:
    """A fenced block longer than any backtick run in ``text`` (so it cannot end early)."""
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return [f"{fence}{lang}", text.rstrip("\n"), fence]


def _reproduce_lines(config: RunConfig, summary: RunSummary) -> list[str]:
    recorded = summary.raw.get("provenance")
    prov: Mapping[str, Any] = recorded if isinstance(recorded, Mapping) else provenance()
    found_versions, found_git = prov.get("versions"), prov.get("git")
    versions: Mapping[str, Any] = found_versions if isinstance(found_versions, Mapping) else {}
    git: Mapping[str, Any] | None = found_git if isinstance(found_git, Mapping) else None
    lines = ["## Framework versions", ""]
    for name in ("torch", "transformers", "foundry", "python"):
        lines.append(f"- {name} {versions.get(name, 'unknown')}")
    lines += ["", "## How to reproduce", ""]
    foundry_version = versions.get("foundry", "unknown")
    if git is not None and git.get("commit"):
        dirty = " (with uncommitted changes)" if git.get("dirty") else ""
        lines.append(
            f"Trained with Foundry {foundry_version} in the git checkout "
            f"{_code(str(git.get('folder', '?')))} at commit {_code(str(git['commit']))}{dirty}."
        )
    else:
        lines.append(f"Trained with Foundry {foundry_version} (not in a git checkout).")
    lines += [
        "Save the config below as `config.yaml` and run `foundry distill --config config.yaml`.",
        "",
        *_fence(_dump_yaml(config.to_dict()), "yaml"),
    ]
    return lines


def model_card(
    config: RunConfig,
    results: Mapping[str, Any] | RunSummary,
    *,
    model_name: str | None = None,
    weights_bytes: int | None = None,
) -> str:
    """The card: YAML front matter for the Hub, then a plain-language body (teacher, loss
    and mode, results with the verdict, size/speed, versions, how to reproduce)."""
    summary = results if isinstance(results, RunSummary) else RunSummary.parse(results)
    t, s = summary.teacher, summary.student
    if t is None or s is None:
        raise ValueError("a model card needs the teacher's and the student's results")
    name = model_name or config.name or "foundry-distilled-student"
    meta = front_matter(config, summary, model_name=name)
    init = _init_source(config)
    init_line = {
        "fresh": "Student: initialised fresh",
        "pretrained": f"Student: initialised from {_code(_card_location(init or ''))}",
        "from_teacher": "Student: initialised from the teacher's layers "
        f"{config.student.layers or '(evenly spaced)'}",
    }[config.student.init]
    mode = config.distill.mode
    lines = [
        "---",
        _dump_yaml(meta).rstrip("\n"),
        "---",
        "",
        f"# {' '.join(name.split())}: a distilled student (Foundry)",
        "",
        f"Teacher: {_card_teacher(config)} ({_num(t.params, ',')} parameters).",
        f"{init_line}; {_num(s.params, ',')} parameters"
        + (f" ({s.params / t.params:.0%} of the teacher)." if s.params and t.params else "."),
        *_lora_card_line(config, s),
        f"Loss: {config.loss.kind}, temperature {config.loss.temperature}, "
        f"CE weight {config.loss.ce_weight}; mode: {mode}; {config.limits.max_steps} steps.",
        f"Data: {_code(_card_location(config.data.source))}.",
        *_hidden_card_line(config),
        "",
        "## Results (held-out)",
        "",
        *_size_speed_table(summary, weights_bytes),
        *_result_lines(config, summary),
        "",
        *_reproduce_lines(config, summary),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- export


def weights_size(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) directly in ``folder``."""
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin")
    )


def export_run(store: Any, run_id: str, target: Path | str, *, force: bool = False) -> Path:
    """Re-export a completed run's student into ``target``: its weights and tokenizer
    copied, the card and metrics regenerated from the stored config and summary.

    Atomic: written into a temporary folder beside ``target`` and renamed into place, so
    ``target`` is either untouched or complete. An existing non-empty ``target`` is
    refused unless ``force`` (then it is replaced). ``store`` is a ``RunStore`` (a
    read-only one does: this reads the store and writes only ``target``).
    """
    record = store.get_run(run_id)
    if record.state != "completed":
        raise ExportError(
            f"run {run_id} is {record.state}, not completed: only a completed run has an "
            "exported student (resume it with `foundry distill --resume RUN_ID`)"
        )
    summary = RunSummary.parse(record.summary)
    source = Path(summary.export_dir) if summary.export_dir else store.run_dir(run_id) / "student"
    if not (source / "config.json").is_file() and not (source / "adapter_config.json").is_file():
        raise ExportError(
            f"run {run_id} has no student folder at {source} (it was deleted, or the run "
            "exported nothing); there is nothing to export"
        )
    config = RunConfig.model_validate(record.config)
    dest = Path(target).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise ExportError(
            f"{dest} exists and is not empty; choose another folder or pass --force to replace it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(CARD_FILENAME, METRICS_FILENAME))
        card = model_card(config, summary, model_name=record.name, weights_bytes=weights_size(tmp))
        (tmp / CARD_FILENAME).write_text(card, encoding="utf-8")
        (tmp / METRICS_FILENAME).write_text(
            json.dumps(record.summary, indent=1, default=str), encoding="utf-8"
        )
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
