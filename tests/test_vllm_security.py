"""Penetration test, issue 15: the vLLM teacher server answered without its API key.

vLLM checks its key on ``/v1`` only; ``POST /invocations`` returned the teacher's
log-probabilities to anyone, ``/tokenize``, ``/metrics``, ``/version``... answered too, and
no Host check was done (DNS rebinding). These tests start ONE real vLLM server the way
Foundry does (``teacher_server``, the path of ``foundry teacher serve`` and of the managed
per-run server), read the route table that the running app registered (written by
Foundry's gate, so routes a later vLLM adds are covered), and knock on every route:
without the key, with a wrong key, with a rebinding Host, and with the key (not refused).

The second half is finding 6: ``$FOUNDRY_VLLM_API_KEY`` goes only to loopback, or to a
host the operator allows in ``$FOUNDRY_VLLM_KEY_HOSTS`` over https; tested with real local
HTTP servers (one of them an HTTP proxy, so a request can name a foreign host and still
only ever travel to 127.0.0.1).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import tiny_config_dict

from foundry_kernel.errors import TeacherServerError
from foundry_kernel.run._control import run_sync
from foundry_kernel.supervisor import ServerProcess, free_port
from foundry_kernel.teachers._client import KEY_HOSTS_ENV, TeacherClient, key_refusal
from foundry_kernel.teachers._vllm_guard import GUARD_DIR
from foundry_kernel.teachers._vllm_guard import foundry_vllm_guard as guard
from foundry_kernel.teachers._vllm_server import (
    FOREIGN_HOST,
    is_open,
    read_route_table,
    route_probes,
    teacher_server,
    verify_guard,
)

# Headers a refusal may carry: ours plus the two uvicorn always adds. Nothing from vLLM.
REFUSAL_HEADERS = {"content-type", "content-length", "connection", "www-authenticate"}
REFUSAL_HEADERS |= {"date", "server"}
KNOWN_OPEN_ROUTES = ["/invocations", "/tokenize", "/detokenize", "/metrics", "/load", "/version"]


@pytest.fixture(scope="module")
def server(vllm_teacher_dir: Path, vllm_python: Path) -> Iterator[ServerProcess]:
    with teacher_server(
        vllm_teacher_dir, max_logprobs=8, max_model_len=128, eager=True, python=vllm_python
    ) as srv:
        yield srv
    assert not srv.is_running()


@pytest.fixture(scope="module")
def routes(server: ServerProcess) -> list[dict[str, Any]]:
    return read_route_table(server)


@pytest.fixture
def web(server: ServerProcess) -> Iterator[httpx.Client]:
    # a generous read timeout: the first inference on a busy 2-core CPU took over 30 s once
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=180.0) as c:
        yield c


def _assert_refused(reply: httpx.Response, status: int, what: str) -> None:
    assert reply.status_code == status, f"{what}: HTTP {reply.status_code} {reply.text[:200]}"
    assert reply.content == guard.BODIES[status], what  # a fixed body: nothing leaks
    assert set(reply.headers) <= REFUSAL_HEADERS, f"{what}: {dict(reply.headers)}"


def _raw_status(port: int, request: bytes) -> str:
    """The status line a raw request gets (for Host headers httpx would not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


# --------------------------------------------------------------------------- the route table


def test_route_table_is_the_running_apps(routes: list[dict[str, Any]]) -> None:
    """The gate wrote the table of the app that is serving: the routes the report named are
    in it, and the docs routes are switched off."""
    paths = {r["path"] for r in routes}
    assert set(KNOWN_OPEN_ROUTES) | {"/v1/completions", "/health"} <= paths, sorted(paths)
    assert len(routes) >= 20
    assert not paths & {"/openapi.json", "/docs", "/redoc"}


def test_the_exploit_is_closed(server: ServerProcess, web: httpx.Client) -> None:
    """The report's request: POST /invocations without a key returned the teacher's
    prompt log-probabilities; now 401. With the key it still works."""
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 5}
    _assert_refused(web.post("/invocations", json=body), 401, "POST /invocations")
    rebinding = {"Host": f"{FOREIGN_HOST}:{server.port}"}
    _assert_refused(web.post("/invocations", json=body, headers=rebinding), 421, "rebinding")
    keyed = web.post("/invocations", json=body, headers={"Authorization": f"Bearer {server.token}"})
    assert keyed.status_code == 200 and keyed.json()["choices"][0]["prompt_logprobs"][1]


def test_every_route_refuses_without_the_key(
    server: ServerProcess, web: httpx.Client, routes: list[dict[str, Any]]
) -> None:
    """Every method of every registered route, and a path no route has, without the key,
    with a wrong key and with a non-Bearer scheme: 401 and the fixed body."""
    wrong_keys = [
        None,
        f"Bearer {server.token[:-1]}",
        f"Basic {server.token}",
        "Bearer",
        "Bearer x",
    ]
    timings: list[float] = []
    checked = 0
    for method, path in route_probes(routes):
        if is_open(method, path):
            continue
        for auth in wrong_keys:
            headers = {} if auth is None else {"Authorization": auth}
            t0 = time.perf_counter()
            reply = web.request(method, path, headers=headers)
            timings.append(time.perf_counter() - t0)
            _assert_refused(reply, 401, f"{method} {path} with {auth and auth.split()[0]!r}")
            checked += 1
    assert checked >= 4 * 25
    print(
        f"\n{checked} refusals; median {statistics.median(timings) * 1e3:.2f} ms, "
        f"max {max(timings) * 1e3:.2f} ms"
    )
    assert max(timings) < 2.0


def test_every_route_refuses_a_rebinding_host(
    server: ServerProcess, web: httpx.Client, routes: list[dict[str, Any]]
) -> None:
    """With the right key, a Host that is not this loopback server (a rebinding page's
    domain, another port, a look-alike name) gets 421 on every route, /health included."""
    port = server.port
    hosts = [
        f"{FOREIGN_HOST}:{port}",
        f"127.0.0.1.{FOREIGN_HOST}:{port}",
        f"localhost.{FOREIGN_HOST}:{port}",
        f"127.0.0.1:{port + 1}",
        "127.0.0.1",
    ]
    key = {"Authorization": f"Bearer {server.token}"}
    for method, path in route_probes(routes):
        for host in hosts:
            reply = web.request(method, path, headers={**key, "Host": host})
            _assert_refused(reply, 421, f"{method} {path} Host {host}")
    for request in (  # no Host at all (HTTP/1.0), and two of them
        f"GET /version HTTP/1.0\r\nAuthorization: Bearer {server.token}\r\n\r\n",
        f"GET /version HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: {FOREIGN_HOST}:{port}\r\n"
        f"Authorization: Bearer {server.token}\r\nConnection: close\r\n\r\n",
    ):
        assert _raw_status(port, request.encode()).split()[1] == "421", request


def test_every_route_answers_with_the_key(
    server: ServerProcess, web: httpx.Client, routes: list[dict[str, Any]]
) -> None:
    """With the key and a loopback Host nothing is refused by the gate. GET routes get a
    real GET; other routes a method they do not register, so the router answers 405 and no
    handler runs (some, like /scale_elastic_ep, would change the server)."""
    key = {"Authorization": f"Bearer {server.token}"}
    methods: dict[str, set[str]] = {}
    for route in routes:
        methods.setdefault(route["path"], set()).update(route["methods"] or [])
    for pattern, registered in methods.items():
        path = route_probes([{"path": pattern, "methods": ["GET"]}])[0][1]
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
            if "GET" in registered or not registered:
                reply = web.get(path, headers={**key, "Host": host})
            else:
                unused = next(m for m in ("PUT", "PATCH", "DELETE") if m not in registered)
                reply = web.request(unused, path, headers={**key, "Host": host})
                assert reply.status_code == 405, f"{unused} {path}: {reply.status_code}"
            assert reply.status_code not in (401, 421), f"{path}: {reply.status_code}"
            assert reply.content not in guard.BODIES.values(), path


def test_health_is_open_and_says_nothing(server: ServerProcess, web: httpx.Client) -> None:
    """Only GET/HEAD /health pass without the key (Foundry's and vLLM's health check)."""
    assert web.get("/health").status_code == 200 and web.get("/health").content == b""
    assert web.head("/health").status_code in (200, 405)  # vLLM registers GET only
    _assert_refused(web.post("/health"), 401, "POST /health")
    _assert_refused(web.get("/health/"), 401, "GET /health/")
    _assert_refused(web.get("/ping"), 401, "GET /ping (SageMaker health, not ours)")


def test_unregistered_paths_are_refused_too(server: ServerProcess, web: httpx.Client) -> None:
    """Paths that no route has (the docs, switched off; what a later vLLM might add): the
    gate does not depend on the route list, so they are refused without the key as well."""
    key = {"Authorization": f"Bearer {server.token}"}
    for path in ["/openapi.json", "/docs", "/redoc", "/v9/future", "/foundry/guard-probe"]:
        _assert_refused(web.get(path), 401, path)
        assert web.get(path, headers=key).status_code == 404, path


def test_start_up_self_check_knocks_on_every_route(
    server: ServerProcess, routes: list[dict[str, Any]]
) -> None:
    """What teacher_server runs before handing a server out, measured here."""
    report = verify_guard(server)
    assert report.routes == len(routes)
    assert report.requests >= 2 * len(routes)
    print(f"\nself-check: {report.routes} routes, {report.requests} requests", end=" ")
    print(f"in {report.seconds:.3f} s")
    assert report.seconds < 10.0


def test_self_check_refuses_an_open_server(tmp_path: Path) -> None:
    """A server that answers routes without the key (the old vLLM) fails the self-check,
    and one whose gate wrote no route table is refused too."""

    class Open(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            payload = b'{"prompt_logprobs": "the teacher"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer  # http.server's naming

        def log_message(self, *args: object) -> None:
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Open)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    table = tmp_path / "routes.json"
    fake = ServerProcess(
        kind="vllm",
        argv=[],
        port=front.server_port,
        token="k" * 32,
        env={guard.ROUTES_ENV: str(table)},
        cwd=tmp_path,
        log_path=tmp_path / "log",
        state_dir=tmp_path / "state",
        auth_probe="/",
    )
    try:
        with pytest.raises(TeacherServerError, match="wrote no route table"):
            read_route_table(fake, wait_s=0.2)
        table.write_text(json.dumps({"routes": [{"path": "/invocations", "methods": ["POST"]}]}))
        with pytest.raises(TeacherServerError, match=r"POST /invocations \(no key\): HTTP 200"):
            verify_guard(fake)
    finally:
        front.shutdown()


# --------------------------------------------------------------------------- the gate itself


PORT = 8123


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (f"127.0.0.1:{PORT}", True),
        (f"localhost:{PORT}", True),
        (f"LOCALHOST:{PORT}", True),
        (f"[::1]:{PORT}", True),
        (f"127.0.0.2:{PORT}", True),
        (f"{FOREIGN_HOST}:{PORT}", False),
        (f"127.0.0.1.{FOREIGN_HOST}:{PORT}", False),
        (f"localhost.:{PORT}", False),
        (f"127.0.0.1:{PORT + 1}", False),
        ("127.0.0.1", False),  # no port means 80
        (f"[127.0.0.1]:{PORT}", False),
        (f"[::ffff:127.0.0.1]:{PORT}", False),
        (f"::1:{PORT}", False),
        (f"0x7f.0.0.1:{PORT}", False),
        (f"127.1:{PORT}", False),
        (f"127.0.0.1:{PORT}:{PORT}", False),
        (f"127.0.0.1:+{PORT}", False),
        (f"127.0.0.1:{PORT}0", False),
        ("", False),
    ],
)
def test_host_check(host: str, allowed: bool) -> None:
    assert guard.host_allowed(host.encode(), PORT) is allowed


def test_host_check_default_port_and_non_ascii() -> None:
    assert guard.host_allowed(b"127.0.0.1", 80) is True
    assert guard.host_allowed("\uff4cocalhost:1".encode(), 1) is False  # a full-width l


def test_key_check_is_exact() -> None:
    key = b"s3cret-key-of-enough-length"
    assert guard.key_matches(b"Bearer " + key, key)
    assert guard.key_matches(b"bearer " + key, key)
    for bad in [b"", b"Bearer", b"Bearer ", b"Bearer " + key[:-1], b"Bearer " + key + b" ", key]:
        assert not guard.key_matches(bad, key), bad
    assert not guard.key_matches(b"Bearer ", b"")  # no key configured: nobody gets in


def test_websocket_routes_are_gated(vllm_python: Path, tmp_path: Path) -> None:
    """vLLM registers WebSocket routes for some models (/v1/realtime); a tiny app with one,
    served by the same uvicorn and Starlette as vLLM, in vLLM's environment, with the gate
    added the way vLLM adds it: a refused handshake never reaches the route."""
    (tmp_path / "gated_app.py").write_text(
        "from starlette.applications import Starlette\n"
        "from starlette.routing import WebSocketRoute\n"
        "from foundry_vllm_guard import FoundryGuard\n"
        "async def realtime(ws):\n"
        "    await ws.accept()\n"
        "    await ws.send_text('teacher')\n"
        "    await ws.close()\n"
        "app = Starlette(routes=[WebSocketRoute('/v1/realtime', realtime)])\n"
        "app.add_middleware(FoundryGuard)\n"
    )
    port, key = free_port(), "w" * 32
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": os.pathsep.join([str(tmp_path), str(GUARD_DIR)])})
    env["VLLM_API_KEY"] = key
    argv = [str(vllm_python), "-m", "uvicorn", "gated_app:app", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def handshake(host: str, auth: str | None) -> str:
        lines = [
            "GET /v1/realtime HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
        if auth:
            lines.append(f"Authorization: {auth}")
        return _raw_status(port, ("\r\n".join(lines) + "\r\n\r\n").encode()).split()[1]

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "uvicorn exited"
                time.sleep(0.2)
        local = f"127.0.0.1:{port}"
        assert handshake(local, f"Bearer {key}") == "101"  # the route is real and reachable
        assert handshake(local, None) == "403"
        assert handshake(local, "Bearer nope") == "403"
        assert handshake(f"{FOREIGN_HOST}:{port}", f"Bearer {key}") == "403"
    finally:
        proc.terminate()
        proc.wait(30)


# --------------------------------------------------------------------------- finding 6: the key


@pytest.mark.parametrize(
    ("url", "allow", "sent"),
    [
        ("http://127.0.0.1:8000", "", True),
        ("http://127.3.4.5:8000/v1", "", True),
        ("http://localhost:8000", "", True),
        ("http://[::1]:8000", "", True),
        ("https://127.0.0.1:8443", "", True),
        ("http://teacher.example:8000", "", False),
        ("http://teacher.example:8000", "teacher.example", False),  # never plain http
        ("https://teacher.example", "", False),
        ("https://teacher.example", "teacher.example", True),
        ("https://Teacher.Example:8443", "other.example, teacher.example:8443", True),
        ("https://teacher.example:8443", "teacher.example:443", False),
        ("https://teacher.example.evil.example", "teacher.example", False),
        ("http://127.0.0.1@evil.example:8000", "", False),  # userinfo, the host is evil
        ("http://127.0.0.1.evil.example:8000", "", False),
        ("http://10.0.0.5:8000", "10.0.0.5", False),
        ("ftp://127.0.0.1/", "", False),
        ("not a url", "", False),
    ],
)
def test_key_decision(url: str, allow: str, sent: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_HOSTS_ENV, allow)
    refusal = key_refusal(url)
    assert (refusal is None) is sent, refusal


class _Recorder(http.server.ThreadingHTTPServer):
    """A loopback HTTP server (and HTTP proxy: it answers absolute-form requests too) that
    records each request line and its headers and answers like vLLM's /v1/models, or 401
    when the request carries no Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                recorder.seen.append((self.requestline, dict(self.headers)))
                if "Authorization" in self.headers:
                    status, payload = 200, {"data": [{"id": "teacher"}]}
                else:
                    status, payload = 401, {"error": "Unauthorized"}
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    yield server
    server.shutdown()
    server.server_close()


def test_key_is_sent_to_a_loopback_server(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_HOSTS_ENV, raising=False)
    with TeacherClient(f"http://127.0.0.1:{recorder.server_port}", api_key="k" * 32) as c:
        assert c.model() == "teacher" and c.key_withheld is None
    assert recorder.seen[0][1]["Authorization"] == "Bearer " + "k" * 32


def test_key_for_a_loopback_server_bypasses_a_proxy(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $HTTP_PROXY set, httpx would hand a loopback request, key and all, to the
    proxy; the client goes straight to the loopback server instead."""
    proxy = _Recorder()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
        for name in ("http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        with TeacherClient(f"http://127.0.0.1:{recorder.server_port}", api_key="k" * 32) as c:
            assert c.model() == "teacher"
        assert len(recorder.seen) == 1 and not proxy.seen
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_key_is_not_sent_to_a_foreign_host(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config names http://teacher.example: the request really goes out (through the
    recorder as an HTTP proxy, so only to 127.0.0.1), without the key, even when the
    operator allowed the host (plain http); the 401 names the fix."""
    proxy = httpx.HTTPTransport(proxy=f"http://127.0.0.1:{recorder.server_port}")
    for allow in ("", "teacher.example"):
        monkeypatch.setenv(KEY_HOSTS_ENV, allow)
        with TeacherClient("http://teacher.example:8000", api_key="k" * 32, transport=proxy) as c:
            with pytest.raises(TeacherServerError, match=r"HTTP 401.*API key was not sent"):
                c.model()
    expected = "GET http://teacher.example:8000/v1/models HTTP/1.1"  # absolute form: a proxy
    assert [line for line, _ in recorder.seen] == [expected, expected]
    assert not [h for _, h in recorder.seen if "Authorization" in h]


def test_key_over_https_only_to_allowed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """https needs a certificate we cannot make for a foreign name here, so an httpx
    transport records what would be sent (no network at all)."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"data": [{"id": "teacher"}]})

    for allow, expected in (("", None), ("teacher.example", "Bearer " + "k" * 32)):
        monkeypatch.setenv(KEY_HOSTS_ENV, allow)
        with TeacherClient(
            "https://teacher.example", api_key="k" * 32, transport=httpx.MockTransport(record)
        ) as c:
            c.model()
        assert sent[-1].headers.get("Authorization") == expected


def test_a_run_does_not_send_the_operators_key_to_a_config_host(
    recorder: _Recorder,
    vllm_teacher_dir: Path,
    runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole run whose shared config points teacher.url at a foreign host: the key in
    $FOUNDRY_VLLM_API_KEY never leaves (the run's HTTP goes through the recording proxy,
    i.e. 127.0.0.1), and the run fails with a message that names the allow-list."""
    monkeypatch.setenv("FOUNDRY_VLLM_API_KEY", "operator-key-" + "k" * 20)
    monkeypatch.delenv(KEY_HOSTS_ENV, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{recorder.server_port}")
    for name in ("http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config_dict(
        runs_dir,
        teacher={"source": str(vllm_teacher_dir), "backend": "vllm"},
        loss={"top_k": 8},
        eval={"baseline": False},
    )
    cfg["distill"] = {"mode": "online"}
    cfg["teacher"]["url"] = "http://teacher.example:8000"
    handle = run_sync(cfg)
    assert handle.state.value == "failed"
    assert KEY_HOSTS_ENV in str(handle.error) and "401" in str(handle.error)
    assert recorder.seen and all("Authorization" not in h for _, h in recorder.seen)
    assert all("teacher.example" in line for line, _ in recorder.seen)
