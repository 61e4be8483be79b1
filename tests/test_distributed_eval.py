"""Evaluation sharded over ranks and reduced as sums (issue 12), and its GPU-shaped loop.

The two-process figures come from a real gloo process group: ``torchrun --nproc-per-node
2`` runs ``tests/dist_workers/eval_worker.py``, whose ranks evaluate the same scenarios as
one process (rank 0 computes those too, with ``World()`` and unsharded models): the tiny
teacher's held-out blocks with uneven valid tokens (padding, unscored prompts), shares of
uneven length (one rank runs a dummy micro-batch), a replicated student and teacher, and
an FSDP2-sharded student and teacher with an odd number of global batches.

Host reads are counted with a ``TorchFunctionMode`` (see ``eval_worker.HostReads``): every
request for a tensor's value on the host passes through ``__torch_function__``, on CPU as
on a GPU, so "one sync per evaluation" is countable here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from foundry_kernel._runtime import resolve_runtime
from foundry_kernel._world import World
from foundry_kernel.config import RunConfig, load_config
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.errors import ResourceError
from foundry_kernel.run._resources import (
    MemoryEstimate,
    _layer_activation_bytes,
    estimate_memory,
    estimate_memory_for,
    preflight,
)
from foundry_kernel.supervisor import free_port
from foundry_kernel.teachers._interface import HFTeacher
from foundry_kernel.training._evaluate import (
    EvalShard,
    evaluate_lm,
    iter_batches,
    shift_labels,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER_PATH = ROOT / "tests" / "dist_workers" / "eval_worker.py"
_spec = importlib.util.spec_from_file_location("eval_worker", WORKER_PATH)
assert _spec is not None and _spec.loader is not None
worker: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = worker  # the importlib recipe: dataclasses look their module up
_spec.loader.exec_module(worker)

RTOL = 1e-6  # fp32 evaluation, sums in float64: measured differences are ~1e-7 or less
LAUNCH_TIMEOUT_S = 240  # the whole 2-rank run; its collectives time out after 60 s
OWN_READS = [("tolist", "_evaluate._padded_rows"), ("tolist", "_evaluate.totals")]


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir: Path) -> Any:
    return worker.setup(str(tiny_teacher_dir))


@pytest.fixture(scope="module")
def two_ranks(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Both ranks' results of one ``torchrun --nproc-per-node 2`` run (gloo, loopback)."""
    out = tmp_path_factory.mktemp("dist-eval")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(WORKER_PATH),
        str(tiny_teacher_dir),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_equal_figures(got: dict[str, float], want: dict[str, float]) -> float:
    """Same keys; counts exact, the rest within RTOL; returns the largest relative gap."""
    assert got.keys() == want.keys()
    assert got["tokens"] == want["tokens"]
    if "agreement" in want:
        assert got["agreement"] == want["agreement"]  # a ratio of exact counts
    worst = 0.0
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=RTOL), (key, got[key], value)
        worst = max(worst, abs(got[key] - value) / abs(value) if value else 0.0)
    return worst


SCENARIOS = ["dense", "sparse", "max_batches", "odd", "teacher_dense", "teacher_sparse"]


# --------------------------------------------------------------------------- the shard plan


def test_shares_are_disjoint_cover_the_global_batches_and_step_together() -> None:
    """Every block one process evaluates is evaluated by exactly one rank; ``max_batches``
    counts global batches; every rank runs the same number of steps (dummies fill)."""
    for n, batch, max_batches, size in [
        (13, 4, None, 2),
        (216, 4, 3, 2),
        (9, 2, None, 2),
        (10, 1, None, 4),
    ]:
        one = EvalShard.plan(n, batch, max_batches, World())
        plans = [
            EvalShard.plan(n, batch, max_batches, World(rank=r, world_size=size))
            for r in range(size)
        ]
        covered = [
            i for p in plans for s in p.slices() if s is not None for i in range(s.start, s.stop)
        ]
        assert covered == list(range(one.total))
        assert len({p.steps for p in plans}) == 1
        assert all(p.micro == math.ceil(batch / size) for p in plans)
    # one process walks today's batches: [0:4), [4:8), [8:12), [12:13)
    assert [(s.start, s.stop) for s in EvalShard.plan(13, 4, None, World()).slices()] == [
        (0, 4),
        (4, 8),
        (8, 12),
        (12, 13),
    ]
    assert EvalShard.plan(216, 4, 3, World()).total == 12
    # 13 blocks at batch 4 on 2 ranks: rank 1's last step is a dummy
    rank1 = list(EvalShard.plan(13, 4, None, World(rank=1, world_size=2)).slices())
    assert rank1[-1] is None and len(rank1) == 4


def test_a_batch_without_padding_goes_without_a_mask_and_gives_identical_logits(setup) -> None:
    """An all-ones mask keeps SDPA off its causal kernel and costs a host read inside
    transformers per forward; None gives bit-identical logits (CPU, the tiny Llama)."""
    ids = setup.val.input_ids[1:3]
    model = setup.teacher.model
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        unmasked = model(input_ids=ids, attention_mask=None).logits
    assert torch.equal(masked, unmasked)
    batches = list(
        iter_batches(setup.val, EvalShard.plan(6, 2, None, World()), torch.device("cpu"))
    )
    # blocks 0 and 3 carry padding (every third), blocks 1, 2, 4, 5 not
    assert [b.mask is None for b in batches] == [False, False, True]
    assert all(
        torch.equal(b.full_mask, setup.val.attention_mask[2 * i : 2 * i + 2])
        for i, b in enumerate(batches)
    )


# --------------------------------------------------------------------------- one process


def _reference(
    model, blocks: TokenBlocks, teacher, batch_size: int, vocab: int
) -> dict[str, float]:
    """The evaluation as it was before chunking: the valid rows' full-vocabulary fp32
    tensors for the whole batch at once, summed on the host per batch."""
    nll = kl = agree = 0.0
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            sl = slice(start, start + batch_size)
            ids, mask = blocks.input_ids[sl], blocks.attention_mask[sl]
            target = shift_labels(blocks.labels[sl])
            valid = target != IGNORE_INDEX
            logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()[valid]
            nll += F.cross_entropy(logits, target[valid], reduction="sum").item()
            tokens += int(valid.sum())
            t_logits = (
                teacher(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()[valid]
            )
            t_logp, s_logp = t_logits.log_softmax(-1), logits.log_softmax(-1)
            kl += (t_logp.exp() * (t_logp - s_logp)).sum().item()
            agree += (t_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    return {
        "loss": nll / tokens,
        "ppl": math.exp(nll / tokens),
        "tokens": float(tokens),
        "agreement": agree / tokens,
        "kl": kl / tokens,
    }


@pytest.mark.parametrize("chunk_tokens", [1024, 16, 7])
def test_chunked_evaluation_equals_the_whole_batch_formula(setup, chunk_tokens: int) -> None:
    """Chunking over tokens (and masking instead of compacting the valid rows, which would
    cost a host read per batch) changes only the summation order: within 1e-6 relative;
    counts are exact."""
    student = setup.student()
    blocks = worker.head(setup.val, 30)
    want = _reference(student, blocks, setup.teacher.model, 4, setup.vocab)
    got = evaluate_lm(
        student,
        blocks,
        batch_size=4,
        teacher=HFTeacher(setup.teacher.model, vocab_size=setup.vocab),
        vocab_size=setup.vocab,
        chunk_tokens=chunk_tokens,
    )
    worst = _assert_equal_figures(got, want)
    print(f"chunk {chunk_tokens}: largest relative difference to the unchunked formula {worst:.2e}")


def _unpadded(blocks: TokenBlocks) -> TokenBlocks:
    return dataclasses.replace(blocks, attention_mask=torch.ones_like(blocks.attention_mask))


@pytest.mark.parametrize("n_batches", [1, 3, 7])
def test_one_device_read_per_evaluation_whatever_the_batches(setup, n_batches: int) -> None:
    """Without padding an evaluation reads exactly two values on the host, however many
    batches: the host-resident data's padding flags (once; on a GPU that is host memory,
    no sync) and the reduced totals (the one device sync). Nothing per batch, neither in
    Foundry's code nor inside the student's or the teacher's forward."""
    blocks = _unpadded(worker.head(setup.val, 4 * n_batches))
    teacher = HFTeacher(setup.teacher.model, vocab_size=setup.vocab)
    with worker.HostReads() as reads:
        evaluate_lm(setup.student(), blocks, batch_size=4, teacher=teacher, vocab_size=setup.vocab)
    assert reads.reads == OWN_READS


def test_padded_batches_add_only_transformers_own_mask_reads(setup) -> None:
    """With padding the only per-batch reads are transformers' own check of the mask it
    is given (``_ignore_causal_mask_sdpa``), a fixed number per forward that needs a mask."""
    blocks = worker.head(setup.val, 12)  # blocks 0, 3, 6, 9 padded: all three batches
    teacher = HFTeacher(setup.teacher.model, vocab_size=setup.vocab)
    with worker.HostReads() as reads:
        evaluate_lm(setup.student(), blocks, batch_size=4, teacher=teacher, vocab_size=setup.vocab)
    ours = [r for r in reads.reads if r[1].startswith("_evaluate.")]
    theirs = [r for r in reads.reads if not r[1].startswith("_evaluate.")]
    assert ours == OWN_READS
    # 3 batches x (student + teacher) forwards with a mask; transformers 5 checks twice each
    assert set(theirs) == {("__bool__", "masking_utils._ignore_causal_mask_sdpa")}
    assert len(theirs) % (3 * 2) == 0


# --------------------------------------------------------------------------- two processes


def _valid_tokens(blocks: TokenBlocks, sl: slice) -> int:
    return int((shift_labels(blocks.labels[sl]) != IGNORE_INDEX).sum())


def test_the_two_rank_scenarios_are_uneven(setup) -> None:
    """What the 2-rank scenarios exercise: shares of uneven valid tokens, and a rank that
    runs fewer real micro-batches than the other (so it needs a dummy)."""
    blocks = worker.head(setup.val, 13)
    plans = [EvalShard.plan(13, 4, None, World(rank=r, world_size=2)) for r in range(2)]
    valid = [_valid_tokens(blocks, slice(p.start, p.stop)) for p in plans]
    real = [sum(s is not None for s in p.slices()) for p in plans]
    assert valid[0] != valid[1] and real == [4, 3]
    odd = [EvalShard.plan(9, 2, None, World(rank=r, world_size=2)) for r in range(2)]
    assert math.ceil(9 / 2) % 2 == 1 and [sum(s is not None for s in p.slices()) for p in odd] == [
        5,
        4,
    ]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_replicated_ranks_equal_one_process(two_ranks, scenario: str) -> None:
    """Perplexity, agreement and KL of a 2-rank evaluation equal one process's, on both
    ranks (sums reduced, not means of means)."""
    rank0, rank1 = two_ranks
    got, want = rank0["replicated"][scenario], rank0["one_process"][scenario]
    assert rank1["replicated"][scenario] == got  # every rank returns the same figures
    worst = _assert_equal_figures(got, want)
    print(f"replicated {scenario}: largest relative difference to one process {worst:.2e}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_sharded_models_on_two_ranks_finish_and_equal_one_process(
    two_ranks, scenario: str
) -> None:
    """An FSDP2-sharded student and teacher all-gather inside every forward: with uneven
    shares and an odd number of global batches ("odd": 5 batches of 2 blocks) the run
    still finishes (the launch is bounded by LAUNCH_TIMEOUT_S and the collectives by
    60 s) because a rank without a block runs a dummy forward; its figures equal one
    process's."""
    rank0, rank1 = two_ranks
    got, want = rank0["fsdp2"][scenario], rank0["one_process"][scenario]
    assert rank1["fsdp2"][scenario] == got
    worst = _assert_equal_figures(got, want)
    print(f"fsdp2 {scenario}: largest relative difference to one process {worst:.2e}")


@pytest.mark.parametrize("kind", ["replicated", "fsdp2"])
def test_each_rank_reads_the_device_once_per_evaluation(two_ranks, kind: str) -> None:
    """Per rank, Foundry's evaluation reads the padding flags once and the all-reduced
    totals once (the other reads are transformers' mask checks on padded batches)."""
    for rank in two_ranks:
        for scenario in ("dense", "sparse"):
            reads = [tuple(r) for r in rank[kind][f"{scenario}/host_reads"]]
            assert [r for r in reads if r[1].startswith("_evaluate.")] == OWN_READS
            assert {r[1] for r in reads} <= {r[1] for r in OWN_READS} | {
                "masking_utils._ignore_causal_mask_sdpa"
            }


# --------------------------------------------------------------------------- the preflight

SHAPES: dict[str, int] = {
    "teacher_params": 4_700_000,
    "student_params": 1_050_000,
    "vocab_size": 4096,
    "teacher_hidden": 256,
    "student_hidden": 128,
    "teacher_layers": 4,
    "student_layers": 3,
}


def _cfg(**overrides: Any) -> RunConfig:
    return load_config(None, {"device": "cpu", "teacher.dtype": "float32", **overrides})


def _est(config: RunConfig, **kw: Any) -> MemoryEstimate:
    runtime = resolve_runtime(
        config, teacher_hidden=SHAPES["teacher_hidden"], student_hidden=SHAPES["student_hidden"]
    )
    return estimate_memory(config, runtime=runtime, **SHAPES, **kw)


def test_the_defaults_are_one_process_as_before() -> None:
    """Existing callers (no world arguments) get W = 1, DDP, a replicated teacher: no
    sharding, no buckets, no gathered units."""
    cfg = _cfg()
    plain = _est(cfg)
    assert plain == _est(cfg, world_size=1, strategy="ddp", teacher_placement="replicate")
    assert (plain.gathered_units, plain.grad_buckets) == (0, 0)
    p = SHAPES["student_params"]
    assert (plain.student_weights, plain.student_grads, plain.optimizer_state) == (
        4 * p,
        4 * p,
        8 * p,
    )


def test_fsdp2_shards_parameter_state_across_ranks_plus_the_gathered_unit() -> None:
    """Per rank at W=2: half the W=1 weights, gradients and AdamW state; the all-gathered
    unit does not shrink with W; activations follow the per-rank micro-batch."""
    cfg = _cfg(**{"optim.batch_size": 8})
    one = _est(cfg, world_size=1, strategy="fsdp2")
    two = _est(cfg, world_size=2, strategy="fsdp2")
    for part in ("student_weights", "student_grads", "optimizer_state"):
        assert getattr(two, part) == math.ceil(getattr(one, part) / 2)
    assert two.gathered_units == one.gathered_units > 0
    # the unit term is the largest unit (here the root: embeddings + head) at 2 x fp32
    # gathered parameters + its fp32 gradient
    root = 2 * SHAPES["vocab_size"] * SHAPES["student_hidden"]
    assert one.gathered_units == root * (2 * 4 + 4)
    assert two.activations * 2 == one.activations
    assert two.student_logits * 2 == one.student_logits
    assert two.total < one.total


def test_ddp_keeps_the_full_student_plus_gradient_buckets_and_rounds_the_share_up() -> None:
    cfg = _cfg(**{"optim.batch_size": 5})
    one, two = _est(cfg), _est(cfg, world_size=2, strategy="ddp")
    p = SHAPES["student_params"]
    assert (two.student_weights, two.student_grads, two.optimizer_state) == (4 * p, 4 * p, 8 * p)
    assert two.grad_buckets == 4 * p and two.gathered_units == 0
    # 5 global blocks on 2 ranks: 3 on the busier rank
    assert two.activations * 5 == one.activations * 3
    assert "per rank of 2 (ddp, teacher replicate): 3 x" in " ".join(two.notes)


def test_teacher_placements() -> None:
    """shard divides the teacher's weights by W and adds its gathered units (no gradient,
    no optimizer state); server keeps nothing in the process; cache has no teacher
    forward in the training step but keeps the live teacher evaluation uses."""
    cfg = _cfg()
    rep = _est(cfg, world_size=2, teacher_placement="replicate")
    shard = _est(cfg, world_size=2, teacher_placement="shard")
    server = _est(cfg, world_size=2, teacher_placement="server")
    cache = _est(cfg, world_size=2, teacher_placement="cache")
    assert shard.teacher_weights == math.ceil(rep.teacher_weights / 2)
    t_root = 2 * SHAPES["vocab_size"] * SHAPES["teacher_hidden"]
    assert shard.gathered_units == 2 * t_root * 4  # two gathered fp32 units, no gradient
    assert shard.student_grads == rep.student_grads and shard.optimizer_state == rep.optimizer_state
    assert (server.teacher_weights, server.teacher_forward, server.teacher_logits) == (0, 0, 0)
    assert cache.teacher_weights == rep.teacher_weights
    assert (cache.teacher_forward, cache.teacher_logits) == (0, 0)


def test_evaluation_is_counted_where_it_exceeds_the_training_step() -> None:
    """Under the fused loss the training step never holds [N, V] logits but evaluation
    does (the student's, the teacher's, and its fp32 chunks): the estimate counts the
    difference, and a preflight with just the training step's memory free refuses."""
    cfg = _cfg(**{"optim.batch_size": 8, "optim.precision": "float32"})
    fused = _est(cfg, fused_student=True, fused_teacher=True)
    tokens, vocab = 8 * cfg.data.seq_len, SHAPES["vocab_size"]
    from foundry_kernel.training._evaluate import EVAL_CHUNK_COPIES
    from foundry_kernel.training._losses import chunk_rows

    chunk = min(chunk_rows(cfg.loss.chunk_tokens, vocab), tokens)
    heads = cfg.student.num_heads or cfg.teacher.build.num_heads
    seq, hidden = cfg.data.seq_len, SHAPES["student_hidden"]
    layer = _layer_activation_bytes(tokens, seq, hidden, heads, 4)  # one no-grad layer, fp32
    train = fused.activations + fused.loss_chunks + fused.teacher_forward
    evaluation = (
        layer
        + tokens * vocab * 4  # the student's logits
        + chunk * vocab * 4 * EVAL_CHUNK_COPIES
        + fused.teacher_forward
        + tokens * vocab * 4  # the teacher's logits
    )
    assert fused.evaluation == evaluation - train > 0
    without_eval = fused.total - fused.evaluation
    with pytest.raises(ResourceError, match="memory"):
        preflight(cfg, fused, runs_dir=ROOT, checkpoint_bytes=1, free_bytes=without_eval + 1)
    plain = _est(cfg)  # the full-logits step holds more than evaluation: nothing added
    assert plain.evaluation == 0


def test_bad_world_arguments_are_refused_by_name() -> None:
    cfg = _cfg()
    with pytest.raises(ValueError, match="strategy"):
        _est(cfg, strategy="zero3")
    with pytest.raises(ValueError, match="teacher_placement"):
        _est(cfg, teacher_placement="auto")
    with pytest.raises(ValueError, match="world_size"):
        _est(cfg, world_size=0)


def test_the_config_names_strategy_and_placement() -> None:
    cfg = _cfg(**{"distributed.strategy": "fsdp2", "teacher.placement": "shard"})
    runtime = resolve_runtime(
        cfg, teacher_hidden=SHAPES["teacher_hidden"], student_hidden=SHAPES["student_hidden"]
    )
    got = estimate_memory_for(cfg, 2, runtime=runtime, **SHAPES)
    assert got == _est(cfg, world_size=2, strategy="fsdp2", teacher_placement="shard")


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_an_evaluation_synchronises_once(setup) -> None:
    """On a GPU, torch's own sync detector (``torch.cuda.set_sync_debug_mode``) flags
    every operation that makes the host wait for the device: pageable copies, ``.item()``,
    ``bool(t)`` ... Without padding an evaluation (student and teacher on the device,
    three batches) makes exactly one: the read of the totals."""
    import copy
    import warnings

    cuda = torch.device("cuda")
    student = setup.student().to(cuda)
    teacher = HFTeacher(copy.deepcopy(setup.teacher.model).to(cuda), vocab_size=setup.vocab)
    blocks = _unpadded(worker.head(setup.val, 12))
    kwargs = {"batch_size": 4, "teacher": teacher, "vocab_size": setup.vocab}
    want = evaluate_lm(
        setup.student(),
        blocks,
        **{**kwargs, "teacher": HFTeacher(setup.teacher.model, vocab_size=setup.vocab)},
    )
    evaluate_lm(student, blocks, **kwargs)  # warm-up: lazy CUDA initialisation syncs
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = evaluate_lm(student, blocks, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert got["tokens"] == want["tokens"]
    assert math.isclose(got["loss"], want["loss"], rel_tol=1e-4)
