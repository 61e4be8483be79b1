"""Distillation modes beyond online logits: offline logit cache and sequence-level data.

* ``offline``: the teacher's top-k log-probabilities over the training blocks are
  captured once into a logit cache (keyed to teacher, tokenizer, data and k; resumable),
  then students train from the cache without the teacher.
* ``sequence``: the teacher writes completions for prompts cut from the training
  blocks (sequence-level KD, Kim & Rush 2016); the student learns them with
  cross-entropy, optionally plus logit KD on the same text.
* ``on_policy`` lives in the trainer (``TrainPlan.on_policy``): it needs the student as it is
  at each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foundry_kernel._context import RunContext
from foundry_kernel._world import World
from foundry_kernel.atomic import atomic_write_text
from foundry_kernel.config import SequenceConfig
from foundry_kernel.data._blocks import IGNORE_INDEX, TokenBlocks
from foundry_kernel.errors import DataError
from foundry_kernel.teachers._interface import Teacher

log = logging.getLogger("foundry.modes")
SEQUENCE_FORMAT = 1
_ONE_PROCESS = World()


@dataclass(frozen=True)
class SequenceData:
    """Teacher-written training blocks plus what it cost to make them."""

    blocks: TokenBlocks
    path: Path
    seconds: float
    generated_tokens: int
    reused: bool


def sequence_key(config: SequenceConfig, teacher_id: str, data_fingerprint: str, seed: int) -> str:
    blob = json.dumps(
        {
            "format": SEQUENCE_FORMAT,
            "sequence": config.model_dump(),
            "teacher": teacher_id,
            "data": data_fingerprint,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pick_prompts(blocks: TokenBlocks, config: SequenceConfig, seed: int) -> list[list[int]]:
    """The first ``prompt_tokens`` of up to ``num_prompts`` training blocks, chosen by seed
    among blocks whose prompt is all real tokens."""
    n = config.prompt_tokens
    full = (blocks.attention_mask[:, :n].sum(-1) == n).nonzero().flatten()
    if len(full) == 0:
        raise DataError(
            f"no training block has {n} real tokens to use as a prompt; lower "
            "distill.sequence.prompt_tokens"
        )
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    chosen = full[order[: config.num_prompts]]
    return [blocks.input_ids[int(i), :n].tolist() for i in chosen]


def sequence_data(
    teacher: Teacher,
    train: TokenBlocks,
    config: SequenceConfig,
    *,
    folder: Path,
    key: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    ctx: RunContext,
    batch: int = 16,
    world: World = _ONE_PROCESS,
) -> SequenceData:
    """Teacher completions as training blocks (labels on the completion only), saved to
    ``folder`` (safetensors plus a readable JSONL) and reused when the key matches.

    Under a distributed ``world`` the prompt batches are split across ranks (contiguous
    shares, each batch keeping its own seed, so the completions equal one process's) and
    gathered, so every rank trains on the same blocks; only rank 0 reads or writes
    ``folder`` (other nodes need not see the run folder) and sends a reused set to the
    others.
    """
    tensors_path = folder / f"sequence-{key}.safetensors"
    reuse = world.broadcast_object(tensors_path.is_file() if world.is_main else None)
    if reuse:
        saved = load_file(tensors_path) if world.is_main else None
        saved = world.broadcast_object(saved)
        blocks = TokenBlocks(saved["input_ids"], saved["attention_mask"], saved["labels"])
        return SequenceData(
            blocks, tensors_path, 0.0, int((blocks.labels != IGNORE_INDEX).sum()), True
        )
    t0 = time.perf_counter()
    prompts = pick_prompts(train, config, seed)
    seq_len = train.seq_len
    new = min(config.max_new_tokens, seq_len - config.prompt_tokens)
    starts = list(range(0, len(prompts), batch))
    first, stop = world.shard(len(starts))
    mine: list[list[int]] = []
    share = sum(len(prompts[start : start + batch]) for start in starts[first:stop])
    for start in starts[first:stop]:
        ctx.check()
        mine += teacher.generate(
            prompts[start : start + batch],
            max_new_tokens=new,
            temperature=config.temperature,
            seed=seed + start,
        )
        ctx.advance(len(mine), share, "prompts")  # this rank's share: n/N in the progress
    completions = [row for share in world.all_gather_object(mine) for row in share]
    blocks = _to_blocks(prompts, completions, seq_len, _pad_id(tokenizer))
    if world.is_main:
        _save(folder, key, tensors_path, blocks, prompts, completions, new, tokenizer)
    seconds = time.perf_counter() - t0
    made = int((blocks.labels != IGNORE_INDEX).sum())
    log.info("teacher wrote %d completions (%d tokens) in %.1f s", len(prompts), made, seconds)
    return SequenceData(blocks, tensors_path, seconds, made, False)


def _save(
    folder: Path,
    key: str,
    tensors_path: Path,
    blocks: TokenBlocks,
    prompts: list[list[int]],
    completions: list[list[int]],
    new: int,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The readable JSONL, then the tensors (renamed into place last: their presence is
    what a later run reuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps({"prompt": tokenizer.decode(p), "completion": tokenizer.decode(c[:new])})
        for p, c in zip(prompts, completions, strict=True)
    ]
    atomic_write_text(folder / f"sequence-{key}.jsonl", "\n".join(rows) + "\n")
    tmp = tensors_path.with_suffix(".tmp")
    save_file(
        {
            "input_ids": blocks.input_ids,
            "attention_mask": blocks.attention_mask,
            "labels": blocks.labels,
        },
        tmp,
    )
    tmp.replace(tensors_path)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id or 0)


def _to_blocks(
    prompts: list[list[int]], completions: list[list[int]], seq_len: int, pad_id: int
) -> TokenBlocks:
    n = len(prompts)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        tokens = (prompt + completion)[:seq_len]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = torch.tensor(tokens[len(prompt) :])
    return TokenBlocks(ids, mask, labels)


def describe(data: SequenceData) -> dict[str, Any]:
    """What the run's summary says about the teacher-written data."""
    return {
        "blocks": len(data.blocks),
        "generated_tokens": data.generated_tokens,
        "seconds": round(data.seconds, 2),
        "reused": data.reused,
        "path": str(data.path),
    }
