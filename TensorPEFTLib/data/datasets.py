"""Find the cases of a dataset and check them before any training starts.

Two layouts are understood:

- Medical Segmentation Decathlon / nnU-Net folders: ``imagesTr/`` + ``labelsTr/`` (and optional ``imagesTs/``,
  ``labelsTs/``), with an optional ``dataset.json`` whose ``training`` / ``test`` lists are used when present.
  nnU-Net's channel suffix (``case_0000.nii.gz`` ↔ ``case.nii.gz``) is understood; macOS ``._*`` files are skipped.
  An image may also be a folder holding one DICOM series (``imagesTr/case/*.dcm``, its label ``labelsTr/case.nii.gz``).
- A MONAI datalist JSON file (``{"training": [{"image": ..., "label": ...}], ...}``), paths relative to the file.

A case is a dict ``{"image": path, "label": path or None, "name": str}`` (plus ``group`` when the dataset.json
says so), ready for MONAI dictionary transforms.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .dicom import is_dicom_series
from .io import VOLUME_SUFFIXES, VolumeError, is_volume_file, read_volume
from .labels import FREESURFER_ASEG_NAMES

__all__ = ["DataError", "find_cases", "validate_cases", "case_name", "load_dataset_json", "label_centroids"]


class DataError(ValueError):
    """A dataset problem the user must fix; ``problems`` lists one line per file."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


def case_name(path: str | os.PathLike) -> str:
    """File name without the volume suffix (``hippo_001.nii.gz`` → ``hippo_001``)."""
    name = os.path.basename(str(path))
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


_CHANNEL = re.compile(r"^(.*)_(\d{4})$")


def _scan(folder: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if (entry.is_file() and is_volume_file(entry)) or (entry.is_dir() and is_dicom_series(entry)):
            found[case_name(entry)] = str(entry)  # a DICOM series is a folder named after its case
    return found


def load_dataset_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read dataset JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a dataset JSON must be an object with a 'training' list")
    return data


def _resolve(base: Path, value: Any, source: Path) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: entry {value!r} should be a file path (string)")
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def _from_list(entries: Any, base: Path, source: Path, key: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise DataError(f"{source}: '{key}' must be a list of {{'image': ..., 'label': ...}} entries")
    cases = []
    for item in entries:
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"{source}: entry {item!r} in '{key}' has no 'image'")
        image = item["image"]
        if isinstance(image, list):  # multi-channel datalists: first channel names the case
            raise DataError(f"{source}: multi-channel entries are not supported (entry {item['image']!r})")
        case = {k: v for k, v in item.items() if k not in ("image", "label")}
        case["image"] = _resolve(base, image, source)
        case["label"] = _resolve(base, item["label"], source) if item.get("label") else None
        case.setdefault("name", case_name(case["image"]))
        cases.append(case)
    return cases


def find_cases(source: str | os.PathLike, split: str = "training", *, require_labels: bool | None = None) -> list[dict[str, Any]]:
    """List the cases of ``split`` (``"training"`` or ``"test"``) in a Decathlon folder or a MONAI datalist JSON.

    ``require_labels`` (default: True for training, False for test) makes an image without a label an error.
    A label without an image is always an error. Raises DataError with one line per problem, each naming a file.
    """
    if split not in ("training", "test"):
        raise ValueError(f"split must be 'training' or 'test', got {split!r}")
    if require_labels is None:
        require_labels = split == "training"
    src = Path(source)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix.lower() != ".json":
            raise DataError(f"{src}: expected a dataset folder (imagesTr/, labelsTr/) or a MONAI datalist .json")
        data = load_dataset_json(src)
        if split not in data:
            raise DataError(f"{src}: no '{split}' list in this datalist")
        cases, problems = _from_list(data[split], src.parent, src, split), []
    else:
        cases, problems = _from_folder(src, split)
    for case in cases:
        if not (os.path.isfile(case["image"]) or is_dicom_series(case["image"])):
            problems.append(f"{case['image']}: image listed in the dataset but not found")
        if case.get("label") and not os.path.isfile(case["label"]):
            problems.append(f"{case['label']}: label listed for {os.path.basename(case['image'])} but not found")
        if require_labels and not case.get("label"):
            problems.append(f"{case['image']}: image without a label")
    if problems:
        raise DataError(_summary(problems), problems)
    if not cases:
        where = "imagesTr/" if split == "training" else "imagesTs/"
        raise DataError(f"{src}: no {split} cases found (expected volumes in {where} or a '{split}' list)")
    return cases


def _from_folder(root: Path, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    meta = root / "dataset.json"
    if meta.is_file():
        data = load_dataset_json(meta)
        if split in data and data[split]:
            return _from_list(data[split], root, meta, split), []
        if "tasks" in data and not (root / "imagesTr").is_dir():
            tasks = ", ".join(str(root / t) for t in data["tasks"])
            raise DataError(f"{root}: this is a cohort folder holding several tasks; point at one of: {tasks}")
    images_dir, labels_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
    if not (root / images_dir).is_dir():
        raise DataError(f"{root}: no {images_dir}/ folder (Decathlon layout: {images_dir}/ and {labels_dir}/)")
    images = _scan(root / images_dir)
    labels = _scan(root / labels_dir)
    cases, used = [], set()
    problems = []
    for name, image in images.items():
        stem = name
        m = _CHANNEL.match(name)
        if name not in labels and m:  # nnU-Net naming: case_0000 is channel 0 of case
            if m.group(2) != "0000" and (m.group(1) + "_0000") in images:
                continue  # a further channel of a multi-channel case
            stem = m.group(1)
        label = labels.get(stem)
        if label:
            used.add(stem)
        cases.append({"image": image, "label": label, "name": stem})
    for name, label in labels.items():
        if name not in used:
            problems.append(f"{label}: label without an image (expected {root / images_dir / (name + '.nii.gz')})")
    return cases, problems


def _summary(problems: list[str]) -> str:
    head = f"{len(problems)} problem(s) in the data, fix before training:" if len(problems) > 1 else problems[0]
    return head if len(problems) == 1 else head + "\n  " + "\n  ".join(problems)


def _affine_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    tol = 1e-3 * float(spacing.min()) if spacing.min() > 0 else 1e-3
    if np.allclose(a[:3, :3], b[:3, :3], atol=max(tol, 1e-5)) and np.allclose(a[:3, 3], b[:3, 3], atol=max(10 * tol, 1e-4)):
        return None
    parts = []
    sa, sb = spacing, np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(sa, sb, atol=max(tol, 1e-5)):
        parts.append(f"spacing {np.round(sa, 4).tolist()} vs {np.round(sb, 4).tolist()}")
    da, db = a[:3, :3] / np.where(sa == 0, 1, sa), b[:3, :3] / np.where(sb == 0, 1, sb)
    if not np.allclose(da, db, atol=1e-4):
        parts.append("direction differs")
    shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    if shift > 10 * tol:
        parts.append(f"origin differs by {shift:.3g} mm")
    return ", ".join(parts) or "affine differs"


def validate_cases(
    cases: Iterable[dict[str, Any]],
    num_classes: int | None = None,
    *,
    require_labels: bool = True,
    require_foreground: bool = True,
) -> list[dict[str, Any]]:
    """Read every image (and label) and check it is usable; raise DataError listing every problem, one line per
    file, before anything trains.

    Checks (:func:`check_volume`): readable / not truncated; 3D (a 2D slice, a 3D file with a singleton axis, or a
    4D series is refused); finite voxels (no NaN / Inf); an image that is not constant; image and label on the same grid (shape and affine); label values integers in
    ``0 .. num_classes-1`` (when given) with some foreground. Returns one summary dict per case (name, shape,
    spacing, label values, the names a ``.seg.nrrd`` gives them, each value's centre in world mm and volume in mL).
    """
    problems: list[str] = []
    report = []
    for case in cases:
        image_path, label_path = case["image"], case.get("label")
        info: dict[str, Any] = {"name": case.get("name", case_name(image_path)), "image": image_path, "label": label_path}
        image = _check_volume(image_path, "image", problems)
        if image is not None:
            info["shape"] = list(image.array.shape[:3])
            info["spacing"] = [round(s, 4) for s in image.spacing]
            info["image_centre"] = image_centre(image.array, image.affine)
        if not label_path:
            if require_labels:
                problems.append(f"{image_path}: image without a label")
            report.append(info)
            continue
        label = _check_volume(label_path, "label", problems)
        if label is None:
            report.append(info)
            continue
        values = _check_label_values(label_path, label.array, num_classes, require_foreground, problems)
        info["label_values"] = values
        info["label_names"] = {int(k): str(v) for k, v in (label.meta.get("segments") or {}).items()}
        if not info["label_names"] and label.meta.get("format") == "mgh":  # aseg.mgz: FreeSurfer's own names
            info["label_names"] = {v: FREESURFER_ASEG_NAMES[v] for v in values or [] if v in FREESURFER_ASEG_NAMES}
        if values:
            info["label_centroids"] = label_centroids(label.array, label.affine, values)
            info["label_volumes_ml"] = label_volumes_ml(label.array, label.affine, values)
        if image is not None:
            ishape, lshape = image.array.shape[:3], label.array.shape[:3]
            if ishape != lshape:
                problems.append(f"{label_path}: label shape {list(lshape)} differs from its image "
                                f"{os.path.basename(image_path)} {list(ishape)}; resample the label onto the image grid")
            else:
                diff = _affine_difference(image.affine, label.affine)
                if diff:
                    problems.append(f"{label_path}: label geometry differs from its image "
                                    f"{os.path.basename(image_path)} ({diff}); resample the label onto the image grid")
        report.append(info)
    if problems:
        raise DataError(_summary(problems), problems)
    return report


def image_centre(image: np.ndarray, affine: np.ndarray) -> list[float]:
    """World (RAS mm) centre of the image's bright half (voxels above the mean: the head or brain of an MRI, the body of
    a CT): where the midline of a head lies, whatever the field of view around it."""
    from scipy import ndimage

    array = np.asarray(image, dtype=np.float32)
    centre = np.asarray(ndimage.center_of_mass(array > float(array.mean())), dtype=np.float64)
    if not np.all(np.isfinite(centre)):
        centre = (np.asarray(array.shape, dtype=np.float64) - 1) / 2
    world = np.asarray(affine)[:3, :3] @ centre + np.asarray(affine)[:3, 3]
    return [round(float(c), 2) for c in world]


def label_centroids(labels: np.ndarray, affine: np.ndarray, values: Iterable[int]) -> dict[int, list[float]]:
    """Each non-zero label value's centre in world (RAS) mm, in one pass over the label map."""
    from scipy import ndimage

    wanted = [int(v) for v in values if int(v) != 0]
    if not wanted:
        return {}
    centres = ndimage.center_of_mass(np.ones(labels.shape, dtype=np.uint8), np.asarray(labels), wanted)
    voxels = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    world = voxels @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return {v: [round(float(c), 2) for c in xyz] for v, xyz in zip(wanted, world)}


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray, values: Iterable[int]) -> dict[int, float]:
    """Each non-zero label value's volume in mL."""
    from scipy import ndimage

    wanted = [int(v) for v in values if int(v) != 0]
    if not wanted:
        return {}
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = ndimage.sum_labels(np.ones(labels.shape, dtype=np.uint8), np.asarray(labels), wanted)
    return {v: round(float(c) * voxel_ml, 4) for v, c in zip(wanted, np.atleast_1d(counts))}


def check_volume(path: str, kind: str = "image"):
    """Read one volume and refuse it, with one line naming the file, when no model can use it: unreadable or
    truncated, not 3D (a 2D slice or a 4D series), NaN/Inf voxels, or (an image) the same value everywhere.
    ``finetune`` and ``segment`` both check every input with this before any work. Returns the Volume (3D array)."""
    try:
        vol = read_volume(path)
    except VolumeError as err:
        raise DataError(str(err)) from None
    arr = vol.squeezed  # a 4D file holding one volume is fine
    arr = arr if arr.ndim == 3 else None
    if arr is None or min(arr.shape) <= 1:
        shape = list(vol.array.shape)
        what = "2D" if vol.array.ndim < 3 or (arr is not None and min(arr.shape) <= 1) else f"{vol.array.ndim}D"
        raise DataError(f"{path}: {what} {kind} of shape {shape}; a 3D volume is needed (export the whole series, "
                        "one volume per file)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(f"{path}: {bad} NaN/Inf voxel(s) in the {kind}; fix or replace them (e.g. with 0) first")
    if kind == "image":
        low, high = np.min(arr), np.max(arr)
        if low == high:
            raise DataError(f"{path}: the image has the same value ({float(low):g}) in every voxel; it holds no "
                            "anatomy: check that it is the right file")
    vol.array = arr
    return vol


def _check_volume(path: str, kind: str, problems: list[str]):
    try:
        return check_volume(path, kind)
    except DataError as err:
        problems.append(str(err))
        return None


def _check_label_values(path: str, arr: np.ndarray, num_classes: int | None, require_foreground: bool,
                        problems: list[str]) -> list[int]:
    values = np.unique(arr)
    if arr.dtype.kind == "f" and np.any(values != np.round(values)):
        sample = [float(v) for v in values[values != np.round(values)][:3]]
        problems.append(f"{path}: label has non-integer values (e.g. {sample}); a label map holds class numbers")
        return []
    ints = [int(v) for v in values]
    if num_classes is not None:
        bad = [v for v in ints if v < 0 or v >= num_classes]
        if bad:
            problems.append(f"{path}: label has unexpected values {bad[:5]}; this task has classes 0..{num_classes - 1} "
                            f"(num_classes={num_classes})")
    elif any(v < 0 for v in ints):
        problems.append(f"{path}: label has negative values {[v for v in ints if v < 0][:5]}")
    if require_foreground and all(v == 0 for v in ints):
        problems.append(f"{path}: label has no foreground (all voxels are 0)")
    return ints
