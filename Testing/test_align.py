"""Registration of a user's scans to a generative model's reference brain (data.align) and its use in synthesis
fine-tuning (engine.jobs.synthesis_alignment)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from TensorPEFTLib.data import write_volume
from TensorPEFTLib.data.align import (MIN_CORRELATION, AlignTarget, align_to_reference, aligned_volume,
                                      reference_brain, resample_through)
from TensorPEFTLib.data.demo import source_path

CENTRE = (0.0, -17.0, 8.0)


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    rx, ry, rz = np.deg2rad(degrees)
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def _posed_scan(pose: np.ndarray, spacing: float = 3.0, lps: bool = True, scale: float = 300.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 brain as a scanner would store a head posed by ``pose`` (scan world → template world): an LPS grid
    of ``spacing`` mm covering the head, in raw units. Returns (array, affine)."""
    import nibabel as nib

    img = nib.load(str(source_path("mni152")))
    template, template_affine = np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
    shape = (64, 76, 64)
    affine = np.diag([-spacing if lps else spacing] * 2 + [spacing, 1.0])
    centre = np.array([5.0, -10.0, 12.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return resample_through(template, template_affine, pose, shape, affine) * scale, affine


def _pose(degrees=(12.0, -6.0, 8.0), shift=(7.0, -9.0, 5.0), scale=1.08) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation(degrees) * scale
    pose[:3, 3] = shift
    return pose


def test_alignment_recovers_a_known_pose():
    """A brain tilted by up to 12°, shifted by 12 mm and 8 % larger, stored LPS in raw scanner units, is mapped back
    onto the reference within a millimetre or two, and correlates with it far above the acceptance bar."""
    pose = _pose()
    scan, affine = _posed_scan(pose)
    reference, grid = reference_brain("mni152", (32, 40, 32), 5.0, CENTRE)
    fit = align_to_reference(scan, affine, reference, grid, levels=(2, 1), iterations=(150, 80))
    # the scan shows template point pose(q) at scan point q: the registration's reference→scan map is pose⁻¹
    truth = np.linalg.inv(pose)
    brain = np.argwhere(reference > 0.2)
    points = np.c_[brain, np.ones(len(brain))] @ grid.T
    error = np.linalg.norm((points @ fit.matrix.T - points @ truth.T)[:, :3], axis=1)
    assert error.mean() < 1.5 and error.max() < 3.0, (error.mean(), error.max())
    assert fit.correlation > 0.95 > MIN_CORRELATION
    unaligned = resample_through(scan, affine, np.eye(4), reference.shape, grid)
    assert np.corrcoef(unaligned.ravel(), reference.ravel())[0, 1] < 0.8  # the pose was a real misalignment


def test_what_is_not_a_brain_stays_below_the_acceptance_bar():
    reference, grid = reference_brain("mni152", (32, 40, 32), 5.0, CENTRE)
    noise = np.random.default_rng(0).random((40, 48, 40)).astype(np.float32)
    fit = align_to_reference(noise, np.diag([4.0, 4.0, 4.0, 1.0]), reference, grid, levels=(2, 1),
                             iterations=(60, 30))
    assert fit.correlation < MIN_CORRELATION


def test_alignment_target_knows_volumes_already_on_its_grid(tmp_path):
    target = AlignTarget("mni152", (8, 10, 8), (2.5, 2.5, 2.5), CENTRE)
    assert target.holds(target.affine, (8, 10, 8))
    assert not target.holds(target.affine, (8, 10, 9))
    shifted = target.affine.copy()
    shifted[:3, 3] += 1.0  # 1 mm off: a scan on another lattice
    assert not target.holds(shifted, (8, 10, 8))
    assert "MNI152" in target.describe() and "8x10x8" in target.describe()


def test_synthesis_alignment_applies_where_the_model_names_its_reference(tmp_path):
    from TensorPEFTLib.engine.jobs import synthesis_alignment
    from TensorPEFTLib.engine.runtime import EngineError

    size = (8, 10, 8)
    grid = {"spacing": [2.5, 2.5, 2.5], "centre": list(CENTRE), "reference": "mni152"}
    model = types.SimpleNamespace(tensorpeft_spec={"synthesis_grid": grid})
    on_grid, off_grid = str(tmp_path / "on.nii.gz"), str(tmp_path / "off.nii.gz")
    write_volume(on_grid, np.ones(size, np.float32), like=AlignTarget("mni152", size, (2.5,) * 3, CENTRE).affine)
    write_volume(off_grid, np.ones((12, 12, 12), np.float32), like=np.diag([-1.0, -1.0, 1.0, 1.0]))
    target = synthesis_alignment(model, [{"image": on_grid}, {"image": off_grid}], size)
    assert target == AlignTarget("mni152", size, (2.5, 2.5, 2.5), CENTRE)
    assert synthesis_alignment(model, [{"image": on_grid}], size) is None  # the demo's volumes: as they are
    assert synthesis_alignment(model, [{"image": off_grid}], size, "off") is None
    no_reference = types.SimpleNamespace(tensorpeft_spec={"synthesis_grid": {**grid, "reference": None}})
    assert synthesis_alignment(no_reference, [{"image": off_grid}], size) is None
    with pytest.raises(EngineError, match="--align 'sometimes'"):
        synthesis_alignment(model, [{"image": off_grid}], size, "sometimes")


def test_demo_ldm_names_mni152_as_its_reference():
    from TensorPEFTLib.models.checkpoints import load_model

    assert load_model("demo-ldm").tensorpeft_spec["synthesis_grid"]["reference"] == "mni152"


@pytest.fixture()
def tiny_latent_model(tmp_path):
    import torch

    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.checkpoints import save_model

    torch.manual_seed(0)
    model = build_model("ddpm-latent-small", scale_factor=1.0)
    model.tensorpeft_spec["synthesis_grid"] = {"spacing": [2.5, 2.5, 2.5], "centre": list(CENTRE),
                                               "reference": "mni152"}
    return save_model(model, tmp_path / "ldm.safetensors")


def test_fine_tuning_registers_posed_scans_and_writes_samples_in_reference_space(tmp_path, tiny_latent_model):
    from TensorPEFTLib.adapters import AdapterConfig
    from TensorPEFTLib.engine import TrainSettings, finetune
    from TensorPEFTLib.engine.events import Events

    images = tmp_path / "data" / "imagesTr"
    for i, pose in enumerate([_pose(), _pose((-8.0, 5.0, -10.0), (-6.0, 4.0, -8.0), 0.94)]):
        scan, affine = _posed_scan(pose, lps=bool(i % 2 == 0))
        write_volume(str(images / f"scan_{i}.nii.gz"), scan, like=affine)
    messages = []
    events = Events(quiet=True)
    events.message = messages.append  # type: ignore[method-assign]
    finetune(tiny_latent_model, str(tmp_path / "data"), str(tmp_path / "run"), AdapterConfig(method="lora", rank=2),
             TrainSettings(steps=1, seed=0), device="cpu", threads=1, events=events, auto_val=False)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["aligned_to"] == "mni152"
    assert config["spacing"] == [2.5, 2.5, 2.5] and config["centre"] == list(CENTRE)
    registered = [m for m in messages if m.startswith("registered 2 volume(s)")]
    assert len(registered) == 1 and float(registered[0].split()[-4]) > 0.9, registered  # the lowest correlation


def test_a_scan_that_does_not_align_is_refused_by_name(tmp_path, tiny_latent_model, capsys):
    from TensorPEFTLib.cli import main

    images = tmp_path / "data" / "imagesTr"
    scan, affine = _posed_scan(_pose())
    write_volume(str(images / "brain.nii.gz"), scan, like=affine)
    noise = np.random.default_rng(0).random(scan.shape).astype(np.float32)
    write_volume(str(images / "not_a_brain.nii.gz"), noise, like=affine)
    code = main(["finetune", "--model", str(tiny_latent_model), "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "run"), "--method", "lora", "--rank", "2", "--steps", "1", "--no-val", "--threads", "1",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "not_a_brain.nii.gz" in err[0] and "skull-stripped" in err[0] and "--align off" in err[0]
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_aligned_volumes_are_registered_once_per_file(tmp_path, monkeypatch):
    from TensorPEFTLib.data import align

    scan, affine = _posed_scan(_pose(), spacing=5.0)
    path = str(tmp_path / "scan.nii.gz")
    write_volume(path, scan, like=affine)
    calls = []
    real = align.align_to_reference
    monkeypatch.setattr(align, "align_to_reference", lambda *a, **k: calls.append(1) or real(
        *a, levels=(2, 1), iterations=(40, 20)))
    target = AlignTarget("mni152", (32, 40, 32), (5.0, 5.0, 5.0), CENTRE)
    first, fit = aligned_volume(path, target)
    second, _ = aligned_volume(path, target)
    assert first is second and len(calls) == 1 and first.shape == (32, 40, 32)


def test_evaluate_brings_a_users_scan_onto_the_generated_grid(tmp_path):
    """evaluate --kind synthesis compared generated 2.5 mm brains with a centre crop, in voxels, of each real scan (a
    64 mm block of a 1 mm scan's middle); now a real scan is registered to the reference brain the generated volumes
    are in (synthesize's synthesis.json), or resampled onto their grid in world space."""
    from TensorPEFTLib.data.demo import write_json
    from TensorPEFTLib.engine.jobs import SYNTHESIS_RECORD, real_like_generated, synthesis_reference

    reference, grid = reference_brain("mni152", (32, 40, 32), 5.0, CENTRE)
    generated = tmp_path / "samples"
    write_volume(str(generated / "synth_001.nii.gz"), reference, like=grid)
    assert synthesis_reference(str(generated)) is None
    write_json(str(generated / SYNTHESIS_RECORD), {"reference": "mni152", "shape": [32, 40, 32]})
    assert synthesis_reference(str(generated / "synth_001.nii.gz")) == "mni152"
    scan, affine = _posed_scan(_pose(), spacing=2.0)
    path = str(tmp_path / "scan.nii.gz")
    write_volume(path, scan, like=affine)

    def correlation(volume):
        return float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1])

    registered = real_like_generated(path, reference.shape, grid, "mni152")
    resampled = real_like_generated(path, reference.shape, grid, "mni152", align="off")
    assert registered.shape == resampled.shape == reference.shape
    assert 0.0 <= registered.min() and registered.max() <= 1.0
    assert correlation(registered) > 0.95 and correlation(resampled) < 0.8
    # on the generated grid already: taken as it is
    np.testing.assert_allclose(real_like_generated(str(generated / "synth_001.nii.gz"), reference.shape, grid,
                                                   "mni152"), np.clip(reference / np.percentile(reference, 99.5), 0, 1),
                               atol=1e-5)
