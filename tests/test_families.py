"""Every decoder family as teacher and as student, through the real run path.

Tiny random models of real transformers architectures (``tests/model_zoo.py``: their
config classes, ``save_pretrained``, tokenizers in each family's format, built locally)
go through ``run_job``: the pairing check, distillation, checkpoint/resume, export, and
a reload of the export with ``AutoModelForCausalLM``/``AutoTokenizer``.

The matrix, chosen to stay a few seconds per family: every family x (teacher with a fresh
student + cancel/resume + export/reload, a ``from_teacher`` student, a pretrained student
of its own family, the fused-loss eligibility against the model's real logits) and every
distillation mode (offline top-k, sequence, on-policy) on every family as well (each a
2-step run). Cross-family pairs sharing one tokenizer, the padded vocabulary, hub ids
offline and the context limit have their own tests; the vLLM backend runs on two families.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config_dict
from model_zoo import FAMILIES, STYLES, Zoo, family_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from foundry_kernel._context import Event, RunContext
from foundry_kernel._models import (
    load_causal_lm,
    shared_vocab_size,
    student_from_teacher,
)
from foundry_kernel.config import load_config
from foundry_kernel.errors import ConfigError, ModelError, RunCancelled
from foundry_kernel.run._job import run_job
from foundry_kernel.store import RunStore
from foundry_kernel.training._strategy import _probe, fused_eligibility

CPU = torch.device("cpu")
NAMES = list(FAMILIES)
#: Families whose logits are not lm_head(last hidden state): the fused loss must fall back.
TRANSFORMED = {"gemma2"}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _config(runs_dir: Path, teacher: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 3-step run on 4 documents with one eval batch and no CE-only baseline."""
    cfg = tiny_config_dict(
        runs_dir,
        teacher={"source": str(teacher)},
        student={"hidden_size": 32, "num_layers": 2, "num_heads": 2},
        data={"max_documents": 4, "seq_len": 32},
        eval={"baseline": False, "max_batches": 1, "every_steps": 2, "sample_tokens": 4},
        limits={"max_steps": 3},
        checkpoint={"every_steps": 1},
    )
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


def _run(
    cfg_dict: dict[str, Any],
    *,
    run_id: str | None = None,
    resume: bool = False,
    sink: Callable[[Event], None] | None = None,
    ctx: RunContext | None = None,
) -> tuple[RunStore, str, dict[str, Any]]:
    cfg = load_config(cfg_dict)
    store = RunStore(cfg.runs_dir)
    if run_id is None:
        run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    ctx = ctx or RunContext(run_id, sink=sink)
    summary = run_job(cfg, store=store, run_id=run_id, ctx=ctx, resume=resume)
    return store, run_id, summary


def _steps(store: RunStore, run_id: str) -> list[int]:
    return [r.step for r in store.metrics(run_id, ["train/loss"])]


def _reload(export: Path, family: str) -> tuple[Any, Any]:
    """The export as a user loads it: its class is the family's, its tokenizer keeps the
    family's conventions (BOS added or not, chat template), and it generates."""
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    teacher_cls = type(AutoModelForCausalLM.from_config(_family_config(family)))
    assert type(model) is teacher_cls
    style = STYLES[FAMILIES[family].style]
    ids = tok("The list", return_tensors="pt").input_ids
    assert (ids[0, 0].item() == tok.bos_token_id) == style.add_bos
    assert (tok.chat_template is not None) == (style.chat_template is not None)
    assert tok.get_vocab() == family_tokenizer(FAMILIES[family].style).get_vocab()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )
    assert out.shape[1] == ids.shape[1] + 3
    return model, tok


def _same_held_out_loss(model: Any, tok: Any, cfg: dict[str, Any], summary: dict[str, Any]) -> None:
    """The reloaded export scores the held-out batch exactly as the run's student did: the
    export holds the trained weights (tied heads, cut layers and all)."""
    from foundry_kernel.data._blocks import build_data
    from foundry_kernel.training._evaluate import evaluate_lm

    config = load_config(cfg)
    data = build_data(config.data, tok, seed=config.data.split_seed)
    got = evaluate_lm(model, data.val, batch_size=config.optim.batch_size, max_batches=1)
    assert got["loss"] == pytest.approx(summary["student"]["val_loss"], rel=1e-5)


def _family_config(family: str) -> Any:
    from model_zoo import family_config

    n = len(family_tokenizer(FAMILIES[family].style))
    return family_config(FAMILIES[family], vocab_size=n)


# --------------------------------------------------------------------------- per family


@pytest.mark.parametrize("family", NAMES)
def test_teacher_with_fresh_student_resume_export_reload(
    family: str, zoo: Zoo, runs_dir: Path
) -> None:
    """The family as teacher, a fresh student of its architecture: a run cancelled after
    step 2 resumes from its checkpoint to step 4 (no step twice), then the export reloads."""
    cfg = _config(runs_dir, zoo.teacher(family), limits={"max_steps": 4})
    store = RunStore(runs_dir)
    run_id = store.create_run(load_config(cfg).to_dict(), name=family).run_id
    ctx = RunContext(run_id)

    def cancel_at_two(event: Event) -> None:
        if event.kind == "step" and event.payload["step"] >= 2:
            ctx.cancel()

    ctx._sink = cancel_at_two
    with pytest.raises(RunCancelled):
        _run(cfg, run_id=run_id, ctx=ctx)
    assert _steps(store, run_id) == [1, 2]
    _, _, summary = _run(cfg, run_id=run_id, resume=True)
    assert _steps(store, run_id) == [1, 2, 3, 4]
    assert summary["student"]["val_ppl"] > 1 and summary["teacher"]["val_ppl"] > 1
    assert summary["student"]["params"] < summary["teacher"]["params"]
    strategy = summary["distill_loss_strategy"]
    assert strategy["strategy"] == ("logits" if family in TRANSFORMED else "fused"), strategy
    model, tok = _reload(Path(summary["export_dir"]), family)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    _same_held_out_loss(model, tok, cfg, summary)


@pytest.mark.parametrize("family", NAMES)
def test_from_teacher_student(family: str, zoo: Zoo, runs_dir: Path) -> None:
    """Layers 0 and 2 of the 3-layer teacher, wherever the family keeps them: renumbered
    for the KV cache (incremental decoding equals the full forward), trained, exported."""
    teacher = load_causal_lm(str(zoo.teacher(family)), device=CPU)
    whole = student_from_teacher(teacher.model, [0, 1, 2]).eval()  # (no dropout)
    ids = teacher.tokenizer("The list object's append", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(whole(ids).logits, teacher.model(ids).logits, atol=1e-6)
        cut = student_from_teacher(teacher.model, None).eval()
        assert cut.config.num_hidden_layers == 2
        full = cut(ids).logits[0, -1]
        past = cut(ids[:, :-1], use_cache=True).past_key_values
        step = cut(ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)
    cfg = _config(
        runs_dir, zoo.teacher(family), student={"init": "from_teacher"}, limits={"max_steps": 2}
    )
    _, _, summary = _run(cfg)
    model, tok = _reload(Path(summary["export_dir"]), family)
    assert model.config.num_hidden_layers == 2
    _same_held_out_loss(model, tok, cfg, summary)
    assert model.config.hidden_size == teacher.model.config.hidden_size


@pytest.mark.parametrize("family", NAMES)
def test_pretrained_student_of_the_family(family: str, zoo: Zoo, runs_dir: Path) -> None:
    """A smaller pretrained model of the same family (same tokenizer) passes the pairing
    check, distils and exports with its own shape."""
    student = zoo.student(family)
    cfg = _config(runs_dir, zoo.teacher(family), limits={"max_steps": 2})
    cfg["student"] = {"init": "pretrained", "source": str(student)}
    _, _, summary = _run(cfg)
    model, tok = _reload(Path(summary["export_dir"]), family)
    assert model.config.hidden_size == 32
    _same_held_out_loss(model, tok, cfg, summary)
    assert summary["student"]["params"] == load_causal_lm(str(student), device=CPU).params


MODES: dict[str, dict[str, Any]] = {
    "offline": {"distill": {"mode": "offline"}, "loss": {"top_k": 8}},
    "sequence": {
        "distill": {
            "mode": "sequence",
            "sequence": {"num_prompts": 4, "prompt_tokens": 8, "max_new_tokens": 8},
        }
    },
    "on_policy": {
        "distill": {
            "mode": "on_policy",
            "on_policy": {"fraction": 1.0, "prompt_tokens": 8, "max_new_tokens": 8},
        }
    },
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", NAMES)
def test_every_mode(
    family: str,
    mode: str,
    zoo: Zoo,
    runs_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "cache"))  # a fresh logit cache
    cfg = _config(runs_dir, zoo.teacher(family), limits={"max_steps": 2}, **MODES[mode])
    store, run_id, summary = _run(cfg)
    assert _steps(store, run_id) == [1, 2]
    assert summary["student"]["val_ppl"] > 1
    if mode == "offline":
        assert summary["logit_cache"]["k"] == 8
    if mode == "sequence":
        assert summary["sequence"]["generated_tokens"] > 0
    if mode == "on_policy":  # every step on the student's own samples
        assert [r.value for r in store.metrics(run_id, ["train/on_policy"])] == [1.0, 1.0]


@pytest.mark.parametrize("family", NAMES)
def test_fused_eligibility_matches_the_real_logits(family: str, zoo: Zoo) -> None:
    """The fused loss projects with the bare lm_head: it is chosen exactly where the
    family's logits are lm_head(last hidden state). Gemma's scaled embeddings do not touch
    the logits; Gemma 2's soft-capping does, and the probe alone (config check aside) sees
    it too."""
    model = load_causal_lm(str(zoo.teacher(family)), device=CPU).model
    ids = torch.tensor([[3, 40, 50, 60, 70]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        plain = model.get_output_embeddings()(out.hidden_states[-1])
    transformed = not torch.allclose(out.logits, plain, atol=1e-5)
    assert transformed == (family in TRANSFORMED)
    eligible, why = fused_eligibility(model)
    assert eligible == (not transformed), why
    if transformed:
        assert "softcapping" in why
        assert _probe(model, model.base_model, model.get_output_embeddings()) is not None


# --------------------------------------------------------------------------- across families

CROSS = [
    ("qwen2", "qwen3", None),  # one family's tokenizer, two architectures
    ("gemma2", "gemma3", None),
    ("qwen3", "qwen2_moe", None),
    ("llama", "mistral", "llama"),  # a Mistral student saved with Llama 3's tokenizer
    ("gpt2", "gpt_neox", "gpt2"),
]


@pytest.mark.parametrize(("teacher", "student", "tok"), CROSS)
def test_cross_family_pair_sharing_a_tokenizer(
    teacher: str, student: str, tok: str | None, zoo: Zoo, runs_dir: Path
) -> None:
    source = zoo.student(student, tokenizer_of=tok)
    cfg = _config(runs_dir, zoo.teacher(teacher), limits={"max_steps": 2})
    cfg["student"] = {"init": "pretrained", "source": str(source)}
    _, _, summary = _run(cfg)
    export = Path(summary["export_dir"])
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert (
        type(reloaded).__name__
        == type(AutoModelForCausalLM.from_config(_family_config(student))).__name__
    )
    assert summary["student"]["agreement"] >= 0


def test_cross_family_pair_with_other_tokenizers_is_refused(zoo: Zoo, runs_dir: Path) -> None:
    cfg = _config(runs_dir, zoo.teacher("llama"))
    cfg["student"] = {"init": "pretrained", "source": str(zoo.student("gpt2"))}
    with pytest.raises(ModelError, match="tokenizers differ"):
        _run(cfg)


# --------------------------------------------------------------------------- vocabulary


def test_padded_vocabularies_share_the_tokenizers_vocabulary(
    zoo: Zoo, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen2.5's case scaled down: one tokenizer of N tokens, a teacher head of N+64 rows,
    a student head of N+128 rows. The loss compares the N real logits (online and from
    the top-k cache), and the export keeps the student's padded rows."""
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "cache"))
    n = len(family_tokenizer("qwen"))
    teacher_dir = zoo.padded("qwen2", 64)
    student_dir = zoo.padded("qwen2", 128, student=True)
    teacher = load_causal_lm(str(teacher_dir), device=CPU)
    student = load_causal_lm(str(student_dir), device=CPU)
    assert teacher.model.get_output_embeddings().weight.shape[0] == n + 64
    assert student.model.get_output_embeddings().weight.shape[0] == n + 128
    assert shared_vocab_size(teacher, student) == n
    for mode in ({"mode": "online"}, {"mode": "offline"}):
        cfg = _config(
            runs_dir,
            teacher_dir,
            distill=mode,
            limits={"max_steps": 2},
            loss={"top_k": 8} if mode["mode"] == "offline" else {},
        )
        cfg["student"] = {"init": "pretrained", "source": str(student_dir)}
        _, _, summary = _run(cfg)
        assert summary["val_kl"] >= 0
        export = Path(summary["export_dir"])
        rows = json.loads((export / "config.json").read_text())["vocab_size"]
        assert rows == n + 128


def test_padded_rows_never_reach_the_loss(zoo: Zoo, runs_dir: Path, tmp_path: Path) -> None:
    """The Qwen2 teacher padded with 64 extra head rows of huge weights (logits far above
    every real one, so any loss over them would change completely): the student trains
    exactly as against the unpadded teacher."""
    n = len(family_tokenizer("qwen"))
    base = load_causal_lm(str(zoo.teacher("qwen2")), device=CPU)
    base.model.resize_token_embeddings(n + 64)
    with torch.no_grad():
        head = base.model.get_output_embeddings().weight
        head[n:] = 50.0 * torch.randn(64, head.shape[1], generator=torch.Generator().manual_seed(0))
    padded = tmp_path / "qwen2-padded-loud"
    base.model.save_pretrained(padded)
    base.tokenizer.save_pretrained(padded)
    student = {"init": "pretrained", "source": str(zoo.padded("qwen2", 128, student=True))}
    series = []
    for teacher in (zoo.teacher("qwen2"), padded):
        cfg = _config(runs_dir, teacher, limits={"max_steps": 3})
        cfg["student"] = student
        store, run_id, summary = _run(cfg)
        series.append(([r.value for r in store.metrics(run_id, ["train/loss"])], summary))
    (plain, a), (loud, b) = series
    assert loud == pytest.approx(plain, rel=1e-5)
    assert b["val_kl"] == pytest.approx(a["val_kl"], rel=1e-5)
    assert b["teacher"]["val_loss"] == pytest.approx(a["teacher"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_a_head_smaller_than_the_tokenizer_is_refused(who: str, zoo: Zoo, runs_dir: Path) -> None:
    n = len(family_tokenizer("qwen"))
    short = zoo.padded("qwen2", -16, student=who == "student")
    full = zoo.student("qwen2") if who == "teacher" else zoo.teacher("qwen2")
    teacher_dir, student_dir = (full, short) if who == "student" else (short, full)
    cfg = _config(runs_dir, teacher_dir)
    cfg["student"] = {"init": "pretrained", "source": str(student_dir)}
    with pytest.raises(ModelError, match="vocabulary mismatch") as info:
        _run(cfg)
    text = str(info.value)
    assert f"{n} tokens" in text and f"{who}'s output layer has only {n - 16} rows" in text


# --------------------------------------------------------------------------- context limit


def test_learned_positions_bound_the_sequence_length(zoo: Zoo, runs_dir: Path) -> None:
    """GPT-2's n_positions (64 here) is its context: a longer data.seq_len is refused
    before anything indexes past the position table; at 64 the run (and its 64-token
    generation-speed measurement, clamped to the context) completes."""
    cfg = _config(runs_dir, zoo.teacher("gpt2"), data={"seq_len": 128})
    with pytest.raises(ConfigError, match=r"GPT2Config\.n_positions=64") as info:
        _run(cfg)
    assert info.value.field == "data.seq_len"
    cfg = _config(runs_dir, zoo.teacher("gpt2"), data={"seq_len": 64}, limits={"max_steps": 1})
    _, _, summary = _run(cfg)
    assert summary["student"]["tokens_per_s"] > 0


# --------------------------------------------------------------------------- hub ids offline

HUB_ID = "foundry-zoo/tiny-qwen2"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Qwen2 teacher in the standard hub cache layout under a temporary HF_HUB_CACHE,
    with the hub switched off."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(zoo.teacher("qwen2"), repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_offline_from_the_cache(hub_cache: Path, runs_dir: Path) -> None:
    loaded = load_causal_lm(HUB_ID, device=CPU)
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert loaded.source == HUB_ID
    cfg = _config(runs_dir, HUB_ID, limits={"max_steps": 1})
    _, _, summary = _run(cfg)
    assert summary["teacher_source"] == HUB_ID
    assert summary["student"]["val_ppl"] > 1


def test_hub_id_offline_through_the_cli(hub_cache: Path, runs_dir: Path, tmp_path: Path) -> None:
    """The user's path: ``foundry distill`` in a fresh process whose environment names the
    hub cache (HF_HUB_CACHE, read by huggingface_hub at import) and HF_HUB_OFFLINE=1."""
    import os
    import subprocess
    import sys

    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(runs_dir, HUB_ID, limits={"max_steps": 1})))
    proc = subprocess.run(
        [sys.executable, "-m", "foundry_kernel.cli", "distill", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),  # (the fixture's HF_HUB_CACHE and HF_HUB_OFFLINE)
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "completed"
    assert summary["teacher"]["params"] == load_causal_lm(HUB_ID, device=CPU).params


def test_missing_hub_id_offline_says_what_to_do(hub_cache: Path) -> None:
    missing = "foundry-zoo/not-in-the-cache"
    with pytest.raises(ModelError) as info:
        load_causal_lm(missing, device=CPU, field="student.source")
    text = str(info.value)
    for part in (missing, "student.source", "HF_HUB_OFFLINE", str(hub_cache), "hf download"):
        assert part in text, part


def test_loaded_model_params_count_tied_weights_once(zoo: Zoo) -> None:
    tied = load_causal_lm(str(zoo.teacher("gemma2")), device=CPU)
    head, embed = tied.model.get_output_embeddings(), tied.model.get_input_embeddings()
    assert head.weight is embed.weight
    every_tensor = sum(t.numel() for t in tied.model.state_dict().values())
    assert tied.params == every_tensor - head.weight.numel()  # the shared matrix once


# --------------------------------------------------------------------------- student shapes


def test_fresh_students_take_the_familys_own_field_names(zoo: Zoo) -> None:
    """GPT-2's n_embd/n_layer/n_head/n_inner through its attribute_map; a mixture of
    experts keeps its expert count with experts no wider than the student's MLP."""
    from foundry_kernel._models import fresh_student
    from foundry_kernel.config import StudentConfig

    shape = StudentConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48)
    gpt2 = fresh_student(load_causal_lm(str(zoo.teacher("gpt2")), device=CPU).model, shape, seed=0)
    assert (gpt2.config.n_embd, gpt2.config.n_layer, gpt2.config.n_head) == (32, 2, 2)
    assert gpt2.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)  # Conv1D: (in, out)
    moe_teacher = load_causal_lm(str(zoo.teacher("qwen2_moe")), device=CPU).model
    moe = fresh_student(moe_teacher, shape, seed=0)
    assert moe.config.num_experts == moe_teacher.config.num_experts
    assert moe.config.moe_intermediate_size == 32  # the teacher's (below 48)
    assert moe.config.shared_expert_intermediate_size == 48  # shrunk from 64
    assert moe.config.mlp_only_layers == [1]
    one = fresh_student(
        moe_teacher, StudentConfig(hidden_size=32, num_layers=1, num_heads=2), seed=0
    )
    assert one.config.mlp_only_layers == []  # layer 1 no longer exists


def test_a_cut_the_config_cannot_describe_is_refused() -> None:
    """Qwen2-MoE with decoder_sparse_step=2 has experts in layers 1 and 3 only: keeping
    layers [1, 2] would put experts in new layer 0, which the config cannot say, so the
    export would not reload. Refused, naming the layers and the alternative."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        decoder_sparse_step=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelError, match=r"student\.layers=\[1, 2\].*init='fresh'"):
        student_from_teacher(model, [1, 2])
    kept = student_from_teacher(model, [0, 1])  # dense, sparse: what the config says
    assert kept.config.num_hidden_layers == 2


# --------------------------------------------------------------------------- vLLM

#: Families run through a real vLLM server here (each start costs 25-50 s); the README's
#: table lists the others as supported by vLLM's registry, not run.
VLLM_FAMILIES = ["qwen2", "gpt2"]


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_serves_the_family_as_teacher(
    family: str, zoo: Zoo, runs_dir: Path, vllm_python: Path
) -> None:
    """A managed vLLM server for the family's teacher: the run's teacher numbers come from
    the server and equal transformers' (GPT-2's server context is clamped to its
    n_positions=64, which vLLM enforces)."""
    from foundry_kernel.data._blocks import build_data
    from foundry_kernel.training._evaluate import evaluate_lm

    teacher = zoo.teacher(family)
    cfg = _config(runs_dir, teacher, loss={"top_k": 8}, limits={"max_steps": 2})
    cfg["teacher"] = {"source": str(teacher), "backend": "vllm", "server": {"eager": True}}
    _, _, summary = _run(cfg)
    assert summary["teacher"]["backend"] == "vllm"
    local = load_causal_lm(str(teacher), device=CPU)
    data = build_data(load_config(cfg).data, local.tokenizer, seed=0)
    hf = evaluate_lm(local.model, data.val, batch_size=4, max_batches=1)
    assert summary["teacher"]["val_loss"] == pytest.approx(hf["loss"], rel=1e-3)
    _reload(Path(summary["export_dir"]), family)


def test_fused_loss_asked_for_on_a_soft_capped_student_is_refused(zoo: Zoo, runs_dir: Path) -> None:
    cfg = _config(runs_dir, zoo.teacher("gemma2"), loss={"strategy": "fused"})
    with pytest.raises(ConfigError, match="final_logit_softcapping") as info:
        _run(cfg)
    assert info.value.field == "loss.strategy"


def test_context_limit_reads_each_familys_own_field() -> None:
    from transformers import Gemma3Config, GPT2Config, LlamaConfig, MistralConfig

    from foundry_kernel._models import context_limit

    assert context_limit(GPT2Config(n_positions=77)) == (77, "GPT2Config.n_positions")
    assert context_limit(LlamaConfig(max_position_embeddings=99)) == (
        99,
        "LlamaConfig.max_position_embeddings",
    )
    # a sliding window bounds how far a token looks back, not the sequence
    windowed = MistralConfig(max_position_embeddings=256, sliding_window=16)
    assert context_limit(windowed) == (256, "MistralConfig.max_position_embeddings")
    # a multimodal wrapper: the limit is its text model's
    wrapped = Gemma3Config(text_config={"max_position_embeddings": 321})
    assert context_limit(wrapped) == (321, "Gemma3TextConfig.max_position_embeddings")
