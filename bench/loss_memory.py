"""Loss memory and time: forward+backward of the distillation loss alone, each contender in a
fresh process.

Two scenarios, because what a loss function is handed decides what it can save:

``logits``  Every contender gets the same precomputed fp32 logits ``[tokens, vocab]`` of
            student and teacher, and all-valid labels. The student logits come out of an
            op, as a model's do: ``raw.add_(zero)`` with ``zero`` a 0-d leaf that
            requires grad, so they are a non-leaf owning their storage and their gradient
            flows on to ``zero`` (a cheap sum) rather than being kept as a
            ``[tokens, vocab]`` ``.grad``. A contender's own gradient buffer is therefore
            what its memory shows: plain autograd's intermediates, ours' copy buffer
            (``*_copy``), or nothing extra when ours writes it over the logits (the engine's
            ``inplace=True``, what the Trainer's logits strategy does by default).
``sparse``  The student logits as above and the teacher's top-k (k = 128) log-probabilities
            (``SparseTargets``, what vLLM or the logit cache give); plain PyTorch computes
            the same k + 1 atom loss (top-k and a tail bucket) with autograd over the full
            ``log_softmax``.
``hidden``  Every contender gets final hidden states ``[tokens, hidden]`` and the lm_head
            weights ``[vocab, hidden]`` of student (both ``requires_grad``) and teacher, and
            must do the projection itself: the plain contender computes full logits with
            ``h @ W.T`` (teacher's under ``no_grad``), the fused ones chunk by chunk.

Memory is the peak resident-set growth of the process over the moment its inputs were
allocated and touched (after a tiny warm-up call of the same contender, so one-time lazy
initialisation is not counted): ``/proc/self/clear_refs`` resets the kernel's high-water
mark (``VmHWM``) right before the call, and ``VmHWM - VmRSS(before)`` is the peak. Where
that reset is unavailable, ``ru_maxrss`` is used (it can only under-report: its baseline
may already be a higher earlier peak). On CUDA it is ``torch.cuda.max_memory_allocated``
growth. Each contender runs in its own process (``python -m bench.loss_memory --one``), so
no allocator state carries over from another.

Out of memory is a result: a child's address space is capped (``RLIMIT_AS``) so that the
process cannot grow past ``cap`` bytes of RSS in total (inputs included), and the parent
kills a child whose RSS passes the cap anyway. An allocation failure is reported as ``oom``
with the peak reached so far (a lower bound of what it needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    CudaMeter,
    GiB,
    Printer,
    Target,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    median,
    proc_status,
    ratio,
    table,
)

RESULT_MARK = "BENCH_RESULT "
VOCABS = (32000, 128256)
TOKENS = (1024, 2048, 4096, 8192)
QUICK_VOCABS = (2048,)
QUICK_TOKENS = (128,)
DEFAULT_HIDDEN = 256
QUICK_HIDDEN = 32
DEFAULT_CAP = 16 * GiB
TARGET_POINT = (128256, 4096)
SLAB_BUDGET = 32 * 1024**2
SPARSE_K = 128
LOGITS_PEAK_GOAL = 0.10  # issue 14: in-place logits path <= 0.10x plain PyTorch's peak
TIME_GOAL = 1.10  # issue 14: the in-place path within 1.1x the copy path's (today's) time
# Our logits-path contenders per divergence: name stem -> (LossSpec keywords, label).
DIVERGENCES: dict[str, tuple[dict[str, Any], str]] = {
    "kl": ({"kind": "forward_kl"}, "KL"),
    "rkl": ({"kind": "reverse_kl"}, "reverse KL"),
    "jsd": ({"kind": "jsd", "beta": 0.5}, "JSD b=0.5"),
    "skew_fkl": ({"kind": "skew_forward_kl", "skew_alpha": 0.1}, "skew forward KL a=0.1"),
    "skew_rkl": ({"kind": "skew_reverse_kl", "skew_alpha": 0.1}, "skew reverse KL a=0.1"),
    "tvd": ({"kind": "tvd"}, "TVD"),
}


@dataclass(frozen=True)
class Contender:
    name: str
    scenario: str  # "logits" | "sparse" | "hidden"
    label: str
    includes: str
    baseline: bool = False
    family: str = "ours"  # ours | plain | trl | liger


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "plain_kl",
        "logits",
        "plain PyTorch KL",
        "log_softmax of both logits, F.kl_div(log_target=True, batchmean): forward KL, autograd",
        baseline=True,
        family="plain",
    ),
    Contender(
        "trl_gjsd",
        "logits",
        "TRL generalized_jsd_loss b=0.5",
        "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(beta=0.5) on the full logits, "
        "autograd",
        family="trl",
    ),
    Contender(
        "liger_jsd",
        "logits",
        "Liger JSD b=0.5",
        "liger_kernel LigerJSD(beta=0.5) on log_softmax of the full logits (Triton kernel)",
        family="liger",
    ),
    *(
        Contender(
            f"ours_{stem}{suffix}",
            "logits",
            f"ours distillation_loss {label}{' (copy)' if suffix else ''}",
            f"foundry distillation_loss({', '.join(f'{k}={v}' for k, v in kw.items())}), "
            "default chunk_tokens, analytic gradient made in forward "
            + (
                "and kept in a [tokens, vocab] buffer of its own (inplace=False: today's "
                "path, the public functions' default)"
                if suffix
                else "and written over the student logits (inplace=True: the Trainer's "
                "logits strategy by default, loss.logits_grad=inplace)"
            ),
        )
        for stem, (kw, label) in DIVERGENCES.items()
        for suffix in ("", "_copy")
    ),
    Contender(
        "ours_kl_budget",
        "logits",
        "ours distillation_loss KL in place, 32 MiB chunks",
        "as ours_kl with chunk_tokens sized so one fp32 [chunk, vocab] slab is 32 MiB "
        "(65 rows at 128k, 262 at 32k); the engine caps chunks so by itself (chunk_rows)",
    ),
    Contender(
        "plain_sparse_kl",
        "sparse",
        "plain PyTorch sparse KL (top-k + tail)",
        f"log_softmax of the student logits, gathered at the teacher's top-{SPARSE_K} ids plus "
        "a log(1 - sum) tail atom, forward KL against the teacher's k + 1 atoms, autograd",
        baseline=True,
        family="plain",
    ),
    Contender(
        "ours_sparse_kl",
        "sparse",
        "ours sparse_distillation_loss KL in place",
        f"foundry sparse_distillation_loss(kind=forward_kl, mass=tail, k={SPARSE_K}), "
        "gradient written over the student logits (inplace=True)",
    ),
    Contender(
        "ours_sparse_kl_copy",
        "sparse",
        "ours sparse_distillation_loss KL (copy)",
        "as ours_sparse_kl with inplace=False: the gradient in a buffer of its own",
    ),
    Contender(
        "plain_kl_proj",
        "hidden",
        "plain PyTorch KL + projection",
        "h @ W.T for the student (autograd) and the teacher (no_grad), then plain_kl",
        baseline=True,
        family="plain",
    ),
    Contender(
        "trl_chunked",
        "hidden",
        "TRL DistillationTrainer chunked b=0",
        "trl.trainer.distillation_trainer._chunked_divergence_loss(beta=0: forward KL): "
        "4096x32768 tiles, projections recomputed in backward",
        family="trl",
    ),
    Contender(
        "liger_fused_jsd",
        "hidden",
        "Liger FusedLinearJSD b=0",
        "liger_kernel LigerFusedLinearJSD(jsd_beta=0: forward KL), chunked projection + JSD "
        "(Triton kernel)",
        family="liger",
    ),
    Contender(
        "ours_fused_kl",
        "hidden",
        "ours fused_linear KL",
        "foundry fused_linear_distillation_loss(kind=forward_kl), student and teacher "
        "projected chunk by chunk, the engine's default loss.chunk_tokens",
    ),
    Contender(
        "ours_fused_kl_budget",
        "hidden",
        "ours fused_linear KL, 32 MiB chunks",
        "as ours_fused_kl with chunk_tokens sized so one fp32 [chunk, vocab] slab is 32 MiB",
    ),
)
BY_NAME = {c.name: c for c in CONTENDERS}


# =========================================================================== child side


def _cap_address_space(cap: int) -> int | None:
    """Limit further growth so that RSS cannot exceed ``cap``; returns the allowed growth."""
    import resource

    status = proc_status()
    if "VmSize" not in status:
        return None
    allowed = cap - status["VmRSS"]
    if allowed <= 0:
        return allowed
    limit = status["VmSize"] + allowed
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return allowed


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or any(
        s in text
        for s in (
            "can't allocate memory",
            "cannot allocate memory",
            "out of memory",
            "not enough memory",
        )
    )


def _is_unavailable(exc: BaseException, family: str) -> bool:
    """Liger's Triton kernels have no CPU driver: that is "not available here", not a bug."""
    if isinstance(exc, ImportError):
        return True
    text = str(exc).lower()
    return family == "liger" and (
        "active drivers" in text or "triton" in text or "cuda" in text or "driver" in text
    )


def _make_inputs(
    contender: Contender, vocab: int, tokens: int, hidden: int, device: Any, seed: int
) -> dict[str, Any]:
    """Allocate and touch the inputs in place (no temporaries that would inflate the baseline)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    torch.manual_seed(seed)
    if contender.scenario in ("logits", "sparse"):
        # The logits are made by an op (as a model's are): a non-leaf over its own storage,
        # whose gradient flows on to a 0-d leaf. add_ in place: no second [tokens, vocab].
        sink = torch.zeros((), device=device, requires_grad=True)
        student = torch.empty(tokens, vocab, device=device).normal_(0.0, 2.0).add_(sink)
        if contender.scenario == "logits":
            teacher = torch.empty(tokens, vocab, device=device).normal_(0.0, 2.0)
            return {"student": student, "teacher": teacher, "labels": labels, "sink": sink}
        ids, logprobs = _sparse_teacher(tokens, vocab, device)
        return {
            "student": student[None],  # [1, tokens, vocab]: SparseTargets are [B, T, k]
            "ids": ids,
            "logprobs": logprobs,
            "labels": labels[None],
            "sink": sink,
        }
    scale = hidden**-0.5
    h_s = torch.empty(tokens, hidden, device=device).normal_().requires_grad_(True)
    w_s = torch.empty(vocab, hidden, device=device).normal_(0.0, 2.0 * scale)
    w_s.requires_grad_(True)
    h_t = torch.empty(tokens, hidden, device=device).normal_()
    w_t = torch.empty(vocab, hidden, device=device).normal_(0.0, 2.0 * scale)
    return {"h_s": h_s, "w_s": w_s, "h_t": h_t, "w_t": w_t, "labels": labels}


def _sparse_teacher(tokens: int, vocab: int, device: Any, rows: int = 256) -> tuple[Any, Any]:
    """A random teacher's top-``SPARSE_K`` ids and log-probabilities ``[1, tokens, k]``, made
    ``rows`` at a time so no ``[tokens, vocab]`` teacher tensor exists."""
    import torch

    k = min(SPARSE_K, vocab)
    ids = torch.empty(1, tokens, k, dtype=torch.long, device=device)
    logprobs = torch.empty(1, tokens, k, device=device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        t = torch.empty(stop - start, vocab, device=device).normal_(0.0, 2.0)
        values, top = t.log_softmax(-1).topk(k, dim=-1)
        ids[0, start:stop], logprobs[0, start:stop] = top, values
    return ids, logprobs


def budget_chunk(vocab: int, budget: int = SLAB_BUDGET) -> int:
    """Rows per chunk so that one fp32 ``[rows, vocab]`` slab takes ``budget`` bytes (16-1024)."""
    return max(16, min(1024, budget // (4 * vocab)))


def _loss_fn(name: str, vocab: int) -> Callable[[dict[str, Any]], Any]:
    """The contender as ``inputs -> scalar loss`` (imports only what it needs)."""
    import torch
    import torch.nn.functional as F

    def plain_kl(s: Any, t: Any) -> Any:
        log_q = F.log_softmax(s, dim=-1)
        log_p = F.log_softmax(t, dim=-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

    if name == "plain_kl":
        return lambda x: plain_kl(x["student"], x["teacher"])
    if name == "plain_sparse_kl":

        def plain_sparse(x: dict[str, Any]) -> Any:
            log_q_all = F.log_softmax(x["student"], dim=-1)
            log_q = log_q_all.gather(-1, x["ids"])
            log_p = x["logprobs"]
            # k + 1 atoms: the top-k and the rest of the vocabulary (floored like the cache)
            q_tail = torch.log1p(-log_q.exp().sum(-1).clamp(max=1.0 - 1e-7))
            p_tail = torch.log1p(-log_p.exp().sum(-1).clamp(max=1.0 - 1e-7))
            lq = torch.cat([log_q, q_tail.unsqueeze(-1)], dim=-1)
            lp = torch.cat([log_p, p_tail.unsqueeze(-1)], dim=-1)
            return (lp.exp() * (lp - lq)).sum(-1).mean()

        return plain_sparse
    if name == "plain_kl_proj":

        def proj(x: dict[str, Any]) -> Any:
            s = x["h_s"] @ x["w_s"].T
            with torch.no_grad():
                t = x["h_t"] @ x["w_t"].T
            return plain_kl(s, t)

        return proj
    if name == "trl_gjsd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        return lambda x: GKDTrainer.generalized_jsd_loss(
            x["student"], x["teacher"], labels=x["labels"], beta=0.5
        )
    if name == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def trl_chunked(x: dict[str, Any]) -> Any:
            mask = torch.ones(1, x["h_s"].shape[0], dtype=torch.long, device=x["h_s"].device)
            loss, _, _ = _chunked_divergence_loss(
                x["h_s"][None], x["h_t"][None], x["w_s"], x["w_t"], mask, beta=0.0
            )
            return loss

        return trl_chunked
    if name == "liger_jsd":
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=0.5)
        return lambda x: jsd(
            F.log_softmax(x["student"], dim=-1), F.log_softmax(x["teacher"], dim=-1)
        )
    if name == "liger_fused_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        fljsd = LigerFusedLinearJSD(jsd_beta=0.0)
        return lambda x: fljsd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"])

    from foundry_kernel.teachers._targets import SparseTargets
    from foundry_kernel.training._losses import (
        LossSpec,
        distillation_loss,
        fused_linear_distillation_loss,
        sparse_distillation_loss,
    )

    chunk = budget_chunk(vocab) if name.endswith("_budget") else LossSpec.chunk_tokens
    inplace = not name.endswith("_copy")
    if name.startswith("ours_fused"):
        spec = LossSpec(kind="forward_kl", chunk_tokens=chunk)
        return lambda x: (
            fused_linear_distillation_loss(
                x["h_s"], x["w_s"], x["h_t"], x["labels"], spec, teacher_weight=x["w_t"]
            ).total
        )
    if name.startswith("ours_sparse"):
        spec = LossSpec(kind="forward_kl", chunk_tokens=chunk)
        return lambda x: _checked(
            sparse_distillation_loss(
                x["student"],
                SparseTargets(x["ids"], x["logprobs"]),
                x["labels"],
                spec,
                inplace=inplace,
            ),
            inplace,
        )
    stem = name.removeprefix("ours_").removesuffix("_copy").removesuffix("_budget")
    if name.startswith("ours_") and stem in DIVERGENCES:
        spec = LossSpec(**DIVERGENCES[stem][0], chunk_tokens=chunk)
        return lambda x: _checked(
            distillation_loss(x["student"], x["teacher"], x["labels"], spec, inplace=inplace),
            inplace,
        )
    raise ValueError(f"unknown contender {name!r}")


def _checked(out: Any, inplace: bool) -> Any:
    """The loss's total, after making sure the engine took the path the contender names
    (an in-place contender that silently copied would measure the wrong thing)."""
    want = "inplace" if inplace else "copy"
    if out.logits_grad != want:
        raise RuntimeError(f"the loss took the {out.logits_grad!r} path, not {want!r}")
    return out.total


def _one_call(
    fn: Callable[[dict[str, Any]], Any], inputs: dict[str, Any], sync: Callable[[], None]
) -> tuple[float, float]:
    """One forward+backward: (seconds, loss value)."""
    for v in inputs.values():
        if getattr(v, "requires_grad", False) and v.is_leaf:
            v.grad = None
    sync()
    t0 = time.perf_counter()
    loss = fn(inputs)
    loss.backward()
    sync()
    elapsed = time.perf_counter() - t0
    value = float(loss.detach())
    del loss
    return elapsed, value


def run_one(
    name: str,
    *,
    vocab: int,
    tokens: int,
    hidden: int,
    cap: int,
    repeats: int,
    threads: int | None,
    device: str = "cpu",
    seed: int = 0,
    long_call_s: float = 2.0,
) -> dict[str, Any]:
    """Measure one contender at one point, in this process (the child's body)."""
    contender = BY_NAME[name]
    out: dict[str, Any] = {"contender": name, "vocab": vocab, "tokens": tokens, "status": "ok"}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return {**out, "status": "na", "note": "no CUDA device"}
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        fn = _loss_fn(name, vocab)
        # Warm-up at a tiny size: lazy initialisation (thread pools, kernels) is not the loss's.
        warm = _make_inputs(contender, vocab, 8, hidden, dev, seed + 1)
        _one_call(fn, warm, sync)
        del warm
    except Exception as exc:  # noqa: BLE001 - reported as a result
        status = "na" if _is_unavailable(exc, contender.family) else "error"
        if _is_oom(exc):
            status = "oom"
        return {**out, "status": status, "note": f"{type(exc).__name__}: {str(exc)[:300]}"}

    meter: CpuMeter | CudaMeter
    try:
        inputs = _make_inputs(contender, vocab, tokens, hidden, dev, seed)
    except Exception as exc:  # noqa: BLE001
        return {**out, "status": "oom" if _is_oom(exc) else "error", "note": f"inputs: {exc}"}
    out["input_bytes"] = sum(
        v.numel() * v.element_size() for v in inputs.values() if hasattr(v, "numel")
    )
    if dev.type == "cuda":
        meter = CudaMeter(dev)
    else:
        meter = CpuMeter()
        allowed = _cap_address_space(cap) if cap > 0 else None
        out["allowed_growth_bytes"] = allowed
        if allowed is not None and allowed <= 0:
            return {**out, "status": "oom", "note": "the inputs alone exceed the memory cap"}
    meter.start()
    out["baseline_bytes"] = meter.base
    out["method"] = meter.method
    times: list[float] = []
    try:
        for _ in range(max(repeats, 1)):
            elapsed, value = _one_call(fn, inputs, sync)
            times.append(elapsed)
            out.setdefault("loss", value)  # the first call's (a consuming loss changes its input)
            if elapsed > long_call_s:
                break  # long calls: one is a stable measurement, more only costs time
    except Exception as exc:  # noqa: BLE001
        out["status"] = "oom" if _is_oom(exc) else "error"
        out["note"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if out["status"] == "error":
            out["traceback"] = traceback.format_exc()[-2000:]
    out["peak_bytes"] = meter.peak()
    out["times_s"] = times
    out["time_s"] = median(times) if times else None
    return out


# =========================================================================== parent side


def _child_command(name: str, vocab: int, tokens: int, args: dict[str, Any]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "bench.loss_memory",
        "--one",
        name,
        "--vocab",
        str(vocab),
        "--tokens",
        str(tokens),
        "--hidden",
        str(args["hidden"]),
        "--cap-bytes",
        str(args["cap"]),
        "--repeats",
        str(args["repeats"]),
        "--device",
        args["device"],
    ]
    if args.get("threads"):
        cmd += ["--threads", str(args["threads"])]
    return cmd


def _watch(cmd: list[str], cap: int, timeout: float, cwd: Path) -> dict[str, Any]:
    """Run a child; kill it if its RSS passes the cap or it runs past ``timeout``."""
    import psutil

    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        started = time.monotonic()
        killed = None
        peak_seen = 0
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss if ps is not None else 0
            except psutil.Error:
                rss = 0
            peak_seen = max(peak_seen, rss)
            if cap > 0 and rss > cap + 512 * 1024**2:
                killed = f"killed: RSS {fmt_bytes(rss)} passed the cap {fmt_bytes(cap)}"
            elif time.monotonic() - started > timeout:
                killed = f"killed: ran past {timeout:.0f} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.02)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            result["wall_s"] = round(wall, 2)
            return result
    status = "timeout" if killed and "past" in killed else "oom" if killed else "error"
    if proc.returncode is not None and proc.returncode < 0 and not killed:
        status = "oom" if proc.returncode == -9 else "error"  # SIGKILL: the kernel's OOM killer
        killed = f"child died with signal {-proc.returncode}"
    return {
        "status": status,
        "note": killed or f"child exited {proc.returncode}: {stderr.strip()[-500:]}",
        "peak_rss_seen_bytes": peak_seen,
        "wall_s": round(wall, 2),
    }


def run_grid(
    *,
    vocabs: Sequence[int],
    tokens: Sequence[int],
    contenders: Sequence[str],
    hidden: int,
    cap: int,
    repeats: int,
    threads: int | None,
    device: str = "cpu",
    timeout: float = 900.0,
    jobs: int = 1,
    printer: Printer | None = None,
) -> list[dict[str, Any]]:
    """Every contender at every point, each in a fresh process; ratios against the plain one.

    A contender that ran out of memory at a point is not run at larger token counts of the
    same vocabulary (reported as ``oom``, skipped); Liger, when not available here (no CUDA
    driver for its Triton kernels), is tried once and reported ``na`` everywhere.
    ``jobs > 1`` runs the contenders of one point side by side: memory stays exact (each
    child measures itself), times do not, so only ``--quick`` uses it.
    """
    root = Path(__file__).resolve().parent.parent
    args = {"hidden": hidden, "cap": cap, "repeats": repeats, "threads": threads, "device": device}
    results: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}  # family -> why (Liger: both contenders share the reason)
    oom_at: dict[tuple[str, int], int] = {}
    for vocab in vocabs:
        for n in sorted(tokens):
            rows: list[dict[str, Any]] = []
            todo: list[tuple[dict[str, Any], list[str]]] = []
            for name in contenders:
                c = BY_NAME[name]
                row: dict[str, Any] = {
                    "scenario": c.scenario,
                    "vocab": vocab,
                    "tokens": n,
                    "hidden": hidden if c.scenario == "hidden" else None,
                    "contender": name,
                    "label": c.label,
                    "family": c.family,
                    "baseline": c.baseline,
                }
                rows.append(row)
                if c.family in unavailable:
                    row.update(status="na", note=unavailable[c.family])
                elif (name, vocab) in oom_at:
                    row.update(
                        status="oom",
                        skipped=True,
                        note=f"not run: out of memory already at {oom_at[(name, vocab)]} tokens",
                    )
                else:
                    todo.append((row, _child_command(name, vocab, n, args)))
            for row, got in _run_children(todo, cap, timeout, root, jobs):
                got.pop("contender", None)
                row.update(got)
                if row["status"] == "na" and row["family"] == "liger":
                    unavailable["liger"] = row.get("note", "not available")
                if row["status"] in ("oom", "timeout"):
                    oom_at[(row["contender"], vocab)] = n
            for row in rows:
                if (
                    row["family"] == "liger"
                    and row.get("status") is None
                    and "liger" in unavailable
                ):
                    row.update(status="na", note=unavailable["liger"])
                results.append(row)
                if printer is not None:
                    printer(_progress_line(row))
    _add_ratios(results)
    return results


def _run_children(
    todo: list[tuple[dict[str, Any], list[str]]], cap: int, timeout: float, root: Path, jobs: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Run the children of one point; Liger's first (its failure makes its twin moot)."""
    todo = sorted(todo, key=lambda rc: rc[0]["family"] != "liger")
    if jobs <= 1:
        out = []
        liger_na = False
        for row, cmd in todo:
            if liger_na and row["family"] == "liger":
                continue  # filled in by the caller from the first one's reason
            got = _watch(cmd, cap, timeout, root)
            liger_na = liger_na or (row["family"] == "liger" and got.get("status") == "na")
            out.append((row, got))
        return out
    from concurrent.futures import ThreadPoolExecutor

    liger = [rc for rc in todo if rc[0]["family"] == "liger"]
    rest = [rc for rc in todo if rc[0]["family"] != "liger"]
    first = liger[:1]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(row, pool.submit(_watch, cmd, cap, timeout, root)) for row, cmd in first + rest]
        done = [(row, f.result()) for row, f in futures]
        if first and done[0][1].get("status") != "na":  # Liger runs here: measure its twin too
            done += [(row, _watch(cmd, cap, timeout, root)) for row, cmd in liger[1:]]
    return done


def _progress_line(row: dict[str, Any]) -> str:
    what = f"{row['scenario']:6s} V={row['vocab']:<6d} N={row['tokens']:<5d} {row['contender']:18s}"
    if row["status"] == "ok":
        return (
            f"  {what} {fmt_bytes(row.get('peak_bytes')):>10s} {fmt_seconds(row.get('time_s')):>9s}"
        )
    return f"  {what} {row['status']}: {row.get('note', '')[:90]}"


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """mem/time ratio of each row against the plain contender of its scenario and point.

    A baseline that ran out of memory only gives a lower bound on its peak, so ratios
    against it are upper bounds (``mem_bound='<='``); a contender that ran out of memory has
    a lower-bound peak (``'>='``).
    """
    base = {(r["scenario"], r["vocab"], r["tokens"]): r for r in results if r.get("baseline")}
    for r in results:
        b = base.get((r["scenario"], r["vocab"], r["tokens"]))
        r["mem_vs_plain"] = r["time_vs_plain"] = None
        r["mem_bound"] = ""
        if b is None or r is b or r.get("skipped") or r["status"] not in ("ok", "oom"):
            continue
        if b["status"] not in ("ok", "oom") or b.get("skipped"):
            continue
        r["mem_vs_plain"] = ratio(r.get("peak_bytes"), b.get("peak_bytes"))
        if r["status"] == "ok" and b["status"] == "ok":
            r["time_vs_plain"] = ratio(r.get("time_s"), b.get("time_s"))
        r["mem_bound"] = {("ok", "ok"): "", ("ok", "oom"): "<=", ("oom", "ok"): ">="}.get(
            (r["status"], b["status"]), "?"
        )
        if r["mem_bound"] == "?":
            r["mem_vs_plain"] = None
            r["mem_bound"] = ""


def _row(
    results: list[dict[str, Any]], scenario: str, name: str, point: tuple[int, int]
) -> dict[str, Any] | None:
    for r in results:
        if (
            r["scenario"] == scenario
            and r["contender"] == name
            and (r["vocab"], r["tokens"]) == point
        ):
            return r
    return None


def targets(
    results: list[dict[str, Any]], point: tuple[int, int] = TARGET_POINT
) -> list[dict[str, Any]]:
    """Issue 6's memory target at ``point``: ours <= 1/5 of plain and <= Liger's, per scenario,
    for the engine's default, its copy path, and an explicit 32 MiB ``loss.chunk_tokens``."""
    out = []
    chunk = budget_chunk(point[0])
    how = {
        "ours_kl": "engine, gradient in place (the Trainer's logits default)",
        "ours_kl_copy": "engine, gradient copied (inplace=False)",
        "ours_kl_budget": f"engine in place with loss.chunk_tokens={chunk}",
        "ours_fused_kl": "engine default (loss.chunk_tokens=256)",
        "ours_fused_kl_budget": f"engine with loss.chunk_tokens={chunk}",
    }
    for scenario, ours_names, plain, liger in (
        ("logits", ("ours_kl", "ours_kl_copy", "ours_kl_budget"), "plain_kl", "liger_jsd"),
        ("hidden", ("ours_fused_kl", "ours_fused_kl_budget"), "plain_kl_proj", "liger_fused_jsd"),
    ):
        p = _row(results, scenario, plain, point)
        li = _row(results, scenario, liger, point)
        for name in ours_names:
            o = _row(results, scenario, name, point)
            if o is None or p is None:
                continue
            entry: dict[str, Any] = {
                "scenario": scenario,
                "point": {"vocab": point[0], "tokens": point[1]},
                "ours": name,
                "how": how[name],
                "ours_peak_bytes": o.get("peak_bytes") if o["status"] == "ok" else None,
                "plain_peak_bytes": p.get("peak_bytes"),
                "plain_status": p["status"],
                "mem_vs_plain": o.get("mem_vs_plain"),
                "mem_bound": o.get("mem_bound", ""),
            }
            r = o.get("mem_vs_plain")
            if o["status"] != "ok" or r is None:
                entry["fifth_of_plain"] = "not measured"
            elif r <= 0.2:
                entry["fifth_of_plain"] = "met"
            elif o.get("mem_bound") == "<=":
                entry["fifth_of_plain"] = "unproven (plain ran out of memory under the cap)"
            else:
                entry["fifth_of_plain"] = "missed"
            if li is None or li["status"] != "ok":
                entry["vs_liger"] = "not measurable here" + (
                    f" (Liger: {li['status']}: {li.get('note', '')[:80]})" if li else ""
                )
            else:
                entry["liger_peak_bytes"] = li.get("peak_bytes")
                ok = o["status"] == "ok" and o.get("peak_bytes", 0) <= li.get("peak_bytes", 0)
                entry["vs_liger"] = "met" if ok else "missed"
            out.append(entry)
    return out


def _verdict(label: str) -> bool | None:
    return {"met": True, "missed": False}.get(label)


def _issue6_targets(entries: list[dict[str, Any]]) -> list[Target]:
    """Issue 6's goals, one Target each: <= 1/5 of plain's peak, and <= Liger's."""
    out = []
    for e in entries:
        if e["ours"].endswith("_copy"):
            continue  # the opt-out path: its figure is in the table, the goal is the default's
        at = (e["point"]["vocab"], e["point"]["tokens"])
        full = at == TARGET_POINT
        where = "" if full else f"not measured at 128256x4096 (this run: {at[0]}x{at[1]}): "
        plain = fmt_bytes(e.get("plain_peak_bytes")) + (
            "" if e["plain_status"] == "ok" else " (plain OOM: a lower bound)"
        )
        ratio_text = fmt_ratio(e.get("mem_vs_plain"), bound=e.get("mem_bound", ""))
        what = f"{e['scenario']} path, {e['ours']} ({e['how']})"
        out.append(
            Target(
                "loss",
                f"{what}: peak <= 1/5 of plain PyTorch's at 128k x 4k",
                f"{where}{ratio_text} ({fmt_bytes(e.get('ours_peak_bytes'))} vs {plain})"
                + ("" if e["fifth_of_plain"] in ("met", "missed") else f"; {e['fifth_of_plain']}"),
                _verdict(e["fifth_of_plain"]) if full else None,
                issue=6,
            )
        )
        liger = (
            f"{fmt_bytes(e.get('ours_peak_bytes'))} vs Liger {fmt_bytes(e['liger_peak_bytes'])}"
            if e.get("liger_peak_bytes") is not None
            else e["vs_liger"]
        )
        out.append(
            Target(
                "loss",
                f"{what}: peak <= Liger's at 128k x 4k",
                f"{where}{liger}",
                _verdict(e["vs_liger"]) if full else None,
                issue=6,
            )
        )
    return out


def _peak_target(
    results: list[dict[str, Any]], scenario: str, name: str, plain: str, what: str
) -> Target:
    """Issue 14: ``name``'s peak <= 0.10x of ``plain``'s at the target point."""
    goal = f"{what}: logits-path peak <= {LOGITS_PEAK_GOAL:.2f}x plain PyTorch at 128k x 4k"
    o = _row(results, scenario, name, TARGET_POINT)
    b = _row(results, scenario, plain, TARGET_POINT)
    if o is None or b is None:
        return Target(
            "loss", goal, f"not measured at 128256x4096 ({name} or {plain} not run)", None, issue=14
        )
    if o["status"] == "oom" and not o.get("skipped"):
        return Target("loss", goal, f"{name} ran out of memory under the cap", False, issue=14)
    r, bound = o.get("mem_vs_plain"), o.get("mem_bound", "")
    if o["status"] != "ok" or r is None:
        why = o.get("note") or b.get("note") or "no ratio"
        return Target(
            "loss", goal, f"not measured: {o['status']}/{b['status']}: {why[:120]}", None, issue=14
        )
    plain_text = fmt_bytes(b.get("peak_bytes")) + ("" if b["status"] == "ok" else " (OOM)")
    figure = f"{fmt_ratio(r, bound=bound)} ({fmt_bytes(o.get('peak_bytes'))} vs {plain_text})"
    if r <= LOGITS_PEAK_GOAL:
        return Target("loss", goal, figure, True, issue=14)  # "<=": an upper bound, still met
    if bound == "<=":
        return Target("loss", goal, figure + "; unproven: plain ran out of memory", None, issue=14)
    return Target("loss", goal, figure, False, issue=14)


def _time_target(results: list[dict[str, Any]], scenario: str, name: str, what: str) -> Target:
    """Issue 14: the in-place path's time within 1.1x of the copy path's (today's path)."""
    copy = f"{name}_copy"
    goal = f"{what}: in-place time <= {TIME_GOAL:.1f}x the copy path's (today's) at 128k x 4k"
    o = _row(results, scenario, name, TARGET_POINT)
    c = _row(results, scenario, copy, TARGET_POINT)
    if o is None or c is None:
        return Target(
            "loss", goal, f"not measured at 128256x4096 ({name} or {copy} not run)", None, issue=14
        )
    r = ratio(o.get("time_s"), c.get("time_s")) if o["status"] == c["status"] == "ok" else None
    if r is None:
        return Target("loss", goal, f"not measured: {o['status']}/{c['status']}", None, issue=14)
    figure = (
        f"{r:.2f}x ({fmt_seconds(o.get('time_s'))} in place vs {fmt_seconds(c.get('time_s'))} copy)"
    )
    return Target("loss", goal, figure, r <= TIME_GOAL, issue=14)


def targets_of(section: dict[str, Any]) -> list[Target]:
    """The loss benchmark's goals as Targets: issue 6's (from ``section["targets"]``) and
    issue 14's, per divergence and for the sparse top-k loss: the in-place logits path's
    peak <= 0.10x plain PyTorch's and its time <= 1.1x the copy path's, at 128k x 4k.
    ``met`` is None where the target point was not measured (``--quick``, a subset)."""
    results = section.get("results", [])
    out = _issue6_targets(section.get("targets", []))
    for stem, (_, label) in DIVERGENCES.items():
        out.append(_peak_target(results, "logits", f"ours_{stem}", "plain_kl", label))
    out.append(
        _peak_target(
            results, "sparse", "ours_sparse_kl", "plain_sparse_kl", f"sparse top-{SPARSE_K} KL"
        )
    )
    for stem, (_, label) in DIVERGENCES.items():
        out.append(_time_target(results, "logits", f"ours_{stem}", label))
    out.append(_time_target(results, "sparse", "ours_sparse_kl", f"sparse top-{SPARSE_K} KL"))
    return out


def render(results: list[dict[str, Any]]) -> str:
    headers = [
        "scenario",
        "vocab",
        "tokens",
        "contender",
        "peak mem",
        "time",
        "mem vs plain",
        "time vs plain",
        "loss",
    ]
    rows = []
    for r in results:
        status = r["status"]
        if status == "ok":
            mem, t = fmt_bytes(r.get("peak_bytes")), fmt_seconds(r.get("time_s"))
        elif status == "oom":
            mem = "OOM" if r.get("skipped") else f"OOM (>{fmt_bytes(r.get('peak_bytes'))})"
            t = "-"
        elif status == "na":
            mem, t = "n/a", "-"
        else:
            mem, t = status, "-"
        loss = r.get("loss")
        rows.append(
            [
                r["scenario"],
                r["vocab"],
                r["tokens"],
                r["contender"],
                mem,
                t,
                "base"
                if r.get("baseline")
                else fmt_ratio(r.get("mem_vs_plain"), bound=r.get("mem_bound", "")),
                "base" if r.get("baseline") else fmt_ratio(r.get("time_vs_plain")),
                "-" if loss is None or status != "ok" else f"{loss:.4f}",
            ]
        )
    return table(headers, rows)


def render_notes(results: list[dict[str, Any]]) -> str:
    """One line per contender that was not available or failed, saying why."""
    seen: dict[str, str] = {}
    for r in results:
        if r["status"] in ("na", "error", "timeout") and r["contender"] not in seen:
            seen[r["contender"]] = f"{r['status']}: {r.get('note', '')}"
    return "\n".join(f"- {k}: {v[:240]}" for k, v in seen.items())


def render_targets(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        rows.append(
            [
                e["scenario"],
                f"{e['point']['vocab']}x{e['point']['tokens']}",
                f"{e['ours']}: {e['how']}",
                fmt_bytes(e.get("ours_peak_bytes")),
                (
                    fmt_bytes(e.get("plain_peak_bytes"))
                    + ("" if e["plain_status"] == "ok" else " (OOM, lower bound)")
                ),
                fmt_ratio(e.get("mem_vs_plain"), bound=e.get("mem_bound", "")),
                e["fifth_of_plain"],
                e["vs_liger"],
            ]
        )
    return table(
        [
            "scenario",
            "point",
            "ours",
            "ours peak",
            "plain peak",
            "ratio",
            "<= 1/5 plain",
            "<= Liger",
        ],
        rows,
    )


def run(
    *,
    quick: bool = False,
    vocabs: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    contenders: Sequence[str] | None = None,
    hidden: int | None = None,
    cap: int = DEFAULT_CAP,
    repeats: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    jobs: int | None = None,
    printer: Printer = print,
) -> dict[str, Any]:
    """The loss benchmark; returns its JSON section."""
    vocabs = tuple(vocabs or (QUICK_VOCABS if quick else VOCABS))
    tokens = tuple(tokens or (QUICK_TOKENS if quick else TOKENS))
    hidden = hidden or (QUICK_HIDDEN if quick else DEFAULT_HIDDEN)
    names = tuple(contenders or (c.name for c in CONTENDERS))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown loss contenders {unknown}; known: {sorted(BY_NAME)}")
    repeats = repeats or (1 if quick else 3)
    printer(f"loss: {len(vocabs) * len(tokens) * len(names)} runs, each in a fresh process")
    results = run_grid(
        vocabs=vocabs,
        tokens=tokens,
        contenders=names,
        hidden=hidden,
        cap=cap,
        repeats=repeats,
        threads=threads,
        device=device,
        jobs=jobs or (4 if quick else 1),
        printer=printer,
    )
    point = TARGET_POINT if not quick else (vocabs[-1], tokens[-1])
    return {
        "config": {
            "vocabs": list(vocabs),
            "tokens": list(tokens),
            "hidden": hidden,
            "dtype": "float32",
            "cap_bytes": cap,
            "repeats_max": repeats,
            "device": device,
            "threads": threads,
            "memory": "peak RSS growth over the allocated inputs (VmHWM reset), fresh process "
            "per contender; CUDA: max_memory_allocated growth",
            "time": "median wall time of forward+backward (one call when a call takes > 2 s)",
            "jobs": jobs or (4 if quick else 1),
        },
        "contenders": {
            c.name: {"scenario": c.scenario, "label": c.label, "includes": c.includes}
            for c in CONTENDERS
            if c.name in names
        },
        "results": results,
        "targets": targets(results, point),
    }


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="child: one loss contender at one point")
    parser.add_argument("--one", required=True, choices=sorted(BY_NAME))
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--cap-bytes", type=int, default=DEFAULT_CAP)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args(argv)
    result = run_one(
        a.one,
        vocab=a.vocab,
        tokens=a.tokens,
        hidden=a.hidden,
        cap=a.cap_bytes,
        repeats=a.repeats,
        threads=a.threads,
        device=a.device,
    )
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
