"""Foundry's exception hierarchy.

Every error a user can cause is a ``FoundryError`` whose message names the
field or thing at fault and what to do about it, so that the CLI, the widgets
and the run store can show it as-is instead of a traceback from deep inside
torch or transformers.
"""

from __future__ import annotations


class FoundryError(Exception):
    """Base class: a failure with a message written for the person running Foundry."""


class ConfigError(FoundryError, ValueError):
    """The configuration is invalid; ``field`` is the dotted path at fault (if known)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LossInputError(FoundryError, ValueError):
    """Tensors handed to a loss do not fit together (shapes, dtypes, label or id ranges,
    token counts): a caller's bug or a model/tokenizer mismatch, not a config value.
    ``argument`` names the loss function's argument at fault (``labels``, ``targets``...)."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


class DataError(FoundryError):
    """A data source could not be read, parsed or split."""


class ModelError(FoundryError):
    """A teacher or student could not be loaded, built or paired."""


class ResourceError(FoundryError):
    """Not enough memory or disk for what the run plans to do."""


class StoreError(FoundryError):
    """The run store refused an operation (unknown run, read-only mode, bad id)."""


class DivergenceError(FoundryError):
    """A loss or gradient became NaN or infinite."""

    def __init__(self, message: str, *, step: int, component: str) -> None:
        super().__init__(message)
        self.step = step
        self.component = component


class RunCancelled(FoundryError):
    """Raised inside a run's thread when its controller asked it to stop."""


class RunTimeout(FoundryError):
    """Raised inside a run's thread when its wall-clock budget is spent."""


class TeacherServerError(FoundryError):
    """A teacher server could not be started, reached, or answered with an error.

    ``url`` is the server at fault and ``status`` the HTTP status when one came back.
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class CacheError(FoundryError):
    """An offline logit cache is missing, incomplete, corrupt or was modified on disk."""


class StaleCacheError(CacheError):
    """A logit cache was captured for another teacher, tokenizer, data set or k.

    ``differences`` names the key parts that differ (e.g. ``["teacher", "k"]``).
    """

    def __init__(self, message: str, *, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences
