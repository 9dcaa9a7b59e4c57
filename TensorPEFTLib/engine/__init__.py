"""The engine composes adapters, models and data into the product's jobs (the CLI and the Slicer module call it).

Names load on first use (PEP 562): ``engine.events`` (the event kinds and exit codes a front-end reads) is
torch-free, and importing it must not build the whole engine.
"""

from __future__ import annotations

from .._lazy import lazy_exports

from typing import TYPE_CHECKING

_HOME = {
    "EVENT_KINDS": "events", "EXIT_CANCELLED": "events", "Events": "events",
    "disable_checkpointing": "checkpointing", "enable_checkpointing": "checkpointing",
    "list_methods": "info", "list_models": "info", "parameter_report": "info",
    "evaluate": "jobs", "finetune": "jobs", "resolve_model": "jobs", "segment": "jobs", "synthesize": "jobs",
    "EngineError": "runtime", "select_runtime": "runtime",
    "TrainResult": "trainer", "TrainSettings": "trainer",
}

__all__ = sorted(_HOME)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpointing import disable_checkpointing, enable_checkpointing
    from .events import EVENT_KINDS, EXIT_CANCELLED, Events
    from .info import list_methods, list_models, parameter_report
    from .jobs import evaluate, finetune, resolve_model, segment, synthesize
    from .runtime import EngineError, select_runtime
    from .trainer import TrainResult, TrainSettings


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
