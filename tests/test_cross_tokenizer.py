"""Cross-tokenizer distillation (``loss.cross_tokenizer``): the losses' numbers, the pairing
check's advice, every setting end to end through the real run path, and the quality test.

The test pair: the built-in teacher's byte-level BPE and a student BPE trained on the same
built-in corpus with another vocabulary size, whose tokenizer adds a BOS token (the
teacher's does not); one run also gives the *teacher* a BOS (the other convention).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict, torchrun_prefix
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from foundry_kernel._context import RunContext
from foundry_kernel._models import check_tokenizers
from foundry_kernel.config import DataConfig, load_config
from foundry_kernel.data._sources import load_documents
from foundry_kernel.data._tokenizer import train_bpe_tokenizer
from foundry_kernel.errors import ConfigError, ModelError
from foundry_kernel.run._job import run_job
from foundry_kernel.store import RunStore
from foundry_kernel.training._cross_tokenizer import (
    Continuation,
    VocabMap,
    aligned_divergence,
    project_teacher,
    uld_distance,
)
from foundry_kernel.training._losses import LossSpec, token_divergence

KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


# --------------------------------------------------------------------------- the math


def test_uld_equals_the_direct_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=gen)
    t = torch.randn(5, 11, generator=gen)
    got = uld_distance(s.log_softmax(-1), t.log_softmax(-1))
    for row in range(5):
        q = sorted(s[row].softmax(-1).tolist(), reverse=True) + [0.0] * 4
        p = sorted(t[row].softmax(-1).tolist(), reverse=True)
        want = sum(abs(a - b) for a, b in zip(p, q, strict=True))
        assert got[row].item() == pytest.approx(want, abs=1e-6)
    # a permutation of the student's vocabulary changes nothing (no mapping needed)
    perm = torch.randperm(7, generator=gen)
    again = uld_distance(s[:, perm].log_softmax(-1), t.log_softmax(-1))
    torch.testing.assert_close(again, got)


@pytest.mark.parametrize("kind", KINDS)
def test_aligned_is_the_ordinary_divergence_for_identical_vocabularies(kind: str) -> None:
    spec = LossSpec(kind=kind, temperature=2.0)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    want = token_divergence(s, t, spec)
    cont = Continuation(  # each group's first tokens are the same token: nothing moves
        torch.full((6,), -0.5, dtype=torch.float64), torch.arange(6), torch.arange(6)
    )
    got, coverage = aligned_divergence(
        (s / 2).log_softmax(-1), (t / 2).log_softmax(-1), VocabMap.identity(9), spec, cont
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(coverage, torch.ones(6, dtype=torch.float64))
    (g_got,) = torch.autograd.grad(got.sum(), s)
    s2 = s.detach().clone().requires_grad_(True)
    (g_want,) = torch.autograd.grad(token_divergence(s2, t, spec).sum(), s2)
    torch.testing.assert_close(g_got, g_want)


def test_projection_and_the_merged_continuation() -> None:
    """Teacher tokens a, b, abc, ab; student tokens a, b, ab (ids in that order)."""
    vocab = VocabMap.of([0, 1, 2, 2], [True, True, False, True], student_vocab=3)
    p = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    proj = project_teacher(p.log(), vocab)
    torch.testing.assert_close(proj, torch.tensor([[0.1, 0.2, 0.7]]))  # abc and ab -> ab
    # the student splits "abc" finer (a + bc...): the actual first student token is "a",
    # the teacher's one token is "abc" (n = 1): its mass moves from "ab" to "a"
    finer = Continuation(torch.tensor([0.6]).log(), torch.tensor([0]), torch.tensor([2]))
    moved = project_teacher(p.log(), vocab, finer)
    torch.testing.assert_close(moved, torch.tensor([[0.7, 0.2, 0.1]]))
    # the student's one token "ab" is the teacher's a + b: the product of the teacher's
    # conditionals along a, b (0.1 * 0.5) moves from "a" (where p(a) went) to "ab"
    coarser = Continuation(torch.tensor([0.05]).log(), torch.tensor([2]), torch.tensor([0]))
    merged = project_teacher(p.log(), vocab, coarser)
    torch.testing.assert_close(merged, torch.tensor([[0.05, 0.2, 0.75]]))
    # the moved mass never exceeds what the source holds
    greedy = Continuation(torch.tensor([0.9]).log(), torch.tensor([2]), torch.tensor([0]))
    torch.testing.assert_close(
        project_teacher(p.log(), vocab, greedy), torch.tensor([[0.0, 0.2, 0.8]])
    )
    # hybrid's weight: the teacher's mass on exact twins (a, b, ab)
    _, coverage = aligned_divergence(torch.zeros(1, 3).log_softmax(-1), p.log(), vocab, LossSpec())
    assert coverage.item() == pytest.approx(0.4)


# --------------------------------------------------------------------------- the test pair


def _corpus() -> list[str]:
    docs = load_documents(DataConfig(source="builtin:python-docs", max_documents=60))
    return [d.text for d in docs]


def _student_folder(
    folder: Path, vocab: int, *, hidden: int = 16, layers: int = 1, bos: bool = True
) -> Path:
    """A randomly initialised Llama with its own BPE (trained on the built-in corpus),
    saved as a pretrained model folder; its tokenizer adds a BOS token."""
    tok = train_bpe_tokenizer(_corpus(), vocab)
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
        )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _student_folder(tmp_path_factory.mktemp("xtok") / "student", 400)


@pytest.fixture(scope="module")
def bos_teacher_dir(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher, its tokenizer now adding a BOS (Llama-3's convention)."""
    folder = tmp_path_factory.mktemp("xtok") / "bos-teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    tok.save_pretrained(folder)
    assert tok("hi").input_ids[0] == tok.bos_token_id
    return folder


def test_pairing_check_names_the_cross_tokenizer_settings(
    tiny_teacher_dir: Path, student_dir: Path
) -> None:
    teacher = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student = AutoTokenizer.from_pretrained(student_dir)
    with pytest.raises(ModelError) as err:
        check_tokenizers(teacher, student)
    message = str(err.value)
    assert "loss.cross_tokenizer=hybrid (or aligned / uld)" in message
    assert "of the teacher's vocabulary has an exact match in the student's" in message
    shared = float(message.split("uld) to distil across tokenizers; ")[1].split("%")[0])
    assert 50 < shared <= 100  # same corpus: the smaller BPE's merges are the larger's first


def test_cross_tokenizer_needs_a_pretrained_student(runs_dir: Path) -> None:
    cfg = tiny_config_dict(runs_dir, loss={"cross_tokenizer": "uld"})
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.field == "loss.cross_tokenizer"


# --------------------------------------------------------------------------- end to end


def _run(cfg_dict: dict[str, Any]) -> tuple[RunStore, str, dict[str, Any]]:
    cfg = load_config(cfg_dict)
    store = RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id))
    return store, run_id, summary


def _xtok_config(runs_dir: Path, student: Path, setting: str, **teacher: Any) -> dict[str, Any]:
    return tiny_config_dict(
        runs_dir,
        teacher=teacher,
        student={
            "init": "pretrained",
            "source": str(student),
            "hidden_size": None,
            "num_layers": None,
            "num_heads": None,
        },
        loss={"cross_tokenizer": setting},
        data={"max_documents": 4},
        eval={"baseline": setting == "hybrid"},
    )


@pytest.mark.parametrize("setting", ["uld", "aligned", "hybrid"])
def test_each_setting_runs_end_to_end(
    setting: str, runs_dir: Path, student_dir: Path, tiny_teacher_dir: Path
) -> None:
    store, run_id, summary = _run(_xtok_config(runs_dir, student_dir, setting))
    assert summary["distill_loss_strategy"]["strategy"] == "cross_tokenizer"
    report = summary["cross_tokenizer"]
    assert report["setting"] == setting
    assert report["student_vocab"] == len(AutoTokenizer.from_pretrained(student_dir))
    assert report["teacher_vocab"] == len(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    assert 0.6 < report["train"]["aligned_fraction"] <= 1.0
    kd = [r.value for r in store.metrics(run_id, ["train/kd"])]
    assert len(kd) == 6 and all(math.isfinite(v) and v > 0 for v in kd)
    # agreement/KL need one vocabulary: not reported; bits per byte compare instead
    for name in ("teacher", "student"):
        assert 0 < summary[name]["val_bpb"] < 20
    assert "agreement" not in summary["student"]
    if setting == "hybrid":
        base = summary["baseline"]
        assert base["val_bpb"] > 0 and summary["gap_closed"] is not None
    exported = AutoTokenizer.from_pretrained(Path(summary["export_dir"]))
    assert len(exported) == report["student_vocab"]  # the student keeps its own tokenizer
    card = (Path(summary["export_dir"]) / "README.md").read_text(encoding="utf-8")
    assert "bits per byte" in card


def test_a_teacher_bos_does_not_desync_the_alignment(
    runs_dir: Path, student_dir: Path, bos_teacher_dir: Path, tiny_teacher_dir: Path
) -> None:
    """The teacher reads a BOS before every document piece, the student's blocks have
    none: the aligned share of positions must not change (GOLD's bug: it collapsed)."""
    _, _, plain = _run(_xtok_config(runs_dir / "plain", student_dir, "aligned"))
    _, _, bos = _run(
        _xtok_config(runs_dir / "bos", student_dir, "aligned", source=str(bos_teacher_dir))
    )
    a, b = plain["cross_tokenizer"]["train"], bos["cross_tokenizer"]["train"]
    assert b["teacher_tokens"] > a["teacher_tokens"]  # the BOS tokens are there
    assert b["aligned_positions"] >= a["aligned_positions"] - 5
    assert b["aligned_fraction"] > 0.6


# --------------------------------------------------------------------------- quality

QUALITY_BUILD = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "seq_len": 64,
    "batch_size": 16,
    "steps": 800,
    "lr": 5e-3,
    "max_documents": 60,
}


@pytest.mark.slow
def test_cross_tokenizer_kd_beats_the_ce_only_student(tmp_path: Path) -> None:
    """On the built-in corpus a teacher with its own 1024-token BPE distils a student
    with a 600-token BPE for 80 steps; held-out bits per byte against the CE-only student
    (the baseline phase, the same batches and budget).

    Measured when written (2 cores, teacher 1.875 bits/byte): CE-only 2.693; aligned
    2.651, hybrid 2.661 (both beat CE); uld 2.748 (ULD alone does NOT beat CE here: its
    sorted-probability target carries no token identity, and at this budget it slows the
    student down). The test asserts what holds and records ULD's number.
    """
    student = _student_folder(tmp_path / "student", 600, hidden=32, bos=False)
    results: dict[str, dict[str, Any]] = {}
    for setting in ("aligned", "hybrid", "uld"):
        cfg = {
            "name": f"xtok-quality-{setting}",
            "seed": 0,
            "runs_dir": str(tmp_path / "runs"),
            "teacher": {"source": "builtin:tiny-teacher", "build": QUALITY_BUILD},
            "student": {"init": "pretrained", "source": str(student)},
            "data": {"max_documents": 60, "seq_len": 64},
            "optim": {"batch_size": 16, "warmup_steps": 5, "lr": 5e-3},
            "loss": {"cross_tokenizer": setting, "ce_weight": 0.5},
            "eval": {
                "every_steps": 1000,
                "max_batches": 8,
                "sample_tokens": 4,
                "sample_prompts": ["The list"],
                "baseline": setting == "aligned",
            },
            "limits": {"max_steps": 80},
            "checkpoint": {"every_steps": 1000},
        }
        results[setting] = _run(cfg)[2]
    teacher = results["aligned"]["teacher"]["val_bpb"]
    baseline = results["aligned"]["baseline"]["val_bpb"]
    bpb = {k: v["student"]["val_bpb"] for k, v in results.items()}
    print(
        f"teacher {teacher:.3f} CE-only {baseline:.3f} "
        + " ".join(f"{k} {v:.3f}" for k, v in bpb.items())
    )
    assert teacher < bpb["aligned"] < baseline, (teacher, bpb, baseline)
    assert bpb["hybrid"] < baseline, (bpb, baseline)
    assert results["aligned"]["gap_closed"] > 0.05
    assert math.isfinite(bpb["uld"])  # measured and reported; it does not beat CE


def test_identical_tokenizers_give_the_ordinary_run(runs_dir: Path, tiny_teacher_dir: Path) -> None:
    """A student that shares the teacher's tokenizer, distilled once with
    ``cross_tokenizer=off`` and once with ``aligned``: the same KD series step by step."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    folder = runs_dir.parent / "same-tokenizer-student"
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    series = {}
    for setting in ("off", "aligned"):
        cfg = _xtok_config(runs_dir / setting, folder, setting)
        cfg["loss"]["strategy"] = "logits"
        cfg["eval"]["baseline"] = False
        store, run_id, _ = _run(cfg)
        series[setting] = [r.value for r in store.metrics(run_id, ["train/kd"])]
    assert len(series["off"]) == 6
    assert series["aligned"] == pytest.approx(series["off"], rel=1e-5)


def test_two_ranks_train_the_one_process_trajectory(
    tmp_path: Path, student_dir: Path, tiny_teacher_dir: Path
) -> None:
    """DDP (a real 2-process gloo group via torchrun, the job worker of
    test_distributed_job.py): each rank trains its share of every batch with the
    cross-tokenizer loss divided by the global valid count; the loss series is the one
    process's."""
    import json
    import os
    import subprocess

    cfg = _xtok_config(tmp_path / "one", student_dir, "hybrid")
    cfg["eval"]["baseline"] = False
    cfg["checkpoint"] = {"every_steps": None}
    store, run_id, _ = _run(cfg)
    one = [r.value for r in store.metrics(run_id, ["train/loss"])]
    cfg["runs_dir"] = str(tmp_path / "two")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).parent / "dist_workers" / "job_worker.py"
    argv = [
        *torchrun_prefix(),
        str(worker),
        "job",
        str(config),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rank0 = json.loads((out / "rank-0.json").read_text())
    with RunStore(tmp_path / "two", read_only=True) as two_store:
        two = [r.value for r in two_store.metrics(rank0["run_id"], ["train/loss"])]
    assert rank0["summary"]["distributed"]["world_size"] == 2
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, rel=1e-4)
