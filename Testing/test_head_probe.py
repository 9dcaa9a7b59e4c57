"""The linear probe that starts a wider output layer (engine.head_probe)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import pytest

from TensorPEFTLib.engine.head_probe import check_head_init, fit_linear_probe, probe_output_layer


def test_head_init_choices():
    assert check_head_init("probe") == "probe" and check_head_init("copy") == "copy"
    with pytest.raises(ValueError, match="choose one of copy, probe"):
        check_head_init("fit")


def test_probe_separates_classes_and_predicts_them_as_often_as_they_occur():
    """Three Gaussian clusters in 4 features, class 3 absent: the probe classifies the present ones, never predicts
    the absent one, and, fitted on voxels drawn evenly per class, its bias brings back each class's share."""
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0, 0], [3, 0, 1, 0], [0, 3, 0, -1]], dtype=np.float64)
    labels = np.repeat([0, 1, 2], 500)
    features = torch.as_tensor(centres[labels] + rng.normal(0, 0.7, (1500, 4)) + 5.0)  # off-centre raw features
    share = np.array([0.8, 0.15, 0.05, 0.0])
    weight, bias, accuracy = fit_linear_probe(features.float(), torch.as_tensor(labels), 4, share)
    assert weight.shape == (4, 4) and bias.shape == (4,)
    assert min(accuracy[:3]) > 0.9 and np.isnan(accuracy[3])
    assert torch.all(weight[3] == 0) and bias[3] <= -30
    # a population in the shares given: the predictions' frequencies follow them (the balanced fit would give 1/3)
    drawn = rng.choice(3, 20000, p=share[:3] / share[:3].sum())
    x = torch.as_tensor(centres[drawn] + rng.normal(0, 0.7, (20000, 4)) + 5.0).float()
    predicted = np.bincount((x @ weight.T + bias).argmax(1).numpy(), minlength=4) / 20000
    assert abs(predicted[0] - 0.8) < 0.05 and abs(predicted[2] - 0.05) < 0.03 and predicted[3] == 0


class _Tiny(nn.Module):
    """Features a function of intensity, then a 1x1x1 output convolution at ``out.conv`` as in MONAI's UNETR."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv3d(1, 4, 1)
        with torch.no_grad():
            self.body.weight.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0]).view(4, 1, 1, 1, 1))
            self.body.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        self.out = nn.Module()
        self.out.conv = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.conv(torch.relu(self.body(x)))


class _Patches:
    """A task's ``batch``: patches whose class is set by intensity bands (0.2, 0.55, 0.9), drawn from the seed."""

    batch_size = 2

    def batch(self, step: int, micro: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        label = rng.choice(3, (2, 1, 8, 8, 8), p=(0.7, 0.2, 0.1))
        image = np.array([0.2, 0.55, 0.9])[label] + rng.normal(0, 0.05, label.shape)
        return {"image": torch.as_tensor(image).float(), "label": torch.as_tensor(label).long()}


def test_a_new_output_layer_starts_from_what_the_features_tell_apart():
    """Before the probe the layer's classes are copies (argmax: one class everywhere); after it, the model labels
    held-out patches right; the same seed gives the same layer; a model without a 1x1x1 output layer is left alone."""
    torch.manual_seed(0)
    model, task = _Tiny(), _Patches()
    with torch.no_grad():
        model.out.conv.weight.copy_(model.out.conv.weight[:1].expand(3, -1, -1, -1, -1))  # as set_output_classes
        model.out.conv.bias.copy_(torch.tensor([0.0, -0.7, -0.7]))
    held_out = task.batch(0, 0, seed=12345)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(held_out["image"]).argmax(1, keepdim=True) == held_out["label"]).float().mean())

    before = accuracy()
    probed = probe_output_layer(model, task, seed=0, patches=8, per_class=500)
    assert probed is not None and min(probed.accuracy) > 0.95 and sum(probed.voxels) <= 3 * 500
    assert before < 0.75 and accuracy() > 0.97
    again = _Tiny()
    probe_output_layer(again, task, seed=0, patches=8, per_class=500)
    assert torch.equal(again.out.conv.weight, model.out.conv.weight) and torch.equal(again.out.conv.bias, model.out.conv.bias)
    assert probe_output_layer(nn.Sequential(nn.Conv3d(1, 2, 1)), task, seed=0) is None
    assert "lowest" in probed.describe(["background", "a", "b"])
    absent = type(probed)(voxels=[10, 10, 0], accuracy=[0.9, 0.5, float("nan")]).describe(["background", "a", "b"])
    assert "(lowest: a 0.50)" in absent and "mean accuracy per class 0.70" in absent
