"""Training throughput: tokens/s of one full distillation step, side by side.

A step is: teacher forward (no grad) + student forward/backward + gradient clipping (1.0)
+ AdamW step, on one batch, with the same loss everywhere: forward KL(teacher || student)
at temperature 1, mean over the batch's tokens. Same tiny Llama models (seeded, so every
contender starts from identical weights), same random-token data, same thread count, fp32.

Contenders:

``foundry``           ``Trainer.fit`` (``foundry_kernel.training``) as it ships: the default
                      ``loss.strategy=auto``, which for these Llama models is the fused-linear
                      loss on the final hidden states (no ``[batch, seq, vocab]`` logits of
                      student or teacher exist); attention mask passed, metrics callback,
                      events, ``ctx.check()``; a step ends at its metrics report.
``foundry_logits``    the same Trainer with ``loss_strategy="logits"``: the chunked loss over
                      the models' full logits (the default before the fused strategy).
``foundry_nomask``    the fused strategy wrapped in :class:`DropFullMask`, a
                      :class:`~foundry_kernel.training._strategy.LossStrategy` defined here that
                      does not pass the all-ones attention mask of packed blocks to the
                      models (tried through the Trainer's public strategy switch: nothing is
                      subclassed or overridden). The engine has since adopted it (pad-free
                      batches run without a mask, ``MicroBatch.pad_free``), so this row now
                      measures the same work as ``foundry``: their gap is the noise floor.
``trl_gkd``           ``trl.experimental.gkd.GKDTrainer`` (alias ``trl``) with ``lmbda=0``
                      (off-policy: no generation), ``beta=0`` (forward KL), ``seq_kd=False``,
                      no gradient checkpointing, fp32 (TRL's SFT defaults turn both on; they
                      are turned off here so the work is the same), a step ends at
                      ``on_step_end``.
``trl_distill``       ``trl.DistillationTrainer``, TRL's stable distillation trainer. In the
                      installed TRL 1.16.0 it is on-policy only: ``DistillationConfig`` has no
                      ``lmbda`` / on-policy fraction and no loss-chunking field (its loss is
                      ``ChunkedDivergenceFunction`` on hidden states + ``lm_head``, tiles of
                      4096 tokens x 32768 vocabulary entries), and every training step calls
                      ``model.generate`` on the prompts (the teacher server lives in
                      ``trl.experimental.server_distillation``). Its closest off-policy
                      setting, used here: each block's first token is the prompt and the other
                      ``seq - 1`` tokens are handed back as the "generated" completion: the
                      one sampling method (``_generate_single_turn``) returns the data's
                      continuation, and ``_generate_and_score_completions`` only notes the
                      batch's continuations before calling TRL's own. Everything else is TRL's
                      code as shipped: prompt tokenisation, padding and masks, both backbones
                      (``logits_to_keep``), the chunked divergence with ``beta=0`` (forward
                      KL), its entropy metric, the optimizer step. Loss positions: the same
                      ``seq - 1`` next-token predictions per block as every other contender.
                      The fields set (and why) are in :data:`TRL_DISTILL_ARGS`, and in the
                      JSON and the table.
``plain``             the nanoGPT-style minimum written out by hand: forward both (no
                      attention mask: the blocks are fully packed), log_softmax +
                      ``F.kl_div``, backward, clip, AdamW step.

Goals (issue 14, :func:`targets_of`): Foundry's step >= 1.5x the faster of the two TRL
trainers and >= 1.0x the hand-written loop, in tokens/s, each met only when the first-step
losses agree (relative gap <= ``LOSS_RTOL``) in fp32. The figures are CPU figures: on CUDA,
TRL's chunked divergence runs Triton kernels (only the valid rows projected), on CPU its
torch fallback projects every row in one 4096 x 32768 tile and recomputes both
projections in backward, which is why ``trl_distill`` is the slower TRL trainer here.

Every contender trains on the same batches in the same order: Foundry's ``BatchSampler``
order, which the plain loop draws too and the TRL contenders read sequentially from a
dataset laid out in that order, so the first-step losses can be compared to 1e-4.

Every contender runs in its own thread and the steps are interleaved one at a time in a
rotating order (:class:`Turns`): only one contender computes at any moment, and a burst of
load from elsewhere on the machine lands on neighbouring steps of all of them rather than
on one contender's whole run. Each contender starts from fresh models; its first
``warmup`` steps are dropped; the figure is the median of the remaining step times
(over ``rounds`` such rounds).

Memory: each ``foundry*`` contender also runs three steps alone in a fresh process
(``python -m bench.throughput --memory NAME``); the peak memory growth over steps 2-3,
from the end of step 1 on, is reported (RSS with ``VmHWM`` reset on CPU,
``max_memory_allocated`` on CUDA): one step's transients. Activations and gradients are
the same for every strategy; what differs is the loss's (the logits). glibc's malloc is
told to hand big blocks back at once (``MALLOC_MMAP_THRESHOLD_``), so RSS follows what
is live.
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from foundry_kernel._models import count_params

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from bench.common import (
    ModelShape,
    Printer,
    Target,
    build_llama,
    fmt_bytes,
    fmt_ratio,
    in_worker_thread,
    median,
    random_tokens,
    ratio,
    summary,
    table,
    verdict,
)

CONTENDERS = ("foundry", "foundry_logits", "foundry_nomask", "trl_gkd", "trl_distill", "plain")
TRL_CONTENDERS = ("trl_gkd", "trl_distill")
# older names, still accepted (``--step-contenders trl`` is GKD, as it was)
ALIASES = {"trl": "trl_gkd"}
# foundry contenders: the Trainer's loss strategy each trains with (see run_contender)
STRATEGIES = {"foundry": "auto", "foundry_logits": "logits", "foundry_nomask": "nomask"}
RESULT_MARK = "BENCH_RESULT "


@dataclass(frozen=True)
class StepConfig:
    teacher: ModelShape
    student: ModelShape
    batch: int
    warmup: int
    steps: int
    rounds: int
    lr: float = 1e-3
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.student.seq_len

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.to_dict(),
            "student": self.student.to_dict(),
            "batch": self.batch,
            "seq_len": self.student.seq_len,
            "tokens_per_step": self.tokens_per_step,
            "warmup_steps": self.warmup,
            "timed_steps_per_round": self.steps,
            "rounds": self.rounds,
            "lr": self.lr,
            "loss": "forward KL, temperature 1, mean over tokens",
            "dtype": "float32",
            "grad_clip": 1.0,
        }


VOCAB = 4096
SEQ = 128
FULL = StepConfig(
    teacher=ModelShape(hidden=256, layers=4, heads=4, intermediate=640, vocab=VOCAB, seq_len=SEQ),
    student=ModelShape(hidden=128, layers=3, heads=4, intermediate=256, vocab=VOCAB, seq_len=SEQ),
    batch=32,
    warmup=3,
    steps=20,
    rounds=1,
)
QUICK = StepConfig(
    teacher=ModelShape(hidden=32, layers=2, heads=2, intermediate=64, vocab=256, seq_len=16),
    student=ModelShape(hidden=16, layers=1, heads=2, intermediate=32, vocab=256, seq_len=16),
    batch=4,
    warmup=1,
    steps=3,
    rounds=1,
)


def config_for(quick: bool, **overrides: Any) -> StepConfig:
    base = QUICK if quick else FULL
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **given) if given else base


# --------------------------------------------------------------------------- shared data


@dataclass
class Workload:
    """Models and data: every contender gets its own deep copy of the same two models.

    The models are built once, on the calling thread (their initialisation draws from
    torch's global RNG, which contenders building concurrently on their threads - and
    TRL's ``set_seed`` - would otherwise interleave), and copied per contender.
    """

    cfg: StepConfig
    ids: torch.Tensor  # [n_blocks, seq]
    _teacher: PreTrainedModel
    _student: PreTrainedModel

    def teacher(self) -> PreTrainedModel:
        model = copy.deepcopy(self._teacher)
        model.eval().requires_grad_(False)
        return model

    def student(self) -> PreTrainedModel:
        return copy.deepcopy(self._student)


def make_workload(cfg: StepConfig) -> Workload:
    n_blocks = cfg.batch * (cfg.warmup + cfg.steps + 1)
    return Workload(
        cfg,
        random_tokens(n_blocks, cfg.student.seq_len, cfg.student.vocab, seed=cfg.seed),
        build_llama(cfg.teacher, seed=cfg.seed + 1),
        build_llama(cfg.student, seed=cfg.seed + 2),
    )


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class StepClock:
    """Times the steps of one contender; the loop calls ``begin()`` once, then ``tick()`` at
    the end of every step. Alone it only records; under a :class:`Turns` scheduler it also
    waits for the contender's turn, so only one contender computes at any moment."""

    def __init__(self, name: str, turns: Turns | None = None) -> None:
        self.name = name
        self.turns = turns
        self.durations: list[float] = []
        self.losses: list[float] = []
        self.info: dict[str, Any] = {}  # what the contender reports about itself
        self._t0 = 0.0

    def begin(self) -> None:
        if self.turns is not None:
            self.turns.wait_turn(self.name)
        self._t0 = time.perf_counter()

    def tick(self, loss: float | None = None) -> None:
        now = time.perf_counter()
        self.durations.append(now - self._t0)
        if loss is not None:
            self.losses.append(loss)
        if self.turns is not None:
            self.turns.step_done(self.name)
            self.turns.wait_turn(self.name)
        self._t0 = time.perf_counter()


class Turns:
    """Round-robin scheduler: each contender runs in its own thread and computes one step
    per turn while the others wait, in a rotating order. A burst of load from elsewhere on
    the machine therefore lands on neighbouring steps of *all* contenders, not on one
    contender's whole run, and the contenders never compete with each other."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._go = {n: threading.Event() for n in names}
        self._done = threading.Event()
        self.finished = False

    def wait_turn(self, name: str) -> None:
        if self.finished:
            return
        self._go[name].wait()
        self._go[name].clear()

    def step_done(self, name: str) -> None:
        self._done.set()

    def run(self, threads: dict[str, threading.Thread], steps: int, errors: dict[str, str]) -> None:
        for t in threads.values():
            t.start()
        for step in range(steps):
            k = step % len(self.names)
            for name in self.names[k:] + self.names[:k]:
                thread = threads[name]
                if name in errors or not thread.is_alive():
                    continue
                self._done.clear()
                self._go[name].set()
                while not self._done.wait(0.1):
                    if not thread.is_alive():  # it failed (or ended early): move on
                        break
        self.finished = True
        for ev in self._go.values():
            ev.set()
        for t in threads.values():
            t.join()


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class DropFullMask:
    """A loss strategy around another: an attention mask that is all ones (Foundry's packed
    blocks) is not passed to the models. It changes nothing in the result, but with a mask
    transformers hands SDPA an explicit ``[batch, 1, seq, seq]`` bias instead of using its
    causal kernel. An experiment on the micro-step, run through the Trainer's public
    ``loss_strategy`` switch."""

    inner: Any  # a LossStrategy

    @property
    def name(self) -> str:
        return f"{self.inner.name}+nomask"

    def __call__(self, setup: Any, batch: Any) -> Any:
        if bool(batch.attention_mask.all()):
            batch = replace(batch, attention_mask=None)  # the models take None for "no padding"
        return self.inner(setup, batch)


def strategy_for(name: str) -> Any:
    """What ``TrainPlan.loss_strategy`` gets for a contender: a name, or a strategy object."""
    if name == "nomask":
        from foundry_kernel.training._strategy import FusedLinearLoss

        return DropFullMask(FusedLinearLoss(project_teacher=True))
    return name


def foundry_trainer(
    w: Workload,
    *,
    strategy: str = "auto",
    on_metrics: Callable[[int, dict[str, float]], None],
    ctx: Any = None,
    max_steps: int | None = None,
    distill: bool = True,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> Any:
    """Our Trainer on the workload with loss strategy ``strategy`` (``auto``, ``fused``,
    ``logits`` or ``nomask``, see :func:`strategy_for`); ``distill=False``: the
    cross-entropy-only student step. ``amp_dtype`` (e.g. bf16 on a GPU) is the autocast
    dtype of student and teacher alike, as ``optim.precision`` resolves it in a run."""
    from foundry_kernel._context import RunContext
    from foundry_kernel.config import (
        CheckpointConfig,
        EvalConfig,
        LimitsConfig,
        LossConfig,
        OptimConfig,
    )
    from foundry_kernel.data._blocks import DataBundle, TokenBlocks
    from foundry_kernel.training._trainer import Trainer, TrainPlan

    cfg = w.cfg
    ones = torch.ones_like(w.ids)
    train = TokenBlocks(input_ids=w.ids, attention_mask=ones, labels=w.ids.clone())
    val = TokenBlocks(
        input_ids=w.ids[: cfg.batch], attention_mask=ones[: cfg.batch], labels=w.ids[: cfg.batch]
    )
    plan = TrainPlan(
        optim=OptimConfig(batch_size=cfg.batch, lr=cfg.lr, warmup_steps=1, max_grad_norm=1.0),
        limits=LimitsConfig(max_steps=max_steps or (cfg.warmup + cfg.steps)),
        eval=EvalConfig(every_steps=10**9, max_batches=1),
        checkpoint=CheckpointConfig(every_steps=None),
        loss=LossConfig(kind="forward_kl", temperature=1.0, ce_weight=0.0) if distill else None,
        loss_strategy=strategy_for(strategy),
        seed=cfg.seed,
        amp_dtype=amp_dtype,
        teacher_amp_dtype=amp_dtype,
    )
    return Trainer(
        _on(w.student(), device),
        DataBundle(train=train, val=val, report={}),
        plan,
        ctx=ctx if ctx is not None else RunContext(),
        on_metrics=on_metrics,
        teacher=_on(w.teacher(), device) if distill else None,
        vocab_size=cfg.student.vocab,
    )


def _on(model: torch.nn.Module, device: str) -> Any:
    """``model`` moved to ``device`` (``nn.Module.to``: transformers' typed wrapper of ``to``
    does not take a device string in mypy's eyes)."""
    return torch.nn.Module.to(model, torch.device(device))


def run_foundry(
    w: Workload,
    clock: StepClock,
    *,
    strategy: str = "auto",
    distill: bool = True,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> None:
    """Our loop; a step ends when its metrics are reported (the report is part of it).
    On CUDA the clock waits for the device first, so a step's time is its kernels' time,
    not the time to queue them."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None

    def sink(step: int, values: dict[str, float]) -> None:
        if "train/loss" in values:
            if sync is not None:
                sync()
            clock.tick(values["train/loss"])

    trainer = foundry_trainer(
        w, strategy=strategy, on_metrics=sink, distill=distill, device=device, amp_dtype=amp_dtype
    )
    clock.info["loss_strategy"] = trainer.loss_strategy.as_dict()
    clock.begin()
    trainer.fit()


def _tiny_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer with ``vocab`` entries (TRL's trainers insist on one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


# TrainingArguments fields both TRL contenders set, with why: the same optimizer, clipping,
# precision and schedule as ours, and nothing else running inside a step.
TRL_COMMON_ARGS: dict[str, tuple[Any, str]] = {
    "learning_rate": (FULL.lr, "the same lr as every contender (bench lr)"),
    "weight_decay": (0.1, "AdamW decay 0.1 on matrices, as ours"),
    "adam_beta2": (0.95, "AdamW betas (0.9, 0.95), as ours"),
    "max_grad_norm": (1.0, "clip at 1.0, as ours"),
    "lr_scheduler_type": ("constant", "no schedule work (it is negligible either way)"),
    "logging_steps": (1, "the loss reported every step, as ours"),
    "save_strategy": ("no", "no checkpoints inside the timed steps"),
    "eval_strategy": ("no", "no evaluation inside the timed steps"),
    "report_to": ("none", "no tracker"),
    "bf16": (False, "fp32, as every contender (TRL's configs default to bf16=True)"),
    "fp16": (False, "fp32"),
    "gradient_checkpointing": (False, "TRL defaults it on; off here so the work is the same"),
    "dataloader_num_workers": (0, "data loaded in the step's thread, as ours"),
    "dataloader_drop_last": (True, "full batches only"),
    "disable_tqdm": (True, "no progress bar"),
    "disable_dropout": (True, "the models have no dropout; said explicitly"),
}
# GKDTrainer (experimental): off-policy forward KL over the whole block.
TRL_GKD_ARGS: dict[str, tuple[Any, str]] = {
    "lmbda": (0.0, "off-policy: the student never generates"),
    "beta": (0.0, "generalized JSD with beta=0 is forward KL(teacher || student)"),
    "seq_kd": (False, "no teacher-generated sequences"),
    "temperature": (1.0, "temperature 1, as ours"),
    "train_sampling_strategy": ("sequential", "the dataset is laid out in Foundry's batch order"),
}
# DistillationTrainer (stable): no off-policy field exists; see run_trl_distill.
TRL_DISTILL_ARGS: dict[str, tuple[Any, str]] = {
    "beta": (0.0, "generalized JSD with beta=0 is forward KL (TRL's default 1.0 is reverse KL)"),
    "temperature": (1.0, "divides both models' logits; 1 = none, as ours"),
    "shuffle_dataset": (False, "the dataset is laid out in Foundry's batch order"),
    "max_completion_length": (
        SEQ - 1,
        "a block's seq-1 tokens after its 1-token prompt (generation itself is replaced by "
        "the data's continuation: TRL 1.16 has no off-policy setting)",
    ),
    "log_completions": (False, "no completion logging"),
    "use_vllm": (False, "no vLLM (generation is replaced)"),
}
TRL_DISTILL_OFF_POLICY = (
    "TRL 1.16.0's DistillationTrainer has no off-policy setting (no lmbda: every step "
    "generates); closest setting: prompt = a block's first token, completion = the block's "
    "other seq-1 tokens, returned by an override of _generate_single_turn instead of "
    "sampling (the data's continuation); the rest is TRL's code as shipped"
)


def batch_order(w: Workload) -> list[int]:
    """Block indices of every step's batch, one after another, in the order Foundry's Trainer
    draws them (its ``BatchSampler`` with the bench seed): the TRL contenders read a dataset
    laid out in this order sequentially, the plain loop draws it itself, so every contender
    sees the same batches and the first-step losses are comparable."""
    from foundry_kernel.data._blocks import BatchSampler

    cfg = w.cfg
    sampler = BatchSampler(w.ids.shape[0], cfg.batch, seed=cfg.seed)
    order: list[int] = []
    for _ in range(cfg.warmup + cfg.steps):
        order.extend(int(i) for i in sampler.next_indices())
    return order


def _trl_args(cfg: StepConfig, fields: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    values = {k: v for k, (v, _) in {**TRL_COMMON_ARGS, **fields}.items()}
    values["learning_rate"] = cfg.lr
    if "max_completion_length" in values:
        values["max_completion_length"] = cfg.student.seq_len - 1
    return {
        **values,
        "max_steps": cfg.warmup + cfg.steps,
        "per_device_train_batch_size": cfg.batch,
        "use_cpu": not torch.cuda.is_available(),
        "seed": cfg.seed,
    }


def trl_info(name: str, cfg: StepConfig) -> dict[str, Any]:
    """What a TRL contender was configured with, for the JSON and the table."""
    import importlib.metadata as md

    fields = TRL_GKD_ARGS if name == "trl_gkd" else TRL_DISTILL_ARGS
    trainer = "trl.experimental.gkd.GKDTrainer" if name == "trl_gkd" else "trl.DistillationTrainer"
    set_args = _trl_args(cfg, fields)
    why = {k: w for k, (_, w) in {**TRL_COMMON_ARGS, **fields}.items()}
    info: dict[str, Any] = {
        "trainer": trainer,
        "trl_version": md.version("trl"),
        "args": set_args,
        "why": why,
    }
    if name == "trl_distill":
        info["off_policy"] = TRL_DISTILL_OFF_POLICY
    return info


def _stamp(clock: StepClock) -> Any:
    """A ``TrainerCallback`` that ticks the clock at the end of every optimizer step."""
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.tick()

    return Stamp()


def _train_trl(trainer: Any, clock: StepClock) -> None:
    """Drop the callbacks that print, check the work is what the bench says, train, and
    record the per-step losses TRL logged."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    trainer.remove_callback(ProgressCallback)
    if getattr(trainer.model, "is_gradient_checkpointing", False):
        raise RuntimeError("TRL turned gradient checkpointing on; the bench wants it off")
    dtypes = {p.dtype for p in trainer.model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"TRL's student is not fp32: {sorted(map(str, dtypes))}")
    clock.begin()
    out = trainer.train()
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    clock.losses = [float(x) for x in history] or [float(out.training_loss)]


def run_trl_gkd(w: Workload, clock: StepClock, *, output_dir: str) -> None:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = w.cfg
    ids = w.ids[batch_order(w)]
    data = Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
        }
    )

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")
        }

    clock.info["trl"] = trl_info("trl_gkd", cfg)
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing: noise
        warnings.simplefilter("ignore")
        args = GKDConfig(
            output_dir=output_dir, max_length=cfg.student.seq_len, **_trl_args(cfg, TRL_GKD_ARGS)
        )
        trainer = GKDTrainer(
            model=w.student(),
            teacher_model=w.teacher(),
            args=args,
            data_collator=collate,
            train_dataset=data,
            processing_class=_tiny_tokenizer(cfg.student.vocab),
            callbacks=[_stamp(clock)],
        )
        _train_trl(trainer, clock)


def run_trl_distill(w: Workload, clock: StepClock, *, output_dir: str) -> None:
    """``trl.DistillationTrainer`` in its closest off-policy setting (see the module
    docstring): prompt = a block's first token (one word of the tiny tokenizer), completion =
    the block's other tokens, handed back by ``_generate_single_turn`` instead of sampled."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    cfg = w.cfg
    ids = w.ids[batch_order(w)].tolist()
    data = Dataset.from_dict(
        {"prompt": [f"t{row[0]}" for row in ids], "given": [row for row in ids]}
    )

    class GivenCompletions(DistillationTrainer):
        """Off-policy: the batch's completions are the data's, not sampled from the student."""

        _given: list[list[int]]

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> Any:
            self._given = [list(x["given"]) for x in inputs]
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(
            self, prompt_ids: list[list[int]], *args: Any, **kwargs: Any
        ) -> list[list[int]]:
            got = [list(p) for p in prompt_ids]
            want = [row[:1] for row in self._given]
            if got != want:  # the tokenizer must give back the block's own first token
                raise RuntimeError(f"prompt ids {got[:2]}... are not the blocks' {want[:2]}...")
            return [row[1:] for row in self._given]

    clock.info["trl"] = trl_info("trl_distill", cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DistillationConfig(output_dir=output_dir, **_trl_args(cfg, TRL_DISTILL_ARGS))
        trainer = GivenCompletions(
            model=w.student(),
            teacher_model=w.teacher(),
            args=args,
            train_dataset=data,
            processing_class=_tiny_tokenizer(cfg.student.vocab),
            callbacks=[_stamp(clock)],
        )
        _train_trl(trainer, clock)


def run_plain(w: Workload, clock: StepClock) -> None:
    """The hand-written loop: nothing but the work (blocks are fully packed, so, as in
    nanoGPT, no attention mask is passed: the models use SDPA's causal kernel)."""
    cfg = w.cfg
    teacher, student = w.teacher(), w.student()
    student.train()
    opt = torch.optim.AdamW(_decay_groups(student, 0.1), lr=cfg.lr, betas=(0.9, 0.95))
    order = torch.tensor(batch_order(w))  # the same batches, in the same order, as our Trainer's
    clock.begin()
    for step in range(cfg.warmup + cfg.steps):
        ids = w.ids[order[step * cfg.batch : (step + 1) * cfg.batch]]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        vocab = s_logits.shape[-1]
        loss = F.kl_div(
            F.log_softmax(s_logits[:, :-1].reshape(-1, vocab), dim=-1),
            F.log_softmax(t_logits[:, :-1].reshape(-1, vocab), dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(loss.item())


def import_trl(names: Sequence[str]) -> None:
    """Import what the TRL contenders need on the calling thread, before the contender
    threads start: TRL's lazy modules, imported by two threads at once, were seen to fail
    with ``ImportError: cannot import name 'DistillationConfig'`` in one of them."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if any(n in TRL_CONTENDERS for n in names):
        import datasets  # noqa: F401
        import transformers.trainer_callback  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "trl_gkd" in names:
            from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: F401
        if "trl_distill" in names:
            from trl import DistillationConfig, DistillationTrainer  # noqa: F401


TRL_RUNNERS: dict[str, Callable[..., None]] = {
    "trl_gkd": run_trl_gkd,
    "trl_distill": run_trl_distill,
}


def run_contender(name: str, w: Workload, clock: StepClock) -> None:
    if name in STRATEGIES:
        run_foundry(w, clock, strategy=STRATEGIES[name])
    elif name in TRL_RUNNERS:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            TRL_RUNNERS[name](w, clock, output_dir=tmp)
    elif name == "plain":
        run_plain(w, clock)
    else:
        raise ValueError(f"unknown throughput contender {name!r}")


# --------------------------------------------------------------------------- timing


def measure(
    cfg: StepConfig,
    contenders: Sequence[str],
    printer: Printer | None = None,
    w: Workload | None = None,
) -> dict[str, dict[str, Any]]:
    """Step times of every contender, their steps interleaved one by one (see :class:`Turns`),
    over ``cfg.rounds`` rounds of fresh models; warm-up steps of each round dropped."""
    w = w or make_workload(cfg)
    import_trl(contenders)
    n = cfg.warmup + cfg.steps
    timed: dict[str, list[float]] = {c: [] for c in contenders}
    first_loss: dict[str, float] = {}
    info: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for r in range(cfg.rounds):
        live = [c for c in contenders if c not in errors]
        k = r % max(len(live), 1)
        turns = Turns(live[k:] + live[:k])
        clocks = {c: StepClock(c, turns) for c in live}

        def body(name: str, clock: StepClock) -> None:
            try:
                run_contender(name, w, clock)
            except Exception as exc:  # noqa: BLE001 - a contender that fails is a result
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"

        threads = {
            c: threading.Thread(target=body, args=(c, clocks[c]), name=f"bench-{c}", daemon=True)
            for c in live
        }
        turns.run(threads, n, errors)
        for name in live:
            d = clocks[name].durations
            if name in errors:
                if printer:
                    printer(f"  round {r + 1}: {name} failed: {errors[name]}")
                continue
            if len(d) < n:
                errors[name] = f"recorded {len(d)} steps, expected {n}"
                continue
            timed[name].extend(d[cfg.warmup : n])
            if clocks[name].losses:
                first_loss.setdefault(name, clocks[name].losses[0])
            info.setdefault(name, clocks[name].info)
            if printer:
                ms = median(d[cfg.warmup : n]) * 1000
                printer(f"  round {r + 1}: {name:14s} median step {ms:8.1f} ms")
    out: dict[str, dict[str, Any]] = {}
    for name in contenders:
        if not timed[name]:
            out[name] = {"status": "error", "note": errors.get(name, "no steps recorded")}
            continue
        step = summary(timed[name])
        out[name] = {
            "status": "ok",
            "step_s": step,
            "tokens_per_s": cfg.tokens_per_step / step["median"],
            "first_loss": first_loss.get(name),
            **info.get(name, {}),
        }
    return out


# --------------------------------------------------------------------------- memory


def step_memory(
    name: str, cfg: StepConfig, *, steps: int = 3, device: str = "cpu"
) -> dict[str, Any]:
    """Peak memory growth of training steps 2..``steps`` of foundry contender ``name``, in
    this process: measured from the end of step 1 (so one-time lazy initialisation and the
    AdamW state are not counted) to the end of the last step's report (so the evaluation
    after the last step, which always uses logits, is not counted either). What remains is
    one step's transients: activations, logits (or their chunks), gradients."""
    from bench.common import CpuMeter, CudaMeter

    w = make_workload(cfg)
    meter: Any = CudaMeter(torch.device(device)) if device == "cuda" else CpuMeter()
    peak: dict[str, int] = {}

    def sink(step: int, values: dict[str, float]) -> None:
        if "train/loss" not in values:
            return
        if step == 1:
            meter.start()
        elif step == steps:
            peak["bytes"] = meter.peak()

    trainer = foundry_trainer(
        w, strategy=STRATEGIES[name], on_metrics=sink, max_steps=steps, device=device
    )
    t0 = time.perf_counter()
    trainer.fit()
    return {
        "status": "ok",
        "peak_bytes": peak["bytes"],
        "method": meter.method,
        "steps_measured": steps - 1,
        "seconds": round(time.perf_counter() - t0, 3),
        "loss_strategy": trainer.loss_strategy.as_dict(),
    }


def measure_memory(
    names: Sequence[str],
    *,
    quick: bool,
    threads: int | None = None,
    device: str = "cpu",
    printer: Printer | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`step_memory` of each foundry contender, each in a fresh child process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    out: dict[str, dict[str, Any]] = {}
    for name in (n for n in names if n in STRATEGIES):
        cmd = [sys.executable, "-m", "bench.throughput", "--memory", name, "--device", device]
        cmd += ["--quick"] if quick else []
        cmd += ["--threads", str(threads)] if threads else []
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired:
            out[name] = {"status": "timeout", "note": "ran past 900 s"}
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if lines:
            out[name] = json.loads(lines[-1][len(RESULT_MARK) :])
        else:
            note = f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            out[name] = {"status": "error", "note": note}
        if printer and out[name]["status"] == "ok":
            printer(f"  memory: {name:14s} peak {fmt_bytes(out[name]['peak_bytes'])}")
    return out


def _memory_main(argv: Sequence[str] | None = None) -> int:
    """Child side of :func:`measure_memory`: one contender, one JSON line on stdout."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.throughput")
    p.add_argument("--memory", required=True, choices=sorted(STRATEGIES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = in_worker_thread(step_memory, args.memory, config_for(args.quick), device=args.device)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- the benchmark


def resolve_contenders(contenders: Sequence[str] | None) -> tuple[str, ...]:
    """The contender names to run, aliases resolved (``trl`` -> ``trl_gkd``), duplicates
    dropped; an unknown name is refused with the known ones."""
    names: list[str] = []
    for raw in contenders or CONTENDERS:
        name = ALIASES.get(raw, raw)
        if name not in CONTENDERS:
            known = [*CONTENDERS, *ALIASES]
            raise ValueError(
                f"unknown throughput contender {raw!r} (--step-contenders); known: {known}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def faster_trl(results: dict[str, dict[str, Any]]) -> str | None:
    """The TRL contender with the higher tokens/s (the one the speed goal is against)."""
    ok = [n for n in TRL_CONTENDERS if results.get(n, {}).get("status") == "ok"]
    return max(ok, key=lambda n: results[n]["tokens_per_s"]) if ok else None


def first_loss_gaps(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Relative difference of each contender's first-step loss from ``foundry``'s: the same
    weights, batch and divergence give the same number (up to float summation order)."""
    ref = results.get("foundry", {}).get("first_loss")
    out: dict[str, float | None] = {}
    for name, r in results.items():
        loss = r.get("first_loss")
        out[name] = None if ref is None or loss is None else abs(loss - ref) / abs(ref)
    return out


def run(
    *,
    quick: bool = False,
    contenders: Sequence[str] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    memory: bool = True,
    printer: Printer = print,
) -> dict[str, Any]:
    cfg = config_for(quick, steps=steps, warmup=warmup, rounds=rounds)
    names = resolve_contenders(contenders)
    w = make_workload(cfg)
    params = {"teacher": count_params(w.teacher()), "student": count_params(w.student())}
    printer(
        f"throughput: teacher {params['teacher'] / 1e6:.2f}M, student "
        f"{params['student'] / 1e6:.2f}M params, {cfg.tokens_per_step} tokens/step, "
        f"{cfg.rounds} round(s) x ({cfg.warmup} warm-up + {cfg.steps} timed) steps"
    )
    results = measure(cfg, names, printer, w)
    threads = torch.get_num_threads()
    mem = measure_memory(names, quick=quick, threads=threads, printer=printer) if memory else {}
    tps = {n: r.get("tokens_per_s") for n, r in results.items()}
    peak = {n: m.get("peak_bytes") for n, m in mem.items()}
    fastest = faster_trl(results)
    trl_tps = tps.get(fastest) if fastest else None
    ratios = {
        "foundry_vs_trl": ratio(tps.get("foundry"), trl_tps),  # the faster TRL trainer
        "foundry_vs_trl_gkd": ratio(tps.get("foundry"), tps.get("trl_gkd")),
        "foundry_vs_trl_distill": ratio(tps.get("foundry"), tps.get("trl_distill")),
        "foundry_vs_plain": ratio(tps.get("foundry"), tps.get("plain")),
        "foundry_vs_foundry_logits": ratio(tps.get("foundry"), tps.get("foundry_logits")),
        "foundry_nomask_vs_foundry": ratio(tps.get("foundry_nomask"), tps.get("foundry")),
        "foundry_logits_vs_trl": ratio(tps.get("foundry_logits"), trl_tps),
        "memory_foundry_vs_foundry_logits": ratio(peak.get("foundry"), peak.get("foundry_logits")),
    }
    logits_bytes = cfg.tokens_per_step * cfg.student.vocab * 4
    section: dict[str, Any] = {
        "config": {
            **cfg.to_dict(),
            "quick": quick,
            "params": params,
            "threads": torch.get_num_threads(),
            "logits_bytes": logits_bytes,
            "loss_rtol": LOSS_RTOL,
        },
        "results": results,
        "memory": mem,
        "ratios": ratios,
        "faster_trl": fastest,
        "first_loss_gap_vs_foundry": first_loss_gaps(results),
    }
    section["targets"] = [t.as_json() for t in targets_of(section)]
    return section


# --------------------------------------------------------------------------- targets

GOAL_VS_TRL = 1.5  # issue 14: Foundry's step >= 1.5x the faster TRL trainer
GOAL_VS_PLAIN = 1.0  # issue 14: and >= 1.0x the hand-written loop
LOSS_RTOL = 1e-4  # "equal loss": first-step losses agree to this relative difference


def _speed_target(section: dict[str, Any], other: str | None, goal: str, need: float) -> Target:
    res = section["results"]
    gaps = section.get("first_loss_gap_vs_foundry", {})
    mine = res.get("foundry", {})
    theirs = res.get(other, {}) if other else {}
    if mine.get("status") != "ok" or theirs.get("status") != "ok":
        missing = [n for n, r in (("foundry", mine), (other, theirs)) if r.get("status") != "ok"]
        why = ", ".join(f"{n} did not run" if n else "no TRL contender ran" for n in missing)
        return Target("throughput", goal, f"not measured: {why}", None, 14)
    r = mine["tokens_per_s"] / theirs["tokens_per_s"]
    gap = gaps.get(other)
    same_loss = gap is not None and gap <= LOSS_RTOL
    figure = (
        f"{r:.2f}x: foundry {mine['tokens_per_s']:,.0f} tok/s vs {other} "
        f"{theirs['tokens_per_s']:,.0f} tok/s; first loss {mine['first_loss']:.6f} vs "
        f"{theirs['first_loss']:.6f} ({'equal' if same_loss else 'NOT equal'}, rel. gap "
        f"{'-' if gap is None else f'{gap:.1e}'}), fp32 both"
    )
    if other in TRL_CONTENDERS:
        others = [n for n in TRL_CONTENDERS if n != other and res.get(n, {}).get("status") == "ok"]
        figure += "".join(f"; {n} {res[n]['tokens_per_s']:,.0f} tok/s" for n in others)
    if section["config"].get("quick"):
        return Target("throughput", goal, f"--quick sizes, not a measurement: {figure}", None, 14)
    return Target("throughput", goal, figure, bool(r >= need and same_loss), 14)


def targets_of(section: dict[str, Any]) -> list[Target]:
    """Issue 14's two speed goals for the section :func:`run` returned. A goal is met only
    when the ratio is reached *and* the first-step losses agree (same batch, same forward
    KL, fp32): a faster step that computes something else does not count."""
    res = section["results"]
    other = faster_trl(res)
    return [
        _speed_target(
            section,
            other,
            f"Foundry's step >= {GOAL_VS_TRL}x the faster TRL trainer (GKDTrainer, "
            "DistillationTrainer), tokens/s at equal loss and fp32",
            GOAL_VS_TRL,
        ),
        _speed_target(
            section,
            "plain",
            f"Foundry's step >= {GOAL_VS_PLAIN}x the hand-written PyTorch loop, tokens/s at "
            "equal loss and fp32",
            GOAL_VS_PLAIN,
        ),
    ]


# --------------------------------------------------------------------------- output


def render(section: dict[str, Any]) -> str:
    res = section["results"]
    mem = section.get("memory", {})
    gaps = section.get("first_loss_gap_vs_foundry", {})
    tps = {n: r.get("tokens_per_s") for n, r in res.items()}
    fastest = section.get("faster_trl")
    rows = []
    for name, r in res.items():
        if r["status"] != "ok":
            note = r.get("note", "")[:60]
            rows.append([name, r["status"], "-", "-", "-", "-", "-", "-", "-", note])
            continue
        s = r["step_s"]
        m = mem.get(name, {})
        gap = gaps.get(name)
        rows.append(
            [
                name,
                r.get("loss_strategy", {}).get("strategy", "-"),
                f"{r['tokens_per_s']:,.0f}",
                f"{s['median'] * 1000:.1f} ms",
                f"{s['min'] * 1000:.0f}-{s['max'] * 1000:.0f} ms (n={s['n']})",
                fmt_ratio(ratio(tps[name], tps.get(fastest) if fastest else None)),
                fmt_ratio(ratio(tps[name], tps.get("plain"))),
                fmt_bytes(m.get("peak_bytes")) if m.get("status") == "ok" else "-",
                "-" if r.get("first_loss") is None else f"{r['first_loss']:.6f}",
                "-" if gap is None else f"{gap:.1e}",
            ]
        )
    ratios = section["ratios"]
    speed = fmt_ratio(ratios.get("foundry_vs_foundry_logits"))
    memory = fmt_ratio(ratios.get("memory_foundry_vs_foundry_logits"))
    logits = fmt_bytes(section["config"]["logits_bytes"])
    headers = ["contender", "strategy", "tokens/s", "median step", "range",
               f"vs {fastest or 'TRL'}", "vs plain", "peak memory", "first loss",
               "loss gap vs foundry"]  # fmt: skip
    lines = [
        table(headers, rows),
        f"fused (foundry) vs logits strategy: {speed} throughput, {memory} peak memory "
        f"(one [batch, seq, vocab] fp32 logits tensor: {logits})",
    ]
    for name in TRL_CONTENDERS:
        info = res.get(name, {}).get("trl")
        if info:
            args = ", ".join(
                f"{k}={info['args'][k]!r}"
                for k in (TRL_GKD_ARGS if name == "trl_gkd" else TRL_DISTILL_ARGS)
            )
            lines.append(f"{name}: {info['trainer']} (trl {info['trl_version']}): {args}")
            if info.get("off_policy"):
                lines.append(f"  {info['off_policy']}")
    lines.append(
        "  both TRL contenders: "
        + ", ".join(f"{k}={v!r}" for k, (v, _) in TRL_COMMON_ARGS.items() if k != "learning_rate")
    )
    for t in section["targets"]:
        lines.append(f"target: {t['goal']}: {verdict(t['met'])} ({t['figure']})")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit(_memory_main())
