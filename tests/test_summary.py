"""RunSummary: the one typed reading of a run's stored results, used by every renderer."""

from __future__ import annotations

import json
import math

import pytest

from foundry_kernel.summary import ModelResult, RunSummary

STORED = {
    "teacher": {
        "params": 935040,
        "val_ppl": 32.4,
        "val_loss": 3.478,
        "tokens_per_s": 812.0,
        "backend": "hf",
    },
    "student": {
        "params": 216512,
        "val_ppl": 56.4,
        "val_loss": 4.03,
        "agreement": 0.474,
        "val_kl": 0.61,
        "tokens_per_s": 2400.0,
    },
    "baseline": {
        "params": 216512,
        "val_ppl": 68.1,
        "val_loss": 4.22,
        "agreement": 0.409,
        "val_kl": 0.83,
        "tokens_per_s": 2390.0,
    },
    "agreement": 0.474,
    "val_kl": 0.61,
    "gap_closed": 0.25,
    "export_dir": "/runs/r/student",
    "data": {"train_docs": 400},
    "samples": [{"prompt": "The list", "teacher": "a", "student": "b", "baseline": "c"}],
    "preflight": {"estimate_bytes": 1},
}


def test_the_json_contract_round_trips_what_the_job_stored() -> None:
    out = RunSummary.parse(STORED).to_json(run_id="r", state="completed", duration_s=12.5)
    assert list(out) == [
        "run_id",
        "state",
        "duration_s",
        "teacher",
        "student",
        "baseline",
        "agreement",
        "val_kl",
        "gap_closed",
        "export_dir",
        "data",
        "samples",
        "logit_cache",
        "sequence",
        "world_size",
        "strategy",
    ]
    for role in ("teacher", "student", "baseline"):
        assert out[role] == STORED[role]
    assert (out["agreement"], out["gap_closed"], out["logit_cache"]) == (0.474, 0.25, None)
    assert out["samples"] == STORED["samples"]
    assert (out["world_size"], out["strategy"]) == (None, None)  # not recorded: an older run
    json.dumps(out, allow_nan=False)  # always valid JSON


def test_world_size_and_strategy_come_from_the_distributed_record() -> None:
    stored = {**STORED, "distributed": {"world_size": 2, "strategy": "fsdp2", "backend": "gloo"}}
    out = RunSummary.parse(stored).to_json(run_id="r", state="completed", duration_s=1.0)
    assert (out["world_size"], out["strategy"]) == (2, "fsdp2")
    bad = RunSummary.parse({"distributed": {"world_size": "two", "strategy": 3}})
    assert (bad.world_size, bad.strategy) == (None, None)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "garbage",
        {"teacher": "garbage", "student": {"val_ppl": "x", "params": True}},
        {"student": {"val_ppl": math.nan, "params": 1.5}, "samples": ["x", {"prompt": 3}]},
        {"gap_closed": math.inf, "samples": "no"},
    ],
)
def test_malformed_summaries_read_as_missing_never_raise(raw: object) -> None:
    summary = RunSummary.parse(raw)
    assert summary.teacher is None or summary.teacher.val_ppl is None
    if summary.student is not None:
        assert summary.student.val_ppl is None and summary.student.params is None
    assert summary.gap_closed is None
    assert all(isinstance(v, str) for row in summary.samples for v in row.values())
    json.dumps(summary.to_json(run_id="r", state="failed", duration_s=None), allow_nan=False)


def test_a_run_that_failed_before_evaluation() -> None:
    summary = RunSummary.parse({"data": {"train_docs": 3}})
    assert (summary.teacher, summary.student, summary.baseline) == (None, None, None)
    assert summary.agreement is None and summary.samples == ()
    with pytest.raises(KeyError, match="roles"):
        summary.role("judge")


def test_model_result_leaves_unmeasured_optional_fields_out() -> None:
    teacher = ModelResult(params=10, val_ppl=2.0, val_loss=0.69, backend="vllm")
    assert teacher.to_dict() == {"params": 10, "val_ppl": 2.0, "val_loss": 0.69, "backend": "vllm"}
    assert ModelResult.parse(teacher.to_dict()) == teacher


def test_sample_history_and_settings_read_what_they_can() -> None:
    raw = {
        "distill_sample_history": [
            {"step": 6, "prompt": "p", "greedy": "g6", "sampled": "s6"},
            {"step": 3, "prompt": "p", "greedy": "g3", "sampled": None},
            {"step": "x", "prompt": "p"},
            "junk",
            {"step": True, "prompt": "p"},
        ],
        "baseline_sample_history": "no",
        "sample_settings": {"temperature": 0.8, "top_p": 0.95, "seed": 0},
    }
    summary = RunSummary.parse(raw)
    steps = summary.sample_history("distill")
    assert [(s.step, s.greedy, s.sampled) for s in steps] == [(3, "g3", ""), (6, "g6", "s6")]
    assert summary.sample_history("baseline") == ()
    assert summary.sample_settings == raw["sample_settings"]
    old = RunSummary.parse({"samples": [{"prompt": "p", "student": "s"}]})
    assert old.sample_history() == () and old.sample_settings is None
    with pytest.raises(KeyError, match="phases"):
        summary.sample_history("teacher_build")
