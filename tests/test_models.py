"""Loading, shaping and pairing teachers and students."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foundry_kernel._models import (
    LoadedModel,
    build_student,
    check_tokenizers,
    count_params,
    load_causal_lm,
    shared_vocab_size,
    student_from_teacher,
)
from foundry_kernel.config import StudentConfig
from foundry_kernel.data._tokenizer import train_bpe_tokenizer
from foundry_kernel.errors import ConfigError, ModelError
from foundry_kernel.teachers._builtin import read_teacher_record

CPU = torch.device("cpu")


@pytest.fixture
def teacher(tiny_teacher_dir: Path) -> LoadedModel:
    return load_causal_lm(str(tiny_teacher_dir), device=CPU)


def test_builtin_teacher_is_cached_with_record(tiny_teacher_dir: Path) -> None:
    record = read_teacher_record(tiny_teacher_dir)
    assert record is not None
    assert record["params"] > 0
    assert record["val"]["val/ppl"] > 1
    assert record["train_doc_ids"]
    assert (tiny_teacher_dir / "config.json").is_file()


def test_load_local_path(teacher: LoadedModel, tiny_teacher_dir: Path) -> None:
    assert teacher.params == count_params(teacher.model)
    ids = teacher.tokenizer("hello world", return_tensors="pt").input_ids
    logits = teacher.model(ids).logits
    assert logits.shape[-1] >= len(teacher.tokenizer)


def test_missing_folder_and_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"teacher\.source"):
        load_causal_lm(str(tmp_path / "nope"), device=CPU)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE") as info:
        load_causal_lm("someorg/surely-not-cached-model", device=CPU)
    assert "local folder" in str(info.value)


def test_path_outside_allowed_roots_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="allowed"):
        load_causal_lm("/proc/self", device=CPU, field="student.source")


def test_fresh_student_shape_and_determinism(teacher: LoadedModel) -> None:
    cfg = StudentConfig(hidden_size=16, num_layers=1, num_heads=2)
    a = build_student(cfg, teacher, device=CPU, seed=3)
    b = build_student(cfg, teacher, device=CPU, seed=3)
    c = build_student(cfg, teacher, device=CPU, seed=4)
    assert a.model.config.hidden_size == 16
    assert a.params < teacher.params
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.tokenizer is teacher.tokenizer


def test_fresh_student_bad_heads(teacher: LoadedModel) -> None:
    with pytest.raises(ModelError, match="divisible"):
        build_student(StudentConfig(hidden_size=18, num_heads=4), teacher, device=CPU, seed=0)


def test_from_teacher_keeps_layers(teacher: LoadedModel) -> None:
    full = student_from_teacher(teacher.model, [0])
    ids = torch.tensor([[5, 6, 7, 8]])
    # The tiny teacher has one layer: keeping it reproduces the teacher exactly.
    assert torch.allclose(full(ids).logits, teacher.model(ids).logits)
    with pytest.raises(ModelError, match="out of range"):
        student_from_teacher(teacher.model, [0, 5])


def test_padded_vocab_handled(teacher: LoadedModel) -> None:
    student = build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=CPU, seed=0
    )
    n = len(teacher.tokenizer)
    student.model.resize_token_embeddings(n + 64)
    assert shared_vocab_size(teacher, student) == n
    student.model.resize_token_embeddings(n - 8)
    with pytest.raises(ModelError, match="vocabulary mismatch"):
        shared_vocab_size(teacher, student)


def test_incompatible_tokenizers_refused(teacher: LoadedModel) -> None:
    other = train_bpe_tokenizer(["completely different text " * 50], 300)
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_tokenizers(teacher.tokenizer, other)
    check_tokenizers(teacher.tokenizer, teacher.tokenizer)


def test_pretrained_student_from_path(teacher: LoadedModel, tmp_path: Path) -> None:
    student = build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=CPU, seed=0
    )
    student.model.save_pretrained(tmp_path / "s")
    teacher.tokenizer.save_pretrained(tmp_path / "s")
    loaded = build_student(
        StudentConfig(init="pretrained", source=str(tmp_path / "s")), teacher, device=CPU, seed=0
    )
    assert loaded.params == student.params
    with pytest.raises(ModelError, match=r"student\.source"):
        build_student(StudentConfig(init="pretrained"), teacher, device=CPU, seed=0)
