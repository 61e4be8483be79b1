"""Safe launchers for the Voila dashboard (``foundry dashboard``) and JupyterLab (``foundry lab``).

Why this module exists: both servers are unsafe with their stock settings for what Foundry
does with them. Voila 0.5 has token authentication *off* by default, hard-codes
``allow_remote_access=True`` (no Host-header check, so DNS rebinding works), silently moves
to the next port when the asked one is taken (``port_retries=50``), and starts a kernel on
every page load, without limit, that is never shut down when the page closes (the page's
shutdown POST is refused for a missing XSRF token). These launchers start the servers with:

* listening on 127.0.0.1 only, token required (a random ``secrets.token_urlsafe`` token
  unless one is given); the token travels in a private (0700 folder) JSON config file,
  not on the command line, so other local users cannot read it from ``ps``;
* a strict origin policy: ``allow_origin`` empty and no origin pattern (never ``*``), so a
  cookie-authenticated request from a foreign ``Origin`` is refused; the Host header is
  checked (``allow_remote_access=False``); the login cookie is ``SameSite=Strict``;
* for Voila: sources stripped, tracebacks hidden (cells by Voila's ``show_tracebacks``,
  widget errors and stderr by :class:`~foundry_kernel.dashboard_server.QuietKernelConnection`),
  no config files other than ours (a ``voila.py`` in the working directory would otherwise
  be *executed*), Foundry's page template (nothing fetched from a CDN; no ``?template=``
  override), and at most ``max_kernels`` kernels
  (:class:`~foundry_kernel.dashboard_server.DashboardKernelManager`: a load beyond it is
  answered HTTP 503 with a "busy, try again" page). Kernels are culled by what their page
  did: never connected (a script, a crawler) after ``unconnected_cull_s`` idle seconds,
  page closed after ``cull_idle_s``, page open but untouched after ``connected_cull_s``.
  We chose culling over "fixing" the page's shutdown request because it needs no change
  to Voila's JavaScript, keeps XSRF protection intact, and also reclaims kernels whose
  browser crashed or lost the network (no shutdown request is ever sent then);
* for Voila again: an allow-listed environment (:func:`minimal_env`): the dashboard server
  and its kernels never see the launcher's secrets (API keys, tokens, cloud credentials);
* for Lab: its runtime files (server info, the ``jpserver-PID-open.html`` link that holds
  the token) in the private state folder, the link file created 0600 before Lab writes it;
* ``port_retries=0`` plus a pre-check, so a taken port is an error that names the port; with
  no port given a free one is picked and reported;
* child processes as argument lists (never a shell), output to a rotating log file, and
  ``stop()`` = terminate, wait, kill, including kernels the server left behind; stopped at
  interpreter exit too; and the servers die with their launcher even when it is killed
  with SIGKILL (:mod:`foundry_kernel.lifeline`: a pipe on the server's stdin that only the
  launcher holds).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import errno
import http.client
import json
import logging
import logging.handlers
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import psutil

from foundry_kernel import lifeline
from foundry_kernel.errors import FoundryError
from foundry_kernel.paths import default_runs_dir

__all__ = [
    "HOST",
    "ServerError",
    "ServerProcess",
    "add_commands",
    "check_extra_args",
    "dashboard_notebook",
    "dashboard_process",
    "ensure_port_free",
    "free_port",
    "lab_argv",
    "lab_process",
    "main",
    "minimal_env",
    "new_token",
    "serve_dashboard",
    "serve_lab",
    "voila_argv",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
CULL_IDLE_S = 120  # a closed page's kernel (a network blip reconnects within seconds)
CULL_INTERVAL_S = 5
UNCONNECTED_CULL_S = 30  # no page ever connected: a browser connects seconds after render
CONNECTED_CULL_S = 3600  # a page left open but untouched for an hour
DEFAULT_MAX_KERNELS = 10  # ~80 MiB each (measured): under 1 GiB for ten viewers at once
MAX_KERNELS_LIMIT = 1000
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
MIN_TOKEN_CHARS = 16
_TOKEN_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_REPO_ROOT = Path(__file__).resolve().parents[1]
# Holds voila/templates/foundry: put on the dashboard server's JUPYTER_PATH.
JUPYTER_DATA = Path(__file__).resolve().parent / "jupyter"
DASHBOARD_TEMPLATE = "foundry"


class ServerError(FoundryError):
    """A server could not be started (port taken, failed health check) or misbehaved."""


# --- small pieces -------------------------------------------------------------------------


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_token(token: str | None) -> str:
    """Return a usable token: a new one for None; refuse empty, short or non-URL-safe ones.

    An empty token would switch authentication off, and characters outside the URL-safe
    alphabet would break the printed URL.
    """
    if token is None:
        return new_token()
    if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_ALPHABET:
        raise ServerError(
            f"--token must be at least {MIN_TOKEN_CHARS} characters of A-Z, a-z, 0-9, '-' "
            "or '_' (omit --token to get a random one)"
        )
    return token


def check_port(port: int) -> int:
    """Refuse ports outside 1..65535 with a message naming the value."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ServerError(f"--port must be an integer between 1 and 65535, got {port!r}")
    return port


def ensure_port_free(port: int, host: str = HOST) -> None:
    """Raise :class:`ServerError` naming ``port`` if something already listens there.

    ``SO_REUSEADDR`` mirrors what tornado does, so a port in TIME_WAIT is not reported busy.
    """
    check_port(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is already in use; pass another --port, or omit "
                    "--port to use a free one"
                ) from exc
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dashboard_notebook() -> Path:
    """The dashboard notebook shipped next to the packages (``notebooks/dashboard.ipynb``)."""
    return _REPO_ROOT / "notebooks" / "dashboard.ipynb"


def _write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a config file only its owner can read (it holds the token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The Lab server's environment: ours, plus the repository on PYTHONPATH so the kernel
    imports the same ``foundry_kernel``/``widgets`` as the launcher, plus ``extra``.
    (Lab's kernels train models: they may need the user's credentials, e.g. ``HF_TOKEN``.)"""
    env = dict(os.environ)
    env.pop("JUPYTER_TOKEN", None)  # our config file is the only token source
    return _with_repo_path(env, extra)


def _with_repo_path(env: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    paths = [str(_REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# The dashboard's environment allow-list: what Python, Jupyter and the locale need, and
# nothing that could be a credential (a viewer's widget messages reach this kernel).
_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "IPYTHONDIR",
        "MPLCONFIGDIR",
        "JPY_PARENT_PID",
        # Windows: Python and its sockets need these
        "SYSTEMROOT",
        "SYSTEMDRIVE",
        "WINDIR",
        "COMSPEC",
        "PATHEXT",
        "USERPROFILE",
        "APPDATA",
        "LOCALAPPDATA",
        "PROGRAMDATA",
        # what Voila tells the kernel about the request (QUERY_STRING and
        # VOILA_REQUEST_URL are left out: they carry the ?token=)
        "SCRIPT_NAME",
        "PATH_INFO",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
        "SERVER_SOFTWARE",
    }
)
_ENV_PREFIXES = ("LC_", "FOUNDRY_", "JUPYTER_", "XDG_", "VOILA_")
_ENV_DENIED = frozenset({"VOILA_REQUEST_URL", "QUERY_STRING"})
_SECRET_WORDS = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE|AUTH|COOKIE"
)


def minimal_env(source: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed part of ``source``: locale, paths, Python/Jupyter settings and
    non-secret ``FOUNDRY_*`` settings. A name that looks like a credential
    (``*TOKEN*``, ``*SECRET*``, ``*API_KEY*``, ...) is dropped even under an allowed prefix."""
    kept = {}
    for name, value in source.items():
        upper = name.upper()
        allowed = upper in _ENV_NAMES or upper.startswith(_ENV_PREFIXES)
        if allowed and upper not in _ENV_DENIED and not _SECRET_WORDS.search(upper):
            kept[name] = value
    return kept


def _dashboard_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The Voila server's environment (its kernels get the same, filtered again): the
    allow-list, the repository on PYTHONPATH, Foundry's template on JUPYTER_PATH."""
    env = minimal_env(os.environ)
    jupyter_path = [str(JUPYTER_DATA), *filter(None, env.get("JUPYTER_PATH", "").split(os.pathsep))]
    env["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(jupyter_path))
    return _with_repo_path(env, extra)


def _identity_config(token: str) -> dict[str, Any]:
    """Token and cookie settings shared by Voila and Lab (config file, not argv)."""
    return {
        "IdentityProvider": {"token": token, "cookie_options": {"samesite": "Strict"}},
        "PasswordIdentityProvider": {"allow_password_change": False},
    }


# --- argument lists -----------------------------------------------------------------------


def voila_argv(
    notebook: Path,
    *,
    port: int,
    config_dir: Path,
    cull_idle_s: int = CULL_IDLE_S,
    cull_interval_s: int = CULL_INTERVAL_S,
    max_kernels: int = DEFAULT_MAX_KERNELS,
    unconnected_cull_s: int = UNCONNECTED_CULL_S,
    connected_cull_s: int = CONNECTED_CULL_S,
) -> list[str]:
    """Voila's command line, run under :mod:`foundry_kernel.lifeline`. Nothing secret is
    here: the token is in ``config_dir``."""
    manager = "DashboardKernelManager"
    argv = [
        sys.executable,
        "-m",
        "voila",
        str(notebook),
        "--no-browser",
        f"--Voila.ip={HOST}",
        f"--port={check_port(port)}",
        "--Voila.port_retries=0",
        f"--Voila.config_file_paths={config_dir}",
        f"--Voila.connection_dir_root={config_dir}",
        "--strip_sources=True",
        "--show_tracebacks=False",
        f"--VoilaConfiguration.template={DASHBOARD_TEMPLATE}",
        "--VoilaConfiguration.allow_template_override=NO",
        "--VoilaConfiguration.allow_theme_override=NO",
        "--VoilaConfiguration.preheat_kernel=False",
        f"--VoilaConfiguration.multi_kernel_manager_class=foundry_kernel.dashboard_server.{manager}",
        "--Voila.kernel_websocket_connection_class="
        "foundry_kernel.dashboard_server.QuietKernelConnection",
        f"--{manager}.max_kernels={check_max_kernels(max_kernels)}",
        f"--{manager}.unconnected_timeout={int(unconnected_cull_s)}",
        f"--{manager}.connected_timeout={int(connected_cull_s)}",
        f"--MappingKernelManager.cull_idle_timeout={int(cull_idle_s)}",
        f"--MappingKernelManager.cull_interval={int(cull_interval_s)}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
    ]
    return lifeline.wrap(argv)


def check_max_kernels(value: int) -> int:
    """Refuse a kernel cap that is not a whole number in 1..MAX_KERNELS_LIMIT."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KERNELS_LIMIT:
        raise ServerError(
            f"--max-kernels must be a whole number between 1 and {MAX_KERNELS_LIMIT} (each "
            f"dashboard viewer holds one kernel of about 80 MiB), got {value!r}"
        )
    return value


def voila_config(token: str) -> dict[str, Any]:
    """Voila's private config: the token and the tornado settings Voila has no flag for.

    Voila's standalone app puts ``allow_remote_access=True`` into its tornado settings and
    applies ``Voila.tornado_settings`` on top, which is the only way to turn it off.
    """
    return {
        "Voila": {
            "token": token,
            "tornado_settings": {
                "allow_remote_access": False,
                "local_hostnames": ["localhost"],
                "allow_origin": "",
                "allow_origin_pat": "",
                "allow_credentials": False,
                "disable_check_xsrf": False,
            },
        },
        **_identity_config(token),
    }


# Settings the launchers own: an extra argument naming one of them is refused, because a
# later flag overrides an earlier one and could quietly undo the safe defaults.
_PROTECTED_SETTINGS = frozenset(
    {
        "ip",
        "port",
        "port_retries",
        "allow_origin",
        "allow_origin_pat",
        "allow_credentials",
        "allow_remote_access",
        "local_hostnames",
        "token",
        "password",
        "hashed_password",
        "password_required",
        "disable_check_xsrf",
        "allow_unauthenticated_access",
        "tornado_settings",
        "config",
        "config_file",
        "cookie_options",
        "identity_provider_class",
        "authorizer_class",
        "login_handler_class",
        "allow_password_change",
        "sock",
    }
)


def check_extra_args(extra_args: Sequence[str]) -> list[str]:
    """Allow ``--Class.setting=value`` extras (e.g. ``--LabApp.user_settings_dir=D``) unless
    they touch a setting the launcher owns; positional arguments are refused too."""
    for arg in extra_args:
        if not arg.startswith("--"):
            raise ServerError(f"extra server argument {arg!r} must look like --Class.name=value")
        name = arg[2:].split("=", 1)[0].rsplit(".", 1)[-1].replace("-", "_").lower()
        if name in _PROTECTED_SETTINGS:
            raise ServerError(
                f"extra server argument {arg!r} would override {name!r}, which Foundry sets "
                "for safety (localhost, token, origins); it cannot be changed here"
            )
    return list(extra_args)


def lab_argv(
    root_dir: Path,
    *,
    port: int,
    config_file: Path,
    allow_root: bool | None = None,
    extra_args: Sequence[str] = (),
    runtime_dir: Path | None = None,
) -> list[str]:
    """JupyterLab's command line with the same safe defaults as the dashboard, run under
    :mod:`foundry_kernel.lifeline`. With ``runtime_dir`` (Lab's ``JUPYTER_RUNTIME_DIR``),
    the ``jpserver-PID-open.html`` file Lab writes the token link into is created there
    0600 first (Lab has no setting to not write it, and writes it world-readable)."""
    extras = check_extra_args(extra_args)
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={check_port(port)}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        f"--config={config_file}",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.allow_origin=",
        "--ServerApp.allow_origin_pat=",
        "--ServerApp.allow_credentials=False",
        "--ServerApp.disable_check_xsrf=False",
        "--ServerApp.allow_unauthenticated_access=False",
    ]
    if allow_root if allow_root is not None else _is_root():
        argv.append("--allow-root")  # JupyterLab refuses to start as root without it
    private = [runtime_dir / "jpserver-{pid}-open.html"] if runtime_dir else []
    return lifeline.wrap(argv + extras, private_files=private)


def lab_config(token: str) -> dict[str, Any]:
    """Lab's private config: the token, and no calls home (this machine may be offline)."""
    return {
        **_identity_config(token),
        "LabApp": {
            "news_url": None,
            "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
            "extension_manager": "readonly",
        },
    }


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --- the process --------------------------------------------------------------------------


class ServerProcess:
    """One server child process: start, health check, URL with token, clean stop.

    Use as a context manager (``with serve_dashboard(d) as server: ...``) or call
    :meth:`stop`; it is also stopped at interpreter exit. The child's output goes to a
    rotating log file (``log_path``), with the token masked, and the last lines are kept
    for error messages. The child's stdin is a pipe this process holds and never writes:
    a command wrapped by :func:`foundry_kernel.lifeline.wrap` stops when it closes, so the
    server dies with this process even when this process is killed with SIGKILL.
    """

    def __init__(
        self,
        *,
        kind: str,
        argv: Sequence[str],
        port: int,
        token: str,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        state_dir: Path,
        auth_probe: str,
        url_path: str = "/",
        startup_timeout: float = STARTUP_TIMEOUT_S,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.argv = list(argv)
        self.port = port
        self.token = token
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.state_dir = state_dir
        self.auth_probe = auth_probe
        self.url_path = url_path
        self.startup_timeout = startup_timeout
        self.check = check  # called while waiting for start-up: raises to abandon it (cancel)
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._pump: threading.Thread | None = None
        self._stopped = False

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<ServerProcess {self.kind} {self.base_url} {state}>"

    # -- urls --

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/`` without the token."""
        return f"http://{HOST}:{self.port}/"

    @property
    def url(self) -> str:
        """The URL to open, token included."""
        return f"http://{HOST}:{self.port}{self.url_path}?token={self.token}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle --

    def start(self) -> ServerProcess:
        """Start the child and wait until it answers and refuses a request without token."""
        if self.proc is not None:
            raise ServerError(f"{self.kind} server already started")
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(  # argument list, no shell
                self.argv,
                # a pipe only we hold: it closes when we die, however we die, and a child
                # run under foundry_kernel.lifeline stops then; others never read it
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us; we stop it cleanly
            )
        except OSError as exc:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise ServerError(f"cannot start the {self.kind} server: {exc}") from exc
        atexit.register(self.stop)
        self._pump = threading.Thread(
            target=self._pump_output, name=f"foundry-{self.kind}-log", daemon=True
        )
        self._pump.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _pump_output(self) -> None:
        """Copy the child's output into the rotating log (token masked) and the tail."""
        assert self.proc is not None and self.proc.stdout is not None
        handler = logging.handlers.RotatingFileHandler(
            self.log_path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip().replace(self.token, "<token>")
                self._tail.append(line)
                handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
        finally:
            handler.close()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed (token masked)."""
        return "\n".join(list(self._tail)[-lines:])

    def _probe(self, path: str, headers: Mapping[str, str] | None = None) -> int | None:
        """Status of one GET (no redirects followed), or None if nothing answers yet."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _listening(self) -> bool:
        """Whether *our* child listens on the port: a probe must not be answered by some
        other server that holds the port while ours is failing to bind it."""
        assert self.proc is not None
        try:
            conns = psutil.Process(self.proc.pid).net_connections("inet")
        except psutil.AccessDenied:
            return True  # cannot tell on this platform: rely on the probe alone
        except psutil.NoSuchProcess:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns)

    def _wait_ready(self) -> None:
        """Poll until the server refuses an unauthenticated request (up and auth on)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.check is not None:
                self.check()
            if self.proc.poll() is not None:
                self._join_pump(2.0)
                raise ServerError(self._exit_message())
            if not self._listening():
                time.sleep(0.2)
                continue
            status = self._probe(self.auth_probe)
            if status is not None:
                if status in (302, 401, 403):
                    return
                raise ServerError(
                    f"{self.kind} server on port {self.port} answered {status} to a request "
                    f"without the token; refusing to run it with authentication off"
                )
            time.sleep(0.2)
        raise ServerError(
            f"{self.kind} server did not answer on {self.base_url} within "
            f"{self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def _exit_message(self) -> str:
        assert self.proc is not None
        tail = self.log_tail()
        if "already in use" in tail or "no available port" in tail:
            return (
                f"port {self.port} on {HOST} is already in use; pass another --port, or omit "
                "--port to use a free one"
            )
        return (
            f"{self.kind} server exited with code {self.proc.returncode} while starting; "
            f"log {self.log_path}:\n{tail}"
        )

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (the CLI's foreground loop); its exit code."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Terminate → wait → kill the server, then any kernel it left; idempotent."""
        if self.proc is None or self._stopped:
            return None if self.proc is None else self.proc.returncode
        self._stopped = True
        atexit.unregister(self.stop)
        leftovers = _descendants(self.proc.pid)
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s server did not stop within %.0f s; killing it", self.kind, timeout
                    )
                    self.proc.kill()
                    self.proc.wait(timeout)
        finally:
            _reap(leftovers, timeout)
            self._join_pump(timeout)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            shutil.rmtree(self.state_dir, ignore_errors=True)  # holds the token
        return self.proc.returncode

    def _join_pump(self, timeout: float) -> None:
        if self._pump is not None:
            self._pump.join(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _descendants(pid: int) -> list[psutil.Process]:
    """The server's children (kernels) now, so they can be checked after it exits: once
    the server is gone they are re-parented and no longer show as anyone's children."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs: Sequence[psutil.Process], timeout: float) -> None:
    """Give left-over kernels ``timeout`` to exit after the server, then terminate, kill."""
    _, alive = psutil.wait_procs(procs, timeout=min(timeout, 3.0))
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


# --- public launchers ---------------------------------------------------------------------


def _default_log_dir(preferred: Path) -> Path:
    """``preferred`` if it can be created and written, else a fresh temporary folder."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="foundry-logs-"))


def _start_with_port(build: Callable[[int], ServerProcess], port: int | None) -> ServerProcess:
    """Start on ``port`` (checked first), or on a free port, retrying once if another
    process grabbed the picked port in between."""
    if port is not None:
        ensure_port_free(port)
        return build(port).start()
    try:
        return build(free_port()).start()
    except ServerError as exc:
        if "already in use" not in str(exc):
            raise
    return build(free_port()).start()


def dashboard_process(
    runs_dir: Path | str | None,
    *,
    port: int,
    token: str,
    notebook: Path | None = None,
    log_dir: Path | None = None,
    cull_idle_s: int = CULL_IDLE_S,
    cull_interval_s: int = CULL_INTERVAL_S,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    max_kernels: int = DEFAULT_MAX_KERNELS,
    unconnected_cull_s: int = UNCONNECTED_CULL_S,
    connected_cull_s: int = CONNECTED_CULL_S,
) -> ServerProcess:
    """The Voila dashboard server, configured but not started (see :func:`serve_dashboard`).

    Writes the private config (token) into a fresh 0700 folder that ``stop()`` removes.
    """
    root = (Path(runs_dir).expanduser() if runs_dir else default_runs_dir()).absolute()
    if root.exists() and not root.is_dir():
        raise ServerError(f"--runs-dir {root} is not a folder")
    page = (notebook or dashboard_notebook()).absolute()
    if not page.is_file():
        raise ServerError(f"dashboard notebook not found: {page}")
    secret = check_token(token)
    check_max_kernels(max_kernels)
    logs = log_dir or _default_log_dir(root / "logs")
    state = Path(tempfile.mkdtemp(prefix="foundry-voila-"))
    _write_private_json(state / "voila.json", voila_config(secret))
    argv = voila_argv(
        page,
        port=port,
        config_dir=state,
        cull_idle_s=cull_idle_s,
        cull_interval_s=cull_interval_s,
        max_kernels=max_kernels,
        unconnected_cull_s=unconnected_cull_s,
        connected_cull_s=connected_cull_s,
    )
    return ServerProcess(
        kind="dashboard",
        argv=argv,
        port=port,
        token=secret,
        env=_dashboard_env({"FOUNDRY_RUNS_DIR": str(root)}),
        cwd=state,
        log_path=logs / f"dashboard-{port}.log",
        state_dir=state,
        auth_probe="/",
        startup_timeout=startup_timeout,
    )


def serve_dashboard(
    runs_dir: Path | str | None = None,
    *,
    port: int | None = None,
    token: str | None = None,
    notebook: Path | None = None,
    log_dir: Path | None = None,
    cull_idle_s: int = CULL_IDLE_S,
    cull_interval_s: int = CULL_INTERVAL_S,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    max_kernels: int = DEFAULT_MAX_KERNELS,
    unconnected_cull_s: int = UNCONNECTED_CULL_S,
    connected_cull_s: int = CONNECTED_CULL_S,
) -> ServerProcess:
    """Serve the read-only dashboard with Voila on 127.0.0.1 and return the started server.

    ``runs_dir`` defaults to ``$FOUNDRY_RUNS_DIR`` or ``./runs``; the kernel gets it as
    ``FOUNDRY_RUNS_DIR`` and opens that store read-only. No ``token``: a random one. No
    ``port``: a free one (``server.port``). Logs go to ``log_dir`` (default
    ``RUNS_DIR/logs``, or a temporary folder if that is not writable).

    At most ``max_kernels`` viewers at once (one kernel each); the next gets HTTP 503 and a
    "busy, try again" page. A kernel is shut down once it has been idle for
    ``unconnected_cull_s`` seconds if no page ever connected to it, ``cull_idle_s`` after
    its page closed, ``connected_cull_s`` with its page open (0: never). ``cull_idle_s=0``
    turns culling off (only for tests that show why it is on).
    """
    secret = check_token(token)
    check_max_kernels(max_kernels)
    return _start_with_port(
        lambda chosen: dashboard_process(
            runs_dir,
            port=chosen,
            token=secret,
            notebook=notebook,
            log_dir=log_dir,
            cull_idle_s=cull_idle_s,
            cull_interval_s=cull_interval_s,
            startup_timeout=startup_timeout,
            max_kernels=max_kernels,
            unconnected_cull_s=unconnected_cull_s,
            connected_cull_s=connected_cull_s,
        ),
        port,
    )


def lab_process(
    root_dir: Path | str | None,
    *,
    port: int,
    token: str,
    log_dir: Path | None = None,
    startup_timeout: float = 90.0,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """The JupyterLab server, configured but not started (see :func:`serve_lab`)."""
    root = Path(root_dir).expanduser().absolute() if root_dir else Path.cwd()
    if not root.is_dir():
        raise ServerError(f"lab root {root} is not a folder")
    secret = check_token(token)
    logs = log_dir or Path(tempfile.mkdtemp(prefix="foundry-logs-"))
    state = Path(tempfile.mkdtemp(prefix="foundry-lab-"))
    config_file = state / "jupyter_foundry_config.json"
    _write_private_json(config_file, lab_config(secret))
    # Lab's runtime files hold the token (server info, the browser-open link): keep them
    # in the private state folder, which stop() removes, instead of ~/.local/share/jupyter
    runtime = state / "runtime"
    runtime.mkdir(mode=0o700)
    argv = lab_argv(
        root, port=port, config_file=config_file, extra_args=extra_args, runtime_dir=runtime
    )
    return ServerProcess(
        kind="lab",
        argv=argv,
        port=port,
        token=secret,
        env=_child_env({**(env or {}), "JUPYTER_RUNTIME_DIR": str(runtime)}),
        cwd=root,
        log_path=logs / f"lab-{port}.log",
        state_dir=state,
        auth_probe="/api/status",
        url_path="/lab",
        startup_timeout=startup_timeout,
    )


def serve_lab(
    root_dir: Path | str | None = None,
    *,
    port: int | None = None,
    token: str | None = None,
    log_dir: Path | None = None,
    startup_timeout: float = 90.0,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Serve JupyterLab on 127.0.0.1 with a token and strict origins, rooted at ``root_dir``
    (default: the current folder), and return the started server.

    ``extra_args`` adds ``--Class.name=value`` settings (e.g. ``--LabApp.user_settings_dir``
    for a test profile) but may not touch the safety settings; ``env`` adds environment
    variables (e.g. ``FOUNDRY_RUNS_DIR``) for the server and its kernels. Logs go to
    ``log_dir`` (default a temporary folder). Kernels are not culled: they may be training.
    """
    secret = check_token(token)
    check_extra_args(extra_args)
    return _start_with_port(
        lambda chosen: lab_process(
            root_dir,
            port=chosen,
            token=secret,
            log_dir=log_dir,
            startup_timeout=startup_timeout,
            extra_args=extra_args,
            env=env,
        ),
        port,
    )


# --- command line -------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Add ``dashboard`` and ``lab`` to ``foundry``'s sub-commands (``handler`` defaults)."""
    dash = subparsers.add_parser(
        "dashboard", help="serve the read-only results dashboard (Voila) on 127.0.0.1"
    )
    dash.add_argument(
        "--runs-dir", type=Path, help="run store (default: $FOUNDRY_RUNS_DIR or ./runs)"
    )
    dash.add_argument("--port", type=int, help="port (default: a free one, printed)")
    dash.add_argument(
        "--token", help="access token (default: a random one; a token typed here shows in ps)"
    )
    dash.add_argument(
        "--max-kernels",
        type=int,
        default=DEFAULT_MAX_KERNELS,
        help=f"most viewers at once, one kernel (~80 MiB) each; the next gets a 'busy, try "
        f"again' page (default: {DEFAULT_MAX_KERNELS})",
    )
    dash.set_defaults(handler=_dashboard_command)

    lab = subparsers.add_parser("lab", help="start JupyterLab on 127.0.0.1 with a token")
    lab.add_argument("--port", type=int, help="port (default: a free one, printed)")
    lab.add_argument("--token", help="access token (default: a random one)")
    lab.add_argument("--root-dir", type=Path, help="folder Lab shows (default: current folder)")
    lab.set_defaults(handler=_lab_command)


def _dashboard_command(args: argparse.Namespace) -> int:
    server = serve_dashboard(
        args.runs_dir, port=args.port, token=args.token, max_kernels=args.max_kernels
    )
    return _serve_foreground(server, "Foundry dashboard (read-only)")


def _lab_command(args: argparse.Namespace) -> int:
    server = serve_lab(args.root_dir, port=args.port, token=args.token)
    return _serve_foreground(server, "JupyterLab")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` stops the server (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_foreground(server: ServerProcess, title: str, out: IO[str] | None = None) -> int:
    """Print the URL, run until Ctrl-C/SIGTERM or until the server dies; always stop it."""
    stream = out or sys.stdout
    with server, _sigterm_as_interrupt():
        print(f"{title} on {server.base_url}", file=stream)
        print(f"open: {server.url}", file=stream)
        print(f"log: {server.log_path}  (Ctrl-C to stop)", file=stream, flush=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            print("stopping…", file=stream, flush=True)
            return 0
    print(
        f"foundry: error: the server exited with code {code}; see {server.log_path}",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m foundry_kernel.servers dashboard|lab ...`` (same as ``foundry ...``)."""
    parser = argparse.ArgumentParser(prog="foundry", description="Foundry's servers")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except FoundryError as exc:
        print(f"foundry: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
