"""MONAI transform pipelines for segmentation training, validation, inference and DDPM synthesis.

Volumes are loaded by :class:`LoadVolumed`, a MONAI ``MapTransform`` around :func:`~TensorPEFTLib.data.io.read_volume`
(so ``.seg.nrrd`` layers and LPS NRRD geometry are read exactly as everywhere else in TensorPEFT); everything after
it is stock MONAI. Tensors come out channel-first ``(C, X, Y, Z)`` as ``MetaTensor`` with their RAS affine, so
``Invertd`` can bring a prediction back onto the input grid (see :func:`inverse_transforms`).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from .io import read_volume
from .preprocess import foreground_select, normalise_foreground

__all__ = [
    "LoadVolumed", "MapLabelsd", "ForegroundNormalised", "SkullStripd", "WorldGridSpacingd", "train_transforms", "val_transforms", "inference_transforms", "inverse_transforms",
    "synthesis_transforms", "AlignToReferenced", "run_pipeline", "user_error_of",
]


def _monai():
    return mt


def user_error_of(err: BaseException) -> BaseException | None:
    """The user's mistake behind ``err``, if there is one: MONAI's ``Compose`` re-raises whatever a transform raised
    as ``RuntimeError("applying transform ...")``, so a whole head that cannot be skull-stripped or an unreadable scan
    would otherwise reach the user as a traceback. Follows ``__cause__`` to a
    :class:`~TensorPEFTLib.data.preprocess.PreprocessingError`, ``DataError`` or ``VolumeError``."""
    from .datasets import DataError
    from .io import VolumeError
    from .preprocess import PreprocessingError

    seen = err
    while seen is not None:
        if isinstance(seen, (PreprocessingError, DataError, VolumeError)):
            return seen
        seen = seen.__cause__
    return None


def run_pipeline(pipeline: Any, data: Mapping[Hashable, Any]) -> Any:
    """``pipeline(data)``, raising the user's mistake itself rather than MONAI's wrapper (:func:`user_error_of`)."""
    try:
        return pipeline(data)
    except RuntimeError as err:
        cause = user_error_of(err)
        if cause is None:
            raise
        raise cause from None


class LoadVolumed(MapTransform):
    """Load the files named under ``keys`` into ``MetaTensor``s (affine = RAS voxel→world, ``filename_or_obj`` and
    ``original_affine`` set), through :func:`read_volume`. Singleton trailing axes are dropped."""

    def __init__(self, keys: Sequence[str] | str, allow_missing_keys: bool = False, dtype: Any = np.float32) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            vol = read_volume(d[key])
            arr = vol.squeezed
            meta = {"filename_or_obj": str(d[key]), "original_affine": vol.affine.copy(),
                    "spatial_shape": np.asarray(arr.shape[:3]), "space": "RAS"}
            d[key] = MetaTensor(torch.as_tensor(np.asarray(arr, dtype=self.dtype)),
                                affine=torch.as_tensor(vol.affine, dtype=torch.float64), meta=meta)
        return d


class MapLabelsd(MapTransform):
    """The user's label values → the model's classes (:meth:`~TensorPEFTLib.data.labels.LabelMap.to_classes`: values
    not in the map become background), right after loading, so resampling and cropping see classes."""

    def __init__(self, label_map: Any, keys: Sequence[str] | str = "label", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_map = label_map

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            classes = self.label_map.to_classes(np.asarray(value))
            d[key] = MetaTensor(torch.as_tensor(classes.astype(np.float32)), meta=dict(value.meta))  # affine in meta
        return d


class RandFlipSwapLabelsd(mt.RandFlipd):
    """``RandFlipd`` along one axis that also swaps the label's classes by ``permutation`` when it flips (class k
    becomes ``permutation[k]``): a left-right flip of a left and a right hippocampus labelled apart shows the left
    one where the right one lies, so its label must become the right one's. The random draw is ``RandFlipd``'s own
    (the same seed flips the same patches). Training only: not invertible."""

    def __init__(self, keys: Sequence[str], label_key: str, permutation: Sequence[int], prob: float,
                 spatial_axis: int) -> None:
        super().__init__(keys, prob=prob, spatial_axis=spatial_axis)
        self.label_key = label_key
        self.lookup = torch.as_tensor(list(permutation), dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy)
        if self._do_transform and self.label_key in d:
            label = d[self.label_key]
            swapped = self.lookup[torch.as_tensor(label).long()].to(torch.as_tensor(label).dtype)
            d[self.label_key] = MetaTensor(swapped, meta=dict(label.meta)) if isinstance(label, MetaTensor) else swapped
        return d


def _load(keys: Sequence[str], label_map: Any) -> list:
    """Load, and map the label's values to classes with ``label_map`` (None: the files hold classes already)."""
    steps: list[Any] = [LoadVolumed(keys)]
    if label_map is not None and "label" in keys:
        steps.append(MapLabelsd(label_map))
    return steps


class ForegroundNormalised(MapTransform):
    """Foreground-percentile intensity scaling of each channel of ``keys``
    (:func:`~TensorPEFTLib.data.preprocess.normalise_foreground`): the head / brain's 0.5–99.5 % → [0, 1], background
    0, whatever the field of view, scanner range or offset."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            out = np.stack([normalise_foreground(channel) for channel in array])
            if isinstance(img, MetaTensor):
                img = img.clone()
                img.data = torch.as_tensor(out, dtype=img.dtype)
                d[key] = img
            else:
                d[key] = torch.as_tensor(out)
        return d


class SkullStripd(MapTransform):
    """Brain extraction of whole-head scans (:func:`~TensorPEFTLib.data.skullstrip.strip_skull`) on each channel-first
    image of ``keys``, on the grid it has here (the working grid): everything outside the brain set to the scan's
    background level. ``mode``: ``auto`` (scans larger than a brain), ``on`` or ``off``. Not spatial, so ``Invertd``
    passes over it. What was done is described in the image's meta as ``skull_strip`` (for a head, and for a large
    scan ``auto`` did not recognise as one), and ``skull_stripped`` is set on a stripped image."""

    def __init__(self, keys: Sequence[str] | str, mode: str = "auto", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .skullstrip import strip_skull

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            affine = np.asarray(img.affine, dtype=np.float64) if isinstance(img, MetaTensor) else np.eye(4)
            name = str(img.meta.get("filename_or_obj", "the scan")) if isinstance(img, MetaTensor) else "the scan"
            stripped, found = strip_skull(array[0], affine, mode=self.mode, name=name)
            if not found.head:
                if found.unrecognised and isinstance(img, MetaTensor):  # say so: the user expected a head, or not
                    img = img.clone()
                    img.meta["skull_strip"] = found.describe()
                    d[key] = img
                continue
            out = array.copy()
            out[0] = stripped
            for channel in range(1, len(out)):  # other contrasts of the same head: the first one's brain
                out[channel] = np.where(found.mask, out[channel], np.percentile(out[channel], 0.5))
            if isinstance(img, MetaTensor):
                img = img.clone()
                img.data = torch.as_tensor(out, dtype=img.dtype)
                img.meta["skull_strip"] = found.describe()
                img.meta["skull_stripped"] = True
                d[key] = img
            else:
                d[key] = torch.as_tensor(out)
        return d


class WorldGridSpacingd(MapTransform, InvertibleTransform):
    """Resample ``keys`` onto a world-aligned RAS grid of ``pixdim`` mm whose voxel centres sit on a lattice fixed in
    world space (multiples of ``pixdim`` from the scanner origin), large enough to hold the whole input.

    MONAI's ``Spacingd(diagonal=True)`` starts its grid at the corner of each input's bounding box, so the same head
    stored RAS or obliquely landed on working grids offset by a fraction of a voxel (0.7, 0.0 and 0.5 voxels for one
    evaluation brain). On one lattice, every storage of a head gives the model the same voxels up to interpolation.
    All keys share the grid planned from the first; invertible (``Invertd`` brings predictions back onto the
    input's grid)."""

    def __init__(self, keys: Sequence[str] | str, pixdim: Sequence[float], mode: Sequence[str] | str = "bilinear",
                 allow_missing_keys: bool = False) -> None:
        from monai.transforms import SpatialResample

        super().__init__(keys, allow_missing_keys)
        self.pixdim = np.asarray(tuple(float(p) for p in pixdim), dtype=np.float64)
        self.mode = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        self.resampler = SpatialResample()

    def target(self, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The lattice grid (affine, spatial shape) covering every voxel centre of a volume."""
        n = np.asarray(shape[:3], dtype=np.float64) - 1
        corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
        world = (np.asarray(affine, dtype=np.float64) @ corners)[:3]
        low = np.floor(world.min(axis=1) / self.pixdim - 1e-6) * self.pixdim
        high = np.ceil(world.max(axis=1) / self.pixdim + 1e-6) * self.pixdim
        size = tuple(int(v) for v in np.round((high - low) / self.pixdim) + 1)
        out = np.diag([*self.pixdim, 1.0])
        out[:3, 3] = low
        return out, size  # type: ignore[return-value]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        plan = None
        for key, mode in self.key_iterator(d, self.mode):
            img = d[key]
            if plan is None:
                plan = self.target(np.asarray(img.affine, dtype=np.float64), img.shape[1:])
            d[key] = self.resampler(img, dst_affine=torch.as_tensor(plan[0]), spatial_size=plan[1], mode=mode,
                                    padding_mode="zeros", align_corners=False, dtype=torch.float32)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d


def _intensity(mt, key: str, intensity: str):
    if intensity == "foreground":
        return ForegroundNormalised(key)
    if intensity == "percentile":
        return mt.ScaleIntensityRangePercentilesd(key, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    if intensity == "zscore":
        return mt.NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    if intensity == "none":
        return None
    raise ValueError(f"intensity must be 'foreground', 'percentile', 'zscore' or 'none', got {intensity!r}")


def _geometry(mt, keys: Sequence[str], pixdim: Sequence[float] | None, orientation: str | None, modes: Sequence[str],
              label_classes: int | None = None):
    """Orientation and resampling. With ``label_classes`` the ``label`` key is resampled as nnU-Net resamples
    segmentations: one-hot, each class linearly, then the most likely class. Nearest-neighbour labels on a coarser
    grid are a fixed half-voxel jitter of every boundary (measured on a whole-brain hippocampus going from 1 mm to
    1.5 mm: Dice 0.892 against the atlas map thresholded on a 0.5 mm grid, 0.917 the linear way), the same in every
    step, which the model then learns."""
    out = []
    if orientation:
        out.append(mt.Orientationd(keys, axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pixdim:
        smooth = label_classes is not None and "label" in keys
        if smooth:
            out.append(mt.AsDiscreted("label", to_onehot=int(label_classes)))
            modes = tuple("bilinear" if key == "label" else mode for key, mode in zip(keys, modes))
        # onto a world-aligned RAS grid on a lattice fixed in world space, so an oblique or LPS scan gives the model
        # the same voxels as the same head stored RAS (the inverse brings predictions back onto the scan's own grid)
        out.append(WorldGridSpacingd(keys, pixdim=tuple(pixdim), mode=tuple(modes)))
        if smooth:
            out.append(mt.AsDiscreted("label", argmax=True))
    return out


def _skull_strip(mode: str) -> list:
    """Brain extraction on the working grid, after resampling (so a 1 mm head is registered at the model's spacing)
    and before the intensity scaling (so the brain's percentiles set the scale, not the scalp's fat)."""
    return [] if mode == "off" else [SkullStripd("image", mode)]


def _crop(mt, keys: Sequence[str], margin: int):
    """Crop to the head / brain found without labels (invertible: ``Invertd`` pads predictions back)."""
    return mt.CropForegroundd(keys, source_key="image", select_fn=foreground_select, margin=margin, allow_smaller=True)


def _crop_centres(mt, keys: Sequence[str], size: Sequence[int], pos: float, neg: float, num_samples: int,
                  classes: int | None) -> list:
    """Random crops of ``size`` centred on a label voxel (``pos``) or a background voxel inside the head (``neg``).

    The voxel lists are made once per case (deterministic, so CacheDataset keeps them) and the crops draw from them
    instead of searching the whole volume at every draw (15 ms per whole-brain patch, a third of the augmentation's
    time). With ``classes`` K > 2 (several structures) the label share is split evenly over the K − 1 structures:
    drawn from all label voxels at once, a 1.5 cm³ pallidum is the centre of a fifth as many patches as a 7 cm³
    thalamus, and the small structures new to a model were the last it learned (ten FreeSurfer structures: the
    hippocampi and pallidi still missing after 1250 steps). A structure missing from a case is not drawn there.
    """
    if classes is None or classes <= 2:
        return [mt.FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg", image_key="image", image_threshold=0.0),
                mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=size, pos=pos, neg=neg,
                                          num_samples=num_samples, image_key="image", image_threshold=0.0,
                                          fg_indices_key="label_fg", bg_indices_key="label_bg")]
    share = pos / (pos + neg) / (classes - 1)
    ratios = [neg / (pos + neg)] + [share] * (classes - 1)
    return [mt.ClassesToIndicesd("label", indices_postfix="_classes", num_classes=int(classes), image_key="image",
                                 image_threshold=0.0),
            mt.RandCropByLabelClassesd(keys, label_key="label", spatial_size=size, ratios=ratios,
                                       num_classes=int(classes), num_samples=num_samples, image_key="image",
                                       image_threshold=0.0, indices_key="label_classes", warn=False)]


def train_transforms(
    patch_size: Sequence[int] = (64, 64, 64),
    *,
    pixdim: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    intensity: str = "foreground",
    num_samples: int = 1,
    pos: float = 1.0,
    neg: float = 1.0,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (0, 1, 2),
    shift: float = 0.1,
    scale: float = 0.1,
    affine: bool = False,
    elastic: bool = False,
    crop_foreground: bool = True,
    label_classes: int | None = None,
    centre_jitter: int = 0,
    seed: int | None = None,
    skull_strip: str = "auto",
    label_map: Any = None,
    flip_swap: Sequence[int] | None = None,
    crop_classes: int | None = None,
):
    """Segmentation training pipeline on ``{"image", "label"}`` dicts (the papers' recipe).

    Load → channel first → orientation (RAS) → optional resampling to ``pixdim`` (onto a world-aligned RAS grid;
    labels through their one-hot classes when ``label_classes`` is given) → intensity normalisation (``foreground``: the head/brain's 0.5–99.5 % → [0, 1], background 0; ``percentile``: the
    same over the whole volume; ``zscore``: non-zero voxels) → crop to the head/brain foreground (+8 voxels) → pad
    to ``patch_size`` → the label's foreground / background voxel lists (cached with the volume) → ``num_samples``
    random ``patch_size`` crops centred on label / background at ``pos:neg`` (with ``crop_classes`` K > 2: the label
    share split evenly over the K − 1 structures, a random voxel of the chosen one, as nnU-Net's foreground sampling
    picks a class first)
    (with ``centre_jitter`` J: crops of ``patch_size + 2J`` centred so, then a random ``patch_size`` crop of them, so
    the chosen voxel lands anywhere within ±J of the patch centre) →
    random flips on each of ``flip_axes`` (``flip_prob``; after RAS orientation axis 0 is left-right, the one
    anatomically plausible flip for brain structures; ``flip_swap``: the class permutation a left-right flip applies
    to the label, for labels that tell a left from a right structure, :func:`~.labels.mirror_permutation`) → optional ``RandAffined`` (``affine``: rotation ±10°, scale
    ±10 %, shift ±8 voxels, p=0.8) → intensity shift ±``shift`` and scale ±``scale`` → optional ``Rand3DElasticd``
    (p=0.2). Output: ``image`` float (1, *patch_size), ``label`` (1, *patch_size).

    ``centre_jitter`` matters for a UNETR (absolute position embeddings): with the label voxel always at the patch
    centre, a fine-tuned model learned that a structure sits mid-patch and found less of it where the sliding
    windows put it elsewhere (the same brain stored two ways: hippocampus Dice 0.747 vs 0.692).

    ``affine`` matters most with a handful of subjects whose volumes are barely larger than the patch: the random crop
    then hardly moves the anatomy, and a UNETR (absolute position embeddings) learns *where* a structure sits in the
    patch instead of what it looks like, so it misses it on a subject that is scaled or rotated a little.
    """
    mt = _monai()
    keys = ["image", "label"]
    outer = tuple(int(p) + 2 * int(centre_jitter) for p in patch_size)
    steps: list[Any] = _load(keys, label_map) + [mt.EnsureChannelFirstd(keys, channel_dim="no_channel")]
    steps += _geometry(mt, keys, pixdim, orientation, ("bilinear", "nearest"), label_classes)
    steps += _skull_strip(skull_strip)
    norm = _intensity(mt, "image", intensity)
    if norm is not None:
        steps.append(norm)
    if crop_foreground:
        steps.append(_crop(mt, keys, margin=8))
    steps += [
        mt.SpatialPadd(keys, spatial_size=outer),
    ]
    steps += _crop_centres(mt, keys, outer, pos, neg, num_samples, crop_classes)
    if centre_jitter > 0:
        steps.append(mt.RandSpatialCropd(keys, roi_size=tuple(patch_size), random_size=False))
    if flip_prob > 0:
        swaps = flip_swap is not None and list(flip_swap) != list(range(len(flip_swap)))
        steps += [RandFlipSwapLabelsd(keys, "label", flip_swap, prob=flip_prob, spatial_axis=0)
                  if int(axis) == 0 and swaps else mt.RandFlipd(keys, prob=flip_prob, spatial_axis=int(axis))
                  for axis in flip_axes]
    if affine:
        steps.append(mt.RandAffined(keys, prob=0.8, rotate_range=(np.deg2rad(10.0),) * 3, scale_range=(0.1,) * 3,
                                    translate_range=(8,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"))
    if shift > 0:
        steps.append(mt.RandShiftIntensityd("image", offsets=shift, prob=1.0))
    if scale > 0:
        steps.append(mt.RandScaleIntensityd("image", factors=scale, prob=1.0))
    if elastic:
        steps.append(mt.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=0.2,
                                       mode=("bilinear", "nearest"), padding_mode="zeros"))
    steps.append(mt.EnsureTyped(keys, track_meta=False))
    pipeline = mt.Compose(steps)
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline


def val_transforms(
    *, pixdim: Sequence[float] | None = None, orientation: str | None = "RAS", intensity: str = "foreground",
    with_label: bool = True, crop_foreground: bool = True, label_classes: int | None = None, skull_strip: str = "auto",
    label_map: Any = None,
):
    """Validation / evaluation pipeline: the deterministic part of :func:`train_transforms` on the whole volume
    (cropped to the foreground plus a margin, not to patches), for sliding-window inference. ``with_label=False``
    for images alone."""
    mt = _monai()
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps: list[Any] = _load(keys, label_map) + [mt.EnsureChannelFirstd(keys, channel_dim="no_channel")]
    steps += _geometry(mt, keys, pixdim, orientation, modes, label_classes if with_label else None)
    steps += _skull_strip(skull_strip)
    norm = _intensity(mt, "image", intensity)
    if norm is not None:
        steps.append(norm)
    if crop_foreground:
        steps.append(_crop(mt, keys, margin=8))
    return mt.Compose(steps)


def inference_transforms(*, pixdim: Sequence[float] | None = None, orientation: str | None = "RAS",
                         intensity: str = "foreground", crop_foreground: bool = True, skull_strip: str = "auto"):
    """Pre-processing for ``segment`` on images without labels (``{"image": path}``)."""
    return val_transforms(pixdim=pixdim, orientation=orientation, intensity=intensity, with_label=False,
                          crop_foreground=crop_foreground, skull_strip=skull_strip)


def inverse_transforms(pre, keys: Sequence[str] | str = "pred", orig_key: str = "image", nearest: bool = True):
    """MONAI ``Invertd`` undoing ``pre`` (orientation, spacing) on ``keys``, so a prediction made on the
    pre-processed image lands on the original image's grid: then ``write_volume(path, pred, like=read_volume(image))``.

    Usage: ``post = inverse_transforms(pre); d["pred"] = logits_or_mask (MetaTensor-like, channel first); d = post(d)``.
    Build ``pre`` with ``crop_foreground=False``: after an oblique scan's resampling, MONAI's inverse of the crop
    puts the prediction in the wrong place (``segment_images`` crops and pastes back itself).
    """
    mt = _monai()
    return mt.Compose([mt.Invertd(keys=keys, transform=pre, orig_keys=orig_key, nearest_interp=nearest,
                                  to_tensor=True)])


class AlignToReferenced(MapTransform):
    """Load the files under ``keys`` registered to a model's reference brain and sampled on its grid
    (:func:`~TensorPEFTLib.data.align.aligned_volume`, 12-parameter affine): ``MetaTensor`` (1, *target.shape) with
    the grid's affine, whatever the scan's storage, voxel size and pose."""

    def __init__(self, keys: Sequence[str] | str, target: Any, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target = target

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .align import aligned_volume

        d = dict(data)
        for key in self.key_iterator(d):
            array, _ = aligned_volume(str(d[key]), self.target)
            meta = {"filename_or_obj": str(d[key]), "spatial_shape": np.asarray(array.shape), "space": "RAS"}
            d[key] = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(self.target.affine), meta=meta)
        return d


def synthesis_transforms(
    size: Sequence[int] = (32, 32, 32), *, flip_prob: float = 0.0, orientation: str | None = "RAS",
    pixdim: Sequence[float] | None = None, align: Any = None,
):
    """DDPM training pipeline on ``{"image"}`` dicts: load → RAS → optional resampling → 0–99.5 percentile to
    [0, 1] → centre pad/crop to ``size`` → optional left-right flip. Output ``image`` (1, *size) in [0, 1].
    ``align`` (an :class:`~TensorPEFTLib.data.align.AlignTarget`) replaces loading, orientation and resampling by
    registration to the model's reference brain on its grid (:class:`AlignToReferenced`)."""
    mt = _monai()
    if align is not None:
        steps: list[Any] = [AlignToReferenced("image", align)]
    else:
        steps = [LoadVolumed("image"), mt.EnsureChannelFirstd("image", channel_dim="no_channel")]
        steps += _geometry(mt, ["image"], pixdim, orientation, ("bilinear",))
    steps += [
        mt.ScaleIntensityRangePercentilesd("image", lower=0.0, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        mt.ResizeWithPadOrCropd("image", spatial_size=tuple(size)),
    ]
    if flip_prob > 0:
        steps.append(mt.RandFlipd("image", prob=flip_prob, spatial_axis=0))
    steps.append(mt.EnsureTyped("image", track_meta=False))
    return mt.Compose(steps)
