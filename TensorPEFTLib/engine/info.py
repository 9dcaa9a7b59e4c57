"""Read-only questions users ask before training: which methods, which models, how many parameters."""

from __future__ import annotations

import os
from typing import Any

from ..adapters import AdapterConfig, all_methods, inject
from ..models import PRESETS, build_model, is_shipped, model_card, shipped_models


def list_methods() -> list[dict[str, str]]:
    """Every registered method: name, layers it adapts, one-line summary, reference, and its default learning
    rate on a UNETR (``lr_unetr``) and a DDPM (``lr_ddpm``: pixel or latent diffusion U-Net)."""
    from ..adapters.catalog import default_lr

    return [
        {"name": m.name, "layers": m.layer_kinds, "summary": m.summary, "reference": m.reference,
         "options": ", ".join(f"{k}={v}" for k, v in m.options.items()),
         "lr_unetr": default_lr(m.name, "unetr"), "lr_ddpm": default_lr(m.name, "ddpm")}
        for m in all_methods()
    ]


def _preset_of(name: str) -> tuple[str, dict[str, Any]]:
    """A preset name as is; a shipped model's name resolves to the preset (and overrides) on its model card."""
    if name in PRESETS or not is_shipped(name):
        return name, {}  # an unknown name gets build_model's error, which lists the presets
    card = model_card(name)
    return card["preset"], dict(card.get("overrides") or {})


def _count(name: str) -> int:
    import torch

    preset, overrides = _preset_of(name)
    with torch.device("meta"):  # counted on the meta device: no memory, no time
        model = build_model(preset, **overrides)
    return sum(p.numel() for p in model.parameters())


def _spacing_text(preprocessing: dict[str, Any] | None) -> str:
    """``1.5 mm RAS`` (a model's working grid; ``2.5 mm RAS, MNI152 space`` for a generative model pre-trained in a
    reference brain's space) or ``-`` when it records none."""
    spacing = (preprocessing or {}).get("spacing")
    if not spacing:
        return "-"
    text = f"{spacing[0]:g}" if len(set(spacing)) == 1 else "x".join(f"{s:g}" for s in spacing)
    reference = (preprocessing or {}).get("reference")  # a generative model's space: fine-tuning registers to it
    return f"{text} mm {(preprocessing or {}).get('orientation', 'RAS')}" + (f", {reference.upper()} space" if reference else "")


def list_models() -> list[dict[str, Any]]:
    """Every preset (random weights) and every shipped pretrained model, with task, parameter count and patch."""
    rows = [{"name": preset.name, "task": preset.task, "parameters": _count(preset.name),
             "patch": "x".join(map(str, preset.patch_size)), "spacing": "-", "description": preset.description,
             "pretrained": False}
            for preset in PRESETS.values()]
    for shipped in shipped_models():
        preset = PRESETS[shipped["preset"]]
        rows.append({"name": shipped["name"], "task": preset.task, "parameters": _count(shipped["name"]),
                     "patch": "x".join(map(str, preset.patch_size)), "pretrained": True,
                     "spacing": _spacing_text(shipped.get("preprocessing") or shipped.get("synthesis_grid")),
                     "description": f"pretrained {preset.name}, shipped ({shipped['megabytes']} MB): {shipped['description']}"})
    return rows


def parameter_report(model_name: str, cfg: AdapterConfig) -> dict[str, Any]:
    """Build the model, inject ``cfg`` and count: total, trainable, adapter parameters and trainable %.

    ``model_name``: a preset, a shipped model (built from its card's preset: counts do not depend on weights), a
    checkpoint file (loaded, so a user's own architecture is counted as it is) or a latent diffusion bundle folder
    (its diffusion U-Net is counted: the frozen autoencoder is no part of the model an adapter trains)."""
    if os.path.exists(model_name):
        from .jobs import resolve_model

        model = resolve_model(model_name)
    else:
        preset, overrides = _preset_of(model_name)
        model = build_model(preset, **overrides)
    report = inject(model, cfg)
    return {"model": model_name, **report}
