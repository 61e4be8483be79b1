"""Held-out measurements: perplexity, teacher agreement, samples and speed.

Every loop here calls ``ctx.check()`` between batches, and generation stops at the next
token once a stop is requested, so a cancel or timeout lands inside a long evaluation
too, not only between training steps.

Held-out perplexity, agreement and KL are *sums* divided at the end: every rank of a
data-parallel job evaluates a disjoint contiguous share of the held-out blocks (the same
blocks one process would evaluate, ``max_batches`` counting global batches), adds its
negative log-likelihood, KL, top-1 agreements and valid-token count into one device-side
vector, and one ``all_reduce`` of that vector gives every rank the totals; the ratios are
taken after it. A mean of per-rank means would weigh a rank's tokens by how many tokens
that rank happened to get.

GPU-shaped: the full-vocabulary fp32 math (log-softmax, the teacher's probabilities, the
KL terms) runs over ``chunk_rows(chunk_tokens, vocab)`` token rows at a time, so only the
model's own ``[B, T, V]`` output and one chunk's fp32 temporaries exist at once; the sums
stay on the device and the only device-to-host read is the totals after the last batch.
A batch without padding is passed with ``attention_mask=None`` (an all-ones mask keeps
SDPA off its causal kernel and makes transformers read the mask on the host per forward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foundry_kernel._context import RunContext
from foundry_kernel._models import context_limit
from foundry_kernel._world import World
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.teachers._interface import HFTeacher, Teacher, as_teacher
from foundry_kernel.teachers._targets import SparseTargets, TeacherSignal, log1mexp
from foundry_kernel.training._losses import chunk_rows
from foundry_kernel.training._precision import autocast

EVAL_CHUNK_TOKENS = 1024
"""Default rows per chunk of evaluation's full-vocabulary math (``loss.chunk_tokens``'s
default; :func:`chunk_rows` caps it further at large vocabularies)."""

EVAL_CHUNK_COPIES = 6
"""fp32 ``[chunk, V]`` temporaries evaluation holds at once: the student's rows, their
log-softmax, the teacher's rows, its log-softmax, its probabilities and the KL terms
(the preflight counts this many)."""


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with logits: position t predicts token t+1; the last position predicts none.

    Shifting the (small) labels instead of slicing the (huge) logits avoids a
    full-vocabulary copy per batch.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass(frozen=True)
class EvalShard:
    """This rank's share of the held-out blocks and how it is walked.

    ``total`` blocks are evaluated by the whole job: the first ``max_batches`` global
    batches of ``batch_size`` blocks, as one process evaluates them. This rank takes the
    contiguous ``[start, stop)`` of them (:meth:`World.shard`) in micro-batches of
    ``micro = ceil(batch_size / world_size)`` blocks - the per-rank micro-batch training
    uses, so evaluation needs no more memory per rank than a training step's forward.
    ``steps`` is the same on every rank (the largest share's micro-batch count): a model
    or teacher sharded with FSDP2 all-gathers its parameters inside every forward, so
    every rank must run the same number of forwards or the ranks with more batches wait
    forever on those with fewer.
    """

    total: int
    start: int
    stop: int
    micro: int
    steps: int

    @classmethod
    def plan(
        cls, n_blocks: int, batch_size: int, max_batches: int | None, world: World
    ) -> EvalShard:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = math.ceil(n_blocks / batch_size) if max_batches is None else max_batches
        total = max(0, min(n_blocks, limit * batch_size))
        start, stop = world.shard(total)
        micro = math.ceil(batch_size / world.world_size)
        steps = math.ceil(math.ceil(total / world.world_size) / micro)
        return cls(total=total, start=start, stop=stop, micro=micro, steps=steps)

    def slices(self) -> Iterator[slice | None]:
        """This rank's micro-batches in order, ``steps`` of them; None for a step this
        rank has no block left for (it runs a dummy forward, see :func:`iter_batches`)."""
        for i in range(self.steps):
            lo = self.start + i * self.micro
            hi = min(lo + self.micro, self.stop)
            yield slice(lo, hi) if lo < hi else None


@dataclass(frozen=True)
class EvalBatch:
    """One micro-batch on the device. ``mask`` is None when no block has padding.
    ``real`` is False for a dummy batch: it is run only so that this rank makes the same
    forwards (and the collectives inside them) as the others; nothing of it is counted."""

    ids: Tensor
    mask: Tensor | None
    full_mask: Tensor
    labels: Tensor
    real: bool


def _padded_rows(blocks: TokenBlocks, total: int) -> list[bool]:
    """Which of the first ``total`` blocks have padding, read once per evaluation from
    the host-resident data (not a device sync: the blocks live in host memory until each
    batch is copied), so no batch needs a per-forward check."""
    mask = blocks.attention_mask[:total]
    return (mask == 0).any(dim=1).tolist() if total else []


def iter_batches(
    blocks: TokenBlocks,
    shard: EvalShard,
    device: torch.device,
) -> Iterator[EvalBatch]:
    """This rank's micro-batches on ``device``; a step with no block left yields block 0
    as a dummy (``real=False``) so that every rank runs ``shard.steps`` forwards."""
    padded = _padded_rows(blocks, shard.total)
    for sl in shard.slices():
        real = sl is not None
        rows = sl if sl is not None else slice(0, 1)
        mask = _to_device(blocks.attention_mask[rows], device)
        yield EvalBatch(
            ids=_to_device(blocks.input_ids[rows], device),
            mask=mask if any(padded[rows]) else None,
            full_mask=mask,
            labels=_to_device(blocks.labels[rows], device),
            real=real,
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A batch tensor on ``device``; to CUDA through pinned memory without waiting (a
    pageable copy makes the host wait for the device, a sync per tensor). On CPU the
    tensor itself, as before."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Sums:
    """Device-side running sums of one evaluation: nll, KL, agreements, valid tokens.

    float64 (exact token counts, and the same double accumulation of fp32 batch sums the
    host-side floats gave before); float32 on MPS, which has no float64.
    """

    NAMES = ("nll", "kl", "agree", "tokens")

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.values = torch.zeros(len(self.NAMES), dtype=dtype, device=device)

    def add(self, name: str, value: Tensor) -> None:
        i = self.NAMES.index(name)
        self.values[i] += value.to(self.values.dtype)

    def totals(self, world: World) -> dict[str, float]:
        """All ranks' sums (one ``all_reduce``), then the one host read of evaluation."""
        summed = world.all_reduce_sum(self.values)
        return dict(zip(self.NAMES, summed.tolist(), strict=True))


def _ratios(sums: dict[str, float], with_teacher: bool) -> dict[str, float]:
    tokens = sums["tokens"]
    denom = max(tokens, 1.0)
    loss = sums["nll"] / denom
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens)}
    if with_teacher:
        out.update(agreement=sums["agree"] / denom, kl=sums["kl"] / denom)
    return out


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
    world: World = World(),  # noqa: B008  # frozen dataclass: one process
    chunk_tokens: int = EVAL_CHUNK_TOKENS,
) -> dict[str, float]:
    """Mean cross-entropy and perplexity on held-out blocks, plus agreement/KL with a teacher.

    With a sparse teacher (vLLM, cache) agreement compares with its top-1 and the KL is
    the forward KL over its top-k plus the tail bucket (a lower bound of the full KL).

    ``batch_size`` is global (``optim.batch_size``): on ``world`` each rank evaluates its
    share (see :class:`EvalShard`) and every rank returns the same job-wide figures. Every
    rank must call this together (it ends in a collective).
    """
    judge = as_teacher(teacher, vocab_size=vocab_size, amp_dtype=teacher_amp_dtype)
    device = next(model.parameters()).device
    shard = EvalShard.plan(len(blocks), batch_size, max_batches, world)
    sums = _Sums(device)
    was_training = model.training
    model.eval()
    try:
        for n, batch in enumerate(iter_batches(blocks, shard, device), 1):
            if ctx is not None:
                ctx.check()
            with autocast(device, amp_dtype):
                logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
            signal = None if judge is None else _ask(judge, batch)
            if batch.real:
                _score(logits, shift_labels(batch.labels), signal, vocab_size, chunk_tokens, sums)
            del logits, signal
            if ctx is not None:
                ctx.advance(n, shard.steps, "batches")
    finally:
        model.train(was_training)
    return _ratios(sums.totals(world), judge is not None)


def _ask(judge: Teacher, batch: EvalBatch) -> TeacherSignal:
    """The teacher's held-out answer; an in-process teacher gets no mask for a batch
    without padding, like the student (other backends take the mask as a tensor)."""
    if isinstance(judge, HFTeacher):
        return judge.eval_signal(batch.ids, batch.mask)
    return judge.eval_signal(batch.ids, batch.full_mask)


def _rows(t: Tensor) -> Tensor:
    """``[B, T, ...]`` as ``[B*T, ...]`` (a view for the model's contiguous output)."""
    return t.reshape(-1, *t.shape[2:])


def _score(
    logits: Tensor,
    target: Tensor,
    signal: TeacherSignal | None,
    vocab_size: int | None,
    chunk_tokens: int,
    sums: _Sums,
) -> None:
    """Add one batch's nll, valid tokens and (with a teacher) KL and agreements to
    ``sums``, ``chunk_rows`` token rows at a time; ignored rows contribute exactly 0."""
    s_all, tgt_all = _rows(logits), target.reshape(-1)
    vocab = vocab_size if vocab_size is not None else s_all.shape[-1]
    step = chunk_rows(chunk_tokens, vocab)
    valid_all = tgt_all != IGNORE_INDEX
    sums.add("tokens", valid_all.sum())
    for lo in range(0, s_all.shape[0], step):
        rows = slice(lo, lo + step)
        s = s_all[rows, :vocab_size].float()
        s_logp = s.log_softmax(-1)
        sums.add(
            "nll", F.nll_loss(s_logp, tgt_all[rows], ignore_index=IGNORE_INDEX, reduction="sum")
        )
        if signal is None:
            continue
        valid = valid_all[rows]
        s_top1 = s.argmax(-1)
        del s
        if isinstance(signal, SparseTargets):
            kl_rows, t_top1 = _sparse_kl(signal, rows, s_logp)
        else:
            kl_rows, t_top1 = _dense_kl(_rows(signal)[rows, :vocab_size], s_logp)
        sums.add("kl", torch.where(valid, kl_rows, 0.0).sum())
        sums.add("agree", ((t_top1 == s_top1) & valid).sum())


def _dense_kl(teacher_rows: Tensor, s_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row KL(teacher || student) and the teacher's top-1, for full teacher logits."""
    t = teacher_rows.float()
    top1 = t.argmax(-1)
    t_logp = t.log_softmax(-1)
    del t
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1), top1


def _sparse_kl(signal: SparseTargets, rows: slice, s_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row forward KL over the teacher's top-k plus the tail bucket, and its top-1."""
    ids = _rows(signal.ids)[rows]
    t_logp = _rows(signal.logprobs)[rows].float()
    s_top = s_logp.gather(-1, ids)
    t_tail = log1mexp(torch.logsumexp(t_logp, dim=-1))
    s_tail = log1mexp(torch.logsumexp(s_top, dim=-1))
    kl = (t_logp.exp() * (t_logp - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl, ids[:, 0]


@torch.no_grad()
def evaluate_teacher(
    teacher: Teacher,
    blocks: TokenBlocks,
    *,
    batch_size: int,
    max_batches: int | None = None,
    ctx: RunContext | None = None,
    world: World = World(),  # noqa: B008  # frozen dataclass: one process
    chunk_tokens: int = EVAL_CHUNK_TOKENS,
) -> dict[str, float]:
    """Held-out loss and perplexity of any teacher: its full logits, or (vLLM) the
    log-probability it gives the true token, which the server reports with the top-k.

    Sharded and summed over ``world`` like :func:`evaluate_lm`, dummy steps included: a
    teacher behind another interface (a cache's live teacher, a top-k view) may still be
    an FSDP2-sharded model whose forward all-gathers, so a rank with no block left asks
    too (for a vLLM server that is one extra one-block request).
    """
    if isinstance(teacher, HFTeacher):
        return evaluate_lm(
            teacher.model,
            blocks,
            batch_size=batch_size,
            max_batches=max_batches,
            ctx=ctx,
            vocab_size=teacher.vocab_size,
            amp_dtype=teacher.amp_dtype,
            world=world,
            chunk_tokens=chunk_tokens,
        )
    cpu = torch.device("cpu")
    shard = EvalShard.plan(len(blocks), batch_size, max_batches, world)
    sums = _Sums(cpu)
    for n, batch in enumerate(iter_batches(blocks, shard, cpu), 1):
        if ctx is not None:
            ctx.check()
        signal = teacher.eval_signal(batch.ids, batch.full_mask)
        if not isinstance(signal, SparseTargets) or signal.label_logprobs is None:
            raise TypeError(f"{type(teacher).__name__} gave no true-token log-probabilities")
        if not batch.real:
            continue
        valid = shift_labels(batch.labels) != IGNORE_INDEX
        label_logp = signal.label_logprobs.to(cpu)
        sums.add("nll", -torch.where(valid, label_logp, 0.0).sum())
        sums.add("tokens", valid.sum())
        if ctx is not None:
            ctx.advance(n, shard.steps, "batches")
    return _ratios(sums.totals(world), with_teacher=False)


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


def room_for(model: PreTrainedModel, prompt_len: int, wanted: int) -> int:
    """At most ``wanted`` new tokens, fewer where the model's context (GPT-2's learned
    ``n_positions``, say) ends sooner: generating past it indexes out of the position table
    inside torch. At least 1."""
    found = context_limit(getattr(model, "config", None))
    return wanted if found is None else max(1, min(wanted, found[0] - prompt_len))


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
            max_new_tokens=room_for(model, ids.shape[1], max_new_tokens),
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
    new_tokens = room_for(model, ids.shape[1], new_tokens)
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
