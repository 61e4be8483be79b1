"""Tests for foundry_kernel.training._losses.sparse_distillation_loss (top-k teacher targets).

Expected values come from the dense :func:`distillation_loss` (k = V, where both must
agree) or from the sparse formulas written out here on probabilities in fp64, without
log-space tricks or chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import get_args

import pytest
import torch
from test_losses import ref_divergence_probs
from torch import Tensor

from foundry_kernel.errors import ConfigError
from foundry_kernel.teachers._targets import TAIL_FLOOR, SparseTargets
from foundry_kernel.training._losses import (
    IGNORE_INDEX,
    LossKind,
    LossOutput,
    LossSpec,
    SparseMass,
    distillation_loss,
    sparse_distillation_loss,
)

KINDS: tuple[LossKind, ...] = get_args(LossKind)
MASSES: tuple[SparseMass, ...] = get_args(SparseMass)
F64 = torch.float64
VOCAB = 13


# --------------------------------------------------------------------------- independent reference


def ref_atoms(
    s: Tensor, targets: SparseTargets, tau: float, mass: SparseMass
) -> tuple[Tensor, Tensor]:
    """(teacher, student) probability vectors on the k (+1) atoms, as the docstring defines."""
    q = torch.softmax(s.double() / tau, dim=-1)
    q_k = q.gather(-1, targets.ids)
    p_k = targets.logprobs.double().exp()
    if mass == "renormalize":
        p = p_k ** (1 / tau)
        return p / p.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)
    p_tail = targets.tail_logmass().double().exp()
    q_tail = (1 - q_k.sum(-1)).clamp(min=math.exp(TAIL_FLOOR))
    p = torch.cat([p_k, p_tail.unsqueeze(-1)], dim=-1) ** (1 / tau)
    return p / p.sum(-1, keepdim=True), torch.cat([q_k, q_tail.unsqueeze(-1)], dim=-1)


def ref_sparse_loss(
    s: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    spec: LossSpec,
    mass: SparseMass,
    num_valid: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kd, ce) with the documented reduction, in fp64."""
    mask = (labels != IGNORE_INDEX).double()
    denom = num_valid if num_valid is not None else max(int(mask.sum()), 1)
    p, q = ref_atoms(s, targets, spec.temperature, mass)
    kd_tok = ref_divergence_probs(p, q, spec) * (spec.temperature**2 if spec.scale_by_t2 else 1)
    sd = s.double()
    ce_tok = sd.exp().sum(-1).log() - sd.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kd = (kd_tok * mask).sum() / denom
    ce = (ce_tok * mask).sum() / denom
    return (1 - spec.ce_weight) * kd + spec.ce_weight * ce, kd, ce


# --------------------------------------------------------------------------- fixtures


def make_case(
    seed: int, k: int, shape: tuple[int, int] = (3, 6), vocab: int = VOCAB
) -> tuple[Tensor, SparseTargets, Tensor, Tensor]:
    """Student logits (fp64 leaf), sparse targets, labels (~30% ignored), dense teacher."""
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(*shape, vocab, generator=g, dtype=F64)).requires_grad_()
    t = 2.0 * torch.randn(*shape, vocab, generator=g, dtype=F64)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = IGNORE_INDEX
    labels.view(-1)[0] = 1
    return s, SparseTargets.from_logits(t, k, labels), labels, t


def dense_from_targets(targets: SparseTargets, vocab: int) -> Tensor:
    """Dense teacher logits that *are* the targets' log-probabilities (k = V)."""
    out = torch.full((*targets.ids.shape[:-1], vocab), -math.inf, dtype=F64)
    return out.scatter(-1, targets.ids, targets.logprobs.double())


def leaf_copy(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_()


def grad(x: Tensor) -> Tensor:
    assert x.grad is not None
    return x.grad


def assert_close(a: Tensor, b: Tensor, *, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def value_and_grad(
    s: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kd, d total / d s) of ``fn(leaf)`` on a fresh leaf copy of ``s``."""
    leaf = leaf_copy(s)
    total, kd = fn(leaf)
    total.backward()
    return total.detach(), kd.detach(), grad(leaf)


def pair(out: LossOutput) -> tuple[Tensor, Tensor]:
    return out.total, out.kd


# --------------------------------------------------------------------------- (a) k = V vs dense


def test_teacher_tail_is_the_missing_mass() -> None:
    """The loss takes the teacher tail from SparseTargets.tail_logmass(): pin its contract
    (finite, = log(1 - sum p_topk), floored) so a regression there names itself here
    instead of surfacing as NaN losses below."""
    _, targets, _, _ = make_case(1, k=4)
    expected = torch.log1p(-targets.logprobs.double().exp().sum(-1))
    assert_close(targets.tail_logmass(), expected, tol=1e-5)
    _, full, _, _ = make_case(1, k=VOCAB)
    tail = full.tail_logmass()
    assert torch.isfinite(tail).all() and (tail >= TAIL_FLOOR).all() and (tail < -14).all()


def _check_against_dense(spec: LossSpec, mass: SparseMass, seed: int) -> None:
    s, targets, labels, _ = make_case(seed, k=VOCAB)
    dense_t = dense_from_targets(targets, VOCAB)
    d_total, d_kd, d_grad = value_and_grad(
        s, lambda x: pair(distillation_loss(x, dense_t, labels, spec))
    )
    s_total, s_kd, s_grad = value_and_grad(
        s, lambda x: pair(sparse_distillation_loss(x, targets, labels, spec, mass=mass))
    )
    if mass == "renormalize":
        # Exact at every tau: the k = V atoms are the whole vocabulary.
        assert_close(s_total, d_total)
        assert_close(s_grad, d_grad)
    elif spec.temperature == 1.0:
        # Exact up to the teacher's own fp32 rounding: sum(exp(logprobs)) misses 1 by
        # ~1e-7, which tail_logmass() reports as a real tail (log ~ -16).
        assert_close(s_total, d_total, tol=1e-6)
        assert_close(s_grad, d_grad, tol=1e-6)
    else:
        # tau = 2 raises that ~1e-7 tail atom to the power 1/2 (~3e-4 of the mass): not
        # the dense loss (the documented approximation); measured <= 7e-4 relative on kd.
        assert (s_kd - d_kd).abs() <= 1e-2 * d_kd.abs()
        assert_close(s_grad, d_grad, tol=1e-4)
    # And in every case it is exactly the documented sparse formula.
    r_total, _, r_grad = value_and_grad(
        s, lambda x: ref_sparse_loss(x, targets, labels, spec, mass)[:2]
    )
    assert_close(s_total, r_total)
    assert_close(s_grad, r_grad)


@pytest.mark.parametrize("mass", MASSES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_k_equals_vocab_matches_dense(
    kind: LossKind, temperature: float, ce_weight: float, mass: SparseMass
) -> None:
    spec = LossSpec(
        kind=kind,
        beta=0.3,
        skew_alpha=0.2,
        temperature=temperature,
        scale_by_t2=True,
        ce_weight=ce_weight,
        chunk_tokens=4,
    )
    _check_against_dense(spec, mass, seed=100 * KINDS.index(kind) + int(temperature))


@pytest.mark.parametrize("mass", MASSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_k_equals_vocab_jsd_betas(
    beta: float, normalized: bool, temperature: float, mass: SparseMass
) -> None:
    spec = LossSpec(kind="jsd", beta=beta, jsd_normalized=normalized, temperature=temperature)
    _check_against_dense(spec, mass, seed=int(beta * 10) + 7 * normalized)


def test_tail_mode_is_not_dense_at_tau_2() -> None:
    """The tau != 1 tail approximation is real: pin that it shows (so docs stay honest)."""
    spec = LossSpec(kind="forward_kl", temperature=2.0)
    s, targets, labels, _ = make_case(0, k=VOCAB)
    dense = distillation_loss(s, dense_from_targets(targets, VOCAB), labels, spec)
    sparse = sparse_distillation_loss(s, targets, labels, spec, mass="tail")
    assert (targets.tail_logmass() > TAIL_FLOOR).any()
    assert (sparse.kd - dense.kd).abs() > 1e-8


# --------------------------------------------------------------------------- (b) k < V formula


@pytest.mark.parametrize("mass", MASSES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("scale_by_t2", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_independent_formula(
    kind: LossKind, temperature: float, scale_by_t2: bool, ce_weight: float, mass: SparseMass
) -> None:
    spec = LossSpec(
        kind=kind,
        beta=0.4,
        jsd_normalized=True,
        skew_alpha=0.3,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        ce_weight=ce_weight,
        chunk_tokens=5,
    )
    seed = 1000 * KINDS.index(kind) + int(10 * temperature) + 2 * scale_by_t2
    s, targets, labels, _ = make_case(seed, k=4)
    out = sparse_distillation_loss(s, targets, labels, spec, mass=mass)
    out.total.backward()
    s_ref = leaf_copy(s)
    total, kd, ce = ref_sparse_loss(s_ref, targets, labels, spec, mass)
    total.backward()
    assert_close(out.total, total)
    assert_close(out.kd, kd)
    assert_close(out.ce, ce)
    assert_close(grad(s), grad(s_ref))
    assert out.n_tokens == int((labels != IGNORE_INDEX).sum())
    assert not out.kd.requires_grad and not out.ce.requires_grad
    assert grad(s)[labels == IGNORE_INDEX].abs().max() == 0


def test_renormalize_gives_no_gradient_outside_the_ids() -> None:
    """Renormalised KD only sees the k ids; the tail bucket is what reaches the rest."""
    spec = LossSpec(kind="forward_kl")
    s, targets, labels, _ = make_case(5, k=3)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, targets.ids, False)
    cases: tuple[tuple[SparseMass, bool], ...] = (("renormalize", True), ("tail", False))
    for mass, expect_zero in cases:
        leaf = leaf_copy(s)
        sparse_distillation_loss(leaf, targets, labels, spec, mass=mass).total.backward()
        assert bool(grad(leaf)[outside].abs().max() == 0) is expect_zero


def test_masked_student_vocabulary_stays_finite() -> None:
    """-inf student logits (masked tokens) must not turn value or gradient into NaN."""
    s, targets, labels, _ = make_case(6, k=4)
    with torch.no_grad():
        outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, targets.ids, False)
        outside.scatter_(-1, labels.clamp_min(0).unsqueeze(-1), False)  # keep CE finite
        s.masked_fill_(outside & (torch.rand(s.shape) < 0.5), -math.inf)
    for kind in KINDS:
        for mass in MASSES:
            leaf = leaf_copy(s)
            out = sparse_distillation_loss(leaf, targets, labels, LossSpec(kind=kind), mass=mass)
            out.total.backward()
            assert torch.isfinite(out.total)
            assert torch.isfinite(grad(leaf)).all()


def test_student_covering_everything_hits_the_floor_not_nan() -> None:
    """A student whose top-k mass rounds to 1 has tail log-mass TAIL_FLOOR, finite grads."""
    s, targets, labels, _ = make_case(8, k=4)
    with torch.no_grad():
        s.fill_(-200.0).scatter_(-1, targets.ids, 0.0)
    for kind in KINDS:
        leaf = leaf_copy(s)
        out = sparse_distillation_loss(leaf, targets, labels, LossSpec(kind=kind), mass="tail")
        out.total.backward()
        assert torch.isfinite(out.total) and torch.isfinite(grad(leaf)).all()


# --------------------------------------------------------------------------- (c) KL sanity


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("seed", range(5))
def test_tail_forward_kl_is_non_negative(seed: int, k: int) -> None:
    spec = LossSpec(kind="forward_kl", temperature=[1.0, 1.7][seed % 2])
    s, targets, labels, _ = make_case(seed, k=k, shape=(4, 5))
    out = sparse_distillation_loss(s, targets, labels, spec, mass="tail")
    assert out.kd >= 0.0


@pytest.mark.parametrize(("k", "tol"), [(1, 1e-12), (4, 1e-12), (VOCAB, 1e-6)])
def test_tail_forward_kl_is_zero_for_the_teacher_itself(k: int, tol: float) -> None:
    """Zero up to the targets' fp32 rounding. At k = V that rounding is a spurious teacher
    tail of ~1e-7 (see test_k_equals_vocab_matches_dense) against the student's e^-30."""
    _, targets, labels, teacher = make_case(9, k=k)
    out = sparse_distillation_loss(teacher, targets, labels, LossSpec(kind="forward_kl"))
    assert 0.0 <= float(out.kd) < tol


# --------------------------------------------------------------------------- (d), (e) reductions


@pytest.mark.parametrize("mass", MASSES)
def test_gradient_accumulation_normaliser(mass: SparseMass) -> None:
    spec = LossSpec(kind="jsd", beta=0.3, ce_weight=0.4, temperature=1.5, scale_by_t2=True)
    s, targets, labels, _ = make_case(10, k=5, shape=(4, 6))
    n_valid = int((labels != IGNORE_INDEX).sum())
    full = sparse_distillation_loss(s, targets, labels, spec, mass=mass)
    full.total.backward()
    s_acc = leaf_copy(s)
    parts = []
    for half in (slice(0, 2), slice(2, 4)):
        part_targets = SparseTargets(targets.ids[half], targets.logprobs[half])
        out = sparse_distillation_loss(
            s_acc[half], part_targets, labels[half], spec, mass=mass, num_valid_tokens=n_valid
        )
        out.total.backward()
        parts.append(out)
    assert_close(parts[0].total.detach() + parts[1].total.detach(), full.total.detach())
    assert_close(parts[0].kd + parts[1].kd, full.kd)
    assert_close(parts[0].ce + parts[1].ce, full.ce)
    assert_close(grad(s_acc), grad(s))


@pytest.mark.parametrize("mass", MASSES)
@pytest.mark.parametrize("kind", KINDS)
def test_chunking_does_not_change_results(kind: LossKind, mass: SparseMass) -> None:
    s, targets, labels, _ = make_case(11, k=6, shape=(4, 7))
    results = []
    for chunk in (1, 10**6):
        spec = LossSpec(kind=kind, ce_weight=0.2, temperature=1.3, chunk_tokens=chunk)
        results.append(
            value_and_grad(
                s, partial(_sparse, targets=targets, labels=labels, spec=spec, mass=mass)
            )
        )
    (t1, kd1, g1), (t2, kd2, g2) = results
    assert_close(t1, t2, tol=1e-12)
    assert_close(kd1, kd2, tol=1e-12)
    assert_close(g1, g2, tol=1e-12)


def _sparse(
    x: Tensor, *, targets: SparseTargets, labels: Tensor, spec: LossSpec, mass: SparseMass
) -> tuple[Tensor, Tensor]:
    return pair(sparse_distillation_loss(x, targets, labels, spec, mass=mass))


def test_upstream_gradient_and_no_grad_student() -> None:
    spec = LossSpec(kind="reverse_kl", ce_weight=0.3)
    s, targets, labels, _ = make_case(12, k=4)
    (sparse_distillation_loss(s, targets, labels, spec).total * 2.5).backward()
    s_ref = leaf_copy(s)
    (ref_sparse_loss(s_ref, targets, labels, spec, "tail")[0] * 2.5).backward()
    assert_close(grad(s), grad(s_ref))
    detached = sparse_distillation_loss(s.detach(), targets, labels, spec)
    assert not detached.total.requires_grad
    assert_close(detached.total, ref_sparse_loss(s, targets, labels, spec, "tail")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_student_gets_gradient_in_its_dtype(dtype: torch.dtype) -> None:
    s, targets, labels, _ = make_case(13, k=4)
    low = s.detach().to(dtype).requires_grad_()
    out = sparse_distillation_loss(low, targets, labels, LossSpec(kind="forward_kl"))
    out.total.backward()
    assert grad(low).dtype == dtype
    ref = ref_sparse_loss(low.detach().double(), targets, labels, LossSpec(), "tail")[0]
    assert_close(out.total, ref, tol=1e-5)


def test_vocab_size_slices_padded_student_columns() -> None:
    """Padded student columns past vocab_size are ignored and get no gradient."""
    s, targets, labels, _ = make_case(14, k=4)
    padded = torch.cat([s.detach(), torch.full((*s.shape[:-1], 3), 5.0, dtype=F64)], dim=-1)
    padded.requires_grad_()
    out = sparse_distillation_loss(padded, targets, labels, LossSpec(), vocab_size=VOCAB)
    out.total.backward()
    assert_close(out.total, ref_sparse_loss(s, targets, labels, LossSpec(), "tail")[0])
    assert grad(padded)[..., VOCAB:].abs().max() == 0


# --------------------------------------------------------------------------- (f) errors


def test_positions_mismatch_is_refused() -> None:
    s, targets, labels, _ = make_case(15, k=4)
    short = SparseTargets(targets.ids[:, :-1], targets.logprobs[:, :-1])
    with pytest.raises(ValueError, match=r"sparse targets cover positions \(3, 5\).*\(3, 6\)"):
        sparse_distillation_loss(s, short, labels, LossSpec())


def test_ids_outside_vocabulary_are_refused() -> None:
    s, targets, labels, _ = make_case(16, k=4)
    in_range = labels.masked_fill(labels >= 10, IGNORE_INDEX)
    in_range.view(-1)[0] = 1
    assert (targets.ids[in_range != IGNORE_INDEX] >= 10).any()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\).*vocab_size"):
        sparse_distillation_loss(s, targets, in_range, LossSpec(), vocab_size=10)
    bad = targets.ids.clone()
    bad[0, 0, 0] = VOCAB
    with pytest.raises(ValueError, match=r"found ids in \[0, 13\]"):
        sparse_distillation_loss(s, SparseTargets(bad, targets.logprobs), labels, LossSpec())
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"found ids in \[-1,"):
        sparse_distillation_loss(s, SparseTargets(bad, targets.logprobs), labels, LossSpec())


def test_ids_at_ignored_positions_are_not_checked() -> None:
    """Padding rows may carry anything: the loss never reads them."""
    s, targets, labels, _ = make_case(17, k=4)
    labels[1] = IGNORE_INDEX
    bad = targets.ids.clone()
    bad[1] = 10**6
    sparse_distillation_loss(s, SparseTargets(bad, targets.logprobs), labels, LossSpec())


def test_repeated_ids_and_bad_mode_are_refused() -> None:
    s, targets, labels, _ = make_case(18, k=4)
    bad = targets.ids.clone()
    bad[0, 0, 1] = bad[0, 0, 0]
    with pytest.raises(ValueError, match="repeat within a position"):
        sparse_distillation_loss(s, SparseTargets(bad, targets.logprobs), labels, LossSpec())
    with pytest.raises(ConfigError, match="unknown sparse mass mode 'full'") as info:
        sparse_distillation_loss(s, targets, labels, LossSpec(), mass="full")  # type: ignore[arg-type]
    assert info.value.field == "loss.top_k_mass"


def test_labels_and_vocab_errors_match_the_dense_loss() -> None:
    s, targets, labels, _ = make_case(19, k=4)
    with pytest.raises(ValueError, match="labels shape"):
        sparse_distillation_loss(s, targets, labels[:, :-1], LossSpec())
    with pytest.raises(ValueError, match="exceeds the logits' width"):
        sparse_distillation_loss(s, targets, labels, LossSpec(), vocab_size=VOCAB + 1)
