"""Distillation must earn its keep: on a small budget, the ordering the main job promises.

A real (small) teacher is built by Foundry, then one student is distilled and its twin is
trained with cross-entropy alone on the same batches and budget. Held-out perplexity must
order teacher < distilled student < CE-only student, on two corpora of different kinds:
English prose (the built-in default) and Python source (``builtin:python-stdlib``, the
teacher built on it with ``teacher.build.data``). Measured when written (2 cores):
teacher 64.6, distilled 123.3, CE-only 139.7 (16% of the gap closed) on prose; teacher
53.1, distilled 104.7, CE-only 122.9 on code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry_kernel import load_config, run_sync

QUALITY = {
    "name": "quality",
    "teacher": {
        "build": {
            "vocab_size": 1024,
            "hidden_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "seq_len": 64,
            "batch_size": 32,
            "steps": 300,
            "lr": 3e-3,
        }
    },
    "student": {"hidden_size": 48, "num_layers": 2, "num_heads": 4},
    "data": {"seq_len": 64},
    "optim": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 20},
    "loss": {"kind": "forward_kl", "ce_weight": 0.5},
    "eval": {"every_steps": 1000, "max_batches": 40, "sample_tokens": 8},
    "limits": {"max_steps": 200},
    "checkpoint": {"every_steps": None},
}


@pytest.mark.slow
def test_distilled_student_beats_its_ce_twin_and_teacher_beats_both(tmp_path: Path) -> None:
    handle = run_sync(load_config({**QUALITY, "runs_dir": str(tmp_path / "runs")}))
    assert str(handle.state) == "completed", handle.error and handle.error.message
    result = handle.result
    teacher, student, baseline = (result[k]["val_ppl"] for k in ("teacher", "student", "baseline"))
    assert teacher < student < baseline, (teacher, student, baseline)
    assert result["gap_closed"] > 0.05
    assert result["student"]["agreement"] > result["baseline"]["agreement"]
    assert result["data"]["val_docs_seen_by_teacher"] == 0


CODE = {
    **QUALITY,
    "name": "quality-code",
    "teacher": {
        "build": {
            **QUALITY["teacher"]["build"],
            "data": "builtin:python-stdlib",
            "max_documents": 60,
        }
    },
    "data": {"seq_len": 64, "source": "builtin:python-stdlib", "max_documents": 60},
}


@pytest.mark.slow
def test_on_python_source_too_the_distilled_student_beats_its_ce_twin(tmp_path: Path) -> None:
    """The second corpus: Python source, whose statistics (indentation, identifiers,
    punctuation) differ from prose. Foundry builds the teacher on that code and the student
    learns it; distillation must still beat CE alone, and the run's teacher check must find
    the teacher clearly better than a student-sized model, as the verdict then says."""
    handle = run_sync(load_config({**CODE, "runs_dir": str(tmp_path / "runs")}))
    assert str(handle.state) == "completed", handle.error and handle.error.message
    result = handle.result
    teacher, student, baseline = (result[k]["val_ppl"] for k in ("teacher", "student", "baseline"))
    print(f"code: teacher {teacher:.1f} distilled {student:.1f} CE-only {baseline:.1f}")
    assert teacher < student < baseline, (teacher, student, baseline)
    assert result["gap_closed"] > 0.05
    assert result["data"]["val_docs_seen_by_teacher"] == 0
    assert result["teacher_check"]["standing"] in {"clear", "marginal"}, result["teacher_check"]
