"""Foundry's benchmark suite: ``python -m bench [loss|throughput|overheads|mfu|all]``.

Every figure is measured side by side with its baselines in one run and reported as a
ratio against them; results go to a table on stdout and to one JSON file.

* :mod:`bench.loss_memory` - peak memory and time of the loss alone (ours, plain PyTorch,
  TRL, Liger), each contender in a fresh process.
* :mod:`bench.throughput` - tokens/s of a full distillation step (our Trainer, TRL's
  GKDTrainer off-policy and DistillationTrainer in its closest off-policy setting, a
  hand-written loop).
* :mod:`bench.overheads` - the in-kernel run controller against calling the loop directly.
* :mod:`bench.mfu` - achieved FLOP/s against this machine's measured matmul peak.

Importing this package is cheap (no torch): the loss benchmark's child processes import
only what their contender needs.
"""

BENCHMARKS = ("loss", "throughput", "overheads", "mfu")

__all__ = ["BENCHMARKS"]
