"""``python -m bench.gpu_check``: everything issue 12 asks of a CUDA machine, in one go.

GPU machines are lent to this project now and then, for minutes, with no internet: the
check must be ready before one comes, run unattended within one command's limit, and bring
back one JSON file and one log whatever happens. So it is a driver of separate child
processes (argument lists, never a shell), each step with its own timeout inside a total
budget (9 minutes by default), and it goes on past a step that fails, recording why.

Steps (``--dry-run`` prints them with their argument lists and writes the JSON skeleton):

``environment``  torch, CUDA, the GPU, NCCL and the packages the other steps need (a probe
                 child; needs no GPU).
``cuda_tests``   ``pytest -m cuda`` over the test files that carry ``@pytest.mark.cuda``
                 (only those files: the others import the workbench, which is not there).
``nccl_smoke``   ``python -m foundry_kernel distill --nproc-per-node 1 --set device=cuda
                 --set distributed.backend=nccl --json`` on a tiny config (5 steps): torchrun,
                 an NCCL process group of one, the run completing, ``world_size`` 1.
``loss_128k``    ``python -m bench loss --device cuda --vocabs 128256``: our losses beside
                 plain PyTorch and Liger's (fused) JSD, peak CUDA memory and time.
``mfu_bf16``     ``python -m bench mfu --device cuda``: a bf16 distillation step's tokens/s
                 and MFU against the GPU's measured bf16 matmul peak.

On a machine without CUDA every GPU step is reported ``skipped: no CUDA device`` (never
``ok``) and the exit code says so (0 only when every step ran and passed; ``--dry-run``
exits 0). ``--download-wheels`` fetches the wheels of ``bench/gpu_wheels.txt`` into
``.whl/`` on a machine with PyPI (the GPU machine has none); ``docs/gpu-check.md`` has the
one-line device command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEELS_FILE = ROOT / "bench" / "gpu_wheels.txt"
WHEEL_DIR = ROOT / ".whl"
DEFAULT_BUDGET_S = 540  # 9 minutes: one device command may run 10
JSON_NAME = "gpu-check.json"
LOG_NAME = "gpu-check.log"
NO_CUDA = "skipped: no CUDA device"
OUT_OF_TIME = "skipped: out of time budget"
VOCAB_128K = 128256
LOSS_TOKENS = (4096, 16384)
# Liger's two kernels beside ours and plain PyTorch (issue 14 asks for Liger's fused JSD on
# CUDA): ``liger_jsd`` is LigerJSD(beta=0.5) on the full logits' log-softmax (the logits
# path, beside plain_kl / ours_kl), ``liger_fused_jsd`` LigerFusedLinearJSD(jsd_beta=0,
# forward KL) from hidden states + lm_head weights (the fused path, beside plain_kl_proj /
# ours_fused_kl): peak CUDA memory and time of forward + backward at 128k x 4k and 16k
# tokens. The loss benchmark runs the Liger rows first, so they are measured even if the
# step runs out of time later. Liger comes from the carried wheels (gpu_wheels.txt: pure
# Python, its torch and triton are the image's). TRL is not a Foundry dependency and is not
# on the GPU machine, so its contenders are left out rather than reported n/a.
LOSS_CONTENDERS = (
    "plain_kl",
    "liger_jsd",
    "ours_kl",
    "ours_kl_budget",
    "plain_kl_proj",
    "liger_fused_jsd",
    "ours_fused_kl",
    "ours_fused_kl_budget",
)
PIP_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
OUTPUT_TAIL = 4000
LOG_CAP = 400_000  # characters of one step's output kept in the log

# The NCCL smoke's run: the tests' tiny config (tests/conftest.py), 5 steps, no baseline.
SMOKE_CONFIG: dict[str, Any] = {
    "name": "gpu-smoke",
    "seed": 0,
    "teacher": {
        "source": "builtin:tiny-teacher",
        "build": {
            "vocab_size": 512,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "seq_len": 32,
            "batch_size": 8,
            "steps": 20,
            "lr": 1e-2,
            "max_documents": 40,
        },
    },
    "student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"max_documents": 40, "seq_len": 32},
    "optim": {"batch_size": 4, "warmup_steps": 2, "lr": 1e-2},
    "eval": {
        "every_steps": 5,
        "max_batches": 2,
        "baseline": False,
        "sample_tokens": 4,
        "sample_prompts": ["The list"],
    },
    "limits": {"max_steps": 5, "timeout_s": 150},
    "checkpoint": {"every_steps": 5},
}
SMOKE_OVERRIDES = ("device=cuda", "distributed.backend=nccl")


@dataclass(frozen=True)
class Ran:
    """What a step's child did."""

    rc: int | None
    wall_s: float
    output: str
    timed_out: bool


Check = Callable[[Ran], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Step:
    name: str
    why: str
    argv: tuple[str, ...]
    timeout_s: int
    needs_cuda: bool
    check: Check = field(compare=False, repr=False)
    blocked: str | None = None  # why the step cannot run at all, found while planning

    def skeleton(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "why": self.why,
            "argv": list(self.argv),
            "timeout_s": self.timeout_s,
            "needs_cuda": self.needs_cuda,
            "status": "planned",
            "rc": None,
            "wall_s": None,
            "details": {},
            "output_tail": "",
        }


# --------------------------------------------------------------------------- checks


def _last_json(output: str, mark: str = "") -> dict[str, Any] | None:
    """The last line of ``output`` that is a JSON object (after ``mark``, when given)."""
    for line in reversed(output.splitlines()):
        text = line.strip()
        if mark:
            if not text.startswith(mark):
                continue
            text = text[len(mark) :]
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _failed(ran: Ran, what: str) -> str:
    if ran.timed_out:
        return f"timeout: {what} ran past its limit"
    return f"failed: {what} (exit {ran.rc})"


def probe() -> dict[str, Any]:
    """What the figures run on (``--probe``, in a child: CUDA is initialised there, not in
    the driver, which holds no GPU memory while the steps run)."""
    import importlib
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        importlib.import_module("foundry_kernel.config")  # needs pydantic: the wheels
        engine: str | None = None
    except ImportError as exc:
        engine = str(exc)
    cuda = torch.cuda.is_available()
    names: tuple[str, ...] = (
        "transformers",
        "tokenizers",
        "safetensors",
        "pydantic",
        "pydantic-core",
    )
    names += ("liger-kernel", "triton", "pytest", "pytest-timeout", "pyyaml", "psutil", "httpx")
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "nccl_available": torch.distributed.is_nccl_available(),
        "packages": {n: version(n) for n in names},
        "engine_import_error": engine,
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_bytes=p.total_memory,
            multiprocessors=p.multi_processor_count,
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


def check_environment(ran: Ran) -> tuple[str, dict[str, Any]]:
    info = _last_json(ran.output, "GPU_CHECK_ENV ")
    if info is None:
        return _failed(ran, "the environment probe printed nothing"), {}
    if info.get("engine_import_error"):
        return f"failed: foundry_kernel does not import: {info['engine_import_error']}", info
    missing = [n for n in ("pydantic", "liger-kernel") if not info["packages"].get(n)]
    status = "ok" if not missing else f"ok, missing: {', '.join(missing)} (carry .whl)"
    return status, info


def check_pytest(ran: Ran) -> tuple[str, dict[str, Any]]:
    summary = next(
        (ln.strip("= ") for ln in reversed(ran.output.splitlines()) if " in " in ln and "=" in ln),
        "",
    )
    details = {"summary": summary}
    if ran.rc == 0:
        return "ok", details
    if ran.rc == 5:
        return "failed: no test carries the cuda marker", details
    return _failed(ran, "pytest -m cuda"), details


def check_smoke(ran: Ran) -> tuple[str, dict[str, Any]]:
    result = _last_json(ran.output)
    if result is None:
        return _failed(ran, "no --json result on stdout"), {}
    details = {k: result.get(k) for k in ("run_id", "state", "world_size", "strategy")}
    details["duration_s"] = result.get("duration_s")
    problems = []
    if result.get("state") != "completed":
        problems.append(f"state {result.get('state')!r}, not 'completed'")
    if result.get("world_size") != 1:
        problems.append(f"world_size {result.get('world_size')!r}, not 1")
    if "strategy" not in result:
        problems.append("no 'strategy' in the --json result")
    if problems or ran.rc != 0:
        return "failed: " + "; ".join(problems or [f"exit {ran.rc}"]), details
    return "ok", details


def loss_check(path: Path) -> Check:
    def check(ran: Ran) -> tuple[str, dict[str, Any]]:
        if not path.is_file():
            return _failed(ran, f"no {path.name} written"), {}
        doc = json.loads(path.read_text(encoding="utf-8"))
        rows = doc.get("loss", {}).get("results", [])
        table = [
            {
                k: r.get(k)
                for k in ("contender", "vocab", "tokens", "status", "peak_bytes", "time_s", "note")
            }
            for r in rows
        ]
        details = {"results": table, "targets": doc.get("loss", {}).get("targets")}
        ours = [r for r in rows if r.get("contender", "").startswith("ours")]
        liger = [r for r in rows if r.get("contender", "").startswith("liger")]
        if not ours or any(r.get("status") != "ok" for r in ours):
            return "failed: one of ours did not run (see details)", details
        if not liger or any(r.get("status") != "ok" for r in liger):
            notes = sorted({str(r.get("note")) for r in liger if r.get("status") != "ok"})
            return f"partial: Liger did not run: {'; '.join(notes)[:300]}", details
        return ("ok" if ran.rc == 0 else _failed(ran, "bench loss")), details

    return check


def mfu_check(path: Path) -> Check:
    def check(ran: Ran) -> tuple[str, dict[str, Any]]:
        if not path.is_file():
            return _failed(ran, f"no {path.name} written"), {}
        section = json.loads(path.read_text(encoding="utf-8")).get("mfu", {})
        step = section.get("distill_step", {})
        details = {
            "gpu": section.get("config", {}).get("gpu"),
            "bf16_peak_flops_per_s": section.get("peak", {}).get("bfloat16", {}).get("flops_per_s"),
            "distill_tokens_per_s": step.get("tokens_per_s"),
            "distill_mfu": step.get("mfu"),
            "student_tokens_per_s": section.get("student_step", {}).get("tokens_per_s"),
            "student_mfu": section.get("student_step", {}).get("mfu"),
            "step_s": step.get("step_s"),
            "max_memory_allocated": section.get("config", {}).get("max_memory_allocated"),
        }
        ok = isinstance(details["distill_mfu"], float) and details["distill_mfu"] > 0
        return ("ok" if ok and ran.rc == 0 else _failed(ran, "bench mfu")), details

    return check


# --------------------------------------------------------------------------- the plan


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that carry the ``cuda`` marker, relative to ``root``."""
    return sorted(
        str(p.relative_to(root))
        for p in (root / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in p.read_text(encoding="utf-8")
    )


def plan(work: Path, python: str = sys.executable) -> list[Step]:
    """The steps, their argument lists and limits (they sum to the default budget)."""
    smoke_config = work / "smoke-config.json"
    loss_json, mfu_json = work / "loss.json", work / "mfu.json"
    tests = cuda_test_files()
    smoke = [python, "-m", "foundry_kernel", "distill", "--nproc-per-node", "1"]
    smoke += ["--config", str(smoke_config)]
    for value in SMOKE_OVERRIDES:
        smoke += ["--set", value]
    smoke += ["--runs-dir", str(work / "runs"), "--json"]
    loss = [python, "-m", "bench", "loss", "--device", "cuda", "--vocabs", str(VOCAB_128K)]
    loss += ["--tokens", ",".join(map(str, LOSS_TOKENS))]
    loss += ["--loss-contenders", ",".join(LOSS_CONTENDERS), "--json", str(loss_json)]
    return [
        Step(
            "environment",
            "what the figures ran on, and whether the wheels arrived",
            (python, "-m", "bench.gpu_check", "--probe"),
            30,
            False,
            check_environment,
        ),
        Step(
            "cuda_tests",
            "the CUDA-marked tests",
            (
                *(python, "-m", "pytest", "-q", "-m", "cuda", "-o", "addopts=-ra --strict-markers"),
                *("-p", "no:cacheprovider", "--timeout", "80", *tests),
            ),
            90,
            True,
            check_pytest,
            None if tests else "failed: no test file carries @pytest.mark.cuda",
        ),
        Step(
            "nccl_smoke",
            "torchrun + NCCL at world size 1 through Foundry's own launcher",
            tuple(smoke),
            120,
            True,
            check_smoke,
        ),
        Step(
            "loss_128k",
            "the loss benchmark on CUDA at vocabulary 128k, Liger beside ours",
            tuple(loss),
            180,
            True,
            loss_check(loss_json),
        ),
        Step(
            "mfu_bf16",
            "a bf16 distillation step: tokens/s and MFU vs the measured bf16 peak",
            (python, "-m", "bench", "mfu", "--device", "cuda", "--json", str(mfu_json)),
            120,
            True,
            mfu_check(mfu_json),
        ),
    ]


# --------------------------------------------------------------------------- running


def child_env(work: Path) -> dict[str, str]:
    """The checkout importable in every child (torchrun's workers too), caches and the
    default run store in the scratch folder, nothing fetched from a hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["FOUNDRY_CACHE_DIR"] = str(work / "cache")
    env["FOUNDRY_RUNS_DIR"] = str(work / "runs")
    env["FOUNDRY_TEST_CACHE"] = str(work / "test-cache")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(argv: Sequence[str], timeout_s: float, env: dict[str, str], log: Path) -> Ran:
    """Run one step in its own process group; on timeout the whole group is killed (torchrun
    workers and the loss benchmark's children included). Output goes through a file."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        wall = time.monotonic() - t0
        out.seek(0)
        output = out.read()
    with log.open("a", encoding="utf-8") as f:
        f.write(output[-LOG_CAP:])
        f.write(f"\n[exit {proc.returncode}{', timed out' if timed_out else ''}, {wall:.1f} s]\n")
    return Ran(proc.returncode, round(wall, 1), output, timed_out)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the step's process group, SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_check(
    out_dir: Path,
    *,
    dry_run: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    only: Sequence[str] | None = None,
    printer: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or, ``dry_run``, only plan) the check; writes and returns the JSON document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="foundry-gpu-check-"))
    (work / "smoke-config.json").write_text(json.dumps(SMOKE_CONFIG), encoding="utf-8")
    json_path, log = out_dir / JSON_NAME, out_dir / LOG_NAME
    log.write_text(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} in {ROOT}\n", encoding="utf-8")
    # the probe always runs: it is what tells whether there is a GPU to run the rest on
    steps = [s for s in plan(work) if only is None or s.name in {*only, "environment"}]
    doc: dict[str, Any] = {
        "meta": {
            "argv": sys.argv[1:],
            "dry_run": dry_run,
            "budget_s": budget_s,
            "root": str(ROOT),
            "scratch": str(work),
            "started_at": time.time(),
        },
        "steps": [s.skeleton() for s in steps],
    }
    env = child_env(work)
    deadline = time.monotonic() + budget_s
    cuda = False
    for step, entry in zip(steps, doc["steps"], strict=True):
        printer(f"[{step.name}] {step.why}\n  argv: {json.dumps(list(step.argv))}")
        if step.needs_cuda and not cuda:
            entry["status"] = NO_CUDA
        elif step.blocked:
            entry["status"] = step.blocked
        elif dry_run and step.name != "environment":
            entry["status"] = "planned (dry run)"
        else:
            left = deadline - time.monotonic()
            if left < 15:
                entry["status"] = OUT_OF_TIME
            else:
                with log.open("a", encoding="utf-8") as f:
                    f.write(f"\n===== {step.name}: {json.dumps(list(step.argv))}\n")
                ran = run_child(step.argv, min(step.timeout_s, left - 5), env, log)
                status, details = step.check(ran)
                entry.update(
                    status=status,
                    rc=ran.rc,
                    wall_s=ran.wall_s,
                    details=details,
                    output_tail=ran.output[-OUTPUT_TAIL:],
                )
                if step.name == "environment":
                    cuda = bool(details.get("cuda_available"))
                    doc["meta"]["environment"] = details
        printer(f"  -> {entry['status']}")
        _write(json_path, doc)
    doc["meta"]["ended_at"] = time.time()
    doc["summary"] = {e["name"]: e["status"] for e in doc["steps"]}
    doc["passed"] = all(e["status"] == "ok" or e["status"].startswith("ok,") for e in doc["steps"])
    _write(json_path, doc)
    printer(f"wrote {json_path} and {log}")
    return doc


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- wheels


def wheel_requirements(path: Path = WHEELS_FILE) -> list[str]:
    """``name==version`` lines of ``bench/gpu_wheels.txt`` (comments and blanks dropped)."""
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    reqs = [ln for ln in lines if ln]
    bad = [r for r in reqs if r.count("==") != 1]
    if bad:
        raise ValueError(f"{path}: pin every wheel exactly (name==version): {bad}")
    return reqs


def download_command(dest: Path = WHEEL_DIR, python: str = sys.executable) -> list[str]:
    """The device README's ``pip download`` for CPython 3.12 on x86-64 manylinux."""
    argv = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", "3.12", "--implementation", "cp"]
    for platform in PIP_PLATFORMS:
        argv += ["--platform", platform]
    return [*argv, "-d", str(dest), *wheel_requirements()]


def download_wheels(dest: Path = WHEEL_DIR) -> int:
    dest.mkdir(exist_ok=True)
    argv = download_command(dest)
    print(json.dumps(argv))
    proc = subprocess.run(argv, cwd=ROOT, check=False)
    if proc.returncode != 0:
        return proc.returncode
    names = [w.name.split("-")[0].lower() for w in dest.glob("*.whl")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        print(f"gpu_check: two versions of {dupes} in {dest}: keep one", file=sys.stderr)
        return 1
    size = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(names)} wheels, {size / 2**20:.1f} MiB in {dest} (carry '.whl')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, help="folder for gpu-check.json and .log (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="print and write the plan only")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="total time limit")
    p.add_argument("--only", help="comma-separated step names")
    p.add_argument("--download-wheels", action="store_true", help="fetch .whl/ (needs PyPI)")
    p.add_argument("--probe", action="store_true", help="print the environment (a step's child)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:
        print("GPU_CHECK_ENV " + json.dumps(probe()), flush=True)
        return 0
    if args.download_wheels:
        return download_wheels()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        print("gpu_check: give --out DIR (or set $OUT)", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s] if args.only else None
    doc = run_check(
        out,
        dry_run=args.dry_run,
        budget_s=args.budget_s,
        only=only,
        printer=lambda s: print(s, flush=True),
    )
    return 0 if args.dry_run or doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
