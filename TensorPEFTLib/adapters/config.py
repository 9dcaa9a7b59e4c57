"""The adapter configuration: what a user chooses, validated before any layer is touched."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

#: an adapter folder's two files (torch-free here, so a GUI can check a folder without importing torch)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ADAPTER_FORMAT = "tensorpeft-adapter"  # the "format" key of adapter_config.json


class AdapterError(ValueError):
    """A user-facing adapter mistake (bad method, rank, targets, file...). The message says how to fix it."""


BIAS_MODES = ("none", "adapted", "all")


@dataclass
class AdapterConfig:
    """How to adapt a model.

    Args:
        method: registry name, e.g. ``"lora"``, ``"lora-pt"``, ``"tenvoo-l"`` (``tensorpeft methods`` lists them).
        rank: adapter rank (tubal rank for t-SVD methods, bond dimension for tensor networks).
        targets: regular expressions on module names selecting the layers to adapt. A pattern matches a module
            when it matches the whole name or is a dotted suffix of it (``"qkv"`` matches ``vit.blocks.0.attn.qkv``).
            ``None`` = the method's published choice for this kind of model. An entry ``"@name"`` is a named layer
            set: ``"@defaults"`` (that published choice) and, on a UNETR, ``"@decoder-upsamplers"`` (the decoder's
            ConvTranspose3d) or ``"@upsamplers"`` (all of its ConvTranspose3d); published choices never include
            transposed convolutions, so they are adapted only where a pattern or set names them. An adapted
            layer's own weight never trains, even where ``trainable`` matches it.
        trainable: regular expressions searched in parameter names; matching parameters train as well (e.g. the
            UNETR decoder). ``None`` = the method's published extras for this kind of model; ``[]`` = adapter only.
        alpha: scaling numerator for low-rank methods (scale = alpha / rank). ``None`` = rank (scale 1).
        dropout: dropout probability on the adapter path while training.
        bias: which biases train: ``"none"``, ``"adapted"`` (of adapted layers) or ``"all"``. ``None`` = the
            model family's default (``"adapted"`` for the DDPM as in TenVOO, ``"none"`` for UNETR as in LoRA-PT).
        seed: seed for the random parts of the initialisation, so the same config gives the same adapter.
        options: method-specific settings (see ``tensorpeft methods --verbose``).
    """

    method: str = "lora"
    rank: int = 4
    targets: list[str] | None = None
    trainable: list[str] | None = None
    alpha: float | None = None
    dropout: float = 0.0
    bias: str | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = str(self.method).strip().lower()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            try:
                as_int = int(self.rank)
            except (TypeError, ValueError):
                raise AdapterError(f"rank must be a whole number >= 1, got {self.rank!r}") from None
            if as_int != self.rank:
                raise AdapterError(f"rank must be a whole number >= 1, got {self.rank!r}")
            self.rank = as_int
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank} (use --rank 1 or more)")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.trainable, str):
            self.trainable = [self.trainable]
        if self.alpha is not None and not float(self.alpha) > 0:
            raise AdapterError(f"alpha must be > 0 (or left unset for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias is not None and self.bias not in BIAS_MODES:
            raise AdapterError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not isinstance(self.options, dict):
            raise AdapterError(f"options must be a mapping of name to value, got {type(self.options).__name__}")

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor on low-rank updates (1 when alpha is unset)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "AdapterConfig":
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object with adapter settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known settings are {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "AdapterConfig":
        """Read a config file: either a bare config or an adapter folder's ``adapter_config.json``."""
        data = read_json(path)
        if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        return cls.from_dict(data, source=str(path))


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file, turning every failure into a one-line AdapterError that names the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise AdapterError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: cannot be read ({err})") from None
