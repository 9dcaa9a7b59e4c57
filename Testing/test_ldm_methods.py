"""The plumbing of benchmarks/ldm_methods.py (every DDPM method fine-tuning a latent diffusion model at one budget)
on a tiny random latent bundle: the measurements themselves are results (benchmarks/results/), not asserted here."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import synthetic  # noqa: E402
from latent_bundles import write_latent_bundle  # noqa: E402

from benchmarks import ldm_methods  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_methods")
    bundle = write_latent_bundle(str(root / "bundle"), "monai")
    target = synthetic.write_volume_dataset(str(root / "target"), n=5, seed=1)
    source = synthetic.write_volume_dataset(str(root / "source"), n=3, seed=2)
    files = lambda d: sorted(os.path.join(d, "imagesTr", f) for f in os.listdir(os.path.join(d, "imagesTr")))  # noqa: E731
    return root, bundle, files(target), files(source)


def test_every_method_trains_samples_and_is_measured(small):
    import torch

    root, bundle, target, source = small
    roi = np.zeros((16, 16, 16), bool)
    roi[4:12, 4:12, 4:12] = True
    threads = torch.get_num_threads()
    try:
        result = ldm_methods.run_methods(bundle, target[:3], target[3:], source, str(root / "work"),
                                         methods=[("lora", 2), ("full", 1)], steps=2, count=2, sampler_steps=2,
                                         lrs={"full": 1e-4}, roi=roi, spacing=4.0, features=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["base", "lora", "full"]
    assert rows["base"]["trainable"] == 0 and 0 < rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["lora"]["lr_is_default"] and rows["full"]["lr"] == 1e-4 and not rows["full"]["lr_is_default"]
    from TensorPEFTLib.adapters.catalog import default_lr

    assert rows["lora"]["lr"] == default_lr("lora", "ddpm")  # each method at its catalog default unless told
    for row in rows.values():
        for against in ("target", "source"):
            assert 0 < row[against]["ms_ssim"] <= 1 and row[against]["mmd_voxels"] >= 0
        assert set(row["realism"]["pass"]) >= {"not_noise", "brain_shaped", "diverse"}
        assert len(row["ventricles_ml"]["each"]) == 2
    # the same seeds for every model: the base and an adapted model start from the same noise, so a 2-step full
    # fine-tune at 1e-4 moves each sample a little, not into another volume
    base, full = result["samples"]["base"], result["samples"]["full"]
    assert all(b.shape == (16, 16, 16) for b in base) and not np.array_equal(base[0], full[0])
    assert result["reference"]["target"]["count"] == 2 and result["reference"]["source"]["count"] == 3
    # kept per method: a second run with resume reuses them without training
    record = json.loads((root / "work" / "lora.json").read_text())
    assert record["trainable"] == rows["lora"]["trainable"]
    again = ldm_methods.run_methods(bundle, target[:3], target[3:], source, str(root / "work"),
                                    methods=[("lora", 2)], steps=2, count=2, sampler_steps=2, roi=roi, spacing=4.0,
                                    features=False, resume=True, log=lambda *_: None)
    assert again["rows"][1]["train_seconds"] == rows["lora"]["train_seconds"]

    text = ldm_methods.markdown(result, ["# test", ""])
    assert "| lora r=2 | " in text and "| full | 0.0001 (set) |" in text and "| target | 2 |" in text
    png = ldm_methods.rows_figure(str(root / "rows.png"), [("base", base), ("full", full)], per_row=2)
    assert os.path.getsize(png) > 5000


def test_bad_lr_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        ldm_methods.main(["--lr", "tenvoo-l"])
    assert err.value.code == 2 and "--lr takes METHOD=LR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # refused before any training
        ldm_methods.main(["--methods", "lora:4,full", "--figure", "x.png", "--figure-method", "tenvoo-l"])
    assert err.value.code == 2 and "--figure-method tenvoo-l: not among --methods" in capsys.readouterr().err
