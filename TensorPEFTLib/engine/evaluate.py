"""Metrics with MONAI: Dice and HD95 (mm) for segmentations, MS-SSIM and MMD for synthesized volumes."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from .runtime import EngineError


def _onehot(mask: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(mask.astype(np.int64))
    return torch.nn.functional.one_hot(t, num_classes).permute(3, 0, 1, 2)[None].float()


def segmentation_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], num_classes: int | None = None) -> dict[str, float]:
    """Dice and 95th-percentile Hausdorff distance (mm) between two label maps on the same grid, mean over the
    foreground classes. HD95 is NaN when a class is empty in either map (as MONAI reports it)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if pred.shape != ref.shape:
        raise EngineError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    k = int(num_classes or max(int(pred.max()), int(ref.max()), 1) + 1)
    p, r = _onehot(pred, k), _onehot(ref, k)
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)(p, r)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean_batch")
    with np.errstate(all="ignore"):
        hd95 = hd(p, r, spacing=list(map(float, spacing)))
    return {"dice": float(torch.nanmean(dice.flatten())), "hd95": float(torch.nanmean(hd95.flatten()))}


def _match(preds: list[str], refs: list[str]) -> list[tuple[str, str, str]]:
    from ..data.datasets import case_name

    ref_by_name = {case_name(r): r for r in refs}
    pairs, missing = [], []
    for p in preds:
        name = case_name(p)
        for candidate in (name, name.removesuffix("_seg"), name.removesuffix("_mask"), name.removesuffix("_pred")):
            if candidate in ref_by_name:
                pairs.append((candidate, p, ref_by_name[candidate]))
                break
        else:
            missing.append(os.path.basename(p))
    if not pairs:
        raise EngineError(f"no prediction matches a reference by case name (e.g. {missing[:3]}); name masks like their images")
    return pairs


def evaluate_segmentations(preds: list[str], refs: list[str]) -> list[dict[str, Any]]:
    """Score each prediction against the reference with the same case name; one row per case."""
    from ..data import read_volume

    rows = []
    for name, p, r in _match(preds, refs):
        pv, rv = read_volume(p), read_volume(r)
        if not np.allclose(pv.affine, rv.affine, atol=1e-3):
            raise EngineError(f"{p}: not on the grid of its reference {r} (affines differ); segment the reference image")
        rows.append({"case": name, **segmentation_scores(np.asarray(pv.array), np.asarray(rv.array), rv.spacing)})
    return rows


def evaluate_synthesis(generated: list[np.ndarray], real: list[np.ndarray]) -> dict[str, float]:
    """MS-SSIM between each generated and each real volume (mean; higher = closer to real anatomy) and the MMD
    between the two sets (lower = closer; NaN unless both sets have two volumes), both with MONAI. Volumes in [0, 1]
    of the same shape."""
    from monai.metrics import MMDMetric, MultiScaleSSIMMetric

    if not generated or not real:
        raise EngineError("evaluate needs at least one generated and one real volume")
    shapes = {v.shape for v in generated + real}
    if len(shapes) != 1:
        raise EngineError(f"volumes differ in shape {sorted(shapes)}; synthesize at the size of the real volumes")
    size = min(next(iter(shapes)))
    # MS-SSIM with 5 scales needs enough voxels per side; fewer scales on small volumes (e.g. 32³).
    scales = max(1, min(5, int(np.log2(size / 7)) + 1 if size > 7 else 1))
    weights = tuple(np.full(scales, 1.0 / scales))
    kernel = min(11, size // 2 ** (scales - 1) - 1 | 1)
    ms = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=max(3, kernel), weights=weights)
    values = []
    for g in generated:
        for r in real:
            values.append(float(ms(torch.as_tensor(g)[None, None].float(), torch.as_tensor(r)[None, None].float()).mean()))
    # MONAI's MMD compares two batches of equal size: use as many volumes from each set as the smaller one has.
    # It needs two volumes per set at least: with fewer, MMD is reported as NaN instead of failing the whole report.
    n = min(len(generated), len(real))
    mmd = float("nan")
    if n >= 2:
        gen = torch.stack([torch.as_tensor(g).float().flatten() for g in generated[:n]])
        ref = torch.stack([torch.as_tensor(r).float().flatten() for r in real[:n]])
        mmd = float(MMDMetric()(gen, ref))
    return {"ms_ssim": float(np.mean(values)), "mmd": mmd, "generated": len(generated), "real": len(real)}
