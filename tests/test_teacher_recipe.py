"""Issue 17: the teacher recipe adapts to the corpus, the teacher is judged before
distilling, long files become documents, and every run ends with a plain verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry_kernel import load_config, run_sync
from foundry_kernel.config import DataConfig, TeacherBuild
from foundry_kernel.data._sources import cut_text, load_documents
from foundry_kernel.summary import RunSummary, TeacherCheck
from foundry_kernel.teachers._builtin import BuildPlan


def _summary(teacher: float, student: float, baseline: float | None, **extra: object) -> RunSummary:
    raw: dict[str, object] = {
        "teacher": {"params": 10, "val_ppl": teacher, "val_loss": 1.0},
        "student": {"params": 2, "val_ppl": student, "val_loss": 1.0},
        **extra,
    }
    if baseline is not None:
        raw["baseline"] = {"params": 2, "val_ppl": baseline, "val_loss": 1.0}
    return RunSummary.parse(raw)


def test_a_run_that_helped_says_so_in_words() -> None:
    verdict = _summary(32.4, 56.4, 68.1, gap_closed=0.25).verdict
    assert verdict is not None and verdict.helped is True and verdict.level == "good"
    assert verdict.text.startswith("Distillation helped: 17% lower held-out perplexity")
    assert "25% of the gap" in verdict.text


def test_a_run_that_hurt_names_the_weak_teacher_and_what_to_try() -> None:
    verdict = _summary(118.0, 149.8, 135.2, gap_closed=-0.75).verdict
    assert verdict is not None and verdict.helped is False and verdict.level == "warning"
    assert "did not help here" in verdict.text and "11% higher" in verdict.text
    assert "barely better than the student trained alone (118.0 vs 135.2)" in verdict.text
    assert "teacher.build.data" in verdict.text  # advice names the setting
    assert "-75%" not in verdict.text


def test_a_teacher_worse_than_the_twin_is_called_no_better_not_barely_better() -> None:
    verdict = _summary(233.0, 300.0, 200.0, gap_closed=-1.9).verdict
    assert verdict is not None and verdict.helped is False
    assert "50% higher" in verdict.text
    assert "the teacher is no better than the student trained alone (233.0 vs 200.0)" in (
        verdict.text
    )
    assert "barely" not in verdict.text


def test_no_twin_means_not_measured_and_a_near_chance_teacher_is_named() -> None:
    assert _summary(30.0, 40.0, None).verdict.helped is None  # type: ignore[union-attr]
    check = TeacherCheck.judge(900.0, None, 1024.0)
    assert check.standing == "near_chance" and check.worth_distilling is False
    hurt = _summary(900.0, 1000.0, 950.0, teacher_check=check.to_dict()).verdict
    assert hurt is not None and "barely better than chance" in hurt.text


def test_teacher_check_standings() -> None:
    assert TeacherCheck.judge(30.0, 40.0, 1024.0).standing == "clear"
    assert TeacherCheck.judge(36.0, 40.0, 1024.0).standing == "marginal"
    assert TeacherCheck.judge(45.0, 40.0, 1024.0).standing == "no_better"
    assert TeacherCheck.judge(45.0, None, 1024.0).standing == "unknown"
    parsed = TeacherCheck.parse(TeacherCheck.judge(36.0, 40.0, 1024.0).to_dict())
    assert parsed is not None and parsed.standing == "marginal"
    assert TeacherCheck.parse({"standing": "bogus"}) is None


def test_build_steps_are_capped_by_epochs_on_a_small_corpus() -> None:
    build = TeacherBuild(steps=700, max_epochs=4.0, batch_size=32, seq_len=128)
    small = BuildPlan.size(build, 250_000)  # ~61 steps per epoch
    assert small.steps == 245 and small.limited_by == "teacher.build.max_epochs"
    assert 3.9 < small.epochs <= 4.02
    large = BuildPlan.size(build, 10_000_000)
    assert large.steps == 700 and large.limited_by == "teacher.build.steps"
    uncapped = BuildPlan.size(TeacherBuild(steps=700, batch_size=32, seq_len=128), 250_000)
    assert TeacherBuild().max_epochs is None  # the default: early stopping alone
    assert uncapped.steps == 700 and uncapped.limited_by == "teacher.build.steps"


def test_cut_text_keeps_every_character_and_cuts_at_paragraphs() -> None:
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(200))
    parts = list(cut_text(text, 2000))
    assert "".join(parts) == text
    assert all(len(p) <= 2000 for p in parts) and len(parts) > 10
    assert all(p.endswith("\n\n") for p in parts[:-1])
    assert list(cut_text("x" * 5000, 2000)) == ["x" * 2000, "x" * 2000, "x" * 1000]


def test_one_large_file_becomes_many_documents(tmp_path: Path) -> None:
    big = tmp_path / "book.txt"
    big.write_text("\n\n".join(f"Section {i}. " + "text " * 300 for i in range(60)))
    docs = load_documents(DataConfig(source=str(big)))
    assert len(docs) > 10 and docs[0].doc_id == "file:book.txt#00000"
    assert "".join(d.text for d in docs) == big.read_text()
    whole = load_documents(DataConfig(source=str(big), document_chars=None))
    assert len(whole) == 1


def test_a_run_records_the_teacher_check_and_its_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cfg = {
        "name": "recipe",
        "runs_dir": str(tmp_path / "runs"),
        "teacher": {
            "build": {
                "vocab_size": 512,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 2,
                "seq_len": 32,
                "batch_size": 16,
                "steps": 40,
                "max_documents": 60,
            }
        },
        "student": {"hidden_size": 32, "num_layers": 1, "num_heads": 1},
        "data": {"seq_len": 32, "max_documents": 60},
        "optim": {"batch_size": 16},
        "eval": {"every_steps": 1000, "max_batches": 4, "sample_tokens": 4},
        "limits": {"max_steps": 6},
        "checkpoint": {"every_steps": None},
    }
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(cache))
    handle = run_sync(load_config(cfg))
    assert str(handle.state) == "completed", handle.error and handle.error.message
    summary = RunSummary.parse(handle.result)
    check = summary.teacher_check
    assert check is not None and check.standing != "unknown"
    assert check.reference_ppl is not None and check.reference_params is not None
    assert check.chance_ppl is not None and check.chance_ppl <= 512
    references = list(cache.glob("teachers/*/references/h32-l1-a1-mauto.json"))
    assert len(references) == 1
    assert summary.verdict is not None and summary.verdict.text
