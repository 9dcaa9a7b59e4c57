"""Small synthetic data sets and saved tiny models for end-to-end tests (built in a second or two)."""

from __future__ import annotations

import json
import os

import numpy as np

TINY_UNETR = dict(num_layers=4, img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=192, num_heads=4)
TINY_DDPM = dict(num_res_blocks=1, channels=(32, 32, 64), attention_levels=(False, False, True), num_head_channels=(0, 0, 32))


def oblique_affine(spacing=(1.2, 1.0, 1.5), angle=0.3, origin=(-20.0, 12.0, 5.0)) -> np.ndarray:
    """A non-axis-aligned, anisotropic voxel-to-RAS affine."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def blob_case(rng: np.random.Generator, shape=(36, 34, 34)) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright ellipsoid (label 1) and a dimmer distractor blob (label 0) in noise. At the default
    oblique affine's 1.5 mm slices, 34 slices (51 mm) still cover the tiny UNETR's 32-voxel patch."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    centre = np.array(shape) / 2 + rng.uniform(-4, 4, size=3)
    radii = rng.uniform(5, 7, size=3)
    inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
    distractor_centre = centre + np.array([0, 0, 9.0]) * rng.choice([-1, 1])
    distractor = (((grid - distractor_centre) / 3.0) ** 2).sum(-1) <= 1
    image = rng.normal(0.2, 0.05, size=shape).astype(np.float32)
    image[inside] += 0.6
    image[distractor] += 0.3
    return image, inside.astype(np.uint8)


def write_segmentation_dataset(root: str, n_train: int = 4, n_test: int = 2, seed: int = 0, affine=None) -> str:
    """Decathlon layout: imagesTr/labelsTr (n_train), imagesTs/labelsTs (n_test), dataset.json."""
    from TensorPEFTLib.data import write_volume

    rng = np.random.default_rng(seed)
    affine = oblique_affine() if affine is None else affine
    for split, count in (("Tr", n_train), ("Ts", n_test)):
        os.makedirs(os.path.join(root, f"images{split}"), exist_ok=True)
        os.makedirs(os.path.join(root, f"labels{split}"), exist_ok=True)
        for i in range(count):
            image, label = blob_case(rng)
            name = f"case_{split.lower()}{i:02d}.nii.gz"
            write_volume(os.path.join(root, f"images{split}", name), image, like=affine)
            write_volume(os.path.join(root, f"labels{split}", name), label, like=affine)
    with open(os.path.join(root, "dataset.json"), "w") as handle:
        json.dump({"name": "blobs", "labels": {"0": "background", "1": "blob"}}, handle)
    return root


def write_volume_dataset(root: str, n: int = 3, seed: int = 0, shape=(20, 20, 20)) -> str:
    """Decathlon-style imagesTr/ of smooth random volumes for the DDPM path."""
    from scipy import ndimage

    from TensorPEFTLib.data import write_volume

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    for i in range(n):
        volume = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 2.0)
        write_volume(os.path.join(root, "imagesTr", f"vol_{i:02d}.nii.gz"), volume, like=np.diag([4.0, 4.0, 4.0, 1.0]))
    return root


def save_tiny_model(path: str, kind: str = "unetr", seed: int = 0, spacing=None) -> str:
    """A saved tiny UNETR/DDPM (preset + overrides in the file), as `--model FILE` takes it. ``spacing``: the
    working voxel size (mm) the UNETR records, as a pre-trained model does."""
    import torch

    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.checkpoints import save_model

    torch.manual_seed(seed)
    if kind == "unetr":
        model = build_model("unetr-small", **TINY_UNETR)
        if spacing is not None:
            from TensorPEFTLib.data.preprocess import Preprocessing

            model.tensorpeft_spec["preprocessing"] = Preprocessing(spacing=tuple(spacing)).to_dict()
    else:
        model = build_model("ddpm-small", **TINY_DDPM)
        from conftest import as_if_pretrained

        as_if_pretrained(model)
    return save_model(model, path)


def write_dicom_series(folder: str, volume: np.ndarray, affine: np.ndarray, *, slope: float = 0.5,
                       intercept: float = -100.0, series_uid: str | None = None, series_number: int = 1,
                       shuffle: bool = True) -> list[str]:
    """``volume`` ([i, j, k] = column, row, slice; RAS ``affine``) as a DICOM MR series, one uncompressed file per
    slice, stored values = (volume - intercept) / slope in int16, files named in a shuffled order (as exports come)
    and without an extension. Returns the file paths."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    pixel = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))  # PixelSpacing: rows apart, columns apart
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    order = np.random.default_rng(0).permutation(volume.shape[2]) if shuffle else np.arange(volume.shape[2])
    paths = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"IM{n:04d}")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, series_number
        ds.Modality, ds.SeriesDescription = "MR", f"T1 series {series_number}"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[col_step / pixel[1], row_step / pixel[0]]]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * slice_step]
        ds.PixelSpacing = [f"{pixel[0]:.6f}", f"{pixel[1]:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(slice_step):.6f}"
        ds.InstanceNumber = int(k) + 1
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)  # rows x columns
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
