"""LoCon's down-projection as one matrix product over the kernel taps (adapters/thin_conv.py): the convolution's
result and gradients for every geometry it is used for, and the same LoRA layer with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import thin_conv
from TensorPEFTLib.adapters.thin_conv import add_channel_mix, prefers_tap_matmul, tap_matmul_conv

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    (3, 1, 1, 1, 7),  # the DDPM's resnet convolutions
    (3, 2, 1, 1, 8),  # its down-samplers (the rule leaves them to the convolution, the function still handles them)
    (3, 2, 1, 1, 7),  # odd size: the last window clipped
    (1, 1, 0, 1, 5),  # pointwise
    (3, 1, 0, 1, 6),  # no padding
    (4, 2, 1, 1, 9),  # even kernel
    (3, 1, 2, 2, 6),  # dilated
    (2, 3, 0, 1, 10),  # stride above the kernel: input positions skipped
    (5, 2, 3, 1, 6),  # padding above half the kernel: taps that only ever see padding
])
def test_tap_matmul_conv_is_the_convolution_with_its_gradients(dims, kernel, stride, padding, dilation, size):
    gen = torch.Generator().manual_seed(dims * 100 + kernel)
    x = torch.randn(2, 5, *([size] * dims), dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 5, *([kernel] * dims), dtype=torch.float64, generator=gen, requires_grad=True)
    geometry = ((stride,) * dims, (padding,) * dims, (dilation,) * dims)
    reference = CONV[dims](x, w, None, *geometry)
    ours = tap_matmul_conv(x, w, *geometry)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    grad = torch.randn(reference.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(reference, (x, w), grad), torch.autograd.grad(ours, (x, w), grad)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_add_channel_mix_is_a_pointwise_convolution_plus_the_base():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64, generator=gen)
    hidden = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64, generator=gen)
    mix = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    expected = base + 0.5 * F.conv3d(hidden, mix.reshape(6, 2, 1, 1, 1))
    torch.testing.assert_close(add_channel_mix(base, mix, hidden, 0.5), expected, rtol=0, atol=1e-12)


def _conv(cin: int, cout: int, stride: int = 1, **kwargs) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, **kwargs)


def test_the_matrix_form_is_taken_where_it_was_measured_to_pay():
    small, large = torch.zeros(1, 32, 16, 16, 16), torch.zeros(1, 32, 32, 32, 32)
    assert prefers_tap_matmul(_conv(32, 2), large)  # r = 2: 54 tap channels against 32 inputs
    assert not prefers_tap_matmul(_conv(32, 8), large)  # r = 8 on a large volume: the convolution is faster
    assert prefers_tap_matmul(_conv(32, 8), small)  # ... but not on a small one
    assert not prefers_tap_matmul(_conv(32, 2, stride=2), large)  # strided: the convolution
    assert not prefers_tap_matmul(_conv(32, 2, padding_mode="reflect"), large)  # only zero padding is a clip
    assert not prefers_tap_matmul(nn.Conv3d(32, 2, 3, padding="same"), large)


@pytest.mark.parametrize("method", ["lora", "pissa", "dora"])
def test_locon_trains_the_same_with_and_without_the_matrix_form(method, monkeypatch):
    """Two copies of a small conv net, one per path: outputs, input gradients and every adapter gradient agree to
    float64 rounding over a few optimiser steps, so the faster path changes nothing a user could see."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(_conv(4, 8), nn.SiLU(), _conv(8, 8), nn.SiLU(), _conv(8, 3, stride=2)).double()
        tp.inject(model, tp.AdapterConfig(method=method, rank=2, targets=["0", "2", "4"], seed=3))
        with torch.no_grad():  # B starts at zero: give it values so that A's gradient is not zero either
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        return model

    models = {True: net(), False: net()}
    optimisers = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for k, m in models.items()}
    x = torch.randn(2, 4, 8, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        grads = {}
        for enabled, model in models.items():
            monkeypatch.setattr(thin_conv, "ENABLED", enabled)
            used = []
            monkeypatch.setattr(thin_conv._TapMatmulConv, "apply",
                                staticmethod(lambda *a, _f=thin_conv._TapMatmulConv.apply: used.append(1) or _f(*a)))
            inp = x.clone().requires_grad_()
            out = model(inp)
            out.square().mean().backward()
            assert bool(used) == enabled  # the unstrided layers took the matrix form only when it is on
            grads[enabled] = (out.detach(), inp.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.requires_grad})
            optimisers[enabled].step()
            optimisers[enabled].zero_grad()
        (out_a, gx_a, g_a), (out_b, gx_b, g_b) = grads[True], grads[False]
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-12)
        torch.testing.assert_close(gx_a, gx_b, rtol=0, atol=1e-12)
        assert g_a.keys() == g_b.keys() and any("lora_A" in n for n in g_a)
        for name in g_a:
            torch.testing.assert_close(g_a[name], g_b[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("dims, stride, padding", [(3, 1, 1), (2, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_locon_with_one_input_gradient_is_base_plus_adapter(dims, stride, padding):
    """thin_conv.locon_conv (forward with W + ΔW, one input gradient) against the plain sum base(x) + s·B(A x): the
    output and the gradients of the input, the trainable bias and both factors, to float64 rounding."""
    gen = torch.Generator().manual_seed(4)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](5, 6, 3, stride=stride, padding=padding).double()
    conv.weight.requires_grad_(False)  # frozen, as under an adapter; its bias trains (the DDPM recipe)
    down = torch.randn(2, 5, *[3] * dims, dtype=torch.float64, generator=gen, requires_grad=True)
    mix = torch.randn(6, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, *[7] * dims, dtype=torch.float64, generator=gen)
    target = torch.randn_like(conv(x))
    grads = []
    for merged in (True, False):
        inp = x.clone().requires_grad_()
        if merged:
            out = thin_conv.locon_conv(inp, conv, down, mix, 0.75)
        else:
            hidden = CONV[dims](inp, down, None, conv.stride, conv.padding, conv.dilation)
            out = conv(inp) + 0.75 * CONV[dims](hidden, mix.reshape(6, 2, *[1] * dims))
        (out * target).sum().backward()
        grads.append([out.detach(), inp.grad, conv.bias.grad.clone(), down.grad.clone(), mix.grad.clone()])
        for t in (conv.bias, down, mix):
            t.grad = None
    for got, want, name in zip(*grads, ["output", "input", "bias", "down", "mix"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


def test_one_input_gradient_is_taken_where_it_was_measured_to_pay():
    conv = _conv(32, 64)
    conv.weight.requires_grad_(False)
    large, small = torch.zeros(1, 32, 24, 24, 24), torch.zeros(1, 32, 16, 16, 16)
    assert thin_conv.prefers_merged_input_grad(conv, large)
    assert not thin_conv.prefers_merged_input_grad(conv, small)  # there W + ΔW costs more than it saves
    with torch.no_grad():
        assert not thin_conv.prefers_merged_input_grad(conv, large)  # inference: the plain sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not thin_conv.prefers_merged_input_grad(conv, large)  # ΔW would round into W's bf16 grid
    assert not thin_conv.prefers_merged_input_grad(conv, large.double())
    conv.weight.requires_grad_(True)
    assert not thin_conv.prefers_merged_input_grad(conv, large)  # W trains too: it needs its own gradient


def test_lora_trains_the_same_with_one_input_gradient(monkeypatch):
    """A float32 LoRA layer on a volume large enough for the merged path: the same outputs and gradients (float32
    rounding) with it on and off, and it was taken when on."""
    def layer() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(_conv(32, 16))  # 32 inputs: the thin product applies at r = 2
        tp.inject(model, tp.AdapterConfig(method="lora", rank=2, targets=["0"], seed=1))
        with torch.no_grad():
            model[0].lora_B.weight.normal_(generator=torch.Generator().manual_seed(5))
        return model

    x = torch.randn(1, 32, 20, 20, 20, generator=torch.Generator().manual_seed(6))
    results = {}
    for merged in (True, False):
        monkeypatch.setattr(thin_conv, "MERGED_INPUT_GRAD", merged)
        used = []
        monkeypatch.setattr(thin_conv._MergedInputGradLoCon, "apply", staticmethod(
            lambda *a, _f=thin_conv._MergedInputGradLoCon.apply: used.append(1) or _f(*a)))
        model, inp = layer(), x.clone().requires_grad_()
        out = model(inp)
        out.square().mean().backward()
        assert bool(used) == merged
        results[merged] = [out.detach(), inp.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
