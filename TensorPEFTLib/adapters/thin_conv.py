"""A convolution to a few output channels as one matrix product over the kernel taps (LoCon's down-projection).

LoCon's ``lora_A`` convolves ``in`` channels to ``r`` (2-16) channels with the layer's full kernel. oneDNN runs such
a thin convolution at a small fraction of its arithmetic rate on CPU: at 32³ with 64 input channels the 64 → 2 one
takes 10 ms forward, 10 ms for its input gradient and 10 ms for its weight gradient, against 35 / 39 ms for the
64 → 64 base convolution with 32× its multiply-adds (one thread; ``benchmarks/results/lora_conv_cpu_*.md``). Written
as matrix products it costs what reading the input costs:

    forward   Y = A_taps · x_pad        (taps·r × in) · (in × padded positions): every tap's response everywhere
              out = Σ_taps window_tap(Y_tap)    (one strided view of Y, summed over its kernel axes)
    backward  G = the same view, written: g copied to every tap's window of a zero (taps·r × positions) array
              ∂A = G · x_padᵀ,   ∂x = crop(A_tapsᵀ · G)

so forward and backward are three well-shaped GEMMs, one reduction and one strided copy of r-channel volumes. The result is
the convolution's, up to float summation order (the test compares with ``F.conv3d`` and its gradients). Zero padding
only (``padding_mode="zeros"``, numeric padding), ``groups=1``; anything else keeps the plain convolution.

The transient ``Y`` / ``G`` hold taps·r channels (54 for a 3×3×3 kernel at r = 2): for the few-channel case this path
is for, about the size of the input. :func:`prefers_tap_matmul` decides when to use it (measured rule).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Measured on CPU (oneDNN, 1 and 2 threads; LoCon's A with its gradients, 3×3×3 kernels): the matrix form wins while
#: its transient (taps·r channels) is at most about twice the input's channels - r = 2 at 32 or 64 input channels,
#: 0.5-0.85× the convolution's time; r = 4 at 64 ties; r ≥ 8 loses up to 5× - and at every tested rank (to 32) on
#: volumes of up to 16³ positions, where oneDNN's thin convolution is pathologically slow (29 ms at 16³ against
#: 15 ms at 32³ for 64 → 2 channels; the matrix form 2.4 ms). Strided convolutions keep the convolution: the matrix
#: form would compute every tap at every position and throw most away (2-3× slower at stride 2).
MAX_TRANSIENT_RATIO = 2
SMALL_VOLUME = 16**3
#: Off: LoCon's down-projection runs as a plain convolution everywhere (the benchmark's side-by-side row).
ENABLED = True


def prefers_tap_matmul(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` (a ConvNd to few channels) should run as :func:`tap_matmul_conv` on ``x``.

    CPU only: that is where it was measured to pay (GPU convolution libraries handle thin convolutions well and the
    transient would cost GPU memory; the CUDA benchmark decides whether to extend it).
    """
    if not (ENABLED and x.device.type == "cpu" and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and x.dim() == conv.weight.dim() and set(conv.stride) == {1}):
        return False
    taps = conv.weight[0, 0].numel()
    return taps * conv.out_channels <= MAX_TRANSIENT_RATIO * conv.in_channels or x[0, 0].numel() <= SMALL_VOLUME


def tap_matmul_conv(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]) -> torch.Tensor:
    """``F.convNd(x, weight, None, stride, padding, dilation)`` for batched ``x`` (N, in, *spatial) and ``weight``
    (r, in, *kernel) with zero padding, computed as described in the module docstring. Returns (N, r, *out)."""
    return _TapMatmulConv.apply(x, weight, tuple(stride), tuple(padding), tuple(dilation))


def _tap_view(responses: torch.Tensor, rank: int, padded: Sequence[int], out: Sequence[int], kernel: Sequence[int],
              stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """A view (r, *kernel, *out) of ``responses`` (taps·r × padded positions, contiguous): element (j, k, o) is tap
    k's response for channel j at padded position o·stride + k·dilation, so summing the kernel axes is the
    convolution (the kernel axes come before the spatial ones so that reductions and copies run along the
    contiguous last axis). No element is aliased twice (the tap index tells k, and then o is determined), so the view can also
    be written through."""
    dims = len(kernel)
    position = [1] * dims  # element strides of the padded spatial axes
    for d in range(dims - 2, -1, -1):
        position[d] = position[d + 1] * padded[d + 1]
    per_channel = position[0] * padded[0]
    tap = [rank * per_channel] * dims  # tap-major rows: tap index t = Σ k_d · Π_{e>d} kernel_e
    for d in range(dims - 2, -1, -1):
        tap[d] = tap[d + 1] * kernel[d + 1]
    strides = [per_channel, *[t + p * dl for t, p, dl in zip(tap, position, dilation)],
               *[p * st for p, st in zip(position, stride)]]
    return responses.as_strided((rank, *kernel, *out), strides)


class _TapMatmulConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...]) -> torch.Tensor:
        out, ctx.geometry = _tap_forward(x, weight, stride, padding, dilation)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205 - autograd's protocol
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = _tap_backward(x, weight, grad, ctx.geometry, *ctx.needs_input_grad[:2])
        return grad_x, grad_weight, None, None, None


def _tap_forward(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...]) -> tuple[torch.Tensor, tuple]:
    """The thin convolution's output (N, r, *out) and the geometry its backward needs."""
    n, channels, *spatial = x.shape
    rank, kernel = weight.shape[0], tuple(weight.shape[2:])
    padded = [s + 2 * p for s, p in zip(spatial, padding)]
    out_size = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(padded, kernel, stride, dilation)]
    dtype = _compute_dtype(x)
    taps = _tap_matrix(weight).to(dtype)  # (taps·r, in)
    outs = []
    for i in range(n):  # one plain GEMM per sample: faster than a batched one on CPU
        x_pad = _pad(x[i].to(dtype), padding).reshape(channels, -1)
        responses = taps @ x_pad  # (taps·r, padded positions)
        view = _tap_view(responses, rank, padded, out_size, kernel, stride, dilation)
        # tap by tap: torch's reduction over the strided kernel axes runs ~3x slower than these adds
        taps_at = itertools.product(*[range(k) for k in kernel])
        out = view[(slice(None), *next(taps_at))].clone()
        for at in taps_at:
            out += view[(slice(None), *at)]
        outs.append(out)
    return torch.stack(outs), (stride, padding, dilation, padded, out_size, dtype)


def _tap_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, geometry: tuple, need_x: bool,
                  need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The thin convolution's gradients for the input and the weight (each None when not needed)."""
    stride, padding, dilation, padded, out_size, dtype = geometry
    n, channels, *spatial = x.shape
    rank, kernel = weight.shape[0], tuple(weight.shape[2:])
    dims = len(kernel)
    grad = grad.to(dtype)
    taps = _tap_matrix(weight).to(dtype)
    crop = tuple(slice(p, p + s) for p, s in zip(padding, spatial))
    grad_x = torch.empty((n, channels, *spatial), dtype=x.dtype, device=x.device) if need_x else None
    grad_taps = torch.zeros_like(taps) if need_weight else None
    for i in range(n):
        # each tap's output gradient put back at the padded input positions it read (the forward's view, written)
        spread = grad.new_zeros((taps.shape[0], *padded))
        view = _tap_view(spread, rank, padded, out_size, kernel, stride, dilation)
        view.copy_(grad[i].reshape(rank, *([1] * dims), *out_size).expand(view.shape))
        spread = spread.reshape(taps.shape[0], -1)
        if grad_taps is not None:
            x_pad = _pad(x[i].to(dtype), padding).reshape(channels, -1)
            grad_taps += spread @ x_pad.transpose(0, 1)
        if grad_x is not None:
            grad_x[i] = (taps.transpose(0, 1) @ spread).reshape(channels, *padded)[(slice(None), *crop)]
    grad_weight = None
    if grad_taps is not None:
        grad_weight = grad_taps.reshape(*kernel, rank, channels).permute(dims, dims + 1, *range(dims))
        grad_weight = grad_weight.to(weight.dtype).contiguous()
    return grad_x, grad_weight


# ------------------------------------------------------------------ LoCon with one input gradient

#: Off: the input gradient of LoCon runs through W and through the adapter separately (the benchmark's side-by-side
#: row "lora (separate input gradient)").
MERGED_INPUT_GRAD = True
#: Positions from which it pays (``benchmarks/locon_layer.py``, 1 thread, 2026-12-03): at 32³ a 64-channel layer
#: with its adapter went from 1.247x to 1.144x the frozen layer's step, 32 channels 1.461x to 1.316x; at 16³ it tied
#: and at 8³ it lost (1.31x to 1.38x: forming W + ΔW twice costs more than the thin product it saves once the weight
#: outweighs the activations).
MERGED_MIN_POSITIONS = 20**3


def prefers_merged_input_grad(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether LoCon on ``base`` should run as :func:`locon_conv` for ``x``: while training, in float32 without
    autocast (under autocast W + ΔW would round into W's bf16 grid and lose ΔW), with W frozen, on volumes of at least
    :data:`MERGED_MIN_POSITIONS` positions; the caller has checked that the thin product applies."""
    return (MERGED_INPUT_GRAD and torch.is_grad_enabled() and x.dtype == torch.float32
            and base.weight.dtype == torch.float32 and not base.weight.requires_grad
            and not torch.is_autocast_enabled(x.device.type) and x[0, 0].numel() >= MERGED_MIN_POSITIONS)


def locon_conv(x: torch.Tensor, base: nn.Module, down: torch.Tensor, mix: torch.Tensor, scaling: float) -> torch.Tensor:
    """``base(x) + scaling · mix · conv(x, down)`` (LoCon: ``down`` (r, in, *kernel), ``mix`` (out, r)) with the input
    gradient taken once, through W + ΔW.

    Written as base + adapter, backward computes the input gradient twice - the full one through W and a thin one
    through the adapter - and adds them. Here forward convolves with W + ΔW (ΔW = scaling · mix · down, formed per
    call: it is small next to the activations on the volumes this is used for) and keeps the thin product
    conv(x, down) for ∂mix; backward is one full input gradient through W + ΔW, ∂mix = g · conv(x, down)ᵀ and ∂down
    the thin weight gradient of mixᵀ g (:func:`_tap_backward`). The same values up to float rounding (tested).
    """
    return _MergedInputGradLoCon.apply(x, base.weight, base.bias, down, mix, float(scaling), tuple(base.stride),
                                       tuple(base.padding), tuple(base.dilation))


def _combined(weight: torch.Tensor, down: torch.Tensor, mix: torch.Tensor, scaling: float) -> torch.Tensor:
    return weight + (scaling * (mix @ down.reshape(down.shape[0], -1))).reshape(weight.shape)


class _MergedInputGradLoCon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, mix, scaling, stride, padding, dilation):  # noqa: ANN001, ANN205
        hidden, ctx.geometry = _tap_forward(x, down, stride, padding, dilation)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
        out = conv(x, _combined(weight, down, mix, scaling), bias, stride, padding, dilation)
        ctx.save_for_backward(x, weight, down, mix, hidden)
        ctx.scaling, ctx.conv_args, ctx.has_bias = scaling, (stride, padding, dilation), bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, down, mix, hidden = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        need_x, _, need_bias, need_down, need_mix = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        grad_x = grad_bias = grad_down = grad_mix = None
        if need_x or need_bias:
            grad_x, _, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, _combined(weight, down, mix, ctx.scaling), [weight.shape[0]] if ctx.has_bias else None,
                list(stride), list(padding), list(dilation), False, [0] * len(stride), 1,
                [need_x, False, need_bias and ctx.has_bias])
        n, out_channels, rank = grad.shape[0], grad.shape[1], mix.shape[1]
        flat_grad, flat_hidden = grad.reshape(n, out_channels, -1), hidden.reshape(n, rank, -1)
        if need_mix:
            grad_mix = ctx.scaling * sum(flat_grad[i] @ flat_hidden[i].transpose(0, 1) for i in range(n))
        if need_down:
            grad_hidden = torch.stack([mix.transpose(0, 1) @ flat_grad[i] for i in range(n)]).reshape(hidden.shape)
            _, grad_down = _tap_backward(x, down, grad_hidden * ctx.scaling, ctx.geometry, False, True)
        return grad_x, None, grad_bias, grad_down, grad_mix, None, None, None, None


def _pad(volume: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of (channels, *spatial); no copy when there is no padding."""
    if not any(padding):
        return volume.contiguous()
    return F.pad(volume, [p for pad in reversed(padding) for p in (pad, pad)])


def _tap_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(r, in, *kernel) → (taps·r, in), tap-major: row tap·r + j is output channel j's weights at that tap."""
    dims = weight.dim() - 2
    return weight.permute(*range(2, 2 + dims), 0, 1).reshape(-1, weight.shape[1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution would run in here: autocast's when it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def add_channel_mix(base: torch.Tensor, mix: torch.Tensor, hidden: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + alpha · (mix applied pointwise to hidden's channels)`` as one fused GEMM-and-add per sample.

    ``base`` (N, out, *spatial), ``mix`` (out, r) - LoCon's 1×1 up-projection - and ``hidden`` (N, r, *spatial).
    On CPU a 1×1 convolution from r channels takes torch's slow generic path, then a separate add reads and writes
    the full output again; ``addmm`` does both in one pass.
    """
    n, out = base.shape[:2]
    mix = mix.to(hidden.dtype)
    rows = [torch.addmm(base[i].reshape(out, -1), mix, hidden[i].reshape(mix.shape[1], -1), alpha=alpha)
            for i in range(n)]
    return torch.stack(rows).reshape(base.shape)
