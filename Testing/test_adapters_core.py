"""The adapter core (issue 2): injection leaves outputs unchanged, only adapters train, merge/unmerge, save/load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers, model_family
from TensorPEFTLib.adapters.model import CONFIG_FILE, WEIGHTS_FILE

from conftest import ddpm_input, tiny_ddpm, tiny_unetr, unetr_input

LAYER_METHODS = ["lora", "pissa", "dora", "loha", "lokr", "ssf"]
# Linear targets on UNETR (its ViT), Conv3d + Linear targets on the DDPM (its resnets, attention, time embedding).
CASES = [("unetr", m) for m in LAYER_METHODS] + [("ddpm", m) for m in LAYER_METHODS]


def build(kind: str):
    return tiny_unetr() if kind == "unetr" else tiny_ddpm()


def run(model: nn.Module, kind: str) -> torch.Tensor:
    if kind == "unetr":
        return model(unetr_input())
    x, t = ddpm_input()
    return model(x, timesteps=t)


def train_steps(model: nn.Module, kind: str, steps: int = 2, lr: float = 1e-2) -> None:
    """A few Adam steps on a fixed random target, so adapters move away from their (zero-update) start."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        out = run(model, kind)
        loss = (out - torch.ones_like(out)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("kind,method", CASES)
def test_injection_leaves_output_unchanged(kind, method):
    model = build(kind)
    with torch.no_grad():
        before = run(model, kind)
    report = tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    assert report["layers_wrapped"] > 0
    with torch.no_grad():
        after = run(model, kind)
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind,method", CASES)
def test_merge_unmerge_and_only_adapters_train(kind, method):
    model = build(kind)
    tp.inject(model, tp.AdapterConfig(method=method, rank=2, trainable=[]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, kind)

    # Frozen weights are bit-identical after training; the adapter moved.
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    deltas = [layer.delta_weight().abs().max().item() for _, layer in adapter_layers(model)]
    assert max(deltas) > 0

    with torch.no_grad():
        unmerged = run(model, kind)
        tp.merge(model)
        merged = run(model, kind)
        tp.unmerge(model)
        restored = run(model, kind)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (restored - unmerged).abs().max().item() <= 1e-5
    for name, p in model.named_parameters():
        if name in frozen:
            assert (p - frozen[name]).abs().max().item() <= 1e-6, name


def test_merged_model_runs_base_layers_only():
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=2))
    train_steps(model, "unetr", steps=1)
    tp.merge(model)
    calls = []
    for _, layer in adapter_layers(model):
        layer.lora_A.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        run(model, "unetr")
    assert calls == []  # no adapter path at inference once merged


@pytest.mark.parametrize("kind,method", [("unetr", "lora"), ("unetr", "lora-pt"), ("unetr", "tcurlora"),
                                         ("unetr", "lotr"), ("unetr", "ssf"), ("unetr", "full"),
                                         ("ddpm", "lokr"), ("ddpm", "tenvoo-l")])
def test_merge_and_unload_leaves_the_base_architecture_with_the_adapted_weights(kind, method):
    """What inference runs: no wrapper, group module or hook left, so the cost is the base model's by construction."""
    model = build(kind)
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    train_steps(model, kind, steps=2)
    with torch.no_grad():
        adapted = run(model, kind)
    assert tp.adapters.merge_and_unload(model) is model
    base = build(kind)
    def layout(m: nn.Module) -> list[tuple[str, str]]:
        return [(n, type(sub).__qualname__) for n, sub in m.named_modules()]

    assert layout(model) == layout(base)
    added = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict())
    # SSF's shift becomes a bias where the base layer had none (qkv); nothing else may appear.
    assert all(k.endswith(".bias") for k in added) and (not added or method == "ssf"), sorted(added)[:3]
    assert not hasattr(model, "tensorpeft") and not model._forward_hooks and not model._forward_pre_hooks
    with torch.no_grad():
        unloaded = run(model, kind)
    assert (unloaded - adapted).abs().max().item() <= 1e-5
    assert (unloaded - adapted).abs().max().item() < (adapted - run(base, kind).detach()).abs().max().item()


@pytest.mark.parametrize("kind,method", CASES + [("unetr", "full")])
def test_save_load_roundtrip(tmp_path, kind, method):
    model = build(kind)
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    train_steps(model, kind, steps=1)
    with torch.no_grad():
        expected = run(model, kind)
    tp.save_adapter(model, tmp_path / "adapter")
    assert set(os.listdir(tmp_path / "adapter")) == {CONFIG_FILE, WEIGHTS_FILE}

    fresh = build(kind)
    tp.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = run(fresh, kind)
    assert torch.allclose(got, expected, atol=1e-6)


def test_saved_adapter_holds_only_adapter_and_requested_extras(tmp_path):
    from safetensors.torch import load_file

    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=2, trainable=[r"^out\."]))
    tp.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_FILE))
    assert keys and all(".lora_" in k or k.startswith("out.") for k in keys)
    assert any(k.startswith("out.") for k in keys)
    assert not any("base_layer" in k for k in keys)


def test_load_refuses_other_architecture(tmp_path):
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=2))
    tp.save_adapter(model, tmp_path)
    other = tiny_unetr(hidden=64)
    with pytest.raises(AdapterError, match=r"trained on DepthUNETR .*947,842 parameters.*but this model is DepthUNETR .*1,122,866"):
        tp.load_adapter(other, tmp_path)
    with pytest.raises(AdapterError, match="but this model is DiffusionModelUNet"):
        tp.load_adapter(tiny_ddpm(), tmp_path)


def test_pissa_residual_plus_principal_reproduces_weight():
    model = tiny_ddpm()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))}
    tp.inject(model, tp.AdapterConfig(method="pissa", rank=3))
    checked = 0
    for name, layer in adapter_layers(model):
        rebuilt = layer.base_layer.weight + layer.delta_weight()
        rel = (rebuilt - originals[name]).norm() / originals[name].norm()
        assert rel.item() <= 1e-6, name
        # the principal part is the best rank-r approximation: its singular values are the weight's top r
        w = originals[name].reshape(originals[name].shape[0], -1)
        top = torch.linalg.svdvals(w)[:3]
        got = torch.linalg.svdvals(layer.delta_weight().reshape(w.shape))[:3]
        assert torch.allclose(got, top, rtol=1e-4)
        checked += 1
    assert checked > 0


def test_dora_magnitude_starts_at_the_weight_norm_per_output_channel():
    model = tiny_ddpm()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))}
    tp.inject(model, tp.AdapterConfig(method="dora", rank=2, trainable=[]))
    kinds = set()
    for name, layer in adapter_layers(model):
        w = originals[name]
        norm = w.reshape(w.shape[0], -1).norm(dim=1)
        m = layer.lora_magnitude_vector
        # peft's shapes: (out,) on Linear, (1, out, 1, 1, 1) on Conv3d
        assert m.shape == ((w.shape[0],) if w.dim() == 2 else (1, w.shape[0], 1, 1, 1)), name
        assert torch.allclose(m.reshape(-1), norm, rtol=1e-6) and m.requires_grad
        assert layer.delta_weight().abs().max().item() <= 1e-6  # m = ||W|| and B = 0: no update yet
        kinds.add(w.dim())
    assert kinds == {2, 5}
    counts = tp.count_parameters(model)
    lora = tiny_ddpm()
    tp.inject(lora, tp.AdapterConfig(method="lora", rank=2, trainable=[]))
    outs = sum(layer.out_dim for _, layer in adapter_layers(model))
    assert counts["adapter"] == tp.count_parameters(lora)["adapter"] + outs


def test_dora_channel_with_zero_weights_stays_finite_and_unmerges_exactly():
    """MONAI zero-initialises some DDPM convolutions: a zero row has norm 0 (and m = 0), which peft turns into NaN.
    Here its scale is 0, the output is unchanged, and unmerge gives the row back although merge zeroed it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1))
    with torch.no_grad():
        net[0].weight[1].zero_()
    x = torch.randn(2, 3, 5, 5, 5)
    before = net(x).detach()
    tp.inject(net, tp.AdapterConfig(method="dora", rank=2, targets=["0"], trainable=[]))
    assert torch.equal(net(x).detach(), before)
    layer = net[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    weights = layer.base_layer.weight.detach().clone()
    unmerged = net(x).detach()
    assert torch.isfinite(unmerged).all()
    tp.merge(net)
    assert (net(x) - unmerged).abs().max().item() <= 1e-5
    tp.unmerge(net)
    assert torch.equal(layer.base_layer.weight[1], weights[1])
    assert (layer.base_layer.weight - weights).abs().max().item() <= 1e-6


def test_defaults_follow_the_model_family():
    unetr, ddpm = tiny_unetr(), tiny_ddpm()
    assert model_family(unetr) == "unetr" and model_family(ddpm) == "ddpm"
    tp.inject(unetr, tp.AdapterConfig(method="lora", rank=1))
    wrapped = [n for n, _ in adapter_layers(unetr)]
    assert len(wrapped) == 4 * 4 and all(n.startswith("vit.blocks.") for n in wrapped)
    trainable = {n for n, p in unetr.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable and all(n.startswith(("decoder", "out.")) for n in trainable)
    assert any(n.startswith("decoder5.") for n in trainable) and not any(n.startswith("encoder") for n in trainable)

    tp.inject(ddpm, tp.AdapterConfig(method="lora", rank=1))
    wrapped = [n for n, _ in adapter_layers(ddpm)]
    assert "conv_in.conv" not in wrapped and "out.2.conv" not in wrapped  # single-channel convolutions skipped
    assert any(n.endswith("conv1.conv") for n in wrapped)


def test_trainable_empty_means_adapter_only_and_bias_modes():
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1, trainable=[]))
    counts = tp.count_parameters(model)
    assert counts["trainable"] == counts["adapter"] > 0

    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1, trainable=[], bias="adapted"))
    counts = tp.count_parameters(model)
    adapted_bias = sum(layer.base_layer.bias.numel() for _, layer in adapter_layers(model) if layer.base_layer.bias is not None)
    assert counts["trainable"] == counts["adapter"] + adapted_bias

    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1, trainable=[], bias="all"))
    all_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert tp.count_parameters(model)["trainable"] == tp.count_parameters(model)["adapter"] + all_bias


def test_alpha_scales_the_update_and_dropout_only_in_training():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    tp.inject(base, tp.AdapterConfig(method="lora", rank=2, targets=["0"], alpha=4, dropout=0.5, trainable=[]))
    layer = base[0]
    assert layer.scaling == 2.0
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    delta = layer.delta_weight()
    expected = 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    assert torch.allclose(delta, expected)
    layer.eval()
    assert torch.allclose(base(x), x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias, atol=1e-6)
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(base(x), x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias, atol=1e-4)


def test_lora_on_strided_dilated_conv_matches_weight_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 6, 3, stride=2, padding=2, dilation=2))
    tp.inject(net, tp.AdapterConfig(method="lora", rank=2, targets=["0"], trainable=[]))
    layer = net[0]
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 4, 9, 9, 9)
    ref = nn.functional.conv3d(x, layer.base_layer.weight + layer.delta_weight(), layer.base_layer.bias,
                               stride=2, padding=2, dilation=2)
    assert torch.allclose(net(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_method():
    with pytest.raises(AdapterError, match="unknown method 'lorax'; choose one of: .*lora"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lorax"))


@pytest.mark.parametrize("rank", [0, -3, 1.5, "two"])
def test_rank_below_one_or_not_integer(rank):
    with pytest.raises(AdapterError, match="rank must be"):
        tp.AdapterConfig(method="lora", rank=rank)


def test_rank_larger_than_layer_allows():
    with pytest.raises(AdapterError, match="rank 500 is too large for lora on .*allows at most"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora", rank=500))


def test_targets_matching_nothing_lists_existing_layers():
    with pytest.raises(AdapterError, match=r"match no .* layer of this model; layers it has: .*vit\.patch_embedding"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora", rank=1, targets=["no_such_layer"]))


def test_invalid_target_regex_and_unknown_option():
    with pytest.raises(AdapterError, match="not a valid regular expression"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora", rank=1, targets=["vit.(blocks"]))
    with pytest.raises(AdapterError, match="method lora has no option"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora", rank=1, options={"bogus": 1}))


def test_config_file_not_valid_json(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text('{"method": "lora", "rank": 2,')
    with pytest.raises(AdapterError, match=r"cfg.json: not valid JSON"):
        tp.AdapterConfig.from_json(bad)
    bad.write_text(json.dumps({"method": "lora", "rnak": 2}))
    with pytest.raises(AdapterError, match="unknown setting"):
        tp.AdapterConfig.from_json(bad)


def test_adapter_folder_with_broken_config(tmp_path):
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1))
    tp.save_adapter(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text("not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        tp.load_adapter(tiny_unetr(), tmp_path)


def test_double_injection_refused():
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1))
    with pytest.raises(AdapterError, match="already carries an adapter"):
        tp.inject(model, tp.AdapterConfig(method="lora", rank=1))


def test_grouped_conv_refused_clearly():
    net = nn.Sequential(nn.Conv3d(4, 4, 3, groups=2))
    with pytest.raises(AdapterError, match="grouped convolutions"):
        tp.inject(net, tp.AdapterConfig(method="lora", rank=1, targets=["0"]))


@pytest.mark.parametrize("kind,method", [("unetr", m) for m in ("full", "lora", "pissa", "dora", "loha", "lokr", "ssf", "lora-pt",
                                                                  "tcurlora", "lotr")]
                         + [("ddpm", m) for m in ("tenvoo-l", "tenvoo-q", "quanta", "selora")])
def test_same_seed_and_two_threads_give_identical_adapter_bytes(tmp_path, kind, method):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    blobs = []
    try:
        for run_index in range(2):
            torch.manual_seed(0)
            model = build(kind)
            tp.inject(model, tp.AdapterConfig(method=method, rank=2))
            train_steps(model, kind, steps=2)
            folder = tmp_path / f"run{run_index}"
            tp.save_adapter(model, folder)
            blobs.append((folder / WEIGHTS_FILE).read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert blobs[0] == blobs[1]
