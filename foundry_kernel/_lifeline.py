"""Run ``python -m MODULE ARGS`` in this process and stop it when its launcher dies.

Why this exists: ``foundry dashboard`` and ``foundry lab`` start their server in a new
session (so a Ctrl-C in the terminal reaches the launcher, which then stops the server
cleanly). A launcher killed with SIGKILL runs no clean-up at all, so the server used to
keep serving, token and all, with nobody left to stop it.

How: the launcher starts the server with a pipe on its standard input and never writes to
it. The operating system closes the launcher's end when the launcher dies, however it
dies, so the server reads end-of-file. This module, run as
``python -m foundry_kernel._lifeline [--private-file PATH] -- -m voila ...``:

1. takes the pipe off file descriptor 0 (the server sees ``/dev/null`` there, as before),
   and watches it in a daemon thread;
2. runs the server module *in this same process* with :mod:`runpy` (so the launcher's
   ``pid``, listening checks and ``ps`` output all still describe the server itself);
3. on end-of-file, sends this process SIGTERM (the servers' own clean shutdown), and
   if it is still alive ``GRACE_S`` later, kills its child processes and exits;
4. at any exit it can run clean-up for, terminates the child processes (kernels) the
   server left behind: Voila does not shut its kernels down when it stops.

Why a pipe and not ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the *thread*
that started the child ends, not the process (a server started from a worker thread would
be killed when that thread finishes), and it exists on Linux only. A pipe works the same
on every platform and for every way the launcher can end.

``--private-file PATH`` (``{pid}`` is replaced by this process's id) creates ``PATH``
empty with mode 0600 before the server starts: a server that later opens it for writing
keeps that mode (JupyterLab writes its token link into ``jpserver-PID-open.html`` with
the default, world-readable mode, and has no setting to not write it).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

__all__ = ["GRACE_S", "main", "wrap"]

GRACE_S = 10.0
REAP_TIMEOUT_S = 3.0
EXIT_LAUNCHER_GONE = 3


def wrap(
    argv: Sequence[str], *, private_files: Sequence[Path] = (), python: str = sys.executable
) -> list[str]:
    """``[python, "-m", module, *args]`` → the same command run under the lifeline."""
    args = list(argv)
    if len(args) < 3 or args[1] != "-m":
        raise ValueError(f"the lifeline runs 'PYTHON -m MODULE ...' commands, not {args[:3]!r}")
    extra: list[str] = []
    for path in private_files:
        extra += ["--private-file", str(path)]
    return [python, "-m", "foundry_kernel._lifeline", *extra, "--", *args[1:]]


def _take_stdin() -> int:
    """Move the launcher's pipe off fd 0 to a private (non-inheritable) descriptor."""
    watched = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)  # the server and its kernels see an empty stdin, as before
    finally:
        os.close(devnull)
    return watched


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs: Sequence[psutil.Process], timeout: float = REAP_TIMEOUT_S) -> None:
    """Terminate, wait, kill: the kernels (and anything else) the server started."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _reap_at_exit() -> None:
    _reap(_descendants())


def _watch(fd: int, grace: float) -> None:
    """Block until the launcher's end of the pipe closes, then stop this process."""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
    # Nobody reads our output any more (it went to the launcher): a write to that pipe
    # would raise BrokenPipeError, in this thread or in the server's shutdown code.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd_out in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd_out)
    os.close(devnull)
    if os.name == "nt":  # os.kill ends the process at once there: children first
        _reap(_descendants())
        os._exit(EXIT_LAUNCHER_GONE)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    _reap(_descendants(), timeout=1.0)  # the server ignored SIGTERM or hangs in shutdown
    os._exit(EXIT_LAUNCHER_GONE)


def _private_file(template: str) -> None:
    path = Path(template.replace("{pid}", str(os.getpid())))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundry_kernel._lifeline")
    parser.add_argument("--private-file", action="append", default=[], metavar="PATH")
    parser.add_argument("--grace", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- -m MODULE ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if len(command) < 2 or command[0] != "-m":
        parser.error("expected '-- -m MODULE [ARGS...]'")
    for template in args.private_file:
        _private_file(template)
    watched = _take_stdin()
    atexit.register(_reap_at_exit)
    threading.Thread(
        target=_watch, args=(watched, args.grace), name="foundry-lifeline", daemon=True
    ).start()
    module = command[1]
    sys.argv = [module, *command[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
