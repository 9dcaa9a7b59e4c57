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
    build_demo_cohort(out, seed=0, n_train=1, n_test=0, n_unseen=0, n_source=2, n_synthesis=0, n_synthesis_target=0,
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


def test_an_unknown_recipe_is_named_in_the_error(tmp_path, source_cohort):
    with pytest.raises(EngineError, match="unknown recipe 'demo-vit'.*demo-unetr"):
        pretrain("demo-vit", str(tmp_path), cohort=source_cohort, events=Events(quiet=True))
