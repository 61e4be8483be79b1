"""Offline logit cache: bytes per token on disk, and one training epoch online vs from it.

Setup: a Foundry-built teacher (the built-in recipe, ``TeacherBuild()``, and the default
student, ``StudentConfig()``; with ``--quick`` the tests' tiny recipe and student) and a real
data bundle (the built-in Python docs corpus, first 100 documents, 128-token blocks;
``--quick``: 4 documents, 32-token blocks). The teacher is built and cached on first use, as
``foundry distill`` would; that one-time build is not part of any figure.

1. **Storage.** For each k (32, 64, 128; ``--quick``: 32, 64) the teacher's top-k over every
   training block is captured into a fresh cache folder (``foundry_kernel.teachers._logit_cache.
   capture``, as ``distill.mode=offline`` does). Printed per k: the cache's own
   ``bytes_per_token`` (shard bytes over token positions), the layout's formula (uint16
   ids and fp16 values, ``4k``, plus an fp32 tail mass, ``4``), what the safetensors
   headers add, and the capture time. DistillKit reports about 300 B/token at k=128 for
   its compressed format: a reference figure quoted for scale, not measured here.
2. **One epoch.** The same student (same seed, same weights) trains for one epoch (every
   training block once, the same batches in the same order) with Foundry's ``Trainer``:
   ``online`` runs the teacher forward every step and the full-vocabulary loss;
   ``cached`` reads the largest-k cache and uses the sparse loss (tail bucket), with no
   teacher forward. Loss: forward KL, temperature 1, CE weight 0.5 (the config defaults);
   autocast as the pipeline picks it (``precision=auto``). The two trainers' steps are
   interleaved one by one (``bench.throughput.Turns``), after one untimed warm-up step of
   each, so load from elsewhere lands on both alike.

Derived: speed-up = online epoch / cached epoch; break-even = capture time / (online epoch -
cached epoch), the number of epochs (over all students trained on this cache) after which
capturing once has paid for itself.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.common import (
    MiB,
    Printer,
    fmt_ratio,
    fmt_seconds,
    in_worker_thread,
    median,
    ratio,
    summary,
    table,
)
from bench.throughput import StepClock, Turns
from foundry_kernel._context import RunContext
from foundry_kernel._models import LoadedModel, build_student, load_causal_lm
from foundry_kernel._runtime import autocast_dtype
from foundry_kernel.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LimitsConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TeacherBuild,
)
from foundry_kernel.data._blocks import DataBundle, build_data
from foundry_kernel.paths import default_cache_dir
from foundry_kernel.teachers._builtin import ensure_builtin_teacher
from foundry_kernel.teachers._interface import CachedTeacher, HFTeacher, Teacher
from foundry_kernel.teachers._logit_cache import (
    CacheKey,
    LogitCache,
    capture,
    fingerprint_model_dir,
    fingerprint_tokenizer,
    fingerprint_tokens,
)
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._trainer import MetricsSink, Trainer, TrainPlan

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PATHS = ("online", "cached")
DISTILLKIT_K = 128
DISTILLKIT_BYTES_PER_TOKEN = 300.0  # DistillKit's reported figure at k=128 (not measured here)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class CacheBenchConfig:
    """Teacher recipe, data, student and the k values to capture."""

    quick: bool
    ks: tuple[int, ...]
    max_documents: int
    seq_len: int
    batch: int
    student: dict[str, int] | None  # StudentConfig fields; None = its defaults
    lr: float = 3e-3
    seed: int = 0

    def teacher_build(self) -> TeacherBuild:
        """The built-in recipe; with --quick the tests' tiny one (so their cached teacher
        is reused when the benchmark runs under the test suite's cache)."""
        if not self.quick:
            return TeacherBuild()
        return TeacherBuild(
            vocab_size=512,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            seq_len=32,
            batch_size=8,
            steps=20,
            lr=1e-2,
            max_documents=40,
        )

    def student_config(self) -> StudentConfig:
        return StudentConfig(**(self.student or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "ks": list(self.ks),
            "teacher_build": self.teacher_build().model_dump(),
            "data": {"max_documents": self.max_documents, "seq_len": self.seq_len},
            "batch": self.batch,
            "student": self.student_config().model_dump(),
            "lr": self.lr,
            "loss": "forward KL, temperature 1, ce_weight 0.5; cached: top-k + tail bucket",
        }


FULL = CacheBenchConfig(
    quick=False,
    ks=(32, 64, 128),
    max_documents=100,
    seq_len=128,
    batch=32,
    student=None,
)
QUICK = CacheBenchConfig(
    quick=True,
    ks=(32, 64),
    max_documents=4,
    seq_len=32,
    batch=4,
    student={"hidden_size": 16, "num_layers": 1, "num_heads": 2},
)


def config_for(quick: bool, ks: Sequence[int] | None = None) -> CacheBenchConfig:
    base = QUICK if quick else FULL
    return replace(base, ks=tuple(sorted(set(ks)))) if ks else base


def layout_bytes_per_token(k: int, vocab: int, *, label: bool = False) -> int:
    """Bytes per token position of the cache layout (see ``foundry_kernel.teachers._logit_cache``):
    k ids (uint16 when the vocabulary fits, else int32), k fp16 values, an fp32 tail mass
    and, when the teacher gives it, an fp32 true-token log-probability. Headers excluded."""
    id_bytes = 2 if vocab <= 2**16 else 4
    return k * (id_bytes + 2) + 4 + (4 if label else 0)


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """What both halves of the benchmark share: the teacher, its data and dtypes."""

    cfg: CacheBenchConfig
    teacher_dir: Path
    teacher: LoadedModel
    data: DataBundle
    vocab: int
    student_amp: torch.dtype | None
    teacher_amp: torch.dtype | None

    def student(self) -> PreTrainedModel:
        """A fresh student, seeded: every call returns the same initial weights."""
        config = self.cfg.student_config()
        return build_student(config, self.teacher, device=CPU, seed=self.cfg.seed).model

    def live(self, top_k: int | None = None) -> Teacher:
        return HFTeacher(
            self.teacher.model,
            vocab_size=self.vocab,
            amp_dtype=self.teacher_amp,
            top_k=top_k,
            pad_token_id=self.teacher.tokenizer.pad_token_id,
        )


def prepare(cfg: CacheBenchConfig, printer: Printer) -> Setup:
    """Build (or reuse) the teacher, load it and pack the data."""
    build = cfg.teacher_build()
    printer(f"cache: teacher recipe {build.model_dump()} (built once, then cached)")
    teacher_dir = in_worker_thread(
        ensure_builtin_teacher,
        build,
        cache_dir=default_cache_dir(),
        ctx=RunContext(),
        device=CPU,
        amp_dtype=autocast_dtype("auto", CPU, build.hidden_size),
    )
    teacher = load_causal_lm(str(teacher_dir), device=CPU)
    teacher.model.eval().requires_grad_(False)
    data_cfg = DataConfig(max_documents=cfg.max_documents, seq_len=cfg.seq_len)
    data = build_data(data_cfg, teacher.tokenizer, seed=data_cfg.split_seed)
    hidden = cfg.student_config().hidden_size or build.hidden_size
    return Setup(
        cfg=cfg,
        teacher_dir=teacher_dir,
        teacher=teacher,
        data=data,
        vocab=len(teacher.tokenizer),
        student_amp=autocast_dtype("auto", CPU, hidden),
        teacher_amp=autocast_dtype("auto", CPU, build.hidden_size),
    )


# --------------------------------------------------------------------------- capture


def capture_k(s: Setup, k: int, folder: Path) -> tuple[LogitCache, float]:
    """Capture the teacher's top-k over every training block into ``folder``; (cache, s)."""
    live = s.live(top_k=k)
    key = CacheKey(
        teacher=fingerprint_model_dir(s.teacher_dir),
        tokenizer=fingerprint_tokenizer(s.teacher.tokenizer),
        data=fingerprint_tokens(s.data.train),
        k=k,
    )

    def ask(index: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> SparseTargets:
        signal = live.signal(None, ids, mask)
        assert isinstance(signal, SparseTargets)  # an HFTeacher with top_k answers top-k
        return signal

    t0 = time.perf_counter()
    cache = capture(
        s.data.train,
        ask,
        key,
        folder,
        batch_size=s.cfg.batch,
        shard_blocks=256,
        vocab_size=s.vocab,
    )
    return cache, time.perf_counter() - t0


def measure_storage(
    s: Setup, root: Path, printer: Printer
) -> tuple[dict[int, dict[str, Any]], dict[int, LogitCache]]:
    """Capture every k; bytes/token as the cache reports it, next to the layout's formula.
    Returns the figures and the caches (the epoch timing trains from one of them)."""
    out: dict[int, dict[str, Any]] = {}
    caches: dict[int, LogitCache] = {}
    for k in s.cfg.ks:
        folder = root / f"k{k}"
        cache, seconds = in_worker_thread(capture_k, s, k, folder)
        caches[k] = cache
        formula = layout_bytes_per_token(k, s.vocab)
        size = sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))
        out[k] = {
            "k": k,
            "bytes_per_token": cache.bytes_per_token,
            "formula_bytes_per_token": formula,
            "header_bytes_per_token": cache.bytes_per_token - formula,
            "capture_s": seconds,
            "cache_bytes": size,
            "positions": cache.num_blocks * cache.positions,
        }
        printer(
            f"  k={k:<4d} {cache.bytes_per_token:8.2f} B/token (formula {formula}), "
            f"captured in {seconds:.2f} s"
        )
    return out, caches


# --------------------------------------------------------------------------- one epoch


def _trainer(
    s: Setup,
    teacher: Teacher,
    steps: int,
    ctx: RunContext,
    sink: MetricsSink,
) -> Trainer:
    plan = TrainPlan(
        optim=OptimConfig(
            batch_size=s.cfg.batch, lr=s.cfg.lr, warmup_steps=min(30, max(steps // 10, 1))
        ),
        limits=LimitsConfig(max_steps=steps),
        eval=EvalConfig(every_steps=10**9, max_batches=1),
        checkpoint=CheckpointConfig(every_steps=None),
        loss=LossConfig(kind="forward_kl", temperature=1.0, ce_weight=0.5, top_k_mass="tail"),
        amp_dtype=s.student_amp,
        teacher_amp_dtype=s.teacher_amp,
        seed=s.cfg.seed,
    )
    return Trainer(
        s.student(), s.data, plan, ctx=ctx, on_metrics=sink, teacher=teacher, vocab_size=s.vocab
    )


def _teacher_for(s: Setup, path: str, cache: LogitCache) -> Teacher:
    return s.live() if path == "online" else CachedTeacher(cache, s.live())


def _train(s: Setup, path: str, cache: LogitCache, steps: int, clock: StepClock) -> None:
    """Train ``steps`` steps; a step ends when its metrics are reported."""

    def sink(step: int, values: dict[str, float]) -> None:
        if "train/loss" in values:
            clock.tick(values["train/loss"])

    trainer = _trainer(s, _teacher_for(s, path, cache), steps, RunContext(), sink)
    clock.begin()
    trainer.fit()


def measure_epoch(s: Setup, cache: LogitCache, printer: Printer) -> dict[str, Any]:
    """One epoch of each path, their steps interleaved; one untimed warm-up step first."""
    steps = len(s.data.train) // s.cfg.batch  # the sampler drops the last partial batch
    for path in PATHS:
        in_worker_thread(_train, s, path, cache, 1, StepClock(path))
    turns = Turns(PATHS)
    clocks = {p: StepClock(p, turns) for p in PATHS}
    errors: dict[str, str] = {}

    def body(path: str) -> None:
        try:
            _train(s, path, cache, steps, clocks[path])
        except Exception as exc:  # noqa: BLE001 - a path that fails is a result
            errors[path] = f"{type(exc).__name__}: {str(exc)[:300]}"

    threads = {p: threading.Thread(target=body, args=(p,), daemon=True) for p in PATHS}
    turns.run(threads, steps, errors)
    out: dict[str, Any] = {"steps": steps, "tokens_per_step": s.cfg.batch * s.cfg.seq_len}
    for path in PATHS:
        durations = clocks[path].durations[:steps]
        if path in errors or len(durations) < steps:
            out[path] = {"status": "error", "note": errors.get(path, "steps missing")}
            continue
        out[path] = {
            "status": "ok",
            "epoch_s": sum(durations),
            "step_s": summary(durations),
            "first_loss": clocks[path].losses[0],
            "last_loss": clocks[path].losses[-1],
        }
        printer(
            f"  {path:7s} epoch {sum(durations):.2f} s ({steps} steps, median "
            f"{median(durations) * 1000:.1f} ms)"
        )
    return out


# --------------------------------------------------------------------------- the benchmark


def run(
    *, quick: bool = False, ks: Sequence[int] | None = None, printer: Printer = print
) -> dict[str, Any]:
    cfg = config_for(quick, ks)
    s = prepare(cfg, printer)
    train_k = max(cfg.ks)
    printer(
        f"cache: {len(s.data.train)} training blocks x {cfg.seq_len} tokens, vocabulary "
        f"{s.vocab}; capture k in {list(cfg.ks)}; epoch online vs from the k={train_k} cache"
    )
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        storage, caches = measure_storage(s, Path(tmp), printer)
        epoch = measure_epoch(s, caches[train_k], printer)
        for cache in caches.values():
            cache.close()  # drop the memory maps before the folder goes
    online = epoch["online"].get("epoch_s")
    cached = epoch["cached"].get("epoch_s")
    capture_s = storage[train_k]["capture_s"]
    saved = None if online is None or cached is None else online - cached
    return {
        "config": {**cfg.to_dict(), "vocab": s.vocab, "train_k": train_k},
        "dtypes": {"student": str(s.student_amp), "teacher": str(s.teacher_amp)},
        "data": {"train_blocks": len(s.data.train), "seq_len": cfg.seq_len},
        "storage": [storage[k] for k in cfg.ks],
        "epoch": epoch,
        "speedup": ratio(online, cached),
        "capture_s": capture_s,
        "saved_per_epoch_s": saved,
        "break_even_epochs": capture_s / saved if saved and saved > 0 else None,
        "reference": {
            "distillkit_k": DISTILLKIT_K,
            "distillkit_bytes_per_token": DISTILLKIT_BYTES_PER_TOKEN,
            "ours_formula_at_k": layout_bytes_per_token(DISTILLKIT_K, s.vocab),
            "note": "DistillKit's reported figure for its compressed format; not measured here",
        },
    }


def render(section: dict[str, Any]) -> str:
    ref = section["reference"]
    rows = [
        [
            r["k"],
            f"{r['bytes_per_token']:.2f}",
            r["formula_bytes_per_token"],
            f"{r['header_bytes_per_token']:.3f}",
            f"{r['cache_bytes'] / MiB:.2f} MiB",
            fmt_seconds(r["capture_s"]),
        ]
        for r in section["storage"]
    ]
    lines = [
        table(
            [
                "k",
                "bytes/token",
                "formula 4k+4",  # uint16 ids: every vocabulary benchmarked here fits
                "headers/token",
                "cache size",
                "capture time",
            ],
            rows,
        ),
        f"reference: DistillKit reports ~{ref['distillkit_bytes_per_token']:.0f} B/token at "
        f"k={ref['distillkit_k']} (its compressed format; quoted, not measured here); this "
        f"layout at k={ref['distillkit_k']}: {ref['ours_formula_at_k']} B/token by the formula",
        "",
        _epoch_table(section),
    ]
    speedup = section["speedup"]
    lines.append(f"speed-up (online / cached epoch): {fmt_ratio(speedup)}")
    k = section["config"]["train_k"]
    lines.append(f"capture time (k={k}): {section['capture_s']:.2f} s")
    saved = section["saved_per_epoch_s"]
    lines.append(f"time saved per epoch: {'-' if saved is None else f'{saved:.2f} s'}")
    even = section["break_even_epochs"]
    lines.append(
        "break-even: "
        + ("never (no time saved)" if even is None else f"{even:.2f} epochs")
        + " (capture time / time saved per epoch)"
    )
    return "\n".join(lines)


def _epoch_table(section: dict[str, Any]) -> str:
    epoch = section["epoch"]
    k = section["config"]["train_k"]
    names = {
        "online": "online (teacher forward + full-vocabulary loss)",
        "cached": f"cached k={k} (sparse loss, no teacher forward)",
    }
    rows = []
    for path in PATHS:
        r = epoch[path]
        if r["status"] != "ok":
            rows.append([names[path], r["status"], "-", "-", r.get("note", "")[:60]])
            continue
        tps = epoch["steps"] * epoch["tokens_per_step"] / r["epoch_s"]
        rows.append(
            [
                names[path],
                f"{r['epoch_s']:.2f} s",
                f"{r['step_s']['median'] * 1000:.1f} ms",
                f"{tps:,.0f}",
                f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}",
            ]
        )
    head = f"one epoch: {epoch['steps']} steps x {epoch['tokens_per_step']} tokens, interleaved"
    return head + "\n" + table(["path", "epoch", "median step", "tokens/s", "loss"], rows)


__all__: Sequence[str] = ("layout_bytes_per_token", "render", "run")
