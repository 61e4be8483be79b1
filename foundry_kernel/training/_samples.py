"""Samples a reader can judge a model by: each prompt's greedy continuation next to a
seeded sampled one, for the final models and at every validation during training.

Why both: a small student's greedy text often loops ("Annnnnnn. Annnnnn.") long after its
held-out loss improved, which hides what it learned; a sampled continuation (temperature
and top-p from ``eval``) shows it. Each prompt's sample draws from a private generator
seeded from the run's seed and the prompt's position alone, the same seed for every model
and every checkpoint: re-running gives the same text, and a difference between two rows is
the models', not the dice's.

Why at validations: a table of one prompt's continuation per validation step shows the
student learning (or not) in words, next to its loss curve. It runs after the evaluation,
a few tokens per prompt, in eval mode and off torch's global generator, so the training
trajectory is the same with or without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from foundry_kernel._context import RunContext
from foundry_kernel._isolation import derive_seed
from foundry_kernel.config import RunConfig
from foundry_kernel.summary import SampleStep, sample_history_key
from foundry_kernel.teachers._interface import sample_continuations
from foundry_kernel.training._evaluate import generate_samples, room_for

__all__ = [
    "Continuations",
    "SampleHistory",
    "SampleSettings",
    "continue_prompts",
    "history_rows",
    "sampled_texts",
]


@dataclass(frozen=True)
class SampleSettings:
    """What every sample of a run is generated with (from ``eval`` and the run's seed)."""

    prompts: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    checkpoint_prompts: int = 0  # how many of ``prompts`` are sampled at each validation

    @classmethod
    def from_config(cls, config: RunConfig) -> SampleSettings:
        ev = config.eval
        return cls(
            prompts=tuple(ev.sample_prompts),
            max_new_tokens=ev.sample_tokens,
            temperature=ev.sample_temperature,
            top_p=ev.sample_top_p,
            seed=config.seed,
            checkpoint_prompts=ev.checkpoint_samples,
        )

    def prompt_seed(self, index: int) -> int:
        """The seed of prompt ``index``'s sampled continuation, for every model and step."""
        return derive_seed(self.seed, "samples", index)

    def describe(self) -> dict[str, Any]:
        """Plain data for the summary (``sample_settings``): how "sampled" was drawn."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Continuations:
    """One model's greedy and sampled continuations of the same prompts, in order."""

    greedy: list[str]
    sampled: list[str]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generate without dropout (which would draw from torch's global generator, and so
    change a training run's trajectory), then give the model back in the mode it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sampled_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SampleSettings,
    *,
    ctx: RunContext | None = None,
) -> list[str]:
    """Seeded sampled continuations (``settings.temperature``, ``settings.top_p``) of
    ``prompts``; prompt ``i`` draws from :meth:`SampleSettings.prompt_seed` ``(i)``."""
    check = None if ctx is None else ctx.check
    out: list[str] = []
    for index, prompt in enumerate(prompts):
        ids = list(tokenizer(prompt).input_ids)
        if not ids:  # an empty prompt: continue from the start of a text, where there is one
            start = tokenizer.bos_token_id
            start = tokenizer.eos_token_id if start is None else start
            if start is None:
                out.append("")
                continue
            ids = [int(start)]
        (new,) = sample_continuations(
            model,
            [ids],
            max_new_tokens=room_for(model, len(ids), settings.max_new_tokens),
            temperature=settings.temperature,
            seed=settings.prompt_seed(index),
            pad_token_id=None,
            check=check,
            top_p=settings.top_p,
        )
        if ctx is not None:
            ctx.check()  # a sample cut short by a stop request is not kept
        out.append(str(tokenizer.decode(new, skip_special_tokens=True)))
    return out


def continue_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: SampleSettings,
    prompts: Sequence[str] | None = None,
    *,
    ctx: RunContext | None = None,
) -> Continuations:
    """Greedy and sampled continuations of ``prompts`` (all of ``settings.prompts`` unless
    told), in eval mode."""
    chosen = list(settings.prompts if prompts is None else prompts)
    with _eval_mode(model):
        greedy = generate_samples(
            model, tokenizer, chosen, max_new_tokens=settings.max_new_tokens, ctx=ctx
        )
        sampled = sampled_texts(model, tokenizer, chosen, settings, ctx=ctx)
    return Continuations(greedy=greedy, sampled=sampled)


def history_rows(value: Any) -> list[dict[str, Any]]:
    """The readable rows of a stored history (a resumed run continues it), read by
    :meth:`SampleStep.parse`: anything else (an older or damaged record) is dropped."""
    rows = [SampleStep.parse(row) for row in value] if isinstance(value, list) else []
    return [dataclasses.asdict(row) for row in rows if row is not None]


class SampleHistory:
    """A training phase's samples at each validation: the first ``checkpoint_prompts``
    prompts, greedy and sampled, one row per (step, prompt). Called by the Trainer after
    each validation (``Trainer(on_eval=...)``); each call emits a ``sample`` event and
    hands the whole history to ``record`` (the run's summary, ``{phase}_sample_history``).
    """

    def __init__(
        self,
        phase: str,
        tokenizer: PreTrainedTokenizerBase,
        settings: SampleSettings,
        *,
        ctx: RunContext,
        record: Callable[[list[dict[str, Any]]], None],
        earlier: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.phase = phase
        self.tokenizer = tokenizer
        self.settings = settings
        self.prompts = settings.prompts[: settings.checkpoint_prompts]
        self.ctx = ctx
        self.record = record
        self.rows: list[dict[str, Any]] = history_rows(list(earlier))

    @property
    def key(self) -> str:
        """Where the summary keeps it: ``distill_sample_history``, ``baseline_...``."""
        return sample_history_key(self.phase)

    def __call__(self, step: int, model: PreTrainedModel) -> None:
        if not self.prompts:
            return
        got = continue_prompts(model, self.tokenizer, self.settings, self.prompts, ctx=self.ctx)
        new = [
            {"step": step, "prompt": p, "greedy": g, "sampled": s}
            for p, g, s in zip(self.prompts, got.greedy, got.sampled, strict=True)
        ]
        # a resumed run evaluates again from its checkpoint: its rows replace the old ones
        self.rows = [row for row in self.rows if row["step"] < step] + new
        self.ctx.emit("sample", phase=self.phase, step=step, samples=new)
        self.record(list(self.rows))
