"""A segmentation model's output layer: how many classes it predicts, and a new one for more classes.

A pretrained UNETR segments its own structures (``out_channels`` classes, 0 = background). A user's labels may
have more structures than that (a left and a right hippocampus where the model knew one). The output layer is then
replaced by a wider one, as Hugging Face replaces a classifier head for a new label set; it trains with the decoder
(the UNETR's default extra trainable parameters), and the adapter records the class count so ``segment`` rebuilds
the same layer before loading the adapter's weights into it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["output_layer", "output_classes", "set_output_classes"]


def _output_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the logits convolution: ``model.out.conv.conv`` in MONAI's ``UnetOutBlock`` (a
    ``Convolution`` around a ``Conv3d``), or ``model.out.conv``."""
    out = getattr(model, "out", None)
    conv = getattr(out, "conv", None)
    inner = getattr(conv, "conv", None)
    if isinstance(inner, nn.Conv3d):
        return conv, "conv"
    if isinstance(conv, nn.Conv3d):
        return out, "conv"
    return None


def output_layer(model: nn.Module) -> nn.Conv3d | None:
    """The 1x1x1 convolution that maps features to class logits (MONAI's ``UnetOutBlock`` at ``model.out``), or
    None for a model without one."""
    slot = _output_slot(model)
    return getattr(*slot) if slot else None


def output_classes(model: nn.Module) -> int:
    """Classes the model predicts, background included (2 when it has no recognisable output layer)."""
    conv = output_layer(model)
    return int(conv.out_channels) if conv is not None else 2


@torch.no_grad()
def set_output_classes(model: nn.Module, classes: int) -> int:
    """Replace the output layer with one of ``classes`` outputs; returns the old count (no change when equal).

    The new layer starts from the old one: background from the old background, and every new structure from the
    old structures' mean (a one-structure model: that structure), its bias lowered by log(new / old structures) so
    the probability of "some structure" stays what it was (exactly so for a one-structure model). Each new class
    starts as "the kind of thing the model already found", split evenly, and training only has to tell them apart:
    their gradients differ from the first step on, since each class has its own targets. Deterministic (no random
    initialisation).
    """
    slot = _output_slot(model)
    if slot is None:
        raise ValueError(f"{type(model).__name__} has no output layer at model.out (a UNETR's UnetOutBlock)")
    conv = getattr(*slot)
    before = int(conv.out_channels)
    if classes == before:
        return before
    if classes < 2:
        raise ValueError(f"a segmentation model needs at least 2 classes (background and one structure), got {classes}")
    new = nn.Conv3d(conv.in_channels, classes, kernel_size=conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, bias=conv.bias is not None).to(device=conv.weight.device,
                                                                          dtype=conv.weight.dtype)
    foreground_w = conv.weight[1:].mean(0) if before > 1 else conv.weight[0]
    new.weight[0] = conv.weight[0]
    new.weight[1:] = foreground_w
    if conv.bias is not None:
        foreground_b = conv.bias[1:].mean() if before > 1 else conv.bias[0]
        new.bias[0] = conv.bias[0]
        new.bias[1:] = foreground_b - math.log((classes - 1) / max(1, before - 1))
    setattr(slot[0], slot[1], new)
    spec = getattr(model, "tensorpeft_spec", None)
    if isinstance(spec, dict):
        spec.setdefault("overrides", {})
        spec["overrides"] = {**spec["overrides"], "out_channels": int(classes)}
    return before
