"""The TenVOO paper's synthesis metrics, computed as its released evaluation code (``eval.py`` of xiaovhua/tenvoo)
computes them where that is possible here, and named for what they are where it is not.

- **MS-SSIM**, each validation (real) volume paired with one generated volume in order (the release zips its
  validation loader with the sample files), mean over the pairs. As ``pytorch_msssim.ms_ssim``: a Gaussian window
  (σ 1.5) of ``win_size`` voxels (the release: 7, or 5 for BraTS), separable and without padding; K = (0.01, 0.03),
  data range 1; the scale weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); contrast terms clipped at 0; 2× average
  pooling between scales. ``pytorch_msssim`` needs every side > (win_size − 1)·16 (97 voxels at window 7): smaller
  volumes (the demo's 32³) get as many scales as their size allows, with those scales' weights renormalised to
  sum 1 — reported with the number of scales used.
- **Fréchet distance** between Gaussians fitted to the two sets' features (the release's
  ``calculate_frechet_distance``: ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), ``scipy.linalg.sqrtm``, ε·I added if the
  product is singular). The release takes 2048 features of Med3D's ResNet-50, which cannot be downloaded here; we take
  the shipped ``demo-unetr``'s ViT encoder (``feature_network``): volumes resized to its 64³ input, the mean over
  tokens of its last transformer block's normalised output, 192 features. Hence "FD (demo-unetr ViT features)", not
  FID: the numbers are comparable between runs of this tool, not with the paper's.
- **MMD** on those features and on the voxels themselves: the squared maximum mean discrepancy with a Gaussian kernel
  exp(−d² / (2σ²)), σ = the median pairwise distance of the pooled sets (the median heuristic), biased (V-statistic)
  estimate: 0 for identical sets, > 0 otherwise. The release uses ``torch_two_sample``'s unbiased estimate with the
  kernel exp(−α·d²) and α = the median distance itself; that estimate is negative and non-zero for two identical
  small sets, and since α multiplies squared distances, on vectors whose distances are tens (voxels) every
  off-diagonal kernel value underflows to 0 and the statistic is −2/n whatever the samples. We therefore do not
  copy it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: pytorch_msssim's (and Wang et al. 2003's) scale weights
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter along the three spatial axes, 'valid' (no padding), as pytorch_msssim."""
    channels = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = window.numel()
        if x.shape[2 + axis] >= window.numel():
            x = F.conv3d(x, window.view(shape).repeat(channels, 1, 1, 1, 1), groups=channels)
    return x


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float,
                 k: tuple[float, float] = (0.01, 0.03)) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sxx = _blur(x * x, window) - mu_x ** 2
    syy = _blur(y * y, window) - mu_y ** 2
    sxy = _blur(x * y, window) - mu_x * mu_y
    cs_map = (2 * sxy + c2) / (sxx + syy + c2)
    ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ms_ssim_scales(shape: Sequence[int], win_size: int = 7) -> int:
    """How many MS-SSIM scales a volume of ``shape`` allows: pytorch_msssim's rule, side > (win_size − 1)·2^(scales−1),
    at most 5."""
    side = min(int(s) for s in shape)
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side > (win_size - 1) * 2 ** scales:
        scales += 1
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win_size: int = 7,
            win_sigma: float = 1.5, scales: int | None = None) -> torch.Tensor:
    """Multi-scale SSIM of two batches of volumes ``(B, C, D, H, W)``; returns ``(B,)`` (mean over channels).

    ``scales``: default as many as the size allows (:func:`ms_ssim_scales`, 5 at ≥ 97 voxels per side for window
    7, i.e. pytorch_msssim exactly); the first ``scales`` weights renormalised to sum 1.
    """
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"ms_ssim needs two (B, C, D, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if win_size % 2 != 1:
        raise ValueError(f"the MS-SSIM window must have an odd size, got {win_size}")
    scales = scales or ms_ssim_scales(x.shape[2:], win_size)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = (weights / weights.sum()).float()
    window = _gaussian_window(win_size, win_sigma).to(x.device)
    x, y = x.float(), y.float()
    terms = []
    for level in range(scales):
        ssim, cs = _ssim_and_cs(x, y, window, data_range)
        if level < scales - 1:
            terms.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool3d(x, kernel_size=2, padding=padding)
            y = F.avg_pool3d(y, kernel_size=2, padding=padding)
    terms.append(torch.relu(ssim))
    stacked = torch.stack(terms, dim=0)  # (scales, B, C)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean(-1)


def paired_ms_ssim(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], *, win_size: int = 7
                   ) -> tuple[float, list[float], int]:
    """The release's MS-SSIM: real volume i paired with generated volume i (as many pairs as the smaller set has),
    mean over the pairs. Returns the mean, the per-pair values and the number of scales used."""
    pairs = min(len(real), len(generated))
    if pairs == 0:
        raise ValueError("MS-SSIM needs at least one real and one generated volume")
    scales = ms_ssim_scales(np.shape(real[0]), win_size)
    values = []
    for r, g in zip(real[:pairs], generated[:pairs]):
        a = torch.as_tensor(np.asarray(r, np.float32))[None, None]
        b = torch.as_tensor(np.asarray(g, np.float32))[None, None]
        values.append(float(ms_ssim(a, b, win_size=win_size, scales=scales)[0]))
    return float(np.mean(values)), values, scales


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``(N, F)`` and ``b`` ``(M, F)``, as the
    release's ``calculate_frechet_distance`` (means, ``np.cov(rowvar=False)``, ``scipy.linalg.sqrtm``)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"Fréchet distance needs two (N >= 2, F) feature sets, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with np.errstate(all="ignore"):  # a singular product gives non-finite values: handled below, as the release does
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)  # the release drops an imaginary part of numerical size the same way
    diff = mu1 - mu2
    return float(max(0.0, diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def gaussian_mmd(a: np.ndarray, b: np.ndarray, sigma: float | None = None) -> float:
    """Squared MMD between sample sets ``a`` ``(N, F)`` and ``b`` ``(M, F)`` with the Gaussian kernel
    exp(−d² / (2σ²)); σ: the median pairwise distance of the pooled samples unless given. Biased (V-statistic)
    estimate: exactly 0 for identical sets, never negative."""
    x = torch.as_tensor(np.asarray(a, np.float64))
    y = torch.as_tensor(np.asarray(b, np.float64))
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD needs two (N, F) sample sets with the same F, got {tuple(x.shape)} and {tuple(y.shape)}")
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if sigma is None:
        off = d2[~torch.eye(len(pooled), dtype=torch.bool)]
        positive = off[off > 0]
        sigma = math.sqrt(float(positive.median())) if positive.numel() else 1.0
    k = torch.exp(-d2 / (2 * sigma ** 2))
    n = len(x)
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(value.clamp_min(0.0))


# ------------------------------------------------------------------------------------------------- features


#: the network whose features FD and feature MMD use (shipped with the package)
FEATURE_NETWORK = "demo-unetr"
FEATURE_DESCRIPTION = ("demo-unetr ViT encoder (unetr-small, 4 blocks x 192 features; volumes resized to 64³, token "
                       "mean of the last block)")


def feature_network(name: str = FEATURE_NETWORK) -> torch.nn.Module:
    """The ViT encoder of a shipped UNETR, frozen, in eval mode."""
    from ..models.checkpoints import load_model

    model = load_model(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def volume_features(volumes: Sequence[np.ndarray], network: torch.nn.Module | None = None) -> np.ndarray:
    """``(N, 192)`` features of volumes in [0, 1]: each resized (trilinear) to the UNETR's input size, passed through
    its ViT; the mean over tokens of the last block's normalised output."""
    from .jobs import model_input_size

    network = network or feature_network()
    size = model_input_size(network)  # the ViT's position embedding fixes it
    rows = []
    for volume in volumes:
        x = torch.as_tensor(np.asarray(volume, np.float32))[None, None]
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        tokens, _ = network.vit(x)
        rows.append(tokens.mean(dim=1)[0].double().numpy())
    return np.stack(rows)


# ------------------------------------------------------------------------------------------------- realism checks

#: a sample's high-frequency ratio must lie within this factor of the real volumes' (either way)
HF_TOLERANCE = 1.5
#: Dice of a sample's brain mask with the real volumes' mean's mask needed to count as brain-shaped
MASK_DICE_MIN = 0.8
#: intensity (volumes in [0, 1]) above which a voxel is brain: the skull-stripped background is 0, CSF ~0.1-0.2
BRAIN_THRESHOLD = 0.1
#: mean pairwise difference of the samples, relative to that of the real volumes, needed to count as diverse
DIVERSITY_MIN = 0.3


def high_frequency_ratio(volume: np.ndarray) -> float:
    """High-frequency energy relative to the variance: the mean over the three axes of the mean squared difference
    of neighbouring voxels, divided by the volume's variance. About 2 for white noise, well below 0.1 for a smooth
    anatomy at a few mm."""
    v = np.asarray(volume, np.float64)
    variance = float(v.var())
    if variance <= 0:
        return 0.0
    energy = np.mean([np.mean(np.diff(v, axis=axis) ** 2) for axis in range(v.ndim)])
    return float(energy / variance)


def brain_mask(volume: np.ndarray, threshold: float = BRAIN_THRESHOLD) -> np.ndarray:
    """The brain of a skull-stripped volume in [0, 1]: voxels above ``threshold``, the largest connected component,
    holes (ventricles) filled."""
    from scipy import ndimage

    mask = np.asarray(volume) > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def mean_pairwise_difference(volumes: Sequence[np.ndarray]) -> float:
    """Mean absolute voxel difference over all pairs of volumes (0 for one volume repeated)."""
    vols = [np.asarray(v, np.float32) for v in volumes]
    diffs = [float(np.mean(np.abs(vols[i] - vols[j]))) for i in range(len(vols)) for j in range(i + 1, len(vols))]
    return float(np.mean(diffs)) if diffs else 0.0


#: intensity (volumes in [0, 1]) below which a voxel inside a ventricle region counts as CSF: the simulated brains'
#: ventricles are near 0 (Rician noise ~0.02), deep grey matter ~0.5, white matter ~0.8
DARK_THRESHOLD = 0.25


def dark_volume_ml(volume: np.ndarray, region: np.ndarray, spacing_mm: float | Sequence[float],
                   threshold: float = DARK_THRESHOLD) -> float:
    """Volume (mL) of the voxels of ``region`` (bool, the volume's shape) darker than ``threshold``: with ``region``
    the ventricles' neighbourhood (:func:`TensorPEFTLib.data.demo.synthesis_ventricle_roi`), the ventricle volume
    of a generated or real T1 brain in [0, 1]."""
    v, r = np.asarray(volume), np.asarray(region, bool)
    if v.shape != r.shape:
        raise ValueError(f"dark_volume_ml: volume {v.shape} and region {r.shape} differ in shape")
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,)))) / 1000.0
    return float(np.count_nonzero(np.logical_and(v < threshold, r)) * voxel_ml)


def realism_checks(generated: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> dict[str, object]:
    """Are the generated volumes (in [0, 1], the real volumes' size) plausible brain MRI? Three measured checks:

    - **not noise**: each sample's :func:`high_frequency_ratio` within :data:`HF_TOLERANCE` × (either way) of the
      real volumes' mean ratio;
    - **brain-shaped**: each sample's :func:`brain_mask` against the mask of the mean real volume, Dice ≥
      :data:`MASK_DICE_MIN`;
    - **diverse**: the samples' :func:`mean_pairwise_difference` ≥ :data:`DIVERSITY_MIN` × the real volumes'
      (needs two samples; the same volume repeated scores 0).

    Returns per-sample values, the reference values, ``pass`` flags per check and overall, and a one-line
    ``summary``.
    """
    if not generated or not real:
        raise ValueError("realism checks need generated and real volumes")
    shape = np.shape(real[0])
    if any(np.shape(g) != shape for g in generated):
        raise ValueError(f"realism checks need generated volumes of the real volumes' shape {shape}, got "
                         f"{sorted({np.shape(g) for g in generated})}")
    real_hf = float(np.mean([high_frequency_ratio(r) for r in real]))
    hf = [high_frequency_ratio(g) for g in generated]
    hf_rel = [h / real_hf if real_hf > 0 else float("inf") for h in hf]
    reference = brain_mask(np.mean([np.asarray(r, np.float32) for r in real], axis=0))
    dices = [dice(brain_mask(g), reference) for g in generated]
    real_div = mean_pairwise_difference(real)
    gen_div = mean_pairwise_difference(generated) if len(generated) > 1 else float("nan")
    div_rel = gen_div / real_div if real_div > 0 else float("nan")
    not_noise = all(1 / HF_TOLERANCE <= r <= HF_TOLERANCE for r in hf_rel)
    shaped = all(d >= MASK_DICE_MIN for d in dices)
    diverse = bool(np.isfinite(div_rel) and div_rel >= DIVERSITY_MIN)
    summary = (f"HF ratio {np.mean(hf_rel):.2f}x real (each within {HF_TOLERANCE:g}x: {'yes' if not_noise else 'no'}), "
               f"brain-mask Dice {np.mean(dices):.3f} (min {min(dices):.3f}, each >= {MASK_DICE_MIN:g}: "
               f"{'yes' if shaped else 'no'}), diversity {div_rel:.2f}x real (>= {DIVERSITY_MIN:g}: "
               f"{'yes' if diverse else 'no'})")
    return {"count": len(generated), "hf_ratio": [round(h, 5) for h in hf], "hf_ratio_real": round(real_hf, 5),
            "hf_vs_real": [round(r, 3) for r in hf_rel], "mask_dice": [round(d, 4) for d in dices],
            "diversity": round(gen_div, 5) if np.isfinite(gen_div) else None, "diversity_real": round(real_div, 5),
            "diversity_vs_real": round(div_rel, 3) if np.isfinite(div_rel) else None,
            "pass": {"not_noise": not_noise, "brain_shaped": shaped, "diverse": diverse,
                     "all": bool(not_noise and shaped and diverse)},
            "summary": summary}
