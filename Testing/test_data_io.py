"""Volume IO keeps geometry: an oblique, anisotropic image goes in, its mask comes out on exactly its grid."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from TensorPEFTLib.data import Volume, VolumeError, is_volume_file, read_volume, write_volume


def _oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic (0.8 × 1.1 × 2.5 mm), with an origin far from zero."""
    ax, az = np.deg2rad(17.0), np.deg2rad(-23.0)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-91.5, 12.25, -40.0]
    return affine


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.normal(100.0, 20.0, (13, 11, 7)).astype(np.float32)


def _mask(array: np.ndarray) -> np.ndarray:
    mask = np.zeros(array.shape, dtype=np.uint8)
    mask[3:9, 2:6, 1:5] = 1
    mask[10, 8, 6] = 2  # a corner voxel: any flip or shift of the grid would move it
    return mask


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_oblique_anisotropic_round_trip(tmp_path, image, suffix):
    affine = _oblique_affine()
    path = write_volume(tmp_path / f"img{suffix}", image, affine)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.1, 2.5), atol=1e-6)
    np.testing.assert_allclose(vol.direction @ vol.direction.T, np.eye(3), atol=1e-6)
    # the predicted mask, written like its image, lands on exactly the image grid — in every output format
    for out in ("mask.nii.gz", "mask.nrrd", "mask.seg.nrrd"):
        write_volume(tmp_path / out, _mask(image), like=vol)
        back = read_volume(tmp_path / out)
        assert back.shape == vol.shape
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
        np.testing.assert_array_equal(back.array, _mask(image))


def test_nrrd_is_lps_on_disk_and_ras_in_memory(tmp_path, image):
    import nrrd

    affine = _oblique_affine()
    write_volume(tmp_path / "img.nrrd", image, affine)
    header = nrrd.read_header(str(tmp_path / "img.nrrd"))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], [91.5, -12.25, -40.0])  # RAS x, y negated
    # the same world point through nibabel (RAS) and through the NRRD header (LPS)
    lps_dirs = np.asarray(header["space directions"]).T
    voxel = np.array([4.0, 7.0, 2.0])
    lps = lps_dirs @ voxel + header["space origin"]
    ras = affine[:3, :3] @ voxel + affine[:3, 3]
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)


def _slicer_seg_header(affine: np.ndarray) -> dict:
    lps = np.diag([-1.0, -1.0, 1.0])
    return {
        "space": "left-posterior-superior",
        "space origin": lps @ affine[:3, 3],
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|Closed surface|",
    }


def test_slicer_seg_nrrd_labelmap_3d(tmp_path, image):
    """A 3D .seg.nrrd as Slicer writes it: label values 5 and 9 chosen by the user are kept."""
    import nrrd

    affine = _oblique_affine()
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 1:4, 1:3] = 5
    labels[6:9, 5:8, 3:6] = 9
    header = _slicer_seg_header(affine)
    header["space directions"] = (np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]).T
    header["kinds"] = ["domain"] * 3
    for i, (value, name) in enumerate([(5, "left hippocampus"), (9, "right hippocampus")]):
        header.update({f"Segment{i}_ID": f"Segment_{i}", f"Segment{i}_Name": name, f"Segment{i}_LabelValue": str(value),
                       f"Segment{i}_Layer": "0", f"Segment{i}_Color": "0.5 0.5 0.5"})
    nrrd.write(str(tmp_path / "s.seg.nrrd"), labels, header, index_order="F")
    vol = read_volume(tmp_path / "s.seg.nrrd")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(vol.array, labels)
    assert vol.meta["segments"] == {5: "left hippocampus", 9: "right hippocampus"}


def test_slicer_seg_nrrd_4d_layers(tmp_path, image):
    """Overlapping segments: Slicer stores 4D layers (a 'list' axis first); read into one 3D label map."""
    import nrrd

    affine = _oblique_affine()
    layers = np.zeros((2, *image.shape), np.uint8)
    layers[0, 2:8, 2:6, 1:4] = 1   # segment 0, layer 0, value 1
    layers[1, 5:10, 4:9, 2:6] = 1  # segment 1, layer 1, value 1 (overlaps segment 0)
    header = _slicer_seg_header(affine)
    dirs = (np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]).T
    header["space directions"] = np.vstack([np.full((1, 3), np.nan), dirs])
    header["kinds"] = ["list", "domain", "domain", "domain"]
    for i, name in enumerate(["hippocampus", "amygdala"]):
        header.update({f"Segment{i}_ID": f"Segment_{i}", f"Segment{i}_Name": name, f"Segment{i}_LabelValue": "1",
                       f"Segment{i}_Layer": str(i)})
    nrrd.write(str(tmp_path / "layers.seg.nrrd"), layers, header, index_order="F")
    vol = read_volume(tmp_path / "layers.seg.nrrd")
    assert vol.shape == image.shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    expected = np.zeros(image.shape, np.uint8)
    expected[layers[0] == 1] = 1
    expected[layers[1] == 1] = 2  # repeated label values → segment order; the later segment wins overlaps
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.meta["segments"] == {1: "hippocampus", 2: "amygdala"}


def test_written_seg_nrrd_has_slicer_fields(tmp_path, image):
    import nrrd

    write_volume(tmp_path / "pred.seg.nrrd", _mask(image), _oblique_affine(), segment_names={1: "hippocampus"})
    header = nrrd.read_header(str(tmp_path / "pred.seg.nrrd"))
    assert header["Segment0_Name"] == "hippocampus" and header["Segment0_LabelValue"] == "1"
    assert header["Segment1_LabelValue"] == "2" and header["Segment0_Layer"] == "0"
    assert read_volume(tmp_path / "pred.seg.nrrd").meta["segments"] == {1: "hippocampus", 2: "Segment_2"}


def test_freesurfer_mgz_round_trips_with_its_geometry(tmp_path, image):
    """FreeSurfer's T1.mgz / aseg.mgz: stored LIA (its conformed space), label values such as 17 and 53."""
    lia = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    aseg = (_mask(image) * 17).astype(np.uint16)  # uint16 is not an MGH type: written as int32
    for name, array in (("T1.mgz", image.astype(np.float32)), ("aseg.mgz", aseg), ("x.mgh", image.astype(np.uint8))):
        write_volume(tmp_path / name, array, lia)
        back = read_volume(tmp_path / name)
        np.testing.assert_array_equal(back.affine, lia)
        np.testing.assert_array_equal(np.asarray(back.array), array)
        assert back.meta["format"] == "mgh" and is_volume_file(tmp_path / name)
    assert read_volume(tmp_path / "T1.mgz", header_only=True).shape == image.shape


def test_write_refuses_wrong_grid_and_is_atomic(tmp_path, image):
    vol = Volume(image, _oblique_affine(), path="img.nii.gz")
    with pytest.raises(VolumeError, match="not on the grid"):
        write_volume(tmp_path / "m.nii.gz", np.zeros((5, 5, 5)), like=vol)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind
    with pytest.raises(VolumeError, match="unsupported file type"):
        write_volume(tmp_path / "m.mha", image)


def test_unreadable_and_truncated_files_name_the_file(tmp_path, image):
    write_volume(tmp_path / "ok.nii.gz", image, np.eye(4))
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="cut.nii.gz"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nrrd").write_bytes(b"not a nrrd at all")
    with pytest.raises(VolumeError, match="junk.nrrd"):
        read_volume(tmp_path / "junk.nrrd")
    with pytest.raises(VolumeError, match="not found"):
        read_volume(tmp_path / "absent.nii")
    (tmp_path / "plain.nii.gz").write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(VolumeError, match="plain.nii.gz"):
        read_volume(tmp_path / "plain.nii.gz")


def test_monai_pipeline_and_inverse_put_prediction_on_the_input_grid(tmp_path, image):
    """Orientation + resampling for the network, Invertd back: the mask is written on the image's own grid."""
    import torch

    from TensorPEFTLib.data import inference_transforms, inverse_transforms

    write_volume(tmp_path / "img.nii.gz", image, _oblique_affine())
    pre = inference_transforms(pixdim=(1.5, 1.5, 1.5))
    d = pre({"image": str(tmp_path / "img.nii.gz")})
    assert d["image"].shape[0] == 1 and tuple(d["image"].shape[1:]) != image.shape
    d["pred"] = (d["image"] > 0.5).float()
    back = inverse_transforms(pre)(d)["pred"]
    assert tuple(back.shape[1:]) == image.shape
    original = read_volume(tmp_path / "img.nii.gz")
    np.testing.assert_allclose(np.asarray(back.affine, dtype=np.float64), original.affine, atol=1e-4)
    write_volume(tmp_path / "pred.nii.gz", torch.as_tensor(back[0]).to(torch.uint8), like=original)
    np.testing.assert_allclose(read_volume(tmp_path / "pred.nii.gz").affine, original.affine, atol=1e-5)


def test_flip_axes_choose_which_random_flips_run():
    """``--flip lr`` trains with left-right flips only (axis 0 after RAS orientation); ``none`` with no flips."""
    from monai.transforms import RandFlipd

    from TensorPEFTLib.data import train_transforms
    from TensorPEFTLib.engine.jobs import FLIP_AXES

    def flips(axes):
        return [t.flipper.spatial_axis for t in train_transforms((16, 16, 16), flip_axes=axes).transforms
                if isinstance(t, RandFlipd)]

    assert flips(FLIP_AXES["all"]) == [0, 1, 2]
    assert flips(FLIP_AXES["lr"]) == [0]
    assert flips(FLIP_AXES["none"]) == []


def test_affine_augmentation_moves_image_and_label_together(tmp_path):
    """``affine=True``: with a volume no larger than the patch the crop alone never moves the anatomy; the random
    affine does, by voxels, and the label stays on the image's bright structure."""
    from TensorPEFTLib.data import train_transforms

    image = np.full((24, 24, 24), 0.2, np.float32)
    label = np.zeros((24, 24, 24), np.uint8)
    image[8:14, 10:16, 9:13] = 1.0
    label[8:14, 10:16, 9:13] = 1
    eye = np.eye(4)
    write_volume(tmp_path / "img.nii.gz", image, eye)
    write_volume(tmp_path / "lab.nii.gz", label, eye)
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}

    def centroids(affine: bool) -> list[np.ndarray]:
        pipeline = train_transforms((24, 24, 24), affine=affine, flip_prob=0.0, shift=0.0, scale=0.0,
                                    crop_foreground=False, seed=3)
        out = []
        for _ in range(8):
            sample = pipeline(case)
            sample = sample[0] if isinstance(sample, list) else sample
            img, lab = np.asarray(sample["image"])[0], np.asarray(sample["label"])[0] > 0
            assert lab.sum() > 20
            assert img[lab].mean() > 0.8 > img[~lab].mean()  # the label is where the structure is
            out.append(np.argwhere(lab).mean(0))
        return out

    still = centroids(False)
    assert max(np.abs(c - still[0]).max() for c in still) < 1e-6
    moved = centroids(True)
    assert max(np.abs(c - moved[0]).max() for c in moved) > 2.0
