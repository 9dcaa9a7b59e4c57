"""The README's main job (issue 7): shipped models with checked hashes, and `tensorpeft demo --quick` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from TensorPEFTLib.data import read_volume
from TensorPEFTLib.models import SHIPPED_MODELS, CheckpointError, load_model, model_card, shipped
from TensorPEFTLib.models.shipped import WEIGHTS_DIR, file_sha256

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_shipped_models_are_small_fp16_and_match_their_cards():
    total = 0
    for name in SHIPPED_MODELS:
        card = model_card(name)
        path = WEIGHTS_DIR / f"{name}.safetensors"
        assert file_sha256(path) == card["sha256"]
        assert card["dtype"] == "float16" and card["recipe"]["steps"] >= 1 and "seed" in card["recipe"]
        assert {"final_metrics", "data", "command", "preset"} <= set(card)
        total += path.stat().st_size
        model = load_model(name)  # by name, hash checked
        from monai.networks.nets import UNETR, DiffusionModelUNet

        assert isinstance(model, (UNETR, DiffusionModelUNet))
        assert getattr(model, "tensorpeft_spec", {}).get("preset") == card["preset"]
        if card["preset"].startswith("unetr"):  # the working grid segment resamples every scan to
            assert card["preprocessing"]["spacing"] == [1.5, 1.5, 1.5] and card["preprocessing"]["orientation"] == "RAS"
            assert model.tensorpeft_spec["preprocessing"] == card["preprocessing"]
    assert total < 25e6, total


def test_a_damaged_shipped_model_is_refused(tmp_path, monkeypatch):
    for name in SHIPPED_MODELS:
        shutil.copy(WEIGHTS_DIR / f"{name}.json", tmp_path)
        shutil.copy(WEIGHTS_DIR / f"{name}.safetensors", tmp_path)
    damaged = tmp_path / "demo-unetr.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the weights
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    shipped.shipped_path.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="does not match its model card"):
            load_model("demo-unetr")
        os.remove(damaged)
        with pytest.raises(CheckpointError, match="missing"):
            load_model("demo-unetr")
    finally:
        shipped.shipped_path.cache_clear()


def test_quick_demo_end_to_end(tmp_path):
    # As the README runs it: from a working folder, into the default relative ./tensorpeft-demo
    out = tmp_path / "tensorpeft-demo"
    cmd = [sys.executable, "-m", "TensorPEFTLib.cli", "demo", "--quick", "--json", "--threads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    base, adapted = summary["segmentation"]
    assert base["model"] == "base" and adapted["method"] == "lora-pt" and adapted["rank"] == 1
    assert {"heldout", "unseen-template", "whole-head"} <= set(adapted) and 0.0 <= adapted["heldout"]["dice"] <= 1.0
    assert 0 < adapted["trainable"] < adapted["total_parameters"]
    for row in summary["cases"]:  # masks on each image's exact grid
        image = read_volume(out / "cohort" / "hippocampus" / "imagesTs" / f"{row['case']}.nii.gz")
        mask = read_volume(os.path.join(adapted["masks"], f"{row['case']}.nii.gz"))
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    syn = summary["synthesis"]
    assert syn["method"] == "tenvoo-q" and len(syn["volumes"]) == 2 and all(os.path.isfile(v) for v in syn["volumes"])
    assert np.isfinite(syn["mmd_to_target"]["base"]) and np.isfinite(syn["mmd_to_target"]["adapted"])
    for which in ("base", "adapted"):  # issue 15's realism checks of both sets of samples
        assert set(syn["realism"][which]["pass"]) == {"not_noise", "brain_shaped", "diverse", "all"}
    # the target is the enlarged-ventricle brains, and the demo measures the samples' ventricles against theirs
    assert syn["target"].endswith("synthesis-ventricles") and set(syn["ventricles_ml"]) == {"base", "adapted", "target"}
    assert syn["ventricles_ml"]["target"] > 20  # mL: the two target brains' enlarged ventricles (the template: ~7)
    for png in (summary["png"], syn["png"], syn["compare_png"]):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(out / "summary.json"))["segmentation"]["adapted"][0]["method"] == "lora-pt"


def test_demo_bad_options_are_one_line_errors(tmp_path, capsys):
    from TensorPEFTLib.cli import main

    assert main(["demo", "--quick", "--rank", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--rank must be at least 1" in err and "Traceback" not in err
    assert main(["demo", "--quick", "--method", "nope", "--no-synthesis", "--out", str(tmp_path / "y")]) == 2
    assert "nope" in capsys.readouterr().err


def test_tables_show_a_rank_only_for_methods_that_have_one():
    from TensorPEFTLib.engine.demo import segmentation_table

    scores = {"groups": {"heldout": {"dice": 0.5, "hd95": 3.0, "n": 1}}}
    rows = [{"method": m, "rank": r, "trainable": 10, "total_parameters": 100, "train_seconds": 1.0, **scores}
            for m, r in (("full", 1), ("lora-pt", 1), ("ssf", 1))]
    lines = segmentation_table(scores, rows).splitlines()
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| full", "| lora-pt r=1", "| ssf"]


def test_the_demo_gives_the_trainable_share_of_the_base_model_as_finetune_does():
    """finetune says "585,194 trainable of 3,418,546 (17.12%)": the base model's count, the adapter's own parameters
    not in it. The demo divided by the total with the adapter (17.0 %), and its synthesis line named that total."""
    from TensorPEFTLib.engine.demo import segmentation_table

    scores = {"groups": {"heldout": {"dice": 0.5, "hd95": 3.0, "n": 1}}}
    run = {"method": "lora-pt", "rank": 1, "trainable": 585194, "adapter_parameters": 13848,
           "total_parameters": 3432394, "train_seconds": 1.0, **scores}
    assert "| 585,194 (17.1 %) |" in segmentation_table(scores, [run])
