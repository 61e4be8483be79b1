"""The main job: teacher → data → student → distil → CE-only baseline → evaluate → export.

``run_job`` is what the run controller executes in its worker thread and what
the CLI runs. Each phase that takes time checkpoints or exports before the
next starts, so ``resume=True`` skips finished phases and continues an
interrupted one from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from foundry_kernel._context import RunContext
from foundry_kernel._isolation import per_thread_setting, run_threads
from foundry_kernel._models import (
    LoadedModel,
    build_student,
    count_params,
    load_causal_lm,
    shared_vocab_size,
)
from foundry_kernel._runtime import (
    Runtime,
    autocast_dtype,
    resolve_device,
    resolve_runtime,
    weights_dtype,
)
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import BUILTIN_TEACHER, RunConfig
from foundry_kernel.data._blocks import DataBundle, build_data
from foundry_kernel.errors import ConfigError
from foundry_kernel.paths import default_cache_dir
from foundry_kernel.run._resources import estimate_memory, preflight
from foundry_kernel.store import RunStore
from foundry_kernel.summary import ModelResult, RunSummary
from foundry_kernel.teachers._builtin import ensure_builtin_teacher, read_teacher_record
from foundry_kernel.teachers._client import RetryPolicy, TeacherClient
from foundry_kernel.teachers._interface import (
    CachedTeacher,
    HFTeacher,
    Teacher,
    VLLMTeacher,
    vllm_api_key,
)
from foundry_kernel.teachers._logit_cache import (
    CacheKey,
    LogitCache,
    capture,
    fingerprint_model_dir,
    fingerprint_tokenizer,
    fingerprint_tokens,
)
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.teachers._vllm_server import teacher_server
from foundry_kernel.training._evaluate import (
    evaluate_lm,
    evaluate_teacher,
    generate_samples,
    generation_speed,
)
from foundry_kernel.training._sequence import describe as describe_sequence
from foundry_kernel.training._sequence import sequence_data, sequence_key
from foundry_kernel.training._strategy import FusedLinearLoss, choose_strategy
from foundry_kernel.training._trainer import Trainer, TrainPlan

log = logging.getLogger("foundry.pipeline")


class Job:
    """State shared by the phases of one run."""

    def __init__(self, config: RunConfig, store: RunStore, run_id: str, ctx: RunContext) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.ctx = ctx
        self.run_dir = store.run_dir(run_id)
        self.device = resolve_device(config.device)
        self.summary: dict[str, Any] = {}
        self.teacher_record: dict[str, Any] | None = None
        self.runtime: Runtime | None = None  # resolved once both models are shaped
        self.teacher_path = config.teacher.source  # a folder once a built-in one is built
        self.teacher_id = ""  # fingerprint of the teacher's weights (keys caches)

    @property
    def rt(self) -> Runtime:
        """The run's :class:`Runtime`; reading it before it is resolved is a bug."""
        if self.runtime is None:
            raise RuntimeError("the run's Runtime was read before it was resolved")
        return self.runtime

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.store.log_metrics(self.run_id, step, values)

    def record(self, **parts: Any) -> None:
        """Merge parts into the summary, in memory and in the store (dashboards read it live)."""
        self.summary.update(parts)
        self.store.update_summary(self.run_id, parts)


def run_job(
    config: RunConfig,
    *,
    store: RunStore,
    run_id: str,
    ctx: RunContext,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the whole distillation job; returns its summary (also stored with the run).

    Runs on the run's worker thread with its own CPU thread count (``config.threads``,
    see ``_isolation.run_threads``: other runs in the process keep theirs).
    """
    with run_threads(config.threads) as threads:
        job = Job(config, store, run_id, ctx)
        summary = _run_phases(job, resume=resume)
        job.record(
            threads={
                "asked": config.threads,
                "used": threads,
                "at_end": torch.get_num_threads(),
                "per_run": per_thread_setting(),
            }
        )
        return summary


def _run_phases(job: Job, *, resume: bool) -> dict[str, Any]:
    """Teacher, data, student, (preflight), mode, distil, baseline, evaluate, export."""
    t0 = time.perf_counter()
    config, ctx = job.config, job.ctx
    teacher = _load_teacher(job)
    ctx.set_phase("data")
    data = build_data(config.data, teacher.tokenizer, seed=config.data.split_seed, ctx=ctx)
    job.record(data=_data_report(job, data))
    ctx.set_phase("student")
    student = _build_student(job, teacher)
    ctx.set_stage("runtime")
    vocab = shared_vocab_size(teacher, student)
    job.runtime = resolve_runtime(
        config,
        teacher_hidden=teacher.model.config.hidden_size,
        student_hidden=student.model.config.hidden_size,
        device=job.device,
    )
    job.record(runtime=job.runtime.describe())
    _preflight(job, teacher, student, vocab)
    with _open_teacher(job, teacher, vocab) as live:
        trainer_teacher, train_data = _prepare_mode(job, live, teacher, data, vocab)
        _train_phase(job, "distill", student, train_data, trainer_teacher, vocab, resume=resume)
        baseline = None
        if config.eval.baseline:
            ctx.set_phase("baseline")
            baseline = _build_student(job, teacher)  # the same path as the student's
            _train_phase(job, "baseline", baseline, data, None, vocab, resume=resume)
        ctx.set_phase("evaluate")
        results = _evaluate_all(job, live, teacher, student, baseline, data, vocab)
    ctx.set_phase("export")
    export_dir = _export(job, student, results)
    job.record(
        **results, export_dir=str(export_dir), train_seconds=round(time.perf_counter() - t0, 1)
    )
    return job.summary


def _build_student(job: Job, teacher: LoadedModel) -> LoadedModel:
    """The student; cutting it from a served teacher loads the teacher's weights once here.
    Stop points before and after the build (a construction is one call into transformers)
    and inside a pretrained student's download."""
    cfg, check = job.config, job.ctx.check
    job.ctx.set_stage("build", init=cfg.student.init)
    if cfg.student.init == "from_teacher" and cfg.teacher.backend == "vllm":
        with_weights = load_causal_lm(
            job.teacher_path, device=torch.device("cpu"), field="teacher.source", check=check
        )
        check()
        student = build_student(
            cfg.student, with_weights, device=job.device, seed=cfg.seed, check=check
        )
        student = LoadedModel(student.model, teacher.tokenizer, student.source)
    else:
        student = build_student(cfg.student, teacher, device=job.device, seed=cfg.seed, check=check)
    check()
    return student


def _open_teacher(job: Job, teacher: LoadedModel, vocab: int) -> Teacher:
    """The run's live teacher: the loaded model, or a vLLM server (Foundry's own, started
    here and stopped when the run ends however it ends, or the one at teacher.url)."""
    cfg = job.config
    if cfg.teacher.backend == "hf":
        return HFTeacher(
            teacher.model,
            vocab_size=vocab,
            amp_dtype=job.rt.teacher_amp,
            top_k=cfg.loss.top_k,
            pad_token_id=teacher.tokenizer.pad_token_id,
        )
    srv = cfg.teacher.server
    assert cfg.loss.top_k is not None  # the config requires it with this backend
    server = None
    url, api_key = cfg.teacher.url, vllm_api_key()
    if url is None:
        job.ctx.set_phase("teacher_server")
        longest = cfg.data.seq_len + max(
            cfg.distill.sequence.max_new_tokens, cfg.distill.on_policy.max_new_tokens
        )
        server = teacher_server(
            job.teacher_path,
            port=srv.port,
            max_logprobs=cfg.loss.top_k,
            max_model_len=srv.max_model_len or longest,
            dtype=srv.dtype,
            eager=srv.eager,
            kv_cache_gib=srv.kv_cache_gib,
            log_dir=job.run_dir / "teacher-server",
            startup_timeout=srv.start_timeout_s,
            check=job.ctx.check,
        )
        url, api_key = server.base_url, server.token
        job.record(teacher_server={"url": url, "log": str(server.log_path)})
    client = TeacherClient(
        url,
        api_key=api_key,
        policy=RetryPolicy(
            retries=srv.retries, backoff_s=srv.backoff_s, timeout_s=srv.request_timeout_s
        ),
        check=job.ctx.check,
        wait=job.ctx.wait_stop,
    )
    return VLLMTeacher(client, top_k=cfg.loss.top_k, batch_blocks=srv.batch_blocks, server=server)


def _prepare_mode(
    job: Job, live: Teacher, teacher: LoadedModel, data: DataBundle, vocab: int
) -> tuple[Teacher | None, DataBundle]:
    """What the distillation phase trains against, and on, for the configured mode."""
    mode = job.config.distill.mode
    if mode == "offline":
        return CachedTeacher(_capture(job, live, teacher, data, vocab), live), data
    if mode == "sequence":
        seq = job.config.distill.sequence
        job.ctx.set_phase("sequence", prompts=seq.num_prompts)
        made = sequence_data(
            live,
            data.train,
            seq,
            folder=job.run_dir / "sequence-data",
            key=sequence_key(seq, job.teacher_id, fingerprint_tokens(data.train), job.config.seed),
            tokenizer=teacher.tokenizer,
            seed=job.config.seed,
            ctx=job.ctx,
        )
        job.record(sequence=describe_sequence(made))
        return (live if seq.logit_kd else None), dataclasses.replace(data, train=made.blocks)
    return live, data


def _capture(
    job: Job, live: Teacher, teacher: LoadedModel, data: DataBundle, vocab: int
) -> LogitCache:
    """Capture (or reuse, or resume) the teacher's top-k over the training blocks."""
    cfg = job.config
    assert cfg.loss.top_k is not None
    key = CacheKey(
        teacher=job.teacher_id,
        tokenizer=fingerprint_tokenizer(teacher.tokenizer),
        data=fingerprint_tokens(data.train),
        k=cfg.loss.top_k,
    )
    folder = default_cache_dir() / "logits" / key.digest()
    job.ctx.set_phase("capture", blocks=len(data.train))
    t0 = time.perf_counter()

    def ask(index: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> SparseTargets:
        signal = live.signal(None, ids.to(job.device), mask.to(job.device))
        if not isinstance(signal, SparseTargets):  # an in-process teacher without top_k
            signal = SparseTargets.from_logits(signal, key.k)
        return signal.to(torch.device("cpu"))

    cache = capture(
        data.train,
        ask,
        key,
        folder,
        batch_size=cfg.optim.batch_size,
        shard_blocks=cfg.distill.cache_shard_blocks,
        ctx=job.ctx,
        vocab_size=vocab,
    )
    job.record(
        logit_cache={
            "path": str(folder),
            "k": key.k,
            "bytes_per_token": cache.bytes_per_token,
            "capture_seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return cache


def _load_teacher(job: Job) -> LoadedModel:
    """The teacher's tokenizer and model; a served teacher's model is built on the meta
    device (shape and size only: its weights live in the server)."""
    cfg = job.config.teacher
    job.ctx.set_phase("teacher")
    source = cfg.source
    if source == BUILTIN_TEACHER:
        hidden = cfg.build.hidden_size
        path = ensure_builtin_teacher(
            cfg.build,
            cache_dir=default_cache_dir(),
            ctx=job.ctx,
            device=job.device,
            amp_dtype=autocast_dtype(job.config.optim.precision, job.device, hidden),
            on_metrics=job.log_metrics,
        )
        job.ctx.set_phase("teacher")  # back from the build, if there was one
        source = str(path)
    job.ctx.set_stage("load", source=source)
    teacher = load_causal_lm(
        source,
        device=job.device,
        dtype=weights_dtype(cfg.dtype, job.device),
        revision=cfg.revision,
        field="teacher.source",
        weights=cfg.backend == "hf",
        check=job.ctx.check,
    )
    job.ctx.check()
    teacher.model.eval().requires_grad_(False)
    job.teacher_path = source
    job.teacher_id = _teacher_id(source, cfg.revision)
    job.teacher_record = read_teacher_record(Path(source).expanduser())
    job.record(teacher_source=cfg.source)
    return teacher


def _preflight(job: Job, teacher: LoadedModel, student: LoadedModel, vocab: int) -> None:
    """Refuse a run that cannot fit before the first step allocates the big transients
    (activations, logits, optimizer state), and record the estimate with the run."""
    tconf, sconf = teacher.model.config, student.model.config
    limit = min(
        getattr(c, "max_position_embeddings", None) or job.config.data.seq_len
        for c in (tconf, sconf)
    )
    if job.config.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len={job.config.data.seq_len} is longer than the models' context "
            f"({limit} positions); set data.seq_len to at most {limit}",
            field="data.seq_len",
        )
    served = job.config.teacher.backend == "vllm"  # its weights live in the server
    # The student's strategy as the Trainer will choose it (the same function): under the
    # fused one its logits never exist. Whether the teacher is projected too depends on
    # the mode's live teacher, unknown yet: its logits are counted (an upper bound).
    choice = choose_strategy(job.config.loss.strategy, student.model, None)
    fused_student = isinstance(choice.strategy, FusedLinearLoss)
    estimate = estimate_memory(
        job.config,
        teacher_params=0 if served else teacher.params,
        student_params=student.params,
        vocab_size=vocab,
        teacher_hidden=tconf.hidden_size,
        student_hidden=sconf.hidden_size,
        teacher_layers=tconf.num_hidden_layers,
        student_layers=sconf.num_hidden_layers,
        teacher_heads=getattr(tconf, "num_attention_heads", None),
        student_heads=getattr(sconf, "num_attention_heads", None),
        runtime=job.rt,
        fused_student=fused_student,
    )
    checkpoint_bytes = student.params * 4 * 3 + 4096  # weights + two AdamW moments
    report = preflight(
        job.config, estimate, runs_dir=job.store.root, checkpoint_bytes=checkpoint_bytes
    )
    for warning in report.warnings:
        job.ctx.emit("alert", level="warning", message=f"preflight: {warning}")
    job.record(
        preflight={
            "estimate_bytes": estimate.total,
            "free_bytes": report.free_bytes,
            "disk_needed_bytes": report.disk_needed_bytes,
            "disk_free_bytes": report.disk_free_bytes,
            "parts": dict(estimate.parts()),
        }
    )


def _data_report(job: Job, data: DataBundle) -> dict[str, Any]:
    """The data report, plus how many held-out documents a Foundry-built teacher trained on."""
    report = dict(data.report)
    record = job.teacher_record
    if record is not None and record.get("build", {}).get("data") == job.config.data.source:
        seen = set(record.get("train_doc_ids", ()))
        report["val_docs_seen_by_teacher"] = len(seen & set(data.val_doc_ids))
    return report


def _train_phase(
    job: Job,
    phase: str,
    student: LoadedModel,
    data: DataBundle,
    teacher: Teacher | None,
    vocab: int,
    *,
    resume: bool,
) -> None:
    """Distil (with a teacher) or train CE-only (without) on the same batches and budget."""
    job.ctx.set_phase(phase, max_steps=job.config.limits.max_steps)
    plan = TrainPlan.from_config(
        job.config,
        distill=teacher is not None,
        amp_dtype=job.rt.student_amp,
        teacher_amp_dtype=job.rt.teacher_amp,
    )
    trainer = Trainer(
        student.model,
        data,
        plan,
        ctx=job.ctx,
        on_metrics=job.log_metrics,
        teacher=teacher,
        vocab_size=vocab,
        ckpt_dir=job.run_dir / "checkpoints" / phase,
        prefix="" if phase == "distill" else f"{phase}/",
    )
    job.record(**{f"{phase}_loss_strategy": trainer.loss_strategy.as_dict()})
    trainer.fit(resume=resume)
    job.record(**{f"{phase}_steps": trainer.step, f"{phase}_skipped": trainer.skipped})


def _evaluate_all(
    job: Job,
    live: Teacher,
    teacher: LoadedModel,
    student: LoadedModel,
    baseline: LoadedModel | None,
    data: DataBundle,
    vocab: int,
) -> dict[str, Any]:
    cfg = job.config

    def evaluate(
        model: LoadedModel, amp: torch.dtype | None, with_teacher: bool
    ) -> dict[str, float]:
        return evaluate_lm(
            model.model,
            data.val,
            batch_size=cfg.optim.batch_size,
            max_batches=cfg.eval.max_batches,
            ctx=job.ctx,
            teacher=live if with_teacher else None,
            vocab_size=vocab,
            amp_dtype=amp,
            teacher_amp_dtype=job.rt.teacher_amp,
        )

    job.ctx.set_stage("teacher")
    t_eval = evaluate_teacher(
        live,
        data.val,
        batch_size=cfg.optim.batch_size,
        max_batches=cfg.eval.max_batches,
        ctx=job.ctx,
    )
    prompts = list(cfg.eval.sample_prompts)
    teacher_samples, teacher_speed = _teacher_samples(job, live, teacher, prompts)
    out: dict[str, Any] = {
        "teacher": ModelResult(
            params=teacher.params,
            val_ppl=t_eval["ppl"],
            val_loss=t_eval["loss"],
            tokens_per_s=teacher_speed,
            backend=live.kind,
        ).to_dict(),
        "val_tokens": int(t_eval["tokens"]),
    }
    samples = {"teacher": teacher_samples}
    for name, model in (("student", student), ("baseline", baseline)):
        if model is None:
            continue
        job.ctx.set_stage(name)
        ev = evaluate(model, job.rt.student_amp, with_teacher=True)
        out[name] = ModelResult(
            params=count_params(model.model),
            val_ppl=ev["ppl"],
            val_loss=ev["loss"],
            agreement=ev["agreement"],
            val_kl=ev["kl"],
            tokens_per_s=generation_speed(model.model, model.tokenizer, ctx=job.ctx),
        ).to_dict()
        samples[name] = _samples(job, model, prompts)
    out["agreement"] = out["student"]["agreement"]
    out["val_kl"] = out["student"]["val_kl"]
    if "baseline" in out:
        out["gap_closed"] = _gap_closed(out)
    out["samples"] = [
        {"prompt": p, **{k: v[i] for k, v in samples.items()}} for i, p in enumerate(prompts)
    ]
    return out


def _teacher_samples(
    job: Job, live: Teacher, teacher: LoadedModel, prompts: list[str]
) -> tuple[list[str], float]:
    """Greedy samples and generation tokens/s of the teacher, wherever it runs."""
    if isinstance(live, HFTeacher):
        speed = generation_speed(teacher.model, teacher.tokenizer, ctx=job.ctx)
        return _samples(job, teacher, prompts), speed
    tok = teacher.tokenizer
    n = job.config.eval.sample_tokens
    ids = [tok(p).input_ids for p in prompts]
    out = live.generate(ids, max_new_tokens=n, temperature=0.0, seed=0)
    t0 = time.perf_counter()
    timed = live.generate([tok("The").input_ids], max_new_tokens=64, temperature=0.0, seed=0)
    speed = len(timed[0]) / max(time.perf_counter() - t0, 1e-9)
    return [str(tok.decode(o, skip_special_tokens=True)) for o in out], speed


def _teacher_id(source: str, revision: str | None) -> str:
    """Fingerprint of a local teacher's files, or the hub id at its revision."""
    path = Path(source).expanduser()
    if path.is_dir():
        return fingerprint_model_dir(path)
    return f"{source}@{revision or 'main'}"


def _samples(job: Job, model: LoadedModel, prompts: list[str]) -> list[str]:
    return generate_samples(
        model.model,
        model.tokenizer,
        prompts,
        max_new_tokens=job.config.eval.sample_tokens,
        ctx=job.ctx,
    )


def _gap_closed(out: dict[str, Any]) -> float | None:
    """Fraction of the CE-student → teacher gap in held-out loss (nats) closed by distillation."""
    gap = out["baseline"]["val_loss"] - out["teacher"]["val_loss"]
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return (out["baseline"]["val_loss"] - out["student"]["val_loss"]) / gap


def _export(job: Job, student: LoadedModel, results: dict[str, Any]) -> Path:
    """Save the student with its tokenizer and a short model card of its metrics.

    Written into a temporary folder beside ``student/`` with a stop point after each file
    (weights, tokenizer, card, metrics) and renamed into place only when complete: a
    cancel, a time limit or a crash during the export never leaves a ``student/`` folder
    that looks complete but is not (the temporary one is removed on the way out; one left
    by a killed process is removed by the next export of the run).
    """
    ctx = job.ctx
    export = job.run_dir / "student"
    tmp = job.run_dir / f".student.{os.getpid()}.tmp"
    for stale in job.run_dir.glob(".student.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        ctx.set_stage("weights")
        student.model.save_pretrained(tmp)
        ctx.set_stage("tokenizer")
        student.tokenizer.save_pretrained(tmp)
        ctx.set_stage("card")
        atomic_write_text(tmp / "README.md", model_card(job.config, results))
        atomic_write_text(tmp / "foundry-metrics.json", json.dumps(results, indent=1, default=str))
        ctx.check()
        _replace_folder(tmp, export)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``, replacing an older export there (a rename cannot
    replace a non-empty folder, so the old one is moved aside first, then deleted)."""
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def model_card(config: RunConfig, results: Mapping[str, Any] | RunSummary) -> str:
    """A short, plain-language card: what was distilled from what, and how well."""
    summary = results if isinstance(results, RunSummary) else RunSummary.parse(results)
    t, s = summary.teacher, summary.student
    if t is None or s is None:
        raise ValueError("a model card needs the teacher's and the student's results")

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "# Distilled student (Foundry)",
        "",
        f"Teacher: `{config.teacher.source}` ({num(t.params, ',')} parameters).",
        f"Student: {num(s.params, ',')} parameters"
        + (f" ({s.params / t.params:.0%} of the teacher)." if s.params and t.params else "."),
        f"Loss: {config.loss.kind}, temperature {config.loss.temperature}, "
        f"CE weight {config.loss.ce_weight}; {config.limits.max_steps} steps.",
        "",
        "| model | held-out perplexity | agreement with teacher | generation tokens/s |",
        "|---|---|---|---|",
        f"| teacher | {num(t.val_ppl, '.2f')} | - | {num(t.tokens_per_s, '.0f')} |",
        f"| student (distilled) | {num(s.val_ppl, '.2f')} | {num(s.agreement, '.1%')} | "
        f"{num(s.tokens_per_s, '.0f')} |",
    ]
    b = summary.baseline
    if b is not None:
        lines.append(
            f"| student (CE only, same budget) | {num(b.val_ppl, '.2f')} | "
            f"{num(b.agreement, '.1%')} | {num(b.tokens_per_s, '.0f')} |"
        )
        if summary.gap_closed is not None:
            lines += [
                "",
                f"Distillation closed {summary.gap_closed:.0%} of the gap between "
                "the CE-only student and the teacher (held-out loss).",
            ]
    return "\n".join(lines) + "\n"
