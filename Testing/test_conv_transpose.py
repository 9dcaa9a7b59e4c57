"""Adapters on transposed convolutions (issue 19, item 5): ConvTranspose1d/2d/3d under LoRA, PiSSA, LoHa and LoKr
(and SSF, DoRA), with stride, padding, output padding and dilation that are not 1/0; and UNETR's up-samplers as a
target set.

A transposed convolution stores its weight as (in, out, *kernel): the tests check the update against
``F.conv_transpose*`` with W + ΔW, against the same factors on an ordinary convolution (so ΔW is built as
(out, in, *kernel) and laid out the transposed way), and merge/unmerge after real optimiser steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers

from conftest import tiny_unetr, unetr_input

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
ISSUE_METHODS = ["lora", "pissa", "loha", "lokr"]
METHODS = ISSUE_METHODS + ["dora", "ssf"]
CASES = [(nd, m) for nd in TRANSPOSED for m in METHODS]


def make_net(nd: int) -> nn.Sequential:
    """Two transposed convolutions with every geometry argument away from its default (output_padding must stay
    below max(stride, dilation))."""
    torch.manual_seed(0)
    cls = TRANSPOSED[nd]
    return nn.Sequential(
        cls(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2),
        nn.GELU(),
        cls(6, 5, 2, stride=3, padding=2, output_padding=2, dilation=1, bias=False),
    ).eval()


def make_input(nd: int, batch: int = 2) -> torch.Tensor:
    spatial = (7, 6, 5)[:nd]
    return torch.randn(batch, 4, *spatial, generator=torch.Generator().manual_seed(1))


def train_steps(net: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Adam steps towards a fixed target, so every factor (LoHa's and LoKr's zero halves too) moves."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=5e-2)
    target = torch.randn(net(x).shape, generator=torch.Generator().manual_seed(4))
    net.train()
    for _ in range(steps):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The base layer's transposed convolution with W + ΔW, computed by torch's own function."""
    base = layer.base_layer
    bias = base.bias
    if layer.delta_bias() is not None:
        bias = layer.delta_bias() if bias is None else bias + layer.delta_bias()
    return CONV_TRANSPOSE_FN[len(base.kernel_size)](x, base.weight + layer.delta_weight(), bias, base.stride,
                                                    base.padding, base.output_padding, base.groups, base.dilation)


@pytest.mark.parametrize("nd,method", CASES)
def test_injection_leaves_output_unchanged(nd, method):
    net, x = make_net(nd), make_input(nd)
    with torch.no_grad():
        before = net(x)
    report = tp.inject(net, tp.AdapterConfig(method=method, rank=2, targets=["0", "2"], trainable=[]))
    assert report["layers_wrapped"] == 2
    assert all(isinstance(layer.base_layer, TRANSPOSED[nd]) for _, layer in adapter_layers(net))
    with torch.no_grad():
        assert (net(x) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("nd,method", CASES)
def test_trained_adapter_is_the_transposed_convolution_with_w_plus_delta(nd, method):
    net, x = make_net(nd), make_input(nd)
    tp.inject(net, tp.AdapterConfig(method=method, rank=2, targets=["0", "2"], trainable=[]))
    train_steps(net, x)
    with torch.no_grad():
        for _, layer in adapter_layers(net):
            h = torch.randn(2, layer.base_layer.in_channels, *x.shape[2:], generator=torch.Generator().manual_seed(6))
            assert layer.delta_weight().abs().max().item() > 0  # trained away from the start
            assert (layer(h) - reference(layer, h)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("nd,method", CASES)
def test_merge_matches_unmerged_and_unmerge_restores_weights(nd, method):
    net, x = make_net(nd), make_input(nd)
    tp.inject(net, tp.AdapterConfig(method=method, rank=2, targets=["0", "2"], trainable=[]))
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    train_steps(net, x)
    for name, p in net.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # training moved the adapter only
    with torch.no_grad():
        unmerged = net(x)
        tp.merge(net)
        merged = net(x)
        tp.unmerge(net)
        restored = net(x)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (restored - unmerged).abs().max().item() <= 1e-5
    for name, p in net.named_parameters():
        if name in frozen:
            assert (p - frozen[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("method", ISSUE_METHODS)
def test_update_is_built_out_in_and_laid_out_as_in_out(method):
    """The same factors on a ConvTranspose3d and on a Conv3d of the same (in, out, kernel) give one ΔW, up to the
    swap of the weight's first two axes: the factorisation is over (out, in · kernel) in both."""
    torch.manual_seed(0)
    transposed = nn.Sequential(nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1))
    conv = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1))
    for net in (transposed, conv):
        tp.inject(net, tp.AdapterConfig(method=method, rank=2, alpha=3, targets=["0"], trainable=[]))
    t_layer, c_layer = transposed[0], conv[0]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for (t_name, t_param), (c_name, c_param) in zip(t_layer.named_parameters(), c_layer.named_parameters()):
            assert t_name == c_name
            if t_name.startswith("base_layer"):
                continue
            values = torch.randn(t_param.shape, generator=gen)
            t_param.copy_(values)
            # only LoRA's A differs in storage: a transposed convolution to r channels stores (in, r, *kernel)
            c_param.copy_(values.transpose(0, 1) if t_name == "lora_A.weight" else values)
    assert t_layer.delta_weight().shape == t_layer.base_layer.weight.shape == (4, 6, 3, 3, 3)
    assert torch.allclose(t_layer.delta_weight().transpose(0, 1), c_layer.delta_weight(), atol=1e-6)


def test_pissa_on_transposed_conv_splits_the_out_in_matrix():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose3d(8, 6, 2, stride=2))
    original = net[0].weight.detach().clone()
    tp.inject(net, tp.AdapterConfig(method="pissa", rank=3, targets=["0"]))
    layer = net[0]
    assert (layer.base_layer.weight + layer.delta_weight() - original).abs().max().item() <= 1e-6
    matrix = original.transpose(0, 1).reshape(6, -1)  # (out, in · kernel)
    got = torch.linalg.svdvals(layer.delta_weight().transpose(0, 1).reshape(6, -1))[:3]
    assert torch.allclose(got, torch.linalg.svdvals(matrix)[:3], rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "loha", "ssf", "dora"])
def test_output_size_argument_reaches_the_adapter(method):
    """ConvTranspose's forward(x, output_size) picks the output padding; the adapted layer honours it too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1))
    tp.inject(net, tp.AdapterConfig(method=method, rank=2, targets=["0"], trainable=[]))
    train_steps(net, make_input(3), steps=1)
    layer = net[0]
    x = make_input(3)
    with torch.no_grad():
        out = layer(x, output_size=[14, 12, 10])  # 13, 11, 9 without output padding
        assert out.shape[2:] == (14, 12, 10)
        base = layer.base_layer
        bias = base.bias if layer.delta_bias() is None else base.bias + layer.delta_bias()
        ref = F.conv_transpose3d(x, base.weight + layer.delta_weight(), bias, base.stride, base.padding, 1)
        assert (out - ref).abs().max().item() <= 1e-5


def test_grouped_transposed_conv_refused_clearly():
    net = nn.Sequential(nn.ConvTranspose3d(4, 4, 2, groups=2))
    for method in ISSUE_METHODS:
        with pytest.raises(AdapterError, match=r"grouped transposed convolutions \(groups=2\) cannot be adapted"):
            tp.inject(net, tp.AdapterConfig(method=method, rank=1, targets=["0"]))


def test_methods_without_transposed_support_say_so():
    net = nn.Sequential(nn.ConvTranspose3d(4, 4, 2))
    with pytest.raises(AdapterError, match=r"method selora adapts Linear/Conv1d/2d/3d layers only.*"
                                           r"0 \(ConvTranspose3d\)"):
        tp.inject(net, tp.AdapterConfig(method="selora", rank=1, targets=["0"]))


def test_default_targets_never_reach_transposed_convs():
    """The generic family's default (every layer) stays what it was: Linear and ConvNd, no ConvTransposeNd."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.ConvTranspose3d(4, 4, 2, stride=2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 2, 5, 5, 5))
    tp.inject(net, tp.AdapterConfig(method="lora", rank=1))
    assert [n for n, _ in adapter_layers(net)] == ["0", "3"]


# ----------------------------------------------------------------------------------------------- UNETR up-samplers

DECODER_UPSAMPLERS = [f"decoder{i}.transp_conv.conv" for i in (5, 4, 3, 2)]


def test_unetr_decoder_upsamplers_target_set_adapts_its_conv_transpose3d(tmp_path):
    model = tiny_unetr()
    x = unetr_input()
    with torch.no_grad():
        before = model(x)
    tp.inject(model, tp.AdapterConfig(method="lora", rank=2, targets=["@decoder-upsamplers"], trainable=[]))
    layers = dict(adapter_layers(model))
    assert sorted(layers) == sorted(DECODER_UPSAMPLERS)
    assert all(isinstance(layer.base_layer, nn.ConvTranspose3d) for layer in layers.values())
    counts = tp.count_parameters(model)
    expected = sum(2 * (layer.in_dim * 8 + layer.out_dim) for layer in layers.values())  # kernel 2³
    assert counts["adapter"] == counts["trainable"] == expected
    with torch.no_grad():
        assert (model(x) - before).abs().max().item() <= 1e-5

    # The up-samplers' adapters train, change the segmentation output, merge and survive save/load.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
        assert (trained - before).abs().max().item() > 1e-4
        tp.merge(model)
        assert (model(x) - trained).abs().max().item() <= 1e-5
        tp.unmerge(model)
    tp.save_adapter(model, tmp_path)
    fresh = tiny_unetr()
    tp.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(x), trained, atol=1e-6)


def test_defaults_plus_decoder_upsamplers_and_the_decoder_still_training():
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=1, targets=["@defaults", "@decoder-upsamplers"]))
    names = [n for n, _ in adapter_layers(model)]
    assert len(names) == 4 * 4 + 4 and set(DECODER_UPSAMPLERS) <= set(names)
    assert sum(n.startswith("vit.blocks.") for n in names) == 16
    # The default trainable decoder path trains, but an adapted layer's own weight does not: its adapter does.
    params = dict(model.named_parameters())
    assert params["decoder2.conv_block.conv1.conv.weight"].requires_grad
    for name in DECODER_UPSAMPLERS:
        assert not params[f"{name}.base_layer.weight"].requires_grad
        assert params[f"{name}.lora_A.weight"].requires_grad


def test_all_upsamplers_set_and_unknown_set():
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="loha", rank=1, targets=["@upsamplers"], trainable=[]))
    expected = [n for n, m in tiny_unetr().named_modules() if isinstance(m, nn.ConvTranspose3d)]
    assert sorted(n for n, _ in adapter_layers(model)) == sorted(expected) and len(expected) == 10
    with pytest.raises(AdapterError, match=r"target set '@decoder' is not defined for a unetr model; its sets: "
                                           r"@defaults, @decoder-upsamplers, @upsamplers"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora", rank=1, targets=["@decoder"]))
    with pytest.raises(AdapterError, match="not defined for a generic model; its sets: @defaults"):
        tp.inject(nn.Sequential(nn.Linear(4, 4)), tp.AdapterConfig(method="lora", rank=1, targets=["@decoder-upsamplers"]))
    with pytest.raises(AdapterError, match=r"lora-pt adapts Linear layers only.*decoder5\.transp_conv\.conv"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lora-pt", rank=1, targets=["@defaults", "@decoder-upsamplers"]))


def test_params_command_counts_the_decoder_upsamplers(capsys):
    import json

    from TensorPEFTLib.cli import main

    code = main(["params", "--model", "unetr-small", "--method", "lora", "--rank", "2", "--targets",
                 "@decoder-upsamplers", "--adapter-only", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["layers_wrapped"] == 4
    from TensorPEFTLib.models import build_model

    model = build_model("unetr-small")
    convs = [model.get_submodule(name) for name in DECODER_UPSAMPLERS]
    assert report["adapter"] == report["trainable"] == sum(2 * (c.in_channels * 8 + c.out_channels) for c in convs)


def test_adapter_saved_before_transposed_convs_were_adaptable_still_loads(tmp_path):
    """An adapter keeps the layers it wrapped: a file written when a pattern such as ``decoder2\\..*\\.conv`` reached
    only the Conv3d layers loads onto those alone, though the pattern now also reaches decoder2's ConvTranspose3d."""
    import json

    from safetensors.torch import load_file, save_file

    model = tiny_unetr()
    x = unetr_input()
    tp.inject(model, tp.AdapterConfig(method="lora", rank=2, targets=[r"decoder2\..*\.conv"], trainable=[]))
    layers = dict(adapter_layers(model))
    assert "decoder2.transp_conv.conv" in layers and len(layers) > 1
    with torch.no_grad():
        for name, layer in layers.items():
            if name != "decoder2.transp_conv.conv":
                layer.lora_B.weight.normal_(0, 0.1)
        expected = model(x)
    tp.save_adapter(model, tmp_path)
    # rewrite the files as the earlier version wrote them: no transposed layer in "layers" nor in the tensors
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["layers"] = [n for n in config["layers"] if n != "decoder2.transp_conv.conv"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(tmp_path / "adapter.safetensors").items() if "transp_conv" not in k}
    save_file(tensors, tmp_path / "adapter.safetensors")

    fresh = tiny_unetr()
    tp.load_adapter(fresh, tmp_path)
    assert sorted(n for n, _ in adapter_layers(fresh)) == sorted(config["layers"])
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-6)
