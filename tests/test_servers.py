"""`foundry dashboard` (Voila) and `foundry lab` (JupyterLab) against real servers on 127.0.0.1.

What these tests prove (issue 7, "Security"): both servers listen on 127.0.0.1 only,
refuse requests without the token, refuse cookie-authenticated requests from a foreign
Origin (HTTP and websocket) and foreign Host headers, never allow a wildcard origin;
the dashboard strips sources and hides tracebacks; widget messages sent to the
dashboard's kernel (as any viewer's browser could) change nothing in the run store and
run no code; kernels from page loads do not pile up (culling, measured); a taken port is
an error naming the port; nothing is left running afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from jupyter_server.services.kernels.connection.base import deserialize_binary_message
from test_report import build_demo_store, db_fingerprint
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from foundry_kernel import supervisor
from foundry_kernel.store import DB_FILENAME
from foundry_kernel.supervisor import HOST, ServerError, ServerProcess
from widgets import launchers as servers

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
FOREIGN = "http://evil.example"


# --- helpers ------------------------------------------------------------------------------


def get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects NOT followed (a 302 to /login is the answer we want)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=180)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def login_cookie(port: int, path: str, token: str) -> str:
    """The cookie a browser keeps after opening a ``?token=`` link."""
    status, headers, _ = get(port, f"{path}?token={token}")
    assert status == 200, status
    cookie = headers["set-cookie"]
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie
    return cookie.split(";", 1)[0]


def kernels_of(server: ServerProcess) -> list[psutil.Process]:
    """The server's live ipykernel children."""
    assert server.pid is not None
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.is_running() and "ipykernel" in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.Error:
            continue
    return alive


def listen_addresses(proc: psutil.Process) -> set[str]:
    return {c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def row_counts(root: Path) -> dict[str, int]:
    uri = (root / DB_FILENAME).as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("runs", "metrics", "events")
        }


def tiny_notebook(path: Path) -> Path:
    """A notebook whose second cell fails: fast page loads, and a traceback to hide."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell("# tiny page"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise RuntimeError('secret-detail-' + 'xyz')"),
    ]
    nbformat.write(nb, path)
    return path


def _message(
    msg_type: str,
    content: dict[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    channel: str = "shell",
    session: str = "viewer",
) -> str:
    """A Jupyter message as the browser sends it on the kernel websocket (JSON protocol)."""
    return json.dumps(
        {
            "header": {
                "msg_id": uuid.uuid4().hex,
                "msg_type": msg_type,
                "username": "viewer",
                "session": session,
                "date": datetime.now(timezone.utc).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": metadata or {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
    )


async def _ws(
    port: int, kernel_id: str, *, query: str = "", headers: dict[str, str] | None = None
) -> WebSocketClientConnection:
    url = f"ws://{HOST}:{port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
    return await websocket_connect(
        HTTPRequest(url + query, headers=headers or {}), max_message_size=256 * 1024 * 1024
    )


async def _read_until(
    conn: WebSocketClientConnection, stop: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Messages until one of type ``stop`` arrives (binary frames decoded too)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(conn.read_message(), deadline - time.monotonic())
        assert raw is not None, "websocket closed"
        msg = deserialize_binary_message(raw) if isinstance(raw, bytes) else json.loads(raw)
        seen.append(msg)
        if msg["header"]["msg_type"] == stop:
            return seen
    raise AssertionError(f"no {stop} within {timeout} s")


async def _read_until_idle(
    conn: WebSocketClientConnection, msg_id: str, timeout: float = 60
) -> list[dict[str, Any]]:
    """Messages until the kernel reports idle after the request ``msg_id``."""
    seen: list[dict[str, Any]] = []
    while True:
        seen += await _read_until(conn, "status", timeout)
        last = seen[-1]
        if (
            last["parent_header"].get("msg_id") == msg_id
            and last["content"].get("execution_state") == "idle"
        ):
            return seen


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After every server in this module stopped, no child process of ours is left."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    extra = [p for p in me.children(recursive=True) if p.pid not in before]
    assert not extra, [p.cmdline() for p in extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("servers") / "runs"
    ids = build_demo_store(root)
    ids["root"] = root
    return ids


@pytest.fixture(scope="module")
def dash(runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("dash-logs")
    # the tests below reuse one page's kernel for a while without keeping it connected
    with servers.serve_dashboard(
        runs["root"], log_dir=logs, cull_idle_s=600, unconnected_cull_s=600
    ) as server:
        yield server
    assert not server.is_running()
    assert not server.state_dir.exists()  # the token's config file is gone


@pytest.fixture(scope="module")
def page(dash: ServerProcess) -> dict[str, Any]:
    """One real page load with the token (it starts the dashboard's kernel)."""
    started = time.perf_counter()
    status, _, body = get(dash.port, f"/?token={dash.token}")
    seconds = time.perf_counter() - started
    html = body.decode("utf-8")
    match = re.search(r'"kernelId": "([0-9a-f-]{36})"', html)
    assert status == 200 and match, status
    rss_mb = sum(k.memory_info().rss for k in kernels_of(dash)) / 2**20
    ARTIFACTS.mkdir(exist_ok=True)
    figures = {"page_load_seconds": round(seconds, 2), "dashboard_kernel_rss_mb": round(rss_mb)}
    (ARTIFACTS / "dashboard-page.json").write_text(json.dumps(figures, indent=1))
    print("dashboard page:", figures)
    return {"html": html, "kernel_id": match.group(1), "seconds": seconds}


# --- unit: argument lists and config ------------------------------------------------------


def test_voila_argv_is_safe_and_secret_free(tmp_path: Path) -> None:
    argv = servers.voila_argv(tmp_path / "d.ipynb", port=8123, config_dir=tmp_path)
    # run under the lifeline (it dies with its launcher), Voila in the same process
    assert argv[:6] == [sys.executable, "-m", "foundry_kernel._lifeline", "--", "-m", "voila"]
    for flag in (
        "--Voila.ip=127.0.0.1",
        "--port=8123",
        "--Voila.port_retries=0",
        "--strip_sources=True",
        "--show_tracebacks=False",
        "--no-browser",
        f"--Voila.config_file_paths={tmp_path}",
        f"--MappingKernelManager.cull_idle_timeout={servers.CULL_IDLE_S}",
        "--MappingKernelManager.cull_connected=False",
        f"--DashboardKernelManager.max_kernels={servers.DEFAULT_MAX_KERNELS}",
        "--VoilaConfiguration.allow_template_override=NO",
    ):
        assert flag in argv
    assert not any("*" in arg or "token" in arg.lower() for arg in argv)
    config = servers.voila_config("T" * 20)
    settings = config["Voila"]["tornado_settings"]
    assert settings["allow_remote_access"] is False
    assert settings["allow_origin"] == "" and settings["allow_origin_pat"] == ""
    assert config["Voila"]["token"] == "T" * 20
    assert "*" not in json.dumps(config)


def test_lab_argv_is_safe_and_secret_free(tmp_path: Path) -> None:
    argv = servers.lab_argv(tmp_path, port=8124, config_file=tmp_path / "c.json", allow_root=False)
    for flag in (
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=8124",
        "--ServerApp.port_retries=0",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.allow_origin=",
        "--ServerApp.disable_check_xsrf=False",
        "--ServerApp.allow_unauthenticated_access=False",
    ):
        assert flag in argv
    assert "--allow-root" not in argv
    assert "--allow-root" in servers.lab_argv(
        tmp_path, port=1, config_file=tmp_path, allow_root=True
    )
    assert not any("*" in arg or "token" in arg.lower() for arg in argv)


@pytest.mark.parametrize(
    "extra",
    [
        "--ServerApp.ip=0.0.0.0",
        "--ip=0.0.0.0",
        "--IdentityProvider.token=",
        "--ServerApp.allow_origin=*",
        "--ServerApp.allow_origin_pat=.*",
        "--ServerApp.allow-remote-access=True",
        "--ServerApp.tornado_settings={}",
        "--ServerApp.disable_check_xsrf=True",
        "--port=80",
        "--config=/tmp/evil.py",
        "notebook.ipynb",
    ],
)
def test_lab_extra_args_cannot_undo_the_safe_defaults(extra: str, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="extra server argument"):
        servers.lab_argv(tmp_path, port=1, config_file=tmp_path, extra_args=[extra])


@pytest.mark.parametrize("bad", ["", "short", "x" * 20 + " ", "a" * 20 + "&next=/", "ä" * 20])
def test_bad_tokens_are_refused(bad: str) -> None:
    with pytest.raises(ServerError, match="--token"):
        supervisor.check_token(bad)


def test_generated_tokens_are_long_and_fresh() -> None:
    first, second = supervisor.check_token(None), supervisor.check_token(None)
    assert first != second and len(first) >= 40


# --- dashboard: auth, origins, host, address ----------------------------------------------


def test_dashboard_refuses_requests_without_the_token(dash: ServerProcess) -> None:
    kernels = len(kernels_of(dash))
    status, headers, _ = get(dash.port, "/")
    assert status == 302 and headers["location"].startswith("/login")
    status, headers, _ = get(dash.port, "/?token=" + "x" * 43)
    assert status == 302 and headers["location"].startswith("/login")
    assert get(dash.port, "/api/kernels/" + str(uuid.uuid4()))[0] == 403
    assert len(kernels_of(dash)) == kernels  # no kernel was started for them


def test_dashboard_page_with_the_token(page: dict[str, Any]) -> None:
    html = page["html"]
    assert "Foundry dashboard" in html  # the notebook's markdown
    assert "application/vnd.jupyter.widget-view+json" in html  # the widgets
    # sources stripped: no code of the notebook reaches the page
    assert "build_dashboard" not in html and "runs_dir or None" not in html


def test_dashboard_refuses_foreign_origins_and_hosts(
    dash: ServerProcess, page: dict[str, Any]
) -> None:
    kernel_url = f"/api/kernels/{page['kernel_id']}"
    cookie = login_cookie(dash.port, kernel_url, dash.token)
    same = {"Cookie": cookie, "Origin": f"http://{HOST}:{dash.port}"}
    assert get(dash.port, kernel_url, same)[0] == 200
    assert get(dash.port, kernel_url, {"Authorization": f"token {dash.token}"})[0] == 200
    # the logged-in browser's cookie does not help a page from another origin
    assert get(dash.port, kernel_url, {"Cookie": cookie, "Origin": FOREIGN})[0] == 404
    # a state-changing request without the XSRF token (a cross-site form) is refused too
    assert get(dash.port, kernel_url, {"Cookie": cookie}, method="DELETE")[0] == 403
    # a foreign Host header (DNS rebinding) is refused even with the token
    assert get(dash.port, f"/?token={dash.token}", {"Host": "evil.example"})[0] == 403

    async def websockets() -> None:
        ok = await _ws(dash.port, page["kernel_id"], headers=same)
        ok.close()
        for headers in ({"Cookie": cookie, "Origin": FOREIGN}, {"Origin": f"http://{HOST}"}):
            with pytest.raises(HTTPClientError) as refused:
                await _ws(dash.port, page["kernel_id"], headers=headers)
            assert refused.value.code in (403, 404)

    asyncio.run(websockets())
    assert "Blocking Cross Origin" in dash.log_tail(200)


def test_dashboard_listens_on_localhost_only(dash: ServerProcess, page: dict[str, Any]) -> None:
    assert dash.pid is not None
    assert listen_addresses(psutil.Process(dash.pid)) == {HOST}
    for kernel in kernels_of(dash):
        assert listen_addresses(kernel) <= {HOST}
    assert dash.url == f"http://{HOST}:{dash.port}/?token={dash.token}"


def test_dashboard_token_stays_private(dash: ServerProcess) -> None:
    assert dash.pid is not None
    assert dash.token not in " ".join(psutil.Process(dash.pid).cmdline())
    assert stat.S_IMODE(dash.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((dash.state_dir / "voila.json").stat().st_mode) == 0o600
    assert dash.token not in dash.log_path.read_text(encoding="utf-8")


# --- dashboard: the kernel is read-only -----------------------------------------------------


def test_widget_messages_cannot_change_the_store_or_run_code(
    dash: ServerProcess, page: dict[str, Any], runs: dict[str, Any], tmp_path: Path
) -> None:
    """Act as a hostile viewer on the kernel websocket: every widget message the page
    could send (and some it would not) is delivered; the store stays byte-identical."""
    root = runs["root"]
    marker = tmp_path / "pwned"
    before, counts = db_fingerprint(root), row_counts(root)

    async def attack() -> dict[str, Any]:
        conn = await _ws(dash.port, page["kernel_id"], query=f"&token={dash.token}")
        control = uuid.uuid4().hex
        conn.write_message(
            _message(
                "comm_open",
                {"comm_id": control, "target_name": "jupyter.widget.control", "data": {}},
                metadata={"version": "1.0.0"},
            )
        )
        conn.write_message(
            _message("comm_msg", {"comm_id": control, "data": {"method": "request_states"}})
        )
        seen = []
        while True:
            msg = (await _read_until(conn, "comm_msg"))[-1]
            if msg["content"]["data"].get("method") == "update_states":
                states = msg["content"]["data"]["states"]
                state_bytes = len(json.dumps(states))
                break
        dropdowns = {mid: s for mid, s in states.items() if s["model_name"] == "DropdownModel"}
        code = f"open({str(marker)!r}, 'w').write('x')"
        conn.write_message(_message("execute_request", {"code": code, "silent": False}))
        for model_id, model in dropdowns.items():
            for index in range(len(model["state"]["_options_labels"])):
                conn.write_message(
                    _message(
                        "comm_msg",
                        {
                            "comm_id": model_id,
                            "data": {
                                "method": "update",
                                "state": {"index": index},
                                "buffer_paths": [],
                            },
                        },
                    )
                )
            conn.write_message(
                _message(
                    "comm_msg",
                    {
                        "comm_id": model_id,
                        "data": {"method": "update", "state": {"index": 10**6}, "buffer_paths": []},
                    },
                )
            )
        for model_id in states:
            for data in (
                {"method": "custom", "content": {"event": "click"}},
                {
                    "method": "update",
                    "state": {"value": code, "description": code},
                    "buffer_paths": [],
                },
                {"method": "request_state"},
            ):
                conn.write_message(_message("comm_msg", {"comm_id": model_id, "data": data}))
        conn.write_message(
            _message(
                "comm_open",
                {
                    "comm_id": uuid.uuid4().hex,
                    "target_name": "jupyter.widget",
                    "data": {
                        "state": {
                            "_model_name": "ButtonModel",
                            "_model_module": "@jupyter-widgets/controls",
                            "_model_module_version": "2.0.0",
                            "_view_name": "ButtonView",
                            "_view_module": "@jupyter-widgets/controls",
                            "_view_module_version": "2.0.0",
                            "description": code,
                        },
                        "buffer_paths": [],
                    },
                },
                metadata={"version": "2.1.0"},
            )
        )
        conn.write_message(_message("inspect_request", {"code": code, "cursor_pos": 1}))
        # shell messages are handled in order, and a request's "idle" status comes after
        # everything its predecessors published: seeing it means all of the above was handled
        info = _message("kernel_info_request", {})
        conn.write_message(info)
        seen += await _read_until_idle(conn, json.loads(info)["header"]["msg_id"])
        conn.close()
        return {"dropdowns": dropdowns, "states": states, "seen": seen, "bytes": state_bytes}

    result = asyncio.run(attack())
    types = [m["header"]["msg_type"] for m in result["seen"]]
    assert len(result["dropdowns"]) >= 2  # run picker and batch picker
    assert result["bytes"] < 2_000_000  # a page's whole widget state stays small
    # the callbacks did run (new charts were sent for each chosen run) ...
    assert types.count("comm_open") >= 4, types
    # ... but no code ran and nothing was written
    assert not {"execute_reply", "execute_input", "execute_result", "inspect_reply"} & set(types)
    assert not marker.exists()
    assert db_fingerprint(root) == before and row_counts(root) == counts
    log = dash.log_path.read_text(encoding="utf-8")
    assert 'type "execute_request", which is not allowed' in log
    assert page["kernel_id"] in {k for k in _kernel_ids(dash)}  # the kernel survived


def _kernel_ids(server: ServerProcess) -> set[str]:
    ids = set()
    for kernel in kernels_of(server):
        match = re.search(r"kernel-([0-9a-f-]{36})\.json", " ".join(kernel.cmdline()))
        if match:
            ids.add(match.group(1))
    return ids


# --- dashboard: kernels do not pile up ----------------------------------------------------


def _load_pages(server: ServerProcess, count: int) -> list[int]:
    """``count`` page loads with the token; live kernels after each."""
    live = []
    for _ in range(count):
        status, _, body = get(server.port, f"/?token={server.token}")
        assert status == 200
        assert b"secret-detail-xyz" not in body  # tracebacks hidden
        live.append(len(kernels_of(server)))
    return live


def test_kernels_from_page_loads_are_culled(runs: dict[str, Any], tmp_path: Path) -> None:
    notebook = tiny_notebook(tmp_path / "tiny.ipynb")
    started = time.perf_counter()
    with servers.serve_dashboard(
        runs["root"], notebook=notebook, cull_idle_s=0, log_dir=tmp_path
    ) as no_culling:
        piled = _load_pages(no_culling, 5)
    assert piled == [1, 2, 3, 4, 5]  # the problem: every visit leaves a kernel behind

    loads = 15
    with servers.serve_dashboard(
        runs["root"], notebook=notebook, cull_idle_s=2, cull_interval_s=1, log_dir=tmp_path
    ) as culled:
        t0 = time.perf_counter()
        live = _load_pages(culled, loads)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while kernels_of(culled) and time.perf_counter() - t1 < 20:
            time.sleep(0.25)
        drained_s = time.perf_counter() - t1
        remaining = len(kernels_of(culled))
    figures = {
        "page_loads": loads,
        "seconds_per_load": round(load_s / loads, 2),
        "live_kernels_after_each_load": live,
        "max_live_kernels": max(live),
        "kernels_left_after_drain": remaining,
        "drain_seconds": round(drained_s, 1),
        "cull_idle_s": 2,
        "cull_interval_s": 1,
        "without_culling_after_5_loads": piled[-1],
        "test_seconds": round(time.perf_counter() - started, 1),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "kernel-culling.json").write_text(json.dumps(figures, indent=1))
    print("kernel culling:", figures)
    assert remaining == 0
    # bounded by (idle + interval) / seconds per load + 1, far below one per visit
    bound = int((2 + 1) / max(load_s / loads, 0.2)) + 2
    assert max(live) <= min(bound, loads - 5), figures


# --- port handling ------------------------------------------------------------------------


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Another web server that answers like a Jupyter server without a token would."""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/login")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held by another HTTP server, which a launcher must not mistake for its own."""
    server = http.server.HTTPServer((HOST, 0), _Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_taken_port_is_a_clear_error(
    runs: dict[str, Any], taken_port: int, tmp_path: Path
) -> None:
    with pytest.raises(ServerError, match=f"port {taken_port} on 127.0.0.1 is already in use"):
        servers.serve_dashboard(runs["root"], port=taken_port, log_dir=tmp_path)
    # and if the port is taken after our check, Voila itself (port_retries=0) fails on it
    # instead of silently moving to the next port, and the other server's 302 is not
    # mistaken for ours
    server = servers.dashboard_process(
        runs["root"], port=taken_port, token="t" * 32, log_dir=tmp_path
    )
    with pytest.raises(ServerError, match=f"port {taken_port} on 127.0.0.1 is already in use"):
        server.start()
    assert not server.is_running() and not server.state_dir.exists()
    with pytest.raises(ServerError, match="--port must be"):
        supervisor.ensure_port_free(70000)


# --- the command line ---------------------------------------------------------------------


def _read_url(proc: subprocess.Popen[str], timeout: float) -> str:
    """The ``open: URL`` line the command prints, read without blocking forever."""
    found: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("open: "):
                found.append(line.split(" ", 1)[1].strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found, "no URL printed"
    return found[0]


def test_foundry_dashboard_command_serves_and_stops_on_sigterm(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable,
        "-m",
        "widgets.launchers",
        "dashboard",
        "--runs-dir",
        str(runs["root"]),
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path
    )
    try:
        url = _read_url(proc, 90)
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]{40,})", url)
        assert match, url
        port = int(match.group(1))
        assert get(port, "/")[0] == 302
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_foundry_dashboard_command_reports_bad_input(taken_port: int, tmp_path: Path) -> None:
    assert servers.main(["dashboard", "--runs-dir", str(tmp_path), "--token", "abc"]) == 2
    code = servers.main(["dashboard", "--runs-dir", str(tmp_path), "--port", str(taken_port)])
    assert code == 2


# --- JupyterLab ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("lab-root")
    settings = f"--LabApp.user_settings_dir={root / 'settings'}"
    with servers.serve_lab(
        root, log_dir=root / "logs", extra_args=[settings], env={"FOUNDRY_RUNS_DIR": str(root)}
    ) as server:
        assert server.pid is not None
        proc = psutil.Process(server.pid)
        assert settings in proc.cmdline() and proc.environ()["FOUNDRY_RUNS_DIR"] == str(root)
        yield server
    assert not server.is_running() and not server.state_dir.exists()


def test_lab_requires_the_token(lab: ServerProcess) -> None:
    assert get(lab.port, "/api/status")[0] == 403
    assert get(lab.port, "/api/kernels")[0] == 403
    status, headers, _ = get(lab.port, "/lab")
    assert status == 302 and headers["location"].startswith("/login")
    assert get(lab.port, "/api/status", {"Authorization": f"token {lab.token}"})[0] == 200
    assert get(lab.port, f"/lab?token={lab.token}")[0] == 200
    assert lab.url == f"http://{HOST}:{lab.port}/lab?token={lab.token}"


def test_lab_refuses_foreign_origins_hosts_and_xsrf(lab: ServerProcess) -> None:
    cookie = login_cookie(lab.port, "/api/status", lab.token)
    assert (
        get(lab.port, "/api/kernels", {"Cookie": cookie, "Origin": f"http://{HOST}:{lab.port}"})[0]
        == 200
    )
    assert get(lab.port, "/api/kernels", {"Cookie": cookie, "Origin": FOREIGN})[0] == 404
    assert get(lab.port, "/api/kernels", {"Cookie": cookie}, method="POST")[0] == 403
    assert get(lab.port, f"/api/status?token={lab.token}", {"Host": "evil.example"})[0] == 403
    assert "Blocking Cross Origin" in lab.log_tail(200)


def test_lab_listens_on_localhost_only_and_keeps_the_token_private(lab: ServerProcess) -> None:
    assert lab.pid is not None
    proc = psutil.Process(lab.pid)
    assert listen_addresses(proc) == {HOST}
    assert lab.token not in " ".join(proc.cmdline())
    assert "JUPYTER_TOKEN" not in proc.environ()
    assert lab.token not in lab.log_path.read_text(encoding="utf-8")
