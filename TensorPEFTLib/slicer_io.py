"""Scene in, scene out: the only file of TensorPEFT that touches MRML.

Every function takes the MRML scene (or nodes of it) as an argument, so it runs the same inside 3D Slicer and in
pytest against the real MRML classes of the ``slicer-core`` wheel. Nothing here imports torch.

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
from typing import Any, Iterable, Sequence

import numpy as np

from .data.io import Volume, read_volume, write_volume

__all__ = [
    "SceneError", "ensure_segmentation_support", "ijk_to_ras", "volume_from_node", "write_volume_node",
    "add_volume_node", "load_volume_file", "labels_to_segmentation", "load_mask_file", "segmentation_to_labels",
    "export_training_folder", "load_synthesized_volumes", "segmentation_geometry", "geometry_problems",
    "make_synthetic_case", "safe_name", "EXCHANGE_SUFFIX",
]

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
    from .data import case_name

    volume = read_volume(path)
    return add_volume_node(scene, volume, name or case_name(path))


def load_synthesized_volumes(scene: Any, paths: Sequence[str], prefix: str = "TensorPEFT synthesized") -> list[Any]:
    """Generated volumes (files written by ``tensorpeft synthesize``) → scalar volume nodes named ``prefix N``."""
    nodes = []
    for index, path in enumerate(paths, start=1):
        nodes.append(add_volume_node(scene, read_volume(path), f"{prefix} {index}"))
    return nodes


# ----------------------------------------------------------------------------------------------- segmentations


def _check_on_grid(labels: Volume, reference: Any, source: str) -> None:
    dims = tuple(int(d) for d in reference.GetImageData().GetDimensions())
    if tuple(labels.array.shape[:3]) != dims:
        raise SceneError(f"{source}: mask grid {tuple(labels.array.shape)} differs from {_node_name(reference)}'s "
                         f"{dims}; segment this volume again")
    difference = float(np.abs(np.asarray(labels.affine) - ijk_to_ras(reference)).max())
    if difference > GEOMETRY_TOLERANCE_MM:
        raise SceneError(f"{source}: mask geometry differs from {_node_name(reference)}'s by {difference:.3g} mm; "
                         "segment this volume again (was it moved or resampled?)")


def labels_to_segmentation(scene: Any, labels: Volume | np.ndarray, reference: Any, name: str | None = None,
                           segment_names: dict[int, str] | None = None, closed_surface: bool = True,
                           source: str = "mask") -> Any:
    """A label map on ``reference``'s grid → a new segmentation node (one segment per non-zero label).

    The segments are imported on ``reference``'s own IJK-to-RAS (after checking that ``labels`` agrees with it), the
    segmentation's reference geometry is ``reference``, it sits under the same parent transform, and a closed
    surface is created so it shows in 3D. Returns the segmentation node (with no segments if the mask is empty).
    """
    slicer = _slicer()
    ensure_segmentation_support(scene)
    if reference is None:
        raise SceneError("no reference volume: choose the volume the mask belongs to")
    parent = _check_transform(reference)
    if not isinstance(labels, Volume):
        labels = Volume(array=np.asarray(labels), affine=ijk_to_ras(reference))
    _check_on_grid(labels, reference, source)
    array = np.asarray(labels.array)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise SceneError(f"{source}: not a label map (non-integer values)")
    array = array.astype(np.int16 if array.max(initial=0) < 32768 else np.int32)

    before = _node_ids(scene)
    # the label map and the segmentation go under the volume's transform *before* the import, so that the import and
    # the reference geometry are computed in the volume's own frame (set afterwards, the transform would apply twice)
    temporary = add_volume_node(scene, Volume(array=array, affine=ijk_to_ras(reference)), "__tensorpeft_labels__",
                                labelmap=True, display=False, parent_transform_id=parent)
    segmentation = None
    try:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                               scene.GenerateUniqueName(name or f"{_node_name(reference)} segmentation"))
        segmentation.CreateDefaultDisplayNodes()
        if parent:
            segmentation.SetAndObserveTransformNodeID(parent)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if np.any(array):
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, segmentation):
                raise SceneError(f"{source}: Slicer could not import the label map into a segmentation")
        _name_segments(segmentation, segment_names or {})
    except BaseException:
        _remove_new_nodes(scene, before, keep=())
        raise
    _remove_new_nodes(scene, before, keep=_referenced_ids(segmentation))
    if closed_surface and segmentation.GetSegmentation().GetNumberOfSegments() > 0:
        segmentation.CreateClosedSurfaceRepresentation()
    display = segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility3D(True)
    return segmentation


def _name_segments(segmentation: Any, names: dict[int, str]) -> None:
    seg = segmentation.GetSegmentation()
    for index in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(index)
        value = int(segment.GetLabelValue())
        segment.SetName(names.get(value, f"Label {value}" if value > 1 or len(names) else "Segment_1"))


def load_mask_file(scene: Any, path: str, reference: Any, name: str | None = None,
                   segment_names: dict[int, str] | None = None, closed_surface: bool = True) -> Any:
    """A worker's mask file (written on ``reference``'s grid) → a new segmentation node named after ``reference``."""
    return labels_to_segmentation(scene, read_volume(path), reference, name=name, segment_names=segment_names,
                                  closed_surface=closed_surface, source=str(path))


def segmentation_to_labels(scene: Any, segmentation: Any, reference: Any, *, binary: bool = True) -> Volume:
    """A segmentation node exported on ``reference``'s grid → :class:`Volume` of labels.

    ``binary``: every segment → 1 (the fine-tuned UNETRs predict one structure); else segment *n* → label *n*.
    """
    slicer = _slicer()
    vtk = _vtk()
    if segmentation is None:
        raise SceneError("no segmentation selected: choose the segmentation that labels this volume")
    if reference is None:
        raise SceneError(f"{_node_name(segmentation)}: no volume paired with it; choose its volume")
    if not segmentation.IsA("vtkMRMLSegmentationNode"):
        raise SceneError(f"{_node_name(segmentation)} is not a segmentation node; choose a segmentation")
    seg = segmentation.GetSegmentation()
    if seg.GetNumberOfSegments() == 0:
        raise SceneError(f"{_node_name(segmentation)} has no segments; paint the structure in Segment Editor first")
    if _check_transform(segmentation) != _check_transform(reference):
        raise SceneError(f"{_node_name(segmentation)} and {_node_name(reference)} are under different transforms; "
                         "harden both transforms first (Data module → Harden transform)")
    ensure_segmentation_support(scene)
    ids = vtk.vtkStringArray()
    for index in range(seg.GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetNthSegmentID(index))
    before = _node_ids(scene)
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__tensorpeft_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, ids, temporary, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok or temporary.GetImageData() is None:
            raise SceneError(f"{_node_name(segmentation)}: Slicer could not export it on {_node_name(reference)}'s grid")
        array = np.array(slicer.util.arrayFromVolume(temporary)).transpose(2, 1, 0)
        affine = ijk_to_ras(temporary)
    finally:
        _remove_new_nodes(scene, before, keep=())  # the temporary label map, its display and colour nodes
    reference_volume = Volume(array=np.empty(0), affine=ijk_to_ras(reference))
    dims = tuple(int(d) for d in reference.GetImageData().GetDimensions())
    if array.shape != dims or float(np.abs(affine - reference_volume.affine).max()) > GEOMETRY_TOLERANCE_MM:
        raise SceneError(f"{_node_name(segmentation)}: export landed off {_node_name(reference)}'s grid")
    labels = (array > 0).astype(np.uint8) if binary else array.astype(np.uint8 if array.max() < 256 else np.uint16)
    return Volume(array=labels, affine=reference_volume.affine, meta={"node_name": segmentation.GetName()})


def export_training_folder(scene: Any, pairs: Iterable[tuple[Any, Any]], folder: str, *, binary: bool = True,
                           with_labels: bool = True, suffix: str = EXCHANGE_SUFFIX) -> list[dict[str, str]]:
    """Volume/segmentation pairs from the scene → a Decathlon folder (``imagesTr/``, ``labelsTr/``) the worker reads.

    Case files are named after the volume nodes. Each pair is checked (scalar volume, non-empty segmentation on the
    volume's grid) before anything is written; the first problem is raised as a SceneError naming the nodes.
    ``with_labels=False`` (synthesis: images only) ignores the segmentations. Returns
    ``[{"case", "image", "label"}, ...]`` (``label`` None without labels).
    """
    pairs = list(pairs)
    if not pairs:
        raise SceneError("no training pairs: add at least one volume with its segmentation")
    seen: set[str] = set()
    prepared = []
    for number, (volume_node, segmentation_node) in enumerate(pairs, start=1):
        if volume_node is None or (with_labels and segmentation_node is None):
            what = "both a volume and its segmentation" if with_labels else "a volume"
            raise SceneError(f"training pair {number} is incomplete: choose {what}")
        if volume_node.GetID() in seen:
            raise SceneError(f"{_node_name(volume_node)} appears in two training pairs; use each volume once")
        seen.add(volume_node.GetID())
        image = volume_from_node(volume_node, what=f"volume of pair {number}")
        if not with_labels:
            prepared.append((volume_node, image, None))
            continue
        labels = segmentation_to_labels(scene, segmentation_node, volume_node, binary=binary)
        if not np.any(labels.array):
            raise SceneError(f"{_node_name(segmentation_node)} has no labelled voxels inside "
                             f"{_node_name(volume_node)}; check that the pair belongs together")
        prepared.append((volume_node, image, labels))
    names: set[str] = set()
    cases = []
    for volume_node, image, labels in prepared:
        case = safe_name(volume_node.GetName())
        base, n = case, 2
        while case.lower() in names:
            case, n = f"{base}_{n}", n + 1
        names.add(case.lower())
        image_path = write_volume(os.path.join(folder, "imagesTr", case + suffix), image.array, image.affine)
        label_path = (write_volume(os.path.join(folder, "labelsTr", case + suffix), labels.array, labels.affine)
                      if labels is not None else None)
        cases.append({"case": case, "image": image_path, "label": label_path})
    return cases


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


# ----------------------------------------------------------------------------------------------- synthetic data


def oblique_affine(spacing: Sequence[float], angles_deg: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS with the given voxel size, rotated about x, y, z by ``angles_deg``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def synthetic_arrays(shape: Sequence[int], seed: int = 0, blob_fraction: float = 0.22) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) ``[i, j, k]``: an off-centre bright ellipsoid (label 1) in smooth noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.25, 0.25, size=3)
    radii = np.full(3, blob_fraction * 2) * rng.uniform(0.8, 1.2, size=3)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
    image = (0.2 * rng.standard_normal(tuple(shape)) + 1.0 * inside + 0.3 * (grids[2] + 1)).astype(np.float32)
    return image, inside.astype(np.uint8)


def make_synthetic_case(scene: Any, name: str = "TensorPEFT synthetic", shape: Sequence[int] = (40, 36, 24),
                        spacing: Sequence[float] = (0.9, 1.1, 2.5), angles_deg: Sequence[float] = (17.0, -11.0, 23.0),
                        origin: Sequence[float] = (-21.5, 14.25, 7.125), seed: int = 0,
                        with_segmentation: bool = True) -> tuple[Any, Any | None]:
    """A non-axis-aligned, anisotropic volume node with a labelled blob (for the self-test and the tests)."""
    image, labels = synthetic_arrays(shape, seed)
    affine = oblique_affine(spacing, angles_deg, origin)
    volume = add_volume_node(scene, Volume(array=image, affine=affine), name)
    segmentation = None
    if with_segmentation:
        segmentation = labels_to_segmentation(scene, labels, volume, name=f"{volume.GetName()} label",
                                              segment_names={1: "blob"}, closed_surface=False, source=name)
    return volume, segmentation


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


def prepare_self_test(scene: Any, folder: str, cases: int = 2, seed: int = 0) -> dict[str, Any]:
    """Synthetic oblique, anisotropic cases in ``scene`` and on disk for the module's self-test: ``cases`` labelled
    pairs exported as a Decathlon folder, and one unlabelled volume exported for segmentation."""
    pairs = [make_synthetic_case(scene, name=f"TensorPEFT selftest {n + 1}", seed=seed + n) for n in range(cases)]
    train = os.path.join(folder, "train")
    exported = export_training_folder(scene, pairs, train)
    test_volume, _ = make_synthetic_case(scene, name="TensorPEFT selftest input", seed=seed + 100,
                                         angles_deg=(-8.0, 21.0, 33.0), spacing=(1.2, 0.8, 2.0), with_segmentation=False)
    test_image = write_volume_node(test_volume, os.path.join(folder, "input" + EXCHANGE_SUFFIX))
    return {"train": train, "cases": exported, "pairs": pairs, "test_volume": test_volume, "test_image": test_image}


def check_segmentation_result(scene: Any, volume: Any, mask_path: str, name: str | None = None) -> tuple[Any, list[str]]:
    """Import a worker's mask for ``volume`` and list what is wrong with the result (empty list: all good)."""
    segmentation = load_mask_file(scene, mask_path, volume, name=name)
    problems = geometry_problems(volume, segmentation)
    seg = segmentation.GetSegmentation()
    if seg.GetNumberOfSegments() > 0 and not seg.ContainsRepresentation("Closed surface"):
        problems.append(f"{segmentation.GetName()}: no closed-surface representation (it would not show in 3D)")
    return segmentation, problems
