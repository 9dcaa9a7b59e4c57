"""`tensorpeft pretrain` (issue 7): a recipe reproduces its weights bit for bit and writes a model card whose hash the
loader checks."""

from __future__ import annotations

import json

import pytest

from TensorPEFTLib.engine.events import Events
from TensorPEFTLib.engine.pretrain import RECIPES, pretrain
from TensorPEFTLib.engine.runtime import EngineError
from TensorPEFTLib.models import load_model
from TensorPEFTLib.models.shipped import file_sha256

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def source_cohort(tmp_path_factory):
    from TensorPEFTLib.data import build_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    build_demo_cohort(out, seed=0, n_train=1, n_test=0, n_unseen=0, n_whole_head=0, n_source=2, n_synthesis=0, n_synthesis_target=0,
                      n_synthesis_ventricles=0,
                      seg_spacings=((3.0, 3.0, 3.0),))
    return str(out)


def test_a_short_recipe_run_twice_gives_the_same_weights_and_a_true_card(tmp_path, source_cohort):
    cards = [pretrain("demo-unetr", str(tmp_path / f"run{i}"), cohort=source_cohort, steps=2, threads=1,
                      events=Events(quiet=True)) for i in range(2)]
    assert cards[0]["sha256"] == cards[1]["sha256"]  # same recipe, same seed: the same file
    weights = tmp_path / "run0" / "demo-unetr.safetensors"
    card = json.loads((tmp_path / "run0" / "demo-unetr.json").read_text())
    assert card["sha256"] == file_sha256(weights)
    recipe = RECIPES["demo-unetr"]
    assert card["recipe"]["steps"] == 2 and card["recipe"]["affine"] == recipe.affine
    assert card["recipe"]["flip"] == recipe.flip and card["dtype"] == "float16"
    model = load_model(str(weights))
    assert model.tensorpeft_spec["preset"] == recipe.preset
    # the working grid travels with the weights and is on the card: segment resamples every scan to it
    assert card["preprocessing"]["spacing"] == [1.5, 1.5, 1.5] == list(recipe.spacing)
    assert model.tensorpeft_spec["preprocessing"] == card["preprocessing"]
    assert not hasattr(model, "tensorpeft")  # exported without the adapter bookkeeping


def test_a_second_stage_recipe_trains_its_first_stage_first_and_continues_its_weights(tmp_path, source_cohort):
    """``demo-unetr`` continues ``demo-unetr-stage1``: one command trains both, the card names the first stage by
    hash, the second starts from the first's weights (not a fresh model), and ``--resume`` after the first stage
    finished goes on with the second."""
    import torch

    from TensorPEFTLib.models import build_model

    recipe = RECIPES["demo-unetr"]
    assert recipe.start_from == "demo-unetr-stage1" and RECIPES[recipe.start_from].start_from is None
    out = tmp_path / "two"
    card = pretrain("demo-unetr", str(out), cohort=source_cohort, steps=2, threads=1, events=Events(quiet=True))
    first = out / "demo-unetr-stage1" / "demo-unetr-stage1.safetensors"
    assert card["start_from"]["name"] == "demo-unetr-stage1"
    assert card["start_from"]["sha256"] == file_sha256(first)
    assert card["start_from"]["recipe"]["centre_jitter"] == 0 and card["recipe"]["centre_jitter"] == 16
    second = load_model(str(out / "demo-unetr.safetensors")).state_dict()
    before = load_model(str(first)).state_dict()
    torch.manual_seed(12345)
    fresh = build_model(recipe.preset).state_dict()
    name = "vit.blocks.0.attn.qkv.weight"
    assert (second[name] - before[name]).abs().max() < 0.1 * (second[name] - fresh[name]).abs().max()

    # the second stage's outputs lost, the first's kept: --resume trains the second again, to the same weights,
    # and leaves the finished first stage alone
    kept = first.stat().st_mtime_ns
    for stale in ("run", "demo-unetr.safetensors", "demo-unetr.json", "demo-unetr-init.safetensors"):
        path = out / stale
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    again = pretrain("demo-unetr", str(out), cohort=source_cohort, steps=2, threads=1, resume=True,
                     events=Events(quiet=True))
    assert again["sha256"] == card["sha256"] and first.stat().st_mtime_ns == kept


def test_an_unknown_recipe_is_named_in_the_error(tmp_path, source_cohort):
    with pytest.raises(EngineError, match="unknown recipe 'demo-vit'.*demo-unetr"):
        pretrain("demo-vit", str(tmp_path), cohort=source_cohort, events=Events(quiet=True))
