"""Model presets: the papers' UNETR and 3D DDPM, and small versions that train on a 2-core CPU in minutes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # torch and MONAI load when a model is built: a GUI reads the table below without them
    import torch
    from torch import nn

#: what each model family does (the model's family is the first part of its preset name)
TASK_OF_FAMILY = {"unetr": "segmentation", "ddpm": "synthesis"}
#: the config files by which a folder is a MONAI bundle (first found is read first); here so a GUI can check a folder
#: without torch
BUNDLE_CONFIG_NAMES = ("inference.json", "train_diffusion.json", "train.json")


def _monai_unetr():
    from monai.networks.nets import UNETR as MonaiUNETR

    return MonaiUNETR


def make_unetr(num_layers: int = 12, **kwargs: Any) -> nn.Module:
    """MONAI's UNETR with any transformer depth.

    MONAI's UNETR hard-codes 12 blocks and takes its skip connections from blocks 3, 6 and 9. For another depth
    the taps move to ¼, ½ and ¾ of it, which keeps the paper's layout for 12 (taps 3, 6, 9).
    """
    MonaiUNETR = _monai_unetr()
    if num_layers == 12:
        return MonaiUNETR(**kwargs)
    return DepthUNETR(num_layers=num_layers, **kwargs)


def _depth_unetr_class():
    from monai.networks.nets import ViT

    MonaiUNETR = _monai_unetr()

    class DepthUNETR(MonaiUNETR):
        """UNETR with ``num_layers`` transformer blocks and skips tapped at ¼, ½, ¾ of the depth."""

        def __init__(self, num_layers: int, **kwargs: Any) -> None:
            if num_layers < 4 or num_layers % 4:
                raise ValueError(f"UNETR depth must be a multiple of 4 (skips at ¼, ½, ¾), got num_layers={num_layers}")
            super().__init__(**kwargs)
            self.num_layers = num_layers
            self.vit = ViT(
                in_channels=kwargs.get("in_channels", 1),
                img_size=kwargs["img_size"],
                patch_size=self.patch_size,
                hidden_size=self.hidden_size,
                mlp_dim=kwargs.get("mlp_dim", 3072),
                num_layers=num_layers,
                num_heads=kwargs.get("num_heads", 12),
                proj_type=kwargs.get("proj_type", "conv"),
                classification=False,
                dropout_rate=kwargs.get("dropout_rate", 0.0),
                spatial_dims=kwargs.get("spatial_dims", 3),
                qkv_bias=kwargs.get("qkv_bias", False),
                save_attn=kwargs.get("save_attn", False),
            )
            # MONAI reads hidden_states_out[3], [6], [9] for 12 blocks: index q, 2q, 3q with q = depth / 4.
            quarter = num_layers // 4
            self.skip_taps = (quarter, 2 * quarter, 3 * quarter)

        def forward(self, x_in: torch.Tensor) -> torch.Tensor:
            x, hidden_states_out = self.vit(x_in)
            enc1 = self.encoder1(x_in)
            enc2 = self.encoder2(self.proj_feat(hidden_states_out[self.skip_taps[0]]))
            enc3 = self.encoder3(self.proj_feat(hidden_states_out[self.skip_taps[1]]))
            enc4 = self.encoder4(self.proj_feat(hidden_states_out[self.skip_taps[2]]))
            dec4 = self.proj_feat(x)
            dec3 = self.decoder5(dec4, enc4)
            dec2 = self.decoder4(dec3, enc3)
            dec1 = self.decoder3(dec2, enc2)
            out = self.decoder2(dec1, enc1)
            return self.out(out)

    return DepthUNETR


def DepthUNETR(**kwargs: Any) -> nn.Module:  # noqa: N802 - behaves as a class constructor
    return _depth_unetr_class()(**kwargs)


def make_ddpm(**kwargs: Any) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**kwargs)


def make_latent_ddpm(autoencoder: dict[str, Any], latent_shape: Sequence[int], scale_factor: float | None = None,
                     schedule: dict[str, Any] | None = None, latent_channels: int | None = None,
                     **unet: Any) -> nn.Module:
    """A latent diffusion model as :mod:`.latent` holds one: MONAI's ``DiffusionModelUNet`` (``unet`` arguments)
    with a frozen ``AutoencoderKL`` (``autoencoder`` arguments) attached as
    :class:`~TensorPEFTLib.models.latent.LatentParts`. ``latent_shape``: the latent grid it samples at (the image
    size is that times the autoencoder's down-sampling); ``scale_factor``: latents × it before diffusion (None
    until the autoencoder is trained: 1 / std of the training latents); ``schedule``: the noise schedule it is
    trained with; ``latent_channels``: the autoencoder's latent channels and the U-Net's input and output channels
    together (an override that keeps the two sides matched; ``demo-ldm`` uses 8 on ``ddpm-latent-small``, whose
    own 3 stay what files saved without it were built with). :func:`~TensorPEFTLib.models.checkpoints.save_model`
    stores the autoencoder's weights in the same file, under ``tensorpeft_autoencoder.``."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from .latent import LATENT_ATTR, LatentParts

    if latent_channels is not None:
        if int(latent_channels) < 1:
            raise PresetError(f"latent_channels must be a positive number of channels, not {latent_channels}")
        autoencoder = {**autoencoder, "latent_channels": int(latent_channels)}
        unet = {**unet, "in_channels": int(latent_channels), "out_channels": int(latent_channels)}
    ae_args = {k: tuple(v) if isinstance(v, list) else v for k, v in autoencoder.items()}
    ae = AutoencoderKL(**ae_args)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    model = DiffusionModelUNet(**unet)
    levels = len(ae_args.get("channels", (32, 64, 64)))
    parts = LatentParts(ae, float(scale_factor) if scale_factor else None, downsample=2 ** (levels - 1),
                        latent_channels=int(ae_args.get("latent_channels", 3)),
                        latent_shape=tuple(int(s) for s in latent_shape), schedule=dict(schedule) if schedule else None,
                        source="preset")
    setattr(model, LATENT_ATTR, parts)
    return model


#: the latent model's noise schedule: MONAI's 3D latent diffusion tutorials and brain bundles (scaled-linear β from
#: 0.0015 to 0.0195, 1000 steps) with v-prediction (Salimans & Ho 2022). Measured: with noise prediction the
#: demo-ldm run's samples were still noise after 500 of its steps (at t = 999 its implied estimate of the clean
#: latents was 100x off in squared error: eps-prediction has to be very precise at high noise before the global
#: layout appears); v-prediction regresses on the clean latents there.
LATENT_SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                   "beta_end": 0.0195, "prediction_type": "v_prediction"}


@dataclass(frozen=True)
class Preset:
    """A named architecture. ``task`` is ``segmentation`` (UNETR) or ``synthesis`` (DDPM)."""

    name: str
    task: str
    description: str
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: the spatial input size the model is trained at (UNETR's img_size; the DDPM's training crop)
    patch_size: tuple[int, int, int] = (64, 64, 64)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "unetr-paper", "segmentation", "UNETR of the LoRA-PT / tCURLoRA papers (ViT-B/16, 12 blocks, 128³)",
            make_unetr,
            dict(in_channels=1, out_channels=2, img_size=(128, 128, 128), feature_size=16, hidden_size=768,
                 mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance", res_block=True),
            patch_size=(128, 128, 128),
        ),
        Preset(
            "unetr-small", "segmentation", "small UNETR for CPU work (4 blocks of width 192, features 8, 64³)",
            make_unetr,
            dict(num_layers=4, in_channels=1, out_channels=2, img_size=(64, 64, 64), feature_size=8,
                 hidden_size=192, mlp_dim=768, num_heads=4, proj_type="conv", norm_name="instance", res_block=True),
            patch_size=(64, 64, 64),
        ),
        Preset(
            "ddpm-paper", "synthesis", "3D DDPM U-Net of the TenVOO paper (channels 32-512, attention at 256/512)",
            make_ddpm,
            dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2,
                 channels=(32, 32, 64, 128, 256, 512), attention_levels=(False, False, False, False, True, True),
                 norm_num_groups=32, norm_eps=1e-6, num_head_channels=(0, 0, 0, 0, 256, 512)),
            patch_size=(128, 128, 96),
        ),
        Preset(
            "ddpm-small", "synthesis", "small 3D DDPM U-Net for CPU work (channels 32, 64, 64; attention at 64)",
            make_ddpm,
            dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(32, 64, 64),
                 attention_levels=(False, False, True), norm_num_groups=32, norm_eps=1e-6,
                 num_head_channels=(0, 0, 64)),
            patch_size=(32, 32, 32),
        ),
        Preset(
            "ddpm-latent-small", "synthesis",
            "small latent diffusion model for CPU work: AutoencoderKL (16-32-64, 3 latent channels unless "
            "latent_channels says otherwise, 4x down) + diffusion U-Net on 16x20x16 latents (channels 32, 64, 64; "
            "attention at 64) for 64x80x64 volumes",
            make_latent_ddpm,
            dict(spatial_dims=3, in_channels=3, out_channels=3, num_res_blocks=1, channels=(32, 64, 64),
                 attention_levels=(False, False, True), norm_num_groups=16, norm_eps=1e-6,
                 num_head_channels=(0, 0, 64),
                 autoencoder=dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[16, 32, 64],
                                  latent_channels=3, num_res_blocks=1, attention_levels=[False, False, False],
                                  norm_num_groups=16, with_encoder_nonlocal_attn=False,
                                  with_decoder_nonlocal_attn=False),
                 latent_shape=[16, 20, 16], schedule=dict(LATENT_SCHEDULE)),
            patch_size=(64, 80, 64),
        ),
    ]
}


class PresetError(ValueError):
    """Unknown preset or bad override (user error)."""


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset, optionally overriding constructor arguments (e.g. ``out_channels=3``).

    The model remembers ``tensorpeft_preset`` and ``tensorpeft_spec`` (preset + overrides) so a saved model can be
    rebuilt from its file alone.
    """
    if name not in PRESETS:
        raise PresetError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    kwargs = {**preset.kwargs, **overrides}
    try:
        model = preset.builder(**kwargs)
    except TypeError as err:
        raise PresetError(f"preset {name}: bad override ({err})") from None
    model.tensorpeft_preset = name
    model.tensorpeft_spec = {"preset": name, "overrides": _jsonable(overrides)}
    return model


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
