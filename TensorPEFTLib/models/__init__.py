"""Model presets and checkpoints."""

from .checkpoints import (
    CheckpointError,
    fitting_presets,
    load_checkpoint,
    load_model,
    read_spec,
    read_state_dict,
    save_model,
)
from .presets import PRESETS, Preset, PresetError, build_model, make_unetr
from .shipped import SHIPPED_MODELS, ShippedModelError, is_shipped, model_card, shipped_models, shipped_path

__all__ = [
    "PRESETS", "Preset", "PresetError", "build_model", "make_unetr",
    "SHIPPED_MODELS", "ShippedModelError", "is_shipped", "model_card", "shipped_models", "shipped_path",
    "CheckpointError", "fitting_presets", "load_checkpoint", "load_model", "read_spec", "read_state_dict", "save_model",
]
