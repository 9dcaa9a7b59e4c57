"""The engine composes adapters, models and data into the product's jobs (the CLI and the Slicer module call it)."""

from .info import list_methods, list_models, parameter_report

__all__ = ["list_methods", "list_models", "parameter_report"]
