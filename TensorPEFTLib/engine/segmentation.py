"""Segmentation (UNETR): the fine-tuning task, sliding-window inference and post-processing.

Images are brought to RAS orientation (and optionally resampled) and intensity-normalised by the data package's
MONAI pipelines; predictions are mapped back with MONAI's ``Invertd`` and written on the input image's exact grid.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .events import Events
from .runtime import EngineError, Runtime, is_out_of_memory


#: the segmentation losses ``finetune`` offers: ``dice-ce`` (default) is nnU-Net's, the soft Dice of the foreground
#: classes over the whole batch plus cross-entropy; ``dice-ce-all`` is MONAI's ``DiceCELoss`` as it comes, a Dice per
#: sample over every class, background included (what ``demo-unetr`` was pre-trained with). Why the default changed:
#: with half the patches drawn away from a small structure, a per-sample Dice on a patch without it is ~1 for any
#: foreground probability at all, and the background's near-perfect Dice dilutes the structure's; the fine-tuned
#: hippocampus came out 20-30 % too small. With the demo's recipe (LoRA-PT r=1, 1000 steps, 1 thread), mean Dice on
#: 18 whole-brain scans of unseen templates went from 0.728 (ICBM 2009c) / 0.691 (2009a) to 0.769 / 0.738, the masks'
#: volumes from 0.65-0.9x to 0.8-1.1x the reference's.
SEGMENTATION_LOSSES = ("dice-ce", "dice-ce-all")
#: how labels reach the working grid: ``linear`` (one-hot, each class linearly, most likely class: nnU-Net's way) or
#: ``nearest`` (how labels were resampled before; kept so older recipes reproduce)
LABEL_RESAMPLING = ("linear", "nearest")
#: how a patch's label centre is drawn when the labels hold several structures: ``voxels`` (any label voxel, so a
#: structure in proportion to its size; the default) or ``classes`` (a structure first, each as often, then one of its
#: voxels: nnU-Net's way; on ten FreeSurfer structures, 1250 steps, seed 0: mean Dice 0.626 against 0.612, the
#: pallidi a little better, the hippocampi found no sooner; docs/measurements.md)
PATCH_CENTRES = ("classes", "voxels")


def segmentation_loss(name: str, sharded: bool = False) -> nn.Module:
    """The loss called ``name`` (one of :data:`SEGMENTATION_LOSSES`) on logits (B, K, ...) and labels (B, 1, ...).

    ``sharded``: each rank of a data-parallel job holds a slice of the global batch. ``dice-ce-all`` and the
    cross-entropy are means over samples and voxels, so DDP's average of the ranks' gradients is the global batch's
    gradient as it is; ``dice-ce``'s Dice over the batch is not a mean, so its statistics are summed over the ranks
    first (:class:`BatchDiceCELoss`, as nnU-Net does under DDP)."""
    from monai.losses import DiceCELoss

    if name == "dice-ce":
        loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        return BatchDiceCELoss(loss) if sharded else loss
    if name == "dice-ce-all":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    raise EngineError(f"segmentation loss {name!r}: choose one of {', '.join(SEGMENTATION_LOSSES)}")


class BatchDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y, softmax, include_background=False, batch=True)`` with its Dice statistics
    summed over every rank of a data-parallel job, so that each rank's slice of the global batch trains as the whole
    batch does in one process (``Testing/test_distributed.py`` compares the two). The statistics are MONAI's
    (tp, fp, fn of the foreground classes over batch and space; its smoothing terms), the cross-entropy is
    ``DiceCELoss.ce`` itself; in a one-process job it equals ``DiceCELoss`` to rounding."""

    def __init__(self, monai_loss: nn.Module) -> None:
        super().__init__()
        self.monai_loss = monai_loss
        dice = monai_loss.dice
        self.smooth_nr, self.smooth_dr = float(dice.smooth_nr), float(dice.smooth_dr)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from monai.networks import one_hot

        from .distributed import sum_over_ranks

        classes = logits.shape[1]
        probs = torch.softmax(logits, 1)[:, 1:]
        target = one_hot(labels, num_classes=classes)[:, 1:]
        axes = [0, *range(2, logits.dim())]
        # (3, K-1): Σ p·t, Σ p, Σ t over this rank's patches, then over all ranks' patches
        stats = sum_over_ranks(torch.stack([(probs * target).sum(axes), probs.sum(axes), target.sum(axes)]))
        tp = stats[0]
        fp, fn = stats[1] - tp, stats[2] - tp
        dice = 1 - (2 * tp + self.smooth_nr) / (2 * (tp + 0.5 * fp + 0.5 * fn) + self.smooth_dr)
        return dice.mean() + self.monai_loss.ce(logits, labels)


class SegmentationTask:
    """UNETR fine-tuning on labelled cases: Dice + cross-entropy (:func:`segmentation_loss`), foreground-weighted
    random crops, the LoRA-PT augmentations, validation Dice by sliding-window inference on held-out cases."""

    kind = "segmentation"
    metric = "dice"
    higher_is_better = True

    def __init__(self, train_cases: list[dict], val_cases: list[dict], *, patch_size: Sequence[int], num_classes: int,
                 runtime: Runtime, batch_size: int = 2, preprocessing: Any = None,
                 sw_batch_size: int = 2, overlap: float = 0.25, affine: bool = False, elastic: bool = False,
                 flip_axes: Sequence[int] = (0, 1, 2), loss: str = "dice-ce", label_resampling: str = "linear",
                 centre_jitter: int = 16, shard: tuple[int, int] = (0, 1), label_map: Any = None,
                 flip_swap: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 patch_centres: str = "voxels") -> None:
        from monai.data import CacheDataset

        from ..data import train_transforms, val_transforms
        from ..data.preprocess import Preprocessing

        if label_resampling not in LABEL_RESAMPLING:
            raise EngineError(f"label resampling {label_resampling!r}: choose one of {', '.join(LABEL_RESAMPLING)}")
        if patch_centres not in PATCH_CENTRES:
            raise EngineError(f"patch centres {patch_centres!r}: choose one of {', '.join(PATCH_CENTRES)}")
        #: (rank, ranks): this process trains on patches rank·b .. rank·b + b − 1 of each step's global batch
        self.shard = (int(shard[0]), int(shard[1]))
        self.loss_fn = segmentation_loss(loss, sharded=self.shard[1] > 1)
        label_classes = num_classes if label_resampling == "linear" else None
        prep = preprocessing or Preprocessing()
        self.preprocessing = prep
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_classes, self.runtime, self.batch_size = num_classes, runtime, batch_size
        self.sw_batch_size, self.overlap = sw_batch_size, overlap
        self.train_transform = train_transforms(self.patch_size, pixdim=prep.spacing, intensity=prep.intensity,
                                                crop_foreground=prep.crop_foreground, affine=affine, elastic=elastic,
                                                flip_axes=flip_axes, label_classes=label_classes,
                                                centre_jitter=centre_jitter, skull_strip=prep.skull_strip,
                                                label_map=label_map, flip_swap=flip_swap,
                                                crop_classes=num_classes if patch_centres == "classes" else None)
        # CacheDataset keeps the deterministic prefix (load, resample, normalise, crop, pad) in memory; only the random
        # crop and augmentations run per step.
        self.train_data = CacheDataset(train_cases, self.train_transform, progress=False, num_workers=0)
        val_pre = val_transforms(pixdim=prep.spacing, intensity=prep.intensity, crop_foreground=prep.crop_foreground,
                                 label_classes=label_classes, skull_strip=prep.skull_strip, label_map=label_map)
        self.val_data = CacheDataset(val_cases, val_pre, progress=False, num_workers=0) if val_cases else None
        self.val_names = [c.get("name", os.path.basename(str(c["image"]))) for c in val_cases]
        #: what the validation calls classes 1..K (``class_names``: the label plan's names or values; else k)
        self.class_names = list(class_names or [])[: num_classes - 1]
        self.class_names += [str(k) for k in range(len(self.class_names) + 1, num_classes)]

    # ------------------------------------------------------------------ training
    def batch(self, step: int, micro: int, seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        picks = global_batch_picks(rng, len(self.train_data), self.batch_size, self.shard)
        images, labels = [], []
        for j, index in picks:
            # Random crop/flip/intensity of this sample depend on (seed, j) only: resume draws the same batch, and a
            # rank's slice of a data-parallel batch is what one process would draw at those positions.
            self.train_transform.set_random_state(seed=(seed + 7919 * j) % (2**31 - 1))
            sample = self.train_data[int(index)]
            sample = sample[0] if isinstance(sample, list) else sample
            images.append(torch.as_tensor(sample["image"]))
            labels.append(torch.as_tensor(sample["label"]))
        device = self.runtime.device
        return {"image": torch.stack(images).float().to(device), "label": torch.stack(labels).long().to(device)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model(batch["image"]).float(), batch["label"])

    # ------------------------------------------------------------------ validation
    def predict_logits(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return sliding_window(model, image.to(self.runtime.device), self.patch_size, self.sw_batch_size, self.overlap)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if self.val_data is None:
            return None
        per_class = []  # per case: Dice of classes 1..K
        for item in self.val_data:
            logits = self.predict_logits(model, torch.as_tensor(item["image"])[None].float())
            pred = logits.argmax(1)[0].cpu().numpy()
            per_class.append(class_dice(pred, np.asarray(item["label"])[0], self.num_classes))
        scores = [float(np.mean(case)) for case in per_class]
        result: dict[str, Any] = {"dice": float(np.mean(scores)), "per_case": [round(s, 4) for s in scores]}
        if self.num_classes > 2:  # which structure lags: a mean over ten hides one at 0
            result["structures"] = {name: round(float(np.mean([case[k] for case in per_class])), 4)
                                    for k, name in enumerate(self.class_names)}
        return result

    def report(self, model: nn.Module, out: str, history: dict[str, Any]) -> list[str]:
        from .report import segmentation_report

        example = None
        if self.val_data is not None and len(self.val_data):
            item = self.val_data[0]
            image = torch.as_tensor(item["image"])[None].float()
            with torch.no_grad(), self.runtime.autocast():
                pred = self.predict_logits(model, image).argmax(1)[0].cpu().numpy()
            example = (np.asarray(item["image"])[0], np.asarray(item["label"])[0], pred, self.val_names[0])
        return [segmentation_report(os.path.join(out, "report.png"), history, example, metric=self.metric)]


def global_batch_picks(rng: np.random.Generator, cases: int, batch_size: int,
                       shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int]]:
    """This rank's ``(position, case index)`` pairs of one step's global batch.

    The whole global batch (``batch_size`` per rank × ranks) is drawn from the step's one seeded stream and each
    rank takes its slice, so ``torchrun`` with N ranks of batch b trains on exactly the patches one process of batch
    N·b would (the test of data-parallel training compares the two); one process draws what it always drew."""
    rank, ranks = shard
    picks = rng.integers(cases, size=batch_size * ranks)
    return [(j, int(picks[j])) for j in range(rank * batch_size, (rank + 1) * batch_size)]


def sliding_window(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], sw_batch_size: int = 2,
                   overlap: float = 0.25, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """MONAI sliding-window inference with Gaussian blending; image (B, C, X, Y, Z) → logits (B, K, X, Y, Z).
    ``on_batch`` is called after each window batch (progress)."""
    from monai.inferers import sliding_window_inference

    predictor: Any = model
    if on_batch is not None:
        def predictor(window: torch.Tensor) -> torch.Tensor:
            out = model(window)
            on_batch()
            return out

    return sliding_window_inference(image, tuple(patch_size), sw_batch_size, predictor, overlap=overlap, mode="gaussian")


def window_count(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window places on a volume of ``shape`` (spatial)."""
    count = 1
    for size, roi in zip(shape, patch_size):
        if size <= roi:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        count *= int(math.ceil((size - roi) / interval)) + 1
    return count


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The tensor dims to flip for test-time mirroring along ``mirror_axes`` (spatial; every combination)."""
    spatial = [2 + int(axis) for axis in mirror_axes]
    return [dims for count in range(len(spatial) + 1) for dims in itertools.combinations(spatial, count)]


def predict_probabilities(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], sw_batch_size: int = 2,
                          overlap: float = 0.25, mirror_axes: Sequence[int] = (),
                          on_batch: Callable[[], None] | None = None,
                          mirror_classes: Sequence[int] | None = None) -> torch.Tensor:
    """Class probabilities by sliding-window inference; image (B, C, X, Y, Z) → softmax (B, K, X, Y, Z), float32.

    ``mirror_axes`` (spatial axes, 0 = left-right after RAS orientation): test-time mirroring as in nnU-Net, the
    softmax averaged over the image and its flips along every combination of these axes (2^len passes), each flipped
    back first. Use the axes the model was trained flipped on: it has learned both orientations there, and the
    average cancels part of its errors that are not mirror-symmetric. ``mirror_classes``: for labels that tell a
    left from a right structure, class k's mirror image (:func:`~TensorPEFTLib.data.labels.mirror_permutation`): a
    pass flipped left-right predicts the left hippocampus as the right one, so its classes are swapped back too.
    """
    flips = mirror_flips(mirror_axes)
    swap = list(mirror_classes) if mirror_classes is not None else None

    def probabilities(dims: tuple[int, ...]) -> torch.Tensor:
        logits = sliding_window(model, image.flip(dims) if dims else image, patch_size, sw_batch_size, overlap,
                                on_batch)
        probs = torch.softmax(logits.float(), dim=1)
        if swap is not None and 2 in dims:  # dim 2 = spatial axis 0, left-right
            probs = probs[:, swap]
        return probs.flip(dims) if dims else probs

    total = probabilities(flips[0])  # flips[0] is () : the image as it is
    for dims in flips[1:]:
        total += probabilities(dims)
    return total / len(flips)


def class_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..K-1 (a class absent from both counts as 1)."""
    scores = []
    for k in range(1, num_classes):
        p, g = pred == k, label == k
        denom = p.sum() + g.sum()
        scores.append(1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom))
    return scores


def mean_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over foreground classes 1..K-1 (a class absent from both counts as 1)."""
    return float(np.mean(class_dice(pred, label, num_classes)))


#: ``segment``'s largest piece removed by default (mm³): the LoRA-PT paper removes components under 1000 mm³
MIN_COMPONENT_MM3 = 1000.0
#: ``--min-component auto``: a piece of a structure is removed when it is smaller than this share of the structure's
#: largest piece in the same mask (and than :data:`MIN_COMPONENT_MM3`). A fixed 1000 mm³ removed every structure under
#: 1 mL whole: the accumbens (0.4-0.6 mL) validated 0.72 / 0.51 in a 16-structure fine-tune and came out of
#: ``segment`` empty on every test scan (benchmarks/results/own_labels_aseg_cpu_2026-12-05.md)
MIN_COMPONENT_SHARE = 0.25


def remove_small_components(mask: np.ndarray, spacing: Sequence[float],
                            min_volume_mm3: float | None = None) -> np.ndarray:
    """Drop connected components (26-connectivity, per class) smaller than ``min_volume_mm3``.

    ``None`` (``segment --min-component auto``): per class, components smaller than :data:`MIN_COMPONENT_SHARE` of
    that class's largest component and smaller than :data:`MIN_COMPONENT_MM3`; a class's largest piece always stays,
    so a structure smaller than 1 mL is not removed whole, while specks far from it still go (a 3.5 mL hippocampus:
    pieces under 875 mm³). A number: the same threshold for every class (the LoRA-PT paper removes components under
    1000 mm³; 0 keeps all). Thresholds are in mm³ so that they mean the same at any voxel size.
    """
    if min_volume_mm3 is not None and min_volume_mm3 <= 0:
        return mask
    from scipy import ndimage

    voxel_mm3 = float(np.prod(spacing))
    out = mask.copy()
    # each class is labelled inside its own bounding box (one pass finds them all), not over the whole scan: sixteen
    # structures meant sixteen passes over a 1 mm head
    for k, box in enumerate(ndimage.find_objects(mask), start=1):
        if box is None:  # a class the mask does not have
            continue
        components, _ = ndimage.label(mask[box] == k, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background, never removed
        limit_mm3 = (min(MIN_COMPONENT_MM3, MIN_COMPONENT_SHARE * float(sizes.max()) * voxel_mm3)
                     if min_volume_mm3 is None else min_volume_mm3)
        small = np.flatnonzero((sizes > 0) & (sizes < int(math.ceil(limit_mm3 / voxel_mm3))))
        out[box][np.isin(components, small)] = 0
    return out


def check_image(path: str, volume: Any, preprocessing: Any, patch_size: Sequence[int]) -> None:
    """Refuse, with one line naming the file, a scan the model cannot segment: not 3D, voxels more than 3x off the
    working spacing, or smaller than one patch once resampled."""
    from ..data.preprocess import PreprocessingError, check_spacing, resampled_shape

    shape = tuple(volume.shape)
    squeezed = [n for n in shape if n > 1]
    if len(shape) < 3 or len(squeezed) < 3:
        raise PreprocessingError(f"{path}: a {len(squeezed)}D image ({'x'.join(map(str, shape))}); segment needs a 3D "
                                 "volume: export the whole series, not one slice")
    if len(shape) > 3 and any(n > 1 for n in shape[3:]):
        raise PreprocessingError(f"{path}: a 4D image ({'x'.join(map(str, shape))}); segment needs one 3D volume: "
                                 "split the series and pass one volume")
    check_spacing(path, volume.affine, preprocessing.spacing)
    extent = resampled_shape(shape, volume.affine, preprocessing.spacing)
    if any(e < p for e, p in zip(extent, patch_size)):
        where = "x".join(f"{s:g}" for s in preprocessing.spacing) + " mm" if preprocessing.spacing else "its own grid"
        raise PreprocessingError(f"{path}: {'x'.join(map(str, extent))} voxels at {where}, smaller than the model's "
                                 f"{'x'.join(map(str, patch_size))} patch; give a scan with a larger field of view")


def precheck_images(images: Sequence[str], preprocessing: Any, patch_size: Sequence[int]) -> list[tuple[str, Exception]]:
    """Header checks of every image (readable, 3D, spacing, size; :func:`check_image`) before the first is
    segmented. Returns ``(path, error)`` for each one that fails; an empty list when all pass."""
    from ..data import DataError, VolumeError, read_volume
    from ..data.preprocess import Preprocessing, PreprocessingError

    prep = preprocessing or Preprocessing()
    failures: list[tuple[str, Exception]] = []
    for path in images:
        try:
            check_image(path, read_volume(path, header_only=True), prep, patch_size)
        except (VolumeError, DataError, PreprocessingError) as err:
            failures.append((path, err))
    return failures


def segment_images(model: nn.Module, images: list[str], outputs: list[str], runtime: Runtime, events: Events, *,
                   patch_size: Sequence[int], preprocessing: Any = None, sw_batch_size: int = 4,
                   overlap: float = 0.5, min_component_mm3: float | None = None,
                   mirror_axes: Sequence[int] = (),
                   failures: list[tuple[str, Exception]] | None = None,
                   label_map: Any = None, mirror_classes: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Segment each image and write its label map on the image's own grid, in the label values (and, in a
    ``.seg.nrrd``, the names) of ``label_map`` (a :class:`~TensorPEFTLib.data.labels.LabelMap`; None: class k is
    written as k). Returns one record per image.

    Each image is resampled to the working grid (``preprocessing``: a :class:`~TensorPEFTLib.data.preprocess.
    Preprocessing`), intensity-scaled on its foreground and cropped to it; the sliding window runs on that crop
    and the prediction goes back onto the image's own grid and orientation. Progress: a ``step`` event per window
    batch (``step``/``steps`` window batches of image ``image_index``/``images``, ``eta_seconds``); the image's last one also
    carries its record (mask, foreground volume). ``mirror_axes``, ``mirror_classes``: test-time mirroring (see
    :func:`predict_probabilities`).

    Each image's voxels are checked first (:func:`~TensorPEFTLib.data.check_volume`: NaN/Inf, constant, truncated).
    With ``failures`` (a list) an image that cannot be segmented is appended there as ``(path, error)`` and the
    others go on; without it the first such error is raised. A failed write (disk full) always stops the job."""

    from monai.data import MetaTensor  # noqa: F401 - Invertd needs the tracked metadata

    from ..data import DataError, VolumeError, check_volume, inference_transforms, inverse_transforms
    from ..data.io import VolumeWriteError
    from ..data.preprocess import Preprocessing, PreprocessingError

    prep = preprocessing or Preprocessing()
    raise_first = failures is None
    # The foreground crop is done here, not by MONAI's invertible CropForeground: after an oblique scan's
    # resampling, Invertd put the cropped prediction back at the wrong place (hippocampus Dice 0.92 -> 0.00 on an
    # oblique whole-brain scan), so the pipeline only resamples and normalises and the crop is pasted back by hand.
    pre = inference_transforms(pixdim=prep.spacing, intensity=prep.intensity, crop_foreground=False,
                               skull_strip=prep.skull_strip)
    # The class probabilities go back onto the scan's grid with linear interpolation and the mask is their argmax
    # there (as nnU-Net does), not a nearest-neighbour copy of the coarser working grid's labels: smooth edges at
    # the scan's own resolution, and an oblique scan no longer loses the staircase of a rotated 1.5 mm grid.
    post = inverse_transforms(pre, keys="pred", orig_key="image", nearest=False)
    model.eval()
    found = precheck_images(images, prep, patch_size)
    if found and failures is None:
        raise found[0][1]
    for path, err in found:
        events.warn(f"skipping {err}")
    failures = failures if failures is not None else []
    failures.extend(found)
    bad = {path for path, _ in found}
    todo = [(path, out_path) for path, out_path in zip(images, outputs) if path not in bad]
    records = []
    for index, (path, out_path) in enumerate(todo):
        try:
            check_volume(path, "image")
            record = _segment_one(model, path, out_path, index, len(todo), runtime, events, pre, post, prep,
                                  patch_size, sw_batch_size, overlap, min_component_mm3, mirror_axes, label_map,
                                  mirror_classes)
        except (DataError, PreprocessingError, VolumeError) as err:
            if raise_first or isinstance(err, VolumeWriteError):
                raise
            events.warn(f"skipping {err}")
            failures.append((path, err))
            continue
        records.append(record)
    return records


def _segment_one(model: nn.Module, path: str, out_path: str, index: int, count: int, runtime: Runtime,
                 events: Events, pre: Any, post: Any, prep: Any, patch_size: Sequence[int], sw_batch_size: int,
                 overlap: float, min_component_mm3: float | None, mirror_axes: Sequence[int],
                 label_map: Any = None, mirror_classes: Sequence[int] | None = None) -> dict[str, Any]:
    import time

    from ..data import read_volume, write_volume
    from ..data.preprocess import PreprocessingError, foreground_box, foreground_mask
    from ..data.transforms import run_pipeline

    reference = read_volume(path, header_only=True)
    data = run_pipeline(pre, {"image": path})
    working = data["image"]
    meta = getattr(working, "meta", {})
    stripped = bool(meta.get("skull_stripped"))
    if meta.get("skull_strip"):  # a head stripped: a line for people; a large scan left alone: a warning, for GUIs too
        say = events.message if stripped else events.warn
        say(f"{os.path.basename(path)}: {meta['skull_strip']}")
    box = (slice(None),) * 3
    if prep.crop_foreground:
        found = foreground_box(foreground_mask(np.asarray(working[0])), margin=8)
        box = found if found is not None else box
    image = torch.as_tensor(np.asarray(working[0][box]))[None, None].float()
    if not torch.any(image > 0):
        raise PreprocessingError(f"{path}: no foreground found (the image has no contrast); check that it is the "
                                 "right file and not empty")
    batch = sw_batch_size
    passes = len(mirror_flips(mirror_axes))
    while True:
        total = passes * int(math.ceil(window_count(image.shape[2:], patch_size, overlap) / batch))
        done, started = [0], time.perf_counter()
        name = os.path.basename(path)
        events.start_bar(total, f"{name} ({index + 1}/{count})" if count > 1 else name)

        def on_batch() -> None:
            done[0] += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / done[0] * (total - done[0])
            events.update_bar(1)
            if done[0] < total:
                events.emit("step", step=done[0], steps=total, image_index=index + 1, images=count,
                            eta_seconds=round(eta, 1), stage="sliding window")

        try:
            with torch.no_grad(), runtime.autocast():
                probs = predict_probabilities(model, image.to(runtime.device), patch_size, batch, overlap,
                                              mirror_axes, on_batch, mirror_classes)
            break
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            events.close_bar()
            if not is_out_of_memory(err):
                raise
            if runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            if batch == 1:
                raise EngineError(f"{path}: out of GPU memory even with --sw-batch-size 1; use --device cpu") from None
            batch = max(1, batch // 2)
            events.message(f"out of GPU memory: retrying {os.path.basename(path)} with sliding-window batch {batch}")
    events.close_bar()
    classes = probs.shape[1]
    full = torch.zeros((classes, *working.shape[1:]), dtype=torch.float32)
    full[0] = 1.0  # outside the foreground crop: background
    full[(slice(None), *box)] = probs[0].float().cpu()
    data["pred"] = _as_meta(full, working)
    inverted = post(data)["pred"]
    mask = np.asarray(torch.as_tensor(inverted).argmax(0)).astype(np.uint8)
    if tuple(mask.shape) != tuple(reference.shape[:3]):
        raise RuntimeError(f"{path}: prediction grid {mask.shape} differs from the image's {reference.shape}")
    mask = remove_small_components(mask, reference.spacing, min_component_mm3)
    names = None
    if label_map is not None:
        mask, names = label_map.to_values(mask), label_map.segment_names()
    write_volume(out_path, mask, like=reference, segment_names=names)
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    volumes = {int(v): round(float(n) * voxel_ml, 3) for v, n in zip(*np.unique(mask, return_counts=True)) if v}
    record = {"image": path, "mask": out_path, "foreground_ml": round(float((mask > 0).sum()) * voxel_ml, 3),
              "structures_ml": volumes,
              "sw_batch_size": batch, "window_batches": done[0], "skull_stripped": stripped,
              "seconds": round(time.perf_counter() - started, 2)}
    events.emit("step", step=total, steps=total, image_index=index + 1, images=count, eta_seconds=0.0, **record)
    return record


def _as_meta(pred: torch.Tensor, like: Any) -> Any:
    """The prediction as a MetaTensor carrying the pre-processed image's metadata and transform trace, which Invertd
    follows back to the original grid."""
    from monai.data import MetaTensor

    meta = MetaTensor(pred.float(), meta=dict(like.meta))  # the meta carries the affine
    meta.applied_operations = list(like.applied_operations)
    return meta
