"""Volumes, datasets, MONAI transforms and the demo cohort.

IO and dataset discovery import only numpy / nibabel / pynrrd; the MONAI pipelines (``train_transforms`` ...) and the
demo builder are imported on first use, so ``import TensorPEFTLib.data`` stays fast.
"""

from __future__ import annotations

from typing import Any

from .datasets import DataError, case_name, check_volume, find_cases, load_dataset_json, validate_cases
from .io import VOLUME_SUFFIXES, Volume, VolumeError, is_volume_file, read_volume, volume_format, write_volume
from .labels import LabelMap, LabelSpecError, parse_label_specs

_LAZY = {
    "LoadVolumed": "transforms", "train_transforms": "transforms", "val_transforms": "transforms",
    "inference_transforms": "transforms", "inverse_transforms": "transforms", "synthesis_transforms": "transforms",
    "build_demo_cohort": "demo", "DemoDataError": "demo", "SOURCES": "demo", "sources_markdown": "demo",
}

__all__ = [
    "DataError", "VOLUME_SUFFIXES", "Volume", "VolumeError", "case_name", "find_cases", "is_volume_file",
    "check_volume", "load_dataset_json", "read_volume", "validate_cases", "volume_format", "write_volume",
    "LabelMap", "LabelSpecError", "parse_label_specs", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
