"""Dataset discovery (Decathlon folders, MONAI datalists) and the checks that run before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from TensorPEFTLib.data import DataError, find_cases, validate_cases, write_volume

AFFINE = np.diag([1.2, 1.0, 2.0, 1.0])


def _image(shape=(12, 10, 8), seed=0):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def _label(shape=(12, 10, 8)):
    lab = np.zeros(shape, np.uint8)
    lab[3:7, 3:6, 2:5] = 1
    return lab


def _case(root, name, *, image=None, label=None, affine=AFFINE, label_affine=None, split="Tr"):
    write_volume(root / f"images{split}" / f"{name}.nii.gz", _image() if image is None else image, affine)
    if label is not False:
        write_volume(root / f"labels{split}" / f"{name}.nii.gz", _label() if label is None else label,
                     affine if label_affine is None else label_affine)


@pytest.fixture
def decathlon(tmp_path):
    root = tmp_path / "Task04_Hippocampus"
    for i in range(3):
        _case(root, f"hippocampus_{i:03d}")
    _case(root, "hippocampus_900", split="Ts", label=False)
    (root / "imagesTr" / "._hippocampus_000.nii.gz").write_bytes(b"macOS resource fork")  # as in the real MSD
    return root


def _problem(err: pytest.ExceptionInfo, fragment: str) -> str:
    lines = [p for p in err.value.problems if fragment in p]
    assert lines, f"no problem mentioning {fragment!r} in {err.value.problems}"
    return lines[0]


def test_decathlon_folder_without_dataset_json(decathlon):
    cases = find_cases(decathlon)
    assert [c["name"] for c in cases] == ["hippocampus_000", "hippocampus_001", "hippocampus_002"]
    assert all(c["label"].endswith(f"labelsTr/{c['name']}.nii.gz") for c in cases)
    test = find_cases(decathlon, "test")
    assert [c["name"] for c in test] == ["hippocampus_900"] and test[0]["label"] is None
    report = validate_cases(cases, num_classes=2)
    assert report[0]["shape"] == [12, 10, 8] and report[0]["spacing"] == [1.2, 1.0, 2.0]
    assert report[0]["label_values"] == [0, 1]


def test_decathlon_dataset_json_and_nnunet_channel_names(tmp_path, decathlon):
    (decathlon / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "labels": {"0": "background", "1": "hippocampus"},
        "training": [{"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"}],
        "test": ["./imagesTs/hippocampus_900.nii.gz"]}))
    assert [c["name"] for c in find_cases(decathlon)] == ["hippocampus_001"]
    assert find_cases(decathlon, "test")[0]["image"].endswith("hippocampus_900.nii.gz")
    nn = tmp_path / "nnunet"
    write_volume(nn / "imagesTr" / "case_a_0000.nii.gz", _image(), AFFINE)
    write_volume(nn / "labelsTr" / "case_a.nii.gz", _label(), AFFINE)
    cases = find_cases(nn)
    assert cases[0]["name"] == "case_a" and cases[0]["label"].endswith("case_a.nii.gz")


def test_monai_datalist_json(tmp_path, decathlon):
    datalist = tmp_path / "lists" / "split.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({
        "training": [{"image": f"../{decathlon.name}/imagesTr/hippocampus_000.nii.gz",
                      "label": f"../{decathlon.name}/labelsTr/hippocampus_000.nii.gz", "fold": 0}],
        "validation": []}))
    cases = find_cases(datalist)
    assert len(cases) == 1 and cases[0]["fold"] == 0 and cases[0]["name"] == "hippocampus_000"
    validate_cases(cases, 2)
    with pytest.raises(DataError, match="split.json.*'test'"):
        find_cases(datalist, "test")


def test_image_without_label_and_label_without_image(decathlon):
    (decathlon / "labelsTr" / "hippocampus_002.nii.gz").unlink()
    write_volume(decathlon / "labelsTr" / "stray_007.nii.gz", _label(), AFFINE)
    with pytest.raises(DataError) as err:
        find_cases(decathlon)
    assert "image without a label" in _problem(err, "hippocampus_002.nii.gz")
    assert "label without an image" in _problem(err, "stray_007.nii.gz")
    assert "2 problem(s)" in str(err.value)


def test_shape_and_affine_mismatch(tmp_path):
    _case(tmp_path, "shape", label=_label((12, 10, 9)))
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 3.0, 4.0]
    _case(tmp_path, "moved", label_affine=shifted)
    with pytest.raises(DataError) as err:
        validate_cases(find_cases(tmp_path), 2)
    assert "label shape [12, 10, 9] differs from its image shape.nii.gz [12, 10, 8]" in _problem(err, "labelsTr/shape")
    assert "origin differs by 5 mm" in _problem(err, "labelsTr/moved")


def test_label_values_and_empty_label(tmp_path):
    bad = _label()
    bad[0, 0, 0] = 3
    _case(tmp_path, "three", label=bad)
    _case(tmp_path, "empty", label=np.zeros((12, 10, 8), np.uint8))
    frac = _label().astype(np.float32)
    frac[1, 1, 1] = 0.5
    _case(tmp_path, "fraction", label=frac)
    with pytest.raises(DataError) as err:
        validate_cases(find_cases(tmp_path), num_classes=2)
    assert "unexpected values [3]" in _problem(err, "three.nii.gz")
    assert "no foreground" in _problem(err, "empty.nii.gz")
    assert "non-integer" in _problem(err, "fraction.nii.gz")


def test_wrong_dimensionality(tmp_path):
    _case(tmp_path, "flat", image=_image((12, 10, 1)), label=_label((12, 10, 1)))
    _case(tmp_path, "series", image=_image((12, 10, 8, 3)))
    with pytest.raises(DataError) as err:
        validate_cases(find_cases(tmp_path), 2)
    assert "2D image" in _problem(err, "imagesTr/flat")
    assert "4D image" in _problem(err, "imagesTr/series") and "3D volume is needed" in str(err.value)


def test_nan_inf_and_unreadable(tmp_path):
    nan = _image()
    nan[1, 2, 3] = np.nan
    nan[2, 2, 3] = np.inf
    _case(tmp_path, "nan", image=nan)
    _case(tmp_path, "cut")
    path = tmp_path / "imagesTr" / "cut.nii.gz"
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(DataError) as err:
        validate_cases(find_cases(tmp_path), 2)
    assert "2 NaN/Inf voxel(s)" in _problem(err, "imagesTr/nan.nii.gz")
    assert "unreadable or truncated" in _problem(err, "imagesTr/cut.nii.gz")


def test_missing_layout_and_cohort_root(tmp_path):
    with pytest.raises(DataError, match="no imagesTr/"):
        find_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"tensorpeft_demo": True, "tasks": {"hippocampus": "hippocampus"}}))
    with pytest.raises(DataError, match="several tasks.*hippocampus"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        find_cases(tmp_path / "absent")


def test_unlabelled_validation_mode(tmp_path):
    _case(tmp_path, "img_only", label=False)
    with pytest.raises(DataError, match="image without a label"):
        find_cases(tmp_path)
    cases = find_cases(tmp_path, require_labels=False)
    assert validate_cases(cases, require_labels=False)[0]["shape"] == [12, 10, 8]
