"""Model FLOPs utilisation: achieved FLOP/s of our training step against this machine's
measured matmul peak.

Peak: the best of several ``a @ b`` on square ``n x n`` matrices (n = 4096; 256 with
``--quick``), fp32 and bf16, with the benchmark's thread count: what this CPU (or GPU) can do
on the one operation that dominates a transformer, measured rather than taken from a
datasheet.

Model FLOPs per step (the usual convention, Kaplan et al. / PaLM appendix B):

* ``N_mm`` = weights that take part in a matmul per token: every ``nn.Linear`` (q, k, v, o,
  gate, up, down, and the lm_head even when it is tied to the embedding, since the
  projection is computed); the embedding lookup is free.
* forward = ``2 N_mm`` per token + attention scores and values ``2 * 2 * T * d_model`` per
  token per layer (``T`` = sequence length, full ``T x T`` counted, as PaLM does, although
  the causal mask makes half of it zero); backward = 2 x forward.
* student training step: ``6 N_mm D + 12 L d T D`` (``D`` = tokens per step).
* teacher (forward only, in a distillation step): ``2 N_mm D + 4 L d T D``.
* not counted: norms, activations, softmax, the loss, the optimizer (all O(N) or O(D V),
  small against O(N D) here).

Two steps of our ``Trainer`` are timed (median, warm-up dropped): the student step alone
(cross-entropy, no teacher: the "student step" of the issue) and the full distillation
step (student + teacher forward + chunked KD loss). MFU is against the fp32 peak, because
the tiny models train in fp32 (``precision=auto`` picks bf16 only from hidden 256 up); the
bf16 peak is shown for what mixed precision could reach. Everything runs on a worker
thread, like the other benchmarks (see ``bench.common.in_worker_thread``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import (
    Figure,
    ModelShape,
    Printer,
    in_worker_thread,
    matmul_params,
    median,
    ratio,
    table,
)
from bench.throughput import StepClock, StepConfig, config_for, make_workload, run_foundry

# A distillation step that loads a GPU: Llama-shaped, vocabulary 32k, 8 x 1024 tokens.
GPU = StepConfig(
    teacher=ModelShape(
        hidden=2048, layers=8, heads=16, intermediate=5632, vocab=32768, seq_len=1024
    ),
    student=ModelShape(
        hidden=1024, layers=8, heads=16, intermediate=2816, vocab=32768, seq_len=1024
    ),
    batch=8,
    warmup=3,
    steps=10,
    rounds=1,
)
GPU_GEMM_N = 8192


def gemm_peak(dtype: torch.dtype, n: int, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` (None when the dtype is unsupported)."""
    dev = torch.device(device)
    try:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        a @ b  # warm-up: thread pool, kernel selection, packing buffers
    except (RuntimeError, TypeError) as exc:
        return {"dtype": str(dtype), "n": n, "flops_per_s": None, "note": str(exc)[:200]}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "best_s": best,
        "median_s": median(times),
        "flops_per_s": 2 * n**3 / best,
        "median_flops_per_s": 2 * n**3 / median(times),
    }


def step_flops(
    shape: ModelShape, model: torch.nn.Module, tokens: int, *, train: bool
) -> dict[str, Any]:
    """Model FLOPs of one step over ``tokens`` tokens (see the module docstring)."""
    n_mm = matmul_params(model)
    attn_fwd = 4 * shape.layers * shape.hidden * shape.seq_len * tokens
    mult = 3 if train else 1
    return {
        "matmul_params": n_mm,
        "dense_flops": mult * 2 * n_mm * tokens,
        "attention_flops": mult * attn_fwd,
        "total": mult * (2 * n_mm * tokens + attn_fwd),
    }


def _config(quick: bool, cuda: bool, steps: int | None, warmup: int | None) -> StepConfig:
    """The tiny CPU workload, or :data:`GPU` on CUDA (``--quick`` keeps the tiny one)."""
    if cuda and not quick:
        base = GPU
        return StepConfig(
            teacher=base.teacher,
            student=base.student,
            batch=base.batch,
            warmup=warmup or base.warmup,
            steps=steps or base.steps,
            rounds=1,
        )
    return config_for(
        quick,
        steps=steps or (None if quick else 6),
        warmup=warmup or (None if quick else 2),
        rounds=1,
    )


def _step_entry(
    flops: dict[str, Any],
    total: float,
    times: list[float],
    tokens: int,
    peaks: dict[str, Any],
    dtype: str,
) -> dict[str, Any]:
    """One timed step: FLOP/s, tokens/s and MFU against the fp32, bf16 and own-dtype peaks."""
    t = median(times)
    rate = total / t
    return {
        "flops": flops,
        "step_s": t,
        "n": len(times),
        "precision": dtype,
        "tokens_per_s": tokens / t,
        "flops_per_s": rate,
        "mfu_fp32": ratio(rate, peaks["float32"]["flops_per_s"]),
        "mfu_bf16": ratio(rate, peaks["bfloat16"]["flops_per_s"]),
        "mfu": ratio(rate, peaks[dtype]["flops_per_s"]),
    }


def run(
    *,
    quick: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
    gemm_n: int | None = None,
    device: str = "cpu",
    printer: Printer = print,
) -> dict[str, Any]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("mfu --device cuda: torch sees no CUDA device here")
    cfg = _config(quick, cuda, steps, warmup)
    n = gemm_n or (256 if quick else GPU_GEMM_N if cuda else 4096)
    amp = torch.bfloat16 if cuda else None
    dtype = "bfloat16" if cuda else "float32"
    printer(f"mfu: matmul peak at n={n} on {device}, then our student and distillation step")
    peaks = {
        "float32": in_worker_thread(gemm_peak, torch.float32, n, device=device),
        "bfloat16": in_worker_thread(gemm_peak, torch.bfloat16, n, device=device),
    }
    w = make_workload(cfg)
    student, teacher = w.student(), w.teacher()
    d = cfg.tokens_per_step
    s_flops = step_flops(cfg.student, student, d, train=True)
    t_flops = step_flops(cfg.teacher, teacher, d, train=False)
    del student, teacher
    ce_clock, kd_clock = StepClock("student"), StepClock("distill")
    kw: dict[str, Any] = {"device": device, "amp_dtype": amp}
    in_worker_thread(run_foundry, w, ce_clock, distill=False, **kw)
    in_worker_thread(run_foundry, w, kd_clock, **kw)
    ce, kd = ce_clock.durations[cfg.warmup :], kd_clock.durations[cfg.warmup :]
    distill_flops = {"student": s_flops, "teacher_forward": t_flops}
    extra: dict[str, Any] = {}
    if cuda:
        extra["gpu"] = torch.cuda.get_device_name(dev)
        extra["max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)
    return {
        "config": {
            **cfg.to_dict(),
            "dtype": dtype,
            "device": device,
            "gemm_n": n,
            "threads": torch.get_num_threads(),
            **extra,
        },
        "peak": peaks,
        "student_step": _step_entry(s_flops, s_flops["total"], ce, d, peaks, dtype),
        "distill_step": _step_entry(
            distill_flops, s_flops["total"] + t_flops["total"], kd, d, peaks, dtype
        ),
    }


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _tok(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} tok/s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(section: dict[str, Any]) -> str:
    p = section["peak"]
    rows = [
        [
            f"matmul peak fp32 (n={p['float32']['n']})",
            _g(p["float32"]["flops_per_s"]),
            "-",
            "-",
            "-",
            "-",
        ],
        [
            f"matmul peak bf16 (n={p['bfloat16']['n']})",
            _g(p["bfloat16"]["flops_per_s"]),
            "-",
            "-",
            "-",
            "-",
        ],
    ]
    for key, label in (
        ("student_step", "student step (CE, ours)"),
        ("distill_step", "distillation step (ours)"),
    ):
        s = section[key]
        label = f"{label}, {s.get('precision', 'float32')}"
        flops = (
            s["flops"]["total"]
            if key == "student_step"
            else (s["flops"]["student"]["total"] + s["flops"]["teacher_forward"]["total"])
        )
        rows.append(
            [
                label,
                _g(s["flops_per_s"]),
                _tok(s.get("tokens_per_s")),
                f"{flops / 1e9:.1f} GFLOP in {s['step_s'] * 1000:.0f} ms",
                _pct(s["mfu_fp32"]),
                _pct(s["mfu_bf16"]),
            ]
        )
    headers = ["what", "FLOP/s", "tokens/s", "model FLOPs / step", "MFU vs fp32 peak"]
    return table([*headers, "vs bf16 peak"], rows)


def figures_of(section: dict[str, Any]) -> list[Figure]:
    """MFU has no goal: it says how close to the machine's matmul peak the loop runs."""
    device = section["config"].get("device", "cpu")
    out = []
    for key, label in (("student_step", "student step"), ("distill_step", "distillation step")):
        s = section[key]
        mfu = s["mfu_bf16"] if device == "cuda" else s["mfu_fp32"]
        peak = "bf16" if device == "cuda" else "fp32"
        out.append(
            Figure(
                "mfu",
                f"{label} MFU on {device} (vs the measured {peak} matmul peak)",
                f"{_pct(mfu)} ({_g(s['flops_per_s'])}, {_tok(s.get('tokens_per_s'))})",
            )
        )
    return out


__all__: Sequence[str] = ("GPU", "figures_of", "gemm_peak", "render", "run", "step_flops")
