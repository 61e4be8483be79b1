"""One rank of the distributed-evaluation test (tests/test_distributed_eval.py).

Run under torchrun (``python -m torch.distributed.run --nproc-per-node 2 ... eval_worker.py
TEACHER_DIR OUT_DIR``): every rank evaluates the same scenarios with its ``World`` (a
replicated student and teacher, then an FSDP2-sharded student and teacher), counts the
host reads each evaluation makes, and writes ``OUT_DIR/rank{R}.json``. Rank 0 also writes
the single-process figures of the same scenarios (``World()``, unsharded models), which the
test compares with.

The test module imports this file by path for :class:`HostReads`, :func:`setup` and
:func:`scenarios`, so the one-process and the two-process figures come from one code path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from foundry_kernel._models import LoadedModel, build_student, load_causal_lm
from foundry_kernel._world import World, close_world, init_world
from foundry_kernel.config import DataConfig, StudentConfig
from foundry_kernel.data._blocks import TokenBlocks, build_data
from foundry_kernel.teachers._interface import HFTeacher, Teacher
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._evaluate import evaluate_lm, evaluate_teacher, shift_labels

CPU = torch.device("cpu")

# Tensor methods and functions whose result needs the tensor's value on the host: on a
# GPU each is a device -> host copy that waits for the device (a sync).
_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.equal,
}


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor value made inside it, with the innermost
    non-torch function that made it.

    How syncs become countable on CPU: a CPU tensor never waits for a device, so nothing
    can be *timed*; but a sync only ever happens when Python asks for a tensor's value
    (``.item()``, ``.tolist()``, ``bool(t)``, boolean indexing's ``nonzero`` ...), and
    every such request passes through ``__torch_function__``, which a
    ``TorchFunctionMode`` sees - in Foundry's code and inside transformers' forward alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        boolean_index = (
            func is torch.Tensor.__getitem__
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and args[1].dtype == torch.bool
        )
        if func in _HOST_READS or boolean_index:
            self.reads.append((getattr(func, "__name__", str(func)), _caller()))
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame outside torch and this file: who asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("eval_worker.py"):
            return f"{Path(frame.filename).stem}.{frame.name}"
    return "?"


class TopKTeacher(Teacher):
    """A real teacher answered sparsely, as a vLLM server or the logit cache answers: its
    top-k log-probabilities and the true token's log-probability."""

    kind = "topk"

    def __init__(self, inner: HFTeacher, k: int) -> None:
        self.inner, self.k = inner, k

    def signal(self, index: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits = self.inner.logits(input_ids, attention_mask)
        return SparseTargets.from_logits(logits, self.k, labels=shift_labels(input_ids))

    def generate(self, prompts: Any, **kwargs: Any) -> list[list[int]]:
        raise NotImplementedError("evaluation never generates")


@dataclasses.dataclass
class Setup:
    teacher: LoadedModel
    vocab: int
    val: TokenBlocks

    def student(self) -> Any:
        """The same student on every call and every rank (seeded)."""
        cfg = StudentConfig(hidden_size=16, num_layers=1, num_heads=2)
        return build_student(cfg, self.teacher, device=CPU, seed=0).model


def setup(teacher_dir: str) -> Setup:
    """The tiny teacher and held-out blocks with uneven valid tokens: every third block
    ends in 7 padding tokens (attention 0, label -100), every second has an unscored
    5-token prompt (label -100)."""
    teacher = load_causal_lm(teacher_dir, device=CPU)
    data = build_data(DataConfig(max_documents=40, seq_len=32), teacher.tokenizer, seed=0)
    ids, mask, labels = (t.clone() for t in dataclasses.astuple(data.val))
    n = ids.shape[0]
    padded = torch.arange(n) % 3 == 0
    mask[padded, -7:] = 0
    labels[padded, -7:] = -100
    ids[padded, -7:] = teacher.tokenizer.pad_token_id or 0
    labels[torch.arange(n) % 2 == 1, :5] = -100
    val = TokenBlocks(input_ids=ids, attention_mask=mask, labels=labels)
    return Setup(teacher=teacher, vocab=len(teacher.tokenizer), val=val)


def head(blocks: TokenBlocks, n: int) -> TokenBlocks:
    return TokenBlocks(*(t[:n] for t in dataclasses.astuple(blocks)))


Scenario = Callable[[World], dict[str, float]]


def _counted(results: dict[str, Any], name: str, fn: Callable[[], dict[str, float]]) -> None:
    with HostReads() as reads:
        results[name] = fn()
    results[f"{name}/host_reads"] = reads.reads


def scenarios(s: Setup, student: Any, teacher_model: Any, world: World) -> dict[str, Any]:
    """Every figure the test compares, for ``world`` (``World()``: one process).

    ``student``/``teacher_model`` are plain or FSDP2-wrapped; blocks are chosen so that the
    ranks get uneven shares: 13 blocks at batch 4 on 2 ranks are shares of 7 and 6 blocks in
    micro-batches of 2, so rank 1 runs 3 real micro-batches and one dummy.
    """
    dense = HFTeacher(teacher_model, vocab_size=s.vocab)
    sparse = TopKTeacher(HFTeacher(teacher_model, vocab_size=s.vocab), k=16)
    out: dict[str, Any] = {}
    common = {"vocab_size": s.vocab, "world": world}
    thirteen = head(s.val, 13)
    _counted(
        out,
        "dense",
        lambda: evaluate_lm(student, thirteen, batch_size=4, teacher=dense, **common),
    )
    _counted(
        out,
        "sparse",
        lambda: evaluate_lm(student, thirteen, batch_size=4, teacher=sparse, **common),
    )
    # max_batches is global: the first 3 batches of 4 blocks, on any number of ranks
    out["max_batches"] = evaluate_lm(
        student, s.val, batch_size=4, max_batches=3, teacher=dense, **common
    )
    # 9 blocks at batch 2: 5 global batches (odd); micro-batches of 1, shares 5 and 4
    nine = head(s.val, 9)
    out["odd"] = evaluate_lm(student, nine, batch_size=2, teacher=dense, chunk_tokens=16, **common)
    out["teacher_dense"] = evaluate_teacher(dense, thirteen, batch_size=4, world=world)
    out["teacher_sparse"] = evaluate_teacher(sparse, thirteen, batch_size=4, world=world)
    return out


def _fsdp2(model: Any, world: World) -> Any:
    """Shard ``model`` with FSDP2 over the CPU ranks: one unit per decoder layer, then the
    root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(argv: list[str]) -> int:
    teacher_dir, out_dir = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    world = init_world(backend="gloo", device_type="cpu", timeout_s=60)
    try:
        s = setup(teacher_dir)
        result: dict[str, Any] = {"world_size": world.world_size}
        result["replicated"] = scenarios(s, s.student(), s.teacher.model, world)
        sharded_teacher = _fsdp2(load_causal_lm(teacher_dir, device=CPU).model, world)
        sharded_teacher.requires_grad_(False)
        result["fsdp2"] = scenarios(s, _fsdp2(s.student(), world), sharded_teacher, world)
        if world.is_main:
            result["one_process"] = scenarios(s, s.student(), s.teacher.model, World())
        world.barrier()
        (out_dir / f"rank{world.rank}.json").write_text(json.dumps(result))
    finally:
        close_world(world)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
