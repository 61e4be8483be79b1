"""The result of one run, typed: what every renderer of a run's outcome reads.

Why one type: the CLI's ``--json``, the model card, the panel's summary table and the
dashboard each used to rebuild their own untyped dict from the stored summary, with their
own guesses about missing or malformed fields. Now the job writes its results through
:class:`ModelResult`, the store keeps them as JSON, and every reader turns that JSON back
into a :class:`RunSummary` with :meth:`RunSummary.parse`, which never raises: a field that
is missing or of the wrong kind (an old run, a run that failed before evaluation, a
damaged store row) reads as ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ROLES",
    "TRAINING_PHASES",
    "ModelResult",
    "RunSummary",
    "SampleStep",
    "TeacherCheck",
    "Verdict",
    "sample_history_key",
]

#: The three models a run measures, in the order every table shows them.
ROLES: tuple[str, ...] = ("teacher", "student", "baseline")
#: The training phases that keep samples per validation (:func:`sample_history_key`).
TRAINING_PHASES: tuple[str, ...] = ("distill", "baseline")


def sample_history_key(phase: str) -> str:
    """Where the summary keeps a training phase's samples per validation (the job writes
    it, :meth:`RunSummary.sample_history` reads it): ``distill_sample_history``."""
    return f"{phase}_sample_history"


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


@dataclass(frozen=True)
class ModelResult:
    """One model's held-out numbers (the teacher has no agreement or KL with itself)."""

    params: int | None
    val_ppl: float | None
    val_loss: float | None
    tokens_per_s: float | None = None
    agreement: float | None = None
    val_kl: float | None = None
    backend: str | None = None  # the teacher's: "hf", "vllm", "cache"
    # Parameters that trained, when fewer than ``params`` (a LoRA student's adapters);
    # None: every parameter trained (or an older run).
    trainable_params: int | None = None
    # Held-out bits per byte of text: the figure comparable across tokenizers (a per-token
    # loss is not, when teacher and student tokenize differently: loss.cross_tokenizer).
    val_bpb: float | None = None

    _ALWAYS = ("params", "val_ppl", "val_loss")

    @classmethod
    def parse(cls, raw: Any) -> ModelResult | None:
        part = _mapping(raw)
        if part is None:
            return None
        return cls(
            params=_count(part.get("params")),
            val_ppl=_number(part.get("val_ppl")),
            val_loss=_number(part.get("val_loss")),
            tokens_per_s=_number(part.get("tokens_per_s")),
            agreement=_number(part.get("agreement")),
            val_kl=_number(part.get("val_kl")),
            backend=_text(part.get("backend")),
            trainable_params=_count(part.get("trainable_params")),
            val_bpb=_number(part.get("val_bpb")),
        )

    def to_dict(self) -> dict[str, Any]:
        """As stored and as ``--json`` prints it: unmeasured optional fields left out."""
        out: dict[str, Any] = {}
        names = ("params", "trainable_params", "val_ppl", "val_loss", "val_bpb", "agreement")
        for name in (*names, "val_kl", "tokens_per_s"):
            value = getattr(self, name)
            if value is not None or name in self._ALWAYS:
                out[name] = value
        if self.backend is not None:
            out["backend"] = self.backend
        return out


#: How a teacher compares with a model of the student's size trained the same way, and
#: with chance (perplexity = vocabulary size): ``clear`` (clearly better: worth distilling),
#: ``marginal`` (barely better), ``no_better``, ``near_chance`` (it has learned almost
#: nothing), ``unknown`` (not measured: a teacher Foundry did not build).
TeacherStanding = Literal["clear", "marginal", "no_better", "near_chance", "unknown"]

#: A teacher whose held-out perplexity is above this share of the reference's is only
#: "marginally" better: its soft targets carry little the student cannot learn alone.
MARGINAL_RATIO = 0.85
#: A perplexity above this share of the vocabulary size counts as near chance.
CHANCE_RATIO = 0.5


@dataclass(frozen=True)
class TeacherCheck:
    """Is the teacher worth distilling? Measured before distillation starts.

    ``reference_ppl`` is the held-out perplexity of a model of the student's size trained
    with the teacher's own recipe on the teacher's own data (Foundry-built teachers), and
    ``chance_ppl`` the perplexity of guessing uniformly (the vocabulary size).
    """

    standing: TeacherStanding
    teacher_ppl: float | None
    reference_ppl: float | None = None
    reference_params: int | None = None
    chance_ppl: float | None = None
    message: str = ""

    @classmethod
    def judge(
        cls,
        teacher_ppl: float | None,
        reference_ppl: float | None,
        chance_ppl: float | None,
        *,
        reference_params: int | None = None,
    ) -> TeacherCheck:
        """The standing and its plain-language message, from the three perplexities."""
        standing: TeacherStanding = "unknown"
        message = "the teacher was not compared with a student-sized model"
        if teacher_ppl is not None and chance_ppl and teacher_ppl > CHANCE_RATIO * chance_ppl:
            standing = "near_chance"
            message = (
                f"the teacher is barely better than chance (held-out perplexity "
                f"{teacher_ppl:.1f}, chance {chance_ppl:.0f}): it has learned almost nothing; "
                "train it longer (teacher.build.steps) or on more text (teacher.build.data)"
            )
        elif teacher_ppl is not None and reference_ppl is not None:
            ratio = teacher_ppl / reference_ppl
            if ratio >= 1.0:
                standing = "no_better"
                message = (
                    f"the teacher is no better than a student-sized model trained the same way "
                    f"(held-out perplexity {teacher_ppl:.1f} vs {reference_ppl:.1f}): "
                    "distillation is unlikely to help; " + _TEACHER_ADVICE
                )
            elif ratio > MARGINAL_RATIO:
                standing = "marginal"
                message = (
                    f"the teacher is only slightly better than a student-sized model trained "
                    f"the same way (held-out perplexity {teacher_ppl:.1f} vs "
                    f"{reference_ppl:.1f}): distillation may not help; " + _TEACHER_ADVICE
                )
            else:
                standing = "clear"
                message = (
                    f"the teacher is clearly better than a student-sized model trained the "
                    f"same way (held-out perplexity {teacher_ppl:.1f} vs {reference_ppl:.1f})"
                )
        return cls(standing, teacher_ppl, reference_ppl, reference_params, chance_ppl, message)

    @classmethod
    def parse(cls, raw: Any) -> TeacherCheck | None:
        part = _mapping(raw)
        if part is None:
            return None
        standing = part.get("standing")
        if standing not in ("clear", "marginal", "no_better", "near_chance", "unknown"):
            return None
        return cls(
            standing=standing,
            teacher_ppl=_number(part.get("teacher_ppl")),
            reference_ppl=_number(part.get("reference_ppl")),
            reference_params=_count(part.get("reference_params")),
            chance_ppl=_number(part.get("chance_ppl")),
            message=_text(part.get("message")) or "",
        )

    @property
    def worth_distilling(self) -> bool | None:
        """False when the teacher is known to offer little; None when not measured."""
        if self.standing == "unknown":
            return None
        return self.standing == "clear"

    def to_dict(self) -> dict[str, Any]:
        return {
            "standing": self.standing,
            "teacher_ppl": self.teacher_ppl,
            "reference_ppl": self.reference_ppl,
            "reference_params": self.reference_params,
            "chance_ppl": self.chance_ppl,
            "message": self.message,
        }


_TEACHER_ADVICE = (
    "give the teacher more text (teacher.build.data) or more steps (teacher.build.steps), "
    "use a larger teacher, or a smaller student"
)

#: Distillation "helped" when the distilled student's held-out perplexity is at least this
#: much lower than its CE-only twin's; within it either way the two are "about the same".
HELPED_MARGIN = 0.01


@dataclass(frozen=True)
class Verdict:
    """Did distillation help this run? One plain-language sentence, never a bare number.

    ``helped`` is True (the distilled student beats its CE-only twin by more than
    ``HELPED_MARGIN`` in held-out perplexity), False (it does not), or None (not measured:
    no CE-only twin). ``level`` is what a renderer shows it as: ``good``, ``warning`` or
    ``info``. ``advice`` lists what would help, each naming the setting to change.
    """

    helped: bool | None
    level: Literal["good", "warning", "info"]
    headline: str
    advice: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The headline followed by the advice, as one paragraph."""
        if not self.advice:
            return self.headline
        return f"{self.headline} Try: {'; '.join(self.advice)}."


@dataclass(frozen=True)
class SampleStep:
    """One prompt's continuations at one validation step of a training phase: greedy and
    seeded sampled (``eval.checkpoint_samples``), so the samples show the student learn."""

    step: int
    prompt: str
    greedy: str
    sampled: str

    @classmethod
    def parse(cls, raw: Any) -> SampleStep | None:
        """None for anything that is not a readable row (never raises)."""
        row = _mapping(raw)
        step = None if row is None else _count(row.get("step"))
        if row is None or step is None:
            return None
        texts = [row.get(k) for k in ("prompt", "greedy", "sampled")]
        prompt, greedy, sampled = (t if isinstance(t, str) else "" for t in texts)
        return cls(step=step, prompt=prompt, greedy=greedy, sampled=sampled)


@dataclass(frozen=True)
class RunSummary:
    """A run's outcome: the three models, how they compare, samples, and where things are.

    ``raw`` keeps the stored mapping whole, for the parts only one reader needs (the data
    report, the preflight estimate, the runtime).
    """

    teacher: ModelResult | None = None
    student: ModelResult | None = None
    baseline: ModelResult | None = None
    gap_closed: float | None = None
    samples: tuple[Mapping[str, str], ...] = ()
    export_dir: str | None = None
    data: Mapping[str, Any] | None = None
    logit_cache: Mapping[str, Any] | None = None
    sequence: Mapping[str, Any] | None = None
    world_size: int | None = None  # processes that trained it (None: not recorded, older runs)
    strategy: str | None = None  # "ddp", "fsdp2", or "single" for one process
    teacher_check: TeacherCheck | None = None  # measured before distilling (built teachers)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any) -> RunSummary:
        summary = _mapping(raw) or {}
        world = _mapping(summary.get("distributed")) or {}
        samples = summary.get("samples")
        rows: list[Mapping[str, str]] = []
        if isinstance(samples, list):
            for row in samples:
                if isinstance(row, Mapping):
                    rows.append({str(k): str(v) for k, v in row.items() if v is not None})
        return cls(
            teacher=ModelResult.parse(summary.get("teacher")),
            student=ModelResult.parse(summary.get("student")),
            baseline=ModelResult.parse(summary.get("baseline")),
            gap_closed=_number(summary.get("gap_closed")),
            samples=tuple(rows),
            export_dir=_text(summary.get("export_dir")),
            data=_mapping(summary.get("data")),
            logit_cache=_mapping(summary.get("logit_cache")),
            sequence=_mapping(summary.get("sequence")),
            world_size=_count(world.get("world_size")),
            strategy=_text(world.get("strategy")),
            teacher_check=TeacherCheck.parse(summary.get("teacher_check")),
            raw=summary,
        )

    def sample_history(self, phase: str = "distill") -> tuple[SampleStep, ...]:
        """The phase's samples at each validation, by step (empty for runs before they
        were kept, or with ``eval.checkpoint_samples`` 0)."""
        if phase not in TRAINING_PHASES:
            raise KeyError(f"no phase {phase!r}; phases: {', '.join(TRAINING_PHASES)}")
        raw = self.raw.get(sample_history_key(phase))
        rows = [SampleStep.parse(row) for row in raw] if isinstance(raw, list) else []
        return tuple(sorted((r for r in rows if r is not None), key=lambda r: r.step))

    @property
    def sample_settings(self) -> Mapping[str, Any] | None:
        """How the sampled continuations were drawn (temperature, top_p, max_new_tokens,
        seed); None for runs before they were kept."""
        return _mapping(self.raw.get("sample_settings"))

    def role(self, name: str) -> ModelResult | None:
        """``"teacher"``, ``"student"`` or ``"baseline"``."""
        if name not in ROLES:
            raise KeyError(f"no role {name!r}; roles: {', '.join(ROLES)}")
        result: ModelResult | None = getattr(self, name)
        return result

    @property
    def agreement(self) -> float | None:
        """The distilled student's top-1 agreement with the teacher."""
        return self.student.agreement if self.student else _number(self.raw.get("agreement"))

    @property
    def val_kl(self) -> float | None:
        return self.student.val_kl if self.student else _number(self.raw.get("val_kl"))

    @property
    def verdict(self) -> Verdict | None:
        """Did distillation help, in words (summary, panel, dashboard, model card all show
        this); None while the distilled student has no held-out result."""
        s, b, t = self.student, self.baseline, self.teacher
        if s is None or s.val_ppl is None:
            return None
        if b is None or b.val_ppl is None:
            return Verdict(
                None,
                "info",
                f"The distilled student reaches held-out perplexity {s.val_ppl:.1f}; "
                "no CE-only twin was trained (eval.baseline=false), so the benefit of "
                "distillation was not measured.",
            )
        lower = 1.0 - s.val_ppl / b.val_ppl
        gap = ""
        if self.gap_closed is not None:
            gap = f"; it closed {self.gap_closed:.0%} of the gap to the teacher"
        if lower > HELPED_MARGIN:
            return Verdict(
                True,
                "good",
                f"Distillation helped: {lower:.0%} lower held-out perplexity than the same "
                f"student trained alone ({s.val_ppl:.1f} vs {b.val_ppl:.1f}){gap}.",
            )
        if lower >= -HELPED_MARGIN:
            how = "about the same as"
        else:
            how = f"{-lower:.0%} higher than"
        reason, advice = self._why_not(t, b)
        return Verdict(
            False,
            "warning",
            f"Distillation did not help here: the distilled student's held-out perplexity is "
            f"{how} the same student trained alone ({s.val_ppl:.1f} vs {b.val_ppl:.1f})"
            f"{reason}.",
            advice,
        )

    def _why_not(
        self, teacher: ModelResult | None, baseline: ModelResult
    ) -> tuple[str, tuple[str, ...]]:
        """The likeliest reason distillation did not help, and what to try."""
        check = self.teacher_check
        t_ppl = teacher.val_ppl if teacher is not None else None
        if check is not None and check.standing == "near_chance":
            return (
                f"; the teacher is barely better than chance ({check.teacher_ppl:.1f} vs "
                f"{check.chance_ppl:.0f})",
                (
                    "train the teacher longer (teacher.build.steps)",
                    "give it more text (teacher.build.data)",
                ),
            )
        b_ppl = baseline.val_ppl
        if t_ppl is not None and b_ppl is not None and t_ppl > MARGINAL_RATIO * b_ppl:
            how = "no better than" if t_ppl >= b_ppl else "barely better than"
            return (
                f"; the teacher is {how} the student trained alone ({t_ppl:.1f} vs {b_ppl:.1f})",
                (
                    "more text for the teacher (teacher.build.data)",
                    "more teacher steps (teacher.build.steps) or a larger teacher",
                    "a smaller student (student.hidden_size, student.num_layers)",
                ),
            )
        return (
            "",
            (
                "more CE in the loss (loss.ce_weight closer to 1)",
                "a lower temperature (loss.temperature)",
                "more student steps (limits.max_steps)",
            ),
        )

    def to_json(self, *, run_id: str, state: str, duration_s: float | None) -> dict[str, Any]:
        """The documented ``foundry distill --json`` object (README, "Command line")."""
        out: dict[str, Any] = {"run_id": run_id, "state": str(state), "duration_s": duration_s}
        for name in ROLES:
            result = self.role(name)
            out[name] = None if result is None else result.to_dict()
        out.update(
            agreement=self.agreement,
            val_kl=self.val_kl,
            gap_closed=self.gap_closed,
            export_dir=self.export_dir,
            data=None if self.data is None else dict(self.data),
            samples=[dict(row) for row in self.samples]
            if isinstance(self.raw.get("samples"), list)
            else None,
            logit_cache=None if self.logit_cache is None else dict(self.logit_cache),
            sequence=None if self.sequence is None else dict(self.sequence),
            world_size=self.world_size,
            strategy=self.strategy,
        )
        return out
