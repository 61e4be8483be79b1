"""What only a GPU can show (``pytest -m cuda``; skipped on a machine without CUDA).

``python -m bench.gpu_check`` runs exactly these files on a lent GPU machine. CI has no
GPU, so here every test is skipped, and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from foundry_kernel.training._losses import (
    LossSpec,
    distillation_loss,
    fused_linear_distillation_loss,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _inputs(device: str, *, tokens: int = 300, hidden: int = 48, vocab: int = 1000) -> Any:
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, hidden, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * 0.2
    h_t = torch.randn(tokens, hidden * 2, generator=g)
    w_t = torch.randn(vocab, hidden * 2, generator=g) * 0.2
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = -100  # masked positions, as a prompt or padding would be
    return [t.to(device) for t in (h_s, w_s, h_t, w_t, labels)]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_loss_on_cuda_equals_cpu(kind: str) -> None:
    """The chunked fused path gives the CPU's loss and gradients on the GPU (fp32)."""
    spec = LossSpec(kind=kind, ce_weight=0.2, chunk_tokens=64)  # type: ignore[arg-type]
    results = []
    for device in ("cpu", "cuda"):
        h_s, w_s, h_t, w_t, labels = _inputs(device)
        h_s.requires_grad_(True)
        w_s.requires_grad_(True)
        out = fused_linear_distillation_loss(h_s, w_s, h_t, labels, spec, teacher_weight=w_t)
        out.total.backward()
        results.append((out.total.item(), h_s.grad.cpu(), w_s.grad.cpu()))  # type: ignore[union-attr]
    (cpu_loss, cpu_gh, cpu_gw), (gpu_loss, gpu_gh, gpu_gw) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    torch.testing.assert_close(gpu_gh, cpu_gh, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gpu_gw, cpu_gw, rtol=1e-3, atol=1e-5)


def test_bf16_logits_loss_is_finite_and_close_to_fp32() -> None:
    """bf16 logits (what autocast hands the loss on a GPU) are computed in fp32 inside."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(256, 4096, generator=g).cuda()
    t = torch.randn(256, 4096, generator=g).cuda()
    labels = torch.randint(0, 4096, (256,), generator=g).cuda()
    spec = LossSpec(kind="forward_kl")
    full = distillation_loss(s, t, labels, spec).total
    half = distillation_loss(s.bfloat16(), t.bfloat16(), labels, spec).total
    assert torch.isfinite(half)
    assert half.float().item() == pytest.approx(full.item(), rel=2e-2)


def test_a_tiny_run_completes_on_cuda(tiny_config: dict[str, Any], runs_dir: Path) -> None:
    """The whole job on the GPU: teacher, student and baseline, bf16 where the config says."""
    import foundry_kernel as fk
    from foundry_kernel.summary import RunSummary

    cfg = fk.load_config(tiny_config, ["device=cuda", "optim.precision=bfloat16"])
    handle = fk.run_sync(cfg)
    assert str(handle.state) == "completed", handle.error
    student = RunSummary.parse(handle.result).role("student")
    assert student is not None and student.val_ppl is not None
