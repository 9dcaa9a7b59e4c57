"""The MRML glue (TensorPEFTLib/frontend/scene.py, segmentations.py) against the real MRML classes of the ``slicer-core`` wheel.

Every volume here is non-axis-aligned with anisotropic voxels, the case where a wrong axis order, a lost direction
matrix or a float32 round-off shows up as a flipped, shifted or slanted mask.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from TensorPEFTLib.frontend import scene as scene_io  # noqa: E402
from TensorPEFTLib.frontend import segmentations, synthetic_scene  # noqa: E402
from TensorPEFTLib.data import find_cases, read_volume, validate_cases, write_volume  # noqa: E402


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    scene_io.ensure_segmentation_support(scene)
    yield scene
    scene.Clear(1)


OBLIQUE = synthetic_scene.oblique_affine(spacing=(0.7, 1.3, 2.9), angles_deg=(23.0, -31.0, 12.5), origin=(-12.345678901, 33.3, 7.77))


def _volume(scene, shape=(21, 17, 11), name="oblique", seed=0):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(shape).astype(np.float32)
    return scene_io.add_volume_node(scene, scene_io.Volume(array=array, affine=OBLIQUE), name), array


def _asymmetric_labels(shape):
    """An L-shaped block plus a second blob: any flip, transpose or shift of the axes changes it."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:12, 4:7, 2:5] = 1
    labels[3:6, 4:14, 2:5] = 1
    labels[15:19, 11:15, 6:10] = 1
    return labels


def test_volume_node_round_trips_with_identical_ijk_to_ras(scene, tmp_path):
    node, array = _volume(scene)
    assert np.array_equal(np.asarray(slicer.util.arrayFromVolume(node)), array.transpose(2, 1, 0))  # MRML is [k, j, i]
    path = scene_io.write_volume_node(node, tmp_path / "oblique.nrrd")
    on_disk = read_volume(path)
    assert np.array_equal(on_disk.affine, scene_io.ijk_to_ras(node))  # bit-identical, not merely close
    assert np.array_equal(on_disk.affine, OBLIQUE)
    assert np.array_equal(np.asarray(on_disk.array), array)  # [i, j, k] order kept
    back = scene_io.load_volume_file(scene, path, "back")
    assert scene_io.geometry_problems(node, back, tolerance=0.0) == []
    assert np.array_equal(np.asarray(slicer.util.arrayFromVolume(back)), np.asarray(slicer.util.arrayFromVolume(node)))
    # the reason for NRRD: NIfTI stores the affine as float32 and would not round-trip exactly
    write_volume(tmp_path / "oblique.nii.gz", array, OBLIQUE)
    assert not np.array_equal(read_volume(tmp_path / "oblique.nii.gz").affine, OBLIQUE)


def test_imported_mask_lands_where_the_label_map_had_it(scene, tmp_path):
    node, array = _volume(scene)
    labels = _asymmetric_labels(array.shape)
    # the worker's side: read the exported image, write the mask on its grid (as engine.segment does)
    image = read_volume(scene_io.write_volume_node(node, tmp_path / "image.nrrd"))
    mask_path = write_volume(tmp_path / "mask.nrrd", labels, like=image)

    segmentation = segmentations.load_mask_file(scene, mask_path, node, segment_names={1: "hippocampus"})
    assert segmentation.GetName() == "oblique segmentation"
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1 and seg.GetNthSegment(0).GetName() == "hippocampus"
    assert scene_io.geometry_problems(node, segmentation, tolerance=0.0) == []

    # voxel for voxel: export the segment back onto the volume's grid
    exported = segmentations.segmentation_to_labels(scene, segmentation, node)
    assert np.array_equal(exported.array, labels)

    # and in world space: the closed surface surrounds the label voxels' RAS positions
    assert seg.ContainsRepresentation("Closed surface")
    surface = vtk.vtkPolyData()
    assert segmentation.GetClosedSurfaceRepresentation(seg.GetNthSegmentID(0), surface)
    points = np.array([surface.GetPoint(i) for i in range(surface.GetNumberOfPoints())])
    voxels = np.argwhere(labels > 0).astype(float)
    ras = (OBLIQUE[:3, :3] @ voxels.T).T + OBLIQUE[:3, 3]
    assert np.linalg.norm(points.mean(0) - ras.mean(0)) < 1.0  # mm; a flipped axis moves it by > 5 mm
    lo, hi = ras.min(0), ras.max(0)
    assert np.all(points.min(0) > lo - 3.0) and np.all(points.max(0) < hi + 3.0)


def test_mask_with_two_labels_gives_two_named_segments(scene):
    node, array = _volume(scene)
    labels = _asymmetric_labels(array.shape)
    labels[labels > 0] = 1
    labels[15:19, 11:15, 6:10] = 2
    segmentation = segmentations.labels_to_segmentation(scene, labels, node, name="two", segment_names={1: "left", 2: "right"})
    seg = segmentation.GetSegmentation()
    assert sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())) == ["left", "right"]
    assert np.array_equal(segmentations.segmentation_to_labels(scene, segmentation, node, binary=False).array, labels)


def test_segments_named_alike_export_as_one_structure_each_whatever_their_order(scene, tmp_path):
    """A left and a right segment in every training segmentation, in another order in the second: each name is one
    structure (by its first appearance), written with its name; the adapter's plan reads the names."""
    from TensorPEFTLib.engine.labels import plan_labels

    pairs = []
    for n, order in enumerate((("left", "right"), ("right", "left"))):
        node, array = _volume(scene, name=f"two {n}", seed=n)
        labels = np.zeros(array.shape, dtype=np.uint8)
        labels[3:9, 4:9, 2:6] = 1
        labels[13:19, 10:15, 5:9] = 2
        segmentation = segmentations.labels_to_segmentation(scene, labels, node, name=f"seg {n}",
                                                            segment_names={1: order[0], 2: order[1]})
        pairs.append((node, segmentation))
    cases = segmentations.export_training_folder(scene, pairs, str(tmp_path / "train"))
    assert all(c["label"].endswith(".seg.nrrd") for c in cases)
    first, second = (read_volume(c["label"]) for c in cases)
    assert first.meta["segments"] == second.meta["segments"] == {1: "left", 2: "right"}
    assert first.array[5, 6, 3] == 1 and second.array[5, 6, 3] == 2  # the second's first block is its "right"
    report = validate_cases(find_cases(str(tmp_path / "train"), "training"), None)
    plan = plan_labels(report, None)
    assert plan.label_map.names == ("left", "right") and plan.label_map.values == ((1,), (2,))
    # a segmentation without one of the names is refused, naming it
    node, array = _volume(scene, name="three", seed=3)
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[3:9, 4:9, 2:6], labels[13:19, 10:15, 5:9] = 1, 2
    odd = segmentations.labels_to_segmentation(scene, labels, node, name="odd", segment_names={1: "left", 2: "middle"})
    with pytest.raises(scene_io.SceneError, match="odd has the segments left, middle where seg 0 has left, right"):
        segmentations.export_training_folder(scene, pairs + [(node, odd)], str(tmp_path / "t2"))
    # the panel's pairs table counts the structures for its CPU time estimate (finetune's default steps use them)
    assert segmentations.structure_count(pairs) == 2
    assert segmentations.structure_count(pairs + [(node, odd)]) == 1  # they disagree: the fine-tune will say so
    assert segmentations.structure_count([(node, None)]) == 1


def test_no_scratch_nodes_are_left_in_the_scene(scene):
    node, array = _volume(scene)
    before = scene.GetNumberOfNodes()
    segmentation = segmentations.labels_to_segmentation(scene, _asymmetric_labels(array.shape), node)
    segmentations.segmentation_to_labels(scene, segmentation, node)
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    assert not [n for n in names if n.startswith("__tensorpeft")]
    assert scene.GetNumberOfNodes() - before <= 3  # the segmentation and its display node (+ colour table)


def test_results_follow_the_volume_parent_transform(scene, tmp_path):
    node, array = _volume(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    transform.SetMatrixTransformToParent(scene_io._matrix(synthetic_scene.oblique_affine((1, 1, 1), (0, 0, 30), (5, 0, 0))))
    node.SetAndObserveTransformNodeID(transform.GetID())
    image = read_volume(scene_io.write_volume_node(node, tmp_path / "image.nrrd"))
    assert np.array_equal(image.affine, OBLIQUE)  # exchanged in the volume's local frame
    segmentation = segmentations.load_mask_file(scene, write_volume(tmp_path / "m.nrrd", _asymmetric_labels(array.shape), like=image), node)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    assert scene_io.geometry_problems(node, segmentation) == []  # the transform applies once, not twice
    assert np.array_equal(segmentations.segmentation_to_labels(scene, segmentation, node).array, _asymmetric_labels(array.shape))


def test_training_pairs_export_to_a_decathlon_folder_the_engine_accepts(scene, tmp_path):
    pairs = [synthetic_scene.make_synthetic_case(scene, name=f"case {n}", seed=n) for n in range(2)]
    pairs[1][0].SetName("case 0")  # two volumes with one name still give two distinct cases
    cases = segmentations.export_training_folder(scene, pairs, str(tmp_path / "train"))
    assert [c["case"] for c in cases] == ["case_0", "case_0_2"]
    found = find_cases(str(tmp_path / "train"), "training", require_labels=True)
    assert len(found) == 2
    validate_cases(found, 2, require_labels=True, require_foreground=True)
    for (volume, segmentation), case in zip(pairs, cases):
        image, label = read_volume(case["image"]), read_volume(case["label"])
        assert np.array_equal(image.affine, scene_io.ijk_to_ras(volume)) and np.array_equal(label.affine, image.affine)
        assert np.array_equal(np.asarray(image.array), np.asarray(slicer.util.arrayFromVolume(volume)).transpose(2, 1, 0))
        expected = segmentations.segmentation_to_labels(scene, segmentation, volume).array
        assert np.array_equal(np.asarray(label.array), expected) and set(np.unique(expected)) == {0, 1}


def test_bad_input_is_one_line_naming_the_node(scene, tmp_path):
    node, array = _volume(scene, name="T1 brain")
    with pytest.raises(scene_io.SceneError, match="no volume selected"):
        scene_io.volume_from_node(None)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    with pytest.raises(scene_io.SceneError, match="colour photo is a vtkMRMLVectorVolumeNode, not a scalar volume"):
        scene_io.volume_from_node(vector)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "unpainted")
    with pytest.raises(scene_io.SceneError, match="unpainted has no segments; paint"):
        segmentations.export_training_folder(scene, [(node, empty)], str(tmp_path / "t"))
    with pytest.raises(scene_io.SceneError, match="pair 1 is incomplete"):
        segmentations.export_training_folder(scene, [(node, None)], str(tmp_path / "t"))
    elsewhere = np.zeros_like(array, dtype=np.uint8)
    far = scene_io.add_volume_node(scene, scene_io.Volume(array=array, affine=synthetic_scene.oblique_affine((1, 1, 1), (0, 0, 0), (500, 0, 0))), "far")
    far_seg = segmentations.labels_to_segmentation(scene, _asymmetric_labels(array.shape), far, closed_surface=False)
    with pytest.raises(scene_io.SceneError, match="no labelled voxels inside T1 brain"):
        segmentations.export_training_folder(scene, [(node, far_seg)], str(tmp_path / "t"))
    wrong_grid = write_volume(tmp_path / "small.nrrd", elsewhere[:-1], OBLIQUE)
    with pytest.raises(scene_io.SceneError, match=r"small.nrrd: mask grid \(20, 17, 11\) differs from T1 brain's"):
        segmentations.load_mask_file(scene, wrong_grid, node)
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(scene_io.SceneError, match="mask geometry differs from T1 brain's by 0.5 mm"):
        segmentations.load_mask_file(scene, write_volume(tmp_path / "shifted.nrrd", elsewhere, shifted), node)
    assert not os.path.exists(tmp_path / "t" / "imagesTr")  # nothing written before every pair was checked


def test_synthesized_files_become_volume_nodes(scene, tmp_path):
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    arrays = [np.random.default_rng(n).random((8, 9, 10)).astype(np.float32) for n in range(2)]
    paths = [write_volume(tmp_path / f"synth_{n:03d}.nii.gz", a, affine) for n, a in enumerate(arrays)]
    nodes = scene_io.load_synthesized_volumes(scene, paths)
    assert [n.GetName() for n in nodes] == ["TensorPEFT synthesized 1", "TensorPEFT synthesized 2"]
    for node, array in zip(nodes, arrays):
        assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetDisplayNode() is not None
        assert np.array_equal(np.asarray(slicer.util.arrayFromVolume(node)), array.transpose(2, 1, 0))
        assert np.allclose(scene_io.ijk_to_ras(node), affine)


def test_training_pairs_are_found_by_reference_or_by_name(scene):
    first, first_seg = synthetic_scene.make_synthetic_case(scene, name="sub-01")  # linked through its reference geometry
    second, _ = synthetic_scene.make_synthetic_case(scene, name="sub-02", with_segmentation=False)
    synthetic_scene.make_synthetic_case(scene, name="sub-0", with_segmentation=False)  # a shorter prefix must not win
    by_name = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sub-02 hippocampus")
    pairs = scene_io.find_training_pairs(scene)
    assert [(v.GetName(), s.GetName()) for v, s in pairs] == [("sub-01", first_seg.GetName()), ("sub-02", by_name.GetName())]


def test_self_test_helpers_with_a_stand_in_worker(scene, tmp_path):
    case = synthetic_scene.prepare_self_test(scene, str(tmp_path), cases=2)
    assert len(find_cases(case["train"], "training", require_labels=True)) == 2
    image = read_volume(case["test_image"])
    mask = write_volume(tmp_path / "mask.nrrd", (np.asarray(image.array) > 0.8).astype(np.uint8), like=image)
    segmentation, problems = synthetic_scene.check_segmentation_result(scene, case["test_volume"], mask)
    assert problems == []
    assert segmentation.GetName() == "TensorPEFT selftest input segmentation"
    # the check can fail: a segmentation on another grid is reported
    other, _ = synthetic_scene.make_synthetic_case(scene, name="other", angles_deg=(0, 0, 0), with_segmentation=False)
    assert scene_io.geometry_problems(other, segmentation)


def test_real_segment_command_keeps_oblique_geometry(scene, tmp_path):
    """The real worker path (MONAI orientation + inverse in `tensorpeft segment`) on an oblique anisotropic volume."""
    from TensorPEFTLib import cli

    # at least one 64³ patch of unetr-small (a smaller scan is refused: see test_whole_brain)
    volume, _ = synthetic_scene.make_synthetic_case(scene, name="input", shape=(72, 66, 64), with_segmentation=False)
    image = scene_io.write_volume_node(volume, tmp_path / "input.nrrd")
    mask = str(tmp_path / "input_mask.nrrd")
    code = cli.main(["segment", "--image", image, "--out", mask, "--model", "unetr-small", "--device", "cpu",
                     "--threads", "1", "--min-component", "0", "--quiet"])
    assert code == 0
    assert np.array_equal(read_volume(mask).affine, scene_io.ijk_to_ras(volume))
    segmentation, problems = synthetic_scene.check_segmentation_result(scene, volume, mask)
    assert problems == []


def test_an_imported_prediction_has_the_apps_colours_a_left_and_right_apart(scene, tmp_path):
    """Slicer's import colours segments from its generic anatomy table: FreeSurfer's left and right hippocampus (17,
    53) came in as two greens, the colour of a reference. The Slicer module's import gives them the browser app's
    palette (red, magenta ...) in the adapter's order, so a structure the mask lacks does not shift the others'."""
    from types import SimpleNamespace

    from TensorPEFTLib.frontend import slicer_app

    node, array = _volume(scene)
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[3:9, 4:9, 2:6], labels[13:19, 10:15, 5:9] = 17, 53
    image = read_volume(scene_io.write_volume_node(node, tmp_path / "image.nrrd"))
    warnings, jumps = [], []
    host = SimpleNamespace(  # the parts of Slicer's application import_mask touches, besides the scene
        mrmlScene=scene,
        util=SimpleNamespace(warningDisplay=warnings.append, setSliceViewerLayers=lambda **_: None),
        app=SimpleNamespace(layoutManager=lambda: None),
        modules=SimpleNamespace(markups=SimpleNamespace(logic=lambda: SimpleNamespace(
            JumpSlicesToLocation=lambda *centre: jumps.append(centre)))))
    done = {"structures": {"17": "Left-Hippocampus", "53": "Right-Hippocampus"}}

    def colours(mask_labels, done):
        path = write_volume(tmp_path / "mask.nrrd", mask_labels, like=image)
        seg = slicer_app.import_mask(host, path, node, "hippocampus", done).GetSegmentation()
        return {seg.GetNthSegment(i).GetName(): tuple(seg.GetNthSegment(i).GetColor())
                for i in range(seg.GetNumberOfSegments())}

    palette = {name: pytest.approx(rgb) for name, rgb in segmentations.PREDICTION_PALETTE}
    assert colours(labels, done) == {"Left-Hippocampus": palette["red"], "Right-Hippocampus": palette["magenta"]}
    right_only = np.where(labels == 53, labels, 0).astype(np.uint8)
    assert colours(right_only, done) == {"Right-Hippocampus": palette["magenta"]}  # its colour, though 17 is missing
    one = (labels == 17).astype(np.uint8)
    assert colours(one, None) == {"hippocampus": palette["red"]}  # one structure: red, as in the app
    assert warnings == [] and len(jumps) == 3
