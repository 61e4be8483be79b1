"""Foundry's engine: distil a large teacher language model into a small student.

Start here::

    import foundry_kernel as fk
    handle = fk.start(fk.load_config(overrides=["limits.max_steps=100"]))
    handle.wait()
    handle.result["student"]["val_ppl"]

Nothing in this package imports a UI toolkit; the widgets and notebooks sit on top of it.
"""

from foundry_kernel.config import RunConfig, json_schema, load_config
from foundry_kernel.control import RunHandle, RunState, get, list_runs, run_sync, start
from foundry_kernel.errors import ConfigError, FoundryError
from foundry_kernel.store import RunStore

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FoundryError",
    "RunConfig",
    "RunHandle",
    "RunState",
    "RunStore",
    "get",
    "json_schema",
    "list_runs",
    "load_config",
    "run_sync",
    "start",
]
