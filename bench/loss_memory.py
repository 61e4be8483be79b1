"""Loss memory and time: forward+backward of the distillation loss alone, each contender in a
fresh process.

Two scenarios, because what a loss function is handed decides what it can save:

``logits``  Every contender gets the same precomputed fp32 logits ``[tokens, vocab]`` of
            student (``requires_grad``) and teacher, and all-valid labels. The student's
            gradient (one ``[tokens, vocab]`` fp32 tensor) is part of every contender's
            output, so it is counted for all of them.
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


@dataclass(frozen=True)
class Contender:
    name: str
    scenario: str  # "logits" | "hidden"
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
    Contender(
        "ours_kl",
        "logits",
        "ours distillation_loss KL",
        "foundry distillation_loss(kind=forward_kl), default chunk_tokens=1024, analytic "
        "gradient made in forward",
    ),
    Contender(
        "ours_kl_budget",
        "logits",
        "ours distillation_loss KL, 32 MiB chunks",
        "as ours_kl with chunk_tokens sized so one fp32 [chunk, vocab] slab is 32 MiB "
        "(65 rows at 128k, 262 at 32k): the proposed engine default",
    ),
    Contender(
        "ours_kl_inplace",
        "logits",
        "proposal: ours KL, gradient written into the logits",
        "PROTOTYPE of a proposed engine option (defined in bench/loss_memory.py from the "
        "engine's chunk kernel): as ours_kl_budget, but each chunk's gradient overwrites the "
        "student logits it came from (as Liger's cross-entropy does), so no second "
        "[tokens, vocab] buffer exists; the logits are consumed",
        family="proposal",
    ),
    Contender(
        "ours_jsd",
        "logits",
        "ours distillation_loss JSD b=0.5",
        "foundry distillation_loss(kind=jsd, beta=0.5), chunk_tokens=1024 (same loss as TRL's)",
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
        "projected chunk by chunk, chunk_tokens=1024",
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
    if contender.scenario == "logits":
        student = torch.empty(tokens, vocab, device=device).normal_(0.0, 2.0)
        teacher = torch.empty(tokens, vocab, device=device).normal_(0.0, 2.0)
        student.requires_grad_(True)
        return {"student": student, "teacher": teacher, "labels": labels}
    scale = hidden**-0.5
    h_s = torch.empty(tokens, hidden, device=device).normal_().requires_grad_(True)
    w_s = torch.empty(vocab, hidden, device=device).normal_(0.0, 2.0 * scale)
    w_s.requires_grad_(True)
    h_t = torch.empty(tokens, hidden, device=device).normal_()
    w_t = torch.empty(vocab, hidden, device=device).normal_(0.0, 2.0 * scale)
    return {"h_s": h_s, "w_s": w_s, "h_t": h_t, "w_t": w_t, "labels": labels}


class _InplaceChunkedDistillation:
    """Prototype of a proposed engine option, built from the engine's own chunk kernel.

    Like ``foundry_kernel.losses._ChunkedDistillation``, but the gradient of each chunk is
    written over the student logits of that chunk instead of into a new buffer of their
    size; the logits are consumed (what Liger's cross-entropy does). Measured here to size
    the gain; not engine code.
    """

    _fn: Any = None

    @classmethod
    def apply(cls, student: Any, teacher: Any, labels: Any, spec: Any) -> Any:
        import torch

        from foundry_kernel.training import _losses as L

        if cls._fn is None:

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx: Any, s: Any, t: Any, plan: Any) -> Any:
                    buf = s.detach()  # the logits' own storage
                    cdt = L._compute_dtype(buf)
                    kd_sum = torch.zeros((), dtype=cdt)
                    ce_sum = torch.zeros((), dtype=cdt)
                    s_view, t_view = buf[..., : plan.vocab], t[..., : plan.vocab]
                    for rows, targets in plan.chunks():
                        kd_c, ce_c, g = L._chunk_loss_and_grad(
                            s_view[rows], t_view[rows], targets, plan, with_grad=True
                        )
                        kd_sum += kd_c
                        ce_sum += ce_c
                        assert g is not None  # with_grad=True always returns one
                        s_view[rows] = g.to(buf.dtype)
                    valid = torch.zeros(buf.shape[:-1], dtype=torch.bool, device=buf.device)
                    valid[plan.rows] = True
                    buf[~valid] = 0.0  # positions without a target get no gradient
                    if plan.vocab < buf.shape[-1]:
                        buf[..., plan.vocab :] = 0.0
                    total, kd, ce = L._finish(plan, kd_sum, ce_sum)
                    ctx.save_for_backward(buf)
                    ctx.mark_non_differentiable(kd, ce)
                    return total, kd, ce

                @staticmethod
                def backward(ctx: Any, grad_total: Any, _kd: Any, _ce: Any) -> Any:
                    (grad,) = ctx.saved_tensors
                    return L._scale_grad(grad, grad_total), None, None

            cls._fn = Fn
        v = L._resolve_vocab(student.shape[-1], teacher.shape[-1], None)
        rows, targets = L._valid_rows(labels, student.shape[:-1], v)
        plan = L._Plan(spec, rows, targets, v, L._normalizer(None, targets.numel()))
        return cls._fn.apply(student, teacher.detach(), plan)[0]


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

    from foundry_kernel.training._losses import (
        LossSpec,
        distillation_loss,
        fused_linear_distillation_loss,
    )

    chunk = budget_chunk(vocab) if name.endswith(("_budget", "_inplace")) else 1024
    if name == "ours_jsd":
        spec = LossSpec(kind="jsd", beta=0.5, chunk_tokens=chunk)
    else:
        spec = LossSpec(kind="forward_kl", chunk_tokens=chunk)
    if name == "ours_kl_inplace":
        return lambda x: _InplaceChunkedDistillation.apply(
            x["student"], x["teacher"], x["labels"], spec
        )
    if name.startswith("ours_fused"):
        return lambda x: (
            fused_linear_distillation_loss(
                x["h_s"], x["w_s"], x["h_t"], x["labels"], spec, teacher_weight=x["w_t"]
            ).total
        )
    if name.startswith("ours_"):
        return lambda x: distillation_loss(x["student"], x["teacher"], x["labels"], spec).total
    raise ValueError(f"unknown contender {name!r}")


def _one_call(
    fn: Callable[[dict[str, Any]], Any], inputs: dict[str, Any], sync: Callable[[], None]
) -> tuple[float, float]:
    """One forward+backward: (seconds, loss value)."""
    for v in inputs.values():
        if getattr(v, "requires_grad", False):
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
    for the engine as it is, with a smaller ``loss.chunk_tokens``, and for the prototype."""
    out = []
    chunk = budget_chunk(point[0])
    how = {
        "ours_kl": "engine default (chunk_tokens=1024)",
        "ours_kl_budget": f"engine with loss.chunk_tokens={chunk}",
        "ours_kl_inplace": f"proposed option, prototype (chunk {chunk})",
        "ours_fused_kl": "engine default (chunk_tokens=1024)",
        "ours_fused_kl_budget": f"engine with loss.chunk_tokens={chunk}",
    }
    for scenario, ours_names, plain, liger in (
        ("logits", ("ours_kl", "ours_kl_budget", "ours_kl_inplace"), "plain_kl", "liger_jsd"),
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
