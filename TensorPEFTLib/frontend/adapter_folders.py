"""Adapter folders as a GUI sees them: is this folder a finished adapter, what task is it for, save a copy.

File names, the format tag and the family → task map are read from their homes (``adapters.config``,
``models.presets``), both torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List

from ..adapters.config import ADAPTER_FILES, ADAPTER_FORMAT, CONFIG_FILE
from ..models.presets import TASK_OF_FAMILY
from .requests import RequestError

#: copied by "Save adapter" besides the adapter itself (the training record); checkpoints stay behind
ADAPTER_EXTRAS = ("history.json", "metrics.csv", "report.png")


def check_adapter_folder(folder: str) -> Dict[str, Any]:
    """The adapter_config.json of ``folder``, or RequestError saying what is missing."""
    if not folder or not os.path.isdir(folder):
        raise RequestError(f"{folder or '(none)'}: adapter folder not found; choose a folder written by fine-tuning "
                           f"(it holds {' and '.join(ADAPTER_FILES)})")
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing and os.path.isdir(os.path.join(folder, "checkpoint")):
        # the adapter is written when a run finishes; a cancelled one has its checkpoint (and best/) only
        best = os.path.join(folder, "best")
        raise RequestError(f"{folder}: this fine-tuning run has not finished; tick Resume and fine-tune again to "
                           "continue it" + (f", or choose {best} (the best adapter so far)" if os.path.isdir(best) else ""))
    if missing:
        raise RequestError(f"{folder}: not an adapter folder ({' and '.join(missing)} missing); choose a folder "
                           "written by fine-tuning")
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise RequestError(f"{folder}/{CONFIG_FILE} cannot be read ({err}); fine-tune again") from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise RequestError(f"{folder}/{CONFIG_FILE} is not a TensorPEFT adapter; choose another folder")
    return config


def adapter_task(config: Dict[str, Any]) -> str:
    """``segmentation`` or ``synthesis`` for a saved adapter config ('' when it does not say)."""
    return str(config.get("task") or TASK_OF_FAMILY.get(str(config.get("family")), ""))


def recorded_skull_strip(config: Dict[str, Any]) -> str:
    """The brain extraction mode an adapter was trained with (``auto`` for adapters from before it existed)."""
    return str((config.get("preprocessing") or {}).get("skull_strip") or config.get("skull_strip") or "auto")


def check_adapter_for(folder: str, task: str) -> str:
    """``folder`` when it holds a finished adapter for ``task``; RequestError naming the folder otherwise."""
    saved = adapter_task(check_adapter_folder(folder))
    if saved and saved != task:
        need = "UNETR" if task == "segmentation" else "DDPM"
        raise RequestError(f"{folder} holds a {saved} adapter; {task} needs a {need} adapter — fine-tune one or "
                           "load another folder")
    return folder


def holds_a_run(folder: str) -> bool:
    """A finished run (its adapter) or a cancelled one (only its checkpoint: the adapter is written at the end)."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) or os.path.isdir(os.path.join(folder, "checkpoint"))


def copy_adapter(source: str, target: str) -> List[str]:
    """Copy an adapter (and its training record, not the checkpoints) to ``target``; returns the files copied."""
    check_adapter_folder(source)
    if os.path.abspath(source) == os.path.abspath(target):
        raise RequestError(f"{target}: this is already the adapter folder; choose another folder to save a copy")
    os.makedirs(target, exist_ok=True)
    copied = []
    for name in ADAPTER_FILES + ADAPTER_EXTRAS:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(target, name))
            copied.append(name)
    return copied
