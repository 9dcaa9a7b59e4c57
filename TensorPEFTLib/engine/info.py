"""Read-only questions users ask before training: which methods, which models, how many parameters."""

from __future__ import annotations

from typing import Any

from ..adapters import AdapterConfig, all_methods, inject
from ..models import PRESETS, build_model


def list_methods() -> list[dict[str, str]]:
    """Every registered method: name, layers it adapts, one-line summary, reference."""
    return [
        {"name": m.name, "layers": m.layer_kinds, "summary": m.summary, "reference": m.reference,
         "options": ", ".join(f"{k}={v}" for k, v in m.options.items())}
        for m in all_methods()
    ]


def list_models() -> list[dict[str, Any]]:
    """Every preset with its task, parameter count (counted on the meta device: no memory, no time) and patch."""
    import torch

    rows = []
    for preset in PRESETS.values():
        with torch.device("meta"):
            model = build_model(preset.name)
        rows.append({"name": preset.name, "task": preset.task, "parameters": sum(p.numel() for p in model.parameters()),
                     "patch": "x".join(map(str, preset.patch_size)), "description": preset.description})
    return rows


def parameter_report(model_name: str, cfg: AdapterConfig) -> dict[str, Any]:
    """Build a preset, inject ``cfg`` and count: total, trainable, adapter parameters and trainable %."""
    model = build_model(model_name)
    report = inject(model, cfg)
    return {"model": model_name, **report}
