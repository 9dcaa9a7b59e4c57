"""Checkpoints: safe loading, unwrapping, MONAI bundles, readable misfit reports, self-describing saved models."""

from __future__ import annotations

import json
import os

import pytest
import torch

from TensorPEFTLib.models import (
    CheckpointError, build_model, fitting_presets, load_checkpoint, load_model, read_spec, save_model,
)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model("unetr-small")


_OTHER: list[torch.nn.Module] = []


def _fresh():
    """An unetr-small with other weights than ``small`` (built once, copied: building costs ~1 s on 2 cores)."""
    import copy

    if not _OTHER:
        torch.manual_seed(1)
        _OTHER.append(build_model("unetr-small"))
    return copy.deepcopy(_OTHER[0])


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Evil:
    """Unpickling this would run ``open(marker, "w")``: weights_only loading must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_not_executed(tmp_path, small):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small.state_dict(), "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_fresh(), path)
    msg = str(err.value)
    assert "evil.pt" in msg and "arbitrary code" in msg and "state dict" in msg
    assert "weights_only` set to `False`" not in msg  # never advise the unsafe route
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_plain_state_dict_loads(tmp_path, small, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(small.state_dict(), path)
    model = _fresh()
    assert not _same(model, small)
    report = load_checkpoint(model, path)
    assert _same(model, small)
    assert report["loaded"] == len(small.state_dict()) and not report["missing"] and not report["unexpected"]


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 1e-3}},
    lambda sd: {"network": sd},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # Lightning
    lambda sd: {f"module.{k}": v for k, v in sd.items()},                 # DataParallel
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
])
def test_wrappers_and_prefixes_are_unwrapped(tmp_path, small, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(small.state_dict()), path)
    model = _fresh()
    load_checkpoint(model, path)
    assert _same(model, small)


def test_safetensors_file(tmp_path, small):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    model = _fresh()
    load_checkpoint(model, path)
    assert _same(model, small)


def test_monai_bundle_folder(tmp_path, small):
    bundle = tmp_path / "hippo_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    torch.save(small.state_dict(), bundle / "models" / "model.pt")
    model = _fresh()
    load_checkpoint(model, bundle)
    assert _same(model, small)
    empty = tmp_path / "not_a_bundle"
    (empty / "configs").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not_a_bundle.*models/model.pt"):
        load_checkpoint(_fresh(), empty)


def test_mismatch_report_names_keys_and_fitting_preset(tmp_path):
    ddpm = build_model("ddpm-small")
    path = tmp_path / "ddpm.pt"
    torch.save(ddpm.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_fresh(), path)
    msg = str(err.value)
    assert "ddpm.pt" in msg and "unetr-small" in msg
    assert "missing" in msg and "unexpected" in msg
    assert "it fits ddpm-small" in msg
    assert "(+" in msg  # long lists are cut to the first few


def test_shape_mismatch_head_suggests_out_channels_and_skip(tmp_path):
    torch.manual_seed(0)
    multi = build_model("unetr-small", out_channels=5)
    path = tmp_path / "source.pt"
    torch.save(multi.state_dict(), path)
    target = _fresh()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, path)
    msg = str(err.value)
    assert "out.conv.conv.weight [5, 8, 1, 1, 1] vs model [2, 8, 1, 1, 1]" in msg
    assert "unetr-small (out_channels=5)" in msg and "skip_mismatched" in msg
    report = load_checkpoint(target, path, skip_mismatched=True)  # transfer: new head, everything else loaded
    assert report["skipped"] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert torch.equal(target.state_dict()["vit.patch_embedding.patch_embeddings.weight"],
                       multi.state_dict()["vit.patch_embedding.patch_embeddings.weight"])
    assert fitting_presets(multi.state_dict()) == ["unetr-small (out_channels=5)"]


def test_non_strict_partial_load(tmp_path, small):
    sd = {k: v for k, v in small.state_dict().items() if k.startswith("vit.")}
    path = tmp_path / "encoder.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(_fresh(), path)
    report = load_checkpoint(_fresh(), path, strict=False)
    assert report["loaded"] == len(sd) and report["missing"]


def test_unreadable_files(tmp_path, small):
    bad = tmp_path / "cut.pt"
    torch.save(small.state_dict(), tmp_path / "full.pt")
    bad.write_bytes((tmp_path / "full.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cut.pt.*damaged"):
        load_checkpoint(_fresh(), bad)
    with pytest.raises(CheckpointError, match="unsupported"):
        load_checkpoint(_fresh(), tmp_path / "full.onnx") if (tmp_path / "full.onnx").write_bytes(b"x") else None
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(_fresh(), tmp_path / "missing.pt")
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(_fresh(), tmp_path / "meta.pt")


def test_save_and_load_model_round_trip_with_spec(tmp_path):
    torch.manual_seed(3)
    model = build_model("unetr-small", out_channels=3)
    path = tmp_path / "out" / "model.safetensors"
    save_model(model, path, extra={"task": "hippocampus"})
    assert read_spec(path) == {"preset": "unetr-small", "overrides": {"out_channels": 3}}
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp")]
    again = load_model(path)
    assert again.tensorpeft_spec == model.tensorpeft_spec
    assert _same(again, model)
    # a DDPM with a tuple override survives the JSON spec
    ddpm = build_model("ddpm-small", channels=(32, 32, 64))
    save_model(ddpm, tmp_path / "ddpm.safetensors")
    assert _same(load_model(tmp_path / "ddpm.safetensors"), ddpm)


def test_saving_the_same_model_gives_the_same_bytes(tmp_path):
    # safetensors writes its metadata in hash-map order, which changes between calls; a shipped model's SHA-256
    # (and "a recipe reproduces its file") needs the bytes to depend on the weights and metadata alone.
    from safetensors import safe_open

    model = build_model("ddpm-small", channels=(32, 32, 64))
    paths = [tmp_path / f"m{i}.safetensors" for i in range(8)]
    for path in paths:
        save_model(model, path, extra={"recipe": "demo", "steps": 3})
    contents = {path.read_bytes() for path in paths}
    assert len(contents) == 1
    with safe_open(str(paths[0]), "pt") as handle:  # still a valid file with every metadata key
        assert json.loads(handle.metadata()["extra"]) == {"recipe": "demo", "steps": 3}
    assert _same(load_model(paths[0]), model)


def test_load_model_from_preset_or_plain_checkpoint(tmp_path, small):
    assert load_model("ddpm-small").tensorpeft_preset == "ddpm-small"
    torch.save({"state_dict": small.state_dict()}, tmp_path / "plain.pt")
    rebuilt = load_model(tmp_path / "plain.pt")  # no spec, but it fits exactly one preset
    assert rebuilt.tensorpeft_preset == "unetr-small" and _same(rebuilt, small)
    with pytest.raises(CheckpointError, match="neither a model preset"):
        load_model(tmp_path / "nothing.safetensors")


def test_save_model_refuses_models_without_spec_or_with_adapters(tmp_path):
    from conftest import tiny_unetr

    with pytest.raises(CheckpointError, match="no TensorPEFT spec"):
        save_model(tiny_unetr(), tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_model(build_model("ddpm-small"), tmp_path / "x.pt")
