"""Model presets and checkpoints."""

from .presets import PRESETS, Preset, PresetError, build_model, make_unetr

__all__ = ["PRESETS", "Preset", "PresetError", "build_model", "make_unetr"]
