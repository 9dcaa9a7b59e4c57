"""TensorPEFT: parameter-efficient fine-tuning of 3D medical models (UNETR segmentation, 3D DDPM synthesis).

    import TensorPEFTLib as tp
    model = tp.build_model("unetr-small")
    report = tp.inject(model, tp.AdapterConfig(method="lora-pt", rank=1))

The public names are imported on first use (PEP 562), so torch-free parts — the front-end layer
``TensorPEFTLib.frontend``, ``TensorPEFTLib.data`` IO, the adapter catalog, the preset table — load without torch: the
3D Slicer module draws itself before PyTorch is even installed.
"""

from __future__ import annotations

from ._lazy import lazy_exports

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "AdapterConfig": "adapters", "AdapterError": "adapters", "count_parameters": "adapters", "inject": "adapters",
    "load_adapter": "adapters", "merge": "adapters", "method_names": "adapters", "save_adapter": "adapters",
    "unmerge": "adapters", "PRESETS": "models", "build_model": "models",
}

__all__ = [
    "AdapterConfig", "AdapterError", "PRESETS", "build_model", "count_parameters", "inject", "load_adapter",
    "merge", "method_names", "save_adapter", "unmerge", "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .adapters import (AdapterConfig, AdapterError, count_parameters, inject, load_adapter, merge, method_names,
                           save_adapter, unmerge)
    from .models import PRESETS, build_model


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())
