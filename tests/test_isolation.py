"""Concurrent runs share no process-global state; the model-build lock spans no download.

* Two real runs at once - different seeds, different ``threads``, one with dropout and
  on-policy sampling (both draw random numbers every step) - each end with exactly the
  weights of the same run made alone.
* ``threads`` is per run: each run's worker reports the count it asked for, at its start
  and at its end, whatever the other run set meanwhile.
* A hub download (from a real HTTP server on 127.0.0.1 that serves the weights slowly,
  through the real huggingface_hub client) runs outside ``MODEL_BUILD_LOCK``: another
  run's model builds while it downloads; and a cancel stops the download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from foundry_kernel import start
from foundry_kernel._isolation import run_threads, uses_dropout
from foundry_kernel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _dropout_student(folder: Path, teacher_dir: Path) -> Path:
    """A pretrained-style student with dropout in attention (SDPA's dropout_p): its
    training draws from torch's global generator at every step."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(5)
    model = LlamaForCausalLM(config)
    assert uses_dropout(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _configs(runs_dir: Path, student_dir: Path) -> list[dict[str, Any]]:
    on_policy = {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 8}
    a = tiny_config_dict(
        runs_dir,
        student={"init": "pretrained", "source": str(student_dir)},
        distill={"mode": "on_policy", "on_policy": on_policy},
        eval={"baseline": False},
        limits={"max_steps": 16},
    )
    a.update(seed=11, threads=1, name="a")
    b = tiny_config_dict(runs_dir, eval={"baseline": False}, limits={"max_steps": 16})
    b.update(seed=22, threads=2, name="b")
    return [a, b]


def _weights(handle: Any) -> dict[str, torch.Tensor]:
    assert str(handle.state) == "completed", handle.error
    return load_file(Path(handle.result["export_dir"]) / "model.safetensors")


def test_two_concurrent_runs_each_equal_their_solo_run(
    runs_dir: Path, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    configs = _configs(runs_dir, _dropout_student(tmp_path / "dropout-student", tiny_teacher_dir))
    solo = []
    for cfg in configs:
        handle = start(cfg)
        handle.wait(600)
        solo.append(handle)
    together = [start(cfg) for cfg in configs]
    for handle in together:
        handle.wait(600)
    overlap = min(h.ended_at or 0 for h in together) - max(h.started_at or 0 for h in together)
    assert overlap > 0, "the two runs did not run at the same time"
    for alone, concurrent, cfg in zip(solo, together, configs, strict=True):
        a, b = _weights(alone), _weights(concurrent)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"run {cfg['name']}: {name} differs"
        threads = concurrent.result["threads"]
        assert threads["used"] == threads["at_end"] == cfg["threads"], threads
        assert alone.result["student"]["val_loss"] == concurrent.result["student"]["val_loss"]
    assert solo[0].result["student"]["val_loss"] != solo[1].result["student"]["val_loss"]
    print(f"concurrent runs overlapped {overlap:.1f} s; weights equal their solo runs")


def test_thread_counts_are_per_run_and_restore_the_process_default() -> None:
    default = torch.get_num_threads()
    seen: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def run(name: str, threads: int) -> None:
        with run_threads(threads) as used:
            barrier.wait(10)  # both have set theirs before either reads it again
            seen[name] = [used, torch.get_num_threads()]
            barrier.wait(10)

    workers = [threading.Thread(target=run, args=(n, t)) for n, t in (("one", 1), ("two", 2))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert seen == {"one": [1, 1], "two": [2, 2]}
    assert torch.get_num_threads() == default  # the caller's thread kept its own
    fresh: list[int] = []
    late = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    late.start()
    late.join()
    assert fresh == [default]  # and threads created later get the process default back


def test_a_process_wide_thread_setting_refuses_a_conflicting_run() -> None:
    """Where torch's setting is process-wide (a non-OpenMP build), two live runs with
    different ``threads`` cannot both hold: the second is refused, naming the field."""
    default = torch.get_num_threads()
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with run_threads(1, per_thread=False):
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert holding.wait(10)
        with pytest.raises(ConfigError, match="threads") as info, run_threads(2, per_thread=False):
            pass
        assert info.value.field == "threads"
        with run_threads(1, per_thread=False) as used:  # the same setting is fine
            assert used == 1
    finally:
        release.set()
        worker.join(10)
        torch.set_num_threads(default)


# --------------------------------------------------------------------------- hub downloads

HUB_SCRIPT = r"""
import hashlib, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

teacher, mode = Path(sys.argv[1]), sys.argv[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
files = {p.name: p.read_bytes() for p in teacher.iterdir() if p.is_file()}
if mode == "cancel":  # a large weights file (fetched first: sorted names)
    files["model-0-large.safetensors"] = os.urandom(int(os.environ["LARGE_MB"]) << 20)
PIECE, PAUSE = 64 * 1024, float(os.environ["SLOW_PAUSE_S"])  # weights: a pause per piece

class Hub(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _file(self):
        parts = self.path.split("?")[0].split("/")
        return parts[-1] if "/resolve/" in self.path else None

    def _headers(self, name):
        body = files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"%s"' % hashlib.sha256(body).hexdigest())
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        return body

    def do_HEAD(self):
        name = self._file()
        if name not in files:
            self.send_error(404)
            return
        self._headers(name)

    def do_GET(self):
        if self.path.startswith("/api/models/"):
            info = {"id": "org/slow", "sha": COMMIT,
                    "siblings": [{"rfilename": n} for n in sorted(files)]}
            data = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        name = self._file()
        if name not in files:
            self.send_error(404)
            return
        body = self._headers(name)
        slow = name.endswith(".safetensors")
        try:
            for i in range(0, len(body), PIECE):
                self.wfile.write(body[i:i + PIECE])
                self.wfile.flush()
                if slow:
                    time.sleep(PAUSE)
        except (BrokenPipeError, ConnectionResetError):
            pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:%d" % server.server_address[1]

import torch
from foundry_kernel._context import RunContext
from foundry_kernel._models import MODEL_BUILD_LOCK, load_causal_lm, seeded_init
from foundry_kernel.errors import RunCancelled
from transformers import LlamaConfig, LlamaForCausalLM

out = {}
cpu = torch.device("cpu")
if mode == "lock":
    done = {}
    def download():
        t0 = time.monotonic()
        done["model"] = load_causal_lm("org/slow", device=cpu)
        done["download_s"] = time.monotonic() - t0
    loader = threading.Thread(target=download)
    loader.start()
    time.sleep(1.0)  # the download is under way
    t0 = time.monotonic()
    with MODEL_BUILD_LOCK:  # what every other run's build takes
        waited = time.monotonic() - t0
    small = seeded_init(lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2)), 0)
    built_s = time.monotonic() - t0
    out["still_downloading"] = loader.is_alive()
    loader.join(120)
    local = load_causal_lm(str(teacher), device=cpu)
    served, mine = done["model"].model.state_dict(), local.model.state_dict()
    out.update(lock_wait_s=waited, build_s=built_s, download_s=done["download_s"],
               same_weights=all(torch.equal(v, mine[k]) for k, v in served.items()))
else:
    ctx = RunContext()
    threading.Timer(1.0, ctx.cancel).start()
    t0 = time.monotonic()
    try:
        load_causal_lm("org/slow", device=cpu, check=ctx.check)
        out["cancelled"] = False
    except RunCancelled:
        out["cancelled"] = True
    out["latency_s"] = time.monotonic() - t0 - 1.0
    hub = Path(os.environ["HF_HOME"]) / "hub"
    out["weights_files"] = sorted(
        p.name for p in hub.rglob("*") if p.is_file() and p.stat().st_size > 100_000
    )
    out["snapshot_weights"] = [str(p) for p in hub.rglob("snapshots/*/model.safetensors")]
print(json.dumps(out))
"""


def _hub(
    tmp_path: Path, teacher_dir: Path, mode: str, pause_s: float, large_mb: int = 0
) -> dict[str, Any]:
    env = {
        "LARGE_MB": str(large_mb),
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "SLOW_PAUSE_S": str(pause_s),
    }
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    out = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(teacher_dir), mode],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_slow_hub_download_does_not_hold_the_model_build_lock(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    """The old load held MODEL_BUILD_LOCK across from_pretrained, downloads included:
    here another build would have waited the whole download."""
    assert (tiny_teacher_dir / "model.safetensors").stat().st_size > 64 * 1024
    got = _hub(tmp_path, tiny_teacher_dir, "lock", 3.0)  # 3 s after each 64 KB of weights
    print(
        f"download {got['download_s']:.1f} s; meanwhile the lock was taken in "
        f"{got['lock_wait_s'] * 1000:.0f} ms and a model built in {got['build_s'] * 1000:.0f} ms"
    )
    assert got["still_downloading"], got
    assert got["lock_wait_s"] < 0.5, got
    assert got["build_s"] < 2.0, got
    assert got["download_s"] > 2.5, got
    assert got["same_weights"], got


def test_a_cancel_stops_a_hub_download(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    """30 MB of weights at 8 MB/s: huggingface_hub reports progress per 10 MB, and that
    report is where the cancel (at 1 s) lands: within one 10 MB chunk (~1.3 s here)."""
    pause = (64 * 1024) / (8 << 20)
    got = _hub(tmp_path, tiny_teacher_dir, "cancel", pause, large_mb=30)
    print(f"LATENCY teacher/load (hub download) {got['latency_s'] * 1000:.0f} ms")
    assert got["cancelled"] is True, got
    assert got["latency_s"] < 2.0, got
    assert got["snapshot_weights"] == [], got  # no weights file under its final name
    print(json.dumps(got))
