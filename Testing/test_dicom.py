"""A DICOM series as a scanner or PACS exports a scan: read as one volume with its geometry, segmented and trained
on like any file, refused in one line when it is not one regular 3D series."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from TensorPEFTLib.cli import main
from TensorPEFTLib.data import VolumeError, find_cases, read_volume, validate_cases, write_volume
from TensorPEFTLib.data.dicom import is_dicom_series

import synthetic

pytest.importorskip("pydicom")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _volume(shape=(36, 34, 34), seed=0) -> np.ndarray:
    """Values on the series' 0.5 grid, so the int16 storage keeps them exactly."""
    return np.round(np.random.default_rng(seed).normal(400, 60, shape) * 2).astype(np.float32) / 2


def test_a_series_reads_as_the_volume_and_geometry_it_was_written_from(tmp_path):
    volume = _volume((12, 10, 8))
    affine = synthetic.oblique_affine()  # rotated, anisotropic (1.2 x 1.0 x 1.5 mm)
    synthetic.write_dicom_series(str(tmp_path / "series"), volume, affine)  # files in shuffled order, no extension
    assert is_dicom_series(tmp_path / "series") and not is_dicom_series(tmp_path)
    read = read_volume(tmp_path / "series")
    np.testing.assert_allclose(read.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(read.array, volume)  # slope 0.5, intercept -100 undone
    # as dcm2niix's NIfTI of the same scan would be
    nifti = read_volume(write_volume(tmp_path / "same.nii.gz", volume, affine))
    np.testing.assert_allclose(read.affine, nifti.affine, atol=1e-5)
    assert read_volume(tmp_path / "series", header_only=True).shape == volume.shape
    # stored left-handed (slices running against the row x column normal, as a NIfTI may be): the series reads with
    # its slices along the normal - the same voxels in the world, the slice axis reversed
    left_handed = affine @ np.diag([1.0, 1.0, -1.0, 1.0])
    synthetic.write_dicom_series(str(tmp_path / "lh"), volume, left_handed)
    read = read_volume(tmp_path / "lh")
    expected = left_handed.copy()
    expected[:3, 2] *= -1
    expected[:3, 3] = left_handed[:3, 3] + (volume.shape[2] - 1) * left_handed[:3, 2]
    np.testing.assert_allclose(read.affine, expected, atol=1e-5)
    np.testing.assert_array_equal(read.array, volume[:, :, ::-1])


def test_what_is_not_one_regular_series_is_refused_in_one_line(tmp_path):
    volume, affine = _volume((12, 10, 8)), synthetic.oblique_affine()
    both = tmp_path / "both"
    synthetic.write_dicom_series(str(both), volume, affine, series_number=3)
    for path in synthetic.write_dicom_series(str(tmp_path / "other"), volume, affine, series_number=4):
        shutil.move(path, both / (os.path.basename(path) + "b"))
    with pytest.raises(VolumeError, match="2 DICOM series in one folder .*T1 series 3.*put each series in its own"):
        read_volume(both)
    gap = tmp_path / "gap"
    paths = synthetic.write_dicom_series(str(gap), volume, affine, shuffle=False)
    os.remove(paths[4])
    with pytest.raises(VolumeError, match="not evenly spaced.*a slice is missing"):
        read_volume(gap)
    # a non-image DICOM file beside the slices (a DICOMDIR, a report) is passed over; alone it is no scan
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    (tmp_path / "lone").mkdir()
    FileDataset("DICOMDIR", {}, file_meta=meta, preamble=b"\0" * 128).save_as(
        str(tmp_path / "lone" / "DICOMDIR"), enforce_file_format=True)
    fine = tmp_path / "fine"
    synthetic.write_dicom_series(str(fine), volume, affine)
    shutil.copy(tmp_path / "lone" / "DICOMDIR", fine / "DICOMDIR")
    assert read_volume(fine).shape == volume.shape
    with pytest.raises(VolumeError, match="no DICOM image slices"):
        read_volume(tmp_path / "lone")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(VolumeError, match="a folder without DICOM files"):
        read_volume(tmp_path / "empty")


def test_segment_and_finetune_take_series_folders(tmp_path, capsys):
    model = synthetic.save_tiny_model(str(tmp_path / "unetr.safetensors"))
    rng = np.random.default_rng(0)
    affine = synthetic.oblique_affine()
    data = tmp_path / "data"
    for i in range(3):  # imagesTr/caseN/ (a series folder) with labelsTr/caseN.nii.gz
        image, label = synthetic.blob_case(rng)
        image = np.round(image * 2000) / 2  # the int16 storage's 0.5 steps
        synthetic.write_dicom_series(str(data / "imagesTr" / f"case{i}"), image, affine)
        write_volume(data / "labelsTr" / f"case{i}.nii.gz", label, affine)
    cases = find_cases(str(data), "training")
    assert [c["name"] for c in cases] == ["case0", "case1", "case2"] and os.path.isdir(cases[0]["image"])
    validate_cases(cases, None)  # the series' geometry equals its label's
    run = str(tmp_path / "run")
    assert main(["finetune", "--model", model, "--data", str(data), "--out", run, "--steps", "2", "--threads", "1",
                 "--quiet"]) == 0
    series = str(data / "imagesTr" / "case0")
    assert main(["segment", "--adapter", run, "--image", series, "--out", str(tmp_path / "mask.nii.gz"), "--quiet"]) == 0
    mask, scan = read_volume(tmp_path / "mask.nii.gz"), read_volume(series)
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine, atol=1e-5)
    # a patient folder of series: one mask per series, named after its folder
    assert main(["segment", "--adapter", run, "--image", str(data / "imagesTr"), "--out", str(tmp_path / "masks"),
                 "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "masks")) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    capsys.readouterr()
