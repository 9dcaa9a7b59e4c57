"""Read and write 3D volumes with their geometry: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``) and Slicer
segmentations (``.seg.nrrd``).

Conventions (the same for every format, so a mask written ``like=`` its image overlays it in any viewer):

- ``Volume.array`` is indexed ``[i, j, k]`` in the file's own voxel order (NIfTI: as nibabel gives it; NRRD: the
  spatial axes in file order, i.e. the fastest-varying axis first, as pynrrd gives it).
- ``Volume.affine`` is the 4×4 voxel-index → world transform in **RAS** millimetres (nibabel's convention). NRRD
  files written by Slicer / ITK store LPS ``space directions`` / ``space origin``; they are converted on read and
  written back as LPS.
- ``Volume.spacing`` is the voxel size in mm along i, j, k (the column norms of the affine).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import write_atomically

__all__ = [
    "Volume", "VolumeError", "read_volume", "write_volume", "volume_format", "is_volume_file", "VOLUME_SUFFIXES",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mgz", ".mgh")

# NRRD "space" names → sign of each axis relative to RAS (x: +R, y: +A, z: +S)
_NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "scanner-xyz": (1, 1, 1), "3d-right-handed": (1, 1, 1),
}


class VolumeError(ValueError):
    """A volume file cannot be read or written (user error; the message names the file)."""


class VolumeWriteError(VolumeError):
    """An output could not be written (disk full, read-only, forbidden); nothing was left half-written."""


@dataclass
class Volume:
    """A 3D (or 4D multi-channel) array with its geometry.

    Attributes:
        array: numpy array, spatial axes first (``[i, j, k]`` or ``[i, j, k, c]``).
        affine: 4×4 float64 voxel → RAS world (mm).
        path: the file it came from, if any.
        meta: format extras, e.g. ``{"segments": {1: "hippocampus"}}`` for a ``.seg.nrrd``.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def squeezed(self) -> np.ndarray:
        """The array without trailing singleton axes (a 4D file holding one volume reads as 3D)."""
        array = self.array
        while array.ndim > 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return array

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3×3 direction cosines (RAS), columns = voxel axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)


def volume_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"seg.nrrd"``, ``"nrrd"`` or ``"mgh"`` (FreeSurfer's ``.mgz`` / ``.mgh``) from the file name;
    raises VolumeError otherwise."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith((".mgz", ".mgh")):
        return "mgh"
    raise VolumeError(f"{path}: unsupported file type; use .nii, .nii.gz, .nrrd, .seg.nrrd or .mgz")


def is_volume_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(VOLUME_SUFFIXES)


# ----------------------------------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike, *, header_only: bool = False) -> Volume:
    """Read a volume and its geometry (see the module docstring for conventions): a file, or a folder holding one
    DICOM series (:mod:`.dicom`).

    ``.seg.nrrd`` files are returned as one 3D label map whatever their storage (a single labelmap layer or 4D
    layers): see :func:`_read_seg_nrrd`. With ``header_only=True`` the array is an empty array of the right shape
    for NIfTI (cheap geometry checks); NRRD is always read fully.
    Raises VolumeError (naming the file) for missing, unreadable or truncated files.
    """
    path = str(path)
    if os.path.isdir(path):
        return _read_dicom(path, header_only)
    fmt = volume_format(path)
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: file not found")
    try:
        if fmt in ("nifti", "mgh"):
            return _read_nibabel(path, header_only, fmt)
        if fmt == "seg.nrrd":
            return _read_seg_nrrd(path)
        return _read_nrrd(path)
    except VolumeError:
        raise
    except Exception as err:  # nibabel / pynrrd / gzip / zlib raise many kinds for a bad file
        detail = " ".join(str(err).split())  # one line: nibabel's messages span several
        raise VolumeError(f"{path}: cannot read ({type(err).__name__}: {detail}); the file is unreadable or truncated "
                          "— re-export it") from None


def _read_dicom(path: str, header_only: bool) -> Volume:
    """A folder holding one DICOM series (:mod:`.dicom`)."""
    from .dicom import is_dicom_series, read_dicom_series

    if not is_dicom_series(path):
        raise VolumeError(f"{path}: a folder without DICOM files; give a volume file, or the folder of one DICOM series")
    try:
        array, affine = read_dicom_series(path, header_only=header_only)
    except ImportError:
        raise VolumeError(f"{path}: reading DICOM needs the pydicom package (pip install pydicom)") from None
    except ValueError as err:
        raise VolumeError(str(err)) from None
    return Volume(array=array, affine=affine, path=path, meta={"format": "dicom"})


def _read_nibabel(path: str, header_only: bool, fmt: str = "nifti") -> Volume:
    """NIfTI, or FreeSurfer's MGH/MGZ (``T1.mgz``, ``aseg.mgz``): nibabel gives both with their voxel → RAS affine."""
    import nibabel as nib

    img = nib.load(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if header_only:
        array = np.empty(img.shape, dtype=img.get_data_dtype())  # uninitialised, shape/dtype only
    else:
        array = np.asanyarray(img.dataobj)
        if array.shape != img.shape:
            raise VolumeError(f"{path}: data shape {array.shape} does not match header {img.shape}; truncated file?")
    return Volume(array=array, affine=affine, path=path, meta={"format": fmt})


def _nrrd_affine(header: Mapping[str, Any], path: str) -> tuple[np.ndarray, list[int]]:
    """RAS affine from a NRRD header, and the indices of the spatial (domain) axes."""
    dims = int(header.get("dimension", len(header.get("sizes", []))))
    directions = header.get("space directions")
    if directions is not None:
        spatial = [i for i, d in enumerate(directions) if d is not None and not np.all(np.isnan(np.asarray(d, float)))]
        matrix = np.stack([np.asarray(directions[i], dtype=np.float64) for i in spatial], axis=1)
    else:
        spatial = list(range(dims))[-3:] if dims > 3 else list(range(dims))
        spacings = header.get("spacings")
        sp = [float(spacings[i]) if spacings is not None and not np.isnan(spacings[i]) else 1.0 for i in spatial]
        matrix = np.diag(sp)
    if matrix.shape[0] != 3 or len(spatial) != 3:
        raise VolumeError(f"{path}: {len(spatial)} spatial axes in a {matrix.shape[0]}D space; a 3D volume is needed")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if np.any(np.isnan(origin)):
        origin = np.zeros(3)
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise VolumeError(f"{path}: NRRD space {space!r} is not supported (use RAS or LPS)")
    flip = np.diag(np.asarray(_NRRD_SPACES[space], dtype=np.float64))
    affine = np.eye(4)
    affine[:3, :3] = flip @ matrix
    affine[:3, 3] = flip @ origin
    return affine, spatial


def _read_nrrd(path: str) -> Volume:
    import nrrd

    data, header = nrrd.read(path, index_order="F")
    affine, spatial = _nrrd_affine(header, path)
    data = np.asarray(data)
    if data.ndim > 3:
        others = [i for i in range(data.ndim) if i not in spatial]
        data = np.moveaxis(data, others, list(range(3, data.ndim)))  # spatial first, channels last
    return Volume(array=data, affine=affine, path=path, meta={"format": "nrrd", "header": dict(header)})


_SEGMENT_FIELD = re.compile(r"^Segment(\d+)_(\w+)$")


def _read_seg_nrrd(path: str) -> Volume:
    """Slicer segmentation → one 3D label map.

    Slicer stores segments either in one labelmap layer (3D array; each segment's ``Segment{i}_LabelValue``) or,
    when segments overlap, in several layers (4D array with a ``list`` axis; ``Segment{i}_Layer`` says which).
    Output labels: the files' ``LabelValue``s when they are distinct across segments (what the user set), otherwise
    segment order (segment *i* → label *i* + 1). Where segments overlap, the later segment wins.
    ``meta["segments"]`` maps each output label to the segment name.
    """
    import nrrd

    data, header = nrrd.read(path, index_order="F")
    affine, spatial = _nrrd_affine(header, path)
    data = np.asarray(data)
    layers_axis = [i for i in range(data.ndim) if i not in spatial]
    if len(layers_axis) > 1:
        raise VolumeError(f"{path}: segmentation with {data.ndim} axes; expected 3D or 4D (layers)")
    if layers_axis:
        data = np.moveaxis(data, layers_axis[0], -1)
    else:
        data = data[..., None]
    segments: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        m = _SEGMENT_FIELD.match(str(key))
        if m:
            segments.setdefault(int(m.group(1)), {})[m.group(2)] = str(value)
    spatial_shape = data.shape[:3]
    if not segments:  # a plain labelmap saved with a .seg.nrrd name
        if data.shape[-1] != 1:
            raise VolumeError(f"{path}: 4D segmentation without Segment*_ fields; cannot tell which layer is which")
        return Volume(array=data[..., 0], affine=affine, path=path, meta={"format": "seg.nrrd", "segments": {}})
    order = sorted(segments)
    values = [int(float(segments[i].get("LabelValue", i + 1))) for i in order]
    layers = [int(float(segments[i].get("Layer", 0))) for i in order]
    keep_values = len(set(values)) == len(values)
    out_dtype = np.uint8 if len(order) < 255 and (not keep_values or max(values) < 256) else np.uint16
    labels = np.zeros(spatial_shape, dtype=out_dtype)
    names: dict[int, str] = {}
    for n, (seg, value, layer) in enumerate(zip(order, values, layers)):
        if layer >= data.shape[-1]:
            raise VolumeError(f"{path}: Segment{seg}_Layer={layer} but the file has {data.shape[-1]} layer(s)")
        out_label = value if keep_values else n + 1
        labels[data[..., layer] == value] = out_label
        names[out_label] = segments[seg].get("Name", f"Segment_{seg}")
    return Volume(array=labels, affine=affine, path=path, meta={"format": "seg.nrrd", "segments": names})


# ----------------------------------------------------------------------------------------------------- writing


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        write_atomically(path, write)  # the temporary name ends like the target: the format follows the extension
    except BaseException as err:
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            free = _free_mb(folder)
            raise VolumeWriteError(f"{path}: cannot write ({err.strerror}{f'; {free:.1f} MB free' if free is not None else ''}); "
                              "free some space or choose another output place — nothing was written") from None
        raise


#: errno values of a write the user can fix: disk full or over quota, read-only or forbidden place, a path under a
#: file, a name too long (the engine's outputs module answers the same set)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}


def _free_mb(folder: str) -> float | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return None


def write_volume(
    path: str | os.PathLike,
    array: Any,
    like: Volume | np.ndarray | None = None,
    *,
    dtype: Any = None,
    segment_names: Mapping[int, str] | None = None,
) -> str:
    """Write ``array`` with the geometry of ``like`` (a :class:`Volume`, or a 4×4 RAS affine), atomically.

    The array must have the spatial shape of ``like`` when ``like`` is a Volume (a prediction on its image's grid).
    Format by extension: ``.nii``/``.nii.gz`` (qform and sform both set), ``.nrrd`` (LPS space, as Slicer writes),
    ``.seg.nrrd`` (a Slicer segmentation: one labelmap layer, one segment per non-zero label; names from
    ``segment_names``). Returns the path written.
    """
    path = str(path)
    fmt = volume_format(path)
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if isinstance(like, Volume):
        if tuple(array.shape[:3]) != tuple(like.array.shape[:3]):
            raise VolumeError(f"{path}: array shape {array.shape} is not on the grid of {like.path or 'the reference'} "
                              f"{like.array.shape[:3]}; resample it back first")
        affine = like.affine
    elif like is None:
        affine = np.eye(4)
    else:
        affine = np.asarray(like, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeError(f"{path}: 'like' must be a Volume or a 4x4 affine, got shape {affine.shape}")
    if array.ndim not in (3, 4):
        raise VolumeError(f"{path}: cannot write a {array.ndim}D array; expected 3D (or 4D with channels last)")
    if fmt == "nifti":
        _atomic(path, lambda tmp: _write_nifti(tmp, array, affine))
    elif fmt == "mgh":
        _atomic(path, lambda tmp: _write_mgh(tmp, array, affine))
    elif fmt == "nrrd":
        _atomic(path, lambda tmp: _write_nrrd(tmp, array, affine))
    else:
        _atomic(path, lambda tmp: _write_seg_nrrd(tmp, array, affine, segment_names))
    return path


def _write_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _write_mgh(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    # MGH holds uint8, int16, int32 and float32 only
    if array.dtype not in (np.uint8, np.int16, np.int32, np.float32):
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
    # nibabel picks the format by the file name; the temp name keeps the .mgz/.mgh ending (see _atomic)
    nib.save(nib.MGHImage(array, affine), path)


def _lps_header(affine: np.ndarray, ndim: int) -> dict[str, Any]:
    flip = np.diag([-1.0, -1.0, 1.0])
    directions = (flip @ affine[:3, :3]).T  # rows = axes
    origin = flip @ affine[:3, 3]
    header: dict[str, Any] = {"space": "left-posterior-superior", "space origin": origin}
    if ndim == 3:
        header["space directions"] = directions
        header["kinds"] = ["domain", "domain", "domain"]
    else:
        header["space directions"] = np.vstack([directions, np.full((1, 3), np.nan)])
        header["kinds"] = ["domain", "domain", "domain", "list"]
    return header


def _write_nrrd(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    header = _lps_header(affine, array.ndim)
    header["encoding"] = "gzip"
    nrrd.write(path, np.ascontiguousarray(array) if array.ndim == 3 else array, header, index_order="F")


# Slicer's segment colours for the first labels (Slicer's GenericAnatomyColors-like palette, normalised)
_COLOURS = [(0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82), (0.85, 0.4, 0.4)]


def _write_seg_nrrd(path: str, array: np.ndarray, affine: np.ndarray, names: Mapping[int, str] | None) -> None:
    import nrrd

    if array.ndim != 3:
        raise VolumeError(f"{path}: a .seg.nrrd is written from a 3D label map, got {array.ndim}D")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise VolumeError(f"{path}: a segmentation needs integer labels")
    labels = array.astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    header = _lps_header(affine, 3)
    header["encoding"] = "gzip"
    header["Segmentation_MasterRepresentation"] = "Binary labelmap"
    header["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    header["Segmentation_ConversionParameters"] = ""
    extent = " ".join(f"0 {n - 1}" for n in labels.shape)
    header["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    for n, value in enumerate(int(v) for v in np.unique(labels) if v != 0):
        colour = _COLOURS[n % len(_COLOURS)]
        header[f"Segment{n}_ID"] = f"Segment_{value}"
        header[f"Segment{n}_Name"] = (names or {}).get(value, f"Segment_{value}")
        header[f"Segment{n}_NameAutoGenerated"] = "0" if names and value in names else "1"
        header[f"Segment{n}_Color"] = " ".join(f"{c:.6f}" for c in colour)
        header[f"Segment{n}_ColorAutoGenerated"] = "1"
        header[f"Segment{n}_Extent"] = extent
        header[f"Segment{n}_LabelValue"] = str(value)
        header[f"Segment{n}_Layer"] = "0"
        header[f"Segment{n}_Tags"] = "|"
    nrrd.write(path, labels, header, index_order="F")
