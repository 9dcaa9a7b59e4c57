"""Parameter-efficient adapters for 3D medical models (pure torch; imports nothing else of TensorPEFTLib).

``inject`` wraps a model's target layers in place, ``merge``/``unmerge`` fold the updates in and out,
``save_adapter``/``load_adapter`` persist only what trained. Methods register themselves in the registry.
"""

from .base import AdapterGroup, AdapterLayer, GroupMemberLayer
from .config import AdapterConfig, AdapterError
from .model import (
    InjectionState,
    adapter_layers,
    architecture_fingerprint,
    count_parameters,
    describe_model,
    inject,
    is_merged,
    load_adapter,
    merge,
    read_adapter_config,
    save_adapter,
    summary,
    trainable_parameters,
    unmerge,
)
from .registry import FAMILIES, MethodSpec, all_methods, get_method, method_names, model_family, register

__all__ = [
    "AdapterConfig", "AdapterError", "AdapterGroup", "AdapterLayer", "GroupMemberLayer", "InjectionState",
    "MethodSpec", "FAMILIES", "adapter_layers", "all_methods", "architecture_fingerprint", "count_parameters",
    "describe_model", "get_method", "inject", "is_merged", "load_adapter", "merge", "method_names", "model_family",
    "read_adapter_config", "register", "save_adapter", "summary", "trainable_parameters", "unmerge",
]
