"""Tests for foundry_kernel.run._resources: the memory estimate, preflight, free memory/disk
and the memory sampler.

The estimate is checked against its own documented formula (each component scales with
batch, sequence and vocabulary exactly as written), not against magic totals, so a
change of formula has to change the docstring and these tests together.
"""

from __future__ import annotations

import itertools
import mmap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest
import torch

from foundry_kernel._runtime import Runtime, resolve_runtime
from foundry_kernel.config import RunConfig, load_config
from foundry_kernel.errors import ResourceError
from foundry_kernel.run import _resources as resources
from foundry_kernel.run._resources import (
    GiB,
    MemoryEstimate,
    MemorySampler,
    estimate_memory,
    free_disk,
    free_memory,
    preflight,
    sample_memory,
)

NO_GPU = not torch.cuda.is_available()
SHAPES: dict[str, int] = {
    "teacher_params": 4_700_000,
    "student_params": 1_050_000,
    "vocab_size": 4096,
    "teacher_hidden": 256,
    "student_hidden": 128,
    "teacher_layers": 4,
    "student_layers": 3,
}


def _config(**overrides: Any) -> RunConfig:
    return load_config(None, {"device": "cpu", **overrides})


def _runtime(config: RunConfig, device: str | None) -> Runtime:
    """The run's Runtime; "cuda" (no GPU here) as a bf16-capable GPU would resolve it."""
    if device == "cuda":
        bf16 = torch.bfloat16
        names = {"auto": bf16, "bfloat16": bf16, "float16": torch.float16}
        teacher = names.get(config.teacher.dtype, torch.float32)
        amp = None if config.optim.precision == "float32" else bf16
        return Runtime(torch.device("cuda"), teacher, amp, amp)
    return resolve_runtime(
        config, teacher_hidden=SHAPES["teacher_hidden"], student_hidden=SHAPES["student_hidden"]
    )


def _estimate(config: RunConfig, device: str | None = None, **shape: int) -> MemoryEstimate:
    dims = {**SHAPES, **shape}
    return estimate_memory(
        config,
        runtime=_runtime(config, device),
        teacher_params=dims["teacher_params"],
        student_params=dims["student_params"],
        vocab_size=dims["vocab_size"],
        teacher_hidden=dims["teacher_hidden"],
        student_hidden=dims["student_hidden"],
        teacher_layers=dims["teacher_layers"],
        student_layers=dims["student_layers"],
    )


# --------------------------------------------------------------------------- estimate


def test_parameter_state_is_16_bytes_per_student_param_plus_teacher_weights() -> None:
    est = _estimate(_config(**{"eval.baseline": False, "teacher.dtype": "float32"}))
    p = SHAPES["student_params"]
    assert (est.student_weights, est.student_grads, est.optimizer_state) == (4 * p, 4 * p, 8 * p)
    assert est.teacher_weights == 4 * SHAPES["teacher_params"]
    assert est.baseline_student == 0
    assert est.overhead == 0  # CPU: no CUDA context
    assert est.total == sum(est.parts().values())


def test_bf16_teacher_halves_teacher_weights() -> None:
    """bf16 weights halve the teacher's weights everywhere; its logits take the bytes of
    its forward's dtype (its autocast on an AVX512-BF16 CPU or a GPU, else its weights'),
    so the logits figures follow the runtimes this machine resolves."""
    fp32_cfg = _config(**{"teacher.dtype": "float32"})
    bf16_cfg = _config(**{"teacher.dtype": "bfloat16"})
    fp32, bf16 = _estimate(fp32_cfg), _estimate(bf16_cfg)
    assert bf16.teacher_weights * 2 == fp32.teacher_weights
    e32 = _runtime(fp32_cfg, None).teacher_activation_bytes
    e16 = _runtime(bf16_cfg, None).teacher_activation_bytes
    assert e16 == 2 and e32 in (2, 4)  # 2: this CPU autocasts the teacher to bf16 anyway
    assert bf16.teacher_logits * e32 == fp32.teacher_logits * e16
    cuda16, cuda32 = _estimate(bf16_cfg, "cuda"), _estimate(fp32_cfg, "cuda")
    assert cuda16.teacher_weights * 2 == cuda32.teacher_weights


def test_batch_scales_activations_and_logits_linearly_but_not_chunks() -> None:
    small = _estimate(_config(**{"optim.batch_size": 8, "loss.chunk_tokens": 256}))
    big = _estimate(_config(**{"optim.batch_size": 16, "loss.chunk_tokens": 256}))
    assert big.activations == 2 * small.activations
    assert big.student_logits == 2 * small.student_logits
    assert big.teacher_logits == 2 * small.teacher_logits
    assert big.teacher_forward == 2 * small.teacher_forward
    # the loss is chunked: its fp32 intermediates depend on chunk_tokens, not the batch
    assert big.loss_chunks == small.loss_chunks
    assert big.student_weights == small.student_weights


def test_seq_len_grows_activations_superlinearly_through_attention() -> None:
    cfg = _config(**{"optim.batch_size": 4, "data.seq_len": 64, "optim.precision": "float32"})
    longer = _config(**{"optim.batch_size": 4, "data.seq_len": 128, "optim.precision": "float32"})
    a, b = _estimate(cfg), _estimate(longer)
    # per layer: tokens * (34*h + 5*heads*seq) * elem/2 (Korthikanti et al.), fp32 -> elem 4
    heads, hidden, layers = (
        longer.student.num_heads,
        SHAPES["student_hidden"],
        SHAPES["student_layers"],
    )
    expected = layers * (4 * 128) * (34 * hidden + 5 * heads * 128) * 4 // 2
    assert b.activations == expected
    assert b.activations > 2 * a.activations
    assert b.student_logits == 2 * a.student_logits


def test_vocab_scales_logits_and_chunks_linearly() -> None:
    cfg = _config()
    a, b = _estimate(cfg, vocab_size=4096), _estimate(cfg, vocab_size=8192)
    assert b.student_logits == 2 * a.student_logits
    assert b.teacher_logits == 2 * a.teacher_logits
    assert b.loss_chunks == 2 * a.loss_chunks
    assert b.activations == a.activations


def test_logits_formula_counts_logits_grad_and_fp32_chunks() -> None:
    cfg = _config(
        **{
            "optim.batch_size": 2,
            "data.seq_len": 64,
            "loss.chunk_tokens": 32,
            "optim.precision": "float32",
            "loss.kind": "forward_kl",
        }
    )
    est = _estimate(cfg, vocab_size=1000)
    tokens = 2 * 64
    assert est.student_logits == 2 * tokens * 1000 * 4  # logits + their gradient
    assert est.loss_chunks == 32 * 1000 * 4 * 4  # chunk x vocab x fp32 x 4 copies
    jsd = _estimate(
        cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"kind": "jsd"})}),
        vocab_size=1000,
    )
    assert jsd.loss_chunks == 32 * 1000 * 4 * 6  # the mixture adds two copies


def test_gradient_checkpointing_and_bf16_shrink_activations() -> None:
    base = _estimate(_config(**{"optim.precision": "float32"}))
    ckpt = _estimate(
        _config(**{"optim.precision": "float32", "optim.gradient_checkpointing": True})
    )
    bf16 = _estimate(_config(**{"optim.precision": "bfloat16"}))
    assert ckpt.activations < base.activations
    assert bf16.activations * 2 == base.activations
    assert bf16.student_logits * 2 == base.student_logits


def test_baseline_student_adds_its_weights() -> None:
    with_base = _estimate(_config(**{"eval.baseline": True}))
    without = _estimate(_config(**{"eval.baseline": False}))
    assert with_base.total - without.total == 4 * SHAPES["student_params"]


def test_allocator_slack_scales_the_transient_parts_per_device() -> None:
    cfg = _config()
    cpu = _estimate(cfg)
    transient = (
        cpu.activations
        + cpu.student_logits
        + cpu.loss_chunks
        + cpu.teacher_forward
        + cpu.teacher_logits
    )
    assert cpu.allocator_slack == int(0.75 * transient)
    cuda = _estimate(cfg, device="cuda")
    assert cuda.overhead == resources.CUDA_CONTEXT_BYTES
    assert cuda.allocator_slack < cpu.allocator_slack


def test_describe_names_total_and_largest_part() -> None:
    est = _estimate(_config())
    text = est.describe()
    assert f"{est.total / GiB:.2f} GiB total" in text
    name, _ = est.largest
    assert name.replace("_", " ") in text
    assert name not in ("allocator_slack", "overhead")  # what a suggestion can act on


# --------------------------------------------------------------------------- preflight


def test_preflight_refuses_what_cannot_fit_with_numbers_and_fixes(tmp_path: Path) -> None:
    huge = _config(**{"optim.batch_size": 4096, "data.seq_len": 8192})
    est = _estimate(huge, vocab_size=65536)
    with pytest.raises(ResourceError) as info:
        preflight(huge, est, runs_dir=tmp_path, checkpoint_bytes=1000)
    msg = str(info.value)
    free = free_memory("cpu")
    assert free is not None
    assert f"needs ~{est.total / GiB:.2f} GiB" in msg
    assert "GiB is free" in msg
    for knob in (
        "optim.batch_size",
        "data.seq_len",
        "optim.gradient_checkpointing",
        "optim.precision=bfloat16",
    ):
        assert knob in msg


def test_preflight_warns_when_tight_and_passes_when_roomy(tmp_path: Path) -> None:
    cfg = _config()
    est = _estimate(cfg)
    tight = preflight(
        cfg, est, runs_dir=tmp_path, checkpoint_bytes=1000, free_bytes=int(est.total / 0.9)
    )
    assert any("tight" in w for w in tight.warnings)
    assert tight.memory_fraction == pytest.approx(0.9, rel=1e-3)
    roomy = preflight(cfg, est, runs_dir=tmp_path, checkpoint_bytes=1000)
    assert roomy.warnings == []
    assert roomy.free_bytes == pytest.approx(free_memory("cpu"), rel=0.2)
    assert "needs ~" in roomy.describe()


def test_preflight_checks_disk_for_keep_last_plus_one_and_export(tmp_path: Path) -> None:
    cfg = _config(**{"checkpoint.keep_last": 3})
    est = _estimate(cfg)
    report = preflight(cfg, est, runs_dir=tmp_path / "not" / "yet", checkpoint_bytes=10_000)
    assert report.disk_needed_bytes == (3 + 1) * 10_000 + 10_000
    disk = free_disk(tmp_path)
    with pytest.raises(ResourceError, match=r"checkpoint\.keep_last") as info:
        preflight(cfg, est, runs_dir=tmp_path, checkpoint_bytes=disk)
    assert "GiB" in str(info.value)


def test_preflight_with_unknown_free_memory_warns_instead_of_refusing(tmp_path: Path) -> None:
    cfg = _config()
    est = MemoryEstimate(device="cuda", activations=10 * GiB)
    if not NO_GPU:
        pytest.skip("a GPU is present: free CUDA memory is known")
    report = preflight(cfg, est, runs_dir=tmp_path, checkpoint_bytes=1)
    assert report.free_bytes is None
    assert any("could not measure" in w for w in report.warnings)


# --------------------------------------------------------------------------- free memory


def test_free_cpu_memory_is_positive_and_bounded() -> None:
    free = free_memory("cpu")
    assert free is not None
    assert 0 < free <= psutil.virtual_memory().total


@pytest.mark.skipif(not NO_GPU, reason="checks the GPU-less path")
def test_no_gpu_is_a_normal_state_not_an_error() -> None:
    # On this machine nvmlInit() raises NVMLError_LibraryNotFound; that must read as "no GPU".
    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    assert free_memory("cuda") is None
    assert free_memory("cuda:1") is None
    assert resources.gpu_count() == 0
    assert resources._nvml_ready() is False
    sample = sample_memory()
    assert sample["mem/rss_mb"] is not None
    assert sample["mem/rss_mb"] > 0
    assert not any(key.startswith(("mem/gpu", "mem/torch")) for key in sample)


def test_nvml_wrapper_turns_unsupported_fields_into_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvitop-style: a field the GPU does not support is None, not an exception."""
    monkeypatch.setattr(resources, "_nvml_state", True)

    def unsupported() -> int:
        raise pynvml.NVMLError_NotSupported()

    assert resources._nvml(unsupported) is None
    assert resources._nvml(lambda: 7) == 7


def test_free_disk_uses_nearest_existing_folder(tmp_path: Path) -> None:
    assert free_disk(tmp_path / "a" / "b" / "c") == free_disk(tmp_path)


# --------------------------------------------------------------------------- sampler


def _foundry_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("foundry-sampler")]


def test_sampler_samples_at_interval_and_its_thread_is_gone_after_stop() -> None:
    got: list[tuple[int, float, dict[str, float | None]]] = []
    sampler = MemorySampler(lambda i, t, s: got.append((i, t, s)), interval_s=0.1, name="t1")
    with sampler:
        assert sampler.running
        time.sleep(0.55)
    assert not sampler.running
    assert _foundry_threads() == []
    assert 4 <= len(got) <= 8, len(got)
    assert [i for i, _, _ in got] == list(range(len(got)))
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(got)]
    assert all(0.05 < gap < 0.3 for gap in gaps), gaps
    assert all(s["mem/rss_mb"] and s["mem/rss_peak_mb"] >= s["mem/rss_mb"] for _, _, s in got)
    sampler.stop()  # idempotent
    with pytest.raises(RuntimeError, match="create a new one"):
        sampler.start()


def test_sampler_sees_a_real_allocation_and_numbers_from_start_index() -> None:
    got: list[tuple[int, dict[str, float | None]]] = []
    sampler = MemorySampler(
        lambda i, t, s: got.append((i, s)), interval_s=0.05, name="t2", start_index=40
    )
    sampler.start()
    sampler.start()  # idempotent while running
    time.sleep(0.15)
    # A fresh anonymous mapping, every page written: RSS must grow by it (a tensor could
    # reuse heap pages freed earlier in this process, already resident, and show nothing).
    size = 64 * 1024 * 1024
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    time.sleep(0.2)
    sampler.stop()
    block.close()
    assert got[0][0] == 40
    before = got[0][1]["mem/rss_mb"]
    assert before is not None
    assert sampler.peak_rss_mb > before + 40  # the 64 MiB showed up in RSS


def test_sampler_rejects_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MemorySampler(lambda *_: None, interval_s=0)


def test_the_fused_strategy_counts_no_logits() -> None:
    """The fused loss never materialises student (or projected teacher) logits: the
    estimate drops them, so the preflight does not refuse runs that fit."""
    cfg = _config()
    plain = _estimate(cfg)
    fused = estimate_memory(
        cfg, runtime=_runtime(cfg, None), fused_student=True, fused_teacher=True, **SHAPES
    )
    assert plain.student_logits > 0 and plain.teacher_logits > 0
    assert fused.student_logits == 0 and fused.teacher_logits == 0
    assert fused.loss_chunks == plain.loss_chunks
    assert fused.total < plain.total
