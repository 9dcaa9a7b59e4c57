"""Scene in, scene out: volumes, geometry and training pairs between the MRML scene and the worker's files.

Every function takes the MRML scene (or nodes of it) as an argument, so it runs the same inside 3D Slicer and in
pytest against the real MRML classes of the ``slicer-core`` wheel. Nothing here imports torch; segmentations are in
:mod:`.segmentations`.

Geometry: a volume node's voxel array is indexed ``[k, j, i]`` by ``slicer.util.arrayFromVolume`` and placed in
space by its IJK-to-RAS matrix. :class:`TensorPEFTLib.data.Volume` (the worker's side) holds ``[i, j, k]`` arrays
with a 4×4 voxel-to-RAS affine, so the two are the same grid after a transpose and with
``affine == IJKToRAS``. Files exchanged with the worker are NRRD: its text header keeps every float64 digit, so a
non-axis-aligned, anisotropic volume comes back with a bit-identical IJK-to-RAS (NIfTI would round it to float32).
Results are imported on the *node's own* matrix (after checking the file agrees), never on a re-derived one.

Volumes under a linear parent transform are exchanged in their local frame and the results are put under the same
transform; non-linear transforms must be hardened first (the message says so).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from ..data.io import Volume, read_volume, write_volume

EXCHANGE_SUFFIX = ".nrrd"  # exact float64 geometry in the header
GEOMETRY_TOLERANCE_MM = 1e-4  # a worker's mask must sit on its image's grid within this (NIfTI's float32: ~1e-6)

_KEEP_ALIVE: list[Any] = []  # the segmentations logic that registered the conversion rules


class SceneError(ValueError):
    """A problem with the nodes the user chose (one line naming the node and saying how to fix it)."""


def _slicer():
    import slicer

    return slicer


def _vtk():
    import vtk

    return vtk


# ----------------------------------------------------------------------------------------------- basics


def ensure_segmentation_support(scene: Any) -> None:
    """Make sure segmentation conversion rules (labelmap → closed surface ...) are registered.

    Inside Slicer the Segmentations module has done it; with the bare ``slicer-core`` wheel a
    ``vtkSlicerSegmentationsModuleLogic`` attached to the scene registers them (once per process).
    """
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    _KEEP_ALIVE.append(logic)


def _matrix(array: np.ndarray) -> Any:
    matrix = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _array(matrix: Any) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def ijk_to_ras(node: Any) -> np.ndarray:
    """The volume node's IJK-to-RAS matrix (its local frame) as a 4×4 float64 array."""
    matrix = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _array(matrix)


def safe_name(name: str, fallback: str = "case") -> str:
    """A file-name-safe version of a node name (letters, digits, ``-``, ``_``)."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", name or "").strip("_")
    return text or fallback


def _node_name(node: Any) -> str:
    return node.GetName() if node is not None else "(none)"


def _check_transform(node: Any) -> str | None:
    """The parent transform node ID of ``node`` (None without one); SceneError for non-linear transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise SceneError(f"{_node_name(node)} is under the non-linear transform {parent.GetName()}; harden it first "
                         "(Data module: right-click the volume → Harden transform)")
    return parent.GetID()


def _node_ids(scene: Any) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _referenced_ids(node: Any) -> set[str]:
    """``node``'s ID and the IDs it references (display, colour table ...), and theirs, recursively."""
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current is None or current.GetID() in found:
            continue
        found.add(current.GetID())
        for r in range(current.GetNumberOfNodeReferenceRoles()):
            role = current.GetNthNodeReferenceRole(r)
            for n in range(current.GetNumberOfNodeReferences(role)):
                stack.append(current.GetNthNodeReference(role, n))
    return found


def _remove_new_nodes(scene: Any, before: set[str], keep: set[str] | tuple = ()) -> None:
    """Remove the nodes added since ``before`` (scratch work), except ``keep`` and singletons."""
    for i in reversed(range(scene.GetNumberOfNodes())):
        node = scene.GetNthNode(i)
        if node is None or node.GetID() in before or node.GetID() in keep or node.GetSingletonTag():
            continue
        scene.RemoveNode(node)


# ----------------------------------------------------------------------------------------------- volumes


def volume_from_node(node: Any, what: str = "volume") -> Volume:
    """A scalar volume node → :class:`Volume` (array ``[i, j, k]``, affine = the node's IJK-to-RAS)."""
    slicer = _slicer()
    if node is None:
        raise SceneError(f"no {what} selected: choose a {what} node in the panel")
    # vector (RGB) and tensor volumes derive from the scalar volume class in MRML: test for them first
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName()
        hint = (" (Volumes module → Convert to scalar volume)" if node.IsA("vtkMRMLVectorVolumeNode") else "")
        raise SceneError(f"{_node_name(node)} is a {kind}, not a scalar volume; choose a scalar volume{hint}")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise SceneError(f"{_node_name(node)} has no voxels; load the image again")
    if image.GetNumberOfScalarComponents() != 1:
        raise SceneError(f"{_node_name(node)} has {image.GetNumberOfScalarComponents()} components per voxel; "
                         "choose a single-channel (grey-value) volume")
    parent = _check_transform(node)
    array = np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0)  # [k, j, i] → [i, j, k], a copy
    meta = {"node_name": node.GetName(), "node_id": node.GetID(), "parent_transform_id": parent}
    return Volume(array=array, affine=ijk_to_ras(node), meta=meta)


def write_volume_node(node: Any, path: str | os.PathLike, what: str = "volume") -> str:
    """Write a scalar volume node for the worker (NRRD keeps the geometry exact). Returns the path."""
    volume = volume_from_node(node, what)
    return write_volume(path, volume.array, volume.affine)


def add_volume_node(scene: Any, volume: Volume, name: str, *, labelmap: bool = False,
                    parent_transform_id: str | None = None, display: bool = True) -> Any:
    """A new scalar (or label map) volume node holding ``volume`` with IJK-to-RAS = ``volume.affine``."""
    slicer = _slicer()
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise SceneError(f"{volume.path or name}: a {array.ndim}D array cannot become a volume node; expected 3D")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array.transpose(2, 1, 0)))
    node.SetIJKToRASMatrix(_matrix(np.asarray(volume.affine, dtype=np.float64)))
    if display:
        node.CreateDefaultDisplayNodes()
    if parent_transform_id:
        node.SetAndObserveTransformNodeID(parent_transform_id)
    return node


def load_volume_file(scene: Any, path: str, name: str | None = None) -> Any:
    """Read a volume file (NIfTI / NRRD) into a new scalar volume node."""
    from ..data import case_name

    volume = read_volume(path)
    return add_volume_node(scene, volume, name or case_name(path))


def load_synthesized_volumes(scene: Any, paths: Sequence[str], prefix: str = "TensorPEFT synthesized") -> list[Any]:
    """Generated volumes (files written by ``tensorpeft synthesize``) → scalar volume nodes named ``prefix N``."""
    nodes = []
    for index, path in enumerate(paths, start=1):
        nodes.append(add_volume_node(scene, read_volume(path), f"{prefix} {index}"))
    return nodes



# ----------------------------------------------------------------------------------------------- geometry checks


def segmentation_geometry(segmentation: Any) -> tuple[tuple[int, int, int], np.ndarray]:
    """(dimensions, 4×4 image-to-world) of a segmentation's reference image geometry (what its labelmaps use)."""
    slicer = _slicer()
    text = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not text:
        raise SceneError(f"{_node_name(segmentation)} has no reference geometry")
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False)
    matrix = _vtk().vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = image.GetExtent()
    dims = tuple(int(extent[2 * a + 1] - extent[2 * a] + 1) for a in range(3))
    affine = _array(matrix)
    if any(extent[2 * a] != 0 for a in range(3)):  # an extent that does not start at 0 shifts the origin
        affine[:3, 3] = affine[:3, :3] @ np.array([extent[0], extent[2], extent[4]], dtype=float) + affine[:3, 3]
    return dims, affine  # type: ignore[return-value]


def geometry_problems(volume: Any, other: Any, tolerance: float = 0.0) -> list[str]:
    """Differences between a volume node's grid and another volume's or a segmentation's (empty: identical)."""
    dims = tuple(int(d) for d in volume.GetImageData().GetDimensions())
    reference = ijk_to_ras(volume)
    if other.IsA("vtkMRMLSegmentationNode"):
        other_dims, other_affine = segmentation_geometry(other)
    else:
        other_dims = tuple(int(d) for d in other.GetImageData().GetDimensions())
        other_affine = ijk_to_ras(other)
    problems = []
    if other_dims != dims:
        problems.append(f"{_node_name(other)}: dimensions {other_dims} != {_node_name(volume)}'s {dims}")
    difference = float(np.abs(other_affine - reference).max())
    if difference > tolerance:
        problems.append(f"{_node_name(other)}: IJK-to-RAS differs from {_node_name(volume)}'s by {difference:.3g}")
    if other.GetTransformNodeID() != volume.GetTransformNodeID():
        problems.append(f"{_node_name(other)}: parent transform differs from {_node_name(volume)}'s")
    return problems


# ----------------------------------------------------------------------------------------------- pairs, self-test


def find_training_pairs(scene: Any) -> list[tuple[Any, Any]]:
    """Each segmentation with its volume: the segmentation's reference-geometry volume when it has one, else the
    scalar volume with the longest name that the segmentation's name starts with (``case1`` ↔ ``case1-label``)."""
    volumes = [v for v in _nodes(scene, "vtkMRMLScalarVolumeNode") if not v.IsA("vtkMRMLLabelMapVolumeNode")]
    pairs = []
    used: set[str] = set()
    for segmentation in _nodes(scene, "vtkMRMLSegmentationNode"):
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            name = segmentation.GetName().lower()
            candidates = [v for v in volumes if name.startswith(v.GetName().lower()) and v.GetID() not in used]
            volume = max(candidates, key=lambda v: len(v.GetName()), default=None)
        if volume is not None and volume.GetID() not in used:
            used.add(volume.GetID())
            pairs.append((volume, segmentation))
    return pairs


def _nodes(scene: Any, cls: str) -> list[Any]:
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


