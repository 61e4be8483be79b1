"""Run control inside a REAL Jupyter kernel (ipykernel, driven through jupyter_client).

This is what the in-kernel design has to prove, since a unit test in pytest's own process
cannot: a run started from a cell keeps training after the cell returns; later cells and
widget callbacks (real ipywidgets comm messages, as a browser click sends them) are
served promptly while it trains; cancel from a cell lands within one step; the state is
readable from any cell; ``await handle`` works in a cell.

What the kernel trains is one fixture, :func:`kernel_job`. Today it is a small real torch
loop defined in the kernel. Swapping in the real pipeline is a one-line change there:
``return REAL_PIPELINE`` instead of ``return TORCH_LOOP``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config_dict

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.blocking.client import BlockingKernelClient  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT_S = 1.0  # a cell or a widget callback must be served within this while training


# --------------------------------------------------------------------------- what trains


@dataclass(frozen=True)
class KernelJob:
    """How a cell sets up and starts the run under test."""

    setup: str  # run once in the kernel before starting (imports, job definition)
    config: dict[str, Any]  # the run's config, as a notebook would pass it
    job: str  # name of the job in the kernel; "None" = pipeline.run_job
    step_s: float  # rough seconds per optimizer step (bounds the cancel latency)
    loss_key: str = "loss"  # the metric the job reports its training loss under

    def start_cell(self) -> str:
        return f"h = control.start(load_config({self.config!r}), job={self.job})"


TORCH_LOOP = KernelJob(
    setup='''
import time, torch
from foundry_kernel.run import _control as control
from foundry_kernel.config import load_config

def kernel_job(config, *, store, run_id, ctx, resume=False):
    """A real (tiny) training loop: matmuls, backward, SGD, checks between batches."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    head = torch.nn.Linear(256, 1)
    target = torch.randn(256, 1)
    opt = torch.optim.SGD([*layer.parameters(), *head.parameters()], lr=0.01)
    ctx.set_phase("train", max_steps=100_000)
    for step in range(1, 100_001):
        for _ in range(2):  # micro-batches; a cancel is seen between them
            ctx.check()
            x = torch.randn(256, 256)
            loss = ((head(torch.tanh(layer(x))) - x @ target) ** 2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.03)
        store.log_metrics(run_id, step, {"train/loss": loss.item()})
        ctx.heartbeat()
        ctx.emit("step", step=step, max_steps=100_000, loss=loss.item())
    return {"steps": step}
''',
    config={"device": "cpu"},
    job="kernel_job",
    step_s=0.07,
)

REAL_PIPELINE = KernelJob(
    setup="""
from foundry_kernel.run import _control as control
from foundry_kernel.config import load_config
import foundry_kernel.run._job  # import transformers & co. now, not inside the timed cell
""",
    config=tiny_config_dict(
        Path(os.environ.get("FOUNDRY_TEST_CACHE", ".")) / "kernel-runs",
        limits={"max_steps": 100_000},
        eval={"baseline": False, "every_steps": 50},
        checkpoint={"every_steps": None},
    ),
    job="None",
    step_s=1.0,
    loss_key="train/loss",
)


def test_the_real_pipeline_swap_is_a_valid_config() -> None:
    """Keeps the one-line swap honest: REAL_PIPELINE's config must at least validate."""
    from foundry_kernel.config import load_config

    assert load_config(REAL_PIPELINE.config).limits.max_steps == 100_000


@pytest.fixture
def kernel_job() -> KernelJob:
    """The job the kernel runs: Foundry's real pipeline (tiny models, cached tiny teacher)."""
    return REAL_PIPELINE


# --------------------------------------------------------------------------- kernel plumbing


@dataclass
class Kernel:
    client: BlockingKernelClient
    runs_dir: Path

    def run(self, code: str, timeout: float = 60) -> tuple[str, float]:
        """Execute a cell; return its stdout and the wall time until its reply."""
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        t0 = time.monotonic()
        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        elapsed = time.monotonic() - t0
        content = reply["content"]
        if content["status"] != "ok":
            raise AssertionError(
                f"cell failed: {content.get('ename')}: {content.get('evalue')}\n"
                + "\n".join(content.get("traceback", []))
            )
        return "".join(out), elapsed

    def json(self, expr: str) -> tuple[Any, float]:
        """Evaluate ``expr`` in the kernel and bring its JSON value back."""
        text, elapsed = self.run(f"import json as _j; print(_j.dumps(({expr}), default=str))")
        return json.loads(text.strip().splitlines()[-1]), elapsed

    def send_comm_msg(self, comm_id: str, data: dict[str, Any]) -> None:
        """What a browser sends when a widget is clicked."""
        msg = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.client.shell_channel.send(msg)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    runs = tmp_path_factory.mktemp("kernel-runs")
    env = {**os.environ, "FOUNDRY_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO)}
    # The venv's "python3" kernelspec says argv[0] = "python", which jupyter_client
    # replaces with sys.executable: the kernel runs on this venv's interpreter.
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env=env, cwd=str(REPO))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield Kernel(client, runs)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)


def _wait_for(kernel: Kernel, expr: str, timeout: float = 30) -> Any:
    """Poll the kernel (one small cell at a time) until ``expr`` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value, _ = kernel.json(expr)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {expr!r} in the kernel")


# --------------------------------------------------------------------------- tests


def test_kernel_runs_on_this_venv(kernel: Kernel) -> None:
    executable, _ = kernel.json("__import__('sys').executable")
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    version, _ = kernel.json("__import__('ipykernel').__version__")
    assert version.startswith("7.")


def test_run_trains_after_the_cell_returns_while_cells_and_clicks_stay_prompt(
    kernel: Kernel, kernel_job: KernelJob
) -> None:
    kernel.run(kernel_job.setup)
    _, start_cell_s = kernel.run(kernel_job.start_cell())
    assert start_cell_s < PROMPT_S, start_cell_s  # the cell returned; the run goes on

    first = _wait_for(kernel, "h.step if (h.step or 0) >= 2 else None", timeout=120)
    # A widget, as the panel will have one: its callback reads the run's state.
    kernel.run(
        "import time, ipywidgets as widgets\n"
        "clicks = []\n"
        "btn = widgets.Button(description='status')\n"
        "btn.on_click(lambda b: clicks.append((time.monotonic(), str(h.state), h.step)))\n"
    )
    comm_id, _ = kernel.json("btn.model_id")

    cell_latencies, click_latencies = [], []
    for i in range(5):
        _, elapsed = kernel.run("_probe = (h.state, h.step, dict(h.metrics))")
        cell_latencies.append(elapsed)
        sent = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable across processes
        kernel.send_comm_msg(comm_id, {"method": "custom", "content": {"event": "click"}})
        clicked = _wait_for(kernel, f"clicks[{i}] if len(clicks) > {i} else None", 10)
        click_latencies.append(clicked[0] - sent)
        time.sleep(0.1)
    assert max(cell_latencies) < PROMPT_S, cell_latencies
    assert max(click_latencies) < PROMPT_S, click_latencies

    later, _ = kernel.json(
        f"{{'state': str(h.state), 'step': h.step, 'loss': h.metrics[{kernel_job.loss_key!r}]}}"
    )
    assert later["state"] == "running"
    assert later["step"] > first  # kept training across later cells
    states = {state for _, state, _ in kernel.json("clicks")[0]}
    assert states == {"running"}  # the callback could read the live state

    kernel.run(
        "t0, asked_at = time.monotonic(), h.step\n"
        "h.cancel()\n"
        "final = h.wait(30)\n"
        "cancel = {'state': str(final), 'asked_at': asked_at, 'stopped_at': h.step,\n"
        "          'latency_s': time.monotonic() - t0}\n"
    )
    cancel, _ = kernel.json("cancel")
    assert cancel["state"] == "cancelled"
    assert cancel["stopped_at"] - cancel["asked_at"] <= 1, cancel
    assert cancel["latency_s"] < kernel_job.step_s * 2 + 0.5, cancel
    state, _ = kernel.json("str(h.state), h.error.message")
    assert state[0] == "cancelled"
    assert "stopped after step" in state[1]
    print(
        f"kernel: cells {max(cell_latencies) * 1000:.0f} ms max, widget clicks "
        f"{max(click_latencies) * 1000:.0f} ms max, cancel {cancel['latency_s'] * 1000:.0f} ms "
        f"(asked at step {cancel['asked_at']}, stopped after {cancel['stopped_at']})"
    )


def test_await_a_run_in_a_cell_and_limits_fire_in_the_kernel(kernel: Kernel) -> None:
    kernel.run(TORCH_LOOP.setup)
    kernel.run(
        "import asyncio\n"
        "h2 = control.start(load_config({'limits': {'timeout_s': 0.6}}), job=kernel_job)\n"
        "state2 = await asyncio.wait_for(h2, 30)\n"
    )
    result, _ = kernel.json("str(state2), h2.error.message, len(control.list_runs())")
    assert result[0] == "timed_out"
    assert "limits.timeout_s" in result[1]
    assert result[2] >= 1
    threads, _ = _wait_for_threads_gone(kernel)
    assert threads == []


def _wait_for_threads_gone(kernel: Kernel) -> tuple[list[str], float]:
    expr = "[t.name for t in __import__('threading').enumerate() if t.name.startswith('foundry-')]"
    deadline = time.monotonic() + 10
    while True:
        names, elapsed = kernel.json(expr)
        if not names or time.monotonic() > deadline:
            return names, elapsed
        time.sleep(0.05)
