"""SSF: scale and shift the output features of each adapted layer (Lian et al., 2022).

y = γ ⊙ layer(x) + β per output channel, γ = 1 and β = 0 at start. Folding into the layer is exact:
W' = γ·W, b' = γ·b + β, so merged inference costs nothing extra. On a transposed convolution γ scales the weight's
second axis, its output channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ADAPTABLE_TYPES, AdapterLayer
from .config import AdapterConfig
from .registry import MethodSpec, per_layer_class, register


class SSFLayer(AdapterLayer):
    method = "ssf"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, cfg, name)
        weight = base_layer.weight
        self.ssf_scale = nn.Parameter(torch.ones(self.out_dim, device=weight.device, dtype=weight.dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(self.out_dim, device=weight.device, dtype=weight.dtype))

    def _per_channel(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """Shape (out,) values to broadcast over an output of ``ndim`` dims (channels last for Linear, dim 1 for conv)."""
        if not self.is_conv:
            return values
        return values.reshape(1, -1, *([1] * (ndim - 2)))

    def delta_weight(self) -> torch.Tensor:
        return self.per_out_channel(self.ssf_scale - 1) * self.base_layer.weight

    def delta_bias(self) -> torch.Tensor:
        bias = self.base_layer.bias
        return self.ssf_shift if bias is None else (self.ssf_scale - 1) * bias + self.ssf_shift

    def adapter_forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        y = self.call_base(x, output_size)
        return y * self._per_channel(self.ssf_scale, y.dim()) + self._per_channel(self.ssf_shift, y.dim())

    @torch.no_grad()
    def unmerge(self) -> None:
        # The update depends on the weight it scales: undo W' = γW, b' = γb + β from the merged values.
        if not self.merged:
            return
        base = self.base_layer
        base.weight.div_(self.per_out_channel(self.ssf_scale))
        if getattr(self, "_created_bias", False):
            base.bias = None
            self._created_bias = False
        else:
            base.bias.sub_(self.ssf_shift).div_(self.ssf_scale)
        self.merged = False


register(
    MethodSpec(
        name="ssf",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(SSFLayer),
    )
)
