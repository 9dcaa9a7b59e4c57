"""What the Slicer module's logic does with the application: find Slicer's Python for the worker, keep a work folder,
exchange files with the worker, and show results. ``slicer`` is an argument, so the logic stays a thin caller and
these run against the ``slicer-core`` MRML classes in tests."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
from typing import Any, List, Tuple

from .requests import RequestError


def python_executable(slicer: Any) -> str:
    """Slicer's own Python launcher (PythonSlicer), so the worker sees the same packages and PyTorch build. Never
    ``sys.executable`` inside the application: that can be the Slicer binary itself."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    for candidate in (shutil.which(name), os.path.join(slicer.app.slicerHome, "bin", name),
                      os.path.join(os.path.dirname(sys.executable), name)):
        if candidate and os.path.isfile(candidate):
            return candidate
    if os.path.basename(sys.executable).lower().startswith("python"):
        return sys.executable
    raise RequestError(f"{name} not found next to Slicer ({slicer.app.slicerHome}); reinstall Slicer")


def work_root(slicer: Any) -> str:
    root = os.path.join(slicer.app.temporaryPath, "TensorPEFT")
    os.makedirs(root, exist_ok=True)
    return root


def new_work_folder(root: str, kind: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return tempfile.mkdtemp(prefix=f"{kind}-{stamp}-", dir=root)


def export_for_segmentation(scene: Any, volume: Any, folder: str) -> Tuple[str, str]:
    """Write ``volume`` for the worker; returns (image file, the mask file the worker will write)."""
    from .scene import EXCHANGE_SUFFIX, safe_name, write_volume_node

    name = safe_name(volume.GetName() if volume else "", "volume")
    image = write_volume_node(volume, os.path.join(folder, name + EXCHANGE_SUFFIX))
    return image, os.path.join(folder, name + "_mask" + EXCHANGE_SUFFIX)


def import_synthesized(scene: Any, paths: List[str]) -> list:
    from .scene import load_synthesized_volumes

    if not paths:
        raise RequestError("the worker reported no generated volumes; see the log")
    return load_synthesized_volumes(scene, paths)


def show_segmentation(slicer: Any, volume: Any, segmentation: Any) -> None:
    """The volume in the slice views, the segmentation in 2D and 3D, the views centred on the structure."""
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
    display = segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility3D(True)
    layout = slicer.app.layoutManager()
    if layout is not None and layout.threeDViewCount > 0:
        view = layout.threeDWidget(0).threeDView()
        view.resetFocalPoint()
        view.resetCamera()
    bounds = [0.0] * 6
    segmentation.GetRASBounds(bounds)
    if bounds[0] <= bounds[1]:
        centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
        slicer.modules.markups.logic().JumpSlicesToLocation(*centre, True)


def show_volumes(slicer: Any, nodes: list) -> None:
    if nodes:
        slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)


def export_training_pairs(scene: Any, pairs: list, folder: str, with_labels: bool = True) -> str:
    from .segmentations import export_training_folder

    export_training_folder(scene, pairs, folder, with_labels=with_labels)
    return folder


def mask_segment_names(done: Any, segment_name: str) -> dict:
    """Segment names for a worker's mask: with several structures, the names ``segment``'s ``done`` event gives each
    label value (the adapter's labels: a Slicer segmentation's segment names, else "label 17"); with one, the
    GUI's own ``segment_name`` for it, whatever its value."""
    structures = {int(value): str(name) for value, name in ((done or {}).get("structures") or {}).items()}
    if len(structures) > 1:
        return structures
    return {next(iter(structures), 1): segment_name}


def import_mask(slicer: Any, mask: str, volume: Any, segment_name: str, done: Any = None) -> Any:
    """A worker's mask → a segmentation named after ``volume``, shown; a warning when the model found nothing.
    ``done``: the ``segment`` job's done event (names of several structures, :func:`mask_segment_names`)."""
    from .segmentations import colour_segments, load_mask_file

    segmentation = load_mask_file(slicer.mrmlScene, mask, volume, name=f"{volume.GetName()} segmentation",
                                  segment_names=mask_segment_names(done, segment_name))
    colour_segments(segmentation, [int(value) for value in ((done or {}).get("structures") or {})])
    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        slicer.util.warningDisplay(f"The model found nothing in {volume.GetName()}: the segmentation is empty. Check "
                                   "that the image resembles the training scans (modality, orientation, field of view).")
    show_segmentation(slicer, volume, segmentation)
    return segmentation


def segmented_text(volume_name: str, segmented_with: str, done: Any) -> str:
    """What a GUI says when ``segment`` finished: which volume, with what, and whether its brain was extracted first
    (the worker's ``done`` event counts the whole heads it skull-stripped)."""
    head = "; a whole head: its brain was extracted first" if (done or {}).get("skull_stripped") else ""
    return f"{volume_name} segmented with {segmented_with}{head}"
