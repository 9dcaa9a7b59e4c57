"""Metrics: Dice and HD95 (mm) for segmentations (MONAI); for synthesized volumes the TenVOO paper's MS-SSIM, FD and
MMD (:mod:`.synthesis_metrics`)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from .runtime import EngineError


def _onehot(mask: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(mask.astype(np.int64))
    return torch.nn.functional.one_hot(t, num_classes).permute(3, 0, 1, 2)[None].float()


def segmentation_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance (mm) between two label maps on the same grid: per structure (each
    non-zero label value in either map, whatever the values: 1 and 2, FreeSurfer's 17 and 53, 255) and their mean.
    HD95 is NaN for a structure empty in either map (as MONAI reports it); two empty maps score Dice 1."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if pred.shape != ref.shape:
        raise EngineError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    pred, ref = np.rint(np.asarray(pred)).astype(np.int64), np.rint(np.asarray(ref)).astype(np.int64)
    values = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
    # each value its own class 1..n: one-hot over n + 1 classes, not over max(value) + 1 (54 for FreeSurfer's 53,
    # where MONAI would score every absent class as a perfect 1)
    lut = np.zeros(max([0, *values]) + 1, dtype=np.int64)
    lut[values] = np.arange(1, len(values) + 1)
    k = len(values) + 1 if values else 2
    p, r = _onehot(lut[np.clip(pred, 0, None)], k), _onehot(lut[np.clip(ref, 0, None)], k)
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)(p, r).flatten()
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean_batch")
    with np.errstate(all="ignore"):
        hd95 = hd(p, r, spacing=list(map(float, spacing))).flatten()
    scores: dict[str, Any] = {"dice": float(torch.nanmean(dice)), "hd95": float(torch.nanmean(hd95))}
    if len(values) > 1:
        scores["structures"] = {int(v): {"dice": float(d), "hd95": float(h)} for v, d, h in zip(values, dice, hd95)}
    return scores


#: how a prediction's file name may differ from its reference's: ``case_01_seg.nii.gz`` scores against ``case_01``
MASK_SUFFIXES = ("_seg", "_mask", "_pred")


def match_cases(preds: list[str], refs: list[str]) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Pair predictions with references by case name (the file name without ``.nii.gz``/``.nii``/``.nrrd``/
    ``.seg.nrrd``; a prediction may add ``_seg``, ``_mask`` or ``_pred``). Returns ``(name, pred, ref)`` pairs,
    the predictions without a reference and the references without a prediction."""
    from ..data.datasets import case_name

    ref_by_name = {case_name(r): r for r in refs}
    pairs, lone_preds = [], []
    for p in preds:
        name = case_name(p)
        for candidate in (name, *(name.removesuffix(s) for s in MASK_SUFFIXES)):
            if candidate in ref_by_name:
                pairs.append((candidate, p, ref_by_name[candidate]))
                break
        else:
            lone_preds.append(p)
    used = {r for _, _, r in pairs}
    return pairs, lone_preds, [r for r in refs if r not in used]


def evaluate_segmentations(preds: list[str], refs: list[str], *, pair: bool = False
                           ) -> tuple[list[dict[str, Any]], list[str]]:
    """Score each prediction against the reference with the same case name (:func:`match_cases`); one row per case.
    ``pair``: one prediction and one reference, scored against each other whatever their names. Returns the rows
    and the references that no prediction matched."""
    from ..data import read_volume
    from ..data.datasets import case_name

    if pair:
        pairs, lone_refs = [(case_name(refs[0]), preds[0], refs[0])], []
    else:
        pairs, lone_preds, lone_refs = match_cases(preds, refs)
        if not pairs:
            example = os.path.basename(refs[0])
            raise EngineError(
                f"no prediction matches a reference: they are paired by case name (reference {example} needs a "
                f"prediction named {example} or {case_name(refs[0])}_seg.nii.gz), but none of "
                f"{', '.join(os.path.basename(p) for p in lone_preds[:3])} does; rename them, or pass two files "
                "(--pred FILE --ref FILE) to score one pair")
    rows = []
    for name, p, r in pairs:
        pv, rv = read_volume(p), read_volume(r)
        if tuple(pv.array.shape[:3]) != tuple(rv.array.shape[:3]):
            raise EngineError(f"{p} ({'x'.join(map(str, pv.array.shape[:3]))}) and its reference {r} "
                              f"({'x'.join(map(str, rv.array.shape[:3]))}) differ in shape: the mask must be on the "
                              "reference's grid; segment the reference's own image (segment writes masks on the "
                              "input grid), or resample the mask onto it")
        if not np.allclose(pv.affine, rv.affine, atol=1e-3):
            raise EngineError(f"{p}: not on the grid of its reference {r} (same shape, but the affines differ); "
                              "segment the reference's own image, or resample the mask onto it")
        rows.append({"case": name, **segmentation_scores(np.asarray(pv.array), np.asarray(rv.array), rv.spacing)})
    return rows, lone_refs


def evaluate_synthesis(generated: list[np.ndarray], real: list[np.ndarray], *, win_size: int = 7,
                       features: bool = True, figure: str | None = None) -> dict[str, Any]:
    """The TenVOO paper's metrics as its released code computes them (see :mod:`.synthesis_metrics` for each one
    and where ours differs): MS-SSIM of real volume i paired with generated volume i (higher = closer), the Fréchet
    distance and MMD between the two sets' features of the shipped demo-unetr's ViT encoder (lower = closer; Med3D,
    the paper's network, is not available here), and MMD on the voxels. Volumes in [0, 1] of one shape. Plus the
    realism checks of the generated volumes against the real ones (``realism``: not noise, brain-shaped, diverse;
    :func:`.synthesis_metrics.realism_checks`).

    ``win_size``: the MS-SSIM window (the release: 7; 5 for BraTS). ``features``: False skips the feature network
    (FD and feature MMD are then absent). ``figure``: a PNG path for the pairs and the feature scatter.
    Set metrics need two volumes per set at least; with fewer they are NaN.
    """
    from .synthesis_metrics import FEATURE_DESCRIPTION, frechet_distance, gaussian_mmd, paired_ms_ssim, volume_features

    if not generated or not real:
        raise EngineError("evaluate needs at least one generated and one real volume")
    shapes = {v.shape for v in generated + real}
    if len(shapes) != 1:
        raise EngineError(f"volumes differ in shape {sorted(shapes)}; synthesize at the size of the real volumes")
    if win_size < 3 or win_size % 2 != 1 or win_size > min(next(iter(shapes))):
        raise EngineError(f"--window {win_size}: the MS-SSIM window must be odd, at least 3 and at most the smallest "
                          f"side of the volumes ({min(next(iter(shapes)))})")
    ms, per_pair, scales = paired_ms_ssim(real, generated, win_size=win_size)
    nan = float("nan")
    sets = min(len(generated), len(real)) >= 2
    flat = lambda vs: np.stack([np.asarray(v, np.float32).ravel() for v in vs])  # noqa: E731
    out: dict[str, Any] = {"generated": len(generated), "real": len(real), "pairs": len(per_pair),
                           "ms_ssim": ms, "ms_ssim_scales": scales, "ms_ssim_window": win_size,
                           "mmd_voxels": gaussian_mmd(flat(generated), flat(real)) if sets else nan}
    feats_gen = feats_real = None
    if features:
        feats_gen, feats_real = volume_features(generated), volume_features(real)
        out.update(fd_features=frechet_distance(feats_real, feats_gen) if sets else nan,
                   mmd_features=gaussian_mmd(feats_gen, feats_real) if sets else nan,
                   feature_network=FEATURE_DESCRIPTION)
    from .synthesis_metrics import realism_checks

    out["realism"] = realism_checks(generated, real)
    if figure:
        from .report import synthesis_metrics_figure

        out["figure"] = synthesis_metrics_figure(figure, real, generated, per_pair, feats_real, feats_gen, out)
    return out


def monai_voxel_mmd(generated: list[np.ndarray], real: list[np.ndarray]) -> float:
    """MONAI's ``MMDMetric`` between the flattened volumes (as many from each set as the smaller one has; NaN with
    fewer than two): what ``evaluate`` reported as "MMD" before the paper's metrics, kept for the demo's
    before/after figure so its numbers stay comparable with earlier runs."""
    from monai.metrics import MMDMetric

    n = min(len(generated), len(real))
    if n < 2:
        return float("nan")
    gen = torch.stack([torch.as_tensor(g).float().flatten() for g in generated[:n]])
    ref = torch.stack([torch.as_tensor(r).float().flatten() for r in real[:n]])
    return float(MMDMetric()(gen, ref))
