"""The run configuration: one typed, validated schema for everything a run does.

A config is the contract between the notebook panel, papermill parameters, the
CLI and the engine, so it is strict: unknown keys, wrong types and values out
of bounds are refused up front with a message naming the field, the value and
what is allowed - never a traceback from inside torch minutes later.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from foundry_kernel.errors import ConfigError
from foundry_kernel.paths import allowed_roots, resolve_within
from foundry_kernel.plaindata import (
    brief,
    check_value_length,
    load_plain_yaml,
    parse_plain_json,
    read_text_capped,
)

SCHEMA_VERSION = 1
BUILTIN_TEACHER = "builtin:tiny-teacher"
BUILTIN_DATA = ("builtin:python-docs", "builtin:python-stdlib")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherBuild(_Section):
    """Recipe for a teacher that Foundry trains itself (the embedded default).

    The recipe and the corpus key the cache, so changing any field here builds
    (and caches) a different teacher instead of silently reusing a stale one.
    """

    data: str = Field(
        "builtin:python-docs",
        description="Corpus the teacher is trained on (any data.source value).",
    )
    vocab_size: int = Field(1024, ge=256, le=65536, description="BPE vocabulary size.")
    hidden_size: int = Field(128, ge=16, le=4096, description="Teacher width.")
    num_layers: int = Field(4, ge=1, le=48, description="Teacher depth.")
    num_heads: int = Field(
        2,
        ge=1,
        le=64,
        description="Attention heads (head width 64: vLLM's CPU kernels need >= 32).",
    )
    seq_len: int = Field(128, ge=16, le=4096, description="Training block length in tokens.")
    batch_size: int = Field(32, ge=1, le=1024, description="Blocks per step.")
    steps: int = Field(
        700,
        ge=1,
        le=1_000_000,
        description="Most optimizer steps; early stopping (patience) may end the build "
        "sooner, and so may an epoch cap (max_epochs).",
    )
    max_epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Most passes over the corpus's training side (None = no cap: early "
        "stopping on held-out loss ends the build). Measured: a cap of 4 passes left the "
        "teacher undertrained on every corpus of the quality sweep; held-out loss was still "
        "falling.",
    )
    patience: int | None = Field(
        3,
        ge=1,
        le=100,
        description="Stop after this many held-out evaluations (10 per build) without "
        "improvement and keep the best weights (None = train every step, keep the last).",
    )
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    max_documents: int | None = Field(
        None, ge=1, description="Use only the first N documents of the corpus (tests)."
    )

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: str) -> str:
        return check_data_source(v)


class TeacherServerConfig(_Section):
    """The vLLM server Foundry starts and owns for backend='vllm' (see vllm_server.py)."""

    port: int | None = Field(None, ge=1, le=65535, description="Port (None = a free one).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Serving dtype: float32 matches transformers to ~1e-6 on CPU, bf16 to ~7e-3.",
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1_048_576, description="Context the server reserves (None = data.seq_len)."
    )
    eager: bool = Field(
        False, description="--enforce-eager: starts faster, runs slower (no graph compile)."
    )
    kv_cache_gib: int = Field(
        1, ge=1, le=1024, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    start_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Give up if the server is not healthy by then."
    )
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-request timeout.")
    retries: int = Field(
        3, ge=0, le=20, description="Retries on connection errors and HTTP 5xx (never on 4xx)."
    )
    backoff_s: float = Field(0.5, gt=0, le=60, description="First retry delay; doubles each time.")
    batch_blocks: int = Field(
        8, ge=1, le=4096, description="Blocks per request for prompt log-probabilities."
    )


class TeacherConfig(_Section):
    """Where the teacher comes from and how it is run."""

    source: str = Field(
        BUILTIN_TEACHER,
        description="'builtin:tiny-teacher', a Hugging Face hub id, or a local model folder.",
        min_length=1,
        max_length=1024,
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="'hf': in-process with transformers; 'vllm': a vLLM server (started and "
        "owned by Foundry, or the one at teacher.url) serving the teacher's top-k "
        "log-probabilities (needs loss.top_k).",
    )
    url: str | None = Field(
        None,
        max_length=512,
        description="Base URL of a running vLLM server (http://host:port) when backend='vllm'; "
        "None = Foundry starts its own on 127.0.0.1. Its API key comes from $FOUNDRY_VLLM_API_KEY.",
    )
    server: TeacherServerConfig = Field(
        default_factory=TeacherServerConfig,
        description="The vLLM server Foundry starts (backend='vllm', no url).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weights dtype; 'auto' = bf16 on a GPU that supports it."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    placement: Literal["auto", "replicate", "shard", "server", "cache"] = Field(
        "auto",
        description="Where the teacher lives when training runs on several processes: "
        "'replicate' a full teacher per rank (small teachers); 'shard' the frozen teacher "
        "sharded with FSDP2 across ranks (inference only: no gradients, no optimizer state; "
        "backend='hf'); 'server' the vLLM backend, one managed server per node or the shared "
        "teacher.url (backend='vllm'); 'cache' the offline logit cache, each rank reading its "
        "own batches (distill.mode='offline'). 'auto' = server for backend='vllm', cache for "
        "mode='offline', replicate otherwise.",
    )
    build: TeacherBuild = Field(
        default_factory=TeacherBuild,
        description="Recipe used when source is 'builtin:tiny-teacher'.",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        return _check_model_source(v, "teacher.source", builtin=(BUILTIN_TEACHER,))

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?", v):
            raise ValueError(
                "must look like http://host:port (no path, user or query), e.g. "
                "http://127.0.0.1:8000"
            )
        return v.rstrip("/")


class LoraConfig(_Section):
    """A LoRA student through ``peft``: the base stays frozen, only the adapters train."""

    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, le=65536, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="Modules that get adapters: 'auto' = peft's default for the architecture "
        "(the attention projections), 'all-linear' = every linear layer but the lm_head, or a "
        "list of module-name suffixes such as ['q_proj', 'v_proj'].",
    )
    export: Literal["adapter", "merged"] = Field(
        "merged",
        description="What the export writes: 'merged' = an ordinary model with the adapters "
        "folded in; 'adapter' = the peft adapter folder only (loads on top of the base).",
    )

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("name at least one module, e.g. ['q_proj', 'v_proj']")
            bad = [m for m in v if not m or not all(c.isalnum() or c in "._" for c in m)]
            if bad:
                raise ValueError(f"module names are letters, digits, '.' and '_'; got {bad}")
        return v


class StudentConfig(_Section):
    """How the student is made: fresh, pretrained, or cut from the teacher."""

    init: Literal["fresh", "pretrained", "from_teacher"] = Field(
        "fresh",
        description="'fresh': random init of a teacher-like architecture; 'pretrained': load "
        "student.source; 'from_teacher': keep student.layers of the teacher's layers.",
    )
    source: str | None = Field(
        None, description="Hub id or local folder when init='pretrained'.", max_length=1024
    )
    hidden_size: int | None = Field(
        64, ge=16, le=8192, description="Width for init='fresh' (None = teacher's)."
    )
    num_layers: int | None = Field(
        3, ge=1, le=128, description="Depth for init='fresh' (None = teacher's)."
    )
    num_heads: int | None = Field(
        2, ge=1, le=128, description="Attention heads for init='fresh' (None = teacher's)."
    )
    intermediate_size: int | None = Field(
        None, ge=16, le=65536, description="MLP width for init='fresh' (None = 8/3 x hidden)."
    )
    layers: list[int] | None = Field(
        None,
        description="Teacher layer indices kept when init='from_teacher' (None = every other).",
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters on a frozen student (init='pretrained' or "
        "'from_teacher') instead of every weight; None = full fine-tuning.",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_source(v, "student.source", builtin=())

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one teacher layer, e.g. [0, 2]")
        if any(i < 0 for i in v) or len(set(v)) != len(v) or sorted(v) != v:
            raise ValueError(f"must be distinct, non-negative and increasing, got {v}")
        return v


class DataConfig(_Section):
    """Training text: where it comes from, how it is cut into blocks and split."""

    source: str = Field(
        "builtin:python-docs",
        description="'builtin:python-docs', 'builtin:python-stdlib', a text file or glob, a "
        ".jsonl file, or a local Hugging Face datasets folder.",
        min_length=1,
        max_length=4096,
    )
    format: Literal["auto", "text", "jsonl", "hf_dataset"] = Field(
        "auto", description="How to read data.source; 'auto' decides from the path."
    )
    text_field: str = Field("text", description="JSONL/dataset field holding plain text.")
    prompt_field: str | None = Field(
        None, description="JSONL/dataset field holding a prompt (loss is not taken on it)."
    )
    completion_field: str | None = Field(
        None, description="JSONL/dataset field holding the completion the loss covers."
    )
    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per training block.")
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Fraction of documents held out for validation."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use only the first N documents (quick experiments)."
    )
    document_chars: int | None = Field(
        8000,
        ge=500,
        le=100_000_000,
        description="A text file longer than this is cut into documents of at most this many "
        "characters at paragraph breaks, so one large file can still be split into training "
        "and held-out parts (None = one document per file).",
    )
    split_seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the train/validation split. Kept apart from the run seed so "
        "that runs with different seeds (and the built-in teacher) share one held-out set.",
    )
    overlap_chars: int = Field(
        60,
        ge=16,
        le=10_000,
        description="Length of shared passages that tie a held-out document to training.",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        return check_data_source(v)


class HiddenLossConfig(_Section):
    """A loss between chosen teacher and student hidden states, added to the logit loss."""

    kind: Literal["cosine", "mse"] = Field(
        "cosine",
        description="'cosine': 1 - cosine similarity per token (DistilBERT); 'mse': mean "
        "squared error per token and dimension (Minitron).",
    )
    weight: float = Field(
        1.0, ge=0, le=1000, description="total = logit loss + weight * hidden-state loss."
    )
    layers: list[list[int]] | None = Field(
        None,
        description="[teacher_layer, student_layer] pairs of hidden-state indices (0 = the "
        "embeddings, i = the output of decoder layer i, before any final norm); None = one "
        "pair per student layer i (1..L_s): for student.init=from_teacher the teacher layer "
        "it was cut from, else teacher index round(i * L_t / L_s).",
    )

    @field_validator("layers")
    @classmethod
    def _check_pairs(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("name at least one [teacher_layer, student_layer] pair")
        bad = [pair for pair in v if len(pair) != 2 or min(pair) < 0]
        if bad:
            raise ValueError(f"each pair is [teacher_layer, student_layer] >= 0; got {bad}")
        return v


class LossConfig(_Section):
    """The distillation objective (see foundry_kernel.training._losses for the exact formulas)."""

    kind: Literal[
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"
    ] = Field("forward_kl", description="Divergence between teacher (p) and student (q).")
    beta: float = Field(
        0.5, ge=0, le=1, description="Generalized JSD weight: 0 = forward KL, 1 = reverse KL."
    )
    jsd_normalized: bool = Field(
        False,
        description="Divide the JSD interior by beta*(1-beta) so the loss moves continuously "
        "from forward to reverse KL (TRL's plain form jumps at the endpoints).",
    )
    skew_alpha: float = Field(0.1, gt=0, lt=1, description="Skew KL mixing weight (DistiLLM).")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature tau.")
    scale_by_t2: bool = Field(
        False, description="Multiply the KD term by tau^2 (Hinton; DistillKit/ModelOpt do)."
    )
    ce_weight: float = Field(
        0.2,
        ge=0,
        le=1,
        description="total = (1 - ce_weight) * KD + ce_weight * hard-label CE (0.2: chosen by "
        "the quality sweep, docs/quality-sweep.md; 0.5 and 0 closed less of the gap).",
    )
    chunk_tokens: int = Field(
        256,
        ge=1,
        le=1_048_576,
        description="Most tokens per chunk of full-vocabulary math (also capped so one fp32 "
        "vocabulary-wide temporary stays near 32 MiB: 65 tokens at a 128k vocabulary). 256 "
        "keeps a chunk's temporaries in cache at small vocabularies: 0.76x the loss time of "
        "1024 at 4k vocabulary, the same at 32k.",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="None: the teacher's full distribution (in-process teacher). k: only its "
        "top-k log-probabilities (vLLM teacher, offline logit cache; 32-128 is typical).",
    )
    top_k_mass: Literal["tail", "renormalize"] = Field(
        "tail",
        description="With top_k: keep the missing mass as a (k+1)-th 'tail' bucket, or "
        "renormalise both distributions over the teacher's top-k.",
    )
    cross_tokenizer: Literal["off", "uld", "aligned", "hybrid"] = Field(
        "off",
        description="Teacher and student with different tokenizers: 'aligned' = match spans "
        "of equal bytes in both tokenizations and compare the next-token distributions "
        "there over the tokens both vocabularies share; 'uld' = Universal Logit "
        "Distillation (distance between sorted probability vectors) at every aligned "
        "position; 'hybrid' = aligned where the vocabularies share tokens, ULD for the rest; "
        "'off' = the tokenizers must be the same.",
    )
    hidden: HiddenLossConfig | None = Field(
        None,
        description="Also match hidden states between teacher and student layers (a learned "
        "projection where the widths differ); None = logits only.",
    )
    strategy: Literal["auto", "fused", "logits"] = Field(
        "auto",
        description="How a training step computes its loss (every phase): 'fused' projects "
        "the final hidden states through the lm_head chunk by chunk, so the [batch, seq, "
        "vocab] logits never exist; 'logits' scores the model's logits; 'auto' is fused "
        "where the model allows it (plain lm_head, no logit soft-capping or scaling) and "
        "logits otherwise, recording why in the summary.",
    )
    logits_grad: Literal["inplace", "copy"] = Field(
        "inplace",
        description="Logits strategy only: 'inplace' writes the loss's gradient over the "
        "student's logits (no second [batch, seq, vocab] buffer: at 128k vocab x 4k tokens "
        "~0.05x of plain PyTorch's loss peak instead of ~0.25x); the loss still copies "
        "where the logits' storage may be needed elsewhere (a slice, a leaf, an op that "
        "saved them). 'copy' always keeps the gradient in a buffer of its own; use it when "
        "a custom strategy or hook reads the logits after the loss.",
    )


class _Continuations(_Section):
    """What sequence and on-policy distillation share: a prompt cut from a training block,
    and a sampled continuation of it (one definition of these fields, bounds and meaning)."""

    prompt_tokens: int = Field(32, ge=1, le=65536, description="Prompt length in tokens.")
    max_new_tokens: int = Field(32, ge=1, le=65536, description="Tokens generated per prompt.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature (0 = greedy).")


class SequenceConfig(_Continuations):
    """Sequence-level distillation: the teacher writes completions, the student learns them."""

    num_prompts: int = Field(
        256, ge=1, le=10_000_000, description="Training blocks whose start becomes a prompt."
    )
    max_new_tokens: int = Field(64, ge=1, le=65536, description="Tokens the teacher generates.")
    logit_kd: bool = Field(
        False,
        description="Also match the teacher's distribution on the generated text "
        "(loss.kind), not only its sampled tokens (cross-entropy).",
    )


class OnPolicyConfig(_Continuations):
    """On-policy distillation (GKD): the student's own continuations, scored by the teacher."""

    fraction: float = Field(
        0.5, ge=0, le=1, description="Share lambda of steps trained on student-generated text."
    )
    temperature: float = Field(1.0, gt=0, le=10, description="Student sampling temperature.")


class DistillConfig(_Section):
    """How the teacher's knowledge reaches the student."""

    mode: Literal["online", "offline", "sequence", "on_policy"] = Field(
        "online",
        description="'online': teacher distributions every step; 'offline': capture the "
        "teacher's top-k once into a logit cache, then train without it; 'sequence': train on "
        "teacher-generated completions; 'on_policy': a share of steps on student samples "
        "scored by the teacher (GKD).",
    )
    cache_shard_blocks: int = Field(
        256, ge=1, le=1_000_000, description="Blocks per logit-cache shard (the resume unit)."
    )
    cache_codec: Literal["compressed", "exact"] = Field(
        "compressed",
        description="How the logit cache stores the top-k: 'compressed' (sorted-id gaps and "
        "one-byte companded log-probabilities, deflated: ~137 B/token at k=128) or 'exact' "
        "(uint16/int32 ids, fp16 values, fp32 tail: 4k+4 B/token).",
    )
    sequence: SequenceConfig = Field(default_factory=SequenceConfig, description="mode='sequence'.")
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="mode='on_policy'."
    )


class OptimConfig(_Section):
    """AdamW with warm-up and cosine decay."""

    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW decoupled weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    batch_size: int = Field(32, ge=1, le=65536, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip norm (None = off).")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype; 'auto' = bf16 where it pays off, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")


class EvalConfig(_Section):
    """What is measured during and after training."""

    every_steps: int = Field(100, ge=1, description="Validation every N optimizer steps.")
    max_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches (None = whole split)."
    )
    baseline: bool = Field(
        True,
        description="Also train the same student with cross-entropy alone, same batches and "
        "budget, so the benefit of distillation is measured, not assumed.",
    )
    teacher_check: bool = Field(
        True,
        description="Before distilling from a Foundry-built teacher, train a model of a fresh "
        "student's size with the teacher's recipe (cached per teacher and shape) and warn when "
        "the teacher is not clearly better than it, or is near chance.",
    )
    sample_prompts: list[str] = Field(
        ["The list object", "To open a file", "An exception is"],
        description="Prompts every model continues, shown side by side: greedy and sampled.",
        max_length=32,
    )
    sample_tokens: int = Field(32, ge=1, le=4096, description="Tokens generated per sample.")
    sample_temperature: float = Field(
        0.8,
        gt=0,
        le=10,
        description="Temperature of the sampled continuation shown next to the greedy one "
        "(a small student's greedy text often repeats itself; a sample shows what else it "
        "learned). Seeded from the run's seed: re-running gives the same text.",
    )
    sample_top_p: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Nucleus (top-p) cut of the sampled continuation: only the likeliest "
        "tokens whose probabilities add up to this are drawn from (1 = no cut). A teacher "
        "behind a server (vLLM) samples at the temperature alone.",
    )
    checkpoint_samples: int = Field(
        1,
        ge=0,
        le=32,
        description="Prompts (the first of sample_prompts) the students continue, greedy and "
        "sampled, at every validation during training, so the samples show learning "
        "(0 = none; a few tokens each, one process only).",
    )


class LimitsConfig(_Section):
    """Budgets and guards: how long a run may take and what ends it."""

    max_steps: int = Field(
        600,
        ge=1,
        le=10_000_000,
        description="Optimizer steps to train (600: chosen by the quality sweep, "
        "docs/quality-sweep.md; 300 closed 35% of the gap on the built-in corpus, 600 47%).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Wall-clock limit for the whole run (None = none)."
    )
    step_timeout_s: float | None = Field(
        None, gt=0, description="Watchdog: a single step slower than this fails the run."
    )
    on_nonfinite: Literal["fail", "skip"] = Field(
        "fail", description="NaN/Inf loss or gradient: fail the run, or skip the step."
    )
    max_skips: int = Field(10, ge=0, description="Skipped steps tolerated before failing.")


class CheckpointConfig(_Section):
    """Atomic checkpoints that make a run resumable."""

    every_steps: int | None = Field(
        100, ge=1, description="Checkpoint every N steps (None = only at the end)."
    )
    keep_last: int = Field(2, ge=1, le=100, description="Checkpoints kept on disk.")
    on_stop: bool = Field(
        True, description="Checkpoint the last completed step when a run is cancelled or times out."
    )


class DistributedConfig(_Section):
    """Data parallelism over several processes (launched by torchrun; see README
    "Scaling out"). Ignored by a single process.

    ``optim.batch_size`` stays the *global* number of blocks per micro-batch: each rank
    takes a disjoint contiguous share of the same deterministic batch, and the loss is
    divided by the valid-token count of the whole optimizer step over all ranks, so one
    config trains the same model on 1 or N processes.
    """

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="'ddp': a full student per rank, gradients all-reduced "
        "(DistributedDataParallel); 'fsdp2': parameters, gradients and optimizer state "
        "sharded across ranks (torch.distributed.fsdp.fully_shard, one unit per layer).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process-group backend; 'auto' = nccl on CUDA, gloo on CPU."
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Collective timeout: a rank that waits this long on the others fails the "
        "run (a hung or lost rank).",
    )
    mixed_precision: Literal["auto", "off", "bfloat16"] = Field(
        "auto",
        description="fsdp2's MixedPrecisionPolicy: 'bfloat16' gathers parameters in bf16 and "
        "reduces gradients in fp32; 'off' keeps fp32; 'auto' follows optim.precision.",
    )


EXPORTERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb", "trackio")
"""The experiment trackers ``tracking.report_to`` may name (see foundry_kernel.exporters)."""


class TrackingConfig(_Section):
    """Opt-in exporters: the run's metrics, config and summary also sent to experiment
    trackers, as transformers' ``report_to``. Off by default, and local by default when on:
    nothing is sent over the network unless the environment says so (``WANDB_MODE``,
    ``MLFLOW_TRACKING_URI``) or ``tracking.mlflow_uri`` names a server."""

    report_to: list[str] = Field(
        [],
        max_length=len(EXPORTERS),
        description="Trackers that also receive the run's train/ and eval/ metrics, its "
        "config as hyperparameters and its summary: any of 'tensorboard', 'mlflow', "
        "'wandb', 'trackio' (each an optional dependency: pip install 'foundry[NAME]'); "
        "[] = none.",
    )
    project: str = Field(
        "foundry",
        min_length=1,
        max_length=128,
        description="W&B and Trackio project, MLflow experiment; each run is named by its "
        "Foundry run id.",
    )
    dir: Path | None = Field(
        None,
        description="Folder for TensorBoard event files (tensorboard/<run id>), W&B offline "
        "runs (wandb/) and Trackio's database (None = <runs_dir>/tracking).",
    )
    mlflow_uri: str | None = Field(
        None,
        max_length=2048,
        description="MLflow tracking URI (None = $MLFLOW_TRACKING_URI, else a local "
        "sqlite:///<tracking dir>/mlflow.db); also sqlite:///PATH, file:PATH, http(s)://HOST.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        """``tracking.report_to=tensorboard`` on a command line means a list of one."""
        return [v] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _check_report_to(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in EXPORTERS:
                hint = difflib.get_close_matches(name, EXPORTERS, n=1)
                fix = f"did you mean {hint[0]!r}? " if hint else ""
                raise ValueError(
                    f"unknown tracker {brief(name, 40)}; {fix}choose from {', '.join(EXPORTERS)}"
                )
        repeated = sorted({name for name in v if v.count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once; list each once")
        return v

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, v: Path | None) -> Path | None:
        if v is not None:
            _confine(v, "tracking.dir")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _check_mlflow_uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.split(":", 1)[0] if ":" in v else ""
        if scheme not in ("sqlite", "file", "http", "https"):
            raise ValueError(
                "must be sqlite:///PATH, file:PATH or http(s)://HOST[:PORT], e.g. "
                "sqlite:///runs/mlflow.db"
            )
        if scheme == "sqlite":
            if not v.startswith("sqlite:///") or len(v) == len("sqlite:///"):
                raise ValueError("a SQLite store is sqlite:///PATH, e.g. sqlite:///mlflow.db")
            _confine(Path(v.removeprefix("sqlite:///")), "tracking.mlflow_uri")
        elif scheme == "file":
            _confine(Path(v.removeprefix("file:").removeprefix("//")), "tracking.mlflow_uri")
        return v


def _confine(path: Path, field: str) -> None:
    """A local path in the config lies under ``paths.allowed_roots`` (as ``runs_dir``)."""
    try:
        resolve_within(path, allowed_roots(), field=field)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix(f"{field}: ")) from None


class RunConfig(_Section):
    """Everything one distillation run does. Saved with every run."""

    schema_version: Literal[1] = Field(1, description="Config schema version.")
    name: str | None = Field(
        None, max_length=64, description="Human label; becomes part of the run id."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for data split, init, batches.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for this run's torch ops (per run: concurrent runs may differ; "
        "None = torch's default).",
    )
    runs_dir: Path | None = Field(
        None,
        description="Run store folder (None = $FOUNDRY_RUNS_DIR, else runs/ of the project "
        "found upward (pyproject.toml, .git), else the per-user store).",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation mode.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Limits.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Data parallelism (torchrun)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Opt-in exporters to TensorBoard, MLflow, W&B, Trackio (off by default).",
    )

    @field_validator("runs_dir")
    @classmethod
    def _check_runs_dir(cls, v: Path | None) -> Path | None:
        """Confined like every local path (``paths.allowed_roots``), so a config cannot put
        the store, its checkpoints and exports in /etc. The path is kept as written."""
        if v is not None:
            _confine(v, "runs_dir")
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w .,+=@-]{1,64}", v):
            raise ValueError(
                "may hold letters, digits, spaces and . , + = @ _ - only (it labels files)"
            )
        return v

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, the form saved with every run."""
        return json.loads(self.model_dump_json())


# --------------------------------------------------------------------------- sources


def check_data_source(v: str) -> str:
    """A corpus: a built-in name, or a local path / glob checked when it is read.

    One rule for ``data.source`` and ``teacher.build.data`` (both are read by
    ``sources.load_documents``), so a typo'd built-in fails here, not mid-run.
    """
    if "\x00" in v:
        raise ValueError("contains a NUL byte")
    if v.startswith("builtin:") and v not in BUILTIN_DATA:
        raise ValueError(f"unknown built-in corpus {v!r}; choose one of {list(BUILTIN_DATA)}")
    return v


def _check_model_source(v: str, field: str, *, builtin: Iterable[str]) -> str:
    """Accept a built-in name, an existing local folder, or a well-formed hub id."""
    if "\x00" in v:
        raise ValueError("contains a NUL byte")
    if v.startswith("builtin:"):
        allowed = list(builtin)
        if v not in allowed:
            raise ValueError(f"unknown built-in model {v!r}; built-ins here: {allowed or 'none'}")
        return v
    if looks_like_path(v):
        return v
    if not HUB_ID_RE.fullmatch(v) or ".." in v:
        raise ValueError(f"{v!r} is neither an existing local folder nor a hub id like 'org/model'")
    return v


def looks_like_path(v: str) -> bool:
    """A source names a local path if it exists or is written like one."""
    if v.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", v):
        return True
    return Path(v).expanduser().exists()


# --------------------------------------------------------------------------- loading


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | RunConfig | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> RunConfig:
    """Build a RunConfig from a file, a dict or defaults, then apply overrides.

    Overrides are ``dotted.key=value`` strings (values parsed as YAML scalars,
    so ``loss.temperature=2`` is a float and ``eval.baseline=false`` a bool)
    or a mapping of dotted keys to values.
    """
    if isinstance(source, RunConfig):
        data: dict[str, Any] = source.to_dict()
    elif source is None:
        data = {}
    elif isinstance(source, Mapping):
        data = json.loads(json.dumps(dict(source), default=str))
    else:
        data = _read_config_file(Path(source))
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in pairs:
        _set_dotted(data, key, value)
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain dict, turning pydantic's errors into one readable ConfigError."""
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version: {version} is newer than this Foundry understands "
            f"({SCHEMA_VERSION}); upgrade Foundry or write a version-{SCHEMA_VERSION} config.",
            field="schema_version",
        )
    _refuse_nul_bytes(data, "")
    try:
        config = RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise _to_config_error(exc) from None
    _check_combinations(config)
    return config


def _refuse_nul_bytes(value: Any, where: str, seen: set[int] | None = None) -> None:
    """No config text may hold a NUL byte: every path, model id, field name and prompt
    ends up in a C string (``open``, a tokenizer, SQLite) that would fail on it mid-run.

    Each container is visited once, so a mapping built in Python that shares one list
    many times over (``[x] * 9`` nine levels deep) costs its distinct objects, not 9**9.
    """
    seen = set() if seen is None else seen
    if isinstance(value, Mapping | list | tuple):
        if id(value) in seen:
            return
        seen.add(id(value))
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            if isinstance(value, Mapping):
                _refuse_nul_bytes(key, where, seen)
                child = f"{where}.{key}" if where else str(key)
            else:
                child = f"{where}[{key}]"
            _refuse_nul_bytes(item, child, seen)
    elif isinstance(value, str | PurePath) and "\x00" in str(value):
        shown = where if len(where) <= 120 else where[:117] + "..."
        raise ConfigError(
            f"{shown or 'config'}: {brief(str(value))} contains a NUL byte (\\x00), which no "
            "path, name or model id can hold; remove it",
            field=where or "config",
        )


def _check_combinations(cfg: RunConfig) -> None:
    """Rules that span sections: each error names the field to change and how."""
    sparse_only = cfg.teacher.backend == "vllm" or cfg.distill.mode == "offline"
    if sparse_only and cfg.loss.top_k is None:
        why = (
            "teacher.backend='vllm'" if cfg.teacher.backend == "vllm" else "distill.mode='offline'"
        )
        raise ConfigError(
            f"loss.top_k: {why} works from the teacher's top-k log-probabilities; set "
            "loss.top_k (e.g. 64)",
            field="loss.top_k",
        )
    if cfg.teacher.url is not None and cfg.teacher.backend != "vllm":
        raise ConfigError(
            "teacher.url: only used with teacher.backend='vllm'; set the backend or drop the url",
            field="teacher.url",
        )
    _check_placement(cfg)
    _check_lora(cfg)
    _check_cross_tokenizer(cfg)
    _check_hidden(cfg)
    prompt = {
        "sequence": cfg.distill.sequence.prompt_tokens,
        "on_policy": cfg.distill.on_policy.prompt_tokens,
    }.get(cfg.distill.mode)
    if prompt is not None and prompt >= cfg.data.seq_len:
        raise ConfigError(
            f"distill.{cfg.distill.mode}.prompt_tokens={prompt} must be shorter than "
            f"data.seq_len={cfg.data.seq_len}",
            field=f"distill.{cfg.distill.mode}.prompt_tokens",
        )


def _check_lora(cfg: RunConfig) -> None:
    """LoRA adapts a base worth keeping: a pretrained or teacher-cut student."""
    if cfg.student.lora is not None and cfg.student.init == "fresh":
        raise ConfigError(
            "student.lora: adapters on a randomly initialised, frozen base cannot learn much; "
            "use student.init=pretrained (with student.source) or from_teacher, or drop "
            "student.lora",
            field="student.lora",
        )


def _check_cross_tokenizer(cfg: RunConfig) -> None:
    """Cross-tokenizer losses re-tokenize the text for an in-process teacher."""
    setting = cfg.loss.cross_tokenizer
    if setting == "off":
        return
    field = "loss.cross_tokenizer"
    if cfg.student.init != "pretrained":
        raise ConfigError(
            f"{field}={setting!r}: student.init={cfg.student.init!r} shares the teacher's "
            "tokenizer; set student.init=pretrained with a student.source of another "
            f"tokenizer, or {field}=off",
            field=field,
        )
    if cfg.teacher.backend != "hf" or cfg.distill.mode != "online":
        raise ConfigError(
            f"{field}={setting!r} runs the teacher in the training process on its own "
            "tokenization of each block: set teacher.backend=hf and distill.mode=online",
            field=field,
        )
    if cfg.loss.top_k is not None:
        raise ConfigError(
            f"{field}={setting!r} compares full distributions; drop loss.top_k",
            field="loss.top_k",
        )


def _check_hidden(cfg: RunConfig) -> None:
    """Hidden-state losses need the teacher's activations in the training process."""
    if cfg.loss.hidden is None:
        return
    field = "loss.hidden"
    if cfg.teacher.backend != "hf" or cfg.distill.mode not in ("online", "on_policy"):
        raise ConfigError(
            f"{field}: needs the teacher's hidden states in the training process: set "
            "teacher.backend=hf and distill.mode=online (or on_policy)",
            field=field,
        )
    if cfg.loss.cross_tokenizer != "off":
        raise ConfigError(
            f"{field}: the teacher's and student's positions differ under "
            f"loss.cross_tokenizer={cfg.loss.cross_tokenizer!r}; drop one of the two",
            field=field,
        )


def teacher_placement(cfg: RunConfig) -> str:
    """``teacher.placement`` with ``auto`` resolved (see the field's description)."""
    if cfg.teacher.placement != "auto":
        return cfg.teacher.placement
    if cfg.distill.mode == "offline":
        return "cache"
    return "server" if cfg.teacher.backend == "vllm" else "replicate"


def _check_placement(cfg: RunConfig) -> None:
    """``teacher.placement`` against the backend and the mode."""
    placement, backend, mode = cfg.teacher.placement, cfg.teacher.backend, cfg.distill.mode
    field = "teacher.placement"
    if placement == "auto":
        return
    if mode == "offline" and placement != "cache":
        raise ConfigError(
            f"{field}={placement!r}: distill.mode='offline' trains from the logit cache; set "
            f"{field}=cache (or auto)",
            field=field,
        )
    if placement == "cache" and mode != "offline":
        raise ConfigError(
            f"{field}='cache' reads the offline logit cache: set distill.mode=offline, or "
            "choose replicate, shard or server",
            field=field,
        )
    if placement == "server" and backend != "vllm":
        raise ConfigError(
            f"{field}='server' needs teacher.backend=vllm (a vLLM server per node, or teacher.url)",
            field=field,
        )
    if placement in ("replicate", "shard") and backend == "vllm":
        raise ConfigError(
            f"{field}={placement!r} loads the teacher into the training processes, but "
            "teacher.backend='vllm' serves it: set teacher.backend=hf or "
            f"{field}=server",
            field=field,
        )
    if placement == "shard" and mode == "sequence":
        raise ConfigError(
            f"{field}='shard': distill.mode='sequence' generates with the teacher before "
            "training, one prompt set per rank, which a teacher sharded across ranks cannot "
            "do in lockstep; use replicate or server",
            field=field,
        )


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} must look like section.key=value, e.g. loss.temperature=2",
            field=text,
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override key {brief(key)} is not a dotted field name", field=key[:80])
    return key, parse_plain_value(raw, field=key)


def parse_plain_value(raw: str, *, field: str) -> Any:
    """A command-line value as YAML plain data (see ``plaindata``); text that is not YAML
    at all stays that text, but tags, anchors, aliases and over-long values are refused."""
    check_value_length(raw, field=field)
    if not raw.strip():
        return ""
    try:
        return load_plain_yaml(raw, field=field)
    except yaml.YAMLError:
        return raw


def _read_config_file(path: Path) -> dict[str, Any]:
    """A config file as plain data: at most ``plaindata.MAX_FILE_BYTES``, no YAML tags,
    anchors or aliases, nothing JSON could not hold."""
    if "\x00" in str(path):
        raise ConfigError(f"config file {brief(str(path))} contains a NUL byte", field="config")
    if not path.is_file():
        raise ConfigError(f"config file {brief(str(path), 200)} does not exist", field="config")
    where = f"config file {brief(str(path), 200)}"
    text = read_text_capped(path, field="config")
    try:
        if path.suffix == ".json":
            loaded = parse_plain_json(text, source=where)
        else:
            loaded = load_plain_yaml(text, source=where)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where} is not valid: {exc}", field="config") from None
    except ConfigError as exc:
        raise ConfigError(str(exc), field=exc.field or "config") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections, "
            f"got {type(loaded).__name__}",
            field="config",
        )
    return loaded


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{where} is a value, not a section; cannot set {key}", field=key)
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- errors


def _field_names(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Names allowed at ``path`` (for did-you-mean suggestions)."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
    return list(getattr(current, "model_fields", {}))


MAX_LISTED_ERRORS = 10
"""Problems one ConfigError lists (a file of 5,000 unknown keys is not 5,000 lines)."""


def _to_config_error(exc: ValidationError) -> ConfigError:
    lines: list[str] = []
    first_field: str | None = None
    errors = exc.errors()
    for err in errors[:MAX_LISTED_ERRORS]:
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "config"
        if len(field) > 120:  # an unknown key may be long
            field = field[:117] + "..."
        first_field = first_field or field
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = _field_names(RunConfig, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            fix = f"did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}? " if hint else ""
            lines.append(f"{field}: unknown field; {fix}allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {_short(value)} is not allowed ({msg})")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"... and {len(errors) - MAX_LISTED_ERRORS} more")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines), field=first_field)


def _short(value: Any) -> str:
    return brief(value, 80)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A stored config as dotted keys, ``{"loss.temperature": 2.0, ...}`` (lists kept
    whole): the one view the CLI, the dashboard and the pandas tables compare runs by."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


#: Keys that tell runs apart without being settings: labels and where the store is.
SETTINGS_NOISE = frozenset({"name", "runs_dir", "schema_version"})


def varying_settings(configs: Iterable[Mapping[str, Any]], ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys whose values differ between ``configs`` (W&B's "differences only"):
    what tells the runs of a grid apart. A key missing from one config differs from any
    value; ``ignore`` adds keys a caller shows in columns of their own."""
    flats = [flatten_config(config) for config in configs]
    skip = SETTINGS_NOISE | set(ignore)
    keys = sorted({key for flat in flats for key in flat} - skip)
    missing = object()
    return [key for key in keys if len({repr(flat.get(key, missing)) for flat in flats}) > 1]


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (what ``foundry schema`` prints)."""
    schema = RunConfig.model_json_schema()
    schema["$comment"] = f"Foundry RunConfig schema_version {SCHEMA_VERSION}"
    return schema


__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_TEACHER",
    "EXPORTERS",
    "SCHEMA_VERSION",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LimitsConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherBuild",
    "TeacherConfig",
    "TrackingConfig",
    "flatten_config",
    "json_schema",
    "load_config",
    "parse_override",
    "teacher_placement",
    "validate_config",
    "varying_settings",
]
