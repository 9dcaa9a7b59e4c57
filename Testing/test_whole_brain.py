"""Scans as users bring them: working spacing, any orientation and intensity range, foreground normalisation and
crop, the recipe defaults, and clear refusals of scans a model cannot segment."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from TensorPEFTLib.cli import main
from TensorPEFTLib.data import read_volume, write_volume
from TensorPEFTLib.data.preprocess import (Preprocessing, PreprocessingError, check_spacing, foreground_mask,
                                           normalise_foreground, plan_spacing, ras_spacing, resampled_shape)

import synthetic
from TensorPEFTLib.data.demo import _rotation  # the cohort's own rotation (radians about x, y, z)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _head(shape=(60, 70, 56), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal 'brain' with a brighter core ('white matter') and a small bright target, in Rician-like noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.asarray(shape) / 2
    r = (((grid - centre) / (np.asarray(shape) * 0.36)) ** 2).sum(-1)
    brain = r <= 1
    image = np.abs(rng.normal(0.0, 0.03, shape)).astype(np.float32)
    image[brain] += 0.5
    image[r <= 0.4] += 0.3
    target = (((grid - centre - np.array([6, 0, 0])) / 4.0) ** 2).sum(-1) <= 1
    image[target] += 0.2
    return image, target.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- pieces


def test_foreground_mask_finds_the_head_whatever_the_range_and_offset():
    image, _ = _head()
    truth = foreground_mask(image)
    assert 0.2 < truth.mean() < 0.4  # the ellipsoid, not the noise
    for gain, offset in ((1.0, 0.0), (4095.0, 0.0), (1234.5, 300.0), (1e-3, -5.0)):
        mask = foreground_mask(image * gain + offset)
        dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.999, (gain, offset, dice)  # float32 rounding moves a few border voxels at most
    assert not foreground_mask(np.full((20, 20, 20), 7.0, np.float32)).any()  # no contrast, no foreground


def test_foreground_normalisation_ignores_field_of_view_and_scanner_range():
    image, _ = _head()
    ref = normalise_foreground(image)
    assert ref.min() == 0.0 and ref.max() == 1.0
    padded = np.pad(image, 40, mode="constant")  # the same head with four times the air around it
    wide = normalise_foreground(padded)[40:-40, 40:-40, 40:-40]
    brain = foreground_mask(image)
    assert np.abs(wide - ref)[brain].max() < 0.02
    scaled = normalise_foreground(image * 4095.0 + 100.0)
    assert np.abs(scaled - ref).max() < 1e-4
    # whole-volume percentiles, by contrast, move with the field of view
    lo, hi = np.percentile(padded, [0.5, 99.5])
    assert abs(lo - np.percentile(image, 0.5)) > 0 or abs(hi - np.percentile(image, 99.5)) > 1e-3


def test_spacing_planning_and_checks():
    assert plan_spacing([(1.0, 1.0, 1.2), (0.9, 0.9, 1.5), (1.1, 1.0, 1.2)]) == (1.0, 1.0, 1.2)
    sagittal = np.array([[0, 0, 1.3, 0], [-0.9, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])  # i→P, j→S, k→R
    assert ras_spacing(sagittal) == (1.3, 0.9, 1.0)
    check_spacing("scan.nii.gz", np.diag([1.0, 1.0, 1.2, 1.0]), (1.5, 1.5, 1.5))
    with pytest.raises(PreprocessingError, match=r"scan\.nii\.gz: voxel size 1x1x5 mm is more than 3x off"):
        check_spacing("scan.nii.gz", np.diag([1.0, 1.0, 5.0, 1.0]), (1.5, 1.5, 1.5))
    assert resampled_shape((100, 100, 100), np.diag([1.0, 1.0, 1.0, 1.0]), (2.0, 2.0, 2.0)) == (50, 50, 50)
    prep = Preprocessing(spacing=(1.5, 1.5, 1.5))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(PreprocessingError, match="intensity"):
        Preprocessing(intensity="minmax")


def _orientations(image: np.ndarray, spacing: float = 1.0, tilt=(0.0, 0.0, 15.0),
                  origin=(0.0, 0.0, 0.0)) -> dict[str, np.ndarray]:
    """The same head's affines stored RAS, LPS and oblique (``tilt`` degrees about x, y, z), centred on ``origin``
    (world mm), and the arrays to store with them."""
    from scipy.ndimage import affine_transform

    shape = np.asarray(image.shape)
    centre = np.asarray(origin, dtype=float)
    ras = np.diag([spacing] * 3 + [1.0])
    ras[:3, 3] = centre - spacing * (shape - 1) / 2
    lps = ras.copy()
    lps[:3, :3] = np.diag([-spacing, -spacing, spacing])
    lps[:3, 3] = centre + spacing * (shape - 1) / 2 * np.array([1, 1, -1])
    rot = _rotation(np.deg2rad(tilt))
    oblique = np.eye(4)
    oblique[:3, :3] = rot * spacing
    oblique[:3, 3] = centre - rot @ (spacing * (shape - 1) / 2)
    # the oblique grid's voxel (i,j,k) sits at world oblique @ ijk: sample the RAS array there
    to_ras = np.linalg.inv(ras) @ oblique
    oblique_array = affine_transform(image, to_ras[:3, :3], to_ras[:3, 3], order=1)
    return {"ras": (image, ras), "lps": (image[::-1, ::-1, :].copy(), lps), "oblique": (oblique_array, oblique)}


def test_any_storage_gives_the_model_the_same_voxels_and_masks_go_back(tmp_path):
    from TensorPEFTLib.data import inference_transforms, inverse_transforms

    image, _ = _head()
    pre = inference_transforms(pixdim=(2.0, 2.0, 2.0))
    post = inverse_transforms(pre, keys="pred", orig_key="image", nearest=True)
    seen = {}
    for name, (array, affine) in _orientations(image).items():
        path = str(tmp_path / f"{name}.nii.gz")
        write_volume(path, array, affine)
        data = pre({"image": path})
        seen[name] = np.asarray(data["image"][0])
        # a 'prediction' on the working grid (the bright core) lands on the stored grid of each variant
        data["pred"] = (data["image"] > 0.55).float()
        back = np.asarray(post(data)["pred"][0])
        assert back.shape == array.shape
        direct = normalise_foreground(array) > 0.55
        dice = 2 * np.logical_and(back > 0, direct).sum() / ((back > 0).sum() + direct.sum())
        assert dice > 0.85, (name, dice)
    assert seen["ras"].shape == seen["lps"].shape
    assert np.abs(seen["ras"] - seen["lps"]).max() < 1e-4  # LPS is only a relabelling of the same voxels
    core = seen["ras"] > 0.55
    assert abs(int((seen["oblique"] > 0.55).sum()) - int(core.sum())) < 0.1 * core.sum()
    assert seen["ras"].shape[0] < 45  # cropped to the head (60 voxels at 1 mm = 30 at 2 mm, plus a margin)


class _Threshold:
    """A 'model' whose prediction is known: foreground where the normalised image is above 0.55 (the bright core)."""

    def __call__(self, x):
        import torch

        return torch.cat([0.55 - x, x - 0.55], dim=1) * 20.0

    def eval(self):
        return self


@pytest.mark.parametrize("tilt, origin", [((0.0, 0.0, 15.0), (0.0, 0.0, 0.0)), ((12.0, -17.0, 9.0), (-30.0, 45.0, 20.0))])
def test_segment_puts_the_mask_back_on_every_stored_grid(tmp_path, tilt, origin):
    """The product path (resample, normalise, crop, sliding window, paste, invert) against the same threshold
    applied to each stored scan directly: a displaced or flipped mask would lose the overlap."""
    from TensorPEFTLib.engine import Events
    from TensorPEFTLib.engine.runtime import select_runtime
    from TensorPEFTLib.engine.segmentation import segment_images

    image, _ = _head(shape=(64, 72, 60))
    for name, (array, affine) in _orientations(image, tilt=tilt, origin=origin).items():
        path, out = str(tmp_path / f"{name}.nii.gz"), str(tmp_path / f"{name}_mask.nii.gz")
        write_volume(path, array, affine)
        segment_images(_Threshold(), [path], [out], select_runtime("cpu", "off", 1), Events(quiet=True),
                       patch_size=(16, 16, 16), preprocessing=Preprocessing(spacing=(2.0, 2.0, 2.0)),
                       min_component_mm3=0)
        mask = read_volume(out)
        assert mask.shape == array.shape and np.allclose(mask.affine, affine)
        direct = normalise_foreground(array) > 0.55
        dice = 2 * np.logical_and(mask.array > 0, direct).sum() / ((mask.array > 0).sum() + direct.sum())
        assert dice > 0.85, (name, tilt, dice)


# ----------------------------------------------------------------------------------------------- recipe defaults


def test_recipe_defaults_for_few_subjects():
    from TensorPEFTLib.engine.jobs import default_lr, default_steps, split_validation

    assert default_steps("segmentation", 5) == 1250 and default_steps("segmentation", 12) == 1250
    assert default_steps("segmentation", 13) == 1300 and default_steps("synthesis", 5) == 300
    assert default_lr("segmentation", "lora-pt") == 1e-3 and default_lr("synthesis", "lora") == 1e-3
    cases = [{"image": f"c{i}.nii.gz"} for i in range(7)]
    train, val = split_validation(cases, seed=0)
    assert len(train) == 5 and len(val) == 2 and not {c["image"] for c in train} & {c["image"] for c in val}
    assert split_validation(cases, seed=0) == (train, val)  # seeded: --resume sees the same split
    assert split_validation(cases[:3], seed=0) == (cases[:3], [])


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory):
    """`finetune` with no recipe flags on 4 oblique, anisotropic cases (the tiny model records no spacing)."""
    from TensorPEFTLib.engine import Events, TrainSettings, finetune
    from TensorPEFTLib.adapters import AdapterConfig

    root = tmp_path_factory.mktemp("defaults")
    synthetic.write_segmentation_dataset(str(root / "data"), n_train=4, n_test=1, seed=1)
    model = synthetic.save_tiny_model(str(root / "unetr.safetensors"))
    out = str(root / "run")
    finetune(model, str(root / "data"), out, AdapterConfig(method="lora", rank=2),
             TrainSettings(steps=4, lr=None, eval_every=None, checkpoint_every=None), device="cpu",
             events=Events(quiet=True), threads=1)
    return root, model, out


def test_finetune_defaults_plan_the_spacing_split_and_flip(defaults_run):
    root, _, out = defaults_run
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert saved["preprocessing"]["spacing"] == [1.2, 1.0, 1.5]  # the cases' median (nnU-Net planning)
    assert saved["preprocessing"]["intensity"] == "foreground"
    assert saved["train_cases"] == 3 and saved["val_cases"] == 1 and len(saved["val_names"]) == 1
    assert saved["flip"] == "lr" and saved["affine"] is True and saved["train_lr"] == 1e-3
    assert saved["loss"] == "dice-ce" and saved["label_resampling"] == "linear"  # what --resume trains on with
    assert saved["centre_jitter"] == 16
    history = json.load(open(os.path.join(out, "history.json")))
    assert history["evals"], "a held-out case was scored during training"


def test_a_recorded_working_spacing_is_used_and_spacing_overrides_it(tmp_path):
    import torch

    from TensorPEFTLib.adapters import AdapterConfig
    from TensorPEFTLib.engine import Events, TrainSettings, finetune
    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.checkpoints import save_model

    synthetic.write_segmentation_dataset(str(tmp_path / "data"), n_train=2, n_test=0, seed=2)
    torch.manual_seed(0)
    model = build_model("unetr-small", **synthetic.TINY_UNETR)
    model.tensorpeft_spec["preprocessing"] = Preprocessing(spacing=(1.4, 1.4, 1.4)).to_dict()
    path = save_model(model, str(tmp_path / "pretrained.safetensors"))
    runs = {}
    for name, spacing in (("recorded", None), ("override", (1.0, 1.1, 1.2))):
        out = str(tmp_path / name)
        finetune(path, str(tmp_path / "data"), out, AdapterConfig(method="lora", rank=1),
                 TrainSettings(steps=1, eval_every=1, checkpoint_every=1), spacing=spacing, device="cpu",
                 events=Events(quiet=True), threads=1)
        runs[name] = json.load(open(os.path.join(out, "adapter_config.json")))["preprocessing"]["spacing"]
    assert runs == {"recorded": [1.4, 1.4, 1.4], "override": [1.0, 1.1, 1.2]}


def test_segment_reports_window_progress_and_writes_on_the_input_grid(defaults_run, tmp_path):
    from TensorPEFTLib.engine import Events, segment

    root, _, out = defaults_run
    image = str(root / "data" / "imagesTs" / "case_ts00.nii.gz")
    events = tmp_path / "events.jsonl"
    sink = Events(str(events), quiet=True)
    records = segment(image, str(tmp_path / "mask.nii.gz"), adapter=out, device="cpu", events=sink, threads=1)
    sink.close()
    mask, ref = read_volume(records[0]["mask"]), read_volume(image)
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    steps = [json.loads(line) for line in events.read_text().splitlines() if '"step"' in line]
    assert len(steps) >= 2 and steps[-1]["step"] == steps[-1]["steps"] and steps[-1]["mask"] == records[0]["mask"]
    assert all("eta_seconds" in e and e["images"] == 1 for e in steps)
    assert records[0]["mirror"] == "lr"  # the adapter was trained with left-right flips


def _bad(tmp_path, name: str, array: np.ndarray, affine: np.ndarray) -> str:
    path = str(tmp_path / name)
    if array.ndim == 3 or array.ndim == 4:
        write_volume(path, array, affine)
    else:  # a 2D slice: write_volume refuses it, as it should; write it with nibabel
        import nibabel as nib

        nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("slice", "2D image"),
    ("series", "4D image"),
    ("thick", "more than 3x off"),
    ("small", "smaller than the model's"),
    ("empty", "same value"),
])
def test_segment_refuses_what_it_cannot_segment(defaults_run, tmp_path, capsys, case, expected):
    root, _, out = defaults_run
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    arrays = {
        "slice": (np.random.default_rng(0).random((40, 40)).astype(np.float32), affine),
        "series": (np.random.default_rng(0).random((40, 40, 30, 3)).astype(np.float32), affine),
        "thick": (np.random.default_rng(0).random((40, 40, 10)).astype(np.float32), np.diag([1.2, 1.0, 6.0, 1.0])),
        "small": (np.random.default_rng(0).random((20, 40, 40)).astype(np.float32), affine),
        "empty": (np.zeros((40, 40, 40), np.float32), affine),
    }
    image = _bad(tmp_path, f"{case}.nii.gz", *arrays[case])
    target = tmp_path / "masks" / "mask.nii.gz"
    code = main(["segment", "--adapter", out, "--image", image, "--out", str(target), "--threads", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and image in err[0] and expected in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not target.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------------------------- demo cohort


def test_whole_brain_subjects_and_evaluation_variants(tmp_path):
    from TensorPEFTLib.data.demo import (SCANNER_RANGES, STORAGE_DIRECTIONS, build_whole_brain_eval, scanner_range,
                                         whole_brain_grid)

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        grid, drawn = whole_brain_grid(rng, oblique_deg=10.0)
        seen.add(drawn["storage"])
        extent = np.abs(grid.affine[:3, :3]) @ np.asarray(grid.shape)
        assert extent.min() >= 150.0 and 0.9 <= min(grid.spacing) and max(grid.spacing) <= 1.5
        assert np.allclose(grid.direction.T @ grid.direction, np.eye(3), atol=1e-9)
    assert seen == set(STORAGE_DIRECTIONS)
    image = np.linspace(0, 700.0, 1000, dtype=np.float32).reshape(10, 10, 10)
    stored = {kind: scanner_range(image, kind) for kind in SCANNER_RANGES}
    assert stored["12bit"].dtype == np.int16 and stored["12bit"].max() == 4095
    assert stored["unit"].max() == 1.0 and stored["raw"].max() == 700.0

    variants = (("ras", "RAS", 4.0, "12bit"), ("lps", "LPS", 4.0, "raw"), ("oblique", "oblique", 4.5, "unit"))
    summary = build_whole_brain_eval(tmp_path / "eval", templates=("icbm2009c",), variants=variants, reference_mm=2.0)
    meta = json.load(open(tmp_path / "eval" / "dataset.json"))
    assert summary["cases"] == 3 and {c["variant"] for c in meta["test"]} == {"ras", "lps", "oblique"}
    volumes = {c["variant"]: (read_volume(tmp_path / "eval" / c["image"]), read_volume(tmp_path / "eval" / c["label"]))
               for c in meta["test"]}
    ras_img, ras_lbl = volumes["ras"]
    lps_img, lps_lbl = volumes["lps"]
    assert ras_img.array.max() == 4095 and np.isclose(volumes["oblique"][0].array.max(), 1.0)
    # the same brain: LPS is the RAS array flipped on two axes, labels to the voxel
    assert np.array_equal(lps_lbl.array, ras_lbl.array[::-1, ::-1, :])
    assert ras_lbl.array.sum() > 20 and abs(int(volumes["oblique"][1].array.sum()) * 4.5 ** 3
                                            - int(ras_lbl.array.sum()) * 4.0 ** 3) < 0.35 * ras_lbl.array.sum() * 64


def test_figures_show_any_stored_scan_in_ras_planes():
    from TensorPEFTLib.engine.report import as_ras

    image, _ = _head(shape=(12, 14, 10))
    variants = _orientations(image)
    lps, lps_affine = variants["lps"]
    assert np.array_equal(as_ras(lps, lps_affine), image)
    sagittal = np.transpose(image, (1, 2, 0))[::-1].copy()  # stored i→P, j→S, k→R
    affine = np.array([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    assert np.array_equal(as_ras(sagittal, affine), image)


# ----------------------------------------------------------------------------------------------- label resampling

_ELLIPSOID_CENTRE, _ELLIPSOID_AXES = np.array([19.3, 20.1, 18.7]), np.array([9.0, 5.0, 6.0])  # mm, hippocampus-sized


def _inside_ellipsoid(points: np.ndarray) -> np.ndarray:
    return (((points - _ELLIPSOID_CENTRE) / _ELLIPSOID_AXES) ** 2).sum(-1) < 1


def _dice_on_fine_grid(label: np.ndarray, affine: np.ndarray, n: int = 40) -> float:
    """Dice of ``label`` (voxels of the grid ``affine``) against the exact ellipsoid, both on a 0.25 mm grid: the
    overlap a Dice at any finer resolution measures."""
    fine = np.indices((4 * n,) * 3).reshape(3, -1).T * 0.25 - 0.375
    voxel = np.rint((fine - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    inside = np.all((voxel >= 0) & (voxel < label.shape), axis=1)
    pred = np.zeros(len(fine), bool)
    pred[inside] = label[tuple(voxel[inside].T)] > 0
    truth = _inside_ellipsoid(fine)
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_labels_are_resampled_to_the_working_grid_through_their_classes(tmp_path):
    """Training and validation labels go to the working grid as nnU-Net resamples them (one-hot, linear, most likely
    class), not by nearest neighbour, which shifts every boundary by a fixed fraction of a voxel."""
    from TensorPEFTLib.data import val_transforms

    n = 40
    label = _inside_ellipsoid(np.indices((n,) * 3).reshape(3, -1).T.astype(float)).reshape((n,) * 3).astype(np.uint8)
    write_volume(tmp_path / "image.nii.gz", label.astype(np.float32) + 0.5, np.eye(4))
    write_volume(tmp_path / "label.nii.gz", label, np.eye(4))
    case = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    dice = {}
    for classes in (None, 2):
        out = val_transforms(pixdim=(1.5,) * 3, label_classes=classes, intensity="none", crop_foreground=False)(case)
        resampled = np.asarray(out["label"])[0]
        assert set(np.unique(resampled)) == {0.0, 1.0} and out["label"].shape == out["image"].shape
        dice[classes] = _dice_on_fine_grid(resampled, np.asarray(out["label"].affine))
    # measured: 0.890 nearest, 0.904 through the classes
    assert dice[2] > 0.9 and dice[2] > dice[None] + 0.005


def test_evaluation_references_sample_the_probability_map_on_every_grid():
    """Every stored variant's reference is the atlas map thresholded at its own voxel centres; the old way (nearest
    neighbour of a label thresholded on another grid) is less exact on an oblique grid."""
    from TensorPEFTLib.data.demo import _Field, _Grid, reference_label

    n = 40
    points = np.indices((2 * n,) * 3).reshape(3, -1).T * 0.5  # a 0.5 mm probability map (%) with a soft edge
    radius = np.sqrt((((points - _ELLIPSOID_CENTRE) / _ELLIPSOID_AXES) ** 2).sum(-1))
    map_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    probability = _Field(np.clip(50.0 + 100.0 * (1.0 - radius), 0, 100).reshape((2 * n,) * 3), map_affine)
    tilt = _rotation(np.deg2rad([14.0, -11.0, 17.0]))
    oblique = _Grid((28, 28, 28), 1.0, _ELLIPSOID_CENTRE, tilt)
    ras_1mm = _Grid((40, 40, 40), 1.0, (19.5, 19.5, 19.5))
    new = reference_label(probability, oblique)
    old = (_Field(reference_label(probability, ras_1mm).astype(np.float32), ras_1mm.affine)
           .sample(oblique.world(), order=0).reshape(oblique.shape))
    new_dice, old_dice = _dice_on_fine_grid(new, oblique.affine), _dice_on_fine_grid(old, oblique.affine)
    # measured: 0.941 from the map, 0.919 the old way (0.943 on a RAS 1 mm grid)
    assert new.dtype == np.uint8 and new_dice > 0.9 and new_dice > old_dice + 0.01


def test_the_default_loss_is_the_foreground_dice_over_the_batch_plus_cross_entropy():
    """``dice-ce`` (nnU-Net's): a patch drawn away from a small structure does not turn every bit of foreground
    probability into a Dice of ~0 for that sample, and the background's Dice does not dilute the structure's."""
    import torch
    import torch.nn.functional as F

    from TensorPEFTLib.engine.runtime import EngineError
    from TensorPEFTLib.engine.segmentation import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, 6)
    labels = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    labels[0, 0, 1:4, 2:5, 2:4] = 1  # the second patch has no foreground at all
    probs = logits.softmax(1)
    onehot = F.one_hot(labels[:, 0], 2).permute(0, 4, 1, 2, 3).float()
    ce = F.cross_entropy(logits, labels[:, 0])
    fg, truth = probs[:, 1], onehot[:, 1]
    batch_dice = 1 - (2 * (fg * truth).sum() + 1e-5) / (fg.sum() + truth.sum() + 1e-5)
    assert torch.allclose(segmentation_loss("dice-ce")(logits, labels), batch_dice + ce, atol=1e-5)
    dims = (2, 3, 4)  # MONAI's DiceCELoss as it comes: per sample and class, background included
    per_sample = 1 - (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    assert torch.allclose(segmentation_loss("dice-ce-all")(logits, labels), per_sample.mean() + ce, atol=1e-5)
    with pytest.raises(EngineError, match="segmentation loss 'focal'.*dice-ce"):
        segmentation_loss("focal")


def test_every_storage_of_a_head_is_resampled_onto_one_world_lattice(tmp_path):
    """The working grid's voxel centres sit at multiples of the working spacing from the world origin, whatever the
    scan's origin, orientation or obliquity: the same head stored two ways gives the model the same voxels (up to
    interpolation)."""
    from TensorPEFTLib.data import inference_transforms

    rng = np.random.default_rng(0)
    image = rng.random((30, 34, 28)).astype(np.float32) + 1.0
    tilt = _rotation(np.deg2rad([12.0, -17.0, 9.0]))
    stored = {"ras": np.diag([1.0, 1.0, 1.2, 1.0]), "oblique": np.eye(4)}
    stored["ras"][:3, 3] = [-14.63, 20.17, -3.31]
    stored["oblique"][:3, :3] = tilt * np.array([1.1, 0.9, 1.0])
    stored["oblique"][:3, 3] = [7.9, -11.3, 2.6]
    pre = inference_transforms(pixdim=(1.5, 1.5, 1.5), crop_foreground=False, intensity="none")
    for name, affine in stored.items():
        path = tmp_path / f"{name}.nii.gz"
        write_volume(path, image, affine)
        working = pre({"image": str(path)})["image"]
        out = np.asarray(working.affine, dtype=np.float64)
        assert np.allclose(out[:3, :3], np.diag([1.5] * 3))
        assert np.allclose(out[:3, 3] / 1.5, np.round(out[:3, 3] / 1.5), atol=1e-6), (name, out[:3, 3])
        # every voxel centre of the scan lies inside the working grid
        corners = np.array([[i, j, k, 1] for i in (0, 29) for j in (0, 33) for k in (0, 27)]).T
        inside = np.linalg.solve(out, affine @ corners)[:3]
        assert inside.min() >= -1e-6 and np.all(inside.max(axis=1) <= np.asarray(working.shape[1:]) - 1 + 1e-6)


def test_foreground_patches_do_not_always_hold_the_structure_at_their_centre(tmp_path):
    """``centre_jitter``: a patch drawn for a foreground voxel puts that voxel anywhere within ±J of its centre, so a
    UNETR does not learn that the structure sits mid-patch (with J = 0 it always does)."""
    from TensorPEFTLib.data import train_transforms

    image = np.full((48, 48, 48), 0.5, np.float32)
    label = np.zeros((48, 48, 48), np.uint8)
    label[23:25, 23:25, 23:25] = 1
    write_volume(tmp_path / "img.nii.gz", image, np.eye(4))
    write_volume(tmp_path / "lab.nii.gz", label, np.eye(4))
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}

    def positions(jitter: int) -> np.ndarray:
        pipeline = train_transforms((16, 16, 16), pos=1.0, neg=0.0, flip_prob=0.0, shift=0.0, scale=0.0,
                                    crop_foreground=False, centre_jitter=jitter, seed=0)
        found = []
        for _ in range(30):
            sample = pipeline(case)
            sample = sample[0] if isinstance(sample, list) else sample
            assert tuple(sample["image"].shape[1:]) == (16, 16, 16)
            found.append(np.argwhere(np.asarray(sample["label"])[0] > 0).mean(0))
        return np.asarray(found)

    centred, jittered = positions(0), positions(6)
    assert np.abs(centred - 7.5).max() <= 1.0  # the chosen voxel is one of the 2x2x2 block at the centre
    assert np.abs(jittered - 7.5).max() >= 4.0 and np.abs(jittered - 7.5).max() <= 7.0


def test_figures_slice_through_the_middle_of_one_hippocampus_not_the_midline_or_its_edge():
    """Both hippocampi's centroid lies on the midline; the overlay figures' sagittal plane must cut one of them."""
    from TensorPEFTLib.engine.report import centre_of

    mask = np.zeros((60, 40, 30), np.uint8)
    mask[10:20, 15:25, 10:20] = 1  # one side: centre x = 14.5
    mask[40:52, 15:25, 10:20] = 1  # the other, a little larger: centre x = 45.5
    x, y, z = centre_of(mask, mask.shape)
    assert mask[x, y, z] == 1
    assert x in (14, 15, 45, 46) and 15 <= y < 25 and 10 <= z < 20
    assert centre_of(np.zeros((4, 6, 8)), (4, 6, 8)) == (2, 3, 4)


def test_training_patches_come_from_cached_voxel_lists_and_are_the_patches_a_volume_search_gives(tmp_path):
    """The label's foreground/background voxel lists are computed in the deterministic (cached) part of the training
    pipeline, and the random crops drawn from them are exactly those drawn by searching the volume at every draw."""
    from monai.transforms import FgBgToIndicesd, Randomizable
    from monai.transforms import Compose

    from TensorPEFTLib.data import train_transforms

    rng = np.random.default_rng(0)
    image = rng.random((40, 44, 36)).astype(np.float32)
    image[:4] = 0.0  # background that is not brain: excluded from the negative centres by the image threshold
    label = np.zeros((40, 44, 36), np.uint8)
    label[10:16, 20:30, 12:18] = 1
    write_volume(tmp_path / "img.nii.gz", image, np.eye(4))
    write_volume(tmp_path / "lab.nii.gz", label, np.eye(4))
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}

    cached = train_transforms((16, 16, 16), crop_foreground=False, centre_jitter=4, seed=0)
    steps = list(cached.transforms)
    first_random = next(i for i, t in enumerate(steps) if isinstance(t, Randomizable))
    assert any(isinstance(t, FgBgToIndicesd) for t in steps[:first_random])  # cached with the volume
    twin = train_transforms((16, 16, 16), crop_foreground=False, centre_jitter=4)  # own random state
    searched = Compose([t for t in twin.transforms if not isinstance(t, FgBgToIndicesd)])
    searched.set_random_state(seed=0)
    for _ in range(12):
        a, b = cached(case), searched(case)
        a, b = (a[0] if isinstance(a, list) else a), (b[0] if isinstance(b, list) else b)
        assert np.array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_several_structures_are_patch_centres_equally_often_whatever_their_size(tmp_path):
    """With more than one structure (``crop_classes`` K > 2) a patch's label centre is drawn class first, as nnU-Net
    does: a structure of 8 voxels is centred as often as one of 512, where drawing from all label voxels at once
    centres it in ~1 % of patches. A structure absent from the case is never drawn there (no error); the voxel lists
    are made in the cached part of the pipeline."""
    from monai.transforms import ClassesToIndicesd, Randomizable

    from TensorPEFTLib.data import train_transforms

    image = np.random.default_rng(0).uniform(0.5, 1.0, (48, 48, 48)).astype(np.float32)  # a head everywhere
    label = np.zeros((48, 48, 48), np.uint8)
    label[4:12, 4:12, 4:12] = 1  # 512 voxels
    label[30:32, 30:32, 30:32] = 2  # 8 voxels; class 3 is absent from this case
    write_volume(tmp_path / "img.nii.gz", image, np.eye(4))
    write_volume(tmp_path / "lab.nii.gz", label, np.eye(4))
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}

    def centre_classes(crop_classes) -> np.ndarray:
        pipeline = train_transforms((16, 16, 16), pos=1.0, neg=0.0, flip_prob=0.0, shift=0.0, scale=0.0,
                                    crop_foreground=False, centre_jitter=0, seed=0, crop_classes=crop_classes)
        if crop_classes:
            steps = list(pipeline.transforms)
            first_random = next(i for i, t in enumerate(steps) if isinstance(t, Randomizable))
            assert any(isinstance(t, ClassesToIndicesd) for t in steps[:first_random])
        found = []
        for _ in range(80):
            sample = pipeline(case)
            sample = sample[0] if isinstance(sample, list) else sample
            assert tuple(sample["image"].shape[1:]) == (16, 16, 16)
            found.append(int(np.asarray(sample["label"])[0][8, 8, 8]))
        return np.bincount(found, minlength=4)

    by_voxel, by_class = centre_classes(None), centre_classes(4)
    assert by_voxel[0] == 0 and by_class[0] == 0 and by_class[3] == 0  # pos only; class 3 is not in the case
    assert by_voxel[2] <= 4  # 8 of 520 label voxels: ~1 in 65 patches
    assert 25 <= by_class[2] <= 55 and 25 <= by_class[1] <= 55  # half each
