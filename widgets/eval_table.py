"""The panel's evaluation table: one row per validation, growing as the run evaluates.

Like Hugging Face's notebook progress callback, but with what a distillation needs beside
the student's own numbers: the CE-only twin's perplexity at the same step (the twin trains
on the same batches after the distillation, so its cells fill in during the baseline
phase) and how much of the twin's gap to the teacher the student has closed so far.

:func:`eval_rows` is pure (metric dicts in, rows out) so it is tested without a kernel;
:func:`eval_table_html` renders the rows; the panel feeds both from the run's ``step``
events (metric names from :mod:`foundry_kernel.metrics`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from foundry_kernel.metrics import BASELINE

__all__ = ["NO_GAP", "NO_TEACHER", "EvalRow", "eval_rows", "eval_table_html"]

NO_GAP = "no gap"
"""The gap cell when the teacher is no better than the CE-only twin: nothing to close, so
a percentage would be noise (a tiny or negative denominator)."""
NO_TEACHER = "no teacher eval"
"""The gap cell before the teacher's held-out loss is known (it is measured in the final
evaluation) or where it cannot be compared (other tokenizers)."""
_MIN_GAP = 1e-9


@dataclass(frozen=True)
class EvalRow:
    """One evaluation of the distilled student, with the twin's at the same step."""

    step: int
    train_loss: float | None = None
    kd: float | None = None
    ce: float | None = None
    val_ppl: float | None = None
    agreement: float | None = None
    val_kl: float | None = None
    twin_ppl: float | None = None
    gap_closed: float | None = None
    gap_note: str = ""
    """Why ``gap_closed`` is None when it is: :data:`NO_GAP`, :data:`NO_TEACHER`, or ``""``
    (the twin has not evaluated this step yet)."""
    best: bool = False


def _number(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _gap(
    student: float | None, twin: float | None, teacher: float | None
) -> tuple[float | None, str]:
    """Share of the twin's held-out loss gap to the teacher that the student closed."""
    if twin is None or student is None:
        return None, ""
    if teacher is None:
        return None, NO_TEACHER
    gap = twin - teacher
    if gap < _MIN_GAP:
        return None, NO_GAP
    return (twin - student) / gap, ""


def eval_rows(
    points: Mapping[int, Mapping[str, float]], *, teacher_loss: float | None = None
) -> list[EvalRow]:
    """Rows, by step, for each step whose metrics hold the student's ``val/loss``.

    ``points`` maps a step to every metric recorded at it (the last training step's
    ``train/*`` and the evaluation's ``val/*``, the twin's under ``baseline/``);
    ``teacher_loss`` is the teacher's held-out loss on the same batches (None until it is
    measured). The best row is the lowest validation loss (the first of equals).
    """
    rows: list[EvalRow] = []
    losses: list[float | None] = []
    for step in sorted(points):
        m = points[step]
        loss = _number(m, "val/loss")
        if loss is None and _number(m, "val/ppl") is None:
            continue
        gap, note = _gap(loss, _number(m, f"{BASELINE}val/loss"), teacher_loss)
        rows.append(
            EvalRow(
                step=step,
                train_loss=_number(m, "train/loss"),
                kd=_number(m, "train/kd"),
                ce=_number(m, "train/ce"),
                val_ppl=_number(m, "val/ppl"),
                agreement=_number(m, "val/agreement"),
                val_kl=_number(m, "val/kl"),
                twin_ppl=_number(m, f"{BASELINE}val/ppl"),
                gap_closed=gap,
                gap_note=note,
            )
        )
        losses.append(loss)
    known = [(loss, i) for i, loss in enumerate(losses) if loss is not None]
    if known:
        best = min(known)[1]
        rows[best] = replace(rows[best], best=True)
    return rows


_COLUMNS = (
    ("step", "step"),
    ("train loss", "training loss (total) at the step"),
    ("KD", "training loss: imitating the teacher"),
    ("CE", "training loss: predicting the text"),
    ("val ppl", "held-out perplexity of the distilled student (lower is better)"),
    ("agreement", "held-out top-1 agreement with the teacher (higher is better)"),
    ("val KL", "held-out KL from the teacher (lower is better)"),
    ("CE-only ppl", "held-out perplexity of the CE-only twin at the same step"),
    ("gap closed", "share of the CE-only twin's gap to the teacher closed so far"),
)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cells(row: EvalRow) -> list[str]:
    gap = row.gap_note if row.gap_closed is None else f"{row.gap_closed:.0%}"
    step = f"{row.step} ★" if row.best else str(row.step)
    return [
        step,
        _fmt(row.train_loss, ".4g"),
        _fmt(row.kd, ".4g"),
        _fmt(row.ce, ".4g"),
        _fmt(row.val_ppl, ".2f"),
        _fmt(row.agreement, ".1%"),
        _fmt(row.val_kl, ".4g"),
        _fmt(row.twin_ppl, ".2f"),
        gap,
    ]


def eval_table_html(rows: list[EvalRow]) -> str:
    """The rows as an HTML table (classed ``foundry-evals``; the best row's step is
    starred and its ``<tr>`` has ``data-best``); empty before the first evaluation."""
    if not rows:
        return ""
    head = "".join(
        f'<th title="{html.escape(tip)}" style="padding:2px 8px;text-align:right">'
        f"{html.escape(name)}</th>"
        for name, tip in _COLUMNS
    )
    body = []
    for row in rows:
        attrs = ' data-best="1" style="font-weight:600;background:#f1f8e9"' if row.best else ""
        cells = "".join(
            f'<td style="padding:1px 8px;text-align:right">{html.escape(c)}</td>'
            for c in _cells(row)
        )
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (
        '<table class="foundry-evals" style="border-collapse:collapse;font-size:12px;'
        'font-variant-numeric:tabular-nums;margin:4px 0">'
        f'<thead style="border-bottom:1px solid #bbb"><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
