"""The embedded default teacher: trained by Foundry itself, then cached.

No model can be downloaded on a machine without internet, yet ``foundry
distill`` must work out of the box. So the default teacher is a small
Llama-style model with its own byte-level BPE tokenizer, trained with plain
cross-entropy by the same ``Trainer`` that distils students, on a corpus every
Python install carries. The same recipe trains a teacher on any data source,
so a user can try Foundry end to end on their own domain.

The cache key is the recipe plus a fingerprint of the corpus plus
``RECIPE_VERSION``: change any of them and a new teacher is built instead of a
stale one reused. Builds write into a temporary folder that is renamed into
place only when complete, under a lock file, so two runs never half-build or
overwrite the same teacher.

Under data parallelism the build (a whole CE training) happens once per cache folder:
the job names one builder per folder (``may_build``) and every other rank waits for the
published teacher by polling for its marker file, with a stop point every second, never
inside a collective (a build takes far longer than any collective timeout). The lock
records ``pid@host``, so a lock held by a live process on another node of a shared cache
folder is never mistaken for a dead one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from foundry_kernel._context import RunContext
from foundry_kernel._models import seeded_init
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import DataConfig, EvalConfig, LimitsConfig, OptimConfig, TeacherBuild
from foundry_kernel.data._blocks import DataBundle, build_data, split_documents
from foundry_kernel.data._sources import corpus_fingerprint, load_documents
from foundry_kernel.data._tokenizer import train_bpe_tokenizer
from foundry_kernel.errors import ModelError
from foundry_kernel.training._trainer import EarlyStop, MetricsSink, Trainer, TrainPlan

log = logging.getLogger("foundry.teacher")
RECIPE_VERSION = 2  # 2: steps sized from the corpus, early stopping, best weights kept
MARKER = "foundry-teacher.json"
LOCK_STALE_S = 3600.0
BUILD_WAIT_S = LOCK_STALE_S
"""How long a rank that does not build waits for the builder's teacher: as long as a
build may hold its lock before the lock counts as abandoned."""


#: How a corpus is read, taken from the run's ``data`` section when the teacher is built
#: on the run's own ``data.source`` (a JSONL corpus's fields, a file's document size).
READING_FIELDS = ("format", "text_field", "prompt_field", "completion_field", "document_chars")


def teacher_data_config(build: TeacherBuild, like: DataConfig | None = None) -> DataConfig:
    """The data section a built teacher is trained on: ``teacher.build``'s corpus, block
    length and document cap, read the way the run reads it when ``like`` (the run's
    ``data``) names the same source (its JSONL fields, its document size); otherwise with
    the defaults. How it was read reaches the cache key through the corpus fingerprint."""
    reading: dict[str, Any] = {}
    if like is not None and like.source == build.data:
        reading = {name: getattr(like, name) for name in READING_FIELDS}
    return DataConfig(
        source=build.data, seq_len=build.seq_len, max_documents=build.max_documents, **reading
    )


def teacher_key(build: TeacherBuild, fingerprint: str) -> str:
    recipe = {"recipe_version": RECIPE_VERSION, "build": build.model_dump(), "corpus": fingerprint}
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class BuildPlan:
    """How long the build trains, sized from the corpus (a pure function of its inputs).

    ``teacher.build.steps`` is the most the build may take; early stopping on held-out
    loss (``teacher.build.patience``) may end it sooner, keeping the best evaluated weights,
    and so may an optional cap on passes (``teacher.build.max_epochs``). The cap is off by
    default: the quality sweep measured that 4 passes left every corpus's teacher
    undertrained (held-out loss still falling), and that on ~600 KB corpora the uncapped,
    early-stopped teacher halves its perplexity (134 -> 61, 92 -> 32).
    """

    steps: int
    eval_every: int
    tokens_per_step: int
    train_tokens: int
    epochs: float  # passes over the training side at ``steps``
    limited_by: str  # "teacher.build.steps" or "teacher.build.max_epochs"

    @classmethod
    def size(cls, build: TeacherBuild, train_tokens: int) -> BuildPlan:
        per_step = build.batch_size * build.seq_len
        steps = build.steps
        if build.max_epochs is not None:
            steps = min(steps, max(1, math.ceil(build.max_epochs * train_tokens / per_step)))
        return cls(
            steps=steps,
            eval_every=max(1, math.ceil(steps / EVALS_PER_BUILD)),
            tokens_per_step=per_step,
            train_tokens=train_tokens,
            epochs=steps * per_step / max(train_tokens, 1),
            limited_by="teacher.build.steps"
            if steps == build.steps
            else "teacher.build.max_epochs",
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EVALS_PER_BUILD = 10
"""Held-out evaluations over a build: early stopping's resolution."""


@dataclass(frozen=True)
class ReferenceShape:
    """A student-sized model (a fresh student's shape) that the build's recipe also trains,
    so a teacher can be judged before anyone distils from it: is it clearly better than a
    model of the student's size trained the same way on the same text?"""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int | None = None

    @property
    def key(self) -> str:
        mlp = "auto" if self.intermediate_size is None else str(self.intermediate_size)
        return f"h{self.hidden_size}-l{self.num_layers}-a{self.num_heads}-m{mlp}"


def ensure_builtin_teacher(
    build: TeacherBuild,
    *,
    cache_dir: Path,
    ctx: RunContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_metrics: MetricsSink | None = None,
    may_build: bool = True,
    wait_s: float = BUILD_WAIT_S,
    like: DataConfig | None = None,
) -> Path:
    """Path of a ready teacher for ``build``; trains and caches it when absent.

    With ``may_build=False`` (a rank of a data-parallel job whose folder another rank
    builds into) it never builds: it waits up to ``wait_s`` for the teacher to be
    published, checking ``ctx`` every second, and fails clearly when it never is.

    Every part is a stop point for ``ctx`` (a cancel, the time limits, the step watchdog):
    reading the corpus (per document), the split, the tokenizer's training, packing, the
    training itself and the save (per file). A stopped build leaves no folder behind but
    the cache's own lock file, removed on the way out.
    """
    ctx.set_stage("corpus", source=build.data)
    data_cfg = teacher_data_config(build, like)
    docs = load_documents(data_cfg, check=ctx.check)
    key = teacher_key(build, corpus_fingerprint(docs))
    final = cache_dir / "teachers" / key
    if (final / MARKER).is_file():
        return final
    if not may_build:
        return _wait_for_teacher(final, ctx, wait_s)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _BuildLock(final.parent / f"{key}.lock", ctx):
        if (final / MARKER).is_file():  # another process finished it while we waited
            return final
        _build(
            build,
            data_cfg,
            docs,
            final,
            ctx=ctx,
            device=device,
            amp_dtype=amp_dtype,
            on_metrics=on_metrics or (lambda step, values: None),
        )
    return final


def _wait_for_teacher(final: Path, ctx: RunContext, wait_s: float) -> Path:
    """Poll for the teacher another rank builds (a stop point per second; bounded)."""
    ctx.set_stage("wait_for_build", folder=str(final))
    deadline = time.monotonic() + wait_s
    while not (final / MARKER).is_file():
        if time.monotonic() > deadline:
            raise ModelError(
                f"the built-in teacher {final} was not published within {wait_s:.0f} s by the "
                "rank that builds it; see that rank's log (rank 0, or this node's local rank "
                "0 when FOUNDRY_CACHE_DIR is not shared between nodes)"
            )
        ctx.check()
        ctx.wait_stop(1.0)
    ctx.check()
    return final


def _prepare(
    build: TeacherBuild,
    data_cfg: DataConfig,
    docs: list[Any],
    ctx: RunContext,
    tokenizer: Any | None = None,
) -> tuple[Any, DataBundle, list[Any]]:
    """The build's tokenizer (trained on the training side only, unless given), its data
    bundle and the training documents. The split is a pure function of the corpus and its
    seed, so a reference trained later sees exactly the teacher's split."""
    # Split first so the tokenizer never sees held-out text either.
    ctx.set_stage("split", docs=len(docs))
    train_docs, _, _ = split_documents(
        docs,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed,
        overlap_chars=data_cfg.overlap_chars,
        check=ctx.check,
    )
    if tokenizer is None:
        ctx.set_stage("tokenizer", vocab_size=build.vocab_size)
        texts = (f"{d.prompt}{d.text}" for d in train_docs)  # prompts are read too
        tokenizer = train_bpe_tokenizer(texts, build.vocab_size, ctx=ctx)
    data = build_data(data_cfg, tokenizer, seed=data_cfg.split_seed, docs=docs, ctx=ctx)
    return tokenizer, data, train_docs


def _train(
    model: LlamaForCausalLM,
    data: DataBundle,
    build: TeacherBuild,
    *,
    ctx: RunContext,
    amp_dtype: torch.dtype | None,
    on_metrics: MetricsSink,
    prefix: str,
) -> dict[str, Any]:
    """The build's recipe, for the teacher and its student-sized reference alike: CE,
    steps sized from the corpus (:class:`BuildPlan`), early stopping on held-out loss with
    the best weights kept. Returns what the record keeps of it."""
    sized = BuildPlan.size(build, int(data.report["tokens"]["train"]))
    ctx.set_stage("train", steps=sized.steps, limited_by=sized.limited_by)
    plan = TrainPlan(
        optim=OptimConfig(
            batch_size=build.batch_size, lr=build.lr, warmup_steps=min(30, sized.steps // 10)
        ),
        limits=LimitsConfig(max_steps=sized.steps),
        eval=EvalConfig(every_steps=sized.eval_every, max_batches=20),
        amp_dtype=amp_dtype,
        early_stop=None if build.patience is None else EarlyStop(patience=build.patience),
    )
    trainer = Trainer(model, data, plan, ctx=ctx, on_metrics=on_metrics, prefix=prefix)
    val = trainer.fit()
    return {
        "val": val,
        "plan": sized.as_dict(),
        "steps_trained": trainer.step,
        "best_step": trainer.best_step,
        "stopped_early": trainer.stopped_early,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _build(
    build: TeacherBuild,
    data_cfg: DataConfig,
    docs: list[Any],
    final: Path,
    *,
    ctx: RunContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_metrics: MetricsSink,
) -> None:
    ctx.set_phase("teacher_build", steps=build.steps)
    t0 = time.perf_counter()
    tokenizer, data, train_docs = _prepare(build, data_cfg, docs, ctx)
    ctx.set_stage("model")
    model = _fresh_model(build, tokenizer, device)
    trained = _train(
        model,
        data,
        build,
        ctx=ctx,
        amp_dtype=amp_dtype,
        on_metrics=on_metrics,
        prefix="teacher_build/",
    )
    ctx.set_stage("save")
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save(tmp, model, tokenizer, ctx)
    except BaseException:  # a stop or a failure while saving: no half-built teacher stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {
        "recipe_version": RECIPE_VERSION,
        "build": build.model_dump(),
        **trained,
        "vocab_size": len(tokenizer),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "data": data.report,
        "train_doc_ids": sorted(d.doc_id for d in train_docs),
    }
    try:
        ctx.check()  # the last stop point: after it, the teacher is complete and published
        atomic_write_text(tmp / MARKER, json.dumps(record, indent=1))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "built teacher %s in %.0f s: %d of %d steps (best at %s), val ppl %.1f",
        final.name,
        record["build_seconds"],
        trained["steps_trained"],
        trained["plan"]["steps"],
        trained["best_step"],
        trained["val"].get("val/ppl", float("nan")),
    )


def ensure_reference(
    build: TeacherBuild,
    teacher: Path,
    shape: ReferenceShape,
    *,
    ctx: RunContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_metrics: MetricsSink | None = None,
    like: DataConfig | None = None,
) -> dict[str, Any]:
    """The held-out result of a ``shape``-sized model trained by the teacher's own recipe on
    its own data and tokenizer; trained once per teacher and shape, then cached beside the
    teacher (``references/<shape>.json``, written atomically)."""
    path = teacher / "references" / f"{shape.key}.json"
    if path.is_file():
        cached: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return cached
    from transformers import AutoTokenizer

    ctx.set_stage("corpus", source=build.data)
    data_cfg = teacher_data_config(build, like)
    docs = load_documents(data_cfg, check=ctx.check)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    _, data, _ = _prepare(build, data_cfg, docs, ctx, tokenizer=tokenizer)
    t0 = time.perf_counter()
    model = _fresh_model(build, tokenizer, device, shape)
    result = _train(
        model,
        data,
        build,
        ctx=ctx,
        amp_dtype=amp_dtype,
        on_metrics=on_metrics or (lambda step, values: None),
        prefix="teacher_reference/",
    )
    record = {"shape": dataclasses.asdict(shape), **result}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


def _save(tmp: Path, model: LlamaForCausalLM, tokenizer: Any, ctx: RunContext) -> None:
    """Weights, then tokenizer, into the build's temporary folder; a stop point between."""
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp)
    ctx.check()
    tokenizer.save_pretrained(tmp)
    ctx.check()


def _fresh_model(
    build: TeacherBuild, tokenizer: Any, device: torch.device, shape: ReferenceShape | None = None
) -> LlamaForCausalLM:
    """The build's Llama-style model: the teacher, or a model of ``shape`` (its reference)."""
    hidden = build.hidden_size if shape is None else shape.hidden_size
    heads = build.num_heads if shape is None else shape.num_heads
    layers = build.num_layers if shape is None else shape.num_layers
    field = "teacher.build" if shape is None else "student"
    if hidden % heads:
        raise ModelError(f"{field}.hidden_size must be divisible by {field}.num_heads")
    mlp = shape.intermediate_size if shape is not None else None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp or -(-hidden * 8 // 3 // 16) * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(build.seq_len, 512),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = seeded_init(lambda: LlamaForCausalLM(config), 0)
    return model.to(device)  # type: ignore[arg-type]  # transformers' stubs


def read_teacher_record(path: Path) -> dict[str, Any] | None:
    """The build record of a Foundry-built teacher, None for other models."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


class _BuildLock:
    """An exclusive lock file; waits (checking for cancel) while another build holds it."""

    def __init__(self, path: Path, ctx: RunContext) -> None:
        self.path = path
        self.ctx = ctx

    def __enter__(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                self.ctx.check()
                self.ctx.wait_stop(1.0)
                continue
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}".encode())
            os.close(fd)
            return

    def _stale(self) -> bool:
        """A lock left by a killed process: its owner is gone or it is very old. The
        owner's pid is only judged on its own host (a shared cache folder's lock may
        belong to a process on another node); elsewhere only the age counts."""
        try:
            owner, _, host = (self.path.read_text() or "0").partition("@")
            pid = int(owner)
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return False
        if age > LOCK_STALE_S:
            return True
        return (not host or host == socket.gethostname()) and not _pid_alive(pid)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    return pid > 0 and psutil.pid_exists(pid)
