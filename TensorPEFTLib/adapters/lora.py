"""LoRA (LoCon on convolutions), PiSSA and DoRA.

LoRA: ΔW = (alpha / r) · B A with A (r × in) Kaiming-uniform and B (out × r) zero, so the output is unchanged at
start (Hu et al., 2021). On a convolution, A is a convolution with the layer's kernel, stride, padding and
dilation to r channels and B a 1×1×1 convolution back to the output channels (LoCon, as in LyCORIS and peft).
On a transposed convolution (which neither peft nor LyCORIS adapts), A is a transposed convolution with the layer's
kernel, stride, padding, output padding and dilation to r channels and B the same pointwise convolution: a pointwise
channel mix commutes with the transposed convolution, so the path is exactly the transposed convolution with ΔW,
built as (out, in, *kernel) and laid out as the layer's (in, out, *kernel).
The sub-modules are called ``lora_A`` / ``lora_B`` as in Hugging Face peft, so a saved adapter maps onto peft's
state dict key for key.

PiSSA (Meng et al., 2024): A and B start from the top-r singular triplets of the weight (flattened to
out × in·prod(kernel) for convolutions - peft offers PiSSA on Linear only) and the frozen weight becomes the
residual W - scale · B A, so residual + principal part reproduces W.

DoRA (Liu et al., 2024): the weight is split into a magnitude m per output channel and a direction, and LoRA adapts
the direction only: W' = m · (W + scale · B A) / ||W + scale · B A||, the norm taken per output channel (over the
inputs and the kernel), m trainable and starting at ||W||, so the output is unchanged at start. As the paper (§4.3)
and peft do, the norm is detached from the graph: it follows ΔW but passes no gradient. The magnitude is called
``lora_magnitude_vector`` with peft's shape ((out,) on Linear, (1, out, 1, ...) on convolutions), which is also the
key peft writes in its adapter files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (ADAPTABLE_TYPES, CONV_OF_TRANSPOSED, CONV_TYPES, TRANSPOSED_CONV_TYPES, AdapterLayer, check_rank,
                   kaiming_uniform_, out_in_view, seeded_generator)
from .config import AdapterConfig, AdapterError
from .registry import MethodSpec, per_layer_class, register
from .thin_conv import add_channel_mix, locon_conv, prefers_merged_input_grad, prefers_tap_matmul, tap_matmul_conv


class LoRALayer(AdapterLayer):
    """LoRA on a Linear layer, LoCon on a ConvNd or ConvTransposeNd layer."""

    method = "lora"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, cfg, name)
        check_rank(name, base_layer, cfg.rank, self.method)
        self.rank = cfg.rank
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        if isinstance(base_layer, TRANSPOSED_CONV_TYPES):  # groups > 1 was refused by AdapterLayer
            self.lora_A = type(base_layer)(base_layer.in_channels, self.rank, base_layer.kernel_size,
                                           base_layer.stride, base_layer.padding, base_layer.output_padding,
                                           bias=False, dilation=base_layer.dilation, **factory)
            self.lora_B = CONV_OF_TRANSPOSED[type(base_layer)](self.rank, base_layer.out_channels, 1, bias=False,
                                                               **factory)
        elif isinstance(base_layer, CONV_TYPES):
            if base_layer.groups != 1:
                raise AdapterError(
                    f"{name}: grouped convolutions (groups={base_layer.groups}) are not supported by {self.method}; "
                    f"leave this layer out of --targets"
                )
            conv = type(base_layer)
            self.lora_A = conv(base_layer.in_channels, self.rank, base_layer.kernel_size, base_layer.stride,
                               base_layer.padding, base_layer.dilation, bias=False,
                               padding_mode=base_layer.padding_mode, **factory)
            self.lora_B = conv(self.rank, base_layer.out_channels, 1, bias=False, **factory)
        else:
            self.lora_A = nn.Linear(base_layer.in_features, self.rank, bias=False, **factory)
            self.lora_B = nn.Linear(self.rank, base_layer.out_features, bias=False, **factory)
        self.reset_factors(cfg)

    def reset_factors(self, cfg: AdapterConfig) -> None:
        fan_in = self.lora_A.weight.numel() // self.rank  # in · kernel, whichever way A stores its axes
        kaiming_uniform_(self.lora_A.weight, fan_in, seeded_generator(cfg, self.layer_name))
        nn.init.zeros_(self.lora_B.weight)

    def a_matrix(self) -> torch.Tensor:
        """A as (r, in · kernel): a transposed convolution's A stores (in, r, *kernel)."""
        return out_in_view(self.lora_A, self.lora_A.weight).reshape(self.rank, -1)

    def lora_delta(self) -> torch.Tensor:
        """scale · B A in the base weight's layout."""
        b = self.lora_B.weight.reshape(-1, self.rank)
        return self.layout(b @ self.a_matrix()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta()

    def lora_path(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        """B(A(x)) without the scale (A gets a transposed convolution's ``output_size`` too)."""
        if self._thin_conv(x, output_size):
            return self.lora_B(self._conv_down(x))
        hidden = self.lora_A(x) if output_size is None else self.lora_A(x, output_size)
        return self.lora_B(hidden)

    def _thin_conv(self, x: torch.Tensor, output_size: Any) -> bool:
        """Whether A (a convolution to r channels) runs as one matrix product over its kernel taps
        (:mod:`.thin_conv`: on CPU 2-3× faster than oneDNN's thin convolution, same result)."""
        return output_size is None and self.is_conv and not self.is_transposed and prefers_tap_matmul(self.lora_A, x)

    def _conv_down(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.lora_A
        return tap_matmul_conv(x, conv.weight, conv.stride, conv.padding, conv.dilation)

    def adapter_forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        # The activation path (x -> r channels -> out) is cheaper than forming W + ΔW for small r; on large float32
        # volumes locon_conv forms W + ΔW anyway, to take the input gradient once (thin_conv.MERGED_MIN_POSITIONS).
        if self._thin_conv(x, output_size):
            mix = self.lora_B.weight.reshape(self.out_dim, self.rank)
            if (isinstance(self.dropout, nn.Identity) or not self.training) and \
                    prefers_merged_input_grad(self.base_layer, x):  # one input gradient, through W + ΔW
                return locon_conv(x, self.base_layer, self.lora_A.weight, mix, self.scaling)
            # B and the sum as one GEMM-and-add (thin_conv.add_channel_mix)
            return add_channel_mix(self.call_base(x, output_size), mix, self._conv_down(self.dropout(x)), self.scaling)
        return self.call_base(x, output_size) + self.lora_path(self.dropout(x), output_size) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


class PiSSALayer(LoRALayer):
    """LoRA initialised from the principal singular triplets; the frozen weight holds the residual."""

    method = "pissa"

    def reset_factors(self, cfg: AdapterConfig) -> None:
        weight = self.base_layer.weight
        matrix = out_in_view(self.base_layer, weight.detach()).reshape(self.out_dim, -1).float()
        iters = cfg.options.get("svd_iters")
        if iters:  # randomized SVD for very large layers (Halko et al.), as peft's pissa_niter_K
            u, s, v = torch.svd_lowrank(matrix, q=self.rank, niter=int(iters))
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, : self.rank], s[: self.rank] / self.scaling, vh[: self.rank]
        root = s.sqrt()
        a_weight = self.lora_A.weight
        a_rows = (root[:, None] * vh).reshape(self.rank, *out_in_view(self.lora_A, a_weight).shape[1:])
        with torch.no_grad():
            a_weight.copy_(out_in_view(self.lora_A, a_rows).to(weight.dtype))
            self.lora_B.weight.copy_((u * root[None, :]).reshape(self.lora_B.weight.shape).to(weight.dtype))
            weight.sub_(self.delta_weight().to(weight.dtype))


class DoRALayer(LoRALayer):
    """Weight-decomposed LoRA: a trained magnitude per output channel times the direction of W + scale · B A.

    Matches peft's DoRA on Linear and ConvNd (same forward, same merged weight); also on ConvTransposeNd, where the
    output channel is the weight's second axis.
    """

    method = "dora"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, cfg, name)
        with torch.no_grad():
            norm = self.weight_norm(base_layer.weight + self.lora_delta().to(base_layer.weight.dtype))
        # peft's shape: (out,) for Linear, (1, out, 1, ...) for convolutions - it broadcasts over the output
        shape = (-1,) if isinstance(base_layer, nn.Linear) else (1, -1, *([1] * len(self.kernel_size)))
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(shape).clone())
        # ||W + ΔW|| at merge time: a merged weight no longer holds it, and unmerge needs it (peft caches it too).
        self.register_buffer("_merged_norm", None, persistent=False)
        self.register_buffer("_merged_rows", None, persistent=False)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each output channel's weights (over the inputs and the kernel): shape (out,)."""
        rows = out_in_view(self.base_layer, weight).reshape(self.out_dim, -1)
        return torch.linalg.vector_norm(rows, dim=1)

    def magnitude_scale(self, norm: torch.Tensor) -> torch.Tensor:
        """m / ||W + ΔW|| per output channel, shape (out,). A channel whose weights are all zero has norm 0 (and
        m = 0 at start): the clamp gives it factor 0 instead of 0/0, so its output stays what it was."""
        magnitude = self.lora_magnitude_vector.reshape(-1)
        return magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def delta_weight(self) -> torch.Tensor:
        """m · (W + scale · B A) / ||W + scale · B A|| - W of the unmerged layer (the norm detached, as in forward)."""
        weight = self.base_layer.weight
        combined = weight + self.lora_delta().to(weight.dtype)
        scale = self.magnitude_scale(self.weight_norm(combined).detach())
        return self.per_out_channel(scale) * combined - weight

    def adapter_forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        # As peft: result + (s - 1) · (W x) + s · scale · B A x with s = m / ||W + ΔW||, so the base layer runs as it
        # is and the adapter adds a thin r-channel path; ΔW is formed only for the norm, without a graph.
        base = self.base_layer
        result = self.call_base(x, output_size)
        with torch.no_grad():
            norm = self.weight_norm(base.weight + self.lora_delta().to(base.weight.dtype))
        scale = self.magnitude_scale(norm).to(result.dtype)  # an autocast output keeps its precision
        scale = scale if not self.is_conv else scale.reshape(1, -1, *([1] * (result.dim() - 2)))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            lora_in = x
            plain = result if base.bias is None else result - (
                base.bias if not self.is_conv else base.bias.reshape(1, -1, *([1] * (result.dim() - 2))))
        else:  # dropout reaches the adapter's terms only: W x is computed again on the dropped-out input
            lora_in = self.dropout(x)
            plain = self.base_op(lora_in, base.weight, None, output_size)
        return result + (scale - 1) * plain + scale * self.lora_path(lora_in, output_size) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← m · (W + ΔW) / ||W + ΔW||, keeping the norm for :meth:`unmerge`."""
        if self.merged:
            return
        weight = self.base_layer.weight
        combined = weight + self.lora_delta().to(weight.dtype)
        norm = self.weight_norm(combined)
        scale = self.magnitude_scale(norm)
        # A channel with m = 0 merges to zeros, from which W cannot be divided back out: keep its rows.
        zero = scale == 0
        self._merged_rows = out_in_view(self.base_layer, weight)[zero].clone() if zero.any() else None
        self._merged_norm = norm
        weight.copy_(self.per_out_channel(scale).to(weight.dtype) * combined)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W' · ||W + ΔW|| / m - ΔW with the norm kept at merge (exact up to rounding)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        scale = self.magnitude_scale(self._merged_norm)
        zero = scale == 0
        divisor = self.per_out_channel(torch.where(zero, torch.ones_like(scale), scale)).to(weight.dtype)
        weight.copy_(weight / divisor - self.lora_delta().to(weight.dtype))
        if self._merged_rows is not None:
            out_in_view(self.base_layer, weight)[zero] = self._merged_rows
        self._merged_norm = self._merged_rows = None
        self.merged = False


LORA = register(
    MethodSpec(
        name="lora",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(LoRALayer),
    )
)

PISSA = register(
    MethodSpec(
        name="pissa",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(PiSSALayer),
        options={"svd_iters": None},
    )
)

DORA = register(
    MethodSpec(
        name="dora",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(DoRALayer),
    )
)
