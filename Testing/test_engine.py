"""The engine end to end on CPU: fine-tune, segment, evaluate, synthesize, events, cancel and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from TensorPEFTLib.adapters import AdapterConfig
from TensorPEFTLib.cli import main
from TensorPEFTLib.data import read_volume
from TensorPEFTLib.engine import EVENT_KINDS, EngineError, Events, TrainSettings, evaluate, finetune, segment, synthesize

import synthetic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    synthetic.write_segmentation_dataset(str(root / "data"), n_train=4, n_test=2, seed=0)
    val = root / "val"
    os.makedirs(val / "imagesTr")
    os.makedirs(val / "labelsTr")
    for name in os.listdir(root / "data" / "imagesTs"):
        os.link(root / "data" / "imagesTs" / name, val / "imagesTr" / name)
        os.link(root / "data" / "labelsTs" / name, val / "labelsTr" / name)
    model = synthetic.save_tiny_model(str(root / "unetr.safetensors"))
    return root, model


@pytest.fixture(scope="module")
def trained_seg(seg_setup):
    root, model = seg_setup
    out = str(root / "adapter")
    result = finetune(model, str(root / "data"), out, AdapterConfig(method="lora-pt", rank=2),
                      TrainSettings(steps=40, lr=3e-3, eval_every=20, checkpoint_every=20, seed=0),
                      val=str(root / "val"), device="cpu", events=Events(quiet=True), threads=2)
    return root, model, out, result


def test_finetune_raises_validation_dice_over_the_base_model(trained_seg):
    root, model, out, result = trained_seg
    assert result.status == "completed" and result.step == 40
    base_masks, adapted_masks = str(root / "base_masks"), str(root / "adapted_masks")
    segment(str(root / "data" / "imagesTs"), base_masks, model_source=model, device="cpu", min_component_mm3=0,
            events=Events(quiet=True))
    segment(str(root / "data" / "imagesTs"), adapted_masks, adapter=out, device="cpu", min_component_mm3=0,
            events=Events(quiet=True))
    base = evaluate(base_masks, str(root / "data" / "labelsTs"))["mean"]["dice"]
    adapted = evaluate(adapted_masks, str(root / "data" / "labelsTs"))["mean"]["dice"]
    assert adapted > base + 0.1, (base, adapted)
    assert result.best is not None and result.best > 0.3


def test_run_outputs_and_history(trained_seg):
    _, _, out, result = trained_seg
    for name in ("adapter_config.json", "adapter.safetensors", "history.json", "metrics.csv", "report.png",
                 "last/adapter.safetensors", "checkpoint/trainer_state.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    history = json.load(open(os.path.join(out, "history.json")))
    assert len(history["steps"]) == 40 and [e["step"] for e in history["evals"]] == [20, 40]
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert saved["config"]["method"] == "lora-pt" and saved["base_model_source"].endswith("unetr.safetensors")
    lines = open(os.path.join(out, "metrics.csv")).read().splitlines()
    assert lines[0] == "step,loss,lr,seconds,val_dice" and len(lines) == 41


def test_segment_writes_mask_on_the_input_grid(trained_seg, tmp_path):
    root, _, out, _ = trained_seg
    image = str(root / "data" / "imagesTs" / "case_ts00.nii.gz")
    for target in ("mask.nii.gz", "mask.seg.nrrd"):
        segment(image, str(tmp_path / target), adapter=out, device="cpu", events=Events(quiet=True))
        mask, ref = read_volume(tmp_path / target), read_volume(image)
        assert mask.shape[:3] == ref.shape[:3]
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-4)  # oblique, anisotropic: same grid exactly
        assert set(np.unique(mask.array)) <= {0, 1}


def test_segment_mirrors_along_the_axes_the_adapter_was_trained_flipped_on(trained_seg, tmp_path):
    root, model, out, _ = trained_seg
    assert json.load(open(os.path.join(out, "adapter_config.json")))["flip"] == "lr"  # finetune's default
    image = str(root / "data" / "imagesTs" / "case_ts00.nii.gz")
    quiet = Events(quiet=True)
    assert segment(image, str(tmp_path / "a.nii.gz"), adapter=out, device="cpu", events=quiet)[0]["mirror"] == "lr"
    assert segment(image, str(tmp_path / "b.nii.gz"), model_source=model, device="cpu", events=quiet)[0]["mirror"] == "none"
    one = segment(image, str(tmp_path / "c.nii.gz"), adapter=out, mirror="all", device="cpu", events=quiet)[0]
    assert one["mirror"] == "all"
    with pytest.raises(EngineError, match="--mirror 'ap'"):
        segment(image, str(tmp_path / "d.nii.gz"), adapter=out, mirror="ap", device="cpu", events=quiet)


def test_mirrored_prediction_of_a_symmetric_image_is_symmetric():
    import torch

    from TensorPEFTLib.engine.segmentation import predict_probabilities

    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 2, 3, padding=1)  # random weights: not mirror-symmetric
    half = torch.rand(1, 1, 8, 12, 10)
    image = torch.cat([half, half.flip(2)], dim=2)  # symmetric under a left-right (axis 0) flip
    plain = predict_probabilities(model, image, (16, 12, 10))
    mirrored = predict_probabilities(model, image, (16, 12, 10), mirror_axes=(0,))
    assert not torch.allclose(plain, plain.flip(2), atol=1e-3)
    torch.testing.assert_close(mirrored, mirrored.flip(2))  # flipped back before averaging
    torch.testing.assert_close(mirrored.sum(1), torch.ones(1, 16, 12, 10))
    every = predict_probabilities(model, image, (16, 12, 10), mirror_axes=(0, 1, 2))
    expected = sum(torch.softmax(model(image.flip(d) if d else image), 1).flip(d) if d else torch.softmax(model(image), 1)
                   for d in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]) / 8
    torch.testing.assert_close(every, expected)


def test_min_component_removes_small_islands():
    from TensorPEFTLib.engine.segmentation import remove_small_components

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:12, 2:12, 2:12] = 1  # 1000 voxels
    mask[15:17, 15:17, 15:17] = 1  # 8 voxels
    kept = remove_small_components(mask, (2.0, 2.0, 2.0), 100.0)  # 8 voxels = 64 mm³ < 100 mm³
    assert kept[3, 3, 3] == 1 and kept[15, 15, 15] == 0
    assert remove_small_components(mask, (2.0, 2.0, 2.0), 0)[15, 15, 15] == 1


def test_by_default_a_structure_smaller_than_a_millilitre_is_kept_and_its_specks_go():
    """The fixed 1000 mm³ of LoRA-PT removed the accumbens (0.4-0.6 mL) whole on every test scan of a 16-structure
    run that validated it at 0.72 / 0.51. auto: a piece goes when it is under a quarter of its structure's largest
    piece and under 1000 mm³; other structures keep their own measure."""
    from TensorPEFTLib.engine.segmentation import remove_small_components

    mask = np.zeros((40, 40, 40), np.uint8)  # 1 mm voxels
    mask[2:10, 2:10, 2:10] = 1   # a 512 mm³ structure (an accumbens) ...
    mask[14:17, 2:5, 2:5] = 1    # ... a 27 mm³ speck of it (5 %)
    mask[2:8, 20:30, 20:30] = 1  # ... and a 600 mm³ second piece (over a quarter of 512: stays)
    mask[20:36, 20:36, 20:36] = 2  # a 4096 mm³ structure (a hippocampus) ...
    mask[2:11, 32:40, 2:10] = 2    # ... a 576 mm³ piece of it (under 1000 mm³ and a quarter of 4096: goes)
    mask[30:38, 2:10, 2:10] = 3    # a structure only of pieces of 512 mm³ each, apart
    mask[30:38, 2:10, 20:28] = 3
    auto = remove_small_components(mask, (1.0, 1.0, 1.0))
    assert auto[5, 5, 5] == 1 and auto[15, 3, 3] == 0 and auto[4, 25, 25] == 1
    assert auto[25, 25, 25] == 2 and auto[5, 35, 5] == 0
    assert auto[33, 5, 5] == 3 and auto[33, 5, 24] == 3  # equal pieces: none is a speck of another
    fixed = remove_small_components(mask, (1.0, 1.0, 1.0), 1000.0)
    assert not np.any(fixed == 1) and not np.any(fixed == 3) and fixed[25, 25, 25] == 2  # what 1000 mm³ did
    half_mm = remove_small_components(mask, (0.5, 0.5, 0.5))  # the same voxels as 1/8 the volume: same ratios
    assert np.array_equal(half_mm, auto)


def test_segment_min_component_takes_auto_or_a_volume(capsys):
    from TensorPEFTLib.cli import main

    assert main(["segment", "--image", "x.nii.gz", "--out", "m.nii.gz", "--min-component", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--min-component" in err and "give auto or a volume in mm³" in err and "Traceback" not in err


def test_ddpm_finetune_loss_falls_and_synthesize_writes_requested_size(tmp_path):
    data = synthetic.write_volume_dataset(str(tmp_path / "vol"), n=3)
    model = synthetic.save_tiny_model(str(tmp_path / "ddpm.safetensors"), "ddpm")
    out = str(tmp_path / "adapter")
    result = finetune(model, data, out, AdapterConfig(method="tenvoo-l", rank=2),
                      TrainSettings(steps=24, lr=3e-3, eval_every=8, seed=0), val=data, device="cpu",
                      patch_size=(16, 16, 16), events=Events(quiet=True), threads=2)
    evals = [e["val_loss"] for e in result.history["evals"]]
    assert len(evals) == 3 and evals[-1] < evals[0], evals  # same noise and timesteps at every evaluation
    paths = synthesize(str(tmp_path / "synth"), 2, adapter=out, steps=4, size=(16, 16, 12), device="cpu",
                       events=Events(quiet=True))
    assert len(paths) == 2 and os.path.isfile(tmp_path / "synth" / "samples.png")
    volume = read_volume(paths[0])
    assert volume.shape == (16, 16, 12) and np.isfinite(volume.array).all()
    assert 0.0 <= volume.array.min() and volume.array.max() <= 1.0


def _cli(*args, env_threads="1"):
    env = {**os.environ, "OMP_NUM_THREADS": env_threads}
    return [sys.executable, "-m", "TensorPEFTLib.cli", *args], env


def test_events_stream_and_cancel_then_resume_match_an_uninterrupted_run(seg_setup, tmp_path):
    root, model = seg_setup
    common = ["finetune", "--model", model, "--data", str(root / "data"), "--method", "lora", "--rank", "2",
              "--steps", "8", "--checkpoint-every", "2", "--eval-every", "100", "--device", "cpu", "--threads", "1",
              "--seed", "3"]
    # Uninterrupted reference run, events on stdout.
    cmd, env = _cli(*common, "--out", str(tmp_path / "full"), "--events", "-")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert set(kinds) <= set(EVENT_KINDS) and kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 8 and "checkpoint" in kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "steps", "loss", "lr", "eta_seconds", "time"} <= set(step)
    assert events[0]["device"] == "cpu" and events[-1]["status"] == "completed"

    # Interrupted run: SIGTERM after the third step, then --resume.
    cmd, env = _cli(*common, "--out", str(tmp_path / "cut"), "--events", "-")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "step" and seen[-1]["step"] == 3:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 130
    assert seen[-1]["event"] == "done" and seen[-1]["status"] == "cancelled" and seen[-1]["step"] < 8
    assert os.path.isfile(tmp_path / "cut" / "checkpoint" / "trainer_state.pt")
    cmd, env = _cli(*common[:-2], "--seed", "3", "--out", str(tmp_path / "cut"), "--resume", "--quiet")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(tmp_path / "full" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() == 0.0, key


def test_bad_data_is_caught_before_training(seg_setup, tmp_path, capsys):
    root, model = seg_setup
    data = tmp_path / "bad"
    synthetic.write_segmentation_dataset(str(data), n_train=2, n_test=0)
    os.remove(data / "labelsTr" / "case_tr01.nii.gz")
    code = main(["finetune", "--model", model, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2",
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "case_tr01" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o" / "adapter.safetensors")


def test_existing_run_is_not_overwritten_and_bad_options(trained_seg, tmp_path, capsys):
    root, model, out, _ = trained_seg
    code = main(["finetune", "--model", model, "--data", str(root / "data"), "--out", out, "--steps", "2", "--quiet"])
    assert code == 2 and "already holds a fine-tuning run" in capsys.readouterr().err
    code = main(["finetune", "--model", model, "--data", str(root / "data"), "--out", str(tmp_path / "x"),
                 "--resume", "--quiet"])
    assert code == 2 and "no checkpoint to resume" in capsys.readouterr().err
    code = main(["segment", "--image", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m.nii.gz"),
                 "--adapter", out])
    assert code == 2 and "missing.nii.gz: no such image" in capsys.readouterr().err
    with pytest.raises(EngineError, match="--device cuda"):
        from TensorPEFTLib.engine.runtime import select_runtime

        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        select_runtime("cuda")


def test_models_on_cpu_run_their_3d_convolutions_channels_last_with_the_same_results(tmp_path):
    """``place_model`` puts 3D convolution weights in the channels-last layout on CPU (oneDNN's faster one): the
    forward pass and every gradient are those of the default layout, and a saved adapter is written contiguous."""
    import copy

    import torch

    from TensorPEFTLib.adapters import AdapterConfig
    from TensorPEFTLib.adapters.model import inject
    from TensorPEFTLib.engine.runtime import place_model, select_runtime
    from TensorPEFTLib.models import build_model

    from synthetic import TINY_UNETR

    torch.manual_seed(0)
    plain = build_model("unetr-small", **TINY_UNETR)
    inject(plain, AdapterConfig(method="lora", rank=2, targets=["@defaults", "@decoder-upsamplers"]))
    fast = place_model(copy.deepcopy(plain), select_runtime("cpu", "off", 1))
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) and not m.weight.is_contiguous()
                         for m in convs if m.weight.shape[2:] != (1, 1, 1) and m.weight.shape[1] > 1)
    x = torch.randn(1, 1, *TINY_UNETR["img_size"])
    outs = []
    for model in (plain, fast):
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for name, grad in outs[0][1].items():
        assert torch.allclose(grad, outs[1][1][name], atol=1e-5, rtol=1e-3), name
    from TensorPEFTLib.adapters import save_adapter

    for name, model in (("plain", plain), ("fast", fast)):
        save_adapter(model, tmp_path / name)
    assert (tmp_path / "plain" / "adapter.safetensors").read_bytes() == (tmp_path / "fast" / "adapter.safetensors").read_bytes()
