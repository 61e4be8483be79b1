"""Teacher backends behind one interface: in-process, a vLLM server, or a logit cache.

The trainer and the evaluator only ever ask a teacher four things: its
distribution over the next token for a batch of training blocks (``signal``),
the same for held-out blocks with the true token's log-probability
(``eval_signal``), continuations of prompts (``generate``), and to let go of
what it holds (``close``). Whether the answer comes from a model in this
process, from a vLLM server over HTTP, or from a cache on disk is the
backend's business, so every distillation mode works with every backend that
can answer it.

Distributions come back either as full logits (in-process, exact) or as
:class:`~foundry_kernel.teachers._targets.SparseTargets` (the top-k with the tail mass).
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from foundry_kernel._isolation import generator
from foundry_kernel.errors import TeacherServerError
from foundry_kernel.teachers._targets import SparseTargets, TeacherSignal
from foundry_kernel.training._precision import autocast

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from foundry_kernel.supervisor import ServerProcess
    from foundry_kernel.teachers._client import TeacherClient
    from foundry_kernel.teachers._logit_cache import LogitCache


class Teacher(ABC):
    """What a distillation run needs from its teacher, whatever serves it."""

    kind: str = "teacher"

    @abstractmethod
    def signal(
        self, index: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> TeacherSignal:
        """The teacher's next-token distribution at every position of these blocks.

        ``index`` names the training blocks (a cache looks them up by it); it is None
        for blocks made on the fly (student samples), which a cache cannot answer.
        """

    def eval_signal(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherSignal:
        """The same for held-out blocks; sparse answers carry the true token's log p."""
        return self.signal(None, input_ids, attention_mask)

    def prefetch(self, index: Tensor) -> None:
        """A hint: :meth:`signal` will soon be asked for the training blocks ``index``.

        The Trainer calls it with the next step's blocks (this rank's share) before it
        computes the current step, so a teacher whose answers are read rather than
        computed can fetch them meanwhile. A hint only: it must not change any answer,
        and ``signal`` must still work for blocks never announced. By default nothing.
        """
        return None

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        """Token ids continuing each prompt (greedy when temperature is 0)."""

    def close(self) -> None:
        """Release what the teacher holds (a server it owns, connections); by default
        nothing to release."""
        return None

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HFTeacher(Teacher):
    """A transformers model in this process: exact full-vocabulary logits, or their top-k."""

    kind = "hf"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        vocab_size: int | None = None,
        amp_dtype: torch.dtype | None = None,
        top_k: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.amp_dtype = amp_dtype
        self.top_k = top_k
        self.pad_token_id = pad_token_id
        model.eval()
        model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Full logits; ``attention_mask=None`` for blocks without padding (SDPA's causal
        kernel, and no host read of the mask inside transformers' forward)."""
        with autocast(self.device, self.amp_dtype):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out[..., : self.vocab_size] if self.vocab_size is not None else out

    def signal(
        self, index: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> TeacherSignal:
        logits = self.logits(input_ids, attention_mask)
        if self.top_k is None:
            return logits
        return SparseTargets.from_logits(logits, self.top_k)

    def eval_signal(self, input_ids: Tensor, attention_mask: Tensor | None) -> TeacherSignal:
        return self.logits(input_ids, attention_mask)  # exact agreement and KL on held-out text

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        return sample_continuations(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            pad_token_id=self.pad_token_id,
        )


class VLLMTeacher(Teacher):
    """A teacher behind a vLLM server: top-k log-probabilities by token id, over HTTP.

    When ``server`` is given the teacher owns it and stops it on ``close``.
    """

    kind = "vllm"

    def __init__(
        self,
        client: TeacherClient,
        *,
        top_k: int,
        batch_blocks: int = 8,
        server: ServerProcess | None = None,
    ) -> None:
        self.client = client
        self.top_k = top_k
        self.batch_blocks = batch_blocks
        self.server = server

    def signal(
        self, index: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> SparseTargets:
        lengths = _prefix_lengths(attention_mask)
        rows = [input_ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        parts: list[SparseTargets] = []
        for start in range(0, len(rows), self.batch_blocks):
            with self._explained():
                parts += self.client.prompt_topk(
                    rows[start : start + self.batch_blocks], self.top_k
                )
        return _assemble(parts, input_ids.shape, self.top_k, input_ids.device)

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """When our own server died under a request, say so and show why (its log)."""
        try:
            yield
        except TeacherServerError as exc:
            server = self.server
            if server is None or server.is_running():
                raise
            raise TeacherServerError(
                f"the vLLM teacher server exited (code {server.wait(0)}) during a request; "
                f"log {server.log_path}:\n{_reason(server.log_tail(400))}",
                url=exc.url,
                status=exc.status,
            ) from exc

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_blocks):
            with self._explained():
                out += self.client.generate(
                    prompts[start : start + self.batch_blocks],
                    max_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed + start,
                )
        return out

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()


class CachedTeacher(Teacher):
    """Training targets read from an offline logit cache; everything else from ``live``
    (held-out evaluation and generation still need a teacher that can answer new text)."""

    kind = "cache"
    # Announced batches read ahead at most: a step's micro-batches, twice over.
    max_ahead = 16

    def __init__(self, cache: LogitCache, live: Teacher) -> None:
        self.cache = cache
        self.live = live
        self.blocks_asked: set[int] = set()  # which blocks training asked for (see reads())
        self._ahead: dict[tuple[int, ...], Future[SparseTargets]] = {}
        self._reader: ThreadPoolExecutor | None = None

    def prefetch(self, index: Tensor) -> None:
        """Read and decode these blocks on one background thread while the step computes.

        Decoding a compressed shard (inflate, un-delta, dequantise) costs about as much as
        the exact layout's copy and overlaps with the student's forward and backward
        (zlib, numpy and torch release the GIL). The answer is the very ``targets()`` call
        that ``signal`` would make, so nothing changes but when it runs; its errors are
        raised by the ``signal`` that uses it.
        """
        key = _blocks_key(index)
        if key in self._ahead or self.max_ahead < 1:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="foundry-cache-read")
        while len(self._ahead) >= self.max_ahead:  # announced but never asked: forget
            self._ahead.pop(next(iter(self._ahead))).cancel()
        self._ahead[key] = self._reader.submit(self.cache.targets, index.detach().cpu().clone())

    def signal(
        self, index: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> TeacherSignal:
        if index is None:
            return self.live.signal(None, input_ids, attention_mask)
        key = _blocks_key(index)
        self.blocks_asked.update(key)
        ahead = self._ahead.pop(key, None)
        targets = ahead.result() if ahead is not None else self.cache.targets(index)
        return targets.to(input_ids.device)

    def reads(self) -> dict[str, Any]:
        """The blocks this process asked for and the shards it read from disk for them
        (plain data): under data parallelism each rank's reads are its own batches'."""
        return {
            "blocks": sorted(self.blocks_asked),
            "shards_read": sorted(self.cache.shards_read),
        }

    def eval_signal(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherSignal:
        return self.live.eval_signal(input_ids, attention_mask)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        return self.live.generate(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        self.live.close()


# --------------------------------------------------------------------------- helpers


def _blocks_key(index: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in index.reshape(-1).tolist())


def as_teacher(teacher: Teacher | PreTrainedModel | None, **kwargs: Any) -> Teacher | None:
    """Accept a bare transformers model where a Teacher is expected (library callers)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return HFTeacher(teacher, **kwargs)


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    pad_token_id: int | None,
    check: Callable[[], None] | None = None,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Continue each prompt with ``model`` by exactly ``max_new_tokens`` tokens (sampling
    at ``temperature``; 0 = greedy; end-of-text is never drawn, so every row has the same
    length). ``top_p`` < 1 draws only from the likeliest tokens whose probabilities add up
    to it (nucleus sampling); 1 draws from all, exactly as before it existed.

    Draws from a private ``torch.Generator`` seeded from ``seed`` alone, never from torch's
    process-global generator: a resumed run samples what the uninterrupted one did, and
    concurrent runs cannot disturb each other's samples (``generate`` takes no generator,
    so this is a plain decoding loop over the model's KV cache: temperature-scaled softmax,
    then ``torch.multinomial``, as ``generate`` does). ``check`` runs before every token.
    ``pad_token_id`` is unused: prompts are grouped by length, so no row is padded.
    """
    del pad_token_id
    device = next(model.parameters()).device
    rng = generator(seed, device)
    banned = _eos_ids(model)
    was_training = model.training
    model.eval()
    result: list[list[int]] = [[] for _ in prompts]
    try:
        for length, rows in _by_length(prompts):  # equal lengths: no padding inside
            ids = torch.tensor([list(prompts[i]) for i in rows], device=device)
            new = _decode(model, ids, max_new_tokens, temperature, rng, banned, check, top_p)
            for i, row in zip(rows, new.tolist(), strict=True):
                result[i] = row
            del length
    finally:
        model.train(was_training)
    return result


def _decode(
    model: PreTrainedModel,
    ids: Tensor,
    steps: int,
    temperature: float,
    rng: torch.Generator,
    banned: list[int],
    check: Callable[[], None] | None,
    top_p: float = 1.0,
) -> Tensor:
    """``steps`` new tokens after ``ids`` (one prompt length), reusing the KV cache."""
    out: list[Tensor] = []
    cached: dict[str, Any] = {}  # the KV cache, under the name the model's outputs use
    step_input = ids
    for _ in range(steps):
        if check is not None:
            check()
        output = model(input_ids=step_input, use_cache=True, **cached)
        for name in ("cache", "past_key_values"):  # transformers 5.x renamed it to "cache"
            if getattr(output, name, None) is not None:
                cached = {name: getattr(output, name)}
                break
        scores = output.logits[:, -1, :].float()
        if banned:
            scores[:, banned] = -math.inf
        if temperature > 0:
            probs = torch.softmax(scores / temperature, dim=-1)
            if top_p < 1.0:
                probs = _nucleus(probs, top_p)
            token = torch.multinomial(probs, num_samples=1, generator=rng)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        out.append(token)
        step_input = token
    if not out:
        return ids.new_zeros((ids.shape[0], 0))
    return torch.cat(out, dim=1)


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` with all but the smallest set of likeliest tokens whose mass reaches
    ``top_p`` set to zero (the likeliest token always stays); ``multinomial`` renormalises."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens likelier than each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def _eos_ids(model: PreTrainedModel) -> list[int]:
    """End-of-text ids, which a fixed-length continuation must not draw."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _by_length(prompts: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Indices of the prompts grouped by prompt length, shortest first, in a fixed order."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return sorted(groups.items())


def _prefix_lengths(attention_mask: Tensor) -> list[int]:
    """Real tokens per row; the server gets only those, so padding must be on the right."""
    lengths = attention_mask.sum(-1).tolist()
    for b, n in enumerate(lengths):
        if int(attention_mask[b, : int(n)].sum()) != int(n):
            raise TeacherServerError(
                "a vLLM teacher needs right-padded blocks (padding only at the end)"
            )
    return [int(n) for n in lengths]


def _assemble(
    parts: Sequence[SparseTargets], shape: torch.Size, k: int, device: torch.device
) -> SparseTargets:
    """Stack per-row answers into [B, T, k]; positions without an answer (the last real
    token, padding) get a harmless uniform top-k, their labels being ignored anyway."""
    batch, length = int(shape[0]), int(shape[1])
    ids = torch.arange(k, dtype=torch.long).expand(batch, length, k).clone()
    values = torch.full((batch, length, k), -math.log(k))
    label = torch.zeros(batch, length)
    for b, part in enumerate(parts):
        n = part.ids.shape[1]
        ids[b, :n] = part.ids[0]
        values[b, :n] = part.logprobs[0]
        if part.label_logprobs is not None:
            label[b, :n] = part.label_logprobs[0]
    return SparseTargets(ids.to(device), values.to(device), label.to(device))


def _reason(log_tail: str) -> str:
    """The error lines of a crashed server's log (vLLM prints long tracebacks per process)."""
    lines = [ln for ln in log_tail.splitlines() if "Error" in ln or "error" in ln]
    return "\n".join(dict.fromkeys(ln.split("] ", 1)[-1] for ln in lines[-40:]))[-2000:]


def vllm_api_key() -> str | None:
    """The key for a server Foundry did not start (``$FOUNDRY_VLLM_API_KEY``)."""
    return os.environ.get("FOUNDRY_VLLM_API_KEY") or None
