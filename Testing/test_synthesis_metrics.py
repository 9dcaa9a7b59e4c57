"""The TenVOO paper's synthesis metrics (engine/synthesis_metrics.py) on hand-checkable cases, and `evaluate --kind
synthesis` through the CLI (table + figure)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from TensorPEFTLib.cli import main
from TensorPEFTLib.engine.scoring import evaluate_synthesis
from TensorPEFTLib.engine.synthesis_metrics import (MS_SSIM_WEIGHTS, frechet_distance, gaussian_mmd, ms_ssim,
                                                    ms_ssim_scales, paired_ms_ssim)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def brainish(seed: int, n: int = 32) -> np.ndarray:
    """A smooth volume in [0, 1]."""
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random((n, n, n)), 2.5)
    return ((v - v.min()) / (v.max() - v.min())).astype(np.float32)


def test_ms_ssim_scales_follow_pytorch_msssim_size_rule():
    # pytorch_msssim asserts smaller side > (win - 1) * 2**4 for its 5 scales
    assert ms_ssim_scales((97, 120, 100), 7) == 5 and ms_ssim_scales((96, 96, 96), 7) == 4
    assert ms_ssim_scales((32, 32, 32), 7) == 3 and ms_ssim_scales((33, 33, 33), 5) == 4


def test_ms_ssim_is_one_for_identical_and_agrees_with_monai():
    from monai.metrics import MultiScaleSSIMMetric

    a = torch.as_tensor(brainish(0))[None, None]
    b = torch.as_tensor(np.clip(brainish(0) + 0.1 * brainish(1), 0, 1))[None, None]
    assert float(ms_ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    ours = float(ms_ssim(a, b))
    weights = np.asarray(MS_SSIM_WEIGHTS[:3])
    monai = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", kernel_size=7,
                                 kernel_sigma=1.5, weights=tuple(weights / weights.sum()))
    assert ours == pytest.approx(float(monai(a, b).mean()), abs=1e-4)
    assert 0 < ours < 1
    worse = torch.as_tensor(np.clip(brainish(0) + 0.5 * brainish(1), 0, 1))[None, None]
    assert float(ms_ssim(a, worse)) < ours


def test_ms_ssim_pairs_volumes_in_order_like_the_release():
    real = [brainish(0), brainish(1)]
    mean, values, scales = paired_ms_ssim(real, [brainish(0), brainish(1)])
    assert mean == pytest.approx(1.0, abs=1e-6) and len(values) == 2 and scales == 3
    swapped, _, _ = paired_ms_ssim(real, [brainish(1), brainish(0)])
    assert swapped < 0.9  # each real volume is compared with its own partner only, not with every sample
    _, values, _ = paired_ms_ssim(real, [brainish(0)])  # as many pairs as the smaller set has
    assert len(values) == 1


def test_frechet_distance_hand_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0, 0.0, -1.0])
    # same covariance, means apart by `shift`: FD = |shift|^2 = 6
    assert frechet_distance(x, x + shift) == pytest.approx(6.0, rel=1e-5)
    assert frechet_distance(x, 3 * x) > frechet_distance(x, 1.5 * x) > 0.1  # covariance differences count too


def test_gaussian_mmd_hand_cases():
    # one point each, 1 apart: sigma = median distance = 1, MMD^2 = 2 - 2 exp(-1/2)
    assert gaussian_mmd(np.array([[0.0]]), np.array([[1.0]])) == pytest.approx(2 - 2 * math.exp(-0.5))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    assert gaussian_mmd(x, x) == 0.0
    near, far = gaussian_mmd(x, x + 0.5, sigma=3.0), gaussian_mmd(x, x + 2.0, sigma=3.0)
    assert 0 < near < far


def test_evaluate_synthesis_identical_and_shifted_sets():
    real = [brainish(s) for s in range(3)]
    same = evaluate_synthesis(real, real)
    assert same["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["mmd_voxels"] == 0.0 and same["mmd_features"] == 0.0
    assert same["fd_features"] == pytest.approx(0.0, abs=1e-3)
    assert "demo-unetr" in same["feature_network"]
    shifted = evaluate_synthesis([np.clip(v * 0.5 + 0.3, 0, 1) for v in real], real)
    assert shifted["ms_ssim"] < 0.99
    for key in ("mmd_voxels", "mmd_features", "fd_features"):
        assert shifted[key] > same[key] + 1e-3, key
    lone = evaluate_synthesis(real[:1], real[:1], features=False)
    assert math.isnan(lone["mmd_voxels"]) and "fd_features" not in lone  # set metrics need two per set


def test_cli_evaluate_synthesis_prints_the_metrics_and_writes_a_figure(tmp_path, capsys):
    from TensorPEFTLib.data import write_volume

    for folder, seeds in (("gen", (0, 1)), ("real", (2, 3))):
        os.makedirs(tmp_path / folder)
        for s in seeds:
            write_volume(str(tmp_path / folder / f"v{s}.nii.gz"), brainish(s), like=np.diag([6.0, 6.0, 6.0, 1.0]))
    assert main(["evaluate", "--pred", str(tmp_path / "gen"), "--ref", str(tmp_path / "real"), "--kind",
                 "synthesis"]) == 0
    out = capsys.readouterr().out
    assert "MS-SSIM" in out and "FD (features)" in out and "MMD (voxels)" in out and "demo-unetr" in out
    assert "realism of the generated volumes vs the real ones: HF ratio" in out and "brain-mask Dice" in out
    figure = tmp_path / "gen" / "evaluation.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["evaluate", "--pred", str(tmp_path / "gen"), "--ref", str(tmp_path / "real"), "--kind",
                 "synthesis", "--window", "4", "--figure", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--window 4" in err and "Traceback" not in err


def test_dark_volume_counts_dark_voxels_of_the_region_in_ml():
    from TensorPEFTLib.engine.synthesis_metrics import dark_volume_ml

    volume = np.full((10, 10, 10), 0.8, np.float32)
    volume[2:4, 2:4, 2:4] = 0.05  # 8 dark voxels inside the region
    volume[8, 8, 8] = 0.0  # dark, but outside it
    region = np.zeros_like(volume, bool)
    region[:6, :6, :6] = True
    assert dark_volume_ml(volume, region, 2.5) == pytest.approx(8 * 2.5 ** 3 / 1000)
    assert dark_volume_ml(volume, region, (1.0, 1.0, 2.0), threshold=0.9) == pytest.approx(216 * 2 / 1000)
    with pytest.raises(ValueError, match="differ in shape"):
        dark_volume_ml(volume, region[:5], 2.5)
