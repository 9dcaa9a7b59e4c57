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

__all__ = [
    "PRESETS", "Preset", "PresetError", "build_model", "make_unetr",
    "CheckpointError", "fitting_presets", "load_checkpoint", "load_model", "read_spec", "read_state_dict", "save_model",
]
