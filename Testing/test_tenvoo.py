"""TenVOO-L / TenVOO-Q (issue 4): paper counts, every rank, both inits, one ΔW per forward, merge/save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers
from TensorPEFTLib.adapters.model import CONFIG_FILE
from TensorPEFTLib.adapters.quanta import QuanTALayer, TENVOO_CHANNEL_TABLE, quanta_parameter_count
from TensorPEFTLib.adapters.tenvoo import TenVOOLayer, tenvoo_parameter_count

from adapter_checks import check_merge_unmerge_save_load, ddpm_out, train_steps
from conftest import ddpm_input, tiny_ddpm

VARIANTS = ["tenvoo-l", "tenvoo-q"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ counts


# Every (Cin, Cout) of a 3×3×3 conv the TenVOO paper adapts on its DDPM, plus a few more sizes of the authors' table.
PAPER_CONV_SHAPES = [(32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
                     (512, 512), (1024, 512), (768, 512), (768, 256), (512, 256), (384, 256), (384, 128),
                     (256, 128), (192, 128), (192, 64), (128, 64), (96, 64), (96, 32), (64, 32), (48, 24), (12, 6)]


@pytest.mark.parametrize("variant", ["l", "q"])
@pytest.mark.parametrize("cin,cout", PAPER_CONV_SHAPES)
def test_layer_counts_equal_paper_formula(variant, cin, cout):
    conv = nn.Conv3d(cin, cout, 3, padding=1)
    for rank in (1, 2, 4):
        layer = TenVOOLayer(conv, tp.AdapterConfig(method=f"tenvoo-{variant}", rank=rank, options={"init": "zero"}),
                            "c", variant)
        adapter = sum(c.numel() for c in layer.cores)
        assert adapter == tenvoo_parameter_count(variant, cin, cout, (3, 3, 3), rank)
    # The formula itself, spelled out for the largest layer at r = 4 (TenVOO-L: 16·(128+128) + 64·(4+4) + 1152).
    if (cin, cout, variant) == (512, 512, "l"):
        assert tenvoo_parameter_count("l", 512, 512, (3, 3, 3), 4) == 16 * 256 + 64 * 8 + 576 + 512 + 64


@pytest.fixture(scope="module")
def paper_ddpm():
    return tp.build_model("ddpm-paper")  # built once (≈ 2-7 s); each count test adapts a deep copy


@pytest.mark.parametrize("method,rank,trainable,without_bias", [
    ("tenvoo-l", 4, 601_024, None),
    ("tenvoo-q", 4, 603_904, 580_736),
    ("lora", 2, 824_192, None),
])
def test_ddpm_paper_counts_match_reference(paper_ddpm, method, rank, trainable, without_bias):
    # Convention (reference.md): adapter + biases of adapted layers + every normalisation parameter (38,464).
    model = copy.deepcopy(paper_ddpm)
    # init "zero" skips computing T(θ₀) on 166M weights; the counts do not depend on the init.
    options = {"init": "zero"} if method.startswith("tenvoo") else {}
    summary = tp.inject(model, tp.AdapterConfig(method=method, rank=rank, options=options))
    assert summary["total"] - summary["adapter"] == 166_669_313
    assert summary["trainable"] == trainable
    norms = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".norm" in n)
    assert norms == 38_464
    if without_bias is not None:
        biases = sum(layer.base_layer.bias.numel() for _, layer in adapter_layers(model))
        assert summary["trainable"] - biases == without_bias
    # 60 convolutions (the middle block's 4 are not adapted), 32 time_emb_proj, 16 to_q/to_v, time_embed.2.
    convs = [n for n, l in adapter_layers(model) if l.is_conv]
    assert len(convs) == 60 and not any("middle_block" in n for n, _ in adapter_layers(model))
    assert len(list(adapter_layers(model))) == 111
    del model


def test_linear_layers_get_quanta_with_the_formula_count():
    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="tenvoo-l", rank=3))
    linear = {n: l for n, l in adapter_layers(model) if isinstance(l.base_layer, nn.Linear)}
    assert linear and all(isinstance(l, QuanTALayer) for l in linear.values())
    assert any(n.endswith("time_embed.2") for n in linear)
    for layer in linear.values():
        base = layer.base_layer
        assert sum(c.numel() for c in layer.cores) == quanta_parameter_count(base.in_features, base.out_features, 3)
    assert all(isinstance(l, TenVOOLayer) for n, l in adapter_layers(model) if n not in linear)


# ------------------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("init", ["frozen-copy", "zero"])
def test_injection_leaves_output_unchanged(method, init):
    model = tiny_ddpm()
    reference = ddpm_out(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp.inject(model, tp.AdapterConfig(method=method, rank=3, options={"init": init}))
    assert (ddpm_out(model) - reference).abs().max().item() <= 1e-5
    # The pretrained weights themselves are untouched (T(θ₀) is a buffer, not folded in).
    for name, p in model.named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in weights:
            assert torch.equal(p, weights[original])
    if init == "zero":
        assert all(not l.cores[-1].any() for _, l in adapter_layers(model))
    else:
        assert all(l.cores[-1].abs().sum() > 0 for _, l in adapter_layers(model))


@pytest.mark.parametrize("variant", ["l", "q"])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_every_rank_trains_including_odd(variant, rank):
    conv = nn.Conv3d(8, 12, 3, padding=1)
    layer = TenVOOLayer(conv, tp.AdapterConfig(method=f"tenvoo-{variant}", rank=rank), "c", variant)
    x = torch.randn(1, 8, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))  # ΔW exactly 0 at start
    assert all(c.shape.count(rank) >= 1 for c in layer.cores)
    layer(x).square().mean().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_delta_is_built_once_per_forward_and_plans_are_shared():
    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="tenvoo-q", rank=2))
    layers = [l for _, l in adapter_layers(model)]
    calls = {"n": 0}
    for layer in layers:
        plan = layer.plan

        class Counting:
            def __init__(self, inner):
                self.inner = inner

            def __call__(self, *cores):
                calls["n"] += 1
                return self.inner(*cores)

        layer.plan = Counting(plan)
    model.train()
    from conftest import ddpm_input

    x, t = ddpm_input()
    model(x, timesteps=t).mean().backward()
    assert calls["n"] == len(layers)
    same = [l for l in layers if isinstance(l, TenVOOLayer) and l.base_layer.weight.shape == (32, 32, 3, 3, 3)]
    assert len(same) >= 2 and all(l.plan.inner is same[0].plan.inner for l in same)


@pytest.mark.parametrize("method", VARIANTS)
def test_merge_unmerge_save_load(method, tmp_path):
    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method=method, rank=3))
    start = ddpm_out(model)
    train_steps(model)
    assert (ddpm_out(model) - start).abs().max().item() > 1e-4  # the adapter moved
    check_merge_unmerge_save_load(model, tmp_path / "adapter")


def test_frozen_copy_is_rebuilt_not_saved_and_checked(tmp_path):
    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="tenvoo-l", rank=2))
    train_steps(model, steps=1)
    folder = tmp_path / "adapter"
    tp.save_adapter(model, folder)
    names = tp.adapters.model.adapter_state_names(model)
    assert not any("theta0" in n for n in names)
    config = json.loads((folder / CONFIG_FILE).read_text())
    some_layer = next(iter(config["layer_meta"]))
    config["layer_meta"][some_layer]["theta0_checksum"] += 1.0
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="frozen copy"):
        tp.load_adapter(tiny_ddpm(), folder)


def test_channel_sizes_and_errors():
    assert TENVOO_CHANNEL_TABLE[512] == (16, 8, 4)
    conv = nn.Conv3d(36, 34, 3)
    with pytest.raises(AdapterError, match="34 channels"):
        TenVOOLayer(conv, tp.AdapterConfig(method="tenvoo-l", rank=2), "odd", "l")
    layer = TenVOOLayer(conv, tp.AdapterConfig(method="tenvoo-l", rank=2, options={"factors": {"34": [17, 2, 1]}}),
                        "odd", "l")
    assert layer.in_factors == (4, 3, 3) and layer.out_factors == (17, 2, 1)
    with pytest.raises(AdapterError, match="grouped"):
        TenVOOLayer(nn.Conv3d(8, 8, 3, groups=2), tp.AdapterConfig(method="tenvoo-l"), "g", "l")


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "quanta"])
def test_frozen_copy_cancels_under_bf16_autocast(method):
    """Under autocast (the engine's default on CUDA) the network is still contracted in float32: ΔW is exactly zero
    at injection and the adapted model's output equals the base model's under the same autocast."""
    model = tiny_ddpm()
    x, t = ddpm_input()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x, timesteps=t).float()
    tp.inject(model, tp.AdapterConfig(method=method, rank=3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(not layer.delta_weight().any() for _, layer in adapter_layers(model))
        adapted = model(x, timesteps=t).float()
    assert (adapted - reference).abs().max().item() <= 1e-5


def test_params_says_how_the_count_relates_to_the_papers(capsys):
    """`tensorpeft params` splits the trainable count (adapter + adapted layers' biases + other) and prints the
    count without the biases: the TenVOO paper's 0.58M for TenVOO-Q r=4 is 580,736, ours 603,904 with them."""
    from TensorPEFTLib.cli import main

    code = main(["params", "--model", "ddpm-paper", "--method", "tenvoo-q", "--rank", "4", "--option", "init=zero"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("counted as: adapter 542,272 + biases of the adapted layers 23,168 (--bias adapted) + other trainable "
            "38,464") in out
    assert "= 603,904 trainable; without those biases 580,736" in out
    assert "paper count: The TenVOO paper's table gives 0.58M for TenVOO-Q" in out
