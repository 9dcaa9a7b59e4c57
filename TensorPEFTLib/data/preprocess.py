"""The working grid and intensity scale a segmentation model sees, planned once and applied the same way everywhere.

A model works at one voxel spacing and orientation; a user's scans come at any. :class:`Preprocessing` records what
a model (and every adapter trained on it) works at, and the MONAI pipelines in :mod:`.transforms` bring every
training, validation and inference volume to it: resampled onto a world-aligned RAS grid at ``spacing`` (oblique and
LPS scans included), intensities scaled by statistics of the *foreground* (the head or brain, found without
labels), cropped to that foreground. Predictions go back onto the input's own grid through MONAI's ``Invertd``.

Why the foreground: percentiles over the whole volume move with the field of view (a whole-head scan is half air,
a tight crop none), so a model trained on one field of view saw other intensities on another. The foreground
percentiles do not depend on how much background a scan has, nor on its scanner range (0–1, 0–4095, raw units with
an offset): ``foreground`` maps the foreground's 0.5–99.5 % percentiles to [0, 1], background to 0.

Planning follows nnU-Net: a model without a recorded spacing works at the median spacing of its training cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Preprocessing", "PreprocessingError", "INTENSITY_CHOICES", "SKULL_STRIP_CHOICES", "foreground_mask", "foreground_box",
    "normalise_foreground", "plan_spacing", "check_spacing", "resampled_shape",
]

#: ``foreground`` (default): foreground 0.5–99.5 % → [0, 1]; ``percentile``: the same over the whole volume (the
#: models trained before working spacings existed); ``zscore``: mean / std of the non-zero voxels; ``none``
INTENSITY_CHOICES = ("foreground", "percentile", "zscore", "none")
#: brain extraction (:mod:`.skullstrip`): ``auto`` strips scans larger than a brain, ``on`` every scan, ``off`` none
SKULL_STRIP_CHOICES = ("auto", "on", "off")
#: a scan whose voxels are this many times larger or smaller than the model's is refused rather than resampled
MAX_SPACING_RATIO = 3.0


class PreprocessingError(ValueError):
    """An image cannot be brought to a model's working grid (user error; the message names the file)."""


@dataclass(frozen=True)
class Preprocessing:
    """Where a segmentation model works.

    Attributes:
        spacing: voxel size in mm along the RAS axes (x, y, z); None keeps each image's own grid.
        orientation: axis codes of the working grid (always ``RAS``: the resampled grid is world-aligned).
        intensity: one of :data:`INTENSITY_CHOICES`.
        crop_foreground: crop to the foreground (plus a margin) before training patches or the sliding window.
        skull_strip: one of :data:`SKULL_STRIP_CHOICES`: whole-head scans have everything outside the brain set to
            background on the working grid (:mod:`.skullstrip`) before the intensity scaling, so they look like the
            skull-stripped brains the models learn from; ``auto`` leaves brain-only scans alone.
    """

    spacing: tuple[float, float, float] | None = None
    orientation: str = "RAS"
    intensity: str = "foreground"
    crop_foreground: bool = True
    skull_strip: str = "auto"

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_CHOICES:
            raise PreprocessingError(f"intensity {self.intensity!r}: choose one of {', '.join(INTENSITY_CHOICES)}")
        if self.skull_strip not in SKULL_STRIP_CHOICES:
            raise PreprocessingError(f"skull-strip {self.skull_strip!r}: choose one of {', '.join(SKULL_STRIP_CHOICES)}")
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise PreprocessingError(f"spacing {self.spacing!r}: three positive voxel sizes in mm are needed")
            object.__setattr__(self, "spacing", spacing)

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing) if self.spacing else None, "orientation": self.orientation,
                "intensity": self.intensity, "crop_foreground": self.crop_foreground, "skull_strip": self.skull_strip}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Preprocessing | None":
        if not data:
            return None
        spacing = data.get("spacing")
        return cls(spacing=tuple(spacing) if spacing else None, orientation=str(data.get("orientation", "RAS")),
                   intensity=str(data.get("intensity", "foreground")),
                   crop_foreground=bool(data.get("crop_foreground", True)),
                   # models and adapters from before brain extraction: auto, which leaves their brain-only scans alone
                   skull_strip=str(data.get("skull_strip", "auto")))

    def describe(self) -> str:
        grid = "the input grid" if self.spacing is None else "x".join(f"{s:g}" for s in self.spacing) + " mm " + self.orientation
        strip = {"auto": ", whole heads skull-stripped", "on": ", skull-stripped", "off": ""}[self.skull_strip]
        return f"{grid}, {self.intensity} intensity{strip}"


# ------------------------------------------------------------------------------------------------ foreground


def foreground_mask(array: np.ndarray, *, smooth: float = 1.0) -> np.ndarray:
    """The head / brain of a scan, without labels: (X, Y, Z) → bool (X, Y, Z).

    Threshold at 10 % of the way from the background level (0.5 % percentile) to the bright tissue (99.5 %), on a
    lightly smoothed copy (so Rician background noise does not pass it), then the largest connected component with
    its holes filled. Independent of the intensity range and of any offset; a skull-stripped brain or a whole head.
    An image with no contrast gives an empty mask.
    """
    from scipy import ndimage

    data = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.0).astype(np.float32)
    if smooth > 0:
        data = ndimage.gaussian_filter(data, smooth)
    lo, hi = np.percentile(data, [0.5, 99.5])
    if not hi > lo:
        return np.zeros(data.shape, dtype=bool)
    mask = data > lo + 0.1 * (hi - lo)
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def foreground_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels, as slices; None for an empty mask."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, int(hits[0]) - margin), min(mask.shape[axis], int(hits[-1]) + 1 + margin)))
    return tuple(box)


def normalise_foreground(array: np.ndarray, mask: np.ndarray | None = None, lower: float = 0.5,
                         upper: float = 99.5) -> np.ndarray:
    """Map the foreground's ``lower``–``upper`` percentiles to [0, 1] (clipped): background → 0, the same scale
    whatever the field of view, scanner range or offset. (X, Y, Z) → float32 (X, Y, Z)."""
    data = np.asarray(array, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data)
    values = data[mask] if mask.any() else data.ravel()
    lo, hi = np.percentile(values, [lower, upper])
    if not hi > lo:
        return np.zeros_like(data)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ spacing


def plan_spacing(spacings: Iterable[Sequence[float]]) -> tuple[float, float, float]:
    """nnU-Net's choice of working spacing: the per-axis median of the cases' voxel sizes (in the order of the
    RAS-resampled grid, so pass each case's spacing along x, y, z: :func:`ras_spacing`)."""
    values = np.asarray([tuple(float(v) for v in s) for s in spacings], dtype=np.float64)
    if values.size == 0:
        raise PreprocessingError("no cases to plan a working spacing from")
    return tuple(float(round(v, 3)) for v in np.median(values, axis=0))  # type: ignore[return-value]


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along the world x, y, z axes (the voxel axis closest to each world axis)."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    closest = np.argmax(np.abs(matrix / spacing), axis=1)  # for each world axis, the voxel axis pointing along it
    if len(set(closest.tolist())) < 3:  # 45° obliques: keep the voxel order
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]
    return tuple(float(spacing[c]) for c in closest)  # type: ignore[return-value]


def check_spacing(path: str | os.PathLike, affine: np.ndarray, working: Sequence[float] | None,
                  max_ratio: float = MAX_SPACING_RATIO) -> None:
    """Refuse a scan whose voxels are more than ``max_ratio`` times larger or smaller than the working spacing: a
    model resampled that far sees anatomy it was never trained on (a 5 mm slab, or a 0.2 mm microscopy stack)."""
    if working is None:
        return
    spacing = np.asarray(ras_spacing(affine))
    ratio = spacing / np.asarray(working, dtype=np.float64)
    worst = int(np.argmax(np.maximum(ratio, 1.0 / ratio)))
    if ratio[worst] > max_ratio or ratio[worst] < 1.0 / max_ratio:
        have = "x".join(f"{s:.3g}" for s in spacing)
        want = "x".join(f"{s:g}" for s in working)
        raise PreprocessingError(f"{path}: voxel size {have} mm is more than {max_ratio:g}x off the model's working "
                                 f"spacing {want} mm; resample the scan to about {want} mm first, or fine-tune an "
                                 f"adapter on scans like it (finetune --spacing)")


def resampled_shape(shape: Sequence[int], affine: np.ndarray, working: Sequence[float] | None) -> tuple[int, ...]:
    """Extent, in working voxels along x, y, z, of the world-aligned box around a volume (what resampling gives)."""
    shape = np.asarray(shape[:3], dtype=np.float64)
    if working is None:
        return tuple(int(s) for s in shape)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    world = np.asarray(affine, dtype=np.float64)[:3, :3] @ corners
    extent = world.max(axis=1) - world.min(axis=1) + np.asarray(ras_spacing(affine))
    return tuple(int(round(e / w)) for e, w in zip(extent, working))


# ------------------------------------------------------------------------------------------------ MONAI pieces


def foreground_select(image: Any) -> Any:
    """``select_fn`` for MONAI's ``CropForeground``: the :func:`foreground_mask` of a channel-first image."""
    import torch

    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    mask = foreground_mask(array[0])
    if not mask.any():  # nothing found: keep the whole volume rather than crop to nothing
        mask = np.ones_like(mask)
    out = np.broadcast_to(mask[None], array.shape).copy()
    return torch.as_tensor(out) if hasattr(image, "detach") else out
