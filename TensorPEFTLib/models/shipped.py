"""Pretrained demo models shipped inside the package (``TensorPEFTLib/models/weights/``).

Each model is an fp16 safetensors file written by ``tensorpeft pretrain --recipe NAME`` (so it carries its own spec)
plus a model card ``NAME.json`` with the recipe, data, steps, seed, final metrics and the file's SHA-256. The name
(``demo-unetr``, ``demo-ldm``) works wherever a checkpoint path does; the hash is checked before the first load in a
process, so a truncated or altered file is refused instead of giving silently wrong masks.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_MODELS = ("demo-unetr", "demo-ldm")


class ShippedModelError(ValueError):
    """A shipped model is missing or does not match its model card."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_shipped(name: str) -> bool:
    return str(name) in SHIPPED_MODELS


def model_card(name: str) -> dict[str, Any]:
    """The card of a shipped model (recipe, data, steps, seed, metrics, sha256)."""
    card = WEIGHTS_DIR / f"{name}.json"
    if not is_shipped(name):
        raise ShippedModelError(f"{name}: no shipped model of that name (shipped: {', '.join(SHIPPED_MODELS)})")
    if not card.is_file():
        raise ShippedModelError(f"{card}: the model card of {name} is missing; reinstall tensorpeft or rebuild it with "
                                f"`tensorpeft pretrain --recipe {name} --out DIR --ship`")
    return json.loads(card.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def shipped_path(name: str) -> Path:
    """The weights file of a shipped model after checking its SHA-256 against the card."""
    card = model_card(name)
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ShippedModelError(f"{path}: the shipped weights of {name} are missing; reinstall tensorpeft or rebuild "
                                f"them with `tensorpeft pretrain --recipe {name} --out DIR --ship`")
    actual = file_sha256(path)
    if actual != card["sha256"]:
        raise ShippedModelError(f"{path}: SHA-256 {actual[:12]}… does not match its model card ({card['sha256'][:12]}…); "
                                f"the file is damaged or was replaced: reinstall tensorpeft or rebuild it with "
                                f"`tensorpeft pretrain --recipe {name} --out DIR --ship`")
    return path


def shipped_models() -> list[dict[str, Any]]:
    """Name, preset, size and card summary of every shipped model present in this installation."""
    rows = []
    for name in SHIPPED_MODELS:
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not (WEIGHTS_DIR / f"{name}.json").is_file() or not path.is_file():
            continue
        card = model_card(name)
        rows.append({"name": name, "preset": card.get("preset"), "megabytes": round(path.stat().st_size / 1e6, 2),
                     "steps": card.get("recipe", {}).get("steps"), "description": card.get("description", ""),
                     "final_metrics": card.get("final_metrics", {}), "preprocessing": card.get("preprocessing"),
                     "synthesis_grid": card.get("synthesis_grid")})
    return rows
