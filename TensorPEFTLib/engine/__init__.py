"""The engine composes adapters, models and data into the product's jobs (the CLI and the Slicer module call it)."""

from .events import EVENT_KINDS, Events
from .info import list_methods, list_models, parameter_report
from .jobs import evaluate, finetune, resolve_model, segment, synthesize
from .runtime import EngineError, select_runtime
from .trainer import EXIT_CANCELLED, TrainResult, TrainSettings

__all__ = [
    "EVENT_KINDS", "EXIT_CANCELLED", "EngineError", "Events", "TrainResult", "TrainSettings", "evaluate", "finetune",
    "list_methods", "list_models", "parameter_report", "resolve_model", "segment", "select_runtime", "synthesize",
]
