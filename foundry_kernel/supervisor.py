"""A supervised server subprocess: the one way Foundry starts a long-lived child process.

Used by the vLLM teacher server (``teachers._vllm_server``) and by the workbench's Lab and
Voila launchers (``widgets.launchers``), through this public API only. What every such
child gets, by construction:

* an argument list, never a shell; listening on 127.0.0.1 only (:data:`HOST`);
* a secret (a random ``secrets.token_urlsafe`` token, :func:`new_token`) passed through a
  private file or the environment, never argv, so ``ps`` does not show it;
* a free port (:func:`free_port`) or a clear "port taken" error (:func:`ensure_port_free`),
  and a retry when another process grabs a picked port first (:func:`start_with_port`);
* health polling with a start-up timeout that a cancel interrupts;
* its output in a rotating log file;
* ``stop()`` = terminate, wait, kill of the whole process tree, on error and at
  interpreter exit too; a child run under :mod:`foundry_kernel._lifeline` also dies when
  its launcher is killed with SIGKILL (a pipe on its stdin only the launcher holds);
* :func:`serve_foreground`: print the URL, run until Ctrl-C/SIGTERM or the child dies,
  always stop it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import http.client
import json
import logging
import logging.handlers
import os
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

from foundry_kernel import _lifeline
from foundry_kernel.errors import FoundryError

__all__ = [
    "HOST",
    "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ServerError",
    "ServerProcess",
    "check_port",
    "check_token",
    "default_log_dir",
    "ensure_port_free",
    "free_port",
    "new_token",
    "serve_foreground",
    "sigterm_as_interrupt",
    "start_with_port",
    "with_lifeline",
    "write_private_json",
]

log = logging.getLogger("foundry.supervisor")


HOST = "127.0.0.1"


STARTUP_TIMEOUT_S = 60.0


STOP_TIMEOUT_S = 10.0


LOG_MAX_BYTES = 5 * 1024 * 1024


LOG_BACKUPS = 3


MIN_TOKEN_CHARS = 16


_TOKEN_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class ServerError(FoundryError):
    """A server could not be started (port taken, failed health check) or misbehaved."""


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


def write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a config file only its owner can read (it holds the token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)


class ServerProcess:
    """One server child process: start, health check, URL with token, clean stop.

    Use as a context manager (``with serve_dashboard(d) as server: ...``) or call
    :meth:`stop`; it is also stopped at interpreter exit. The child's output goes to a
    rotating log file (``log_path``), with the token masked, and the last lines are kept
    for error messages. The child's stdin is a pipe this process holds and never writes:
    a command wrapped by :func:`foundry_kernel._lifeline.wrap` stops when it closes, so the
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
                # run under foundry_kernel._lifeline stops then; others never read it
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


def default_log_dir(preferred: Path) -> Path:
    """``preferred`` if it can be created and written, else a fresh temporary folder."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="foundry-logs-"))


def start_with_port(build: Callable[[int], ServerProcess], port: int | None) -> ServerProcess:
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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


def serve_foreground(server: ServerProcess, title: str, out: IO[str] | None = None) -> int:
    """Print the URL, run until Ctrl-C/SIGTERM or until the server dies; always stop it."""
    stream = out or sys.stdout
    with server, sigterm_as_interrupt():
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


def with_lifeline(argv: Sequence[str], *, private_files: Sequence[Path] = ()) -> list[str]:
    """A ``[python, "-m", module, ...]`` command run under the lifeline, so the child dies
    with its launcher even when the launcher is SIGKILLed (``ServerProcess`` keeps the
    pipe's other end); ``private_files`` are created 0600 before the child starts."""
    return _lifeline.wrap(argv, private_files=private_files)
