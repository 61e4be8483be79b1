"""The main job: teacher → data → student → distil → CE-only baseline → evaluate → export.

``run_job`` is what the run controller executes in its worker thread and what
the CLI runs. Each phase that takes time checkpoints or exports before the
next starts, so ``resume=True`` skips finished phases and continues an
interrupted one from its last checkpoint.

Under data parallelism (torchrun) every rank runs ``run_job`` with its :class:`World`:

* only rank 0 writes the store (metrics, summary; ``Job.log_metrics``/``Job.record`` keep
  the summary in memory elsewhere) and the export; every rank logs to its own log;
* every rank builds the same data and loads the same teacher, and the job checks it
  (one ``all_gather_object`` of fingerprints) before training;
* the built-in teacher is built once per cache folder: by rank 0 when every rank sees
  rank 0's ``FOUNDRY_CACHE_DIR`` (one node, or a shared filesystem), else by each node's
  local rank 0 (the teacher fingerprint check then proves the nodes built the same one);
  the others poll for it with stop points, never inside a collective;
* ``teacher.placement`` (``config.teacher_placement``) says where the teacher lives:
  ``replicate`` (a full one per rank), ``shard`` (FSDP2 across ranks, inference only),
  ``server`` (one vLLM server per node started by its local rank 0, or ``teacher.url``),
  ``cache`` (the offline logit cache, captured shard by shard across ranks, each rank
  reading only its own batches' shards);
* the exported student is one ordinary ``save_pretrained`` folder whatever the strategy:
  rank 0 writes it from the gathered full state dict while the others wait.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from foundry_kernel import _lora
from foundry_kernel._context import RunContext
from foundry_kernel._isolation import per_thread_setting, run_threads
from foundry_kernel._models import (
    LoadedModel,
    build_student,
    context_limit,
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
from foundry_kernel._world import World
from foundry_kernel.atomic import atomic_write_text, replace_folder
from foundry_kernel.card import model_card, provenance, weights_size
from foundry_kernel.config import (
    BUILTIN_TEACHER,
    RunConfig,
    TeacherBuild,
    teacher_placement,
)
from foundry_kernel.data._blocks import DataBundle, build_data
from foundry_kernel.errors import ConfigError, DataError, TeacherServerError
from foundry_kernel.paths import default_cache_dir
from foundry_kernel.run._cross import (
    CrossSetup,
    bits_per_byte,
    byte_table,
    prepare_cross_tokenizer,
    scored_bytes,
)
from foundry_kernel.run._resources import estimate_memory_for, preflight
from foundry_kernel.store import RunStore
from foundry_kernel.summary import ModelResult, TeacherCheck, sample_history_key
from foundry_kernel.teachers._builtin import (
    ReferenceShape,
    ensure_builtin_teacher,
    ensure_reference,
    read_teacher_record,
)
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
from foundry_kernel.training import _parallel
from foundry_kernel.training._evaluate import (
    EvalShard,
    evaluate_lm,
    evaluate_teacher,
    generation_speed,
)
from foundry_kernel.training._samples import (
    Continuations,
    SampleHistory,
    SampleSettings,
    continue_prompts,
)
from foundry_kernel.training._sequence import describe as describe_sequence
from foundry_kernel.training._sequence import sequence_data, sequence_key
from foundry_kernel.training._strategy import FusedLinearLoss, LossStrategy, choose_strategy
from foundry_kernel.training._trainer import Trainer, TrainPlan

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from transformers import PreTrainedModel

log = logging.getLogger("foundry.pipeline")
ONE_PROCESS = World()


class Job:
    """State shared by the phases of one run."""

    def __init__(
        self,
        config: RunConfig,
        store: RunStore,
        run_id: str,
        ctx: RunContext,
        world: World = ONE_PROCESS,
    ) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.ctx = ctx
        self.world = world
        self.placement = teacher_placement(config)  # where the teacher lives, resolved
        self.run_dir = store.run_dir(run_id)
        self.device = _rank_device(resolve_device(config.device), world)
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
        """Into the store on rank 0 only (one row per step, not one per rank)."""
        if self.world.is_main:
            self.store.log_metrics(self.run_id, step, values)

    def record(self, **parts: Any) -> None:
        """Merge parts into the summary, in memory, and in the store on rank 0 (dashboards
        read it live); other ranks keep theirs in memory only."""
        self.summary.update(parts)
        if self.world.is_main:
            self.store.update_summary(self.run_id, parts)


def _rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank trains on the GPU of its local rank (``init_world`` selected it too)."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def run_job(
    config: RunConfig,
    *,
    store: RunStore,
    run_id: str,
    ctx: RunContext,
    resume: bool = False,
    world: World = ONE_PROCESS,
) -> dict[str, Any]:
    """Run the whole distillation job; returns its summary (also stored with the run, by
    rank 0 of a data-parallel ``world``; every rank calls this with its own world).

    Runs on the run's worker thread with its own CPU thread count (``config.threads``,
    see ``_isolation.run_threads``: other runs in the process keep theirs).
    """
    with run_threads(config.threads) as threads:
        job = Job(config, store, run_id, ctx, world)
        job.record(distributed=_world_report(job))
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
    _check_teacher(job, teacher)
    student: LoadedModel | None = None
    if config.loss.cross_tokenizer != "off":  # the blocks are in the student's tokens
        ctx.set_phase("student")
        student = _build_student(job, teacher)
    ctx.set_phase("data")
    tokenizer = teacher.tokenizer if student is None else student.tokenizer
    data = build_data(config.data, tokenizer, seed=config.data.split_seed, ctx=ctx)
    _same_on_every_rank(
        job,
        "data",
        (fingerprint_tokens(data.train), fingerprint_tokens(data.val)),
        "built other train/val blocks than rank 0 (data.source differs between nodes, or it "
        "is not deterministic); give every node the same data",
    )
    job.record(data=_data_report(job, data))
    if student is None:
        ctx.set_phase("student")
        student = _build_student(job, teacher)
    ctx.set_stage("runtime")
    cross = _cross_setup(job, teacher, student, data)
    vocab = shared_vocab_size(teacher, student) if cross is None else cross.student_vocab
    job.runtime = resolve_runtime(
        config,
        teacher_hidden=teacher.model.config.hidden_size,
        student_hidden=student.model.config.hidden_size,
        device=job.device,
    )
    job.record(runtime=job.runtime.describe())
    _preflight(job, teacher, student, vocab)
    teacher_vocab = vocab if cross is None else cross.teacher_vocab
    with _open_teacher(job, teacher, teacher_vocab) as live:
        trainer_teacher, train_data = _prepare_mode(job, live, teacher, data, vocab)
        student = _train_phase(
            job,
            "distill",
            student,
            train_data,
            trainer_teacher,
            vocab,
            resume=resume,
            strategy=None if cross is None else cross.strategy,
        )
        if isinstance(trainer_teacher, CachedTeacher):
            _record_cache_reads(job, trainer_teacher)
        baseline = None
        if config.eval.baseline:
            ctx.set_phase("baseline")
            baseline = _build_student(job, teacher)  # the same path as the student's
            baseline = _train_phase(job, "baseline", baseline, data, None, vocab, resume=resume)
        ctx.set_phase("evaluate")
        results, plain = _evaluate_all(job, live, teacher, student, baseline, data, vocab, cross)
        job.world.barrier()  # no rank leaves the teacher (a node's server) while others use it
    ctx.set_phase("export")
    export_dir = _export(job, plain, student.tokenizer, results)
    job.record(
        **results, export_dir=str(export_dir), train_seconds=round(time.perf_counter() - t0, 1)
    )
    return job.summary


def _world_report(job: Job) -> dict[str, Any]:
    """What the summary says about the processes: ``world_size``, ``strategy``
    (``distributed.strategy``, or ``single`` for one process), the resolved teacher
    placement and the process group's backend."""
    world = job.world
    return {
        "world_size": world.world_size,
        "strategy": job.config.distributed.strategy if world.distributed else "single",
        "teacher_placement": job.placement,
        "backend": world.backend,
        "nodes": len({n for n in world.all_gather_object(world.node_rank)}),
    }


def _same_on_every_rank(job: Job, what: str, value: Any, why: str) -> None:
    """Fail clearly (on every rank, at once) when some rank's ``value`` differs from rank
    0's: one ``all_gather_object`` of a small fingerprint."""
    if not job.world.distributed:
        return
    every = job.world.all_gather_object(value)
    differ = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        raise DataError(f"{what}: rank(s) {differ} {why}")


def _sees_main_folder(world: World, folder: Path) -> bool:
    """Whether this rank sees the folder rank 0 sees (one node, or a shared filesystem):
    rank 0 writes a probe file of a fresh name, every rank looks for it."""
    if not world.distributed:
        return True
    name = world.broadcast_object(f".probe-{secrets.token_hex(8)}" if world.is_main else None)
    probe = folder / name
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("foundry", encoding="utf-8")
    world.barrier()
    seen = probe.is_file()
    world.barrier()
    if world.is_main:
        probe.unlink(missing_ok=True)
    return seen


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
        student = build_student(
            cfg.student,
            teacher,
            device=job.device,
            seed=cfg.seed,
            check=check,
            cross_tokenizer=cfg.loss.cross_tokenizer != "off",
        )
    check()
    if cfg.student.lora is not None:
        job.ctx.set_stage("lora", rank=cfg.student.lora.rank)
        adapted = _lora.apply_lora(student.model, cfg.student.lora, seed=cfg.seed)
        student = dataclasses.replace(student, model=adapted)  # type: ignore[arg-type]
        counts = _lora.param_counts(adapted)
        job.record(
            lora={
                **cfg.student.lora.model_dump(),
                "target_modules": _lora.target_modules(adapted),
                "trainable_params": counts.trainable,
                "total_params": counts.total,
            }
        )
    return student


def _cross_setup(
    job: Job, teacher: LoadedModel, student: LoadedModel, data: DataBundle
) -> CrossSetup | None:
    """For ``loss.cross_tokenizer`` != off: the teacher's tokenization of every block and
    the aligned positions (``run._cross``), recorded in the summary; None otherwise."""
    setting = job.config.loss.cross_tokenizer
    if setting == "off":
        return None
    job.ctx.set_stage("cross_tokenize", setting=setting)
    cross = prepare_cross_tokenizer(setting, teacher, student, data, check=job.ctx.check)
    job.record(cross_tokenizer=cross.report)
    return cross


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
    top_k = cfg.loss.top_k
    assert top_k is not None  # the config requires it with this backend
    server = None
    url, api_key = cfg.teacher.url, vllm_api_key()
    if url is None:
        job.ctx.set_phase("teacher_server")
        _check_server_wait(job)
        longest = cfg.data.seq_len + max(
            cfg.distill.sequence.max_new_tokens, cfg.distill.on_policy.max_new_tokens
        )
        found = context_limit(teacher.model.config)  # vLLM refuses a longer max_model_len
        if found is not None:
            longest = min(longest, found[0])

        def start() -> tuple[str, str | None]:
            nonlocal server
            server = teacher_server(
                job.teacher_path,
                port=srv.port,
                max_logprobs=top_k,
                max_model_len=srv.max_model_len or longest,
                dtype=srv.dtype,
                eager=srv.eager,
                kv_cache_gib=srv.kv_cache_gib,
                log_dir=job.run_dir / "teacher-server" / f"node-{job.world.node_rank}",
                startup_timeout=srv.start_timeout_s,
                check=job.ctx.check,
            )
            return server.base_url, server.token

        url, api_key = node_endpoint(job.world, start)
        job.record(teacher_server={"url": url, "per_node": job.world.distributed})
        if server is not None:
            log.info("teacher server for node %d: %s", job.world.node_rank, server.log_path)
    client = TeacherClient(
        url,
        api_key=api_key,
        policy=RetryPolicy(
            retries=srv.retries, backoff_s=srv.backoff_s, timeout_s=srv.request_timeout_s
        ),
        check=job.ctx.check,
        wait=job.ctx.wait_stop,
    )
    return VLLMTeacher(client, top_k=top_k, batch_blocks=srv.batch_blocks, server=server)


def node_endpoint(
    world: World, start: Callable[[], tuple[str, str | None]]
) -> tuple[str, str | None]:
    """The (url, api key) of this node's teacher server: each node's local rank 0 calls
    ``start`` (starting the server), then one ``all_gather_object`` hands every rank its
    node's pair. The key travels only inside the process group and is never logged."""
    mine = (world.node_rank, *start()) if world.is_node_main else None
    for entry in world.all_gather_object(mine):
        if entry is not None and entry[0] == world.node_rank:
            return entry[1], entry[2]
    raise TeacherServerError(
        f"no process of node {world.node_rank} started a teacher server (its local rank 0 "
        "should have): the launcher's LOCAL_RANK/GROUP_RANK are inconsistent"
    )


def _check_server_wait(job: Job) -> None:
    """The other ranks wait for their node's server inside a collective, so the server's
    start must fit in the collective timeout."""
    cfg = job.config
    if job.world.distributed and cfg.teacher.server.start_timeout_s >= cfg.distributed.timeout_s:
        raise ConfigError(
            f"distributed.timeout_s={cfg.distributed.timeout_s:g} must exceed "
            f"teacher.server.start_timeout_s={cfg.teacher.server.start_timeout_s:g}: the "
            "other ranks of a node wait for its teacher server inside a collective; raise "
            "distributed.timeout_s (or start the server yourself and set teacher.url)",
            field="distributed.timeout_s",
        )


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
            world=job.world,
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
        codec=cfg.distill.cache_codec,
    )
    folder = default_cache_dir() / "logits" / key.digest()
    job.ctx.set_phase("capture", blocks=len(data.train))
    if not job.world.distributed:
        pass
    elif not all(job.world.all_gather_object(_sees_main_folder(job.world, folder.parent))):
        raise ConfigError(
            "teacher.placement='cache': the ranks do not share the logit cache folder "
            f"{folder.parent}; put FOUNDRY_CACHE_DIR on a filesystem every node sees",
            field="teacher.placement",
        )
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
        world=job.world,
        stall_s=job.config.distributed.timeout_s,
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
        world, cache_dir = job.world, default_cache_dir()
        shared = _sees_main_folder(world, cache_dir)
        path = ensure_builtin_teacher(
            cfg.build,
            cache_dir=cache_dir,
            ctx=job.ctx,
            device=job.device,
            amp_dtype=autocast_dtype(job.config.optim.precision, job.device, hidden),
            on_metrics=job.log_metrics,
            may_build=world.is_main or (world.is_node_main and not shared),
            like=job.config.data,
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
    _same_on_every_rank(
        job,
        "teacher",
        job.teacher_id,
        "loaded another teacher than rank 0 (per-node builds or downloads that differ); "
        "put FOUNDRY_CACHE_DIR on a shared filesystem, or give every node the same files",
    )
    job.teacher_record = read_teacher_record(Path(source).expanduser())
    job.record(teacher_source=cfg.source)
    if job.placement == "shard":
        teacher = dataclasses.replace(teacher, model=_shard_teacher(job, teacher.model))
    return teacher


def _check_teacher(job: Job, teacher: LoadedModel) -> None:
    """Is the teacher worth distilling? Judged before any student step, for a teacher
    Foundry built (its build record holds its held-out perplexity): against chance (its
    vocabulary size) and, for a fresh student in one process, against a model of the
    student's size trained by the same recipe on the same text (``ensure_reference``,
    cached beside the teacher). A teacher that is not clearly better is a warning, not a
    refusal: the run goes on, and its verdict explains the outcome."""
    record, cfg = job.teacher_record, job.config
    if record is None or not cfg.eval.teacher_check:
        return
    try:
        build = TeacherBuild.model_validate(record.get("build", {}))
    except ValidationError:  # a record from another Foundry version: nothing to compare
        return
    val = record.get("val") or {}
    chance = float(record.get("vocab_size") or len(teacher.tokenizer))
    ref_ppl: float | None = None
    ref_params: int | None = None
    s, tconf = cfg.student, teacher.model.config
    if s.init == "fresh" and cfg.loss.cross_tokenizer == "off" and not job.world.distributed:
        shape = ReferenceShape(
            hidden_size=s.hidden_size or tconf.hidden_size,
            num_layers=s.num_layers or tconf.num_hidden_layers,
            num_heads=s.num_heads or tconf.num_attention_heads,
            intermediate_size=s.intermediate_size,
        )
        job.ctx.set_phase("teacher_check")
        reference = ensure_reference(
            build,
            Path(job.teacher_path).expanduser(),
            shape,
            ctx=job.ctx,
            device=job.device,
            amp_dtype=autocast_dtype(cfg.optim.precision, job.device, shape.hidden_size),
            on_metrics=job.log_metrics,
            like=cfg.data,
        )
        ref_ppl, ref_params = (reference.get("val") or {}).get("val/ppl"), reference.get("params")
    check = TeacherCheck.judge(val.get("val/ppl"), ref_ppl, chance, reference_params=ref_params)
    job.record(teacher_check=check.to_dict())
    if check.worth_distilling is False:
        job.ctx.emit("alert", level="warning", message=f"teacher check: {check.message}")


def _shard_teacher(job: Job, model: PreTrainedModel) -> PreTrainedModel:
    """The frozen teacher sharded with FSDP2 across the ranks (``placement=shard``); one
    process keeps it whole (sharding over one rank is the identity)."""
    job.ctx.set_stage("shard", world_size=job.world.world_size)
    sharded = job.world.distributed
    if sharded:
        _parallel.shard_teacher(model, job.world, job.config)  # in place (fully_shard)
    job.record(teacher_sharded=sharded)
    return model


def _preflight(job: Job, teacher: LoadedModel, student: LoadedModel, vocab: int) -> None:
    """Refuse a run that cannot fit before the first step allocates the big transients
    (activations, logits, optimizer state), and record the estimate with the run."""
    tconf, sconf = teacher.model.config, student.model.config
    _check_context(job, {"teacher": tconf, "student": sconf})
    served = job.config.teacher.backend == "vllm"  # its weights live in the server
    # The student's strategy as the Trainer will choose it (the same function): under the
    # fused one its logits never exist. Whether the teacher is projected too depends on
    # the mode's live teacher, unknown yet: its logits are counted (an upper bound).
    choice = choose_strategy(job.config.loss.strategy, student.model, None)
    fused_student = isinstance(choice.strategy, FusedLinearLoss)
    counts = _lora.param_counts(student.model)  # a LoRA student: the adapters train, not the base
    estimate = estimate_memory_for(
        job.config,
        job.world.world_size,
        teacher_params=0 if served else teacher.params,
        student_params=student.params,
        student_trainable=counts.trainable,
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
    # what trains + its two AdamW moments (a checkpoint holds no frozen base: see Trainer)
    checkpoint_bytes = counts.trainable * 4 * 3 + 4096
    report = preflight(
        job.config, estimate, runs_dir=job.store.root, checkpoint_bytes=checkpoint_bytes
    )
    for warning in report.warnings:
        job.ctx.emit("alert", level="warning", message=f"preflight: {warning}")
    # for live views: the memory chart draws the estimate as a line beside the measures
    job.ctx.emit("preflight", estimate_mb=estimate.total / 2**20, device=job.device.type)
    job.record(
        preflight={
            "estimate_bytes": estimate.total,
            "free_bytes": report.free_bytes,
            "disk_needed_bytes": report.disk_needed_bytes,
            "disk_free_bytes": report.disk_free_bytes,
            "parts": dict(estimate.parts()),
        }
    )


def _check_context(job: Job, configs: dict[str, Any]) -> None:
    """Refuse a ``data.seq_len`` longer than either model's context (learned positions
    such as GPT-2's ``n_positions`` would index out of their table inside torch), naming
    the model and its config field. (Generated tokens in sequence and on-policy modes stay
    inside blocks of ``data.seq_len``.)"""
    seq_len = job.config.data.seq_len
    for who, config in configs.items():
        found = context_limit(config)
        if found is not None and seq_len > found[0]:
            limit, where = found
            raise ConfigError(
                f"data.seq_len={seq_len} is longer than the {who}'s context ({where}={limit} "
                f"positions); set data.seq_len to at most {limit}",
                field="data.seq_len",
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
    strategy: LossStrategy | None = None,
) -> LoadedModel:
    """Distil (with a teacher) or train CE-only (without) on the same batches and budget.
    ``strategy`` overrides ``loss.strategy`` (the cross-tokenizer loss).

    Returns the trained model as the job's later phases must call it: the model itself for
    one process, else a view through the Trainer's DDP/FSDP2 wrapper (an FSDP2 student's
    forward only works through its root; evaluation needs every rank in lockstep)."""
    job.ctx.set_phase(phase, max_steps=job.config.limits.max_steps)
    plan = TrainPlan.from_config(
        job.config,
        distill=teacher is not None,
        amp_dtype=job.rt.student_amp,
        teacher_amp_dtype=job.rt.teacher_amp,
    )
    if strategy is not None and teacher is not None:
        plan = dataclasses.replace(plan, loss_strategy=strategy)
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
        world=job.world,
        on_eval=_sample_history(job, phase, student, resume=resume),
    )
    job.record(**{f"{phase}_loss_strategy": trainer.loss_strategy.as_dict()})
    trainer.fit(resume=resume)
    job.record(**{f"{phase}_steps": trainer.step, f"{phase}_skipped": trainer.skipped})
    view: Any = _parallel.through(trainer.wrapped)  # model-shaped: called like the HF model
    return dataclasses.replace(student, model=view)


def _sample_history(
    job: Job, phase: str, student: LoadedModel, *, resume: bool
) -> SampleHistory | None:
    """The student's samples at each validation (``eval.checkpoint_samples``), recorded in
    the summary as ``{phase}_sample_history``; none under data parallelism. A resumed run
    continues the history it had."""
    settings = SampleSettings.from_config(job.config)
    if job.world.distributed or not settings.checkpoint_prompts or not settings.prompts:
        return None
    key = sample_history_key(phase)
    earlier = job.store.get_run(job.run_id).summary.get(key) if resume else None
    return SampleHistory(
        phase,
        student.tokenizer,
        settings,
        ctx=job.ctx,
        record=lambda rows: job.record(**{key: rows}),
        earlier=earlier if isinstance(earlier, list) else (),
    )


def _record_cache_reads(job: Job, teacher: CachedTeacher) -> None:
    """Every rank's cache reads (the blocks it asked for, the shards it read), in the
    summary's ``logit_cache.reads`` and in each rank's log."""
    mine = teacher.reads()
    log.info(
        "%s read logit-cache shards %s for %d blocks",
        job.world.label or "rank 0/1",
        mine["shards_read"],
        len(mine["blocks"]),
    )
    reads = [{"rank": r, **x} for r, x in enumerate(job.world.all_gather_object(mine))]
    job.record(logit_cache={**job.summary.get("logit_cache", {}), "reads": reads})


def _full_student(job: Job, model: PreTrainedModel) -> PreTrainedModel | None:
    """The trained student as one ordinary module on rank 0, None on the others.

    One process: the model itself. Several: rank 0 builds a plain copy from the full state
    dict (``_parallel.full_state_dict``, a collective every rank joins) so that samples,
    generation speed and the export never run a sharded forward on one rank alone.
    """
    if not job.world.distributed:
        return model
    state = _parallel.full_state_dict(model, job.world)
    if not job.world.is_main:
        return None
    from transformers import AutoModelForCausalLM

    inner = _parallel.unwrap(model)
    assert state is not None
    lora = job.config.student.lora
    if lora is not None:  # the adapters' keys: rebuild the same LoRA student around them
        copy = _lora.lora_copy(inner.config, lora, state, seed=job.config.seed)
        return copy.to(job.device).eval()  # type: ignore[return-value]
    plain = AutoModelForCausalLM.from_config(inner.config)
    plain.load_state_dict(state)
    return plain.to(job.device).eval()


def _evaluate_all(
    job: Job,
    live: Teacher,
    teacher: LoadedModel,
    student: LoadedModel,
    baseline: LoadedModel | None,
    data: DataBundle,
    vocab: int,
    cross: CrossSetup | None = None,
) -> tuple[dict[str, Any], PreTrainedModel | None]:
    """Held-out numbers of the three models, samples and speeds; with the student as one
    ordinary module on rank 0 (None elsewhere) for the export.

    Every model's ``val_bpb`` (bits per byte of the held-out text) is recorded: with
    ``cross`` (different tokenizers) the teacher is measured on its own tokenization of the
    held-out blocks, agreement and KL are not defined (other vocabularies), and
    ``gap_closed`` is computed on bits per byte, not on per-token losses of different
    tokenizers.

    Under a World: the students' held-out metrics are sharded and reduced (every rank);
    samples and generation speed are measured on rank 0 only, on the gathered student; the
    teacher is measured on rank 0, or on every rank in lockstep when it is sharded.
    """
    cfg, world = job.config, job.world
    teacher_here = world.is_main or (job.placement == "shard" and world.distributed)

    def evaluate(
        model: LoadedModel, amp: torch.dtype | None, with_teacher: bool
    ) -> dict[str, float]:
        return evaluate_lm(
            model.model,
            data.val,
            batch_size=cfg.optim.batch_size,
            max_batches=cfg.eval.max_batches,
            ctx=job.ctx,
            teacher=live if with_teacher and cross is None else None,
            vocab_size=vocab,
            amp_dtype=amp,
            teacher_amp_dtype=job.rt.teacher_amp,
            world=world,
            chunk_tokens=cfg.loss.chunk_tokens,
        )

    job.ctx.set_stage("teacher")
    teacher_blocks = data.val if cross is None else cross.teacher_val_blocks()

    def bpb(ev: dict[str, float], blocks: Any, model: LoadedModel) -> float | None:
        total = EvalShard.plan(len(blocks), cfg.optim.batch_size, cfg.eval.max_batches, ONE_PROCESS)
        n_bytes = scored_bytes(blocks, byte_table(model), total.total)
        return bits_per_byte(ev["loss"], ev["tokens"], n_bytes)

    settings = SampleSettings.from_config(cfg)
    t_eval: dict[str, float] = {"ppl": math.nan, "loss": math.nan, "tokens": 0}
    teacher_samples = Continuations([], [])
    teacher_speed: float | None = None
    if teacher_here:
        t_eval = evaluate_teacher(
            live,
            teacher_blocks,
            batch_size=cfg.optim.batch_size,
            max_batches=cfg.eval.max_batches,
            ctx=job.ctx,
            # a sharded teacher answers only in lockstep; any other is measured by rank 0
            world=world if job.placement == "shard" else ONE_PROCESS,
            chunk_tokens=cfg.loss.chunk_tokens,
        )
        teacher_samples, teacher_speed = _teacher_samples(job, live, teacher, settings)
    out: dict[str, Any] = {
        "teacher": ModelResult(
            params=teacher.params,
            val_ppl=t_eval["ppl"],
            val_loss=t_eval["loss"],
            tokens_per_s=teacher_speed,
            backend=live.kind,
            val_bpb=bpb(t_eval, teacher_blocks, teacher) if teacher_here else None,
        ).to_dict(),
        "val_tokens": int(t_eval["tokens"]),
    }
    samples = {"teacher": teacher_samples}
    plain_student: PreTrainedModel | None = None
    for name, model in (("student", student), ("baseline", baseline)):
        if model is None:
            continue
        job.ctx.set_stage(name)
        ev = evaluate(model, job.rt.student_amp, with_teacher=True)
        plain = _full_student(job, model.model)
        speed, samples[name] = None, Continuations([], [])
        if plain is not None:
            speed = generation_speed(plain, model.tokenizer, ctx=job.ctx)
            samples[name] = continue_prompts(plain, model.tokenizer, settings, ctx=job.ctx)
        counts = _lora.param_counts(plain if plain is not None else model.model)
        out[name] = ModelResult(
            params=counts.total,
            trainable_params=counts.trainable if counts.frozen else None,
            val_ppl=ev["ppl"],
            val_loss=ev["loss"],
            agreement=ev.get("agreement"),
            val_kl=ev.get("kl"),
            tokens_per_s=speed,
            val_bpb=bpb(ev, data.val, model),
        ).to_dict()
        if name == "student":
            plain_student = plain
    out["agreement"] = out["student"].get("agreement")
    out["val_kl"] = out["student"].get("val_kl")
    if "baseline" in out:
        out["gap_closed"] = _gap_closed(out, "val_loss" if cross is None else "val_bpb")
    out["samples"] = _sample_rows(settings.prompts, samples) if world.is_main else []
    out["sample_settings"] = settings.describe()
    return out, plain_student


def _sample_rows(
    prompts: Sequence[str], samples: Mapping[str, Continuations]
) -> list[dict[str, str]]:
    """One row per prompt: each role's greedy text under its name (the shape older runs
    have), its seeded sampled continuation under ``{role}_sampled``."""
    rows: list[dict[str, str]] = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for role, got in samples.items():
            row[role] = got.greedy[i] if i < len(got.greedy) else ""
            row[f"{role}_sampled"] = got.sampled[i] if i < len(got.sampled) else ""
        rows.append(row)
    return rows


def _teacher_samples(
    job: Job, live: Teacher, teacher: LoadedModel, settings: SampleSettings
) -> tuple[Continuations, float]:
    """Greedy and sampled continuations and generation tokens/s of the teacher, wherever
    it runs (a teacher behind a server samples at the temperature alone: no top-p)."""
    if isinstance(live, HFTeacher):
        speed = generation_speed(teacher.model, teacher.tokenizer, ctx=job.ctx)
        return continue_prompts(teacher.model, teacher.tokenizer, settings, ctx=job.ctx), speed
    tok = teacher.tokenizer
    n = settings.max_new_tokens
    ids = [tok(p).input_ids for p in settings.prompts]
    greedy = live.generate(ids, max_new_tokens=n, temperature=0.0, seed=0)
    sampled = [
        live.generate(
            [row], max_new_tokens=n, temperature=settings.temperature, seed=settings.prompt_seed(i)
        )[0]
        for i, row in enumerate(ids)
    ]
    t0 = time.perf_counter()
    timed = live.generate([tok("The").input_ids], max_new_tokens=64, temperature=0.0, seed=0)
    speed = len(timed[0]) / max(time.perf_counter() - t0, 1e-9)

    def text(rows: list[list[int]]) -> list[str]:
        return [str(tok.decode(o, skip_special_tokens=True)) for o in rows]

    return Continuations(text(greedy), text(sampled)), speed


def _teacher_id(source: str, revision: str | None) -> str:
    """Fingerprint of a local teacher's files, or the hub id at its revision."""
    path = Path(source).expanduser()
    if path.is_dir():
        return fingerprint_model_dir(path)
    return f"{source}@{revision or 'main'}"


def _gap_closed(out: dict[str, Any], key: str = "val_loss") -> float | None:
    """Fraction of the CE-student → teacher gap in held-out ``key`` closed by distillation:
    the per-token loss (nats) when all share one tokenizer, bits per byte across tokenizers."""
    values = [out[name].get(key) for name in ("baseline", "teacher", "student")]
    if any(v is None for v in values):
        return None
    base, teach, stud = values
    gap = base - teach
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return (base - stud) / gap


def _export(
    job: Job, student: PreTrainedModel | None, tokenizer: Any, results: dict[str, Any]
) -> Path:
    """Save the student with its tokenizer and a short model card of its metrics.

    One ordinary ``save_pretrained`` folder whatever the strategy: rank 0 writes it from
    the gathered student (``_full_student``) while the other ranks wait at a barrier.

    Written into a temporary folder beside ``student/`` with a stop point after each file
    (weights, tokenizer, card, metrics) and renamed into place only when complete: a
    cancel, a time limit or a crash during the export never leaves a ``student/`` folder
    that looks complete but is not (the temporary one is removed on the way out; one left
    by a killed process is removed by the next export of the run).
    """
    export = job.run_dir / "student"
    if not job.world.is_main:
        job.world.barrier()
        return export
    assert student is not None  # rank 0 always holds the gathered student
    job.record(provenance=provenance())  # versions and git revision, for any later card
    try:
        _write_export(job, student, tokenizer, results, export)
    finally:
        job.world.barrier()  # released also when rank 0 fails, so the others end at once
    return export


def _write_export(
    job: Job, student: PreTrainedModel, tokenizer: Any, results: dict[str, Any], export: Path
) -> None:
    ctx = job.ctx
    tmp = job.run_dir / f".student.{os.getpid()}.tmp"
    for stale in job.run_dir.glob(".student.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        ctx.set_stage("weights")
        if _lora.is_lora(student):
            _write_lora_weights(job, student, tokenizer, tmp, export)
        else:
            student.save_pretrained(tmp)
        ctx.set_stage("tokenizer")
        tokenizer.save_pretrained(tmp)
        ctx.set_stage("card")
        card = model_card(
            job.config,
            {**job.summary, **results},
            model_name=job.config.name or job.run_id,
            weights_bytes=weights_size(tmp),
        )
        atomic_write_text(tmp / "README.md", card)
        atomic_write_text(tmp / "foundry-metrics.json", json.dumps(results, indent=1, default=str))
        ctx.check()
        replace_folder(tmp, export)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_lora_weights(
    job: Job, student: PreTrainedModel, tokenizer: Any, tmp: Path, export: Path
) -> None:
    """A LoRA student's weights by ``student.lora.export``: ``merged`` an ordinary model
    folder; ``adapter`` the peft adapter folder over its base. A pretrained base is named by
    ``student.source``; a base cut from the teacher (``from_teacher``) exists nowhere a user
    could load it, so it is written beside the adapter, in ``base/`` (its weights and
    tokenizer), and the adapter names that folder as where it will be after the export."""
    cfg = job.config.student
    assert cfg.lora is not None
    if cfg.lora.export == "merged":
        _lora.save_merged(student, tmp)
        return
    if cfg.init == "pretrained":
        assert cfg.source is not None
        _lora.save_adapter(student, tmp, base=cfg.source)
        return
    _lora.save_adapter(student, tmp, base=str((export / "base").resolve()))
    job.ctx.check()
    _lora.save_base(student, tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
