"""Samples a reader can judge a student by (foundry_kernel.training._samples): greedy and
seeded sampled continuations of the same prompts for teacher, distilled and CE-only, and
the students' samples at each validation, recorded by a real tiny run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict

import foundry_kernel as fk
from foundry_kernel._models import LoadedModel, load_causal_lm
from foundry_kernel.store import RunStore
from foundry_kernel.summary import RunSummary
from foundry_kernel.teachers._interface import _nucleus
from foundry_kernel.training._samples import (
    SampleSettings,
    continue_prompts,
    history_rows,
    sampled_texts,
)

CPU = torch.device("cpu")
PROMPTS = ("The list object", "To open a file")


def _settings(**changes: Any) -> SampleSettings:
    values: dict[str, Any] = {
        "prompts": PROMPTS,
        "max_new_tokens": 12,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 7,
        "checkpoint_prompts": 1,
    }
    return SampleSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> LoadedModel:
    return load_causal_lm(str(tiny_teacher_dir), device=CPU)


def test_sampled_text_is_seeded_and_leaves_the_global_generator_alone(
    teacher: LoadedModel,
) -> None:
    model, tok = teacher.model, teacher.tokenizer
    model.train()  # as at a validation during training
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = continue_prompts(model, tok, _settings())
    assert torch.equal(torch.random.get_rng_state(), before)  # no draw from torch's RNG
    assert model.training  # given back in the mode it was in
    again = continue_prompts(model, tok, _settings())
    assert again == first  # re-running gives the same text
    assert len(first.greedy) == len(first.sampled) == len(PROMPTS)
    assert all(first.sampled)
    other = sampled_texts(model, tok, PROMPTS, _settings(seed=8))
    assert other != first.sampled  # the seed decides the draw
    # each prompt draws from its own seed: the first prompt alone samples the same text
    assert sampled_texts(model, tok, PROMPTS[:1], _settings()) == first.sampled[:1]


def test_top_p_keeps_the_likeliest_tokens() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])

    def kept(p: torch.Tensor, top_p: float) -> list[bool]:
        out = _nucleus(p, top_p)
        assert torch.equal(out[out > 0], p[out > 0])  # kept tokens keep their probability
        return (out > 0)[0].tolist()

    assert kept(probs, 0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert kept(probs, 1e-6) == [True, False, False, False]  # the likeliest always stays
    assert kept(probs, 0.99) == [True, True, True, True]
    shuffled = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert kept(shuffled, 0.7) == [False, True, False, True]


def test_a_tiny_top_p_samples_the_greedy_path(teacher: LoadedModel) -> None:
    model, tok = teacher.model, teacher.tokenizer
    narrow = sampled_texts(model, tok, PROMPTS, _settings(top_p=1e-6, temperature=5.0))
    greedy = sampled_texts(model, tok, PROMPTS, _settings(top_p=1e-6, seed=99))
    assert narrow == greedy  # only the likeliest token left: seed and temperature moot


def test_history_rows_drop_what_cannot_be_read() -> None:
    rows = history_rows(
        [{"step": 3, "prompt": "p", "greedy": "g", "sampled": "s"}, {"step": "x"}, "junk"]
    )
    assert rows == [{"step": 3, "prompt": "p", "greedy": "g", "sampled": "s"}]
    assert history_rows(None) == [] and history_rows({"step": 1}) == []


def test_a_tiny_run_records_sampled_continuations_and_their_history(runs_dir: Path) -> None:
    cfg = tiny_config_dict(runs_dir, eval={"sample_prompts": ["The list", "To open"]})
    handle = fk.run_sync(fk.load_config(cfg))
    assert str(handle.state) == "completed", handle
    with RunStore(runs_dir, read_only=True) as store:
        stored = store.get_run(handle.id).summary
    row = stored["samples"][0]
    assert set(row) == {
        "prompt",
        *(
            f"{role}{suffix}"
            for role in ("teacher", "student", "baseline")
            for suffix in ("", "_sampled")
        ),
    }
    assert all(isinstance(v, str) for v in row.values())
    assert stored["sample_settings"] == {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 4,
        "seed": 0,
    }
    summary = RunSummary.parse(stored)
    for phase in ("distill", "baseline"):
        history = summary.sample_history(phase)
        assert [h.step for h in history] == [3, 6]  # every validation (eval.every_steps=3)
        assert {h.prompt for h in history} == {"The list"}  # checkpoint_samples=1
        assert all(h.greedy and h.sampled for h in history)
    # the last validation saw the final weights, with the prompt's own seed: the same text
    last = summary.sample_history("distill")[-1]
    assert (last.greedy, last.sampled) == (row["student"], row["student_sampled"])
    events = [e for _, e in handle.events_since(0) if e.kind == "sample"]
    assert [(e.payload["phase"], e.payload["step"]) for e in events] == [
        ("distill", 3),
        ("distill", 6),
        ("baseline", 3),
        ("baseline", 6),
    ]


def test_checkpoint_samples_zero_keeps_no_history(runs_dir: Path) -> None:
    cfg = tiny_config_dict(
        runs_dir, eval={"checkpoint_samples": 0, "baseline": False}, limits={"max_steps": 3}
    )
    handle = fk.run_sync(fk.load_config(cfg))
    assert str(handle.state) == "completed", handle
    with RunStore(runs_dir, read_only=True) as store:
        stored = store.get_run(handle.id).summary
    assert "distill_sample_history" not in stored
    assert set(stored["samples"][0]) == {
        "prompt",
        "teacher",
        "teacher_sampled",
        "student",
        "student_sampled",
    }
