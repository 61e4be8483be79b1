"""The Hub-style model card (front matter that parses back, the body a person reads) and
``foundry export`` (a finished run's student re-exported atomically)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _fake_runs import RESULTS, finished_run

from foundry_kernel.card import (
    ExportError,
    base_model,
    export_run,
    git_revision,
    model_card,
    read_front_matter,
)
from foundry_kernel.config import load_config
from foundry_kernel.store import RunStore
from foundry_kernel.summary import RunSummary


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    meta = read_front_matter(card)
    assert meta, "front matter did not parse"
    return meta


def test_front_matter_is_hub_metadata_with_three_results() -> None:
    card = model_card(load_config(overrides=["name=demo"]), RESULTS)
    meta = _front(card)
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["distillation", "foundry"]
    assert "base_model" not in meta  # a fresh student has no base
    (entry,) = meta["model-index"]
    assert entry["name"] == "demo"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation"
    values = {
        m["name"].split("(")[1].split(",")[0].split(")")[0]: m["value"] for m in result["metrics"]
    }
    assert values == {
        "distilled student": 20.0,
        "CE-only twin": 30.0,
        "teacher builtin:tiny-teacher": 10.0,
    }
    assert all(m["type"] == "perplexity" for m in result["metrics"])


def test_huggingface_hub_reads_the_card() -> None:
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub comes with transformers")
    card = hub.ModelCard(model_card(load_config(), RESULTS))
    assert card.data.library_name == "transformers"
    assert sorted(r.metric_value for r in card.data.eval_results) == [10.0, 20.0, 30.0]


def test_base_model_is_the_students_init_when_it_is_a_hub_id(tmp_path: Path) -> None:
    assert base_model(load_config()) is None
    pre = load_config(overrides=["student.init=pretrained", "student.source=org/small-lm"])
    assert base_model(pre) == "org/small-lm"
    assert _front(model_card(pre, RESULTS))["base_model"] == "org/small-lm"
    cut = load_config(overrides=["student.init=from_teacher", "teacher.source=org/big-lm"])
    assert base_model(cut) == "org/big-lm"
    folder = tmp_path / "local-teacher"
    folder.mkdir()
    local = load_config(overrides=["student.init=from_teacher", f"teacher.source={folder}"])
    assert base_model(local) is None  # the Hub refuses a base_model that is not a repo
    assert f"`{folder}`" in model_card(local, RESULTS)


def test_awkward_names_and_paths_survive_the_yaml(tmp_path: Path) -> None:
    """Quotes, colons, a '---' line and newlines in a data path must neither break the
    front matter nor the config block."""
    weird = tmp_path / "we\"ird: na'me\n---\nkey: x"
    weird.mkdir()
    corpus = weird / "c.txt"
    corpus.write_text("text\n", encoding="utf-8")
    config = load_config(
        overrides={"teacher": {"source": str(weird)}, "data": {"source": str(corpus)}}
    )
    name = "run: one, 'two' \"3\"\n---\n# x"  # a store record's name may hold anything
    card = model_card(config, RESULTS, model_name=name)
    meta = _front(card)
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == str(corpus)
    assert meta["model-index"][0]["name"] == name
    assert str(weird) in result["metrics"][2]["name"]
    block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(block) == config.to_dict()
    teacher_line = next(line for line in card.splitlines() if line.startswith("Teacher: "))
    assert "na'me\\n---\\nkey: x`" in teacher_line  # one line, the newlines shown as \n


def test_body_names_teacher_verdict_versions_and_reproduction(tmp_path: Path) -> None:
    folder = tmp_path / "teacher"
    folder.mkdir()
    relative = os.path.relpath(folder)
    config = load_config(
        overrides=[
            f"teacher.source={relative}",
            "loss.kind=jsd",
            "distill.mode=offline",
            "loss.top_k=64",
        ]
    )
    summary = {
        **RESULTS,
        "provenance": {
            "versions": {
                "torch": "9.9",
                "transformers": "8.8",
                "foundry": "0.1.0",
                "python": "3.11.7",
            },
            "git": {"commit": "a" * 40, "dirty": True, "folder": "/src/x"},
        },
    }
    card = model_card(config, summary, weights_bytes=3 * 2**20)
    verdict = RunSummary.parse(RESULTS).verdict
    assert verdict is not None and verdict.text in card
    assert "closed 37% of the gap" in card
    assert f"Teacher: `{folder.absolute()}`" in card and f"`{relative}`" not in card
    assert "Loss: jsd" in card and "mode: offline" in card
    for line in ("- torch 9.9", "- transformers 8.8", "- foundry 0.1.0", "- python 3.11.7"):
        assert line in card
    assert "a" * 40 in card and "uncommitted changes" in card
    assert "| student (distilled, this model) | 250 | 25% | 20.00 | 50.0% | 90 | 1.80x |" in card
    assert "3.0 MiB" in card


def test_a_run_that_hurt_says_so_next_to_gap_closed() -> None:
    hurt = {**RESULTS, "student": {**RESULTS["student"], "val_ppl": 40.0}, "gap_closed": -0.5}
    card = model_card(load_config(), hurt)
    assert "**Warning:** Distillation did not help here" in card
    assert "closed -50% of the gap" in card


def test_git_revision_of_a_checkout_and_outside_one(tmp_path: Path) -> None:
    assert git_revision(tmp_path) is None
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed here (git_revision then reads None, tested above)")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run([git, *args], cwd=repo, check=True, env=env, timeout=30)
    head = subprocess.run(
        [git, "rev-parse", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    found = git_revision(repo)
    assert found is not None and found["commit"] == head and found["dirty"] is False


# --------------------------------------------------------------------------- export


def test_export_copies_weights_and_regenerates_the_card(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs") as store:
        run_id = finished_run(store, overrides=["name=cardrun"])
        out = export_run(store, run_id, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "foundry-metrics.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card != "old card" and _front(card)["model-index"][0]["name"] == "cardrun"
    assert json.loads((out / "foundry-metrics.json").read_text())["gap_closed"] == 0.37
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine", encoding="utf-8")
    with RunStore(tmp_path / "runs") as store:
        run_id = finished_run(store)
        with pytest.raises(ExportError, match=r"not empty.*--force"):
            export_run(store, run_id, target)
        assert (target / "keep.txt").read_text() == "mine"
        export_run(store, run_id, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunStore(tmp_path / "runs") as store:
        export_run(store, run_id, empty)  # an empty folder is fine
    assert (empty / "README.md").is_file()


@pytest.mark.parametrize(
    ("state", "student", "match"),
    [
        ("failed", True, "is failed, not completed"),
        ("running", True, "is running"),
        ("completed", False, "no student folder"),
    ],
)
def test_export_refuses_unfinished_runs_and_missing_students(
    tmp_path: Path, state: str, student: bool, match: str
) -> None:
    with RunStore(tmp_path / "runs") as store:
        run_id = finished_run(store, state=state, student=student)
        with pytest.raises(ExportError, match=match):
            export_run(store, run_id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foundry_export_command(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs") as store:
        run_id = finished_run(store)
    cmd = [
        sys.executable,
        "-m",
        "foundry_kernel.cli",
        "export",
        run_id,
        str(tmp_path / "o"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and (tmp_path / "o" / "README.md").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
