"""Data-parallel training on CPU with gloo: 2 real processes (torchrun) against 1.

The worker (``tests/dist_workers/train_worker.py``) trains a tiny real Llama student from
a tiny real Llama teacher on blocks whose prompts are masked out of the labels, a
different length per block, so the two ranks' shares of every micro-batch hold different
numbers of valid tokens; ``grad_accum=2``. Each strategy (ddp, fsdp2) runs once per module
in one torchrun launch; the single-process reference runs in this process with the same
builders. Tolerances are fp32 rounding (summation order differs between 1 and 2 ranks).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import one_intra_op_thread, torchrun_prefix

from foundry_kernel._context import RunContext
from foundry_kernel._world import World
from foundry_kernel.data._blocks import BatchSampler
from foundry_kernel.errors import ConfigError
from foundry_kernel.training._checkpoint import CheckpointError, load_sharded
from foundry_kernel.training._evaluate import shift_labels
from foundry_kernel.training._parallel import (
    StepModule,
    fsdp_mixed_precision,
    shard_teacher,
    unwrap,
    wrap_student,
)
from foundry_kernel.training._trainer import Trainer

WORKER = Path(__file__).parent / "dist_workers" / "train_worker.py"
TOL = 1e-5  # fp32 rounding of a different summation order, over 5 AdamW steps
LOSS_STRATEGIES = ("logits", "fused")
MIXED = ("auto", "off", "bfloat16")


def _load_worker() -> ModuleType:
    """The worker's builders, loaded by file path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _curve_diff(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[s]["train/loss"] - b[s]["train/loss"]) for s in a)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The whole module on one intra-op thread, as its ranks run (conftest)."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """The single-process runs (World(): no process group, the unwrapped model)."""
    return {ls: worker.train(World(), "ddp", ls) for ls in LOSS_STRATEGIES}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A single-process run cancelled during step 3: its one-file checkpoint (step 2, the
    last completed step) is what the 2-rank jobs resume from (1 -> 2)."""
    ckpt = tmp_path_factory.mktemp("one-process") / "ckpt"
    run = worker.train(World(), "ddp", "logits", ckpt=ckpt, stop_rank=0)
    assert run["ended"] == "cancelled" and run["step"] == worker.STOP_AT - 1
    assert json.loads((ckpt / "latest.json").read_text())["file"].endswith(".pt")
    return ckpt, run


@pytest.fixture(scope="module")
def padded_reference() -> dict[str, Any]:
    return worker.train(World(), "ddp", "logits", padded=True)


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def launched(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    one_process: tuple[Path, dict[str, Any]],
) -> Any:
    """One 2-process torchrun launch of every scenario for this strategy."""
    strategy = request.param
    out = tmp_path_factory.mktemp(f"dist-{strategy}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        *torchrun_prefix(),
        str(WORKER),
        "--strategy",
        strategy,
        "--out",
        str(out),
        "--one-process-ckpt",
        str(one_process[0]),
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, check=False)
    if done.returncode != 0:  # the ranks' own lines first: torchrun's summary hides them
        ranks_said = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
        pytest.fail("\n".join(ranks_said[-60:]) + "\n" + done.stderr[-3000:])
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return strategy, out, ranks


def test_the_ranks_see_uneven_valid_token_counts() -> None:
    """The premise of the equality test: within one micro-batch the two ranks' shares hold
    different numbers of valid labels (a per-rank mean would then weigh tokens unequally)."""
    train = worker.bundle().train
    idx = BatchSampler(len(train), 4, seed=3).next_indices()
    counts = []
    for rank in range(2):
        start, stop = World(rank=rank, world_size=2, local_rank=rank, local_world_size=2).shard(4)
        counts.append(int((shift_labels(train.labels[idx[start:stop]]) != -100).sum()))
    assert counts[0] != counts[1], counts


@pytest.mark.parametrize("loss_strategy", LOSS_STRATEGIES)
def test_two_ranks_train_what_one_process_trains(launched, reference, loss_strategy) -> None:
    """Same global batch on 1 and 2 ranks: same loss curve, same validation metrics, same
    final weights (the loss is divided by the whole step's valid-token count over both
    micro-batches and both ranks; the ranks' gradients are summed)."""
    strategy, _, ranks = launched
    got, ref = ranks[0][f"full_{loss_strategy}"], reference[loss_strategy]
    assert got["loss_strategy"] == ref["loss_strategy"] == loss_strategy
    assert got["ended"] == "finished" and got["step"] == worker.MAX_STEPS
    curve = _curve_diff(got["curve"], ref["curve"])
    weights = _max_diff(got["weights"], ref["weights"])
    print(f"{strategy}/{loss_strategy}: loss curve {curve:.3g}, weights {weights:.3g}")
    assert curve <= TOL
    assert weights <= TOL
    for key, value in ref["val"].items():
        assert got["val"][key] == pytest.approx(value, rel=TOL, abs=TOL), key
    moved = _max_diff(ref["weights"], worker.student().state_dict())
    assert moved > 100 * TOL  # training did move the weights


@pytest.mark.parametrize("loss_strategy", LOSS_STRATEGIES)
def test_a_sharded_teacher_teaches_what_a_whole_one_does(launched, reference, loss_strategy):
    """teacher.placement=shard: the frozen teacher split across the ranks with FSDP2 (no
    gradients, no optimizer state) gives the single process's training, under either
    student strategy and either loss path."""
    _, _, ranks = launched
    got = ranks[0][f"shard_{loss_strategy}"]
    assert got["ended"] == "finished" and got["loss_strategy"] == loss_strategy
    assert _max_diff(got["weights"], reference[loss_strategy]["weights"]) <= TOL


def test_on_policy_steps_run_on_both_ranks(launched) -> None:
    """Every step on the student's own samples: each rank samples its share with the same
    number of forwards (fixed-length continuations, no early stop), so no rank waits in a
    collective; under ddp the ranks end with the same weights."""
    strategy, _, ranks = launched
    run = ranks[0]["on_policy"]
    assert run["ended"] == "finished" and sorted(run["curve"]) == list(range(1, 6))
    assert all(values["train/on_policy"] == 1.0 for values in run["curve"].values())
    assert all(math.isfinite(values["train/loss"]) for values in run["curve"].values())
    if strategy == "ddp":
        assert _max_diff(run["local"], ranks[1]["on_policy"]["local"]) == 0


def test_only_rank_zero_reports_and_every_rank_is_measured(launched) -> None:
    """Rank 0's step metrics carry every rank's throughput and memory; rank 1 reports
    nothing and returns no full state dict (full_state_dict is rank 0's)."""
    _, _, ranks = launched
    first = ranks[0]["full_logits"]["curve"][1]
    for r in range(2):
        assert first[f"rank/{r}/tokens_per_s"] > 0
        assert first[f"rank/{r}/rss_mb"] > 10
        assert first[f"rank/{r}/vram_mb"] == 0  # CPU
    assert ranks[1]["full_logits"]["curve"] == {}
    assert ranks[1]["full_logits"]["weights"] is None
    full = ranks[0]["full_logits"]
    assert _max_diff(full["weights"], full["via_wrapper"]) == 0  # model or wrapper: same


def test_fused_and_logits_agree_through_the_wrapper(launched) -> None:
    """Both loss paths run inside the wrapped module's forward, so both train the same
    model on 2 ranks; a DDP rank's weights equal the other's. The control (TRL #5282,
    reproduced on purpose under ddp: the fused loss run outside the wrapper) leaves the
    ranks' weights apart: this test would see the bug."""
    strategy, _, ranks = launched
    fused, logits = ranks[0]["full_fused"]["weights"], ranks[0]["full_logits"]["weights"]
    assert _max_diff(fused, logits) <= TOL
    if strategy != "ddp":
        return
    for ls in LOSS_STRATEGIES:
        assert _max_diff(ranks[0][f"full_{ls}"]["local"], ranks[1][f"full_{ls}"]["local"]) == 0
    apart = _max_diff(ranks[0]["bypass_fused"]["local"], ranks[1]["bypass_fused"]["local"])
    assert apart > 1e-3


def test_a_stop_on_one_rank_stops_both_after_that_step(launched) -> None:
    """Rank 1 alone is cancelled during step 3; both ranks finish step 3, checkpoint it
    (checkpoint.on_stop) and raise RunCancelled together: nobody is left in a collective."""
    _, out, ranks = launched
    for r in range(2):
        assert ranks[r]["stopped"]["ended"] == "cancelled"
        assert ranks[r]["stopped"]["step"] == worker.STOP_AT
    assert sorted(ranks[0]["stopped"]["curve"]) == list(range(1, worker.STOP_AT + 1))
    manifest = json.loads((out / "ckpt_at_stop" / "latest.json").read_text())
    assert manifest["format"] == "dcp" and manifest["step"] == worker.STOP_AT
    assert manifest["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.json"} <= set(manifest["files"])


def test_sharded_resume_on_the_same_world_equals_the_uninterrupted_run(launched) -> None:
    """Stopped at step 3, resumed on 2 ranks from the DCP checkpoint: steps 4-5 and the
    final weights are the uninterrupted run's."""
    _, _, ranks = launched
    resumed, full = ranks[0]["resumed"], ranks[0]["full_logits"]
    assert sorted(resumed["curve"]) == [worker.STOP_AT + 1, worker.MAX_STEPS]
    for step, values in resumed["curve"].items():
        assert values["train/loss"] == pytest.approx(full["curve"][step]["train/loss"], abs=1e-6)
    gap = _max_diff(resumed["weights"], full["weights"])
    print(f"resume 2->2: weights {gap:.3g}")
    assert gap <= 1e-6


def test_a_checkpoint_of_the_current_step_is_not_rewritten(launched) -> None:
    """Resumed at step 3 with max_steps 3: the final checkpoint finds step 3 already in the
    manifest and leaves folder and manifest as they were (rewriting the folder the manifest
    names would leave a window with no valid checkpoint)."""
    _, out, ranks = launched
    assert ranks[0]["again"]["ended"] == "finished"
    assert ranks[0]["again"]["step"] == worker.STOP_AT
    before = (out / "ckpt_at_stop" / "latest.json").read_text()
    assert (out / "ckpt_again" / "latest.json").read_text() == before
    folder = f"step-{worker.STOP_AT:08d}"
    for name in json.loads(before)["files"]:
        old, new = out / "ckpt_at_stop" / folder / name, out / "ckpt_again" / folder / name
        assert new.stat().st_mtime_ns == old.stat().st_mtime_ns, name  # copytree kept it


def test_a_two_rank_checkpoint_resumes_on_one_process(launched, reference, tmp_path) -> None:
    """DCP reshards: the 2-rank checkpoint of step 3 resumed by one process finishes the
    run the single process would have run uninterrupted (the global batch does not depend
    on the world size)."""
    strategy, out, _ = launched
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt_at_stop", ckpt)
    resumed = worker.train(World(), strategy, "logits", ckpt=ckpt, resume=True)
    ref = reference["logits"]
    assert sorted(resumed["curve"]) == [worker.STOP_AT + 1, worker.MAX_STEPS]
    for step, values in resumed["curve"].items():
        assert values["train/loss"] == pytest.approx(ref["curve"][step]["train/loss"], abs=TOL)
    gap = _max_diff(resumed["weights"], ref["weights"])
    print(f"{strategy} resume 2->1: weights {gap:.3g}")
    assert gap <= TOL


def test_a_one_process_checkpoint_resumes_on_two_ranks(launched, reference) -> None:
    """1 -> 2: every rank loads the one-file checkpoint's full states (re-keyed by name,
    resharded under fsdp2) and the job finishes the uninterrupted single-process run."""
    strategy, _, ranks = launched
    resumed, ref = ranks[0]["from_one"], reference["logits"]
    assert resumed["ended"] == "finished"
    assert sorted(resumed["curve"]) == list(range(worker.STOP_AT, worker.MAX_STEPS + 1))
    for step, values in resumed["curve"].items():
        assert values["train/loss"] == pytest.approx(ref["curve"][step]["train/loss"], abs=TOL)
    gap = _max_diff(resumed["weights"], ref["weights"])
    print(f"{strategy} resume 1->2: weights {gap:.3g}")
    assert gap <= TOL


def test_padded_blocks_train_the_same_on_two_ranks(launched, padded_reference) -> None:
    """With padding the mask is passed (the blocks are not pad-free) and padded positions
    carry no label: 2 ranks still equal 1 process."""
    _, _, ranks = launched
    got = ranks[0]["padded"]
    assert _curve_diff(got["curve"], padded_reference["curve"]) <= TOL
    assert _max_diff(got["weights"], padded_reference["weights"]) <= TOL


def test_a_damaged_sharded_checkpoint_is_refused(launched, tmp_path) -> None:
    """Every file of the folder is checked against the manifest's SHA-256 before loading."""
    _, out, _ = launched
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt_at_stop", ckpt)
    part = next((ckpt / f"step-{worker.STOP_AT:08d}").glob("__1_*.distcp"))
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    model = worker.student()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_sharded(ckpt, model=model, optimizer=optimizer, world=World())


def test_a_global_batch_smaller_than_the_world_is_refused() -> None:
    """optim.batch_size is global: each of the 8 ranks needs at least one block."""
    world = World(rank=0, world_size=8, local_rank=0, local_world_size=8)
    with pytest.raises(ConfigError) as err:
        Trainer(
            worker.student(),
            worker.bundle(),
            worker.plan("ddp", "logits"),
            ctx=RunContext(),
            on_metrics=None,
            teacher=worker.teacher(),
            vocab_size=worker.VOCAB,
            world=world,
        )
    assert err.value.field == "optim.batch_size"


def test_pending_stop_reports_without_raising() -> None:
    ctx = RunContext(deadline=None)
    assert ctx.pending_stop() is None
    ctx.cancel("by the user")
    assert ctx.pending_stop() == "by the user"
    late = RunContext(deadline=0.0, clock=lambda: 1.0)
    assert late.pending_stop() == "timed_out"


def test_no_attention_mask_gives_the_same_logits_as_an_all_ones_mask() -> None:
    """The premise of passing ``attention_mask=None`` on pad-free batches (SDPA may then
    take its causal kernel): on CPU the logits are bit-identical."""
    model = worker.student().eval()
    ids = torch.randint(
        0, worker.VOCAB, (3, worker.SEQ), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ones = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        none = model(input_ids=ids, attention_mask=None).logits
    assert torch.equal(ones, none)


# --------------------------------------------------------------------------- host syncs

# Tensor -> Python reads: on a GPU each one waits for the device. On CPU they cost nothing,
# so the test counts the calls themselves (every Python-level read of a tensor's values),
# by the caller. Two callers are host-side by design and read tensors that stay on the host
# on a GPU too: the sampler's index list (``_host_indices``) and torch.optim's step counters
# (CPU tensors for non-fused AdamW; the fused CUDA AdamW the Trainer uses reads none).
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
_HOST_SIDE = ("_host_indices",)


@contextlib.contextmanager
def _counting_reads() -> Iterator[collections.Counter[str]]:
    """Count tensor value reads by caller (``file:function``) while active."""
    seen: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    original_equal = torch.equal

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            seen[f"{Path(caller.co_filename).name}:{caller.co_name}:{name}"] += 1
            return fn(*args, **kwargs)

        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    torch.equal = counted("equal", original_equal)
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.equal = original_equal


@pytest.mark.parametrize("loss_strategy", LOSS_STRATEGIES)
def test_one_host_sync_per_optimizer_step(loss_strategy: str) -> None:
    """A single-process optimizer step (2 micro-batches, a live teacher) reads tensor
    values once: the step-end vector (loss parts, tokens, grad norm). Token counts come
    from the host's blocks, labels were validated once at Trainer init, the loss
    backward does not compare its upstream gradient, and pad-free blocks pass no mask
    (transformers' all-ones check is a read). Not counted: ``nonzero`` in the losses'
    row compaction, a sync on CUDA that is not a Python-level read."""
    trainer = Trainer(
        worker.student(),
        worker.bundle(),
        worker.plan("ddp", loss_strategy, max_steps=3),
        ctx=RunContext(),
        on_metrics=None,
        teacher=worker.teacher(),
        vocab_size=worker.VOCAB,
    )
    assert trainer._blocks.pad_free
    trainer._train_step()  # the first step may initialise lazily
    with _counting_reads() as seen:
        for _ in range(2):
            assert trainer._train_step() is not None
    device_reads = {
        k: n
        for k, n in seen.items()
        if k.split(":")[1] not in _HOST_SIDE and not k.startswith(("adamw.py", "optimizer.py"))
    }
    assert device_reads == {"_trainer.py:_step_values:tolist": 2}, dict(seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_host_syncs_per_step_on_cuda() -> None:
    """On a GPU, torch's sync debug mode sees what the CPU count cannot: the step-end read
    plus one ``nonzero`` (the losses' row compaction) per micro-batch, nothing more."""
    device = torch.device("cuda")
    trainer = Trainer(
        worker.student().to(device),
        worker.bundle(),
        worker.plan("ddp", "fused", max_steps=3),
        ctx=RunContext(),
        on_metrics=None,
        teacher=worker.teacher().to(device),
        vocab_size=worker.VOCAB,
    )
    trainer._train_step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer._train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1 + trainer.plan.optim.grad_accum, syncs


def test_one_process_gets_its_model_back_and_the_wrappers_unwrap() -> None:
    """World(): no wrapper (the single-process path is today's); any wrapper unwraps to
    the HF model; fsdp2's bf16 policy follows distributed.mixed_precision, auto = the
    plan's autocast dtype."""
    model = worker.student()
    cfg = worker.plan("fsdp2", "logits").distributed
    assert wrap_student(model, World(), cfg, None) is model
    assert unwrap(StepModule(model)) is model and unwrap(model) is model
    auto, off, bf16 = (cfg.model_copy(update={"mixed_precision": m}) for m in MIXED)
    assert fsdp_mixed_precision(auto, torch.bfloat16) and not fsdp_mixed_precision(auto, None)
    assert not fsdp_mixed_precision(off, torch.bfloat16) and fsdp_mixed_precision(bf16, None)
    frozen = shard_teacher(worker.teacher().train(), World())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
