"""Tiny latent diffusion bundles in MONAI model-zoo layouts (random weights, built in about a second).

Two layouts, as the model zoo has them:
- ``monai``: today's names: ``monai.networks.nets.AutoencoderKL`` / ``DiffusionModelUNet`` with ``channels``,
  ``models/autoencoder.pt`` + ``models/model.pt`` (brain_image_synthesis_latent_diffusion_model's file names);
- ``generative``: MONAI GenerativeModels' era (brats_mri_generative_diffusion 0.x): ``generative.networks.nets...``
  targets with ``num_channels``, ``@latent_channels`` references, ``$`` expressions for the weight paths,
  ``models/model_autoencoder.pt``, and the weights under the old key names (attention ``to_q`` without ``attn.``,
  ``proj_attn``, upsampling ``conv`` instead of ``postconv``).
"""

from __future__ import annotations

import json
import os

import torch

LATENT_CHANNELS = 3
AE_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS, channels=[8, 16],
               num_res_blocks=1, norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False],
               with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=True)
UNET_ARGS = dict(spatial_dims=3, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, channels=[8, 16],
                 attention_levels=[False, True], num_head_channels=[0, 8], num_res_blocks=1, norm_num_groups=4)
#: latents 8³ → images 16³ (the autoencoder halves once); the U-Net halves once more: image sides multiples of 4
LATENT_SHAPE = [LATENT_CHANNELS, 8, 8, 8]
SCHEDULER = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}


def build_networks(seed: int = 0, latent_channels: int = LATENT_CHANNELS):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    torch.manual_seed(seed)
    ae = AutoencoderKL(**{**AE_ARGS, "latent_channels": latent_channels})
    unet = DiffusionModelUNet(**UNET_ARGS)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # MONAI zero-initialises some U-Net convs; a trained model has no such zeros
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return ae.eval(), unet.eval()


def to_generative_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's MONAI key names → MONAI GenerativeModels' (the inverse of ``load_old_state_dict``)."""
    old = {}
    for key, value in state.items():
        name = key
        for part in ("to_q", "to_k", "to_v"):
            name = name.replace(f".attn.{part}.", f".{part}.")
        if "transformer_blocks" not in name:
            name = name.replace(".attn.out_proj.", ".proj_attn.")
        name = name.replace("postconv", "conv")
        old[name] = value
    return old


def write_latent_bundle(root: str, layout: str = "monai", seed: int = 0, *, autoencoder: bool = True,
                        latent_channels: int = LATENT_CHANNELS) -> str:
    """A bundle folder ``root`` (``configs/inference.json`` + ``models/``) holding a tiny random latent diffusion
    model; ``autoencoder=False`` leaves its autoencoder weights out; ``latent_channels`` other than the U-Net's 3
    writes a mismatched autoencoder."""
    ae, unet = build_networks(seed, latent_channels)
    os.makedirs(os.path.join(root, "configs"), exist_ok=True)
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    if layout == "monai":
        ae_file = "autoencoder.pt"
        config = {
            "bundle_root": ".", "model_dir": "$@bundle_root + '/models'",
            "autoencoder_def": {"_target_": "monai.networks.nets.AutoencoderKL", **AE_ARGS},
            "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
            "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **UNET_ARGS},
            "load_diffusion_path": "$@model_dir + '/model.pt'",
            "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", **SCHEDULER, "clip_sample": False},
            "latent_shape": LATENT_SHAPE,
        }
        ae_state, unet_state = ae.state_dict(), unet.state_dict()
    elif layout == "generative":
        ae_file = "model_autoencoder.pt"
        old_ae = {("num_channels" if k == "channels" else k): v for k, v in AE_ARGS.items()}
        old_unet = {("num_channels" if k == "channels" else k): v for k, v in UNET_ARGS.items()}
        config = {
            "bundle_root": ".", "spatial_dims": 3, "image_channels": 1, "latent_channels": LATENT_CHANNELS,
            "latent_shape": ["@latent_channels", *LATENT_SHAPE[1:]],
            "autoencoder_def": {"_target_": "generative.networks.nets.AutoencoderKL",
                                **{**old_ae, "spatial_dims": "@spatial_dims", "latent_channels": "@latent_channels"}},
            "network_def": {"_target_": "generative.networks.nets.DiffusionModelUNet",
                            **{**old_unet, "in_channels": "@latent_channels", "out_channels": "@latent_channels"}},
            "load_autoencoder_path": "$@bundle_root + '/models/model_autoencoder.pt'",
            "load_diffusion_path": "$@bundle_root + '/models/model.pt'",
            "noise_scheduler": {"_target_": "generative.networks.schedulers.DDIMScheduler", **SCHEDULER},
        }
        ae_state, unet_state = to_generative_names(ae.state_dict()), to_generative_names(unet.state_dict())
    else:
        raise ValueError(layout)
    with open(os.path.join(root, "configs", "inference.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    if autoencoder:
        torch.save(ae_state, os.path.join(root, "models", ae_file))
    torch.save({"model": unet_state} if layout == "generative" else unet_state, os.path.join(root, "models", "model.pt"))
    return root
