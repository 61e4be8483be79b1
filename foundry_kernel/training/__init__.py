"""Training: the student's optimisation and its measurement.

Modules (private): ``_trainer`` (the training loop, exact accumulation, checkpoints,
on-policy steps), ``_losses`` (the divergences, chunked and fused), ``_checkpoint``
(atomic, manifested checkpoints), ``_evaluate`` (held-out perplexity, agreement, KL,
samples), ``_precision`` (autocast rules), ``_sequence`` (sequence-level distillation).
"""
