"""A new output layer's first weights from what the base model already sees: a linear probe of its features.

When a user's labels hold structures the model never predicted, :func:`~TensorPEFTLib.models.heads.set_output_classes`
starts every new class as the old foreground, split evenly: training must then tell them apart from scratch, and
structures the base model called background (the demo model's hippocampus) start *against* their own voxels.
Structures new to a model were learned one after another, the last after 1000 steps (ten FreeSurfer structures).

Here the new layer is fitted first, as a linear probe (a multinomial logistic regression) on the features its input
receives from the frozen base model over a few training patches: the classes start wherever the base features
already separate them, and fine-tuning refines from there ("linear probing, then fine-tuning", Kumar et al., ICLR
2022: fine-tuning from a fitted head distorts pretrained features less than from an unfitted one). The voxels are
drawn evenly per class and the probe's bias then gets each class's share of the patches back, so it predicts as often
as the classes occur. Deterministic for a seed; one forward pass per patch (the run says how long it took).
``finetune --head-init probe``; not the default (:func:`check_head_init` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["HEAD_INITS", "ProbeResult", "check_head_init", "collect_head_features", "fit_linear_probe",
           "probe_output_layer"]

#: how a wider output layer starts: ``copy`` (:func:`~TensorPEFTLib.models.heads.set_output_classes` alone, the
#: default) or ``probe`` (:func:`probe_output_layer`)
HEAD_INITS = ("copy", "probe")


def check_head_init(choice: str) -> str:
    """``choice`` checked against :data:`HEAD_INITS`.

    Why ``copy`` stays the default, measured on the demo model (benchmarks/own_labels.py, 2026-12-04, one draw each):
    with ten FreeSurfer structures the probe had eight of them validating 0.32-0.74 at step 250 where the copied
    layer had three (seed 1; seed 0, with and without class-balanced patch centres: three), and 1250 steps ended at
    mean Dice 0.657 instead of 0.494 (the pallidi found). But the hippocampi, the structure the base model calls
    background, came later (validation 0.02 / 0.29 at step 1500 against 0.51 / 0.56), and at the default 2500 steps
    the mean was 0.803 against 0.811; a left and a right hippocampus alone ended at 0.789 against 0.808.
    """
    if choice not in HEAD_INITS:
        raise ValueError(f"head init {choice!r}: choose one of {', '.join(HEAD_INITS)}")
    return choice


@dataclass
class ProbeResult:
    """What the probe fitted: per class the voxels it saw and its accuracy on them (the balanced training accuracy)."""

    voxels: list[int]
    accuracy: list[float]

    def describe(self, names: list[str]) -> str:
        scores = np.array(self.accuracy, dtype=float)  # NaN: a class absent from the patches
        lowest = int(np.nanargmin(scores[1:])) + 1 if np.isfinite(scores[1:]).any() else 0
        mean = float(np.nanmean(scores))
        return (f"mean accuracy per class {mean:.2f} on {sum(self.voxels):,} voxels of the base model's features "
                f"(lowest: {names[lowest]} {self.accuracy[lowest]:.2f})")


@torch.no_grad()
def collect_head_features(model: nn.Module, layer: nn.Module, batches: list[dict[str, torch.Tensor]],
                          classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The inputs ``layer`` (a 1x1x1 convolution) receives for the voxels of ``batches`` (image (B, 1, ...) and label
    (B, 1, ...) patches): up to ``per_class`` voxels of each class, drawn at random. Returns features (N, C) float32,
    their classes (N,) and each class's share of all the patches' voxels (K,)."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    counts = np.zeros(classes, dtype=np.int64)
    features, labels = [], []
    try:
        for batch in batches:
            captured.clear()
            model(batch["image"])
            feats = captured[-1].float().flatten(2).transpose(1, 2).reshape(-1, captured[-1].shape[1])  # (B*V, C)
            label = batch["label"].flatten().cpu().long().numpy()
            counts += np.bincount(label, minlength=classes)[:classes]
            keep = _draw(rng, label, classes, per_class)  # a few thousand voxels a class, not the whole patches
            features.append(feats[torch.as_tensor(keep, device=feats.device)].cpu())
            labels.append(torch.as_tensor(label[keep]))
    finally:
        handle.remove()
        model.train(was_training)
    all_features, all_labels = torch.cat(features), torch.cat(labels)
    keep = _draw(rng, all_labels.numpy(), classes, per_class)
    return all_features[keep], all_labels[keep], counts / max(1, counts.sum())


def _draw(rng: np.random.Generator, labels: np.ndarray, classes: int, per_class: int) -> np.ndarray:
    """Indices of up to ``per_class`` voxels of each class, drawn at random, in order."""
    keep = []
    for k in range(classes):
        where = np.flatnonzero(labels == k)
        keep.append(rng.choice(where, per_class, replace=False) if len(where) > per_class else where)
    return np.sort(np.concatenate(keep))


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, share: np.ndarray,
                     weight_decay: float = 1e-3, iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A multinomial logistic regression of ``labels`` on ``features`` (N, C), every class weighted alike (a class
    absent from the voxels keeps weight 0 and a very low bias), then each present class's log share of the voxels
    (``share``) added to its bias. Standardised inside; returns weight (K, C) and bias (K,) for the raw features, and
    per class the fitted accuracy on its voxels."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    present = torch.bincount(labels, minlength=classes)[:classes] > 0
    counts = torch.bincount(labels, minlength=classes)[:classes].double().clamp_min(1)
    sample_weight = (1.0 / counts)[labels] / present.sum()
    weight = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = z @ weight.T + bias
        loss = (nn.functional.cross_entropy(logits, labels, reduction="none") * sample_weight).sum()
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        predicted = (z @ weight.T + bias).argmax(1)
        accuracy = [float((predicted[labels == k] == k).double().mean()) if present[k] else float("nan")
                    for k in range(classes)]
        prior = torch.as_tensor(np.log(np.clip(share, 1e-12, None)), dtype=torch.float64)
        bias_raw = bias + prior - (weight / std) @ mean
        bias_raw[~present] = -30.0  # never seen: never predicted until training shows it
        weight_raw = weight / std
        weight_raw[~present] = 0.0
    return weight_raw.float(), bias_raw.float(), accuracy


def probe_output_layer(model: nn.Module, task: Any, *, seed: int, patches: int = 16, per_class: int = 4000,
                       ctx: Any = None) -> ProbeResult | None:
    """Fit ``model``'s output layer as a linear probe on its own features over ``patches`` training patches of
    ``task`` (a :class:`~.segmentation.SegmentationTask`; drawn as training draws them, from a seed of their own),
    and write the weights into the layer. With ``ctx`` active (data parallel) rank 0's fit is every rank's. None
    when the model has no output layer this can fit."""
    from ..models.heads import output_layer

    layer = output_layer(model)
    if layer is None or layer.bias is None or tuple(layer.kernel_size) != (1, 1, 1):
        return None
    classes = int(layer.out_channels)
    steps = max(1, -(-patches // task.batch_size))
    batches = [task.batch(step, 0, seed=(seed * 1_000_003 + 104_729 + step) % (2**31 - 1)) for step in range(steps)]
    features, labels, share = collect_head_features(model, layer, batches, classes, per_class, seed)
    weight, bias, accuracy = fit_linear_probe(features, labels, classes, share)
    voxels = torch.bincount(labels, minlength=classes)[:classes].tolist()
    if ctx is not None and getattr(ctx, "active", False):
        weight, bias, voxels, accuracy = ctx.broadcast((weight, bias, voxels, accuracy))
    with torch.no_grad():
        layer.weight.copy_(weight.view(layer.weight.shape).to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias))
    return ProbeResult(voxels=[int(v) for v in voxels], accuracy=[float(a) for a in accuracy])
