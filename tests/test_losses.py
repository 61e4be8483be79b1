"""Tests for foundry_kernel.training._losses.

Every expected value is computed here, by dense torch formulas written independently of
the module (probabilities, not log-space tricks; fp64), by TRL's own implementation, or
by a second path of the module whose agreement is the point of the test.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
import torch
from torch import Tensor

from foundry_kernel.errors import ConfigError, LossInputError
from foundry_kernel.teachers._targets import SparseTargets
from foundry_kernel.training._losses import (
    IGNORE_INDEX,
    LossKind,
    LossSpec,
    SparseMass,
    distillation_loss,
    fused_linear_cross_entropy,
    fused_linear_distillation_loss,
    fused_linear_sparse_distillation_loss,
    sparse_distillation_loss,
    token_divergence,
)

KINDS: tuple[LossKind, ...] = get_args(LossKind)
F64 = torch.float64


# --------------------------------------------------------------------------- independent reference


def ref_divergence(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    """Per-token divergence from the textbook definitions, on probabilities (no -inf inputs)."""
    q = torch.softmax(s.double() / spec.temperature, dim=-1)
    p = torch.softmax(t.double() / spec.temperature, dim=-1)
    return ref_divergence_probs(p, q, spec)


def ref_divergence_probs(p: Tensor, q: Tensor, spec: LossSpec) -> Tensor:
    """Per-row divergence of probability vectors (teacher p, student q), by definition."""

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    kind, beta, alpha = spec.kind, spec.beta, spec.skew_alpha
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        value = beta * kl(p, m) + (1 - beta) * kl(q, m)
        return value / (beta * (1 - beta)) if spec.jsd_normalized else value
    if kind == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return kl(q, (1 - alpha) * p + alpha * q)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def ref_loss(
    s: Tensor, t: Tensor, labels: Tensor, spec: LossSpec, num_valid: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kd, ce) with the documented reduction, in fp64."""
    mask = (labels != IGNORE_INDEX).double()
    denom = num_valid if num_valid is not None else max(int(mask.sum()), 1)
    kd_tok = ref_divergence(s, t, spec) * (spec.temperature**2 if spec.scale_by_t2 else 1.0)
    sd = s.double()
    log_z = sd.exp().sum(-1).log()
    picked = sd.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce_tok = log_z - picked
    kd = (kd_tok * mask).sum() / denom
    ce = (ce_tok * mask).sum() / denom
    return (1 - spec.ce_weight) * kd + spec.ce_weight * ce, kd, ce


def make_batch(
    seed: int, shape: tuple[int, ...] = (3, 6), vocab: int = 13, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor, Tensor]:
    """Random student (leaf), teacher logits and labels with ~30% IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(*shape, vocab, generator=g, dtype=F64)).to(dtype).requires_grad_()
    t = (2.0 * torch.randn(*shape, vocab, generator=g, dtype=F64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = IGNORE_INDEX
    labels.view(-1)[0] = 1  # at least one valid token
    return s, t, labels


def grad(x: Tensor) -> Tensor:
    """``x.grad``, asserting that backward reached it."""
    assert x.grad is not None
    return x.grad


def leaf_copy(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_()


def assert_close(a: Tensor, b: Tensor, *, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- per-kind correctness


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("scale_by_t2", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_matches_reference(
    kind: LossKind, temperature: float, scale_by_t2: bool, ce_weight: float
) -> None:
    spec = LossSpec(
        kind=kind,
        beta=0.3,
        skew_alpha=0.2,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        ce_weight=ce_weight,
        chunk_tokens=4,
    )
    seed = 1000 * KINDS.index(kind) + int(10 * temperature) + 2 * scale_by_t2 + int(10 * ce_weight)
    s, t, labels = make_batch(seed)
    out = distillation_loss(s, t, labels, spec)
    out.total.backward()

    s_ref = leaf_copy(s)
    total, kd, ce = ref_loss(s_ref, t, labels, spec)
    total.backward()

    assert_close(out.total, total)
    assert_close(out.kd, kd)
    assert_close(out.ce, ce)
    assert_close(grad(s), grad(s_ref))
    assert out.n_tokens == int((labels != IGNORE_INDEX).sum())
    assert not out.kd.requires_grad
    assert not out.ce.requires_grad
    assert grad(s)[labels == IGNORE_INDEX].abs().max() == 0


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("normalized", [False, True])
def test_jsd_betas_match_reference(beta: float, normalized: bool) -> None:
    spec = LossSpec(kind="jsd", beta=beta, jsd_normalized=normalized, temperature=1.3)
    s, t, labels = make_batch(int(beta * 100) + normalized)
    out = distillation_loss(s, t, labels, spec)
    out.total.backward()
    s_ref = leaf_copy(s)
    ref_loss(s_ref, t, labels, spec)[0].backward()
    assert_close(out.total, ref_loss(s, t, labels, spec)[0])
    assert_close(grad(s), grad(s_ref))


@pytest.mark.parametrize("kind", KINDS)
def test_token_divergence_plain_path(kind: LossKind) -> None:
    spec = LossSpec(kind=kind, beta=0.7, temperature=1.5)
    s, t, _ = make_batch(11, shape=(9,))
    value = token_divergence(s, t, spec)
    assert value.shape == (9,)
    assert_close(value, ref_divergence(s, t, spec))
    value.sum().backward()
    s_ref = leaf_copy(s)
    ref_divergence(s_ref, t, spec).sum().backward()
    assert_close(grad(s), grad(s_ref))


def test_upstream_gradient_is_applied() -> None:
    spec = LossSpec(kind="reverse_kl", ce_weight=0.3, chunk_tokens=5)
    s, t, labels = make_batch(3)
    (distillation_loss(s, t, labels, spec).total * 2.5).backward()
    s_ref = leaf_copy(s)
    (ref_loss(s_ref, t, labels, spec)[0] * 2.5).backward()
    assert_close(grad(s), grad(s_ref))


def test_no_grad_student_gives_same_value() -> None:
    spec = LossSpec(kind="skew_reverse_kl", ce_weight=0.3, temperature=2.0)
    s, t, labels = make_batch(4)
    out = distillation_loss(s.detach(), t, labels, spec)
    assert not out.total.requires_grad
    assert_close(out.total, ref_loss(s, t, labels, spec)[0])


# --------------------------------------------------------------------------- anchors


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd(beta: float, temperature: float) -> None:
    # TRL 1.16 convention (trl/experimental/gkd/gkd_trainer.py): generalized_jsd_loss does
    # NOT shift - compute_loss passes logits[:, :-1] with labels[:, 1:], so labels are
    # aligned with logit positions on entry, as ours are. Both logits are divided by the
    # temperature, no tau**2. "batchmean" with labels = sum over valid tokens and vocab /
    # max(#valid, 1); num_items_in_batch, when given, replaces that divisor.
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10))
    full_s = torch.randn(2, 8, 11, generator=g, dtype=F64)
    full_t = torch.randn(2, 8, 11, generator=g, dtype=F64)
    input_ids = torch.randint(0, 11, (2, 8), generator=g)
    raw_labels = input_ids.clone()
    raw_labels[0, :3] = IGNORE_INDEX  # prompt
    raw_labels[1, :2] = IGNORE_INDEX
    raw_labels[1, 6:] = IGNORE_INDEX  # padding
    # The same causal shift GKDTrainer.compute_loss applies before calling the loss.
    s = full_s[:, :-1].clone().requires_grad_()
    t, labels = full_t[:, :-1], raw_labels[:, 1:]

    spec = LossSpec(kind="jsd", beta=beta, temperature=temperature)
    ours = distillation_loss(s, t, labels, spec)
    ours.total.backward()
    s_trl = leaf_copy(s)
    theirs = GKDTrainer.generalized_jsd_loss(
        s_trl, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean"
    )
    theirs.backward()
    assert_close(ours.total, theirs)
    assert_close(grad(s), grad(s_trl))

    global_count = 23
    ours_ga = distillation_loss(s, t, labels, spec, num_valid_tokens=global_count)
    theirs_ga = GKDTrainer.generalized_jsd_loss(
        s.detach(), t, labels=labels, beta=beta, temperature=temperature,
        num_items_in_batch=global_count,
    )  # fmt: skip
    assert_close(ours_ga.total, theirs_ga)


def test_forward_kl_equals_torchtune_minus_teacher_entropy() -> None:
    # torchtune ForwardKLLoss: -sum_tokens(mask * sum_v p log q) / sum(mask), i.e. the
    # soft cross-entropy; it exceeds KL(p||q) by the teacher entropy H(p).
    s, t, labels = make_batch(21)
    mask = (labels != IGNORE_INDEX).double()
    p = torch.softmax(t, -1)
    soft_ce = -((p * torch.log_softmax(s, -1)).sum(-1) * mask).sum() / mask.sum()
    entropy = -((p * torch.log_softmax(t, -1)).sum(-1) * mask).sum() / mask.sum()
    ours = distillation_loss(s, t, labels, LossSpec(kind="forward_kl"))
    assert_close(ours.total, soft_ce - entropy)
    ours.total.backward()
    s_tt = leaf_copy(s)
    (-((p * torch.log_softmax(s_tt, -1)).sum(-1) * mask).sum() / mask.sum()).backward()
    assert_close(grad(s), grad(s_tt))  # same gradient: H(p) does not depend on the student


def test_jsd_normalized_is_continuous_at_the_endpoints() -> None:
    s, t, labels = make_batch(5)
    s = s.detach()

    def value(**kw: Any) -> float:
        return float(distillation_loss(s, t, labels, LossSpec(**kw)).total)

    fkl, rkl = value(kind="forward_kl"), value(kind="reverse_kl")

    def gaps(eps: float) -> tuple[float, float]:
        near0 = value(kind="jsd", beta=eps, jsd_normalized=True)
        near1 = value(kind="jsd", beta=1 - eps, jsd_normalized=True)
        return abs(near0 / fkl - 1), abs(near1 / rkl - 1)

    # The normalized interior converges to the endpoint KLs, linearly in beta (1 - beta).
    gap0, gap1 = gaps(1e-4)
    assert gap0 < 1e-2
    assert gap1 < 1e-2
    finer0, finer1 = gaps(1e-6)
    assert finer0 < gap0 / 50
    assert finer1 < gap1 / 50
    # endpoints unchanged by the flag
    assert value(kind="jsd", beta=0.0, jsd_normalized=True) == pytest.approx(fkl, rel=1e-12)
    assert value(kind="jsd", beta=1.0, jsd_normalized=True) == pytest.approx(rkl, rel=1e-12)
    # ...while the un-normalized interior collapses towards 0 (the jump the flag removes)
    assert value(kind="jsd", beta=1e-4) == pytest.approx(1e-4 * fkl, rel=1e-2)
    assert value(kind="jsd", beta=1 - 1e-4) == pytest.approx(1e-4 * rkl, rel=1e-2)


# --------------------------------------------------------------------------- reduction


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_gradient_accumulation_with_global_count_is_exact(kind: LossKind) -> None:
    spec = LossSpec(kind=kind, temperature=2.0, scale_by_t2=True, ce_weight=0.3, chunk_tokens=3)
    s, t, labels = make_batch(8, shape=(6, 5))
    labels[0, :4] = IGNORE_INDEX  # make the micro-batches' valid counts clearly unequal
    labels[3:, 1] = 2
    n_global = int((labels != IGNORE_INDEX).sum())
    splits = [(0, 1), (1, 3), (3, 6)]
    counts = [int((labels[a:b] != IGNORE_INDEX).sum()) for a, b in splits]
    assert len(set(counts)) == 3

    accumulated = 0.0
    for a, b in splits:
        out = distillation_loss(s[a:b], t[a:b], labels[a:b], spec, num_valid_tokens=n_global)
        out.total.backward()
        accumulated += float(out.total.detach())
    s_full = leaf_copy(s)
    full = distillation_loss(s_full, t, labels, spec)
    full.total.backward()
    assert accumulated == pytest.approx(float(full.total.detach()), rel=1e-12)
    assert_close(grad(s), grad(s_full))

    naive = sum(
        float(distillation_loss(s[a:b], t[a:b], labels[a:b], spec).total.detach())
        for a, b in splits
    )
    assert naive / 3 != pytest.approx(
        float(full.total.detach()), rel=1e-3
    )  # local means are not exact


def test_num_valid_tokens_smaller_than_local_count_is_refused() -> None:
    s, t, labels = make_batch(9)
    with pytest.raises(LossInputError) as err:
        distillation_loss(s, t, labels, LossSpec(), num_valid_tokens=1)
    assert err.value.argument == "num_valid_tokens"


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_invariance(kind: LossKind) -> None:
    s, t, labels = make_batch(10, shape=(4, 5))
    n = int((labels != IGNORE_INDEX).sum())
    results = []
    for chunk in (1, 7, n, 1000):
        spec = LossSpec(kind=kind, ce_weight=0.3, temperature=0.7, chunk_tokens=chunk)
        s_c = leaf_copy(s)
        out = distillation_loss(s_c, t, labels, spec)
        out.total.backward()
        results.append((out.total, grad(s_c)))
    for total, g in results[1:]:
        assert_close(total, results[0][0], tol=1e-12)
        assert_close(g, results[0][1], tol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_batch_is_zero_not_nan(kind: LossKind) -> None:
    s, t, labels = make_batch(12)
    labels[:] = IGNORE_INDEX
    for num_valid in (None, 0, 5):
        s_c = leaf_copy(s)
        out = distillation_loss(
            s_c, t, labels, LossSpec(kind=kind, ce_weight=0.3), num_valid_tokens=num_valid
        )
        out.total.backward()
        assert out.n_tokens == 0
        assert float(out.total.detach()) == 0.0
        assert float(out.kd) == 0.0
        assert float(out.ce) == 0.0
        assert torch.equal(grad(s_c), torch.zeros_like(s_c))


# ------------------------------------------------------------------------ dtypes and vocabularies


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_bf16_inputs_are_accepted(kind: LossKind) -> None:
    spec = LossSpec(kind=kind, ce_weight=0.3, temperature=2.0, chunk_tokens=5)
    s, t, labels = make_batch(13, vocab=64, dtype=torch.bfloat16)
    out = distillation_loss(s, t, labels, spec)
    out.total.backward()
    assert grad(s).dtype == torch.bfloat16
    assert out.total.dtype == torch.float32
    s_ref = s.detach().double().requires_grad_()  # same bf16-rounded values, exact math
    total = ref_loss(s_ref, t.double(), labels, spec)[0]
    total.backward()
    torch.testing.assert_close(out.total.double(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(s).double(), grad(s_ref), rtol=2e-2, atol=1e-4)


def test_padded_vocab_is_sliced() -> None:
    spec = LossSpec(kind="jsd", ce_weight=0.3)
    s, t, labels = make_batch(14, vocab=10)
    s_pad = torch.cat([s.detach(), torch.randn(*s.shape[:-1], 6, dtype=F64)], -1)
    s_pad.requires_grad_()
    t_pad = torch.cat([t, torch.randn(*t.shape[:-1], 2, dtype=F64)], -1)
    out = distillation_loss(s_pad, t_pad, labels, spec, vocab_size=10)
    out.total.backward()
    ref = ref_loss(s, t, labels, spec)[0]
    ref.backward()
    assert_close(out.total, ref)
    assert_close(grad(s_pad)[..., :10], grad(s))
    assert torch.equal(grad(s_pad)[..., 10:], torch.zeros_like(grad(s_pad)[..., 10:]))


def test_mismatched_vocab_is_refused_with_both_sizes() -> None:
    s, _, labels = make_batch(15, vocab=12)
    t = torch.randn(*s.shape[:-1], 16, dtype=F64)
    with pytest.raises(LossInputError) as err:
        distillation_loss(s, t, labels, LossSpec())
    message = str(err.value)
    for needle in ("12", "16", "vocab_size"):
        assert needle in message
    assert err.value.argument == "vocab_size"
    with pytest.raises(LossInputError):
        distillation_loss(s, t, labels, LossSpec(), vocab_size=13)  # wider than the student


@pytest.mark.parametrize("kind", KINDS)
def test_masked_vocab_entries_do_not_make_nan(kind: LossKind) -> None:
    # -inf in both models at the same entries is exactly "those tokens do not exist".
    spec = LossSpec(kind=kind, beta=0.4, ce_weight=0.3, temperature=1.5)
    s, t, labels = make_batch(16, vocab=10)
    labels[labels >= 7] = 1
    banned = torch.tensor([7, 9])
    s_inf = s.detach().clone()
    s_inf[..., banned] = -math.inf
    s_inf.requires_grad_()
    t_inf = t.clone()
    t_inf[..., banned] = -math.inf
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    s_kept = leaf_copy(s[..., keep])
    ref = ref_loss(s_kept, t[..., keep], labels, spec)[0]
    ref.backward()
    for path in ("chunked", "plain"):
        s_inf.grad = None
        if path == "chunked":
            total = distillation_loss(s_inf, t_inf, labels, spec).total
        else:
            valid = labels != IGNORE_INDEX
            tokens = token_divergence(s_inf[valid], t_inf[valid], spec)
            total = (1 - spec.ce_weight) * tokens.sum() / valid.sum()
            total = total + spec.ce_weight * torch.nn.functional.cross_entropy(
                s_inf[valid], labels[valid]
            )
        total.backward()
        assert_close(total, ref)
        assert torch.isfinite(grad(s_inf)).all(), path
        assert_close(grad(s_inf)[..., keep], grad(s_kept))
        assert torch.equal(grad(s_inf)[..., banned], torch.zeros_like(grad(s_inf)[..., banned]))


def test_inputs_are_flattened_and_non_contiguous_views_work() -> None:
    spec = LossSpec(kind="skew_forward_kl", ce_weight=0.3, chunk_tokens=4)
    s_full, t_full, labels_full = make_batch(17, shape=(2, 7))
    s = s_full[:, :-1]  # the causal-shift view is not contiguous
    out3d = distillation_loss(s, t_full[:, :-1], labels_full[:, 1:], spec)
    out3d.total.backward()
    s2 = leaf_copy(s_full.detach()[:, :-1].reshape(-1, 13))
    out2d = distillation_loss(
        s2, t_full[:, :-1].reshape(-1, 13), labels_full[:, 1:].reshape(-1), spec
    )
    out2d.total.backward()
    assert_close(out3d.total, out2d.total, tol=1e-14)
    assert_close(grad(s_full)[:, :-1].reshape(-1, 13), grad(s2), tol=1e-14)
    assert torch.equal(grad(s_full)[:, -1], torch.zeros_like(grad(s_full)[:, -1]))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "kl"}, "loss.kind"),
        ({"beta": 1.5}, "loss.beta"),
        ({"beta": float("nan")}, "loss.beta"),
        ({"skew_alpha": 0.0}, "loss.skew_alpha"),
        ({"skew_alpha": 1.0}, "loss.skew_alpha"),
        ({"temperature": 0.0}, "loss.temperature"),
        ({"ce_weight": -0.1}, "loss.ce_weight"),
        ({"chunk_tokens": 0}, "loss.chunk_tokens"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        LossSpec(**kwargs)
    assert err.value.field == field


def test_bad_labels_are_refused() -> None:
    s, t, labels = make_batch(18)
    with pytest.raises(LossInputError, match="leading shape"):
        distillation_loss(s, t, labels[:, :-1], LossSpec())
    labels[0, 0] = 13  # == vocab
    with pytest.raises(LossInputError, match="labels must be"):
        distillation_loss(s, t, labels, LossSpec())


# --------------------------------------------------------------------------- fused linear path


def make_linear(seed: int, n: int, hidden: int, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=F64).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=F64) / math.sqrt(hidden)).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=g, dtype=F64)).requires_grad_()
    return h, w, b


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_matches_reference(kind: LossKind, teacher_form: str) -> None:
    spec = LossSpec(kind=kind, beta=0.6, ce_weight=0.3, temperature=1.7, scale_by_t2=True,
                    chunk_tokens=5)  # fmt: skip
    n, hid, vocab = 17, 8, 19
    h, w, b = make_linear(19, n, hid, vocab)
    th, tw, tb = (x.detach() for x in make_linear(20, n, 6, vocab))
    t_logits = th @ tw.T + tb
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    labels[::4] = IGNORE_INDEX

    if teacher_form == "logits":
        out = fused_linear_distillation_loss(h, w, t_logits, labels, spec, student_bias=b)
    else:
        out = fused_linear_distillation_loss(
            h, w, th, labels, spec, student_bias=b, teacher_weight=tw, teacher_bias=tb
        )
    out.total.backward()

    h2, w2, b2 = (leaf_copy(x) for x in (h, w, b))
    total, kd, ce = ref_loss(h2 @ w2.T + b2, t_logits, labels, spec)
    total.backward()
    assert_close(out.total, total)
    assert_close(out.kd, kd)
    assert_close(out.ce, ce)
    assert_close(grad(h), grad(h2))
    assert_close(grad(w), grad(w2))
    assert_close(grad(b), grad(b2))
    assert out.n_tokens == int((labels != IGNORE_INDEX).sum())


def test_fused_linear_3d_padded_vocab_no_bias_equals_logits_path() -> None:
    spec = LossSpec(kind="reverse_kl", ce_weight=0.3, chunk_tokens=3)
    h, w, _ = make_linear(21, 2 * 5, 8, 16)  # student lm_head padded to 16 rows
    h3 = leaf_copy(h.detach().view(2, 5, 8))
    t = torch.randn(2, 5, 12, dtype=F64)  # teacher padded to 12
    labels = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = IGNORE_INDEX
    fused = fused_linear_distillation_loss(h3, w, t, labels, spec, vocab_size=10)
    fused.total.backward()
    h_ref, w_ref = leaf_copy(h3), leaf_copy(w)
    plain = distillation_loss(h_ref @ w_ref.T, t, labels, spec, vocab_size=10)
    plain.total.backward()
    assert_close(fused.total, plain.total)
    assert_close(grad(h3), grad(h_ref))
    assert_close(grad(w), grad(w_ref))
    assert torch.equal(grad(w)[10:], torch.zeros_like(grad(w)[10:]))


def test_fused_linear_bf16_runs_and_is_close() -> None:
    spec = LossSpec(kind="jsd", ce_weight=0.3, chunk_tokens=8)
    h, w, _ = make_linear(22, 24, 16, 40)
    hb, wb = leaf_copy(h.to(torch.bfloat16)), leaf_copy(w.to(torch.bfloat16))
    t = torch.randn(24, 40, dtype=torch.bfloat16)
    labels = torch.randint(0, 40, (24,), generator=torch.Generator().manual_seed(3))
    out = fused_linear_distillation_loss(hb, wb, t, labels, spec)
    out.total.backward()
    assert grad(hb).dtype == torch.bfloat16
    assert grad(wb).dtype == torch.bfloat16
    h2, w2 = leaf_copy(hb.double()), leaf_copy(wb.double())
    ref = ref_loss(h2 @ w2.T, t.double(), labels, spec)[0]
    ref.backward()
    torch.testing.assert_close(out.total.double(), ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(grad(hb).double(), grad(h2), rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(grad(wb).double(), grad(w2), rtol=5e-2, atol=2e-3)


def test_fused_linear_shape_errors() -> None:
    h, w, _ = make_linear(23, 4, 8, 10)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(LossInputError, match="hidden size"):
        fused_linear_distillation_loss(h, w[:, :5], torch.randn(4, 10), labels, LossSpec())
    with pytest.raises(LossInputError, match="vocab"):
        fused_linear_distillation_loss(h, w, torch.randn(4, 11, dtype=F64), labels, LossSpec())


@pytest.mark.parametrize("mass", ["tail", "renormalize"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_sparse_equals_sparse_loss_on_projected_logits(
    kind: LossKind, mass: SparseMass
) -> None:
    """The fused sparse loss is the sparse loss over ``h @ W.T + b``: value and the
    gradients wrt hidden states, weight and bias, over several chunks, masked rows and a
    padded student vocabulary (16 rows, 13 real)."""
    spec = LossSpec(kind=kind, beta=0.4, ce_weight=0.25, temperature=1.5, chunk_tokens=4)
    h, w, b = make_linear(31, 2 * 9, 8, 16)
    h3 = leaf_copy(h.detach().view(2, 9, 8))
    g = torch.Generator().manual_seed(5)
    t_logits = 2.0 * torch.randn(2, 9, 13, generator=g, dtype=F64)
    targets = SparseTargets.from_logits(t_logits, 5)
    labels = torch.randint(0, 13, (2, 9), generator=g)
    labels[1, :3] = IGNORE_INDEX
    fused = fused_linear_sparse_distillation_loss(
        h3, w, targets, labels, spec, student_bias=b, mass=mass, num_valid_tokens=20, vocab_size=13
    )
    fused.total.backward()
    h_ref, w_ref, b_ref = leaf_copy(h3), leaf_copy(w), leaf_copy(b)
    plain = sparse_distillation_loss(
        h_ref @ w_ref.T + b_ref, targets, labels, spec, mass=mass, num_valid_tokens=20,
        vocab_size=13,
    )  # fmt: skip
    plain.total.backward()
    for part in ("total", "kd", "ce"):
        assert_close(getattr(fused, part), getattr(plain, part))
    assert_close(grad(h3), grad(h_ref))
    assert_close(grad(w), grad(w_ref))
    assert_close(grad(b), grad(b_ref))
    assert torch.equal(grad(w)[13:], torch.zeros_like(grad(w)[13:]))
    assert fused.n_tokens == plain.n_tokens == 15


def test_fused_linear_sparse_refuses_what_the_sparse_loss_refuses() -> None:
    h, w, _ = make_linear(32, 6, 8, 10)
    targets = SparseTargets.from_logits(torch.randn(1, 6, 10, dtype=F64), 3)
    labels = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(LossInputError, match="positions"):
        fused_linear_sparse_distillation_loss(h.view(2, 3, 8), w, targets, labels.view(2, 3),
                                              LossSpec())  # fmt: skip
    with pytest.raises(LossInputError, match=r"\[0, 4\)"):
        fused_linear_sparse_distillation_loss(
            h.view(1, 6, 8), w, targets, labels, LossSpec(), vocab_size=4
        )


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy_equals_torch_cross_entropy(bias: bool) -> None:
    """Plain CE through the lm_head, chunk by chunk, equals ``F.cross_entropy`` on the full
    logits (sum over valid tokens / the accumulation window's count), gradients included."""
    h, w, b = make_linear(33, 3 * 7, 8, 16)
    h3 = leaf_copy(h.detach().view(3, 7, 8))
    labels = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(6))
    labels[0, :4] = IGNORE_INDEX
    labels[2, -2:] = IGNORE_INDEX
    out = fused_linear_cross_entropy(
        h3, w, labels, bias=b if bias else None, num_valid_tokens=30, vocab_size=11,
        chunk_tokens=4,
    )  # fmt: skip
    out.total.backward()
    h_ref, w_ref, b_ref = leaf_copy(h3), leaf_copy(w), leaf_copy(b)
    logits = h_ref @ w_ref.T + (b_ref if bias else 0.0)
    ref = torch.nn.functional.cross_entropy(
        logits[..., :11].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
        reduction="sum",
    ) / 30  # fmt: skip
    ref.backward()
    assert_close(out.total, ref)
    assert_close(out.ce, ref)
    assert float(out.kd) == 0.0
    assert out.n_tokens == 15
    assert_close(grad(h3), grad(h_ref))
    assert_close(grad(w), grad(w_ref))
    if bias:
        assert_close(grad(b), grad(b_ref))
    else:
        assert b.grad is None


def kept_bytes(fn: Any) -> tuple[int, Any]:
    """Bytes of the tensors autograd saved while running ``fn()`` that are still alive once
    it returned (a chunk's local graph, built and dropped inside the call, is not kept)."""
    import gc
    import weakref

    refs: list[weakref.ref[Tensor]] = []

    def pack(x: Tensor) -> Tensor:
        refs.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    gc.collect()
    alive = {id(t): t for r in refs if (t := r()) is not None}
    return sum(t.numel() * t.element_size() for t in alive.values()), out


def test_fused_sparse_and_ce_keep_no_vocab_sized_activation() -> None:
    n, hid, vocab = 256, 32, 4096
    h, w, _ = (x.detach().float().requires_grad_() for x in make_linear(34, n, hid, vocab))
    h3 = h.detach().view(1, n, hid).requires_grad_()
    labels = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(7))
    targets = SparseTargets.from_logits(torch.randn(1, n, vocab), 8)
    spec = LossSpec(kind="forward_kl", chunk_tokens=64)
    expected = (n * hid + vocab * hid) * 4  # the gradients of hidden and weight, nothing more
    sparse, out_sparse = kept_bytes(
        lambda: fused_linear_sparse_distillation_loss(h3, w, targets, labels, spec)
    )
    ce, out_ce = kept_bytes(lambda: fused_linear_cross_entropy(h3, w, labels, chunk_tokens=64))
    assert sparse == ce == expected < n * vocab * 4
    assert torch.isfinite(out_sparse.total) and torch.isfinite(out_ce.total)


# --------------------------------------------------------------------------- memory


def saved_bytes(fn: object) -> int:
    """Bytes of tensors autograd saves for backward while running ``fn()``."""
    total = 0

    def pack(x: Tensor) -> Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()  # type: ignore[operator]
    return total


def test_chunked_path_saves_only_the_gradient_buffer() -> None:
    n, vocab = 2048, 8192
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, vocab, generator=g).requires_grad_()
    t = torch.randn(n, vocab, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    spec = LossSpec(kind="jsd", ce_weight=0.3, chunk_tokens=512)
    logits_bytes = n * vocab * 4

    result: dict[str, Tensor] = {}

    def chunked() -> None:
        result["chunked"] = distillation_loss(s, t, labels, spec).total

    def plain() -> None:
        valid = labels != IGNORE_INDEX
        kd = token_divergence(s[valid], t[valid], spec).sum() / valid.sum()
        ce = torch.nn.functional.cross_entropy(s[valid], labels[valid])
        result["plain"] = 0.7 * kd + 0.3 * ce

    chunked_bytes = saved_bytes(chunked)
    plain_bytes = saved_bytes(plain)
    assert chunked_bytes == logits_bytes  # exactly one student-dtype gradient, nothing else
    assert plain_bytes > 4 * logits_bytes
    torch.testing.assert_close(result["chunked"], result["plain"], rtol=1e-5, atol=1e-6)
    result["chunked"].backward()
    assert grad(s) is not None
    assert torch.isfinite(grad(s)).all()


def test_fused_path_saves_no_vocab_sized_activation() -> None:
    n, hid, vocab = 256, 32, 4096
    h, w, b = (x.detach().float().requires_grad_() for x in make_linear(24, n, hid, vocab))
    t = torch.randn(n, vocab)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(4))
    spec = LossSpec(kind="forward_kl", chunk_tokens=64)
    saved = saved_bytes(
        lambda: fused_linear_distillation_loss(h, w, t, labels, spec, student_bias=b)
    )
    # grads of hidden, weight and bias: no [n, vocab] tensor is kept
    assert saved == (n * hid + vocab * hid + vocab) * 4
    assert saved < n * vocab * 4


def test_chunk_rows_keep_large_vocabularies_within_budget() -> None:
    from foundry_kernel.training._losses import chunk_rows

    assert chunk_rows(1024, 128256) == 65
    assert chunk_rows(1024, 32000) == 262
    assert chunk_rows(1024, 4096) == 1024
    assert chunk_rows(7, 50) == 7
    assert chunk_rows(1024, 10_000_000) == 16
