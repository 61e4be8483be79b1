"""Shared pieces of the benchmarks: machine facts, timing, tiny models and data, tables.

Nothing here imports TRL or Liger: the contenders import what they need, lazily, so a
benchmark that does not use them does not pay for (or depend on) them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- machine


def load_average() -> list[float]:
    """1/5/15-minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def uptime_line() -> str:
    """What ``uptime`` prints (falls back to the load averages)."""
    exe = shutil.which("uptime")
    try:
        if exe:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=5, check=False)
            if out.returncode == 0:
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "load average: " + ", ".join(str(x) for x in load_average())


def available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unreadable /proc: report none
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_snapshot() -> dict[str, Any]:
    """Load and memory right now (taken before and after a run, to say how busy it was)."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "uptime": uptime_line(),
        "loadavg": load_average(),
        "mem_available_bytes": available_memory(),
    }


def environment() -> dict[str, Any]:
    """Static facts about where the numbers came from."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "versions": {
            name: version(name)
            for name in ("torch", "transformers", "trl", "liger-kernel", "triton", "foundry")
        },
    }


# --------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the spread (max/min) of a list of timings in seconds."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": median(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side is missing or not positive."""
    if a is None or b is None or not (a > 0 and b > 0):
        return None
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


def in_worker_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on a fresh thread and return its result (re-raising its exception).

    Everything timed in this suite computes on a worker thread, as Foundry's runs do (the
    run controller's job thread, for the CLI and notebooks alike). On a machine whose cores
    are contended, torch's OpenMP team of the *main* thread was seen to stall in its
    barriers: three tiny steps took 2.5 s there and 0.04 s on a worker thread (2 torch
    threads; with 1 thread both took 0.04 s). Timing every contender on the same kind of
    thread keeps that artefact out of the ratios.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="bench-worker", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --------------------------------------------------------------------------- memory


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / VmSize in bytes from /proc/self/status (empty off Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for key in ("VmRSS", "VmHWM", "VmSize"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = proc_status()
    return "VmHWM" in status and status["VmHWM"] <= status.get("VmRSS", 0) + 4 * 1024 * 1024


def maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class CpuMeter:
    """Peak RSS growth of this process from ``start()`` on (``VmHWM`` reset, else
    ``ru_maxrss``, which can only under-report)."""

    def __init__(self) -> None:
        self.method = "none"
        self.base = 0

    def start(self) -> None:
        gc.collect()
        status = proc_status()
        if reset_peak_rss():
            self.method = "VmHWM"
            self.base = proc_status()["VmRSS"]
        else:
            self.method = "ru_maxrss"
            self.base = max(maxrss_bytes(), status.get("VmRSS", 0))

    def peak(self) -> int:
        if self.method == "VmHWM":
            return max(proc_status()["VmHWM"] - self.base, 0)
        return max(maxrss_bytes() - self.base, 0)


class CudaMeter:
    """Peak CUDA memory allocated by this process from ``start()`` on."""

    method = "cuda.max_memory_allocated"

    def __init__(self, device: Any) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        return max(torch.cuda.max_memory_allocated(self.device) - self.base, 0)


# --------------------------------------------------------------------------- tiny models


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder, tied embeddings, as small as the benchmark wants."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq_len: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_llama(shape: ModelShape, *, seed: int) -> PreTrainedModel:
    """A freshly initialised ``LlamaForCausalLM``, seeded: every contender gets the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(shape.seq_len, 8),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token: every ``nn.Linear`` (lm_head included,
    even when tied, since the projection is computed) but not the embedding lookup."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def random_tokens(n_blocks: int, seq_len: int, vocab: int, *, seed: int) -> torch.Tensor:
    """Uniform random token blocks (ids from 3 up: 0-2 are bos/eos/pad)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n_blocks, seq_len), generator=g)


# --------------------------------------------------------------------------- output


def fmt_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_ratio(r: float | None, *, bound: str = "") -> str:
    return "-" if r is None else f"{bound}{r:.2f}x"


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (reads well in a terminal and pastes into a README)."""
    body = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_floats(obj: Any) -> Any:
    """NaN/inf become None so the JSON is strict (``json.dumps`` would write ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_floats(v) for v in obj]
    return obj


Printer = Callable[[str], None]


# --------------------------------------------------------------------------- targets summary


@dataclass(frozen=True)
class Target:
    """One goal a benchmark checks, with the figure measured for it.

    Every benchmark module has ``targets_of(section) -> list[Target]``; ``python -m bench``
    gathers them into one Markdown summary (``render_summary``), so a reader sees at a glance
    which goals are met and by how much. ``met`` is ``None`` when the goal could not be
    measured in this run (no GPU, a contender missing, ``--quick`` sizes); ``figure`` then
    says why.
    """

    benchmark: str  # the section: "loss", "cache", "throughput", ...
    goal: str  # what is wanted, with its threshold: "logits path peak <= 0.10x plain at 128k x 4k"
    figure: str  # what was measured, ready to read: "0.06x (0.98 GiB vs 16.4 GiB)"
    met: bool | None
    issue: int | None = None  # the issue that set the goal

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "goal": self.goal,
            "figure": self.figure,
            "met": self.met,
            "issue": self.issue,
        }


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


@dataclass(frozen=True)
class Figure:
    """A headline figure a benchmark reports without a goal (MFU, scaling efficiency...):
    ``figures_of(section) -> list[Figure]`` in a module puts it under the targets."""

    benchmark: str
    what: str
    figure: str

    def as_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "what": self.what, "figure": self.figure}


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def render_summary(
    targets: Sequence[Target],
    figures: Sequence[Figure] = (),
    *,
    title: str = "Foundry benchmarks",
    notes: Sequence[str] = (),
) -> str:
    """One Markdown page: every target with its figure and verdict, counts on top, then the
    figures that have no goal, then ``notes`` (the run's machine and load, sections that
    failed)."""
    met = sum(t.met is True for t in targets)
    missed = sum(t.met is False for t in targets)
    unknown = sum(t.met is None for t in targets)
    lines = [
        f"# {title}",
        "",
        f"{len(targets)} target{'' if len(targets) == 1 else 's'}: {met} met, {missed} missed, "
        f"{unknown} not measured.",
        "",
        "| benchmark | goal | figure | verdict |",
        "|---|---|---|---|",
    ]
    for t in targets:
        goal = t.goal if t.issue is None else f"{t.goal} (issue {t.issue})"
        lines.append(_row([t.benchmark, goal, t.figure, verdict(t.met)]))
    if figures:
        lines += ["", "## Figures without a goal", "", "| benchmark | what | figure |"]
        lines.append("|---|---|---|")
        lines += [_row([f.benchmark, f.what, f.figure]) for f in figures]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
