"""The shipped latent diffusion model (issue 15, items 1 and 6): its recipe, its size, a tiny pretraining run that
resumes to the same weights, and the realism checks on volumes whose answer is known."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from TensorPEFTLib.engine import pretrain as pretrain_module
from TensorPEFTLib.engine.events import Events
from TensorPEFTLib.engine.pretrain import RECIPES, pretrain
from TensorPEFTLib.engine.synthesis_metrics import (brain_mask, dice, high_frequency_ratio, mean_pairwise_difference,
                                                    realism_checks)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SHAPE = (32, 40, 32)


def _brain_like(seed: int, shape=SHAPE) -> np.ndarray:
    """A smooth ellipsoid 'brain' in [0, 1] with darker 'ventricles' and a soft texture, slightly moved per seed."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.04, 0.04, 3)[:, None, None, None]
    radii = (np.array([0.8, 0.85, 0.75]) * rng.uniform(0.95, 1.05, 3))[:, None, None, None]
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(0))
    volume = np.clip(1.2 - r, 0, 1) ** 0.3 * (r < 1)
    volume = volume * (1 - 0.5 * (np.sqrt(((grid / np.array([0.15, 0.3, 0.15])[:, None, None, None]) ** 2).sum(0)) < 1))
    volume = volume + 0.1 * gaussian_filter(rng.standard_normal(shape), 2) * (r < 1)
    return np.clip(gaussian_filter(volume, 0.7), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def real():
    return [_brain_like(i) for i in range(4)]


def test_noise_is_not_realistic(real):
    rng = np.random.default_rng(0)
    noise = [rng.random(SHAPE).astype(np.float32) for _ in range(3)]
    checks = realism_checks(noise, real)
    assert not checks["pass"]["not_noise"] and not checks["pass"]["all"]
    assert min(checks["hf_vs_real"]) > 10  # white noise: ~2 against a smooth anatomy's few hundredths
    assert high_frequency_ratio(noise[0]) == pytest.approx(2.0, rel=0.05)


def test_smooth_brain_like_blobs_pass_every_check(real):
    generated = [_brain_like(10 + i) for i in range(3)]
    checks = realism_checks(generated, real)
    assert checks["pass"] == {"not_noise": True, "brain_shaped": True, "diverse": True, "all": True}, checks["summary"]
    assert min(checks["mask_dice"]) >= 0.9


def test_a_repeated_volume_is_not_diverse_and_a_small_blob_is_not_brain_shaped(real):
    same = [_brain_like(10)] * 3
    checks = realism_checks(same, real)
    assert checks["diversity_vs_real"] == 0 and not checks["pass"]["diverse"] and checks["pass"]["brain_shaped"]
    small = [np.asarray(_brain_like(11 + i)[::2, ::2, ::2], np.float32) for i in range(2)]
    padded = [np.pad(s, [(0, a - b) for a, b in zip(SHAPE, s.shape)]) for s in small]
    checks = realism_checks(padded, real)
    assert not checks["pass"]["brain_shaped"] and max(checks["mask_dice"]) < 0.5


def test_mask_dice_and_pairwise_difference_on_known_inputs():
    a = np.zeros((10, 10, 10), np.float32)
    a[2:8, 2:8, 2:8] = 0.8
    a[4:6, 4:6, 4:6] = 0.05  # a dark hole inside: filled, as ventricles are
    assert brain_mask(a).sum() == 216 and dice(brain_mask(a), a > 0.1) == pytest.approx(2 * 208 / (216 + 208))
    assert mean_pairwise_difference([a, a, a]) == 0.0
    assert mean_pairwise_difference([a, a + 0.1]) == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        realism_checks([a[:5]], [a])


def test_the_shipped_synthesis_recipe_builds_a_latent_model_under_18_mb_in_fp16():
    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.latent import latent_parts
    from TensorPEFTLib.models.presets import PRESETS

    recipe = RECIPES["demo-ldm"]
    assert recipe.latent is not None and recipe.task_folder == "synthesis"
    model = build_model(recipe.preset, **recipe.overrides)
    parts = latent_parts(model)
    assert parts is not None and parts.downsample == 4 and parts.image_shape() == PRESETS[recipe.preset].patch_size
    assert all(s >= 64 for s in parts.image_shape())  # issue 15: at least 64 voxels along every axis
    tensors = list(model.state_dict().values()) + list(parts.autoencoder.state_dict().values())
    assert sum(t.numel() * 2 for t in tensors) <= 18e6


def test_a_latent_model_file_carries_its_autoencoder_and_refuses_one_without(tmp_path):
    from safetensors.torch import load_file, save_file

    from TensorPEFTLib.models import build_model, load_model
    from TensorPEFTLib.models.checkpoints import AUTOENCODER_PREFIX, CheckpointError, load_checkpoint, save_model
    from TensorPEFTLib.models.latent import latent_parts

    torch.manual_seed(0)
    model = build_model("ddpm-latent-small", scale_factor=0.5)
    path = save_model(model, tmp_path / "ldm.safetensors")
    again = load_model(path)
    assert latent_parts(again).scale_factor == 0.5
    for k, v in latent_parts(model).autoencoder.state_dict().items():
        assert torch.equal(v, latent_parts(again).autoencoder.state_dict()[k])
    unet_only = {k: v for k, v in load_file(path).items() if not k.startswith(AUTOENCODER_PREFIX)}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="without its autoencoder"):
        load_checkpoint(build_model("ddpm-latent-small"), tmp_path / "unet.safetensors")


def test_latent_channels_override_matches_both_sides_and_the_preset_keeps_its_own(tmp_path):
    """demo-ldm is ddpm-latent-small with 8 latent channels: the override sets the autoencoder's latents and the
    U-Net's input and output together, travels in the file's spec, and a file saved on the plain preset (3
    channels, as the first shipped demo-ldm was) still loads."""
    from TensorPEFTLib.models import build_model, load_model
    from TensorPEFTLib.models.checkpoints import save_model
    from TensorPEFTLib.models.latent import latent_parts
    from TensorPEFTLib.models.presets import PresetError

    def channels(model):
        parts = latent_parts(model)
        return (parts.latent_channels, parts.autoencoder.quant_conv_mu.conv.out_channels,
                model.conv_in.conv.in_channels, model.out[-1].conv.out_channels)

    assert RECIPES["demo-ldm"].overrides["latent_channels"] == 8
    torch.manual_seed(0)
    wide = build_model("ddpm-latent-small", latent_channels=8, scale_factor=0.5)
    assert channels(wide) == (8, 8, 8, 8)
    again = load_model(save_model(wide, tmp_path / "wide.safetensors"))
    assert channels(again) == (8, 8, 8, 8)
    assert torch.equal(again.conv_in.conv.weight, wide.conv_in.conv.weight)
    plain = load_model(save_model(build_model("ddpm-latent-small", scale_factor=0.5), tmp_path / "plain.safetensors"))
    assert channels(plain) == (3, 3, 3, 3)
    with torch.no_grad():  # the 8-channel latents go through the U-Net and back through the decoder
        z = torch.randn(1, 8, 16, 20, 16)
        assert wide(z, timesteps=torch.tensor([10])).shape == z.shape
        assert latent_parts(wide).decode(z).shape == (1, 1, 64, 80, 64)
    with pytest.raises(PresetError, match="latent_channels"):
        build_model("ddpm-latent-small", latent_channels=0)


@pytest.fixture(scope="module")
def synthesis_cohort(tmp_path_factory):
    from TensorPEFTLib.data import build_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    build_demo_cohort(out, seed=0, n_train=1, n_test=0, n_unseen=0, n_whole_head=0, n_source=0, n_synthesis=2, n_synthesis_target=0,
                      n_synthesis_ventricles=0,
                      seg_spacings=((6.0, 6.0, 6.0),))
    return str(out)


class _StopAt(Events):
    """Stops the run (as Ctrl-C would) right after the diffusion checkpoint at ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(quiet=True)
        self.step = step

    def emit(self, event: str, **fields) -> None:
        if event == "checkpoint" and fields.get("stage") == "diffusion" and fields.get("step") == self.step:
            raise KeyboardInterrupt


def test_a_tiny_latent_pretraining_runs_and_resumes_to_the_same_weights(tmp_path, synthesis_cohort, monkeypatch):
    tiny = dataclasses.replace(RECIPES["demo-ldm"], batch_size=2, eval_every=2,
                               latent={**RECIPES["demo-ldm"].latent, "realism_samples": 2, "realism_steps": 2})
    monkeypatch.setitem(RECIPES, "demo-ldm", tiny)
    common = dict(cohort=synthesis_cohort, steps=4, ae_steps=2, threads=1)
    whole = pretrain("demo-ldm", str(tmp_path / "whole"), events=Events(quiet=True), **common)
    with pytest.raises(KeyboardInterrupt):
        pretrain("demo-ldm", str(tmp_path / "cut"), events=_StopAt(2), **common)
    saved = torch.load(tmp_path / "cut" / "run" / "diffusion.pt", weights_only=True)
    assert saved["step"] == 2
    resumed = pretrain("demo-ldm", str(tmp_path / "cut"), events=Events(quiet=True), resume=True, **common)
    assert resumed["sha256"] == whole["sha256"]  # an interrupted, resumed run ends with the uninterrupted weights
    card = json.loads((tmp_path / "whole" / "demo-ldm.json").read_text())
    assert card["recipe"]["steps"] == 4 and card["recipe"]["latent"]["ae_steps"] == 2 and card["dtype"] == "float16"
    assert card["synthesis_grid"]["spacing"] == [2.5, 2.5, 2.5]
    assert set(card["final_metrics"]["realism_ema"]["pass"]) == {"not_noise", "brain_shaped", "diverse", "all"}
    from TensorPEFTLib.models import load_model

    model = load_model(str(tmp_path / "whole" / "demo-ldm.safetensors"))
    assert model.tensorpeft_spec["synthesis_grid"] == card["synthesis_grid"]
    assert model.tensorpeft_latent.scale_factor == pytest.approx(card["final_metrics"]["scale_factor"], rel=1e-4)


def test_synthesize_writes_volumes_on_the_grid_the_model_records(tmp_path):
    """The Slicer panel and the app load what synthesize writes: voxel size and position must be the training
    data's (2.5 mm, centred where the training brains lay), not 1 mm around the origin."""
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.engine.jobs import synthesize
    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.checkpoints import save_model

    torch.manual_seed(0)
    model = build_model("ddpm-latent-small", scale_factor=1.0)
    model.tensorpeft_spec["synthesis_grid"] = {"spacing": [2.5, 2.5, 2.5], "centre": [0.0, -17.0, 8.0]}
    path = save_model(model, tmp_path / "ldm.safetensors")
    written = synthesize(str(tmp_path / "out"), 1, model_source=path, steps=1, device="cpu", threads=1,
                         events=Events(quiet=True))
    volume = read_volume(written[0])
    assert volume.array.shape[:3] == (64, 80, 64)
    np.testing.assert_allclose(np.diag(volume.affine)[:3], [2.5, 2.5, 2.5])
    centre = volume.affine[:3, :3] @ ((np.array([64, 80, 64]) - 1) / 2) + volume.affine[:3, 3]
    np.testing.assert_allclose(centre, [0.0, -17.0, 8.0], atol=1e-4)
    record = json.loads((tmp_path / "out" / "synthesis.json").read_text())  # what evaluate reads
    assert record["shape"] == [64, 80, 64] and record["centre"] == [0.0, -17.0, 8.0] and record["reference"] is None


def test_v_prediction_target_and_min_snr_weights():
    """The shipped schedule predicts v; fine-tuning (SynthesisTask) and pretraining learn the same target."""
    from TensorPEFTLib.engine.latent_pretrain import diffusion_target, min_snr_weights
    from TensorPEFTLib.engine.synthesis import make_scheduler
    from TensorPEFTLib.models.presets import LATENT_SCHEDULE

    scheduler = make_scheduler("ddpm", LATENT_SCHEDULE)
    assert scheduler.prediction_type == "v_prediction"
    clean, noise = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    t = torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(scheduler, clean, noise, t), a.sqrt() * noise - (1 - a).sqrt() * clean)
    snr = (a / (1 - a)).flatten()
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0, "v_prediction"),
                               torch.clamp(snr, max=5.0) / (snr + 1))
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, t, None), torch.ones(2))
    assert torch.equal(diffusion_target(make_scheduler("ddpm"), clean, noise, t), noise)  # the pixel DDPMs: noise


def test_synthesis_fine_tuning_resamples_volumes_off_the_models_grid(tmp_path):
    """A user's 1 mm scans were centre-cropped to the model's size in *voxels* (a block of the brain's middle); now
    volumes whose voxels differ from the base model's recorded synthesis grid are resampled to it, and volumes
    already on it (the demo's, the pre-training set's) go through as pre-training fed them."""
    import types

    from TensorPEFTLib.data import synthesis_transforms, write_volume
    from TensorPEFTLib.engine.jobs import synthesis_training_spacing

    # a 40 mm cube of tissue in an 80 mm field of view of 4 mm voxels
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = 1.0 + 0.1 * np.random.default_rng(0).random((10, 10, 10), dtype=np.float32)
    case = {"image": str(tmp_path / "fine.nii.gz")}
    write_volume(case["image"], volume, like=np.diag([4.0, 4.0, 4.0, 1.0]))
    on_grid = str(tmp_path / "on_grid.nii.gz")
    write_volume(on_grid, np.ones((10, 10, 10), np.float32), like=np.diag([8.0, 8.0, 8.0, 1.0]))
    model = types.SimpleNamespace(tensorpeft_spec={"synthesis_grid": {"spacing": [8.0, 8.0, 8.0], "centre": [0, 0, 0]}})
    assert synthesis_training_spacing(model, [case]) == (8.0, 8.0, 8.0)
    assert synthesis_training_spacing(model, [{"image": on_grid}]) is None
    assert synthesis_training_spacing(types.SimpleNamespace(tensorpeft_spec={}), [case]) is None
    # resampled to 8 mm, the 10-voxel volume holds the whole field of view (the cube and the background around it);
    # cropped in voxels, it held the cube's middle only
    resampled = np.asarray(synthesis_transforms((10, 10, 10), pixdim=(8.0, 8.0, 8.0))(dict(case))["image"])[0]
    cropped = np.asarray(synthesis_transforms((10, 10, 10))(dict(case))["image"])[0]
    assert resampled.shape == cropped.shape == (10, 10, 10)
    assert (resampled < 0.05).mean() > 0.5 and (cropped < 0.05).mean() < 0.1
