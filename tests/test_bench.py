"""The benchmark suite runs: each benchmark once at a tiny size (``--quick``).

These tests prove that ``python -m bench`` works end to end and writes the JSON it
promises. They assert keys, statuses and that numbers are positive, never timings: the
figures themselves come from a full run on a quiet machine, not from CI.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LOSS_STATUSES = {"ok", "oom", "na", "error", "timeout"}
ALL = ("loss", "throughput", "overheads", "mfu", "cache", "scaling", "lora", "ui")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return env


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One ``python -m bench all --quick`` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_cli_prints_every_table_and_writes_strict_json(quick: tuple[dict[str, Any], str]) -> None:
    doc, stdout = quick
    for name in ALL:
        assert f"## {name}" in stdout
        assert name in doc
        assert doc["timings_s"][name] >= 0
    assert "| contender" in stdout and "wrote " in stdout
    meta = doc["meta"]
    assert meta["quick"] is True
    assert meta["which"] == list(ALL)
    for when in ("machine_before", "machine_after"):
        assert "load average" in meta[when]["uptime"]
    assert meta["environment"]["versions"]["torch"]
    assert meta["environment"]["torch_threads"] == 1


def test_loss_section(quick: tuple[dict[str, Any], str]) -> None:
    loss = quick[0]["loss"]
    assert set(loss["config"]) >= {"vocabs", "tokens", "hidden", "cap_bytes", "memory", "time"}
    rows = {r["contender"]: r for r in loss["results"]}
    assert set(rows) == set(loss["contenders"])
    for name, r in rows.items():
        assert r["status"] in LOSS_STATUSES, (name, r)
        assert {"scenario", "vocab", "tokens", "mem_vs_plain", "time_vs_plain"} <= set(r)
        if r["status"] == "ok":
            assert _positive(r["peak_bytes"]), (name, r)
            assert _positive(r["time_s"]), (name, r)
            assert r["method"] in ("VmHWM", "ru_maxrss", "cuda.max_memory_allocated")
            if not r["baseline"]:
                assert _positive(r["mem_vs_plain"]) and _positive(r["time_vs_plain"]), (name, r)
    # Ours, plain and TRL must run here; Liger runs or says why not (no CUDA driver).
    from bench.loss_memory import DIVERGENCES

    ours_logits = [f"ours_{stem}{sfx}" for stem in DIVERGENCES for sfx in ("", "_copy")]
    for name in ("plain_kl", "ours_kl_budget", "trl_gjsd", *ours_logits):
        assert rows[name]["status"] == "ok", rows[name]
    for name in ("plain_sparse_kl", "ours_sparse_kl", "ours_sparse_kl_copy"):
        assert rows[name]["status"] == "ok" and rows[name]["scenario"] == "sparse", rows[name]
    # In place and copy are the same loss on the same inputs, to the bit.
    for stem in (*DIVERGENCES, "sparse_kl"):
        assert rows[f"ours_{stem}"]["loss"] == rows[f"ours_{stem}_copy"]["loss"], stem
    assert rows["ours_sparse_kl"]["loss"] == pytest.approx(
        rows["plain_sparse_kl"]["loss"], rel=1e-4
    )
    for name in ("plain_kl_proj", "ours_fused_kl", "ours_fused_kl_budget", "trl_chunked"):
        assert rows[name]["status"] == "ok", rows[name]
    for name in ("liger_jsd", "liger_fused_jsd"):
        assert rows[name]["status"] in ("ok", "na"), rows[name]
        if rows[name]["status"] == "na":
            assert rows[name]["note"]
    # Same inputs, same loss: the contenders agree on the value (a check the table shows).
    assert rows["ours_kl"]["loss"] == pytest.approx(rows["plain_kl"]["loss"], rel=1e-4)
    assert rows["ours_kl_budget"]["loss"] == pytest.approx(rows["plain_kl"]["loss"], rel=1e-4)
    assert rows["ours_jsd"]["loss"] == pytest.approx(rows["trl_gjsd"]["loss"], rel=1e-4)
    for name in ("ours_fused_kl", "ours_fused_kl_budget", "trl_chunked"):
        assert rows[name]["loss"] == pytest.approx(rows["plain_kl_proj"]["loss"], rel=1e-4)
    assert len(loss["targets"]) == 5
    for t in loss["targets"]:
        assert t["fifth_of_plain"] and t["vs_liger"]
    from bench.loss_memory import targets_of

    summary = targets_of(loss)  # quick sizes: every goal named, none judged
    assert len(summary) == 2 * 4 + 2 * (len(DIVERGENCES) + 1)  # issue 6: not the copy
    assert all(t.met is None and "not measured" in t.figure for t in summary), summary


def test_throughput_section(quick: tuple[dict[str, Any], str]) -> None:
    section = quick[0]["throughput"]
    cfg = section["config"]
    assert cfg["tokens_per_step"] == cfg["batch"] * cfg["seq_len"]
    assert _positive(cfg["params"]["teacher"]) and _positive(cfg["params"]["student"])
    names = ("foundry", "foundry_logits", "foundry_nomask", "trl_gkd", "trl_distill", "plain")
    for name in names:
        r = section["results"][name]
        assert r["status"] == "ok", r
        assert _positive(r["tokens_per_s"])
        assert r["step_s"]["n"] == cfg["timed_steps_per_round"] * cfg["rounds"]
        assert _positive(r["first_loss"])
    # The strategies are compared through the Trainer's public switch, and it is honoured:
    # the default (auto) picks the fused loss for these Llama models.
    chosen = {n: section["results"][n]["loss_strategy"] for n in ("foundry", "foundry_logits")}
    assert chosen["foundry"]["strategy"] == "fused" and chosen["foundry"]["requested"] == "auto"
    assert chosen["foundry_logits"]["strategy"] == "logits"
    assert section["results"]["foundry_nomask"]["loss_strategy"]["strategy"] == "fused+nomask"
    # Same weights, same batches (Foundry's order, for TRL too), same forward KL: every
    # contender's first-step loss is foundry's, TRL's DistillationTrainer included.
    gaps = section["first_loss_gap_vs_foundry"]
    for name in names:
        assert gaps[name] is not None and gaps[name] < 1e-4, (name, gaps)
    # The TRL contenders say how they were configured: forward KL, fp32, no checkpointing.
    distill = section["results"]["trl_distill"]["trl"]
    assert distill["trainer"] == "trl.DistillationTrainer"
    assert distill["args"]["beta"] == 0.0 and distill["args"]["bf16"] is False
    assert distill["args"]["gradient_checkpointing"] is False
    assert "no off-policy setting" in distill["off_policy"]
    assert section["results"]["trl_gkd"]["trl"]["args"]["lmbda"] == 0.0
    assert section["faster_trl"] in ("trl_gkd", "trl_distill")
    for name in ("foundry", "foundry_logits", "foundry_nomask"):
        m = section["memory"][name]
        assert m["status"] == "ok", m
        assert _positive(m["peak_bytes"]) and m["method"] in ("VmHWM", "ru_maxrss")
    assert section["memory"]["foundry"]["loss_strategy"]["strategy"] == "fused"
    for key in (
        "foundry_vs_trl",
        "foundry_vs_trl_gkd",
        "foundry_vs_trl_distill",
        "foundry_vs_plain",
        "foundry_vs_foundry_logits",
        "memory_foundry_vs_foundry_logits",
    ):
        assert _positive(section["ratios"][key])
    assert "fused (foundry) vs logits strategy:" in quick[1]
    assert "trl_distill: trl.DistillationTrainer" in quick[1]
    # Issue 14's two goals, in the summary's shape; --quick sizes measure nothing.
    targets = section["targets"]
    assert [t["issue"] for t in targets] == [14, 14]
    assert "1.5x the faster TRL trainer" in targets[0]["goal"]
    assert "1.0x the hand-written" in targets[1]["goal"]
    for t in targets:
        assert t["met"] is None and t["figure"].startswith("--quick sizes"), t


def _step_result(tps: float, loss: float) -> dict[str, Any]:
    return {"status": "ok", "tokens_per_s": tps, "first_loss": loss}


def _throughput_section(quick: bool, **results: dict[str, Any]) -> dict[str, Any]:
    from bench import throughput

    return {
        "config": {"quick": quick},
        "results": results,
        "first_loss_gap_vs_foundry": throughput.first_loss_gaps(results),
    }


def test_throughput_targets_need_the_ratio_and_the_same_loss() -> None:
    """``targets_of``: against the *faster* TRL trainer and the plain loop; a goal is met only
    at the ratio and with equal first losses; --quick and missing contenders measure nothing."""
    from bench import throughput

    ok = _throughput_section(
        False,
        foundry=_step_result(3000.0, 0.5),
        trl_gkd=_step_result(1500.0, 0.5),
        trl_distill=_step_result(1900.0, 0.5 * (1 + 2e-5)),
        plain=_step_result(3100.0, 0.5),
    )
    vs_trl, vs_plain = throughput.targets_of(ok)
    assert throughput.faster_trl(ok["results"]) == "trl_distill"
    assert (
        vs_trl.met is True and vs_trl.figure.startswith("1.58x") and "trl_distill" in vs_trl.figure
    )
    assert vs_plain.met is False and vs_plain.figure.startswith("0.97x")
    # the same speed with another loss is not a result
    off = _throughput_section(
        False,
        foundry=_step_result(3000.0, 0.5),
        trl_gkd=_step_result(1000.0, 0.6),
        plain=_step_result(2000.0, 0.5),
    )
    vs_trl, vs_plain = throughput.targets_of(off)
    assert vs_trl.met is False and "NOT equal" in vs_trl.figure
    assert vs_plain.met is True
    quick = _throughput_section(
        True, foundry=_step_result(3000.0, 0.5), plain=_step_result(1.0, 0.5)
    )
    vs_trl, vs_plain = throughput.targets_of(quick)
    assert vs_trl.met is None and "no TRL contender ran" in vs_trl.figure
    assert vs_plain.met is None and vs_plain.figure.startswith("--quick sizes")


def test_throughput_contender_names() -> None:
    """``trl`` (the old name, still in ``--step-contenders``' help) is GKD; unknown names are
    refused with the known ones."""
    from bench import throughput

    assert throughput.resolve_contenders(["trl", "trl_gkd", "plain"]) == ("trl_gkd", "plain")
    assert throughput.resolve_contenders(None) == throughput.CONTENDERS
    with pytest.raises(ValueError, match=r"unknown throughput contender 'liger'.*trl_distill"):
        throughput.resolve_contenders(["liger"])


def test_overheads_section(quick: tuple[dict[str, Any], str]) -> None:
    section = quick[0]["overheads"]
    assert not section["notes"], section["notes"]
    for name in ("direct", "controller"):
        assert _positive(section[name]["step_s"]["median"])
        assert _positive(section[name]["wall_s"])
    assert _positive(section["step_ratio"]) and _positive(section["wall_ratio"])


def test_mfu_section(quick: tuple[dict[str, Any], str]) -> None:
    section = quick[0]["mfu"]
    assert _positive(section["peak"]["float32"]["flops_per_s"])
    for key in ("student_step", "distill_step"):
        s = section[key]
        assert _positive(s["flops_per_s"]) and _positive(s["step_s"])
        assert 0 < s["mfu_fp32"]
    flops = section["student_step"]["flops"]
    assert flops["total"] == flops["dense_flops"] + flops["attention_flops"]


def test_scaling_section(quick: tuple[dict[str, Any], str]) -> None:
    """1 process, 2-rank DDP and 2-rank FSDP2 all ran as real torchrun jobs; the data-parallel
    points trained the same weights as one process (the global-batch semantics)."""
    section = quick[0]["scaling"]
    points = {(p["strategy"], p["world_size"]): p for p in section["results"]}
    assert set(points) == {("single", 1), ("ddp", 2), ("fsdp2", 2)}
    for point in points.values():
        assert point["status"] == "ok", point.get("error")
        assert _positive(point["tokens_per_s"])
        assert len(point["peak_rss_growth_bytes"]) == point["world_size"]
    for key in (("ddp", 2), ("fsdp2", 2)):
        point = points[key]
        assert _positive(point["efficiency"]) and _positive(point["comm_bytes_per_step"])
        assert point["max_weight_diff_vs_single"] is not None
        assert point["max_weight_diff_vs_single"] < 1e-4
    assert points[("single", 1)]["comm_bytes_per_step"] == 0
    params = points[("ddp", 2)]["student_params"]
    assert points[("ddp", 2)]["comm_bytes_per_step"] == params * 4  # 2 * (1/2) * P * 4
    assert points[("fsdp2", 2)]["comm_bytes_per_step"] == params * 6


def test_cache_bench_prints_bytes_per_token_speedup_and_break_even(tmp_path: Path) -> None:
    """``python -m bench cache --quick`` on its own: the printed figures are the cache's own
    (bytes/token = shard bytes over positions; the exact codec's = 4k + 4 plus headers, the
    compressed codec's smaller), the errors are within the codecs' bounds, the ratios add up
    and the targets are named (not measured at --quick sizes)."""
    from bench.cache import targets_of

    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cache", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text, section = proc.stdout, json.loads(out.read_text())["cache"]
    rows = re.findall(
        r"^\| (\d+) +\| (compressed|exact) +\| ([\d.]+) +\|", text, flags=re.MULTILINE
    )
    printed = {(int(k), codec): float(bpt) for k, codec, bpt in rows}
    assert sorted(printed) == [(32, "compressed"), (32, "exact"), (64, "compressed"), (64, "exact")]
    for entry in section["storage"]:
        k, bpt = entry["k"], entry["bytes_per_token"]
        assert printed[(k, entry["codec"])] == pytest.approx(bpt, abs=0.005)
        assert bpt == pytest.approx(entry["cache_bytes"] / entry["positions"], rel=1e-12)
        if entry["codec"] == "exact":
            assert 4 * k + 4 <= bpt < 4 * k + 4 + 1  # safetensors headers add a fraction
            assert entry["logprob_abs_err_max"] < 0.01  # fp16 values
        else:
            assert bpt < 4 * k + 4
            assert entry["logprob_abs_err_max"] < 0.5  # the codec's bound near the top
        assert entry["tail_log_abs_err_max"] < 1e-3
        assert _positive(entry["read_tokens_per_s"]) and _positive(entry["capture_tokens_per_s"])
    assert "DistillKit reports ~300 B/token at k=128" in text
    speedup = float(re.search(r"speed-up \(online / cached epoch\): ([\d.]+)x", text)[1])
    assert _positive(speedup)
    epoch = section["epoch"]
    assert epoch["online"]["status"] == epoch["cached"]["status"] == "ok"
    assert epoch["cached_exact"]["status"] == "ok"
    ratio = epoch["online"]["epoch_s"] / epoch["cached"]["epoch_s"]
    assert speedup == pytest.approx(ratio, abs=0.005)
    assert epoch["steps"] == section["data"]["train_blocks"] // section["config"]["batch"]
    ppl = section["perplexity"]
    assert _positive(ppl["compressed"]) and _positive(ppl["exact"])
    assert ppl["relative"] == pytest.approx(ppl["compressed"] / ppl["exact"] - 1)
    capture = float(re.search(r"capture time \(k=64, compressed\): ([\d.]+) s", text)[1])
    assert capture == pytest.approx(section["capture_s"], abs=0.005)
    assert _positive(capture)
    even = re.search(r"break-even: (never|[\d.]+ epochs)", text)[1]
    saved = section["saved_per_epoch_s"]
    if saved > 0:
        assert float(even.split()[0]) == pytest.approx(section["break_even_epochs"], abs=0.005)
        assert section["break_even_epochs"] == pytest.approx(section["capture_s"] / saved)
    else:
        assert even == "never" and section["break_even_epochs"] is None
    targets = targets_of(section)
    assert [t.issue for t in targets] == [14, 14, 14]
    assert all(t.met is None for t in targets)  # --quick: no k=128, not the goal's sizes
    assert "150 B/token at k=128" in targets[0].goal and "within 1%" in targets[1].goal
    assert "1.5x" in targets[2].goal


def test_out_of_memory_is_a_result_and_larger_points_are_skipped() -> None:
    """A child that cannot fit under the cap reports ``oom``; the grid then skips the
    larger token counts of that vocabulary instead of trying them."""
    from bench.loss_memory import run_grid

    rows = run_grid(
        vocabs=[32000],
        tokens=[1024, 2048],
        contenders=["plain_kl"],
        hidden=32,
        cap=1024**3,  # inputs (0.26 GB) fit; plain's ~0.7 GB of intermediates do not
        repeats=1,
        threads=1,
    )
    assert [r["status"] for r in rows] == ["oom", "oom"], rows
    assert not rows[0].get("skipped") and rows[1]["skipped"]
    assert "memory" in rows[0]["note"].lower() or "allocate" in rows[0]["note"].lower()


def test_budget_chunk_rows() -> None:
    from bench.loss_memory import budget_chunk

    assert budget_chunk(128256) == 65
    assert budget_chunk(32000) == 262
    assert budget_chunk(1000) == 1024  # small vocabularies keep the engine's default
    assert budget_chunk(10**8) == 16


def test_cli_rejects_unknown_benchmark() -> None:
    from bench.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["nonsense"])
    args = build_parser().parse_args(["loss", "--quick", "--vocabs", "32000,128256"])
    assert args.vocabs == [32000, 128256] and args.quick


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU present: the CUDA path "
    "(torch.cuda.max_memory_allocated) of the loss benchmark is not exercised",
)
def test_loss_memory_on_cuda() -> None:
    from bench.loss_memory import run_one

    for name in ("plain_kl", "ours_kl", "ours_fused_kl"):
        r = run_one(
            name, vocab=2048, tokens=256, hidden=64, cap=0, repeats=1, threads=None, device="cuda"
        )
        assert r["status"] == "ok", r
        assert r["method"] == "cuda.max_memory_allocated"
        assert _positive(r["peak_bytes"])


def test_lora_section(quick: tuple[dict[str, Any], str]) -> None:
    section = quick[0]["lora"]
    full, lora = section["results"]["full"], section["results"]["lora"]
    assert full["status"] == lora["status"] == "ok", (full, lora)
    assert full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["total_params"] == full["total_params"] + lora["trainable_params"]
    for r in (full, lora):
        assert _positive(r["tokens_per_s"]) and r["peak_bytes"] >= 0
    assert "lora vs full:" in quick[1]


def test_summary_names_every_target_with_its_figure_and_verdict(
    quick: tuple[dict[str, Any], str],
) -> None:
    """``bench all`` ends with one Markdown summary (printed, and written beside the JSON):
    a row per target of every benchmark, and the counts match the JSON's."""
    doc, stdout = quick
    summary = doc["summary"]
    markdown = Path(summary["markdown_path"]).read_text(encoding="utf-8")
    assert markdown in stdout
    benchmarks = {t["benchmark"] for t in summary["targets"]}
    # every benchmark that sets a goal contributes at least one target
    assert {"loss", "throughput", "overheads", "cache", "scaling", "lora", "ui"} <= benchmarks
    assert {f["benchmark"] for f in summary["figures"]} >= {"mfu", "scaling"}
    n = len(summary["targets"])
    assert summary["met"] + summary["missed"] + summary["not_measured"] == n
    assert f"{n} targets: {summary['met']} met, {summary['missed']} missed" in markdown
    assert summary["failed"] == []
    for t in summary["targets"]:
        assert t["goal"] and t["figure"]
        assert t["met"] in (True, False, None)
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rows = [r for r in markdown.splitlines() if r.startswith(f"| {t['benchmark']} |")]
        cell = t["figure"].replace("|", "\\|")
        assert any(cell in r and r.endswith(f"| {verdict} |") for r in rows), (t, rows)
    # --quick figures prove the path, they judge nothing that needs real sizes
    ui = [t for t in summary["targets"] if t["benchmark"] == "ui"]
    assert ui and all(t["met"] is None for t in ui)


def test_a_failing_benchmark_is_recorded_and_the_rest_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One benchmark that raises must not lose the others' figures: its section holds the
    traceback, the summary lists it as a missed "the benchmark runs" target and the exit
    status is 1."""
    from bench import __main__ as cli
    from bench import mfu

    def broken(**_: Any) -> dict[str, Any]:
        raise RuntimeError("matmul peak exploded")

    monkeypatch.setattr(mfu, "run", broken)
    out = tmp_path / "mfu.json"
    printed: list[str] = []
    args = cli.build_parser().parse_args(["mfu", "--quick", "--json", str(out)])
    doc = cli.run_benchmarks(args, printer=printed.append)
    assert doc["mfu"]["status"] == "error" and "matmul peak exploded" in doc["mfu"]["error"]
    assert doc["summary"]["failed"] == ["mfu"]
    (target,) = doc["summary"]["targets"]
    assert target["met"] is False and "matmul peak exploded" in target["figure"]
    saved = json.loads(out.read_text())
    assert saved["summary"]["failed"] == ["mfu"]
    assert "1 target: 0 met, 1 missed" in out.with_suffix(".md").read_text()
    monkeypatch.setattr(cli, "run_benchmarks", lambda *a, **k: doc)
    assert cli.main(["mfu", "--quick"]) == 1


def test_render_summary_escapes_cells_and_lists_figures() -> None:
    from bench.common import Figure, Target, render_summary

    text = render_summary(
        [Target("loss", "a|b <= 1", "0.5x", True, 14), Target("ui", "g", "why", None)],
        [Figure("mfu", "student MFU", "12.0%")],
        notes=["machine: quiet"],
    )
    assert "2 targets: 1 met, 0 missed, 1 not measured." in text
    assert "| loss | a\\|b <= 1 (issue 14) | 0.5x | met |" in text
    assert "| ui | g | why | not measured |" in text
    assert "| mfu | student MFU | 12.0% |" in text and "- machine: quiet" in text
