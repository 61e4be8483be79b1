"""The vLLM teacher for real: a managed server on 127.0.0.1, its client, and cleanup.

These tests start vLLM (the CPU wheel, in its own environment made by
``foundry teacher install-vllm``, as README's test command does) on the tiny
Foundry-built teacher. They check what the backend promises: token-id top-k
log-probabilities equal to transformers', retries on dropped connections and
5xx but not on 4xx, a cancel honoured while waiting, and no process left behind
after a normal stop, a cancel, a failed start or interpreter exit.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from conftest import tiny_config_dict

from foundry_kernel._context import RunContext
from foundry_kernel._models import load_causal_lm
from foundry_kernel.config import load_config
from foundry_kernel.data._blocks import build_data
from foundry_kernel.errors import RunCancelled, TeacherServerError
from foundry_kernel.paths import default_cache_dir
from foundry_kernel.run._control import run_sync
from foundry_kernel.store import RunStore
from foundry_kernel.supervisor import ServerProcess, free_port
from foundry_kernel.teachers._client import RetryPolicy, TeacherClient
from foundry_kernel.teachers._interface import HFTeacher, VLLMTeacher
from foundry_kernel.teachers._vllm_server import teacher_server
from foundry_kernel.training._evaluate import evaluate_lm

K = 24  # above vLLM's default of 20: the server must be started with --max-logprobs


@pytest.fixture(scope="module")
def server(vllm_teacher_dir: Path, vllm_python: Path) -> Iterator[ServerProcess]:
    with teacher_server(
        vllm_teacher_dir, max_logprobs=K, max_model_len=128, eager=True, python=vllm_python
    ) as srv:
        yield srv
    assert not srv.is_running()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[TeacherClient]:
    with TeacherClient(server.base_url, api_key=server.token) as c:
        yield c


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _servers() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])
    ]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


# --------------------------------------------------------------------------- answers


def test_topk_matches_transformers(client: TeacherClient, vllm_teacher_dir: Path) -> None:
    """fp32 prompt log-probabilities equal transformers' log_softmax, keyed by token id."""
    teacher = load_causal_lm(str(vllm_teacher_dir), device=torch.device("cpu"))
    ids = teacher.tokenizer("The list of built-in functions", return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    hf = HFTeacher(teacher.model, top_k=K).signal(None, ids, mask)
    served = VLLMTeacher(client, top_k=K).signal(None, ids, mask)
    n = ids.shape[1] - 1  # the last position has no next token in the prompt
    assert torch.equal(served.ids[0, :n], hf.ids[0, :n])
    assert torch.allclose(served.logprobs[0, :n], hf.logprobs[0, :n], atol=1e-4)
    full = teacher.model(ids).logits.log_softmax(-1)[0, :n]
    true = full.gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert served.label_logprobs is not None
    assert torch.allclose(served.label_logprobs[0, :n], true, atol=1e-4)


def test_generate_returns_token_ids(client: TeacherClient) -> None:
    greedy = client.generate([[5, 6, 7], [8, 9]], max_tokens=6, temperature=0.0)
    assert [len(g) for g in greedy] == [6, 6]
    assert greedy == client.generate([[5, 6, 7], [8, 9]], max_tokens=6, temperature=0.0)


def test_api_key_required(server: ServerProcess) -> None:
    """The server Foundry starts listens on 127.0.0.1 and refuses requests without its key."""
    assert server.base_url.startswith("http://127.0.0.1:")
    assert httpx.get(server.base_url + "v1/models").status_code == 401
    assert server.token not in " ".join(psutil.Process(server.pid).cmdline())


def test_4xx_is_not_retried(client: TeacherClient, server: ServerProcess) -> None:
    with pytest.raises(TeacherServerError) as err:
        client.prompt_topk([[1, 2, 3]], k=5000)  # beyond --max-logprobs
    assert err.value.status == 400 and client.retried == 0
    assert server.base_url.rstrip("/") in str(err.value)


# --------------------------------------------------------------------------- flaky networks


class _DroppingProxy:
    """A TCP proxy that closes the first ``drop`` connections at once, then forwards.

    It rewrites the Host header to the server's own port, as a reverse proxy would: the
    server's gate answers a Host naming another port with 421 (issue 15)."""

    def __init__(self, target_port: int, drop: int) -> None:
        self.target_port = target_port
        self.drop = drop
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            host = (
                f"Host: 127.0.0.1:{self.port}".encode(),
                f"Host: 127.0.0.1:{self.target_port}".encode(),
            )
            for a, b, rewrite in ((conn, upstream, host), (upstream, conn, None)):
                threading.Thread(target=_pipe, args=(a, b, rewrite), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket, rewrite: tuple[bytes, bytes] | None) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data.replace(*rewrite) if rewrite else data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_dropped_connections_are_retried(server: ServerProcess) -> None:
    proxy = _DroppingProxy(server.port, drop=2)
    policy = RetryPolicy(retries=3, backoff_s=0.05)
    try:
        with TeacherClient(
            f"http://127.0.0.1:{proxy.port}", api_key=server.token, policy=policy, model="teacher"
        ) as c:
            out = c.prompt_topk([[5, 6, 7, 8]], k=4)
        assert out[0].ids.shape == (1, 3, 4)
        assert c.retried == 2
    finally:
        proxy.close()


def test_retries_are_bounded(server: ServerProcess) -> None:
    proxy = _DroppingProxy(server.port, drop=100)
    policy = RetryPolicy(retries=2, backoff_s=0.05)
    try:
        with TeacherClient(
            f"http://127.0.0.1:{proxy.port}", api_key=server.token, policy=policy, model="teacher"
        ) as c:
            with pytest.raises(TeacherServerError, match="after 3 attempts"):
                c.prompt_topk([[5, 6, 7]], k=4)
        assert proxy.accepted == 3
    finally:
        proxy.close()


def test_5xx_is_retried_then_answered(server: ServerProcess) -> None:
    """A real HTTP front that fails twice with 503, then forwards to vLLM."""
    failures = {"left": 2}

    class Front(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if failures["left"] > 0:
                failures["left"] -= 1
                payload = json.dumps({"error": {"message": "overloaded"}}).encode()
                self.send_response(503)
            else:
                upstream = httpx.post(
                    server.base_url + self.path.lstrip("/"),
                    content=body,
                    headers={
                        "Authorization": self.headers["Authorization"],
                        "Content-Type": "application/json",
                    },
                )
                payload = upstream.content
                self.send_response(upstream.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        with TeacherClient(
            f"http://127.0.0.1:{front.server_port}",
            api_key=server.token,
            policy=RetryPolicy(retries=3, backoff_s=0.05),
            model="teacher",
        ) as c:
            out = c.prompt_topk([[5, 6, 7]], k=3)
        assert c.retried == 2 and out[0].ids.shape == (1, 2, 3)
    finally:
        front.shutdown()


def test_cancel_lands_during_backoff() -> None:
    """Nothing listens: the client backs off; a cancel ends the wait at once."""
    ctx = RunContext()
    policy = RetryPolicy(retries=10, backoff_s=5.0, connect_timeout_s=0.5)
    port = free_port()
    threading.Timer(0.5, ctx.cancel).start()
    t0 = time.monotonic()
    with TeacherClient(
        f"http://127.0.0.1:{port}",
        policy=policy,
        check=ctx.check,
        wait=ctx.wait_stop,
        model="teacher",
    ) as c:
        with pytest.raises(RunCancelled):
            c.prompt_topk([[1, 2]], k=2)
    assert time.monotonic() - t0 < 3.0


# --------------------------------------------------------------------------- no process left


def test_port_taken_is_a_clear_error(server: ServerProcess, vllm_teacher_dir: Path) -> None:
    with pytest.raises(TeacherServerError, match=f"port {server.port} .* already in use"):
        teacher_server(vllm_teacher_dir, port=server.port)


def test_cancel_during_startup_leaves_nothing(vllm_teacher_dir: Path, vllm_python: Path) -> None:
    ctx = RunContext()
    seen: list[psutil.Process] = []
    started = time.monotonic()
    before = set(_servers())  # the module's server is not ours to judge

    def check() -> None:
        for pid in set(_servers()) - before:
            seen.extend(p for p in _tree(pid) if p not in seen)
        if time.monotonic() - started > 8:
            ctx.cancel()
        ctx.check()

    with pytest.raises(RunCancelled):
        teacher_server(vllm_teacher_dir, eager=True, check=check, python=vllm_python)
    assert seen, "the server never started"
    assert not _alive(seen)


def test_failed_start_leaves_nothing(tmp_path: Path, vllm_python: Path) -> None:
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(TeacherServerError, match="exited with code") as err:
        teacher_server(bad, eager=True, python=vllm_python, startup_timeout=300)
    assert "log" in str(err.value)
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(bad) in " ".join(p.info["cmdline"] or [])
    ]
    assert not _alive(leftovers)


def test_interpreter_exit_stops_the_server(vllm_teacher_dir: Path, tmp_path: Path) -> None:
    """A script that starts a server and simply exits: atexit stops the whole tree."""
    report = tmp_path / "pids.json"
    script = (
        "import json, sys, psutil\n"
        "from pathlib import Path\n"
        "from foundry_kernel.teachers._vllm_server import teacher_server\n"
        "if __name__ == '__main__':\n"
        f"    srv = teacher_server(Path({str(vllm_teacher_dir)!r}), eager=True)\n"
        "    tree = [srv.pid] + [c.pid for c in psutil.Process(srv.pid).children(recursive=True)]\n"
        f"    Path({str(report)!r}).write_text(json.dumps(tree))\n"
        "    sys.exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pids = json.loads(report.read_text())
    assert len(pids) >= 2  # the API server and its engine core
    time.sleep(1.0)
    assert not [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]


# --------------------------------------------------------------------------- whole runs


def _vllm_run_config(runs_dir: Path, teacher_dir: Path, **distill: object) -> dict[str, object]:
    cfg = tiny_config_dict(
        runs_dir,
        teacher={"source": str(teacher_dir), "backend": "vllm"},
        loss={"top_k": 8},
        eval={"baseline": False},
    )
    cfg["distill"] = dict(distill)
    return cfg


def test_run_with_a_running_server(
    server: ServerProcess, vllm_teacher_dir: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """teacher.url, on-policy: the served teacher scores student samples, and the run's
    teacher numbers come from the server and equal transformers'."""
    monkeypatch.setenv("FOUNDRY_VLLM_API_KEY", server.token)
    on_policy = {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 8}
    cfg = _vllm_run_config(runs_dir, vllm_teacher_dir, mode="on_policy", on_policy=on_policy)
    cfg["teacher"]["url"] = server.base_url  # type: ignore[index]
    handle = run_sync(cfg)
    assert handle.state.value == "completed", handle.error
    with RunStore(runs_dir, read_only=True) as store:
        flags = [row.value for row in store.metrics(handle.id, "train/on_policy")]
    assert 0 < sum(flags) < len(flags)  # both kinds of step, scored by the served teacher
    summary = handle.result
    assert summary is not None and summary["teacher"]["backend"] == "vllm"
    local = load_causal_lm(str(vllm_teacher_dir), device=torch.device("cpu"))
    data = build_data(load_config(cfg).data, local.tokenizer, seed=0)
    hf = evaluate_lm(local.model, data.val, batch_size=4, max_batches=2)
    assert summary["teacher"]["val_loss"] == pytest.approx(hf["loss"], rel=1e-4)
    assert summary["teacher"]["params"] == local.params
    assert 0 <= summary["student"]["agreement"] <= 1
    # the served teacher's samples (greedy and seeded sampled, from the server's generate)
    # sit beside the student's, for the same prompt
    (row,) = summary["samples"]
    assert row["prompt"] == "The list"
    for role in ("teacher", "student"):
        assert len(row[role]) > 0 and len(row[f"{role}_sampled"]) > 0, row  # 4 new tokens
    assert summary["teacher"]["tokens_per_s"] > 0


def test_from_teacher_student_with_baseline_on_a_served_teacher(
    server: ServerProcess, vllm_teacher_dir: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A served teacher is loaded without weights (vLLM holds them): the student *and* the
    CE-only baseline cut from it must both load the real weights (the baseline once crashed
    with "Cannot copy out of meta tensor" after the whole distillation phase)."""
    monkeypatch.setenv("FOUNDRY_VLLM_API_KEY", server.token)
    cfg = _vllm_run_config(runs_dir, vllm_teacher_dir, mode="online")
    cfg["teacher"]["url"] = server.base_url  # type: ignore[index]
    cfg["student"] = {"init": "from_teacher", "num_layers": 1}
    cfg["eval"]["baseline"] = True  # type: ignore[index]
    handle = run_sync(cfg)
    assert handle.state.value == "completed", handle.error
    summary = handle.result
    assert summary is not None
    assert summary["baseline"]["params"] == summary["student"]["params"]
    assert summary["baseline"]["val_ppl"] > 0


def test_managed_server_run_leaves_nothing(vllm_teacher_dir: Path, runs_dir: Path) -> None:
    """No url: the run starts its own server, uses it, and stops it when the run ends."""
    before = set(_servers())
    cfg = _vllm_run_config(runs_dir, vllm_teacher_dir, mode="sequence")
    cfg["teacher"]["server"] = {"eager": True}  # type: ignore[index]
    cfg["distill"]["sequence"] = {"num_prompts": 4, "prompt_tokens": 8, "max_new_tokens": 8}  # type: ignore[index]
    handle = run_sync(cfg)
    assert handle.state.value == "completed", handle.error
    summary = handle.result
    assert summary is not None and summary["sequence"]["generated_tokens"] == 4 * 8
    assert summary["teacher_server"]["url"].startswith("http://127.0.0.1:")
    assert set(_servers()) <= before


def test_server_killed_mid_capture_fails_cleanly_then_resumes(
    server: ServerProcess,
    vllm_teacher_dir: Path,
    runs_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kill the teacher server while the logit cache is being captured: the client retries
    within its budget, the run fails with a message naming the server, the shards already
    written survive, and a rerun against a live server captures only what is missing."""
    doomed = teacher_server(vllm_teacher_dir, max_logprobs=8, max_model_len=128, eager=True)
    cfg = _vllm_run_config(runs_dir, vllm_teacher_dir, mode="offline", cache_shard_blocks=2)
    cfg["teacher"]["url"] = doomed.base_url  # type: ignore[index]
    cfg["teacher"]["server"] = {"retries": 2, "backoff_s": 0.2, "batch_blocks": 2}  # type: ignore[index]
    cfg["optim"]["batch_size"] = 2  # type: ignore[index]
    cfg["data"]["max_documents"] = 12  # type: ignore[index]  # ~100 requests: a few seconds
    monkeypatch.setenv("FOUNDRY_VLLM_API_KEY", doomed.token)
    # A cache folder of its own: an earlier session's complete cache would need no capture.
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "cache"))
    shards: list[Path] = []

    def kill_after_first_shards() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            shards[:] = sorted(default_cache_dir().glob("logits/*/shard-00001*.safetensors"))
            if shards:
                for p in _alive(_tree(doomed.pid)):
                    p.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_shards)
    killer.start()
    try:
        handle = run_sync(cfg)
    finally:
        killer.join()
        doomed.stop()
    assert handle.state.value == "failed"
    assert doomed.base_url.rstrip("/") in str(handle.error) and "attempts" in str(handle.error)
    folder = shards[0].parent
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    assert len(kept) >= 2

    monkeypatch.setenv("FOUNDRY_VLLM_API_KEY", server.token)
    cfg["teacher"]["url"] = server.base_url  # type: ignore[index]
    again = run_sync(cfg)
    assert again.state.value == "completed", again.error
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    assert {name: after[name] for name in kept} == kept  # resumed, not recaptured
    assert len(after) > len(kept)
    assert again.result is not None and again.result["logit_cache"]["path"] == str(folder)


def test_cli_serve_answers_and_stops_on_sigterm(vllm_teacher_dir: Path) -> None:
    """`foundry teacher serve`: prints where and with which key, answers, and SIGTERM stops
    it and its whole tree."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "foundry_kernel.cli",
            "teacher",
            "serve",
            "--model",
            str(vllm_teacher_dir),
            "--port",
            str(port),
            "--eager",
            "--max-logprobs",
            "32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while not any(ln.startswith("log:") for ln in lines):
            line = proc.stdout.readline()
            assert line, "\n".join(lines)
            lines.append(line.strip())
        key = next(ln for ln in lines if ln.startswith("API key")).rsplit(" ", 1)[-1]
        tree = _tree(proc.pid)
        with TeacherClient(f"http://127.0.0.1:{port}", api_key=key) as c:
            (out,) = c.prompt_topk([[5, 6, 7]], k=32)
        assert out.ids.shape == (1, 2, 32)
        # issue 15: the CLI's server is gated too (tests/test_vllm_security.py has the rest)
        base = f"http://127.0.0.1:{port}"
        body = {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 5}
        assert httpx.post(base + "/invocations", json=body).status_code == 401
        rebinding = {"Host": f"evil.example:{port}", "Authorization": f"Bearer {key}"}
        assert httpx.get(base + "/version", headers=rebinding).status_code == 421
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert code == 0
    time.sleep(1.0)
    assert not _alive(tree)
