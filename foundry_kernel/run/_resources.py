"""Memory and disk: estimate before loading, refuse what cannot fit, sample while running.

The old Foundry found out about out-of-memory by crashing twenty minutes into a run.
Here a run first *estimates* what it needs (weights, gradients, AdamW state, activations
at the configured micro-batch, full-vocabulary logits, the teacher) and compares that
with what is free - GPU via ``torch.cuda.mem_get_info`` and NVML, CPU via psutil (and the
container's cgroup limit) - and with free disk for its checkpoints. A run that cannot fit
is refused with the numbers and a concrete fix; a tight one gets a warning.

While it runs, a :class:`MemorySampler` records process RSS (always) and per-GPU NVML
used/total plus torch allocated/reserved (when a GPU exists) into the run's metrics, so
the panel can chart memory live and the dashboard can show it afterwards.

A machine without a GPU (or without the NVIDIA driver) is a normal state, not an error:
NVML's ``NVMLError_LibraryNotFound``/``NVMLError_DriverNotLoaded`` just mean "no GPU".
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from foundry_kernel._runtime import Runtime, resolve_device
from foundry_kernel.config import RunConfig, teacher_placement
from foundry_kernel.errors import ResourceError
from foundry_kernel.training._evaluate import EVAL_CHUNK_COPIES
from foundry_kernel.training._losses import chunk_rows

try:  # nvidia-ml-py is a declared dependency, but a stripped install must still work on CPU.
    import pynvml
except ImportError:  # pragma: no cover - exercised only on broken installs
    pynvml = None

__all__ = [
    "TIGHT_FRACTION",
    "MemoryEstimate",
    "MemorySampler",
    "PreflightReport",
    "estimate_memory",
    "estimate_memory_for",
    "free_disk",
    "free_memory",
    "gpu_count",
    "preflight",
    "sample_memory",
]

log = logging.getLogger("foundry.resources")

GiB = 1024**3
MiB = 1024**2
TIGHT_FRACTION = 0.8
"""Above this share of free memory a run is allowed but warned about (allocator slack,
fragmentation and other processes make the last 20% unreliable)."""

CUDA_CONTEXT_BYTES = 512 * MiB
"""CUDA context + cuBLAS workspace that exist before any tensor (rough, per process)."""

ALLOCATOR_SLACK = {"cpu": 0.75, "cuda": 0.1}
"""Extra bytes per byte of short-lived tensors. CPU: glibc keeps freed large blocks in
the heap, so RSS peaks well above the live bytes (measured, see estimate_memory). CUDA:
the caching allocator's fragmentation - a conservative guess, not yet measured on a GPU."""

# fp32 [chunk, vocab] tensors alive at once inside one loss chunk: teacher and student
# log-probs, probabilities, the divergence's mixture/difference and the gradient.
_CHUNK_COPIES = {"forward_kl": 4, "reverse_kl": 4, "tvd": 4}
_CHUNK_COPIES_MIXTURE = 6  # jsd and skew KLs also hold the mixture and its log

STRATEGIES = ("ddp", "fsdp2")
PLACEMENTS = ("replicate", "shard", "server", "cache")
FSDP_GATHERED_UNITS = 2
"""Unsharded FSDP2 units alive at once: the one computing and the next one, all-gathered
ahead by FSDP2's forward prefetch."""

T = TypeVar("T")


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run is expected to hold at its peak, by component.

    Rough by design (within tens of percent): the point is to refuse a run that
    cannot possibly fit *before* minutes of model loading, and to say which part
    dominates so the suggestion is the right one.
    """

    device: str = "cpu"
    student_weights: int = 0
    student_grads: int = 0
    optimizer_state: int = 0
    activations: int = 0
    student_logits: int = 0
    loss_chunks: int = 0
    teacher_weights: int = 0
    teacher_forward: int = 0
    teacher_logits: int = 0
    gathered_units: int = 0
    grad_buckets: int = 0
    evaluation: int = 0
    baseline_student: int = 0
    overhead: int = 0
    allocator_slack: int = 0
    notes: tuple[str, ...] = ()

    def parts(self) -> dict[str, int]:
        """Component name -> bytes (every field but ``device`` and ``notes``)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("device", "notes")
        }

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    @property
    def largest(self) -> tuple[str, int]:
        """The component that dominates: what a suggestion should target first."""
        actionable = {
            k: v for k, v in self.parts().items() if k not in ("allocator_slack", "overhead")
        }
        return max(actionable.items(), key=lambda kv: kv[1])

    def describe(self) -> str:
        """A small table for the panel, the CLI and error messages."""
        rows = [f"memory estimate on {self.device}: {_gib(self.total)} total"]
        for name, value in sorted(self.parts().items(), key=lambda kv: -kv[1]):
            if value:
                rows.append(f"  {name.replace('_', ' '):<18} {_gib(value):>10}")
        rows.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(rows)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _layer_activation_bytes(tokens: int, seq: int, hidden: int, heads: int, elem: int) -> int:
    """Activations one transformer layer keeps for backward.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models"): per token ``34*h + 5*a*s`` bytes in 16-bit for a GPT layer (the ``5*a*s``
    term is the attention matrix; fused/flash attention avoids most of it, so this is an
    upper bound there). Scaled by ``elem / 2`` for other activation widths.
    """
    return tokens * (34 * hidden + 5 * heads * seq) * elem // 2


def _largest_unit(params: int, vocab: int, hidden: int, layers: int) -> int:
    """Parameters of the largest FSDP2 unit (one per decoder layer, then the root).

    The root holds the embeddings, the final norm and an untied head: at most ``2*V*H``
    (and never more than the model); a layer holds the rest split evenly. Which one is
    larger decides the all-gather peak (the root at large vocabularies). An upper bound
    for tied embeddings, whose root holds ``V*H`` only.
    """
    root = min(params, 2 * vocab * hidden)
    layer = math.ceil(max(params - min(params, vocab * hidden), 0) / max(layers, 1))
    return max(root, layer)


def _gathered_param_bytes(config: RunConfig, runtime: Runtime) -> int:
    """Bytes per all-gathered student parameter: FSDP2's MixedPrecisionPolicy gathers in
    bf16 under distributed.mixed_precision='bfloat16' ('auto' follows the autocast)."""
    policy = config.distributed.mixed_precision
    if policy == "bfloat16":
        return 2
    if policy == "off":
        return 4
    return min(runtime.activation_bytes, 4)


def _check_world(world_size: int, strategy: str, placement: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"teacher_placement must be one of {PLACEMENTS}, got {placement!r}")


def estimate_memory(
    config: RunConfig,
    *,
    teacher_params: int,
    student_params: int,
    vocab_size: int,
    teacher_hidden: int,
    student_hidden: int,
    teacher_layers: int,
    student_layers: int,
    teacher_heads: int | None = None,
    student_heads: int | None = None,
    runtime: Runtime,
    fused_student: bool = False,
    fused_teacher: bool = False,
    world_size: int = 1,
    strategy: str = "ddp",
    teacher_placement: str = "replicate",
    student_trainable: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one distillation run *per rank* (see
    :class:`MemoryEstimate`).

    Formula (W = world_size, B = optim.batch_size global blocks per micro-batch, each rank
    holding ``b = ceil(B/W)`` of them, S = data.seq_len, N = b*S tokens per rank, V =
    vocab, P = parameters, e = the student's activation bytes under its autocast, e_t =
    the teacher's weight bytes, e_ta = its activation bytes; all from ``runtime``, the
    same value the run trains with):

    - student weights 4P, grads 4P_t, AdamW state 8P_t (two fp32 moments), where P_t =
      ``student_trainable`` (default P): a LoRA student's frozen base has weights only,
      its adapters weights, gradients and two moments; under
      ``strategy="fsdp2"`` each divided by W (rounded up), plus ``gathered_units``: the
      largest unit (:func:`_largest_unit`) unsharded twice (current + prefetched) at the
      gather dtype and its unsharded fp32 gradient before the reduce-scatter; under
      ``"ddp"`` with W > 1 ``grad_buckets`` 4P_t: the reducer's flat buckets, a second copy
      of the gradients (torch's default ``gradient_as_bucket_view=False``);
    - activations: ``student_layers`` x the per-layer formula above; with
      optim.gradient_checkpointing only each layer's input (N*H*e) plus one layer;
    - logits: the student's [N, V] logits and their gradient at e bytes each; the loss
      is chunked over loss.chunk_tokens, so only ``min(chunk, N) * V * 4`` bytes times
      4-6 fp32 intermediates exist at once; the teacher's [N, V] logits at e_ta;
    - teacher weights e_t * P_t and one layer of its no-grad forward at e_ta. By
      ``teacher_placement``: ``replicate`` a full teacher per rank; ``shard`` its
      weights divided by W plus two all-gathered units (no gradients, no optimizer
      state); ``server`` nothing in this process (its memory is the server's; sparse
      top-k answers are small); ``cache`` no teacher forward while training (cached
      targets) but the live teacher evaluation needs is still loaded;
    - under the fused loss strategy (``fused_student``; ``fused_teacher`` when an
      in-process teacher is projected the same way) those logits never exist: only the
      loss chunks do;
    - ``evaluation``: held-out evaluation runs between steps on the same per-rank
      micro-batch; its transient set is one no-grad layer and the [N, V] logits of the
      student (even under the fused loss: evaluation takes the model's logits) and of an
      in-process teacher, plus ``EVAL_CHUNK_COPIES`` fp32 [chunk, V] rows (chunk =
      ``chunk_rows(loss.chunk_tokens, V)``, as evaluation walks them). It does not
      coexist with the training step's transients, so only what it needs beyond them is
      counted (0 when the training step is the larger, as usual without the fused loss);
    - eval.baseline trains a second (CE-only) student after distillation: its grads and
      AdamW state replace the freed ones, but the distilled student's weights (4P) stay;
    - on CUDA a fixed context overhead;
    - allocator slack on the larger transient set (training's activations, logits, loss
      chunks, teacher forward; or evaluation's): 0.75x on CPU, 0.1x on CUDA (see
      ``ALLOCATOR_SLACK``).

    Calibration (this project's CPU machine, fp32, Llama teacher 4.7M / student 1.05M,
    vocab 4096, chunk 1024, forward KL; peak RSS growth over 3 AdamW steps vs the
    estimate): the formula without slack matched the *live* bytes at 0.94-1.07x for
    8x128, 32x128 and 32x256 tokens (1.36x at 16x512, where SDPA avoids part of the
    attention term), measured with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks leave
    RSS. With glibc's defaults RSS peaked at 1.45-1.7x those bytes; the slack brings the
    estimate to 0.99-1.22x of those measured peaks (277-302 / 888-928 / 1612-1662 MiB
    over two runs each). The world-size terms are not calibrated yet.
    """
    placement = teacher_placement
    _check_world(world_size, strategy, placement)
    trainable = student_params if student_trainable is None else student_trainable
    kind = runtime.device.type
    heads_s = student_heads or config.student.num_heads or config.teacher.build.num_heads
    heads_t = teacher_heads or config.teacher.build.num_heads
    batch, seq = math.ceil(config.optim.batch_size / world_size), config.data.seq_len
    tokens = batch * seq
    e_act, e_t = runtime.activation_bytes, runtime.teacher_weight_bytes
    e_ta = runtime.teacher_activation_bytes
    layer = _layer_activation_bytes(tokens, seq, student_hidden, heads_s, e_act)
    if config.optim.gradient_checkpointing:
        activations = student_layers * tokens * student_hidden * e_act + layer
    else:
        activations = student_layers * layer
    chunk = min(config.loss.chunk_tokens, tokens)
    copies = _CHUNK_COPIES.get(config.loss.kind, _CHUNK_COPIES_MIXTURE)
    in_process = placement != "server"  # a teacher forward happens in this process
    teacher_step = placement in ("replicate", "shard")  # ... and during training steps
    teacher_layer = _layer_activation_bytes(tokens, seq, teacher_hidden, heads_t, e_ta)
    transient = {
        "activations": activations,
        "student_logits": 0 if fused_student else 2 * tokens * vocab_size * e_act,
        "loss_chunks": chunk * vocab_size * 4 * copies,
        "teacher_forward": teacher_layer if teacher_step else 0,
        "teacher_logits": 0 if fused_teacher or not teacher_step else tokens * vocab_size * e_ta,
    }
    eval_chunk = min(chunk_rows(config.loss.chunk_tokens, vocab_size), tokens)
    eval_transient = (
        layer
        + tokens * vocab_size * e_act
        + eval_chunk * vocab_size * 4 * EVAL_CHUNK_COPIES
        + ((teacher_layer + tokens * vocab_size * e_ta) if in_process else 0)
    )
    train_transient = sum(transient.values())
    shards = world_size if strategy == "fsdp2" else 1
    gathered = 0
    if strategy == "fsdp2":
        unit = _largest_unit(student_params, vocab_size, student_hidden, student_layers)
        gathered += unit * (FSDP_GATHERED_UNITS * _gathered_param_bytes(config, runtime) + 4)
    teacher_weights = teacher_params * e_t if in_process else 0
    if placement == "shard":
        teacher_weights = math.ceil(teacher_weights / world_size)
        t_unit = _largest_unit(teacher_params, vocab_size, teacher_hidden, teacher_layers)
        gathered += FSDP_GATHERED_UNITS * t_unit * e_t
    return MemoryEstimate(
        device=kind,
        student_weights=math.ceil(4 * student_params / shards),
        student_grads=math.ceil(4 * trainable / shards),
        optimizer_state=math.ceil(8 * trainable / shards),
        teacher_weights=teacher_weights,
        gathered_units=gathered,
        grad_buckets=4 * trainable if strategy == "ddp" and world_size > 1 else 0,
        evaluation=max(0, eval_transient - train_transient),
        baseline_student=4 * student_params if config.eval.baseline else 0,
        overhead=CUDA_CONTEXT_BYTES if kind == "cuda" else 0,
        allocator_slack=int(ALLOCATOR_SLACK[kind] * max(train_transient, eval_transient)),
        notes=_estimate_notes(config, teacher_layers, world_size, strategy, placement),
        **transient,
    )


def estimate_memory_for(config: RunConfig, world_size: int, **shapes: Any) -> MemoryEstimate:
    """:func:`estimate_memory` with the strategy and teacher placement the config names
    (``teacher.placement='auto'`` resolved by ``config.teacher_placement``)."""
    return estimate_memory(
        config,
        world_size=world_size,
        strategy=config.distributed.strategy,
        teacher_placement=teacher_placement(config),
        **shapes,
    )


def _estimate_notes(
    config: RunConfig, teacher_layers: int, world_size: int, strategy: str, placement: str
) -> tuple[str, ...]:
    notes = [f"micro-batch {config.optim.batch_size} x {config.data.seq_len} tokens"]
    if world_size > 1:
        per_rank = math.ceil(config.optim.batch_size / world_size)
        notes.append(
            f"per rank of {world_size} ({strategy}, teacher {placement}): "
            f"{per_rank} x {config.data.seq_len} tokens"
        )
    if config.optim.grad_accum > 1:
        notes.append(f"grad_accum={config.optim.grad_accum} adds time, not memory")
    notes.append(f"teacher: {teacher_layers} layers, forward without gradients")
    return tuple(notes)


# --------------------------------------------------------------------------- free memory


_nvml_lock = threading.Lock()
_nvml_state: bool | None = None  # None = not tried yet


def _nvml_ready() -> bool:
    """Initialise NVML once per process; False (not an error) when there is no GPU/driver."""
    global _nvml_state
    with _nvml_lock:
        if _nvml_state is None:
            if pynvml is None:
                _nvml_state = False
            else:
                try:
                    pynvml.nvmlInit()
                    _nvml_state = True
                except pynvml.NVMLError as exc:  # LibraryNotFound / DriverNotLoaded: no GPU
                    log.debug("NVML unavailable (%s): treating this machine as GPU-less", exc)
                    _nvml_state = False
        return _nvml_state


def _nvml(fn: Callable[..., T], *args: Any) -> T | None:
    """Call one NVML function; unsupported fields (or a lost GPU) become None, as in nvitop."""
    if not _nvml_ready():
        return None
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def gpu_count() -> int:
    """GPUs NVML can see (0 on a machine without GPU or driver)."""
    if pynvml is None:
        return 0
    return _nvml(pynvml.nvmlDeviceGetCount) or 0


def _nvml_memory(index: int) -> tuple[int, int, int] | None:
    """(free, used, total) bytes of GPU ``index`` via NVML, or None."""
    if pynvml is None:
        return None
    handle = _nvml(pynvml.nvmlDeviceGetHandleByIndex, index)
    info = None if handle is None else _nvml(pynvml.nvmlDeviceGetMemoryInfo, handle)
    if info is None:
        return None
    return int(info.free), int(info.used), int(info.total)


def _cgroup_free() -> int | None:
    """Bytes left under the container's memory limit (cgroup v2, then v1), if there is one.

    psutil reports the *host's* available memory; inside a container with a limit the
    kernel's OOM killer acts on the cgroup, so that limit is what a run must fit in.
    """
    candidates = (
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (
            Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ),
    )
    for limit_path, usage_path in candidates:
        try:
            limit_text = limit_path.read_text().strip()
            usage = int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max":
            return None
        try:
            limit = int(limit_text)
        except ValueError:
            continue
        if limit >= 1 << 60:  # v1 writes a huge number for "no limit"
            return None
        return max(limit - usage, 0)
    return None


def _as_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return resolve_device("auto")
    return torch.device(device)


def free_memory(device: str | torch.device = "cpu") -> int | None:
    """Free bytes on ``device``; None when it cannot be measured (e.g. 'cuda' with no GPU).

    CPU: psutil's available memory, capped by the cgroup limit. CUDA: the smaller of
    ``torch.cuda.mem_get_info`` and NVML's free (they differ when other processes or
    MIG slices are involved; the smaller is what this process can count on).
    """
    dev = _as_device(device)
    if dev.type == "cpu":
        available = int(psutil.virtual_memory().available)
        limit = _cgroup_free()
        return available if limit is None else min(available, limit)
    cuda = torch.cuda.is_available()
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if cuda else 0)
    values: list[int] = []
    if cuda:
        values.append(int(torch.cuda.mem_get_info(index)[0]))
    nvml = _nvml_memory(index)
    if nvml is not None:
        values.append(nvml[0])
    return min(values) if values else None


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor,
    since the runs folder may not have been created yet)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


# --------------------------------------------------------------------------- preflight


@dataclass
class PreflightReport:
    """What preflight measured; ``warnings`` hold tight-but-allowed findings."""

    device: str
    needed_bytes: int
    free_bytes: int | None
    disk_needed_bytes: int
    disk_free_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def memory_fraction(self) -> float | None:
        """Share of free memory the run expects to use (None when free is unknown)."""
        if not self.free_bytes:
            return None
        return self.needed_bytes / self.free_bytes

    def describe(self) -> str:
        free = "unknown" if self.free_bytes is None else _gib(self.free_bytes)
        lines = [
            f"{self.device} memory: needs ~{_gib(self.needed_bytes)}, free {free}",
            f"disk: needs ~{_gib(self.disk_needed_bytes)}, free {_gib(self.disk_free_bytes)}",
        ]
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def memory_fixes(config: RunConfig) -> str:
    """Concrete knobs, naming current values, in the order they usually help most."""
    tips = [
        f"a smaller optim.batch_size (now {config.optim.batch_size}; raise optim.grad_accum "
        "to keep the effective batch)",
        f"a shorter data.seq_len (now {config.data.seq_len})",
    ]
    if not config.optim.gradient_checkpointing:
        tips.append("optim.gradient_checkpointing=true")
    if config.optim.precision != "bfloat16":
        tips.append("optim.precision=bfloat16")
    if config.teacher.dtype in ("auto", "float32"):
        tips.append("teacher.dtype=bfloat16")
    if config.eval.baseline:
        tips.append("eval.baseline=false (skips the CE-only comparison student)")
    return "try " + ", ".join(tips)


def _check_memory(config: RunConfig, estimate: MemoryEstimate, free: int | None) -> list[str]:
    needed = estimate.total
    if free is None:
        return [f"could not measure free {estimate.device} memory; skipping the memory check"]
    part, size = estimate.largest
    if needed > free:
        raise ResourceError(
            f"this run needs ~{_gib(needed)} of {estimate.device} memory but only "
            f"{_gib(free)} is free (largest part: {part.replace('_', ' ')} {_gib(size)}); "
            f"{memory_fixes(config)}.\n{estimate.describe()}"
        )
    if needed > TIGHT_FRACTION * free:
        return [
            f"memory is tight: ~{_gib(needed)} of {_gib(free)} free "
            f"({needed / free:.0%}); if it fails, {memory_fixes(config)}"
        ]
    return []


def _check_disk(needed: int, free: int, runs_dir: Path) -> list[str]:
    if needed > free:
        raise ResourceError(
            f"checkpoints and export need ~{_gib(needed)} of disk under {runs_dir} but only "
            f"{_gib(free)} is free; lower checkpoint.keep_last, free space, or point "
            "runs_dir somewhere larger"
        )
    if needed > TIGHT_FRACTION * free:
        return [f"disk is tight: ~{_gib(needed)} of {_gib(free)} free under {runs_dir}"]
    return []


def preflight(
    config: RunConfig,
    estimate: MemoryEstimate,
    *,
    runs_dir: str | Path,
    checkpoint_bytes: int,
    export_bytes: int | None = None,
    free_bytes: int | None = None,
) -> PreflightReport:
    """Refuse (``ResourceError``) a run that cannot fit; warn when it is tight.

    Disk: ``checkpoint.keep_last + 1`` checkpoints (the newest is written before the
    oldest is pruned) plus the export (default: one checkpoint's size, an upper bound
    since an export holds weights only). ``free_bytes`` overrides the measured free
    memory (for callers that already know it, and for tests).
    """
    free = free_memory(estimate.device) if free_bytes is None else free_bytes
    warnings = _check_memory(config, estimate, free)
    export = checkpoint_bytes if export_bytes is None else export_bytes
    disk_needed = (config.checkpoint.keep_last + 1) * checkpoint_bytes + export
    disk_free = free_disk(runs_dir)
    warnings += _check_disk(disk_needed, disk_free, Path(runs_dir))
    for warning in warnings:
        log.warning("preflight: %s", warning)
    return PreflightReport(
        device=estimate.device,
        needed_bytes=estimate.total,
        free_bytes=free,
        disk_needed_bytes=disk_needed,
        disk_free_bytes=disk_free,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- sampling


Sample = dict[str, float | None]
SampleCallback = Callable[[int, float, Sample], None]


def _gpu_sample(sample: Sample) -> None:
    """Per-GPU NVML used/total, and torch's allocator view of the current device."""
    for index in range(gpu_count()):
        memory = _nvml_memory(index)
        used, total = (None, None) if memory is None else (memory[1], memory[2])
        sample[f"mem/gpu{index}_used_mb"] = None if used is None else used / MiB
        sample[f"mem/gpu{index}_total_mb"] = None if total is None else total / MiB
    if torch.cuda.is_available():
        try:
            sample["mem/torch_allocated_mb"] = torch.cuda.memory_allocated() / MiB
            sample["mem/torch_reserved_mb"] = torch.cuda.memory_reserved() / MiB
            sample["mem/torch_max_allocated_mb"] = torch.cuda.max_memory_allocated() / MiB
        except RuntimeError:  # a CUDA error in the job poisons the context: just skip it
            pass


def sample_memory(process: psutil.Process | None = None) -> Sample:
    """One sample: process RSS always; GPU fields only when a GPU exists."""
    proc = process or psutil.Process()
    try:
        rss: float | None = proc.memory_info().rss / MiB
    except psutil.Error:
        rss = None
    sample: Sample = {"mem/rss_mb": rss}
    _gpu_sample(sample)
    return sample


class MemorySampler:
    """Samples memory every ``interval_s`` on its own thread and hands each sample to
    ``callback(index, time, sample)``.

    Its own thread because the training thread is busy inside torch for a whole step:
    sampling there would miss the peak, which happens mid-step. The callback runs on the
    sampler thread; it must be quick and thread-safe (the controller's writes to the
    store are). ``stop()`` joins the thread so nothing outlives the run.
    """

    def __init__(
        self,
        callback: SampleCallback,
        interval_s: float = 0.5,
        *,
        name: str = "mem",
        start_index: int = 0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._callback = callback
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._name = f"foundry-sampler-{name}"
        self.samples_taken = 0
        self._index = start_index
        self.peak_rss_mb = 0.0

    def start(self) -> MemorySampler:
        """Start sampling (idempotent while running; a stopped sampler cannot restart)."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("this MemorySampler was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop and join the thread (idempotent; safe from any thread but its own)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _loop(self) -> None:
        process = psutil.Process()
        next_at = time.monotonic()
        while not self._stop.is_set():
            sample = sample_memory(process)
            rss = sample.get("mem/rss_mb")
            if rss is not None:
                self.peak_rss_mb = max(self.peak_rss_mb, rss)
                sample["mem/rss_peak_mb"] = self.peak_rss_mb
            self._callback(self._index, time.time(), sample)
            self._index += 1
            self.samples_taken += 1
            # Fixed-rate schedule so a slow callback does not drift the rate.
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
