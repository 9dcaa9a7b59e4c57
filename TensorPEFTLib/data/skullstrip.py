"""Brain extraction for whole-head T1 scans, by affine registration to a whole-head reference whose brain is known.

The shipped models were trained on skull-stripped brains, and a clinic's T1 is a whole head: scalp, skull, eyes, neck.
Fed as it is, the scalp's fat sets the intensity scale (the brain looks darker than in training) and the model finds
structures outside the brain (measured on a synthetic head, 2026-12-03: hippocampus Dice 0.84 -> 0.70, a 1.6 mL false
detection in the scalp). This module finds the brain the way template-based defacing and skull-stripping tools do
(pydeface registers a mean head to the scan and carries its face mask back; FSL's ``fsl_anat`` and ANTs'
``antsBrainExtraction`` start from a head template and its brain mask), with nothing to install:

1. The **head reference**, built once per process: pydeface's mean whole-head T1 (a data file of the ``pydeface`` wheel,
   never imported), placed in MNI152 space by :data:`HEAD_TO_MNI` (a 12-parameter affine from registering its brain
   to the MNI152 brain, inside the MNI brain eroded by 4 mm so the skull cannot pull the fit; recomputed in
   ``Testing/test_skullstrip.py``), with the MNI152 brain mask as its brain.
2. A scan whose foreground is larger than any brain (:data:`HEAD_MIN_LITRES`) is registered to that reference
   (:func:`~TensorPEFTLib.data.align.align_to_reference`, NCC over the cranium only (:data:`CRANIUM_MM`: not the
   neck, jaw or face, which differ most between scans), 12 parameters), accepted as a T1 head by its correlation
   with the MNI152 brain inside the brain, then refined on the brain alone (so the skull's distance from the brain,
   which differs between people, does not scale the brain), and the reference's brain is carried back onto the
   scan's grid, grown by :data:`MARGIN_MM` so no cortex is cut; outside it the scan is set to its
   background level. Skull-stripped brains are recognised by their size and left alone.

Affine is not a brain-shaped fit to each individual: the mask follows the brain to a few millimetres at the cortex,
which the margin covers. Deep structures (hippocampus, ventricles) and the intensity scale are what the models need.
Registering the head also gives the scan's pose in MNI space (:attr:`BrainExtraction.to_mni`), which synthesis uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .align import align_to_reference, grid_affine, resample_through
from .preprocess import SKULL_STRIP_CHOICES, PreprocessingError

__all__ = ["BrainExtraction", "SkullStripError", "SKULL_STRIP_CHOICES", "HEAD_TO_MNI", "HEAD_MIN_LITRES",
           "MIN_HEAD_CORRELATION", "MARGIN_MM", "CRANIUM_MM", "head_reference", "fit_head_to_mni", "extract_brain",
           "strip_skull", "foreground_litres"]

#: a foreground larger than this (litres) is a head: skull-stripped template brains measure 1.8-1.9 L (MNI space is
#: larger than native), 2.5 L with the demo's +10 % scaling; pydeface's mean head 4.1 L
HEAD_MIN_LITRES = 2.8
#: after registration to the head reference, the scan's correlation with the MNI152 brain *inside* the brain (eroded by
#: 4 mm) below which it is not taken for a T1 head. The whole-head correlation cannot tell: anything head-shaped
#: matches the head's outline (a uniform sphere 0.83, smoothed noise 0.62, T1 heads 0.92-0.94). Inside the brain, 1 mm
#: T1 heads of ICBM 2009a/c brains 0.55-0.64, a T2-like inverted head 0.08, the sphere 0.00, the noise 0.00.
MIN_HEAD_CORRELATION = 0.3
#: the carried-back brain mask grown by this much, so an affine fit never cuts cortex
MARGIN_MM = 3.0
#: the head registration looks at the cranium only: the reference's brain and everything within this distance of it
#: (skull and scalp over the brain). Neck, jaw and face are what differ most between people's scans - a field of view
#: cut below the cerebellum, a face removed by defacing, the neck bent - and with them in the fit, a head cut below
#: the cerebellum did not register (correlation inside the brain 0.24; 0.56 with the cranium only, 2 mm, 2026-12-03)
CRANIUM_MM = 20.0
#: reference world (MNI152 mm) -> pydeface head world (mm): found by :func:`fit_head_to_mni`
HEAD_TO_MNI = np.array([
    [0.871, 0.065, 0.010, -4.700],
    [-0.077, 0.883, -0.105, 15.860],
    [-0.015, 0.093, 0.823, -2.525],
    [0.0, 0.0, 0.0, 1.0],
])
#: the head reference's grid in MNI152 mm: 2 mm voxels over the head, from the vertex to below the chin
HEAD_GRID_MM = 2.0
_HEAD_BOX = (np.array([-96.0, -136.0, -124.0]), np.array([96.0, 104.0, 110.0]))


class SkullStripError(PreprocessingError):
    """A whole-head scan whose brain could not be found (user error; the message names the file and what to do)."""


@dataclass(frozen=True)
class BrainExtraction:
    """``mask``: bool, on the scan's grid (True = brain and its margin); ``to_mni``: MNI152 world -> scan world (4 x 4,
    None when the scan was not registered); ``correlation``: NCC with the MNI152 brain inside the brain after the
    registration (None likewise); ``head``: whether the scan was taken for a whole head; ``litres``: its foreground
    volume."""

    mask: np.ndarray
    to_mni: np.ndarray | None
    correlation: float | None
    head: bool
    litres: float

    @property
    def unrecognised(self) -> bool:
        """Larger than a brain, registered, but no T1 brain lined up inside it (``auto`` then leaves it alone)."""
        return not self.head and self.correlation is not None

    def describe(self) -> str:
        if self.unrecognised:
            return (f"larger than a brain ({self.litres:.1f} L foreground) but not recognised as a T1 head (brain "
                    f"correlation {self.correlation:.2f} < {MIN_HEAD_CORRELATION}): not stripped; pass --skull-strip "
                    "on to require brain extraction, or strip it first")
        if not self.head:
            return f"brain only ({self.litres:.1f} L foreground): not stripped"
        kept = float(self.mask.mean()) * 100
        return (f"whole head ({self.litres:.1f} L foreground): brain found by registration to the head reference "
                f"(correlation {self.correlation:.2f}), {kept:.0f}% of the volume kept")


def _grid() -> tuple[tuple[int, int, int], np.ndarray]:
    low, high = _HEAD_BOX
    shape = tuple(int(v) for v in np.round((high - low) / HEAD_GRID_MM) + 1)
    return shape, grid_affine(shape, HEAD_GRID_MM, (low + high) / 2)  # type: ignore[return-value]


def _load(key: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    from .demo import DemoDataError, source_path

    try:
        path = source_path(key)
    except DemoDataError as err:
        raise SkullStripError(f"brain extraction of whole-head scans needs the head reference: {err}") from None
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _mni_brain(shape: Sequence[int], grid: np.ndarray) -> np.ndarray:
    data, affine = _load("mni152")
    brain = resample_through(data, affine, np.eye(4), shape, grid)
    top = float(np.percentile(brain[brain > 0], 99.5))
    return np.clip(brain / top, 0.0, 1.0).astype(np.float32)


_REFERENCE: dict[str, np.ndarray] = {}


def head_reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head (X, Y, Z) float32 in [0, 1], brain prior (X, Y, Z) float32 in [0, 1], voxel -> MNI world 4 x 4): the
    whole-head reference on its 2 mm grid in MNI152 space (built once per process, about two seconds). The brain
    prior is the MNI152 brain itself (intensities; > 0.05 is its mask)."""
    if not _REFERENCE:
        shape, grid = _grid()
        data, affine = _load("head")
        head = resample_through(data, affine, HEAD_TO_MNI, shape, grid)
        head = np.clip(head / float(np.percentile(head, 99.5)), 0.0, 1.0).astype(np.float32)
        brain = _mni_brain(shape, grid)
        _REFERENCE.update(head=head, brain=brain, grid=grid, inside=_brain_inside(brain), cranium=_cranium(brain))
    return _REFERENCE["head"], _REFERENCE["brain"], _REFERENCE["grid"]


def _cranium(brain: np.ndarray) -> np.ndarray:
    """Weights of the head registration (float32 0/1 on the reference grid): within :data:`CRANIUM_MM` of the brain."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~(brain > 0.05), sampling=HEAD_GRID_MM)
    return (distance <= CRANIUM_MM).astype(np.float32)


def _brain_inside(brain: np.ndarray) -> np.ndarray:
    """The MNI brain eroded by 4 mm (2 voxels of the 2 mm grid): where the head fit and the acceptance correlation
    look, so the skull's edge cannot pull either."""
    from scipy import ndimage

    return ndimage.binary_erosion(brain > 0.05, iterations=2)


def fit_head_to_mni(initial: np.ndarray | None = None, levels: Sequence[int] = (4, 2, 1)) -> tuple[np.ndarray, float]:
    """Register pydeface's mean head to the MNI152 brain (how :data:`HEAD_TO_MNI` was found): NCC inside the MNI brain
    eroded by 4 mm, so only the brain's inside (ventricles, grey / white matter) drives the fit and the skull's edge
    cannot (with the brain's edge included the fit shrank the head until its scalp met the brain's outline).
    Starts from the identity (both lie near the same origin). Returns (matrix, correlation); about 30 s."""
    _, brain, grid = head_reference()
    data, affine = _load("head")
    fit = align_to_reference(data, affine, brain, grid, weights=_REFERENCE["inside"].astype(np.float32), levels=levels,
                             iterations=(200, 120, 60)[: len(levels)],
                             initial=np.eye(4) if initial is None else initial)
    return fit.matrix, fit.correlation


def foreground_litres(array: np.ndarray, affine: np.ndarray) -> float:
    """Volume (L) of the scan's foreground (:func:`~TensorPEFTLib.data.preprocess.foreground_mask`)."""
    from .preprocess import foreground_mask

    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return float(foreground_mask(array).sum()) * voxel_ml / 1000.0


def extract_brain(array: np.ndarray, affine: np.ndarray, *, mode: str = "auto",
                  name: str = "the scan") -> BrainExtraction:
    """Find the brain of a scan (``array`` (X, Y, Z) with voxel -> world ``affine``, any orientation and intensity
    range). ``mode``: one of :data:`SKULL_STRIP_CHOICES`.

    A scan larger than a brain that does not register to the head reference as a T1 head (another contrast, a CT, a
    body part, an unusual head) is left alone by ``auto`` (:attr:`BrainExtraction.unrecognised`: the models are for
    any 3D scan, and a refusal would stop a user whose data are not heads) and refused by ``on`` with a
    :class:`SkullStripError` naming ``name``."""
    if mode not in SKULL_STRIP_CHOICES:
        raise SkullStripError(f"skull-strip mode {mode!r}: choose one of {', '.join(SKULL_STRIP_CHOICES)}")
    data = np.asarray(array, dtype=np.float32)
    litres = foreground_litres(data, affine)
    everything = np.ones(data.shape, dtype=bool)
    if mode == "off" or (mode == "auto" and litres < HEAD_MIN_LITRES):
        return BrainExtraction(everything, None, None, False, litres)
    head, brain, grid = head_reference()
    # 8 and 4 mm levels: the 2 mm level moved the brain by 0.3 mm on average (0.65 at most) for three times the time
    fit = align_to_reference(data, affine, head, grid, levels=(4, 2), iterations=(150, 100),
                             weights=_REFERENCE["cranium"])
    correlation = _brain_correlation(data, affine, fit.matrix, brain, grid)
    if correlation < MIN_HEAD_CORRELATION and mode == "auto":
        return BrainExtraction(everything, None, correlation, False, litres)
    if correlation < MIN_HEAD_CORRELATION:
        raise SkullStripError(
            f"{name}: larger than a brain ({litres:.1f} L), so taken for a whole head, but no T1 brain lines up inside "
            f"it (correlation {correlation:.2f} < {MIN_HEAD_CORRELATION} after registration): give a T1 scan, "
            f"skull-stripped first (SynthStrip, HD-BET, FSL bet) if the head is unusual, or pass --skull-strip auto "
            "or off")
    # Then the brain itself, from there: the MNI152 brain inside its eroded outline (where the acceptance looked). The
    # cranium fit follows the skull: a skull 6 mm further from the brain than the reference's scaled the brain mask to
    # 1.37x the true brain (a cerebellar false detection followed); 1.18x after, for every head style (2026-12-03).
    fit = align_to_reference(data, affine, brain, grid, levels=(2,), iterations=(100,),
                             weights=_REFERENCE["inside"], initial=fit.matrix)
    # the reference's brain on the scan's grid: scan world -> MNI is the inverse of the fit
    prior = resample_through(brain, grid, np.linalg.inv(fit.matrix), data.shape, affine)
    mask = _grown(prior > 0.05, affine, MARGIN_MM)
    return BrainExtraction(mask, fit.matrix, correlation, True, litres)


def _brain_correlation(data: np.ndarray, affine: np.ndarray, matrix: np.ndarray, brain: np.ndarray,
                       grid: np.ndarray) -> float:
    """NCC of the registered scan with the MNI152 brain inside the brain eroded by 4 mm (see
    :data:`MIN_HEAD_CORRELATION`)."""
    import torch

    from .align import _ncc

    inside = _REFERENCE["inside"]
    aligned = resample_through(data, affine, matrix, brain.shape, grid)
    return float(_ncc(torch.from_numpy(aligned[inside]), torch.from_numpy(brain[inside])))


def _grown(mask: np.ndarray, affine: np.ndarray, mm: float) -> np.ndarray:
    """``mask`` dilated by ``mm`` (an ellipsoid in the scan's voxels), its holes filled."""
    from scipy import ndimage

    voxel = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    radius = np.maximum(np.round(mm / voxel).astype(int), 0)
    axes = [np.arange(-r, r + 1) * v for r, v in zip(radius, voxel)]
    ball = sum(np.meshgrid(*[a**2 for a in axes], indexing="ij")) <= mm**2 + 1e-6
    return ndimage.binary_fill_holes(ndimage.binary_dilation(mask, structure=ball))


def strip_skull(array: np.ndarray, affine: np.ndarray, *, mode: str = "auto",
                name: str = "the scan") -> tuple[np.ndarray, BrainExtraction]:
    """The scan with everything outside its brain set to the scan's background level (its 0.5 % percentile, so scans
    in raw units with an offset keep their scale), and the :class:`BrainExtraction`. A brain-only scan comes back
    unchanged."""
    found = extract_brain(array, affine, mode=mode, name=name)
    data = np.asarray(array, dtype=np.float32)
    if not found.head:
        return data, found
    background = float(np.percentile(data, 0.5))
    return np.where(found.mask, data, background).astype(np.float32), found
