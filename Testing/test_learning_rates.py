"""Per-method default learning rates per model family: the table, what finetune uses and records, the Slicer panel's
"auto" value, and the measurement behind the DDPM rates (benchmarks/lr_ddpm.py) in small."""

from __future__ import annotations

import json

import pytest
import torch

from TensorPEFTLib.adapters import method_names
from TensorPEFTLib.adapters.catalog import DEFAULT_LR, default_lr
from TensorPEFTLib.cli import main

import synthetic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_unetr_keeps_1e3_and_the_tensor_network_methods_get_far_less_on_a_ddpm():
    # every UNETR method as before (the demo's segmentation results rest on 1e-3)
    assert {default_lr(m, "unetr") for m in method_names()} == {1e-3}
    for method in ("tenvoo-l", "tenvoo-q"):
        assert default_lr(method, "ddpm") <= 1e-5
    # at 1e-4 LoRA, LoHa, LoKr, SeLoRA and QuanTA left the 8-channel demo-ldm's samples where they were in 300 steps
    # (benchmarks/results/ldm_methods_lr_cpu_2026-12-03.md); at 1e-3 QuanTA's dW/W is TenVOO-L's at 1e-5
    for method in ("quanta", "lora", "loha", "lokr", "selora", "pissa"):
        assert default_lr(method, "ddpm") == 1e-3, method
    assert default_lr("full", "ddpm") == 5e-5
    assert default_lr("TenVOO-L", "ddpm") == default_lr("tenvoo-l", "ddpm")
    assert default_lr("lora", "no-such-family") == DEFAULT_LR["generic"]["*"]
    # the engine's name for it takes a family or a task
    from TensorPEFTLib.engine.jobs import default_lr as engine_default

    assert engine_default("synthesis", "tenvoo-l") == engine_default("ddpm", "tenvoo-l") == 1e-5
    assert engine_default("segmentation", "lora-pt") == 1e-3


def test_methods_listing_shows_the_rates(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tenvoo-q"]["lr_ddpm"] == 1e-5 and rows["lora-pt"]["lr_unetr"] == 1e-3
    assert main(["methods", "-v"]) == 0
    assert "lr DDPM" in capsys.readouterr().out


def test_panel_auto_value_is_the_cli_default_and_passes_no_lr(tmp_path):
    from TensorPEFTLib.frontend import requests

    assert requests.default_learning_rate("DDPM", "tenvoo-l") == default_lr("tenvoo-l", "ddpm")
    assert requests.default_learning_rate("UNETR", "tenvoo-l") == 1e-3
    data = tmp_path / "data"
    data.mkdir()
    auto = requests.FinetuneRequest(modelKind="DDPM", dataFolder=str(data), adapterFolder=str(tmp_path / "a"),
                                    method="tenvoo-l")
    assert "--lr" not in auto.asArgList()  # finetune then takes the method's default
    given = requests.FinetuneRequest(modelKind="DDPM", dataFolder=str(data), adapterFolder=str(tmp_path / "a"),
                                     method="tenvoo-l", learningRate=3e-4)
    args = given.asArgList()
    assert args[args.index("--lr") + 1] == "0.0003"
    source = open(requests.__file__.replace("TensorPEFTLib/frontend/requests.py", "TensorPEFT/TensorPEFT.py")).read()
    assert "requests.default_learning_rate(p.modelKind, p.method)" in source  # the panel shows that value as "auto (...)"


@pytest.mark.parametrize("lr, expected", [(None, 1e-5), (3e-4, 3e-4)])
def test_finetune_records_the_rate_it_used(tmp_path, capsys, lr, expected):
    model = synthetic.save_tiny_model(str(tmp_path / "ddpm.safetensors"), kind="ddpm")
    data = synthetic.write_volume_dataset(str(tmp_path / "data"), n=2, shape=(16, 16, 16))
    argv = ["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "run"), "--method", "tenvoo-l",
            "--rank", "2", "--steps", "1", "--patch-size", "16", "--device", "cpu", "--threads", "1", "-q"]
    assert main(argv + (["--lr", str(lr)] if lr else [])) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["train_lr"] == expected


def test_default_rate_keeps_tenvoo_l_weight_change_small_on_the_shipped_ddpm(tmp_path):
    """benchmarks/lr_ddpm.py in small: 3 finetune steps of the shipped diffusion model (demo-ldm's latent U-Net) at
    16³. At 1e-3 TenVOO-L's ΔW exceeds the largest weight of its layer; at its default it stays a small fraction of it."""
    from TensorPEFTLib.adapters import AdapterConfig, load_adapter, merge_and_unload
    from TensorPEFTLib.engine import Events, TrainSettings, finetune
    from TensorPEFTLib.engine.jobs import resolve_model

    data = synthetic.write_volume_dataset(str(tmp_path / "data"), n=2, shape=(20, 20, 20))
    base = {k: v.float() for k, v in resolve_model("demo-ldm").state_dict().items() if v.ndim >= 2}
    ratios = {}
    for lr in (1e-3, default_lr("tenvoo-l", "ddpm")):
        out = str(tmp_path / f"run{lr:g}")
        finetune("demo-ldm", data, out, AdapterConfig(method="tenvoo-l", rank=4),
                 TrainSettings(steps=3, lr=lr, eval_every=3, checkpoint_every=3), patch_size=(16, 16, 16),
                 device="cpu", threads=1, events=Events(quiet=True), auto_val=False,
                 align="off")  # synthetic volumes, not brains: nothing to register
        model = resolve_model("demo-ldm")
        load_adapter(model, out)
        merge_and_unload(model)
        ratios[lr] = max(float((v.float() - base[k]).abs().max() / base[k].abs().max())
                         for k, v in model.state_dict().items() if k in base)
    assert ratios[1e-3] > 1.0, ratios
    assert ratios[default_lr("tenvoo-l", "ddpm")] < 0.3, ratios
