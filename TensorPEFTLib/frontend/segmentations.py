"""Segmentations between the scene and the worker: a worker's mask → a segmentation node on its volume's own grid,
and volume/segmentation pairs → a Decathlon folder the worker trains on. Torch-free, like :mod:`.scene`."""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np

from ..data.io import Volume, read_volume, write_volume
from .scene import (EXCHANGE_SUFFIX, GEOMETRY_TOLERANCE_MM, SceneError, _check_transform, _node_ids, _node_name,
                    _referenced_ids, _remove_new_nodes, _slicer, _vtk, add_volume_node, ensure_segmentation_support,
                    ijk_to_ras, safe_name, volume_from_node)

#: the predicted mask's colour (RGB 0–1): a red no grey-value image has, so tests can find it in a screenshot
PREDICTION_COLOR = (0.95, 0.15, 0.10)
#: a prediction's structures in label-value order, (name, RGB 0–1): red first, then nine more, none green (the
#: reference's), so ten structures (FreeSurfer's five subcortical pairs: 10–13, 17 left, 49–53 right) each get their
#: own and a structure's left and right differ; the palette repeats after ten
PREDICTION_PALETTE = (("red", PREDICTION_COLOR), ("magenta", (0.90, 0.20, 0.85)), ("orange", (1.0, 0.55, 0.05)),
                      ("yellow", (0.95, 0.90, 0.10)), ("blue", (0.20, 0.45, 1.0)), ("violet", (0.55, 0.25, 0.95)),
                      ("cyan", (0.0, 0.80, 0.95)), ("pink", (1.0, 0.60, 0.75)), ("brown", (0.60, 0.35, 0.10)),
                      ("lavender", (0.75, 0.70, 1.0)))


def prediction_colour_names(count: int) -> list[str]:
    """What the status line calls the colours of a prediction's ``count`` structures, in label-value order."""
    return [PREDICTION_PALETTE[index % len(PREDICTION_PALETTE)][0] for index in range(count)]


def prediction_colours(present: Sequence[int], structures: Sequence[int] = ()) -> dict[int, Sequence[float]]:
    """The colour of each label value ``present`` in a mask: the palette entry of its place among ``structures`` (all
    the values the adapter predicts, the order the status line names them), so a structure the mask lacks does not
    shift the others' colours; values not among them follow, in value order."""
    order = [int(v) for v in structures]
    order += sorted(int(v) for v in present if int(v) not in order)
    return {int(v): PREDICTION_PALETTE[order.index(int(v)) % len(PREDICTION_PALETTE)][1] for v in present}


def colour_segments(segmentation: Any, structures: Sequence[int] = ()) -> None:
    """A prediction's segments in :data:`PREDICTION_PALETTE`'s colours (:func:`prediction_colours`; ``structures``:
    every value the adapter predicts, found or not), the same in the Slicer module and the browser app. Slicer's own
    import colours them from its generic anatomy table, where a left and a right hippocampus (17, 53) are two greens."""
    seg = segmentation.GetSegmentation()
    segments = [seg.GetNthSegment(i) for i in range(seg.GetNumberOfSegments())]
    colours = prediction_colours([int(s.GetLabelValue()) for s in segments], structures)
    for segment in segments:
        segment.SetColor(*colours[int(segment.GetLabelValue())])


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


def segment_names(segmentation: Any) -> list[str]:
    """The segments' names in their order."""
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def segmentation_to_labels(scene: Any, segmentation: Any, reference: Any, *, binary: bool = True,
                           structures: list[str] | None = None) -> Volume:
    """A segmentation node exported on ``reference``'s grid → :class:`Volume` of labels.

    ``binary``: every segment → 1 (one structure); else segment *n* → label *n*, or with ``structures`` (segment
    names) the segment named ``structures[k]`` → label k + 1, whatever its place in this segmentation.
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
    order = list(range(seg.GetNumberOfSegments()))
    if structures is not None and not binary:
        names = segment_names(segmentation)
        order = [names.index(name) for name in structures]  # the export numbers segments in the order given
    for index in order:
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


def structure_count(pairs: list[tuple[Any, Any]]) -> int:
    """How many structures a fine-tune on ``pairs`` learns, for a panel's time estimate and status line: the segment
    names of :func:`training_structures`, else 1; 1 too while the segmentations disagree (the fine-tune says why)."""
    try:
        return len(training_structures(pairs) or [None])
    except SceneError:
        return 1


def training_structures(pairs: list[tuple[Any, Any]]) -> list[str] | None:
    """The structures several-segment segmentations label, by segment name (None: one segment each, one structure).
    Every segmentation must then name the same segments: a structure is known by its name across the cases."""
    named = [(seg, segment_names(seg)) for _, seg in pairs if seg is not None]
    if all(len(names) <= 1 for _, names in named):
        return None
    first, structures = named[0]
    for seg, names in named:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SceneError(f"{_node_name(seg)} has two segments named {', '.join(twice)}: a structure is known by its "
                             "segment name; rename one (Segment Editor)")
        if sorted(names) != sorted(structures):
            raise SceneError(f"{_node_name(seg)} has the segments {', '.join(names)} where {_node_name(first)} has "
                             f"{', '.join(structures)}: give every segmentation the same segments, named alike "
                             "(Segment Editor), or one segment each for one structure")
    return structures


def export_training_folder(scene: Any, pairs: Iterable[tuple[Any, Any]], folder: str, *, binary: bool | None = None,
                           with_labels: bool = True, suffix: str = EXCHANGE_SUFFIX) -> list[dict[str, str]]:
    """Volume/segmentation pairs from the scene → a Decathlon folder (``imagesTr/``, ``labelsTr/``) the worker reads.

    Case files are named after the volume nodes. Each pair is checked (scalar volume, non-empty segmentation on the
    volume's grid) before anything is written; the first problem is raised as a SceneError naming the nodes.
    ``with_labels=False`` (synthesis: images only) ignores the segmentations. ``binary`` None: one structure when
    every segmentation has one segment (its label 1, whatever its name); segmentations with several segments, named
    alike in every case (:func:`training_structures`), give one structure per name, written as ``.seg.nrrd`` labels
    that carry the names to the adapter. Returns ``[{"case", "image", "label"}, ...]`` (``label`` None without
    labels).
    """
    pairs = list(pairs)
    if not pairs:
        raise SceneError("no training pairs: add at least one volume with its segmentation")
    structures = training_structures(pairs) if with_labels and binary is not True else None
    if binary is None:
        binary = structures is None
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
        labels = segmentation_to_labels(scene, segmentation_node, volume_node, binary=binary, structures=structures)
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
        label_path = None
        if labels is not None and structures:  # the names travel with the labels: the adapter's segment names
            label_path = write_volume(os.path.join(folder, "labelsTr", case + ".seg.nrrd"), labels.array,
                                      labels.affine, segment_names=dict(enumerate(structures, start=1)))
        elif labels is not None:
            label_path = write_volume(os.path.join(folder, "labelsTr", case + suffix), labels.array, labels.affine)
        cases.append({"case": case, "image": image_path, "label": label_path})
    return cases


