"""Hidden-state losses (``loss.hidden``): the formula, its gradients, both loss paths, exact
resume with the learned projection, two ranks in step, the config rules, a real run.

Real tiny Llamas built from configs, the real Trainer, real checkpoints; the 2-rank test is
a real torchrun launch over gloo.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import one_intra_op_thread, tiny_config_dict, torchrun_prefix
from transformers import LlamaConfig, LlamaForCausalLM

from foundry_kernel._context import RunContext
from foundry_kernel._world import World
from foundry_kernel.config import (
    CheckpointConfig,
    EvalConfig,
    HiddenLossConfig,
    LimitsConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    load_config,
)
from foundry_kernel.data._blocks import DataBundle, TokenBlocks
from foundry_kernel.errors import ConfigError, RunCancelled
from foundry_kernel.run._job import run_job
from foundry_kernel.store import RunStore
from foundry_kernel.teachers._interface import HFTeacher
from foundry_kernel.training._checkpoint import load_sharded_extra
from foundry_kernel.training._evaluate import shift_labels
from foundry_kernel.training._extra import ExtraParams
from foundry_kernel.training._hidden import (
    HiddenProjections,
    HiddenStateLoss,
    decoder_stack,
    default_pairs,
    hidden_state_loss,
    resolve_pairs,
    with_hidden_loss,
)
from foundry_kernel.training._losses import LossSpec
from foundry_kernel.training._strategy import (
    FusedLinearLoss,
    LogitsLoss,
    LossSetup,
    MicroBatch,
    choose_strategy,
)
from foundry_kernel.training._trainer import Trainer, TrainPlan

VOCAB = 64
SEQ = 10
WORKER = Path(__file__).parent / "dist_workers" / "hidden_worker.py"


def tiny_llama(seed: int, hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def blocks(n: int, seed: int) -> TokenBlocks:
    """Blocks with a masked prompt of 0-3 tokens and, every third block, 2 padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    for i in range(n):
        labels[i, : i % 4] = -100
        if i % 3 == 0:
            mask[i, -2:] = 0
            labels[i, -2:] = -100
    return TokenBlocks(ids, mask, labels)


def micro_batch(n: int = 3, *, num_valid: int | None = None) -> MicroBatch:
    b = blocks(n, 7)
    labels = shift_labels(b.labels)
    valid = int((labels != -100).sum())
    return MicroBatch(None, b.input_ids, b.attention_mask, labels, num_valid or valid)


# --------------------------------------------------------------------------- the formula


def _direct(
    h_s: list[torch.Tensor], h_t: list[torch.Tensor], maps: HiddenProjections, labels, kind, n
) -> torch.Tensor:
    """The documented formula, position by position."""
    per_pair = []
    for i, (s_all, t_all) in enumerate(zip(h_s, h_t, strict=True)):
        total = torch.zeros((), dtype=torch.float64)
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1]):
                if labels[b, t] == -100:
                    continue
                s = maps(i, s_all[b, t].double())
                g = t_all[b, t].double()
                if kind == "cosine":
                    total = total + 1 - (s @ g) / (s.norm() * g.norm())
                else:
                    total = total + ((s - g) ** 2).sum() / g.numel()
        per_pair.append(total / n)
    return torch.stack(per_pair).mean()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("widths", [(6, 6), (4, 7)], ids=["equal", "projected"])
def test_value_matches_the_direct_formula(kind: str, widths: tuple[int, int]) -> None:
    d_s, d_t = widths
    g = torch.Generator().manual_seed(0)
    h_s = [torch.randn(2, 5, d_s, generator=g, dtype=torch.float64) for _ in range(2)]
    h_t = [torch.randn(2, 5, d_t, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, :2] = -100  # a masked prompt
    labels[1, -1] = -100  # a padded end
    maps = HiddenProjections([(d_s, d_t)] * 2, seed=3).double()
    assert (sum(p.numel() for p in maps.parameters()) > 0) == (d_s != d_t)
    n = int((labels != -100).sum()) + 5  # a global count (other micro-batches) divides
    got = hidden_state_loss(h_s, h_t, maps, labels, kind=kind, num_valid=n)
    want = _direct(h_s, h_t, maps, labels, kind, n)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    # Padding and masked positions do not count: changing them changes nothing.
    h_s[0][0, :2] += 100.0
    again = hidden_state_loss(h_s, h_t, maps, labels, kind=kind, num_valid=n)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_gradients_pass_gradcheck_projection_included(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=False)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    start = HiddenProjections([(3, 4)], seed=0).double().maps[0]
    w = start.weight.detach().clone().requires_grad_(True)
    b = (torch.randn(4, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)

    def fn(hs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        maps = _Fixed(weight, bias)
        return hidden_state_loss([hs], [h_t], maps, labels, kind=kind, num_valid=4)

    assert torch.autograd.gradcheck(fn, (h_s, w, b), eps=1e-6, atol=1e-6)


class _Fixed(HiddenProjections):
    """A projection whose weight and bias are the gradcheck's inputs."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__([])
        self.w, self.b = w, b

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.w, self.b)


# --------------------------------------------------------------------------- mapping


def test_default_mapping_and_from_teacher_sources() -> None:
    assert default_pairs(4, 2) == [(2, 1), (4, 2)]
    assert default_pairs(6, 4) == [(2, 1), (3, 2), (5, 3), (6, 4)]  # half up, not banker's
    assert default_pairs(1, 3) == [(1, 1), (1, 2), (1, 3)]  # never the embeddings
    cfg = HiddenLossConfig()
    assert resolve_pairs(cfg, teacher_layers=4, student_layers=2, source_layers=[0, 2]) == [
        (1, 1),
        (3, 2),
    ]
    explicit = HiddenLossConfig(layers=[[0, 0], [4, 2]])
    assert resolve_pairs(explicit, teacher_layers=4, student_layers=2) == [(0, 0), (4, 2)]


def test_out_of_range_layers_name_the_field_and_both_ranges() -> None:
    cfg = HiddenLossConfig(layers=[[5, 1]])
    with pytest.raises(ConfigError) as err:
        resolve_pairs(cfg, teacher_layers=4, student_layers=2)
    assert err.value.field == "loss.hidden.layers"
    assert "0..4" in str(err.value) and "0..2" in str(err.value)
    teacher = HFTeacher(tiny_llama(1, 24, 2))
    choice = choose_strategy("logits", tiny_llama(0, 16, 2), teacher)
    with pytest.raises(ConfigError, match=r"loss\.hidden\.layers"):
        with_hidden_loss(choice, HiddenLossConfig(layers=[[1, 3]]), tiny_llama(0, 16, 2), teacher)


def test_config_rules() -> None:
    base = tiny_config_dict(Path("/tmp/unused"), loss={"hidden": {"kind": "mse"}})
    assert load_config(base).loss.hidden.kind == "mse"
    for extra in ({"distill": {"mode": "offline"}, "loss": {"top_k": 4}},):
        bad = tiny_config_dict(Path("/tmp/unused"), loss={"hidden": {}})
        for section, values in extra.items():
            bad.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError) as err:
            load_config(bad)
        assert err.value.field == "loss.hidden"
    with pytest.raises(ConfigError):  # pydantic: a pair is two indices >= 0
        load_config(tiny_config_dict(Path("/tmp/u"), loss={"hidden": {"layers": [[1, -1]]}}))
    two = World(rank=0, world_size=2, local_rank=0, local_world_size=2)
    with pytest.raises(ConfigError, match="fsdp2") as err:
        ExtraParams(HiddenProjections([(4, 8)]), OptimConfig(), two, fsdp=True)
    assert err.value.field == "distributed.strategy"


def test_the_stack_is_found_generically() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=VOCAB))
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
        )
    )
    assert decoder_stack(gpt2) is gpt2.transformer.h and len(decoder_stack(gpt2)) == 3
    assert decoder_stack(neox) is neox.gpt_neox.layers
    # The hooks see GPT-2's states too: index 0 is the first block's input.
    teacher = HFTeacher(gpt2)
    strategy = HiddenStateLoss(
        LogitsLoss(),
        HiddenLossConfig(layers=[[0, 0], [3, 1]]),
        [(0, 0), (3, 1)],
        student_width=16,
        teacher_width=16,
    )
    student = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    spec = LossSpec.from_config(LossConfig())
    out = strategy(LossSetup(student, teacher, spec, vocab_size=VOCAB), micro_batch())
    assert out.hidden is not None and torch.isfinite(out.hidden) and out.hidden > 0


# --------------------------------------------------------------------------- both paths


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("student_width", [24, 16], ids=["cut", "projected"])
def test_logits_and_fused_paths_give_the_same_total(kind: str, student_width: int) -> None:
    teacher_model = tiny_llama(1, 24, 2)
    student = copy.deepcopy(teacher_model) if student_width == 24 else tiny_llama(0, 16, 2)
    teacher = HFTeacher(teacher_model, vocab_size=VOCAB)
    cfg = HiddenLossConfig(kind=kind, weight=0.7)
    spec = LossSpec.from_config(LossConfig(ce_weight=0.5))
    batch = micro_batch(num_valid=40)
    outs, grads = {}, {}
    for name, inner in (("logits", LogitsLoss()), ("fused", FusedLinearLoss(project_teacher=True))):
        strategy = HiddenStateLoss(
            inner, cfg, default_pairs(2, 2), student_width=student_width, teacher_width=24
        )
        setup = LossSetup(student, teacher, spec, vocab_size=VOCAB)
        student.zero_grad(set_to_none=True)
        out = strategy(setup, batch)
        out.total.backward()
        outs[name] = out
        grads[name] = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
        if student_width != 24:
            grads[name + "/proj"] = strategy.extra.maps[0].weight.grad.clone()
    a, b = outs["logits"], outs["fused"]
    assert a.hidden is not None and b.hidden is not None
    if student_width == 24:  # a full copy of the teacher matches it layer for layer
        assert float(a.hidden) < 1e-6
    else:
        assert float(a.hidden) > 1e-6
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-5, abs=1e-6)
    assert a.hidden.item() == pytest.approx(b.hidden.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grads["logits"], grads["fused"], atol=1e-5)
    if student_width != 24:
        assert torch.allclose(grads["logits/proj"], grads["fused/proj"], atol=1e-6)


# --------------------------------------------------------------------------- the Trainer


def _plan(**loss: Any) -> TrainPlan:
    return TrainPlan(
        optim=OptimConfig(batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1),
        limits=LimitsConfig(max_steps=5),
        eval=EvalConfig(every_steps=100, max_batches=1),
        checkpoint=CheckpointConfig(every_steps=None, on_stop=True, keep_last=2),
        loss=LossConfig(ce_weight=0.5, hidden=HiddenLossConfig(**loss)),
        seed=3,
        loss_strategy="logits",
    )


def _train(
    ckpt: Path | None, *, stop_after: int | None = None, resume: bool = False
) -> tuple[dict[int, dict[str, float]], Trainer]:
    ctx = RunContext()
    curve: dict[int, dict[str, float]] = {}

    def sink(step: int, values: dict[str, float]) -> None:
        curve.setdefault(step, {}).update(values)
        if step == stop_after:
            ctx.cancel("stopped by the test")

    trainer = Trainer(
        tiny_llama(0, 16, 2),
        DataBundle(train=blocks(24, 0), val=blocks(4, 1), report={}),
        _plan(kind="mse", weight=0.5),
        ctx=ctx,
        on_metrics=sink,
        teacher=tiny_llama(1, 24, 2),
        vocab_size=VOCAB,
        ckpt_dir=ckpt,
    )
    try:
        trainer.fit(resume=resume)
    except RunCancelled:
        pass
    return curve, trainer


def test_a_resumed_run_reproduces_the_uninterrupted_one_projection_included(
    tmp_path: Path,
) -> None:
    full, whole = _train(None)
    assert sorted(full) == [1, 2, 3, 4, 5]
    assert all(v["train/hidden"] > 0 for v in full.values())
    assert "hidden-state loss mse" in whole.loss_strategy.reason
    start = HiddenProjections([(16, 24)] * 2, seed=3).state_dict()
    end = whole.extra.module.state_dict()  # type: ignore[union-attr]
    assert max(float((start[k] - end[k]).abs().max()) for k in start) > 1e-4  # it trained
    first, _ = _train(tmp_path / "ckpt", stop_after=2)
    assert sorted(first) == [1, 2]
    second, resumed = _train(tmp_path / "ckpt", resume=True)
    assert sorted(second) == [3, 4, 5]
    for step in (3, 4, 5):
        for key in ("train/loss", "train/hidden", "train/kd", "train/grad_norm"):
            assert second[step][key] == full[step][key], (step, key)
    got = resumed.extra.module.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(got[k], end[k]) for k in end)


def test_the_extra_parameters_are_not_the_students(tmp_path: Path) -> None:
    _, trainer = _train(None)
    names = set(trainer.model.state_dict())
    assert not any("maps" in n for n in names)
    student_params = {id(p) for p in trainer.model.parameters()}
    assert all(id(p) not in student_params for p in trainer.extra.params)


# --------------------------------------------------------------------------- two ranks


def test_two_ranks_keep_the_projection_identical(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        *torchrun_prefix(),
        str(WORKER),
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = ranks[0]["projection"], ranks[1]["projection"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on both ranks
    ref = _one_process_reference()
    for k in a:
        assert float((a[k] - ref[k]).abs().max()) <= 1e-5, k
    assert float((a["maps.0.weight"] - ranks[0]["initial"]["maps.0.weight"]).abs().max()) > 1e-4
    saved = load_sharded_extra(tmp_path / "ckpt")
    assert saved is not None and all(torch.equal(saved["module"][k], a[k]) for k in a)
    curve = ranks[0]["curve"]
    assert all(v["train/hidden"] > 0 for v in curve.values())


def _one_process_reference() -> dict[str, torch.Tensor]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hidden_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with one_intra_op_thread():  # as the ranks
        return module.train(World(), None)["projection"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- a real run


@pytest.mark.parametrize(
    ("mode", "student"),
    [
        ("online", {"init": "fresh", "hidden_size": 16, "num_layers": 2, "num_heads": 2}),
        ("on_policy", {"init": "from_teacher"}),
    ],
)
def test_a_real_run_records_the_hidden_loss_and_exports_no_projection(
    runs_dir: Path, mode: str, student: dict[str, Any]
) -> None:
    cfg = load_config(
        tiny_config_dict(
            runs_dir,
            student=student,
            data={"max_documents": 4},
            eval={"baseline": False},
            distill={"mode": mode, "on_policy": {"prompt_tokens": 8, "max_new_tokens": 8}},
            loss={"hidden": {"kind": "cosine", "weight": 0.5}},
        )
    )
    store = RunStore(cfg.runs_dir)
    run_id = store.create_run(cfg.to_dict(), name=cfg.name).run_id
    summary = run_job(cfg, store=store, run_id=run_id, ctx=RunContext(run_id), resume=False)
    reason = summary["distill_loss_strategy"]["reason"]
    assert "hidden-state loss cosine" in reason and "not exported" in reason
    if student["init"] == "from_teacher":  # the tiny teacher has one layer: kept, identity
        assert "1<-1" in reason and "identity" in reason
    else:
        assert "learned projections" in reason
    hidden = [row.value for row in store.metrics(run_id, ["train/hidden"])]
    assert len(hidden) == cfg.limits.max_steps and all(v >= -1e-6 for v in hidden)
    if student["init"] == "from_teacher":  # a cut layer starts as its source: 1 - cos ~ 0
        assert abs(hidden[0]) < 1e-5 < max(hidden)
    export = Path(summary["export_dir"])
    card = (export / "README.md").read_text()
    assert "not part of this export" in card
    from safetensors.torch import load_file

    weights = load_file(str(export / "model.safetensors"))
    assert not any("maps" in k for k in weights)
    StudentConfig.model_validate(student)  # the sections used are the schema's


# --------------------------------------------------------------------------- quality

# Measured when written (2 cores; the quality test's teacher, held-out ppl 64.6; 200 steps,
# the same batches and seeds; cosine, weight 1). Fresh student (hidden 48, 2 layers, a
# learned 48 -> 128 projection per pair): CE-only 139.7 / 142.1, logit KD 123.3 / 122.3,
# KD + hidden 92.4 / 94.2 (seeds 0 / 1): the hidden-state loss helps on both seeds, by 0.26-
# 0.29 nats. Student cut from the teacher (from_teacher: 1 of its 2 layers, width 128, no
# projection): CE-only 49.3 / 49.5, KD 52.9 / 53.0, KD + hidden 56.0 / 56.0: here it does
# not help (nor does logit KD: the cut student already beats this small, overfit teacher).


def _quality(seed: int, student: dict[str, Any], hidden: dict[str, Any] | None, **eval_: Any):
    from test_quality import QUALITY

    from foundry_kernel import run_sync

    cfg = copy.deepcopy(QUALITY)  # the same teacher (built once per session, cached)
    cfg.update(seed=seed, student=student, runs_dir=str(Path(f"{_QUALITY_TMP[0]}/runs-{seed}")))
    cfg["eval"].update(max_batches=40, **eval_)
    if hidden is not None:
        cfg["loss"] = {**cfg["loss"], "hidden": hidden}
    handle = run_sync(load_config(cfg))
    assert str(handle.state) == "completed", handle.error and handle.error.message
    return handle.result


_QUALITY_TMP: list[Path] = []


@pytest.mark.slow
def test_quality_the_hidden_loss_on_the_built_in_corpus(tmp_path: Path) -> None:
    """What is robust: with a fresh, narrower student (projection learned) the hidden-state
    loss beats logit KD alone, which beats CE-only, on two seeds; with a cut student it
    trains to a finite held-out loss (it did not help there when measured: see above)."""
    _QUALITY_TMP[:] = [tmp_path]
    fresh = {"init": "fresh", "hidden_size": 48, "num_layers": 2, "num_heads": 4}
    cosine = {"kind": "cosine", "weight": 1.0}
    for seed in (0, 1):
        kd = _quality(seed, fresh, None)
        both = _quality(seed, fresh, cosine, baseline=False)
        ce = kd["baseline"]["val_loss"]
        print(
            f"seed {seed}: CE {ce:.4f} KD {kd['student']['val_loss']:.4f} "
            f"KD+hidden {both['student']['val_loss']:.4f}"
        )
        assert both["student"]["val_loss"] < kd["student"]["val_loss"] - 0.1
        assert kd["student"]["val_loss"] < ce
    cut = _quality(0, {"init": "from_teacher"}, cosine, baseline=False)
    assert math.isfinite(cut["student"]["val_loss"]) and cut["student"]["val_loss"] < 4.5
