"""Training: the student's optimisation and its measurement.

Modules (private): ``_trainer`` (the training loop, exact accumulation, checkpoints,
on-policy steps), ``_losses`` (the divergences, chunked and fused), ``_checkpoint``
(atomic, manifested checkpoints), ``_evaluate`` (held-out perplexity, agreement, KL,
greedy samples), ``_samples`` (greedy and seeded sampled continuations, per checkpoint),
``_precision`` (autocast rules), ``_sequence`` (sequence-level distillation).
"""
