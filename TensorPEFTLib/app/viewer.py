"""The Slicer-core scene and views of the browser app (trame-slicer), and what the workflow puts into them.

Files come in through the front-end layer's scene I/O (:mod:`TensorPEFTLib.frontend.scene` and
:mod:`.segmentations`, the same code the Slicer module uses), so a mask lands on its volume's own grid here exactly
as it does in Slicer. This module only adds what the views show: which volume is in the slice views, the
segmentation's colour and its 3D surface, and the camera.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

# the palette is the front end's, so a prediction has the same colours here as in the Slicer module
from ..frontend.segmentations import (PREDICTION_COLOR, PREDICTION_PALETTE, colour_segments,  # noqa: F401
                                      prediction_colour_names, prediction_colours)

#: the reference label's colour (green, as in the demo's overlay PNGs)
REFERENCE_COLOR = (0.15, 0.85, 0.25)


def segment_values(segmentation: Any) -> List[int]:
    """The label values of a segmentation node's segments (a mask's structures that are in it)."""
    seg = segmentation.GetSegmentation()
    return sorted(int(seg.GetNthSegment(i).GetLabelValue()) for i in range(seg.GetNumberOfSegments()))


def use_offscreen_egl() -> None:
    """Render through EGL (Mesa's, or a GPU's) when there is no X display: VTK's wheel picks its X window class by
    default and then fails on a server. Must run before vtk is imported."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


class SceneViewer:
    """A trame-slicer ``SlicerApp`` (real MRML scene, slice and 3D views) and the nodes the app has added to it."""

    def __init__(self, server: Any) -> None:
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.app = SlicerApp()
        self._quiet_vtk()
        self.scene = self.app.scene
        register_rca_factories(self.app.view_manager, server)
        self.layout_manager = LayoutManager(self.scene, self.app.view_manager, server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Axial Primary")
        self.case_nodes: List[Any] = []  # the loaded case (volume, reference segmentation)
        self.result_nodes: List[Any] = []  # predictions and synthesized volumes
        self.volume: Optional[Any] = None  # the volume in the slice views
        self.synthesized: List[Any] = []

    @staticmethod
    def _quiet_vtk() -> None:
        # VTK 9.6 warns on every view about an interactor event it will drop: noise in the app's log, not a problem
        from vtkmodules.vtkCommonCore import vtkObject

        vtkObject.GlobalWarningDisplayOff()

    # ------------------------------------------------------------------------------------------------ contents
    def _remove(self, nodes: List[Any]) -> None:
        for node in nodes:
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        nodes.clear()

    def load_case(self, image: str, label: Optional[str], name: str, label_volume: Any = None) -> Any:
        """Show ``image`` in the slice views (and ``label`` as a green reference segmentation; ``label_volume``: its
        contents when the caller has read them already); the case shown before and its results leave the scene."""
        from ..frontend.scene import load_volume_file
        from ..frontend.segmentations import labels_to_segmentation, load_mask_file

        self._remove(self.case_nodes)
        self._remove(self.result_nodes)
        self.synthesized = []
        volume = load_volume_file(self.scene, image, name=name)
        self.case_nodes.append(volume)
        if label:
            options = dict(name=f"{name} reference", segment_names={1: "reference"}, closed_surface=True)
            reference = (labels_to_segmentation(self.scene, label_volume, volume, source=label, **options)
                         if label_volume is not None else load_mask_file(self.scene, label, volume, **options))
            self._colour(reference, REFERENCE_COLOR, opacity_2d=0.35)
            self.case_nodes.append(reference)
        self.show_volume(volume)
        return volume

    def show_mask(self, mask: str, volume: Any, name: str, done: Any = None) -> Any:
        """A worker's mask (on ``volume``'s grid) as a red segmentation: slice overlay and 3D surface; several
        structures (named by ``segment``'s ``done`` event) red, magenta, orange ... in the order of their values."""
        from ..frontend.segmentations import load_mask_file
        from ..frontend.slicer_app import mask_segment_names

        earlier = [n for n in self.result_nodes if n.IsA("vtkMRMLSegmentationNode")]  # one prediction at a time
        self.result_nodes = [n for n in self.result_nodes if n not in earlier]
        self._remove(earlier)
        segmentation = load_mask_file(self.scene, mask, volume, name=f"{volume.GetName()} {name}",
                                      segment_names=mask_segment_names(done, name), closed_surface=True)
        self._colour(segmentation, PREDICTION_COLOR, opacity_2d=0.6,
                     structures=[int(v) for v in ((done or {}).get("structures") or {})])
        self.result_nodes.append(segmentation)
        for node in self.case_nodes[1:]:  # the reference would hide the prediction's surface in 3D
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility3D(False)
        self.show_volume(volume, focus=segmentation)
        return segmentation

    def show_synthesized(self, paths: Sequence[str]) -> List[str]:
        """Generated volumes into the scene; the first one shown. Returns their names."""
        from ..frontend.scene import load_synthesized_volumes

        nodes = load_synthesized_volumes(self.scene, list(paths))
        for node in self.case_nodes + self.result_nodes:  # another case's overlays would lie over a new volume
            display = node.GetDisplayNode() if node.IsA("vtkMRMLSegmentationNode") else None
            if display is not None:
                display.SetVisibility(False)
        self.result_nodes.extend(nodes)
        self.synthesized = nodes
        if nodes:
            self.show_synthesized_index(0)
        return [node.GetName() for node in nodes]

    def show_synthesized_index(self, index: int) -> None:
        """A generated volume in the slice views. (Volume rendering it in 3D was tried: on Mesa's CPU renderer it
        delayed the slice views' frames by seconds and the 3D view stayed empty in the screenshots; left out.)"""
        if 0 <= index < len(self.synthesized):
            self.show_volume(self.synthesized[index])

    # ------------------------------------------------------------------------------------------------ display
    def _colour(self, segmentation: Any, colour: Sequence[float], opacity_2d: float,
                structures: Sequence[int] = ()) -> None:
        """Every segment ``colour``; a prediction: each structure its own (:func:`prediction_colours`, ``colour``
        first; ``structures``: every value the adapter predicts, found or not)."""
        if colour == PREDICTION_COLOR:
            colour_segments(segmentation, structures)
        else:
            seg = segmentation.GetSegmentation()
            for index in range(seg.GetNumberOfSegments()):
                seg.GetNthSegment(index).SetColor(*colour)
        display = segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility2DFill(True)
            display.SetVisibility2DOutline(True)
            display.SetOpacity2DFill(opacity_2d)
            display.SetVisibility3D(True)
            display.SetOpacity3D(1.0)
        self.app.display_manager.set_node_visible_in_group(segmentation)

    def show_volume(self, volume: Any, focus: Optional[Any] = None) -> None:
        """``volume`` in every slice view's background, the views fitted to it; with ``focus`` (a segmentation) the
        slices go through the segmentation's centre, so its overlay is on screen."""
        self.volume = volume
        manager = self.app.display_manager
        manager.show_volume_in_slice_background(volume)
        manager.show_volume_in_slice_foreground(None)
        manager.reset_views()
        if focus is None:
            return
        bounds = [0.0] * 6
        focus.GetRASBounds(bounds)
        if bounds[0] > bounds[1]:
            return  # an empty segmentation: nothing to centre on
        centre = {"Sagittal": (bounds[0] + bounds[1]) / 2, "Coronal": (bounds[2] + bounds[3]) / 2,
                  "Axial": (bounds[4] + bounds[5]) / 2}
        for view in self.app.view_manager.get_slice_views():
            value = centre.get(view.get_orientation())
            if value is not None:
                view.set_slice_value(value)

    def volume_names(self) -> List[str]:
        return [node.GetName() for node in self.synthesized]
