"""A torchrun worker for tests/test_distributed_job.py: real process groups, real store.

``job CONFIG OUT``: every rank runs ``run_job`` with its World. Rank 0 creates the run in
the store; the other ranks open that store **read-only**, so any write they attempted
(metrics, summary, events through the job) would fail the run: that is the test that only
rank 0 writes. Each rank writes ``OUT/rank-<r>.json`` (its returned summary).

``endpoint OUT``: each node's local rank 0 starts a real HTTP server that answers only
with its key (standing in for vLLM: same sharing logic, seconds instead of minutes);
every rank asks ``node_endpoint`` for its node's (url, key), calls it with the key and
without, and writes what it saw to ``OUT/endpoint-<r>.json``.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from foundry_kernel._context import RunContext
from foundry_kernel._world import close_world, init_world
from foundry_kernel.config import RunConfig
from foundry_kernel.run._job import node_endpoint, run_job
from foundry_kernel.store import RunStore


def _job(config_path: Path, out: Path) -> None:
    cfg = RunConfig.model_validate(json.loads(config_path.read_text(encoding="utf-8")))
    world = init_world(backend="gloo", timeout_s=cfg.distributed.timeout_s)
    other = os.environ.get("FOUNDRY_TEST_RANK1_CONFIG")  # a rank given other data, on purpose
    if other and world.rank == 1:
        cfg = RunConfig.model_validate(json.loads(Path(other).read_text(encoding="utf-8")))
    try:
        assert cfg.runs_dir is not None
        if world.is_main:
            store = RunStore(cfg.runs_dir)
            run_id = store.create_run(cfg.model_dump(mode="json")).run_id
            store.set_state(run_id, "running")
        world.barrier()
        if not world.is_main:
            store = RunStore(cfg.runs_dir, read_only=True)
        run_id = world.broadcast_object(run_id if world.is_main else None)
        summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id), world=world)
        if world.is_main:
            store.set_state(run_id, "completed")
        (out / f"rank-{world.rank}.json").write_text(
            json.dumps({"run_id": run_id, "summary": summary}, default=str), encoding="utf-8"
        )
        store.close()
    finally:
        close_world(world)


class _KeyedHandler(http.server.BaseHTTPRequestHandler):
    key = ""

    def do_GET(self) -> None:  # http.server's name
        ok = self.headers.get("Authorization") == f"Bearer {self.key}"
        body = json.dumps({"ok": ok, "port": self.server.server_address[1]}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


def _get(url: str, key: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _endpoint(out: Path) -> None:
    world = init_world(backend="gloo", timeout_s=60)
    server: http.server.ThreadingHTTPServer | None = None
    try:

        def start() -> tuple[str, str | None]:
            nonlocal server
            handler = type("Handler", (_KeyedHandler,), {"key": secrets.token_hex(8)})
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            return f"http://127.0.0.1:{server.server_address[1]}/v1", handler.key

        url, key = node_endpoint(world, start)
        seen = {
            "rank": world.rank,
            "node": world.node_rank,
            "url": url,
            "with_key": _get(url, key),
            "without_key": _get(url, "wrong"),
        }
        (out / f"endpoint-{world.rank}.json").write_text(json.dumps(seen), encoding="utf-8")
        world.barrier()  # no node's server stops while another rank may still call it
    finally:
        if server is not None:
            server.shutdown()
        close_world(world)


if __name__ == "__main__":
    if sys.argv[1] == "job":
        _job(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "endpoint":
        _endpoint(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown worker command {sys.argv[1]!r}")
