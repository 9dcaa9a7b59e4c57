"""A DICOM series — a folder of slice files, as a scanner or PACS exports a scan — read as one volume.

The slices are ordered along the slice normal (row direction × column direction of ImageOrientationPatient) by their
ImagePositionPatient, their stored values scaled by RescaleSlope / RescaleIntercept, and the voxel → patient
geometry (DICOM's LPS) turned into the RAS affine every other reader here gives: the same scan exported as NIfTI by
dcm2niix and read here as a series give the same array and affine. A folder holding several series, slices with
different orientations or sizes, a gap in the slice positions, or an enhanced (multi-frame) file is refused in one
line naming the folder and what to do. Written masks go to NIfTI / NRRD / .seg.nrrd / .mgz on the series' grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["is_dicom_file", "is_dicom_series", "read_dicom_series"]

#: slice spacing may vary by this fraction of its median before the series counts as having a gap
_SPACING_TOLERANCE = 0.05


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file: ``DICM`` at byte 128 (the name does not matter; many exports have no extension)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _slice_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def is_dicom_series(path: str | os.PathLike) -> bool:
    """A folder that directly holds DICOM files (one series, or several, which the reader then refuses by name)."""
    folder = Path(path)
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") and is_dicom_file(p)
                                   for p in folder.iterdir())


class _Error(ValueError):
    pass


def _headers(folder: Path, pixels: bool = False) -> list[tuple[Path, Any]]:
    """Every image slice's dataset (with its pixel data when ``pixels``: each file is read once)."""
    import pydicom

    out = []
    for path in _slice_files(folder):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels)
        except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            raise _Error(f"{path}: not a readable DICOM file ({type(err).__name__}); re-export the series") from None
        if "Rows" in ds and "Columns" in ds:  # an image; a DICOMDIR, report or presentation state beside it is not
            out.append((path, ds))
    if not out:
        raise _Error(f"{folder}: no DICOM image slices in this folder")
    return out


def _float_list(value: Any, count: int, what: str, path: Path) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.size != count:
        raise _Error(f"{path}: no usable {what}; a volume needs it (export the series from the scanner or PACS again)")
    return array


def read_dicom_series(folder: str | os.PathLike, header_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(array [i, j, k] = [column, row, slice], RAS affine)`` of the one series in ``folder``.

    ``header_only``: an uninitialised array of the right shape and dtype (float32), from the headers alone.
    Raises ValueError (one line, naming the folder or file) for what is not one regular 3D series."""
    folder = Path(folder)
    headers = _headers(folder, pixels=not header_only)
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        described = sorted({f"{getattr(ds, 'SeriesNumber', '?')} {getattr(ds, 'SeriesDescription', '')}".strip()
                            for _, ds in headers})
        raise _Error(f"{folder}: {len(series)} DICOM series in one folder ({'; '.join(described[:5])}); put each "
                     "series in its own folder and give that one")
    first_path, first = headers[0]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise _Error(f"{first_path}: an enhanced (multi-frame) DICOM file; convert it to NIfTI first (e.g. dcm2niix)")
    orientation = _float_list(getattr(first, "ImageOrientationPatient", None), 6, "ImageOrientationPatient",
                              first_path)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    spacing = _float_list(getattr(first, "PixelSpacing", None), 2, "PixelSpacing", first_path)
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for path, ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise _Error(f"{path}: {ds.Rows}x{ds.Columns} pixels where {first_path.name} has {shape[0]}x{shape[1]}; "
                         "not one volume (a localiser or another series mixed in?): remove it")
        own = _float_list(getattr(ds, "ImageOrientationPatient", None), 6, "ImageOrientationPatient", path)
        if np.abs(own - orientation).max() > 1e-4:
            raise _Error(f"{path}: slice orientation differs from {first_path.name}'s; not one volume (a localiser "
                         "mixed in?): remove it")
        position = _float_list(getattr(ds, "ImagePositionPatient", None), 3, "ImagePositionPatient", path)
        positions.append((float(position @ normal), position, path, ds))
    positions.sort(key=lambda item: item[0])
    distances = np.diff([p[0] for p in positions])
    if len(positions) > 1:
        if np.any(distances < 1e-4):
            raise _Error(f"{folder}: two slices at the same position ({positions[int(np.argmin(distances))][2].name}); "
                         "the folder holds repeated or multi-echo images: keep one volume's slices")
        median = float(np.median(distances))
        if np.any(np.abs(distances - median) > _SPACING_TOLERANCE * median):
            raise _Error(f"{folder}: slices are not evenly spaced (from {distances.min():.3g} to {distances.max():.3g} "
                         "mm): a slice is missing or the series is split; export it whole")
        step = (positions[-1][1] - positions[0][1]) / (len(positions) - 1)
    else:
        thickness = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 1) or 1)
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index i, PixelSpacing[1] apart
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index j
    lps[:3, 2] = step
    lps[:3, 3] = positions[0][1]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    volume_shape = (shape[1], shape[0], len(positions))
    if header_only:
        return np.empty(volume_shape, dtype=np.float32), affine
    array = np.empty(volume_shape, dtype=np.float32)
    for k, (_, _, path, ds) in enumerate(positions):
        try:
            pixels = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - a compressed transfer syntax without its decoder, a cut file
            raise _Error(f"{path}: cannot decode its pixels ({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                         "export the series uncompressed, or convert it to NIfTI (dcm2niix)") from None
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        array[:, :, k] = (np.asarray(pixels, dtype=np.float32) * slope + intercept).T
    return array, affine
