"""TensorPEFT: parameter-efficient fine-tuning of 3D medical models (UNETR segmentation, 3D DDPM synthesis).

    import TensorPEFTLib as tp
    model = tp.build_model("unetr-small")
    report = tp.inject(model, tp.AdapterConfig(method="lora-pt", rank=1))
"""

from .adapters import (
    AdapterConfig,
    AdapterError,
    count_parameters,
    inject,
    load_adapter,
    merge,
    method_names,
    save_adapter,
    unmerge,
)
from .models import PRESETS, build_model

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterError", "PRESETS", "build_model", "count_parameters", "inject", "load_adapter",
    "merge", "method_names", "save_adapter", "unmerge", "__version__",
]
