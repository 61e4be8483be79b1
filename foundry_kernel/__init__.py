"""Foundry's engine: distil a large teacher language model into a small student.

Start here::

    import foundry_kernel as fk
    handle = fk.start(fk.load_config(overrides=["limits.max_steps=100"]))
    handle.wait()
    handle.result["student"]["val_ppl"]

Nothing in this package imports a UI toolkit; the widgets and notebooks sit on top of it.
Names are imported lazily, so a read-only consumer (the dashboard kernel, ``foundry runs``)
importing ``foundry_kernel.store`` does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "foundry_kernel.errors",
    "FoundryError": "foundry_kernel.errors",
    "RunConfig": "foundry_kernel.config",
    "json_schema": "foundry_kernel.config",
    "load_config": "foundry_kernel.config",
    "Event": "foundry_kernel._context",
    "SAMPLE_INTERVAL_S": "foundry_kernel.run._control",
    "RunHandle": "foundry_kernel.run._control",
    "RunState": "foundry_kernel._run_state",
    "get": "foundry_kernel.run._control",
    "list_runs": "foundry_kernel.run._control",
    "run_sync": "foundry_kernel.run._control",
    "start": "foundry_kernel.run._control",
    "RunStore": "foundry_kernel.store",
    "LossOutput": "foundry_kernel.training._losses",
    "LossSetup": "foundry_kernel.training._strategy",
    "LossStrategy": "foundry_kernel.training._strategy",
    "MicroBatch": "foundry_kernel.training._strategy",
    "fused_eligibility": "foundry_kernel.training._strategy",
    "check_local_source": "foundry_kernel.data._sources",
    "runs_frame": "foundry_kernel.tables",
    "metrics_frame": "foundry_kernel.tables",
    "events_frame": "foundry_kernel.tables",
    "model_card": "foundry_kernel.card",
    "export_run": "foundry_kernel.card",
}

__all__ = [
    "SAMPLE_INTERVAL_S",
    "ConfigError",
    "Event",
    "FoundryError",
    "LossOutput",
    "LossSetup",
    "LossStrategy",
    "MicroBatch",
    "RunConfig",
    "RunHandle",
    "RunState",
    "RunStore",
    "check_local_source",
    "events_frame",
    "export_run",
    "fused_eligibility",
    "get",
    "json_schema",
    "list_runs",
    "load_config",
    "metrics_frame",
    "model_card",
    "run_sync",
    "runs_frame",
    "start",
]

if TYPE_CHECKING:
    from foundry_kernel._context import Event
    from foundry_kernel.card import export_run, model_card
    from foundry_kernel.config import RunConfig, json_schema, load_config
    from foundry_kernel.data._sources import check_local_source
    from foundry_kernel.errors import ConfigError, FoundryError
    from foundry_kernel.run._control import (
        SAMPLE_INTERVAL_S,
        RunHandle,
        RunState,
        get,
        list_runs,
        run_sync,
        start,
    )
    from foundry_kernel.store import RunStore
    from foundry_kernel.tables import events_frame, metrics_frame, runs_frame
    from foundry_kernel.training._losses import LossOutput
    from foundry_kernel.training._strategy import (
        LossSetup,
        LossStrategy,
        MicroBatch,
        fused_eligibility,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'foundry_kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
