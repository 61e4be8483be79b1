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
  widget errors and stderr by :class:`~widgets.voila_server.QuietKernelConnection`),
  no config files other than ours (a ``voila.py`` in the working directory would otherwise
  be *executed*), Foundry's page template (nothing fetched from a CDN; no ``?template=``
  override), and at most ``max_kernels`` kernels
  (:class:`~widgets.voila_server.DashboardKernelManager`: a load beyond it is
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
  with SIGKILL (:mod:`foundry_kernel._lifeline`: a pipe on the server's stdin that only the
  launcher holds).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import foundry_kernel
from foundry_kernel.errors import FoundryError
from foundry_kernel.paths import default_runs_dir
from foundry_kernel.supervisor import (
    HOST,
    STARTUP_TIMEOUT_S,
    ServerError,
    ServerProcess,
    check_port,
    check_token,
    default_log_dir,
    serve_foreground,
    start_with_port,
    with_lifeline,
    write_private_json,
)
from widgets.resources import shipped_notebook

__all__ = [
    "add_commands",
    "check_extra_args",
    "check_max_kernels",
    "dashboard_notebook",
    "dashboard_process",
    "lab_argv",
    "lab_process",
    "main",
    "minimal_env",
    "serve_dashboard",
    "serve_lab",
    "voila_argv",
    "voila_config",
]

log = logging.getLogger("foundry.launchers")


CULL_IDLE_S = 120  # a closed page's kernel (a network blip reconnects within seconds)


CULL_INTERVAL_S = 5


UNCONNECTED_CULL_S = 30  # no page ever connected: a browser connects seconds after render


CONNECTED_CULL_S = 3600  # a page left open but untouched for an hour


DEFAULT_MAX_KERNELS = 10  # ~80 MiB each (measured): under 1 GiB for ten viewers at once


MAX_KERNELS_LIMIT = 1000


#: The folder holding ``foundry_kernel`` and ``widgets`` (a checkout, or site-packages): put
#: on the servers' PYTHONPATH so their kernels import the same code as the launcher.
_PACKAGES_ROOT = Path(foundry_kernel.__file__).resolve().parents[1]


# Holds voila/templates/foundry: put on the dashboard server's JUPYTER_PATH.
JUPYTER_DATA = Path(__file__).resolve().parent / "jupyter"


DASHBOARD_TEMPLATE = "foundry"


def dashboard_notebook() -> Path:
    """The dashboard notebook shipped as package data (``widgets/notebooks``)."""
    return shipped_notebook("dashboard")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The Lab server's environment: ours, plus the repository on PYTHONPATH so the kernel
    imports the same ``foundry_kernel``/``widgets`` as the launcher, plus ``extra``.
    (Lab's kernels train models: they may need the user's credentials, e.g. ``HF_TOKEN``.)"""
    env = dict(os.environ)
    env.pop("JUPYTER_TOKEN", None)  # our config file is the only token source
    return _with_repo_path(env, extra)


def _with_repo_path(env: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    paths = [str(_PACKAGES_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
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
    """Voila's command line, run under :mod:`foundry_kernel._lifeline`. Nothing secret is
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
        f"--VoilaConfiguration.multi_kernel_manager_class=widgets.voila_server.{manager}",
        "--Voila.kernel_websocket_connection_class=widgets.voila_server.QuietKernelConnection",
        f"--{manager}.max_kernels={check_max_kernels(max_kernels)}",
        f"--{manager}.unconnected_timeout={int(unconnected_cull_s)}",
        f"--{manager}.connected_timeout={int(connected_cull_s)}",
        f"--MappingKernelManager.cull_idle_timeout={int(cull_idle_s)}",
        f"--MappingKernelManager.cull_interval={int(cull_interval_s)}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
    ]
    return with_lifeline(argv)


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
    :mod:`foundry_kernel._lifeline`. With ``runtime_dir`` (Lab's ``JUPYTER_RUNTIME_DIR``),
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
    return with_lifeline(argv + extras, private_files=private)


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
    logs = log_dir or default_log_dir(root / "logs")
    state = Path(tempfile.mkdtemp(prefix="foundry-voila-"))
    write_private_json(state / "voila.json", voila_config(secret))
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

    ``runs_dir`` defaults to :func:`~foundry_kernel.paths.default_runs_dir`; the kernel gets it as
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
    return start_with_port(
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
    write_private_json(config_file, lab_config(secret))
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
    return start_with_port(
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


def add_commands(subparsers: Any) -> None:
    """Add ``dashboard`` and ``lab`` to ``foundry``'s sub-commands (``handler`` defaults)."""
    dash = subparsers.add_parser(
        "dashboard", help="serve the read-only results dashboard (Voila) on 127.0.0.1"
    )
    dash.add_argument(
        "--runs-dir", type=Path, help="run store (default: $FOUNDRY_RUNS_DIR, the project's runs/)"
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
    dash.add_argument(
        "--export",
        type=Path,
        metavar="REPORT.html",
        help="write one self-contained HTML report (tables, charts with plotly.js inline, "
        "samples, warnings) that opens with no network and no server, then exit",
    )
    dash.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN_ID",
        help="with --export: the runs to include (default: every completed run)",
    )
    dash.set_defaults(handler=_dashboard_command)

    lab = subparsers.add_parser("lab", help="start JupyterLab on 127.0.0.1 with a token")
    lab.add_argument("--port", type=int, help="port (default: a free one, printed)")
    lab.add_argument("--token", help="access token (default: a random one)")
    lab.add_argument("--root-dir", type=Path, help="folder Lab shows (default: current folder)")
    lab.set_defaults(handler=_lab_command)


def _dashboard_command(args: argparse.Namespace) -> int:
    if args.runs and not args.export:
        raise ServerError("--runs chooses the runs of an --export report; add --export FILE.html")
    if args.export:
        from widgets.html_report import write_report

        path = write_report(args.runs_dir, args.export, args.runs)
        print(f"report written to {path.absolute()} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    server = serve_dashboard(
        args.runs_dir, port=args.port, token=args.token, max_kernels=args.max_kernels
    )
    return serve_foreground(server, "Foundry dashboard (read-only)")


def _lab_command(args: argparse.Namespace) -> int:
    server = serve_lab(args.root_dir, port=args.port, token=args.token)
    return serve_foreground(server, "JupyterLab")


def main(argv: Sequence[str] | None = None) -> int:
    """``foundry dashboard|lab ...`` (also ``python -m widgets.launchers dashboard|lab``)."""
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
