"""Foundry's gate in front of every route of a vLLM server that Foundry starts.

Why it exists: vLLM's own ``VLLM_API_KEY`` check covers only paths under ``/v1``. A vLLM
server also registers ``/invocations`` (SageMaker), ``/tokenize``, ``/detokenize``,
``/metrics``, ``/load``, ``/version``, ``/ping``, the docs, and whatever a later release adds,
and none of them looks at the key or at the ``Host`` header. ``POST /invocations`` returns
the teacher's prompt log-probabilities, so anyone who can reach the port (another local
user, or a web page through DNS rebinding, since no Host check is done) could extract the
teacher. This module is an ASGI middleware that vLLM loads through its documented
``--middleware`` option; vLLM adds user middleware after its own, so this one is the
outermost layer and sees every request before any route, mounted app or other middleware.

What it lets through, for HTTP and WebSocket alike:

* a ``Host`` header naming a loopback server (``127.0.0.0/8``, ``[::1]`` or
  ``localhost``) *and* the port this socket accepted the connection on (taken from the
  ASGI ``scope['server']``, so it cannot drift from the real port); anything else, a
  missing or repeated Host included, is answered ``421 Misdirected Request``. A page that
  reaches the port through DNS rebinding sends its own domain as Host and is refused. (A
  tunnel or proxy in front must keep the port, ``ssh -L 8000:127.0.0.1:8000``, or rewrite
  the Host header.)
* then only ``GET``/``HEAD /health`` without a key (Foundry's and vLLM's health check; it
  says nothing but "up"); every other path and method needs ``Authorization: Bearer KEY``,
  compared in constant time (``hmac.compare_digest``), or is answered ``401``. With no key
  configured every such request is refused (fail closed).

Refusals carry a fixed body that never echoes the request, and close the connection; the
request body is never read. A WebSocket handshake that is refused is closed before it is
accepted (the server answers it with ``403``).

It also writes the application's route table (paths, methods, kinds, recursing into
mounted apps) to the file named by ``$FOUNDRY_VLLM_GUARD_ROUTES`` at start-up and at the
first request, so the launcher can knock on every route the running vLLM registered,
whatever its version, and refuse to use a server whose gate is not closed.

This file must import on its own in vLLM's environment, which does not have Foundry
installed: standard library only. The launcher puts its folder on the server's
``PYTHONPATH`` and passes ``--middleware foundry_vllm_guard.FoundryGuard``. The key comes
from ``$VLLM_API_KEY`` (the same variable vLLM reads; never argv).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_ENV = "VLLM_API_KEY"
ROUTES_ENV = "FOUNDRY_VLLM_GUARD_ROUTES"
OPEN_PATHS = frozenset({"/health"})  # answered without the key (GET/HEAD only)
OPEN_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = frozenset({"localhost"})
IPV6_LOOPBACK = ipaddress.IPv6Address("::1")
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

UNAUTHORIZED = 401
MISDIRECTED = 421
BODIES = {
    UNAUTHORIZED: b'{"error":"unauthorized"}',
    MISDIRECTED: b'{"error":"misdirected request"}',
}
WS_POLICY_VIOLATION = 1008


def host_allowed(host: bytes, port: int, scheme: str = "http") -> bool:
    """Whether a ``Host`` header value names this loopback server on ``port``.

    Accepts ``localhost``, an IPv4 literal in 127.0.0.0/8 or ``[::1]``, each with the
    port (or none when ``port`` is the scheme's default). Names that only *resolve* to a
    loopback address are refused: under DNS rebinding that name is the attacker's.
    """
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    bracketed = text.startswith("[")
    if bracketed:
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return False
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_part = text.partition(":")
        if ":" in port_part:
            return False
        port_text = port_part if colon else None
    if port_text is None:
        given = DEFAULT_PORTS.get(scheme)
    elif port_text.isascii() and port_text.isdigit():
        given = int(port_text)
    else:
        return False
    if given != port:
        return False
    if name in LOOPBACK_NAMES and not bracketed:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if bracketed:  # only IPv6 goes in brackets, and only ::1 is its loopback
        return address == IPV6_LOOPBACK
    return isinstance(address, ipaddress.IPv4Address) and address.is_loopback


def key_matches(authorization: bytes, key: bytes) -> bool:
    """``Authorization: Bearer KEY`` with the right key, compared in constant time."""
    if not key:
        return False  # no key configured: nobody is authorised (fail closed)
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token, key)


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [bytes(v) for k, v in scope.get("headers", []) if bytes(k).lower() == name]


def verdict(scope: Scope, key: bytes) -> int | None:
    """None to let the request through, else the status that refuses it."""
    server = scope.get("server")
    hosts = _header_values(scope, b"host")
    if not server or server[1] is None or len(hosts) != 1:
        return MISDIRECTED
    if not host_allowed(hosts[0], int(server[1]), str(scope.get("scheme", "http"))):
        return MISDIRECTED
    if (
        scope["type"] == "http"
        and scope.get("path") in OPEN_PATHS
        and scope.get("method") in OPEN_METHODS
    ):
        return None
    auth = _header_values(scope, b"authorization")
    if len(auth) != 1 or not key_matches(auth[0], key):
        return UNAUTHORIZED
    return None


def route_table(app: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Every route of a Starlette/FastAPI app: path, methods, kind; mounted apps too."""
    table: list[dict[str, Any]] = []
    for route in list(getattr(app, "routes", None) or []):
        path = prefix + str(getattr(route, "path", ""))
        methods = sorted(getattr(route, "methods", None) or [])
        table.append({"path": path, "methods": methods, "kind": type(route).__name__})
        inner = getattr(route, "routes", None)
        if inner:
            table.extend(route_table(route, path.rstrip("/")))
    return table


def write_routes(app: Any, target: str) -> None:
    """Write ``app``'s route table as JSON to ``target`` atomically (never half a file)."""
    folder = Path(target).parent
    folder.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"pid": os.getpid(), "routes": route_table(app)}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".routes-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


class FoundryGuard:
    """The ASGI middleware vLLM instantiates as ``FoundryGuard(app)`` (see module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.key = os.environ.get(KEY_ENV, "").encode("utf-8")
        self.routes_file = os.environ.get(ROUTES_ENV) or None
        self._recorded_at_request = False
        if not self.key:
            print(
                f"foundry_vllm_guard: ${KEY_ENV} is empty: every request but /health is refused",
                file=sys.stderr,
                flush=True,
            )

    def _record(self, scope: Scope) -> None:
        if self.routes_file is None or "app" not in scope:
            return
        try:
            write_routes(scope["app"], self.routes_file)
        except OSError as exc:  # the launcher then refuses the server: no table, no trust
            print(f"foundry_vllm_guard: cannot write the route table: {exc}", file=sys.stderr)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            self._record(scope)
            await self.app(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            raise RuntimeError(f"foundry_vllm_guard: unknown ASGI scope type {kind!r}")
        if not self._recorded_at_request:
            self._recorded_at_request = True
            self._record(scope)
        status = verdict(scope, self.key)
        if status is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        else:
            await _refuse(send, status)


async def _refuse(send: Send, status: int) -> None:
    body = BODIES[status]
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
    ]
    if status == UNAUTHORIZED:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
