"""Held-out measurements: perplexity, teacher agreement, samples and speed.

Every loop here calls ``ctx.check()`` between batches, and generation stops at the next
token once a stop is requested, so a cancel or timeout lands inside a long evaluation
too, not only between training steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foundry_kernel._context import RunContext
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.teachers._interface import HFTeacher, Teacher, as_teacher
from foundry_kernel.teachers._targets import SparseTargets, TeacherSignal, log1mexp
from foundry_kernel.training._precision import autocast


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with logits: position t predicts token t+1; the last position predicts none.

    Shifting the (small) labels instead of slicing the (huge) logits avoids a
    full-vocabulary copy per batch.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def iter_batches(
    blocks: TokenBlocks, batch_size: int, max_batches: int | None, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    n = len(blocks)
    limit = math.ceil(n / batch_size) if max_batches is None else max_batches
    for b, start in enumerate(range(0, n, batch_size)):
        if b >= limit:
            return
        sl = slice(start, start + batch_size)
        yield (
            blocks.input_ids[sl].to(device),
            blocks.attention_mask[sl].to(device),
            blocks.labels[sl].to(device),
        )


@torch.no_grad()
def evaluate_lm(
    model: PreTrainedModel,
    blocks: TokenBlocks,
    *,
    batch_size: int,
    max_batches: int | None = None,
    ctx: RunContext | None = None,
    teacher: Teacher | PreTrainedModel | None = None,
    vocab_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    teacher_amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and perplexity on held-out blocks, plus agreement/KL with a teacher.

    With a sparse teacher (vLLM, cache) agreement compares with its top-1 and the KL is
    the forward KL over its top-k plus the tail bucket (a lower bound of the full KL).
    """
    judge = as_teacher(teacher, vocab_size=vocab_size, amp_dtype=teacher_amp_dtype)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = kl = agree = 0.0
    tokens = 0
    try:
        for ids, mask, labels in iter_batches(blocks, batch_size, max_batches, device):
            if ctx is not None:
                ctx.check()
            target = shift_labels(labels)
            valid = target != IGNORE_INDEX
            with autocast(device, amp_dtype):
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits[..., :vocab_size].float()[valid]
            tgt = target[valid]
            nll += F.cross_entropy(logits, tgt, reduction="sum").item()
            tokens += int(valid.sum())
            if judge is not None:
                signal = judge.eval_signal(ids, mask)
                batch_kl, batch_agree = _compare(logits, signal, valid, vocab_size)
                kl += batch_kl
                agree += batch_agree
    finally:
        model.train(was_training)
    denom = max(tokens, 1)
    out = {"loss": nll / denom, "ppl": math.exp(min(nll / denom, 50.0)), "tokens": float(tokens)}
    if judge is not None:
        out.update(agreement=agree / denom, kl=kl / denom)
    return out


def _compare(
    logits: Tensor, signal: TeacherSignal, valid: Tensor, vocab_size: int | None
) -> tuple[float, float]:
    """Summed KL(teacher || student) and top-1 agreements over the valid positions."""
    s_logp = logits.log_softmax(-1)
    if isinstance(signal, SparseTargets):
        ids = signal.ids[valid]
        t_logp = signal.logprobs[valid].float()
        s_top = s_logp.gather(-1, ids)
        t_tail = log1mexp(torch.logsumexp(t_logp, dim=-1))
        s_tail = log1mexp(torch.logsumexp(s_top, dim=-1))
        kl = (t_logp.exp() * (t_logp - s_top)).sum() + (t_tail.exp() * (t_tail - s_tail)).sum()
        agree = (ids[:, 0] == logits.argmax(-1)).sum()
        return kl.item(), agree.item()
    t_logits = signal[..., :vocab_size].float()[valid]
    t_logp = t_logits.log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    agree = (t_logits.argmax(-1) == logits.argmax(-1)).sum()
    return kl.item(), agree.item()


@torch.no_grad()
def evaluate_teacher(
    teacher: Teacher,
    blocks: TokenBlocks,
    *,
    batch_size: int,
    max_batches: int | None = None,
    ctx: RunContext | None = None,
) -> dict[str, float]:
    """Held-out loss and perplexity of any teacher: its full logits, or (vLLM) the
    log-probability it gives the true token, which the server reports with the top-k."""
    if isinstance(teacher, HFTeacher):
        return evaluate_lm(
            teacher.model,
            blocks,
            batch_size=batch_size,
            max_batches=max_batches,
            ctx=ctx,
            vocab_size=teacher.vocab_size,
            amp_dtype=teacher.amp_dtype,
        )
    nll = 0.0
    tokens = 0
    for ids, mask, labels in iter_batches(blocks, batch_size, max_batches, torch.device("cpu")):
        if ctx is not None:
            ctx.check()
        valid = shift_labels(labels) != IGNORE_INDEX
        signal = teacher.eval_signal(ids, mask)
        if not isinstance(signal, SparseTargets) or signal.label_logprobs is None:
            raise TypeError(f"{type(teacher).__name__} gave no true-token log-probabilities")
        nll -= signal.label_logprobs.cpu()[valid].sum().item()
        tokens += int(valid.sum())
    denom = max(tokens, 1)
    return {"loss": nll / denom, "ppl": math.exp(min(nll / denom, 50.0)), "tokens": float(tokens)}


class _StopRequested(StoppingCriteria):
    """Ends ``generate`` at the next token once the run is asked to stop (a cancel, a time
    limit, the watchdog), and marks each token as progress for the step watchdog; the
    caller's next ``ctx.check()`` then raises."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        self.ctx.heartbeat()
        stop = self.ctx.stop_requested
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def stop_criteria(ctx: RunContext | None) -> StoppingCriteriaList | None:
    """What ``generate(stopping_criteria=...)`` needs for a cancel to land within a token."""
    return None if ctx is None else StoppingCriteriaList([_StopRequested(ctx)])


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    ctx: RunContext | None = None,
) -> list[str]:
    """Greedy continuations (deterministic, so runs can be compared side by side)."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        if ctx is not None:
            ctx.check()
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(  # type: ignore[operator]  # transformers' stubs
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stop_criteria(ctx),
        )
        if ctx is not None:
            ctx.check()  # a sample cut short by a stop request is not kept
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs  # type: ignore[return-value]  # transformers' stubs


@torch.no_grad()
def generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    new_tokens: int = 64,
    repeats: int = 2,
    ctx: RunContext | None = None,
) -> float:
    """Greedy decoding tokens/s on this machine (best of ``repeats``, after a warm-up);
    with ``ctx``, a stop request ends the current generation at its next token."""
    device = next(model.parameters()).device
    ids = tokenizer("The", return_tensors="pt").input_ids.to(device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "min_new_tokens": new_tokens,
        "max_new_tokens": new_tokens,
        "stopping_criteria": stop_criteria(ctx),
    }
    model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # type: ignore[operator]  # transformers' stubs
    best = 0.0
    for _ in range(repeats):
        if ctx is not None:
            ctx.check()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)  # type: ignore[operator]  # transformers' stubs
        produced = out.shape[1] - ids.shape[1]
        best = max(best, produced / max(time.perf_counter() - t0, 1e-9))
    if ctx is not None:
        ctx.check()  # a measurement cut short by a stop request is not reported
    return best
