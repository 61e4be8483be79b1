"""What concurrent runs in one process must not share: torch's global RNG and thread count.

Runs are threads of one process (see ``run._control``), and torch keeps two settings
per *process* that a run would naturally touch:

**The global random generator.** ``torch.manual_seed``/``get_rng_state`` act on one
generator for the whole process, so a run that seeds it, draws from it or restores it from
a checkpoint changes what every other run draws. Foundry's rule: a run never *relies* on
the global generator's state.

- Sampling (on-policy rollouts, teacher-written sequences) draws from a per-call
  ``torch.Generator`` seeded from ``(run seed, step, micro-batch)``: no global state at all.
- The batch order and the on-policy choice are pure functions of ``(seed, epoch/step)``
  (``random.Random`` instances, never the ``random`` module's global one).
- Weight initialisation (``_models.seeded_init``) cannot be given a generator:
  transformers' ``_init_weights`` draws from the global one. It runs under
  :data:`GLOBAL_RNG_LOCK` inside :func:`seeded_global_rng`: the generator is forked,
  seeded, used and restored while no other Foundry code touches it. ``from_pretrained``
  (which initialises any weight a checkpoint lacks) holds the lock too.
- Dropout inside a model also draws from the global generator (``nn.Dropout``,
  ``F.dropout`` inside attention, SDPA's ``dropout_p``: none accepts a generator). A model
  with any dropout active (:func:`uses_dropout`) trains each micro-step inside
  :func:`seeded_global_rng`, seeded from ``(seed, phase, step, micro-batch)``: exactly
  reproducible and resumable without saving any RNG state, at the price that such steps
  of concurrent runs take turns (the lock is held for the forward and backward pass).
  Runs without dropout - every student and teacher Foundry builds itself, whose configs
  have zero dropout - never take the lock and train fully in parallel. What this cannot
  protect against is code outside Foundry drawing from the global generator at the same
  moment in another thread.
- Checkpoints therefore hold no RNG state: the trajectory after a resume is a function of
  the seed and the step alone.

**The intra-op thread count.** ``torch.set_num_threads`` with torch's OpenMP backend (the
CPU wheels' default) sets the calling thread's OpenMP team size *and* a process-wide
default that threads created later pick up on their first parallel operation. So "the last
run's setting wins" only for threads that had not yet done any parallel work.
:func:`run_threads` makes the setting per run: on the run's worker it first initialises the
thread's own setting, then sets the run's ``threads`` (or the process default it
inherited), then puts the process-wide default back to what it was, from a short-lived
helper thread. Other runs, the notebook's own thread and later threads keep theirs.
With another parallel backend (native thread pool) the setting is truly process-wide;
there a run whose ``threads`` differs from a live run's is refused with a ConfigError
naming the field, instead of silently changing the other run.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from foundry_kernel.errors import ConfigError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

GLOBAL_RNG_LOCK = threading.RLock()
"""Held by every Foundry use of torch's process-global generator (see the module doc)."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, phase, step, ...): stable across processes
    and Python versions (``hash()`` is salted per process, so it is not used)."""
    text = "\0".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(b"foundry-seed\0" + text).digest()[:8], "little") >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator on ``device``, seeded: what sampling draws from."""
    import torch

    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rng(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Use torch's global generator seeded with ``seed``, with no other Foundry code using it
    meanwhile, and give it back as it was (CPU, and the CUDA ``devices`` listed)."""
    import torch

    cuda = [d for d in devices if d.type == "cuda"]
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


_DROPOUT_ATTRS = ("dropout", "pdrop", "dropout_rate", "dropout_prob", "drop_rate")


def uses_dropout(model: torch.nn.Module) -> bool:
    """Whether training ``model`` draws from the global generator through dropout: a
    dropout module with p > 0, or a config field such as ``attention_dropout`` /
    ``resid_pdrop`` > 0 (used functionally inside attention, invisible as a module)."""
    import torch

    dropouts = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.Dropout3d,
        torch.nn.AlphaDropout,
        torch.nn.FeatureAlphaDropout,
    )
    for module in model.modules():
        if isinstance(module, dropouts) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    values: dict[str, Any] = to_dict() if callable(to_dict) else {}
    return any(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        for key, value in values.items()
        if any(key.endswith(attr) for attr in _DROPOUT_ATTRS)
    )


# --------------------------------------------------------------------------- threads

_THREADS_LOCK = threading.Lock()
_LIVE_SETTINGS: dict[int, int] = {}  # run worker's thread id -> its count (process-wide mode)


def per_thread_setting() -> bool:
    """True when ``torch.set_num_threads`` acts per thread (torch's OpenMP backend)."""
    import torch

    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _on_fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new, short-lived thread and return its result."""
    box: list[Any] = []
    helper = threading.Thread(target=lambda: box.append(fn()), name="foundry-threads-helper")
    helper.start()
    helper.join()
    if not box:
        raise RuntimeError("could not read torch's thread setting on a helper thread")
    return box[0]


@contextlib.contextmanager
def run_threads(threads: int | None, *, per_thread: bool | None = None) -> Iterator[int]:
    """Give the calling thread (a run's worker) ``threads`` intra-op threads, or the
    process's setting when None, for the ``with`` block; yields the count in effect.

    ``per_thread`` (default: :func:`per_thread_setting`) picks the mechanism described in
    the module doc; without it a conflicting live setting raises ConfigError.
    """
    import torch

    per_thread = per_thread_setting() if per_thread is None else per_thread
    me = threading.get_ident()
    with _THREADS_LOCK:
        inherited = _on_fresh_thread(torch.get_num_threads)  # the process-wide default
        wanted = threads or inherited
        if not per_thread:
            _refuse_conflict(wanted, threads)
            _LIVE_SETTINGS[me] = wanted
        torch.get_num_threads()  # this thread's own setting is initialised now, not later
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
            if per_thread and wanted != inherited:
                _on_fresh_thread(lambda: torch.set_num_threads(inherited))
    try:
        yield torch.get_num_threads()
    finally:
        if not per_thread:
            with _THREADS_LOCK:
                _LIVE_SETTINGS.pop(me, None)


def _refuse_conflict(wanted: int, asked: int | None) -> None:
    others = {n for ident, n in _LIVE_SETTINGS.items() if ident != threading.get_ident()}
    if others and others != {wanted}:
        raise ConfigError(
            f"threads={asked}: another run in this process uses {sorted(others)} CPU "
            f"thread(s), and this torch build's thread setting is process-wide (its parallel "
            "backend is not OpenMP), so both cannot hold. Set threads to the same value for "
            "runs that share a process, or run them in separate processes.",
            field="threads",
        )


__all__ = [
    "GLOBAL_RNG_LOCK",
    "derive_seed",
    "generator",
    "per_thread_setting",
    "run_threads",
    "seeded_global_rng",
    "uses_dropout",
]
