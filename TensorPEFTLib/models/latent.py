"""Latent diffusion models as MONAI's model-zoo bundles ship them: an ``AutoencoderKL`` and a ``DiffusionModelUNet``
that denoises its latents.

A bundle folder holds ``configs/inference.json`` (the two networks' constructor arguments under ``_target_`` keys
ending in ``AutoencoderKL`` / ``DiffusionModelUNet``, the scheduler, often the latent shape) and ``models/`` with the
autoencoder's weights (``autoencoder.pt`` or ``model_autoencoder.pt``: the config's ``load_autoencoder_path`` names
it) and the U-Net's (``model.pt``). Both weight files are read with ``torch.load(weights_only=True)`` (or
safetensors), in today's MONAI names or in those of MONAI GenerativeModels, which the older bundles use (converted
by MONAI's own ``load_old_state_dict``). Nothing in the config is executed: ``$`` expressions are never evaluated,
``@name`` references to plain values are followed.

:func:`load_latent_model` returns the **U-Net** with the autoencoder attached as :class:`LatentParts` in the
attribute ``tensorpeft_latent`` (a plain attribute, not a sub-module: the adapters, the optimiser and the adapter's
state dict see the U-Net alone, so every DDPM method adapts the diffusion U-Net and the autoencoder stays frozen).
Training encodes images with :meth:`LatentParts.encode`; sampling denoises latents and decodes them with
:meth:`LatentParts.decode`, as MONAI's ``LatentDiffusionInferer`` does (``z · scale_factor`` in, ``z / scale_factor``
out).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .checkpoints import CheckpointError, read_state_dict
from .presets import BUNDLE_CONFIG_NAMES

__all__ = ["LATENT_ATTR", "LatentParts", "latent_parts", "is_latent_bundle", "load_latent_model", "read_bundle_config",
           "latent_unet_hint"]

#: the attribute of a latent model's U-Net that holds its :class:`LatentParts`
LATENT_ATTR = "tensorpeft_latent"
#: MONAI GenerativeModels' constructor arguments that MONAI 1.4+ renamed
_RENAMED = {"num_channels": "channels", "use_checkpointing": "use_checkpoint"}


@dataclass
class LatentParts:
    """The frozen autoencoder of a latent diffusion model and how latents relate to images.

    Attributes:
        autoencoder: MONAI ``AutoencoderKL`` (frozen, eval mode).
        scale_factor: latents are multiplied by it before diffusion and divided by it before decoding (MONAI's
            ``LatentDiffusionInferer``); ``None`` until known (a bundle rarely records it: fine-tuning then sets it to
            1 / std of the training latents, as MONAI's tutorials and the bundles' training scripts compute it).
        downsample: image side / latent side (2 ** (number of the autoencoder's levels - 1)).
        latent_channels: channels of the latent space.
        latent_shape: the latent spatial shape the bundle samples at, if its config says.
        schedule: the bundle's noise schedule (``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``).
        source / autoencoder_path / unet_path: where the model came from (recorded with an adapter).
    """

    autoencoder: nn.Module
    scale_factor: float | None
    downsample: int
    latent_channels: int
    latent_shape: tuple[int, ...] | None = None
    schedule: dict[str, Any] | None = None
    source: str = ""
    autoencoder_path: str = ""
    unet_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def image_shape(self) -> tuple[int, ...] | None:
        """The image size the bundle samples at (latent shape × downsampling), if it records a latent shape."""
        return tuple(int(s) * self.downsample for s in self.latent_shape) if self.latent_shape else None

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Images ``(B, C_img, *spatial)`` → scaled latents ``(B, latent_channels, *spatial / downsample)``: a draw
        from the autoencoder's posterior N(mu, sigma²) (as ``encode_stage_2_inputs`` draws, here from ``generator``
        so a seed repeats the run) times ``scale_factor``. ``rows`` = (first, total): these images are rows
        first.. of a global batch of ``total`` split over data-parallel ranks; the noise of the whole global batch is
        drawn and these rows taken, so the ranks together draw what one process draws."""
        mu, sigma = self.autoencoder.encode(images)
        first, total = rows or (0, mu.shape[0])
        noise = torch.randn((total, *mu.shape[1:]), generator=generator, dtype=mu.dtype)[first:first + mu.shape[0]]
        noise = noise.to(mu.device)
        return (mu + sigma * noise) * float(self.scale_factor or 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (``decode_stage_2_outputs(z / scale_factor)``, as ``LatentDiffusionInferer``)."""
        return self.autoencoder.decode_stage_2_outputs(latents / float(self.scale_factor or 1.0))

    @torch.no_grad()
    def fit_scale_factor(self, images: torch.Tensor) -> float:
        """Set ``scale_factor`` to 1 / std of the posterior means of ``images`` (unit-variance latents, Rombach et
        al. 2022 §4.3.2) and return it."""
        mu, _ = self.autoencoder.encode(images)
        self.scale_factor = float(1.0 / mu.float().std().clamp_min(1e-8))
        return self.scale_factor

    def record(self) -> dict[str, Any]:
        """What an adapter records to rebuild the same latent model (JSON-able)."""
        return {"scale_factor": self.scale_factor, "downsample": self.downsample,
                "latent_channels": self.latent_channels,
                "latent_shape": list(self.latent_shape) if self.latent_shape else None,
                "bundle": self.source, "autoencoder": self.autoencoder_path, "unet": self.unet_path}


def latent_parts(model: nn.Module) -> LatentParts | None:
    """The :class:`LatentParts` of a latent model's U-Net, or None for any other model."""
    parts = getattr(model, LATENT_ATTR, None)
    return parts if isinstance(parts, LatentParts) else None


# ------------------------------------------------------------------------------------------------- bundle config


def _config_files(folder: Path) -> list[Path]:
    return [folder / "configs" / name for name in BUNDLE_CONFIG_NAMES if (folder / "configs" / name).is_file()]


def read_bundle_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The merged top-level entries of a bundle's ``configs/inference.json`` (first) and training configs.

    Raises :class:`CheckpointError` for a config that is not JSON (YAML bundles are not read).
    """
    folder = Path(folder)
    merged: dict[str, Any] = {}
    for path in reversed(_config_files(folder)):  # inference.json last, so it wins
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not a readable JSON bundle config ({err})") from None
        if isinstance(data, dict):
            merged.update(data)
    return merged


def _resolve(value: Any, config: Mapping[str, Any], depth: int = 0) -> Any:
    """Follow ``@name`` references to plain values; leave ``$`` expressions unevaluated (returned as None)."""
    if depth > 8:
        return None
    if isinstance(value, str):
        if value.startswith("@") and re.fullmatch(r"@[\w#]+", value):
            key = value[1:].split("#")[0]
            return _resolve(config.get(key), config, depth + 1) if key in config else None
        if value.startswith("$"):
            return None
        return value
    if isinstance(value, list):
        return [_resolve(v, config, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, config, depth + 1) for k, v in value.items()}
    return value


def _definition(config: Mapping[str, Any], suffix: str) -> tuple[str, dict[str, Any]] | None:
    """The first top-level ``{"_target_": "...<suffix>", ...}`` entry: its key and its resolved arguments."""
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("@") and isinstance(config.get(value[1:]), dict):
            continue  # an alias ("network_def": "@autoencoder_def"): the definition itself comes up under its name
        if isinstance(value, dict) and str(value.get("_target_", "")).split(".")[-1] == suffix:
            args = {k: v for k, v in value.items() if not k.startswith("_")}
            return key, _resolve(args, config)
    return None


def is_latent_bundle(path: str | os.PathLike) -> bool:
    """A folder whose bundle config defines an ``AutoencoderKL`` next to a ``DiffusionModelUNet``."""
    p = Path(path)
    if not p.is_dir() or not _config_files(p):
        return False
    try:
        config = read_bundle_config(p)
    except CheckpointError:
        return False
    return _definition(config, "AutoencoderKL") is not None and _definition(config, "DiffusionModelUNet") is not None


def _weights_path(folder: Path, config: Mapping[str, Any], keys: Sequence[str], defaults: Sequence[str]) -> Path:
    """The weights file a bundle names (``"load_autoencoder_path": "$@bundle_root + '/models/autoencoder.pt'"``: the
    quoted file name is read, the expression is not run), else the first default that exists, else the first."""
    for key in keys:
        text = config.get(key)
        if isinstance(text, str):
            match = re.search(r"models/([\w.\-]+)", text)
            if match:
                return folder / "models" / match.group(1)
    for name in defaults:
        if (folder / "models" / name).is_file():
            return folder / "models" / name
    return folder / "models" / defaults[0]


def _constructor_args(args: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        key = _RENAMED.get(key, key)
        if value is None:
            raise CheckpointError(f"{where}: argument {key!r} is an expression or a reference this loader does not "
                                  "evaluate; write its value into the config")
        out[key] = tuple(value) if isinstance(value, list) else value
    out["use_flash_attention"] = False  # same weights; flash attention needs CUDA
    return out


def _build(cls_name: str, args: dict[str, Any], where: str) -> nn.Module:
    from monai.networks import nets

    try:
        return getattr(nets, cls_name)(**args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build MONAI {cls_name} from the bundle config ({err})") from None


def _load_weights(model: nn.Module, path: Path, what: str) -> None:
    """Load ``path`` into ``model``: today's MONAI key names directly, MONAI GenerativeModels' through the model's
    own ``load_old_state_dict``."""
    from .checkpoints import _strip_prefixes

    state, _ = read_state_dict(path)
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    if set(state) == set(expected):
        mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
        if mismatched:
            k = mismatched[0]
            raise CheckpointError(f"{path}: the {what} weights do not fit the bundle config's {what} ({len(mismatched)} "
                                  f"tensors differ, e.g. {k} {list(state[k].shape)} vs {list(expected[k].shape)})")
        model.load_state_dict(state)
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints its progress
            model.load_old_state_dict(dict(state))
    except (KeyError, RuntimeError) as err:
        missing = [k for k in expected if k not in state][:3]
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: the {what} weights fit neither the bundle config's {what} nor its MONAI "
                              f"GenerativeModels names ({detail}; e.g. missing {', '.join(missing)})") from None


def _latent_channels_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """Latent channels of an AutoencoderKL state dict (the 1×1×1 ``quant_conv_mu``'s output channels)."""
    for key, value in state.items():
        if key.endswith("quant_conv_mu.conv.weight") or key.endswith("quant_conv_mu.weight"):
            return int(value.shape[0])
    return None


def load_latent_model(source: str | os.PathLike, autoencoder: str | os.PathLike | None = None) -> nn.Module:
    """The diffusion U-Net of the latent diffusion bundle ``source``, its frozen autoencoder attached
    (:func:`latent_parts`). ``autoencoder``: another autoencoder weights file than the bundle's.

    Raises :class:`CheckpointError` (one line naming the file) for a bundle without its autoencoder weights, an
    autoencoder whose latent channels differ from the U-Net's input channels, a conditional bundle, or weights that
    fit neither naming.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a latent diffusion model is given as its MONAI bundle folder "
                              "(configs/inference.json + models/), not a single file")
    config = read_bundle_config(folder)
    where = str(folder / "configs" / "inference.json")
    ae_def, unet_def = _definition(config, "AutoencoderKL"), _definition(config, "DiffusionModelUNet")
    if unet_def is None:
        raise CheckpointError(f"{where}: defines no DiffusionModelUNet (_target_ ...DiffusionModelUNet)")
    if ae_def is None:
        raise CheckpointError(f"{where}: defines a DiffusionModelUNet but no AutoencoderKL: a latent U-Net needs the "
                              "autoencoder that turns its latents into images (its autoencoder_def)")
    ae_args = _constructor_args(ae_def[1], f"{where} ({ae_def[0]})")
    unet_args = _constructor_args(unet_def[1], f"{where} ({unet_def[0]})")
    if unet_args.get("with_conditioning") or unet_args.get("num_class_embeds"):
        raise CheckpointError(f"{where}: a conditional latent diffusion model (with_conditioning / class embeddings): "
                              "only unconditional models are supported")
    ae_path = Path(autoencoder) if autoencoder else _weights_path(
        folder, config, ("load_autoencoder_path", "autoencoder_path"), ("autoencoder.pt", "model_autoencoder.pt",
                                                                         "autoencoder.safetensors"))
    unet_path = _weights_path(folder, config, ("load_diffusion_path", "load_path", "diffusion_path"),
                              ("model.pt", "model.safetensors", "diffusion.pt"))
    if not ae_path.is_file():
        flag = "the file given" if autoencoder else "the bundle's autoencoder weights"
        raise CheckpointError(f"{ae_path}: {flag} are missing: a latent diffusion model cannot make images without "
                              "its autoencoder; put it there (the bundle's large_files.yml says where to download it) "
                              "or give --autoencoder FILE")
    if not unet_path.is_file():
        raise CheckpointError(f"{unet_path}: the bundle's diffusion U-Net weights are missing")
    ae_state, _ = read_state_dict(ae_path)
    file_latent = _latent_channels_of(ae_state)
    latent = int(file_latent or ae_args.get("latent_channels", 3))
    unet_in = int(unet_args.get("in_channels", 1))
    if latent != unet_in or int(unet_args.get("out_channels", unet_in)) != unet_in:
        raise CheckpointError(f"{ae_path}: this autoencoder has {latent} latent channels but the diffusion U-Net of "
                              f"{folder} takes {unet_in} (in) / {unet_args.get('out_channels', unet_in)} (out): they "
                              "are not parts of one latent diffusion model")
    if file_latent and file_latent != int(ae_args.get("latent_channels", file_latent)):
        ae_args["latent_channels"] = file_latent
    unet = _build("DiffusionModelUNet", unet_args, where)
    ae = _build("AutoencoderKL", ae_args, where)
    _load_weights(unet, unet_path, "diffusion U-Net")
    _load_weights(ae, ae_path, "autoencoder")
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    scheduler = next((v for v in (config.get("noise_scheduler"), config.get("scheduler"))
                      if isinstance(v, dict) and str(v.get("_target_", "")).endswith("Scheduler")), None)
    schedule = None
    if scheduler:
        settings = _resolve({k: scheduler[k] for k in ("num_train_timesteps", "schedule", "beta_start", "beta_end")
                             if k in scheduler}, config)
        schedule = {k: v for k, v in settings.items() if v is not None} or None
    shape = _resolve(config.get("latent_shape"), config)
    latent_shape = tuple(int(s) for s in shape[1:]) if isinstance(shape, list) and len(shape) == 4 and all(
        isinstance(s, (int, float)) for s in shape) else None
    scale = config.get("scale_factor")
    levels = len(ae_args.get("channels", (32, 64, 64, 64)))
    parts = LatentParts(ae, float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None,
                        downsample=2 ** (levels - 1), latent_channels=latent, latent_shape=latent_shape,
                        schedule=schedule, source=str(folder.resolve()), autoencoder_path=str(ae_path.resolve()),
                        unet_path=str(unet_path.resolve()))
    setattr(unet, LATENT_ATTR, parts)
    return unet


def latent_unet_hint(state: Mapping[str, torch.Tensor]) -> str | None:
    """For a checkpoint that fits no preset: say so if it is a diffusion U-Net over several channels (a latent
    diffusion model's U-Net, useless without its autoencoder)."""
    conv_in = next((v for k, v in state.items() if k.endswith("conv_in.conv.weight")), None)
    if conv_in is None or not any("time_embed" in k for k in state) or conv_in.ndim != 5 or conv_in.shape[1] == 1:
        return None
    return (f"this is the U-Net of a latent diffusion model ({int(conv_in.shape[1])} latent channels in): it needs its "
            "autoencoder; give the MONAI bundle folder (configs/inference.json + models/ with both weights files) as "
            "--model, with --autoencoder FILE if the autoencoder's weights lie elsewhere")
