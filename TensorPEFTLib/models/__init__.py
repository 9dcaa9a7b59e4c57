"""Model presets and checkpoints.

Names load on first use (PEP 562): ``models.presets`` (the preset table) and ``models.shipped`` (the built-in
models) are torch-free, so a GUI reads preset sizes and shipped names before PyTorch is installed.
"""

from __future__ import annotations

from .._lazy import lazy_exports

from typing import TYPE_CHECKING

_HOME = {
    "CheckpointError": "checkpoints", "fitting_presets": "checkpoints", "load_checkpoint": "checkpoints",
    "load_model": "checkpoints", "read_spec": "checkpoints", "read_state_dict": "checkpoints",
    "save_model": "checkpoints",
    "PRESETS": "presets", "Preset": "presets", "PresetError": "presets", "TASK_OF_FAMILY": "presets",
    "build_model": "presets", "make_unetr": "presets",
    "SHIPPED_MODELS": "shipped", "ShippedModelError": "shipped", "is_shipped": "shipped", "model_card": "shipped",
    "shipped_models": "shipped", "shipped_path": "shipped",
    "LatentParts": "latent", "is_latent_bundle": "latent", "latent_parts": "latent", "load_latent_model": "latent",
}

__all__ = sorted(_HOME)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoints import (CheckpointError, fitting_presets, load_checkpoint, load_model, read_spec,
                              read_state_dict, save_model)
    from .presets import PRESETS, TASK_OF_FAMILY, Preset, PresetError, build_model, make_unetr
    from .latent import LatentParts, is_latent_bundle, latent_parts, load_latent_model
    from .shipped import SHIPPED_MODELS, ShippedModelError, is_shipped, model_card, shipped_models, shipped_path


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
