"""Shared fixtures: tiny versions of the preset architectures, so every suite runs in seconds on a 2-core CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores here: more torch threads than cores slows every test down (oversubscription).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_unetr(num_layers: int = 4, hidden: int = 48, img: int = 32):
    """A MONAI UNETR small enough for unit tests (family "unetr"), same code path as the presets."""
    from TensorPEFTLib.models import make_unetr

    torch.manual_seed(0)
    return make_unetr(num_layers=num_layers, in_channels=1, out_channels=2, img_size=(img, img, img), feature_size=8,
                      hidden_size=hidden, mlp_dim=4 * hidden, num_heads=4, proj_type="conv", norm_name="instance",
                      res_block=True).eval()


def tiny_ddpm():
    """A MONAI DiffusionModelUNet with attention, small enough for unit tests (family "ddpm")."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    model = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(32, 32, 64),
                               attention_levels=(False, False, True), norm_num_groups=32, num_head_channels=(0, 0, 32))
    return as_if_pretrained(model).eval()


def as_if_pretrained(model):
    """MONAI zero-initialises some DDPM layers (the output conv, each resnet's conv2), which blocks every gradient
    upstream of them. A pretrained model has no such zeros; give those weights small random values."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


@pytest.fixture
def unetr():
    return tiny_unetr()


@pytest.fixture
def ddpm():
    return tiny_ddpm()


def unetr_input(img: int = 32, batch: int = 1):
    return torch.randn(batch, 1, img, img, img, generator=torch.Generator().manual_seed(1))


def ddpm_input(size: int = 16, batch: int = 1):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(batch, 1, size, size, size, generator=gen), torch.tensor([7] * batch)
