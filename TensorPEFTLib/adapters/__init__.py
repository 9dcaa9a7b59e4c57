"""Parameter-efficient adapters for 3D medical models (pure torch; imports nothing else of TensorPEFTLib).

``inject`` wraps a model's target layers in place, ``merge``/``unmerge`` fold the updates in and out,
``save_adapter``/``load_adapter`` persist only what trained. Methods register themselves in the registry.

The names below load on first use (PEP 562): ``adapters.catalog`` and ``adapters.config`` are torch-free, so a GUI
reads the method list and an adapter folder's file names without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "AdapterGroup": "base", "AdapterLayer": "base", "GroupMemberLayer": "base", "recompute_context": "base",
    "AdapterConfig": "config", "AdapterError": "config",
    "InjectionState": "model", "adapter_layers": "model", "architecture_fingerprint": "model",
    "count_parameters": "model", "describe_model": "model", "inject": "model", "is_merged": "model",
    "load_adapter": "model", "merge": "model", "merge_and_unload": "model", "read_adapter_config": "model",
    "save_adapter": "model",
    "summary": "model", "trainable_parameters": "model", "unmerge": "model",
    "FAMILIES": "registry", "MethodSpec": "registry", "model_family": "registry", "register": "registry",
    "all_methods": "methods", "get_method": "methods", "method_names": "methods",
}

__all__ = sorted(_HOME)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .base import AdapterGroup, AdapterLayer, GroupMemberLayer, recompute_context
    from .config import AdapterConfig, AdapterError
    from .methods import all_methods, get_method, method_names
    from .model import (InjectionState, adapter_layers, architecture_fingerprint, count_parameters, describe_model,
                        inject, is_merged, load_adapter, merge, merge_and_unload, read_adapter_config, save_adapter,
                        summary, trainable_parameters, unmerge)
    from .registry import FAMILIES, MethodSpec, model_family, register


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
