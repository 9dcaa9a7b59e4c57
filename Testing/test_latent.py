"""Latent diffusion models (MONAI AutoencoderKL + DiffusionModelUNet) as a model family: bundle loading in today's and
MONAI GenerativeModels' names, sampling as LatentDiffusionInferer samples, every DDPM method adapting the U-Net with
the autoencoder frozen, the CLI end to end, and the bad inputs (one line, exit code 2).

Tiny random models in the model zoo's bundle layouts (``latent_bundles.py``): latents 3×8³ ↔ images 16³.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from TensorPEFTLib.cli import main
from TensorPEFTLib.models.checkpoints import CheckpointError
from TensorPEFTLib.models.latent import is_latent_bundle, latent_parts, load_latent_model

import synthetic
from latent_bundles import build_networks, to_generative_names, write_latent_bundle

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

DDPM_METHODS = ["tenvoo-l", "tenvoo-q", "quanta", "lora", "loha", "lokr", "selora", "full"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {layout: write_latent_bundle(str(root / layout), layout) for layout in ("monai", "generative")}


@pytest.mark.parametrize("layout", ["monai", "generative"])
def test_bundle_loads_both_key_layouts_exactly(bundles, layout):
    ae_ref, unet_ref = build_networks(0)
    if layout == "generative":  # the old names really differ: the conversion is exercised, not skipped
        old = set(to_generative_names(unet_ref.state_dict())) | set(to_generative_names(ae_ref.state_dict()))
        assert old - set(unet_ref.state_dict()) - set(ae_ref.state_dict())
    assert is_latent_bundle(bundles[layout])
    unet = load_latent_model(bundles[layout])
    parts = latent_parts(unet)
    for ours, ref in ((unet, unet_ref), (parts.autoencoder, ae_ref)):
        theirs = ref.state_dict()
        assert set(ours.state_dict()) == set(theirs)
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    assert (parts.downsample, parts.latent_channels, parts.latent_shape) == (2, 3, (8, 8, 8))
    assert parts.schedule == {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                              "beta_end": 0.0195}
    assert not any(p.requires_grad for p in parts.autoencoder.parameters())
    # the autoencoder is no sub-module of the U-Net: adapters, optimiser and adapter files see the U-Net alone
    assert not any(k.startswith("autoencoder") for k in unet.state_dict())


def test_sampling_is_monai_latent_diffusion_inferer(bundles):
    """Our DDIM loop + decode gives LatentDiffusionInferer.sample's volume for the same noise and scale factor."""
    from monai.inferers import LatentDiffusionInferer

    from TensorPEFTLib.engine.runtime import select_runtime
    from TensorPEFTLib.engine.synthesis import make_scheduler, sample_volumes

    unet = load_latent_model(bundles["monai"])
    parts = latent_parts(unet)
    parts.scale_factor = 0.7
    runtime = select_runtime("cpu", "off", 1)
    ours = sample_volumes(unet, 1, (16, 16, 16), runtime, steps=4, sampler="ddim", seed=5, schedule=parts.schedule)[0]
    scheduler = make_scheduler("ddim", parts.schedule)
    scheduler.set_timesteps(num_inference_steps=4)
    noise = torch.randn((1, 3, 8, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = LatentDiffusionInferer(scheduler, scale_factor=0.7).sample(
            input_noise=noise, autoencoder_model=parts.autoencoder, diffusion_model=unet, scheduler=scheduler,
            verbose=False)
    assert ours.shape == (16, 16, 16)
    np.testing.assert_allclose(ours, theirs[0, 0].clamp(0, 1).numpy(), atol=1e-5)
    assert ours.std() > 0  # not a constant volume


def test_sampling_without_a_schedule_uses_the_latent_models_own(bundles):
    """A caller of sample_volumes who passes no schedule gets the one the latent model was trained with (the shipped
    demo-ldm predicts v: the default noise-prediction schedule turned its samples into noise)."""
    from TensorPEFTLib.engine.runtime import select_runtime
    from TensorPEFTLib.engine.synthesis import SCHEDULE, sample_volumes

    unet = load_latent_model(bundles["monai"])
    parts = latent_parts(unet)
    runtime = select_runtime("cpu", "off", 1)
    kwargs = dict(steps=3, sampler="ddim", seed=2)
    implicit = sample_volumes(unet, 1, (16, 16, 16), runtime, **kwargs)[0]
    own = sample_volumes(unet, 1, (16, 16, 16), runtime, schedule=parts.schedule, **kwargs)[0]
    default = sample_volumes(unet, 1, (16, 16, 16), runtime, schedule=SCHEDULE, **kwargs)[0]
    assert parts.schedule != SCHEDULE
    np.testing.assert_array_equal(implicit, own)
    assert np.abs(implicit - default).max() > 1e-4


@pytest.mark.parametrize("method", DDPM_METHODS)
def test_every_ddpm_method_adapts_the_unet_and_leaves_the_autoencoder(bundles, method):
    from TensorPEFTLib import AdapterConfig, inject, merge, unmerge

    unet = load_latent_model(bundles["generative"])
    parts = latent_parts(unet)
    parts.scale_factor = 1.0
    ae_before = {k: v.clone() for k, v in parts.autoencoder.state_dict().items()}
    report = inject(unet, AdapterConfig(method=method, rank=2))
    assert report["layers_wrapped"] > 0 or method == "full"
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for p in parts.autoencoder.parameters())
    images = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = parts.encode(images, torch.Generator().manual_seed(1))
    assert latents.shape == (1, 3, 8, 8, 8)
    t = torch.tensor([300])
    before = unet(latents, timesteps=t).detach()
    optimiser = torch.optim.Adam(trainable, lr=1e-2)
    loss = torch.nn.functional.mse_loss(unet(latents, timesteps=t), torch.randn_like(latents))
    loss.backward()
    optimiser.step()
    unet.eval()
    with torch.no_grad():
        after = unet(latents, timesteps=t)
        assert not torch.allclose(after, before)  # the step moved the U-Net's output
        if method != "full":
            merge(unet)
            np.testing.assert_allclose(unet(latents, timesteps=t).numpy(), after.numpy(), atol=1e-4)
            unmerge(unet)
    assert all(torch.equal(v, ae_before[k]) for k, v in parts.autoencoder.state_dict().items())


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_finetune_then_synthesize_a_latent_bundle(bundles, tmp_path, capsys):
    from TensorPEFTLib.adapters.catalog import default_lr
    from TensorPEFTLib.data import read_volume

    data = synthetic.write_volume_dataset(str(tmp_path / "data"), n=4)
    run_dir = tmp_path / "run"
    code, _, err = run(["finetune", "--model", bundles["generative"], "--data", data, "--out", run_dir, "--method",
                        "tenvoo-l", "--rank", "2", "--steps", "2", "--device", "cpu", "--threads", "1", "-q"], capsys)
    assert code == 0, err
    saved = json.loads((run_dir / "adapter_config.json").read_text())
    assert saved["train_lr"] == default_lr("tenvoo-l", "ddpm")  # the method's DDPM default, recorded
    assert saved["latent"]["scale_factor"] > 0 and saved["latent"]["latent_channels"] == 3
    assert saved["patch_size"] == [16, 16, 16] and saved["schedule"]["beta_start"] == 0.0015
    out = tmp_path / "samples"
    code, _, err = run(["synthesize", "--adapter", run_dir, "--out", out, "--count", "2", "--steps", "3",
                        "--device", "cpu", "--threads", "1", "-q"], capsys)
    assert code == 0, err
    volumes = [read_volume(str(out / f"synth_00{i}.nii.gz")).array for i in (1, 2)]
    assert all(v.shape[:3] == (16, 16, 16) for v in volumes) and not np.allclose(volumes[0], volumes[1])
    assert (out / "samples.png").is_file()
    # the base bundle alone, today's layout, another size the model takes
    code, _, err = run(["synthesize", "--model", bundles["monai"], "--out", tmp_path / "base", "--count", "1",
                        "--steps", "2", "--size", "24", "--device", "cpu", "--threads", "1", "-q"], capsys)
    assert code == 0, err
    assert read_volume(str(tmp_path / "base" / "synth_001.nii.gz")).array.shape[:3] == (24, 24, 24)


def test_bad_inputs_are_one_line_and_exit_2(bundles, tmp_path, capsys):
    syn = ["--out", tmp_path / "o", "--steps", "1", "--device", "cpu", "--threads", "1", "-q"]
    # a latent bundle without its autoencoder
    lone = write_latent_bundle(str(tmp_path / "no_ae"), "monai", autoencoder=False)
    code, _, err = run(["synthesize", "--model", lone, "--count", "1", *syn], capsys)
    assert code == 2
    one_line(err, os.path.join("models", "autoencoder.pt"), "--autoencoder")
    # the latent U-Net's weights file alone
    code, _, err = run(["synthesize", "--model", os.path.join(lone, "models", "model.pt"), "--count", "1", *syn], capsys)
    assert code == 2
    one_line(err, "model.pt", "latent diffusion", "autoencoder")
    # an autoencoder whose latent channels differ from the U-Net's input channels: in the bundle, or given
    wrong = write_latent_bundle(str(tmp_path / "wrong"), "monai", latent_channels=4)
    code, _, err = run(["synthesize", "--model", wrong, "--count", "1", *syn], capsys)
    assert code == 2
    one_line(err, "autoencoder.pt", "4 latent channels", "takes 3")
    code, _, err = run(["synthesize", "--model", bundles["monai"], "--autoencoder",
                        os.path.join(wrong, "models", "autoencoder.pt"), "--count", "1", *syn], capsys)
    assert code == 2
    one_line(err, os.path.join("wrong", "models", "autoencoder.pt"), "4 latent channels")
    # a size the model cannot take (16 = 2 x 2 x 4: autoencoder halves once, U-Net once)
    code, _, err = run(["synthesize", "--model", bundles["monai"], "--count", "1", "--size", "18", *syn], capsys)
    assert code == 2
    one_line(err, "--size 18x18x18", "multiple of 4")
    code, _, err = run(["finetune", "--model", bundles["monai"], "--data", synthetic.write_volume_dataset(
        str(tmp_path / "d"), n=2), "--out", tmp_path / "r", "--patch-size", "10", "--steps", "1", "-q"], capsys)
    assert code == 2
    one_line(err, "--patch-size 10x10x10", "multiple of 4")
    # --count 0
    code, _, err = run(["synthesize", "--model", bundles["monai"], "--count", "0", *syn], capsys)
    assert code == 2
    one_line(err, "--count", "must be >= 1")
    assert not (tmp_path / "o").exists()  # nothing was written by any of them


def test_conditional_bundle_is_refused_by_name(tmp_path):
    root = write_latent_bundle(str(tmp_path / "cond"), "monai")
    config_path = os.path.join(root, "configs", "inference.json")
    config = json.load(open(config_path))
    config["diffusion_def"]["with_conditioning"] = True
    config["diffusion_def"]["cross_attention_dim"] = 4
    json.dump(config, open(config_path, "w"))
    with pytest.raises(CheckpointError, match="conditional latent diffusion"):
        load_latent_model(root)


def test_params_counts_the_diffusion_unet_alone(bundles, capsys):
    ae, unet = build_networks(0)
    assert main(["params", "--model", bundles["monai"], "--method", "lora", "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["base_total"] == sum(p.numel() for p in unet.parameters())  # the autoencoder is not counted
    assert 0 < report["trainable"] < report["base_total"]


def test_a_cancelled_latent_finetune_resumes_to_the_uninterrupted_adapter(bundles, tmp_path):
    """Stopped after its second step (SIGTERM, as Cancel in the GUIs) and resumed, a latent fine-tune ends with the
    adapter an uninterrupted run writes, bit for bit: the posterior samples, noise and timesteps of every step are
    drawn from (seed, step), not from where the process happened to start."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = synthetic.write_volume_dataset(str(tmp_path / "data"), n=3)
    common = [sys.executable, "-m", "TensorPEFTLib.cli", "finetune", "--model", bundles["monai"], "--data", data,
              "--method", "lora", "--rank", "2", "--steps", "5", "--checkpoint-every", "1", "--eval-every", "100",
              "--device", "cpu", "--threads", "1", "--seed", "4", "--no-val"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(common + ["--out", str(tmp_path / "full"), "-q"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(common + ["--out", str(tmp_path / "cut"), "--events", "-"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "step" and event["step"] == 2:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 130, proc.stderr.read()
    resumed = subprocess.run(common + ["--out", str(tmp_path / "cut"), "--resume", "-q"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
