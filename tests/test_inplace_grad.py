"""The logits path's in-place gradient: same bits as the copy, and only where it is safe.

``distillation_loss`` / ``sparse_distillation_loss`` with ``inplace=True`` write their
gradient over the student logits. Each test below either compares the two paths on the
same inputs (values and every gradient bit-for-bit, ``torch.equal``), or checks one of the
rules of ``training._losses`` ("In-place gradients"): the logits are left untouched where
their storage may still be needed, are overwritten (and backward hands that very storage
on, so no second buffer exists) where not, and misuse fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from torch import Tensor

from foundry_kernel.config import LossConfig, load_config
from foundry_kernel.errors import ConfigError, LossInputError
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._losses import (
    IGNORE_INDEX,
    LossKind,
    LossOutput,
    LossSpec,
    SparseMass,
    distillation_loss,
    inplace_refusal,
    sparse_distillation_loss,
)

KINDS: tuple[LossKind, ...] = get_args(LossKind)
HIDDEN = 8


def _labels(g: torch.Generator, lead: tuple[int, ...], vocab: int) -> Tensor:
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.3] = IGNORE_INDEX  # masked positions
    labels.view(-1)[0] = 1
    return labels


class Case:
    """One set of inputs: the student logits come out of a linear head (a non-leaf that
    covers its storage, as a model's do), so the gradient reaches ``h`` and ``w``."""

    def __init__(
        self, seed: int, lead: tuple[int, ...], vocab: int, dtype: torch.dtype = torch.float32
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.h = torch.randn(*lead, HIDDEN, generator=g).to(dtype)
        self.w = (2.0 * torch.randn(vocab, HIDDEN, generator=g)).to(dtype)
        self.teacher = (2.0 * torch.randn(*lead, vocab, generator=g)).to(dtype)
        self.labels = _labels(g, lead, vocab)
        self.dtype = dtype

    def leaves(self) -> tuple[Tensor, Tensor]:
        return self.h.clone().requires_grad_(), self.w.clone().requires_grad_()


def _run(
    case: Case,
    loss: Callable[[Tensor, bool], LossOutput],
    inplace: bool,
    shape: Callable[[Tensor], Tensor] = lambda s: s,
) -> tuple[LossOutput, dict[str, Tensor], Tensor, Tensor]:
    """Loss and backward; returns the output, the gradients (of h, w and, captured by a
    hook, of the logits themselves), the logits tensor after backward and that hook's
    gradient tensor (not a copy: its storage tells whether a second buffer was made)."""
    h, w = case.leaves()
    student = shape(torch.nn.functional.linear(h, w))
    seen: dict[str, Tensor] = {}
    student.register_hook(lambda g: seen.setdefault("grad", g))
    out = loss(student, inplace)
    (2.0 * out.total).backward()  # an upstream scalar other than 1 is applied in place too
    assert h.grad is not None and w.grad is not None
    grads = {"h": h.grad, "w": w.grad, "logits": seen["grad"].clone()}
    return out, grads, student, seen["grad"]


def _assert_same(a: tuple[LossOutput, dict[str, Tensor]], b: tuple[LossOutput, dict[str, Tensor]]):
    for part in ("total", "kd", "ce"):
        assert torch.equal(getattr(a[0], part), getattr(b[0], part)), part
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def _check_pair(case: Case, loss: Callable[[Tensor, bool], LossOutput], **kw: Any) -> None:
    """Copy and in-place agree bit-for-bit, and in place really wrote over the logits."""
    copy, copy_grads, copy_logits, copy_g = _run(case, loss, False, **kw)
    inpl, inpl_grads, inpl_logits, inpl_g = _run(case, loss, True, **kw)
    assert copy.logits_grad == "copy" and inpl.logits_grad == "inplace"
    _assert_same((copy, copy_grads), (inpl, inpl_grads))
    # copy: the logits are still the logits, and the gradient had a buffer of its own
    h, w = case.leaves()
    with torch.no_grad():
        fresh = kw.get("shape", lambda s: s)(torch.nn.functional.linear(h, w))
    assert torch.equal(copy_logits.detach(), fresh)
    assert copy_g.untyped_storage().data_ptr() != copy_logits.untyped_storage().data_ptr()
    # in place: the logits now hold the (scaled) gradient; backward handed on that storage
    assert torch.equal(inpl_logits.detach(), inpl_grads["logits"])
    assert inpl_g.untyped_storage().data_ptr() == inpl_logits.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- same gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ce_weight", "temperature"), [(0.0, 1.0), (0.3, 2.5)])
@pytest.mark.parametrize("kind", KINDS)
def test_dense_inplace_equals_copy(
    kind: LossKind, ce_weight: float, temperature: float, dtype: torch.dtype
) -> None:
    """Every divergence, with and without CE, at tau 1 and 2.5, fp32 and bf16 logits,
    masked positions, a 3-D [B, T, V] input and chunks that do not divide the rows."""
    spec = LossSpec(
        kind=kind, ce_weight=ce_weight, temperature=temperature, scale_by_t2=True, chunk_tokens=5
    )
    case = Case(hash((kind, ce_weight, dtype)) % 1000, (3, 7), 29, dtype)
    _check_pair(
        case, lambda s, ip: distillation_loss(s, case.teacher, case.labels, spec, inplace=ip)
    )


@pytest.mark.parametrize(
    "spec",
    [
        LossSpec(kind="jsd", beta=0.0),
        LossSpec(kind="jsd", beta=1.0),
        LossSpec(kind="jsd", beta=0.3, jsd_normalized=True),
        LossSpec(kind="skew_forward_kl", skew_alpha=0.6),
        LossSpec(kind="skew_reverse_kl", skew_alpha=0.6, ce_weight=1.0),
    ],
)
def test_dense_variants_inplace_equal_copy(spec: LossSpec) -> None:
    case = Case(5, (40,), 31)
    _check_pair(
        case, lambda s, ip: distillation_loss(s, case.teacher, case.labels, spec, inplace=ip)
    )


def test_padded_vocab_and_global_count_inplace_equal_copy() -> None:
    """``vocab_size`` below the logits' width: the columns past it get gradient 0 in place
    too (they held logits); a global ``num_valid_tokens`` scales both alike."""
    case = Case(6, (2, 9), 23)
    case.labels = case.labels.clamp(max=19)
    spec = LossSpec(kind="reverse_kl", ce_weight=0.2, chunk_tokens=4)
    _check_pair(
        case,
        lambda s, ip: distillation_loss(
            s, case.teacher, case.labels, spec, vocab_size=20, num_valid_tokens=50, inplace=ip
        ),
    )


def test_whole_storage_view_is_written_in_place() -> None:
    """A view that covers its whole storage (``[B, T, V] -> [B*T, V]``) is no partial
    slice: it is written in place, with the gradients of the copy."""
    case = Case(7, (3, 5), 17)
    labels = case.labels.flatten()
    teacher = case.teacher.flatten(0, 1)
    spec = LossSpec(kind="tvd", ce_weight=0.5, chunk_tokens=4)
    _check_pair(
        case,
        lambda s, ip: distillation_loss(s, teacher, labels, spec, inplace=ip),
        shape=lambda s: s.flatten(0, 1),
    )


def _targets(case: Case, k: int) -> SparseTargets:
    return SparseTargets.from_logits(case.teacher.float(), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mass", get_args(SparseMass))
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_inplace_equals_copy(kind: LossKind, mass: SparseMass, dtype: torch.dtype) -> None:
    """The sparse top-k loss, with the tail bucket and renormalised, fp32 and bf16."""
    case = Case(hash((kind, mass, dtype)) % 1000, (2, 8), 33, dtype)
    targets = _targets(case, 6)
    spec = LossSpec(kind=kind, ce_weight=0.25, temperature=1.5, chunk_tokens=3)
    _check_pair(
        case,
        lambda s, ip: sparse_distillation_loss(
            s, targets, case.labels, spec, mass=mass, inplace=ip
        ),
    )


# --------------------------------------------------------------------------- refusals


def _values(x: Tensor) -> Tensor:
    return x.detach().clone()


def _dense(student: Tensor, case: Case, inplace: bool = True) -> LossOutput:
    """A forward-KL + CE loss over ``student`` against a teacher and labels of its shape."""
    spec = LossSpec(kind="forward_kl", ce_weight=0.3, chunk_tokens=4)
    g = torch.Generator().manual_seed(99)
    teacher = torch.randn(student.shape, generator=g)
    labels = _labels(g, tuple(student.shape[:-1]), student.shape[-1])
    return distillation_loss(student, teacher, labels, spec, inplace=inplace)


def _copy_grads(case: Case, make: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """Gradients of h and w by the copy path (the reference for a refused in-place call)."""
    h, w = case.leaves()
    _dense(make(h, w), case, inplace=False).total.backward()
    assert h.grad is not None and w.grad is not None
    return {"h": h.grad, "w": w.grad}


REFUSED: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "slice [:, :-1] (the causal shift)": (
        lambda h, w: torch.nn.functional.linear(h, w)[:, :-1],
        "whole storage",
    ),
    "vocabulary slice (strided)": (
        lambda h, w: torch.nn.functional.linear(h, w)[..., :20],
        "whole storage",
    ),
    "offset view": (lambda h, w: torch.nn.functional.linear(h, w)[1:], "whole storage"),
    "transposed": (
        lambda h, w: torch.nn.functional.linear(h, w).transpose(0, 1),
        "whole storage",
    ),
    "tanh as last op (saved its output)": (
        lambda h, w: torch.tanh(torch.nn.functional.linear(h, w)),
        "TanhBackward0 saved",
    ),
    "a view of a tensor exp saved": (
        lambda h, w: torch.exp(torch.nn.functional.linear(h, w)).flatten(0, 1).view(3, 6, -1),
        "ExpBackward0 saved",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_storage_someone_may_need_is_not_overwritten(name: str) -> None:
    make, why = REFUSED[name]
    case = Case(11, (3, 6), 24)
    h, w = case.leaves()
    student = make(h, w)
    base = student._base if student._base is not None else student
    before = _values(base)
    refusal = inplace_refusal(student)
    assert refusal is not None and why in refusal, refusal
    out = _dense(student, case)
    assert out.logits_grad == "copy"
    out.total.backward()
    assert torch.equal(base.detach(), before)  # not one element changed
    expect = _copy_grads(case, make)
    assert h.grad is not None and w.grad is not None
    assert torch.equal(h.grad, expect["h"]) and torch.equal(w.grad, expect["w"])


def test_leaf_logits_and_views_of_them_are_the_callers_data() -> None:
    case = Case(12, (3, 6), 24)
    for view in (lambda x: x, lambda x: x.view(18, 24)):
        leaf = case.teacher.clone().requires_grad_()
        before = _values(leaf)
        student = view(leaf)
        assert "leaf" in (inplace_refusal(student) or "")
        out = _dense(student, case)
        out.total.backward()
        assert out.logits_grad == "copy"
        assert torch.equal(leaf.detach(), before)
        assert leaf.grad is not None
        assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()


def test_retain_grad_means_the_caller_reads_it_after_backward() -> None:
    case = Case(13, (3, 6), 24)
    h, w = case.leaves()
    student = torch.nn.functional.linear(h, w)
    student.retain_grad()
    before = _values(student)
    out = _dense(student, case)
    out.total.backward()
    assert out.logits_grad == "copy"
    assert torch.equal(student.detach(), before)
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_a_custom_function_that_saved_its_output_is_respected() -> None:
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            y = x * 3.0
            ctx.save_for_backward(y)  # needs its output in backward, as some kernels do
            return y

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> Tensor:
            (y,) = ctx.saved_tensors
            return g * 3.0 + 0.0 * y

    case = Case(14, (3, 6), 24)
    h, w = case.leaves()
    student = Scale.apply(torch.nn.functional.linear(h, w))
    assert "ScaleBackward saved" in (inplace_refusal(student) or "")
    before = _values(student)
    out = _dense(student, case)
    out.total.backward()
    assert out.logits_grad == "copy" and torch.equal(student.detach(), before)


def test_tensor_subclass_is_copied() -> None:
    class Tagged(Tensor):
        pass

    case = Case(15, (3, 6), 24)
    h, w = case.leaves()
    student = torch.nn.functional.linear(h, w).as_subclass(Tagged)
    assert "subclass" in (inplace_refusal(student) or "")
    assert _dense(student, case).logits_grad == "copy"


def test_soft_capping_stays_in_place() -> None:
    """Gemma-2-style capping ``tanh(x / c) * c``: tanh saved *its* output, not the capped
    logits (a new tensor from the final multiply), so the loss may write over them."""
    case = Case(16, (3, 6), 24)

    def capped(s: Tensor) -> Tensor:
        return torch.tanh(s / 5.0) * 5.0

    spec = LossSpec(kind="jsd", ce_weight=0.4, chunk_tokens=4)
    _check_pair(
        case,
        lambda s, ip: distillation_loss(s, case.teacher, case.labels, spec, inplace=ip),
        shape=capped,
    )


def test_no_gradient_wanted_writes_nothing() -> None:
    case = Case(17, (3, 6), 24)
    h, w = case.leaves()
    with torch.no_grad():
        student = torch.nn.functional.linear(h, w)
    before = _values(student)
    assert _dense(student, case).logits_grad is None  # does not require grad
    with torch.no_grad():
        s2 = torch.nn.functional.linear(h, w)
        out = _dense(s2, case)
    assert out.logits_grad is None and torch.equal(student, before) and torch.equal(s2, before)
    h, w = case.leaves()
    s3 = torch.nn.functional.linear(h, w)
    with torch.no_grad():  # requires grad, but grad mode is off: no backward will come
        out = _dense(s3, case)
    assert out.logits_grad is None and torch.equal(s3.detach(), before)
    assert "no gradient" in (inplace_refusal(student) or "")


def test_inplace_must_be_a_bool() -> None:
    case = Case(18, (3, 6), 24)
    h, w = case.leaves()
    with pytest.raises(LossInputError, match="inplace must be True or False") as info:
        _dense(torch.nn.functional.linear(h, w), case, inplace="yes")  # type: ignore[arg-type]
    assert info.value.argument == "inplace"


# --------------------------------------------------------------------------- loud misuse


def test_another_node_that_saved_the_logits_fails_loudly() -> None:
    """A second term over the logits built *before* the in-place loss (its node saved
    them) cannot silently use the gradient as logits: autograd's version check fires."""
    case = Case(19, (3, 6), 24)
    h, w = case.leaves()
    student = torch.nn.functional.linear(h, w)
    aux = (student**2).mean()  # PowBackward saved the logits
    out = _dense(student, case)
    assert out.logits_grad == "inplace"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.total + aux).backward()


def test_writes_between_loss_and_backward_are_refused() -> None:
    case = Case(20, (3, 6), 24)
    h, w = case.leaves()
    student = torch.nn.functional.linear(h, w)
    out = _dense(student, case)
    with torch.no_grad():
        student.mul_(2.0)  # someone rescales "the logits": they are the gradient now
    with pytest.raises(RuntimeError, match="modified after the loss wrote its gradient"):
        out.total.backward()


def test_second_backward_is_refused_in_place_too() -> None:
    case = Case(21, (3, 6), 24)
    h, w = case.leaves()
    out = _dense(torch.nn.functional.linear(h, w), case)
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.total.backward()


# --------------------------------------------------------------------------- engine and config


def test_config_field_defaults_to_inplace_and_is_validated() -> None:
    assert LossConfig().logits_grad == "inplace"
    assert load_config(None, ["loss.logits_grad=copy"]).loss.logits_grad == "copy"
    with pytest.raises(ConfigError, match="logits_grad") as info:
        load_config(None, ["loss.logits_grad=overwrite"])
    assert "loss.logits_grad" in str(info.value) and "'inplace' or 'copy'" in str(info.value)


def test_logits_strategy_writes_in_place_with_the_copys_gradients(tiny_teacher_dir: Path) -> None:
    """The engine's caller on a real model (lm_head logits, masked labels, dense and top-k
    teacher): ``loss.logits_grad`` inplace and copy give the same loss and the same bits on
    every parameter's gradient; the loss output says which path ran."""
    from foundry_kernel._models import build_student, load_causal_lm
    from foundry_kernel.config import StudentConfig
    from foundry_kernel.teachers._interface import HFTeacher
    from foundry_kernel.training._strategy import LogitsLoss, LossSetup, MicroBatch

    cpu = torch.device("cpu")
    teacher = load_causal_lm(str(tiny_teacher_dir), device=cpu)
    vocab = len(teacher.tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    labels[0, :4] = IGNORE_INDEX
    batch = MicroBatch(None, ids, torch.ones_like(ids), labels, int((labels >= 0).sum()))
    for answer in (
        HFTeacher(teacher.model, vocab_size=vocab),
        HFTeacher(teacher.model, vocab_size=vocab, top_k=8),
    ):
        runs = {}
        for mode in ("copy", "inplace"):
            student = build_student(
                StudentConfig(hidden_size=16, num_layers=1, num_heads=2),
                teacher,
                device=cpu,
                seed=0,
            ).model
            setup = LossSetup(
                student, answer, LossSpec(ce_weight=0.4), vocab_size=vocab, logits_grad=mode
            )
            out = LogitsLoss()(setup, batch)
            out.total.backward()
            runs[mode] = (out, {k: p.grad for k, p in student.named_parameters()})
            assert out.logits_grad == mode
        (a, ga), (b, gb) = runs["copy"], runs["inplace"]
        assert torch.equal(a.total, b.total) and torch.equal(a.kd, b.kd)
        assert ga.keys() == gb.keys()
        for key, got in ga.items():
            other = gb[key]
            assert got is not None and other is not None and torch.equal(got, other), key


def test_trainer_hands_the_config_choice_to_the_strategy(tiny_teacher_dir: Path) -> None:
    from foundry_kernel._context import RunContext
    from foundry_kernel._models import build_student, load_causal_lm
    from foundry_kernel.config import DataConfig, LimitsConfig, OptimConfig, StudentConfig
    from foundry_kernel.data._blocks import build_data
    from foundry_kernel.teachers._interface import HFTeacher
    from foundry_kernel.training._trainer import Trainer, TrainPlan

    cpu = torch.device("cpu")
    teacher = load_causal_lm(str(tiny_teacher_dir), device=cpu)
    data = build_data(DataConfig(max_documents=10, seq_len=16), teacher.tokenizer, seed=0)
    student = build_student(
        StudentConfig(hidden_size=16, num_layers=1, num_heads=2), teacher, device=cpu, seed=0
    ).model
    for mode in ("copy", "inplace"):
        plan = TrainPlan(
            optim=OptimConfig(batch_size=2),
            limits=LimitsConfig(max_steps=1),
            loss=LossConfig(logits_grad=mode),
            loss_strategy="logits",
        )
        trainer = Trainer(
            student,
            data,
            plan,
            ctx=RunContext(),
            on_metrics=lambda step, values: None,
            teacher=HFTeacher(teacher.model, vocab_size=len(teacher.tokenizer)),
            vocab_size=len(teacher.tokenizer),
        )
        setup, on_policy = trainer._loss_setups()
        assert setup.logits_grad == on_policy.logits_grad == mode


def _keeper(store: list[Tensor]) -> Callable[[Tensor], None]:
    """A tensor hook that keeps a copy of the gradient it sees."""
    return lambda grad: store.append(grad.clone())


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU present: the in-place path's device memory is not measured",
)
def test_inplace_on_cuda_needs_no_gradient_buffer() -> None:
    """On the GPU (caching allocator, async kernels): same gradients as the copy, and the
    peak allocated during loss + backward is lower by about one [tokens, vocab] buffer."""
    dev = torch.device("cuda")
    n, vocab = 512, 32768
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, HIDDEN, generator=g).to(dev)
    w0 = torch.randn(vocab, HIDDEN, generator=g).to(dev)
    teacher = torch.randn(n, vocab, generator=g).to(dev)
    labels = _labels(g, (n,), vocab).to(dev)
    spec = LossSpec(kind="jsd", ce_weight=0.2, chunk_tokens=64)
    peaks: dict[bool, int] = {}
    grads: dict[bool, tuple[Tensor, Tensor]] = {}
    for inplace in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        student = torch.nn.functional.linear(h, w)
        seen: list[Tensor] = []
        student.register_hook(_keeper(seen))
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = distillation_loss(student, teacher, labels, spec, inplace=inplace)
        del student  # as in a training step: only the graph holds the logits now
        out.total.backward()
        torch.cuda.synchronize(dev)
        peaks[inplace] = torch.cuda.max_memory_allocated(dev) - base
        assert out.logits_grad == ("inplace" if inplace else "copy")
        assert h.grad is not None
        grads[inplace] = (seen[0], h.grad)
    assert torch.equal(grads[False][0], grads[True][0])  # d loss / d logits: the same bits
    torch.testing.assert_close(grads[False][1], grads[True][1])  # through cuBLAS
    # the hook's clone costs both paths one buffer alike; the copy path has one more
    assert peaks[False] - peaks[True] >= 0.9 * n * vocab * 4, peaks
