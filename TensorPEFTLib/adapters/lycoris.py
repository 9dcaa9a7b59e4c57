"""LoHa and LoKr (the LyCORIS family), on Linear, ConvNd and ConvTransposeNd - peft offers neither on Conv3d, and
neither peft nor LyCORIS adapts transposed convolutions.

LoHa (Hyeon-Woo et al., 2022): ΔW = scale · (B₁A₁) ⊙ (B₂A₂) on the weight flattened to out × in·prod(kernel);
2r(out + in·k³) parameters. B₂ starts at zero, so ΔW = 0 at injection.

LoKr (Edalati et al., 2022; LyCORIS): ΔW = scale · W₁ ⊗ W₂ with the channels split out = o₁o₂, in = i₁i₂ (factors
nearest the square root, as LyCORIS), W₁ (o₁ × i₁) full and W₂ (o₂ × i₂ × kernel) of rank r (full when r reaches
its size). W₂'s second factor starts at zero.

Both build ΔW as (out, in, *kernel); a transposed convolution's update is laid out as its (in, out, *kernel) weight
(:meth:`AdapterLayer.layout`).
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .base import ADAPTABLE_TYPES, AdapterLayer, check_rank, flat_shape, kaiming_uniform_, seeded_generator
from .config import AdapterConfig
from .registry import MethodSpec, per_layer_class, register


class LoHaLayer(AdapterLayer):
    method = "loha"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, cfg, name)
        check_rank(name, base_layer, cfg.rank, self.method)
        out_dim, in_flat = flat_shape(base_layer)
        weight = base_layer.weight
        gen = seeded_generator(cfg, name)

        def param(rows: int, cols: int, std: float) -> nn.Parameter:
            values = torch.randn(rows, cols, generator=gen) * std if std else torch.zeros(rows, cols)
            return nn.Parameter(values.to(device=weight.device, dtype=weight.dtype))

        # Initialisation as LyCORIS: the second Hadamard factor's up-projection is zero.
        self.hada_w1_b = param(out_dim, cfg.rank, 0.1)
        self.hada_w1_a = param(cfg.rank, in_flat, 1.0)
        self.hada_w2_b = param(out_dim, cfg.rank, 0.0)
        self.hada_w2_a = param(cfg.rank, in_flat, 1.0)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.hada_w1_b @ self.hada_w1_a) * (self.hada_w2_b @ self.hada_w2_a)
        return self.layout(delta) * self.scaling


def near_square_factors(n: int) -> tuple[int, int]:
    """(a, b) with a·b = n and a <= b as close as possible to sqrt(n) (LyCORIS' ``factorization(n, -1)``)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


class LoKrLayer(AdapterLayer):
    method = "lokr"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, cfg, name)
        weight = base_layer.weight
        out_dim, in_dim = self.out_dim, self.in_dim
        kernel = weight.numel() // (out_dim * in_dim)
        self.o1, self.o2 = near_square_factors(out_dim)
        self.i1, self.i2 = near_square_factors(in_dim)
        gen = seeded_generator(cfg, name)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lokr_w1 = nn.Parameter(torch.empty(self.o1, self.i1, **factory))
        kaiming_uniform_(self.lokr_w1, self.i1, gen)
        cols = self.i2 * kernel
        self.low_rank = cfg.rank < min(self.o2, cols)
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(self.o2, cfg.rank, **factory))
            kaiming_uniform_(self.lokr_w2_a, cfg.rank, gen)
            self.lokr_w2_b = nn.Parameter(torch.zeros(cfg.rank, cols, **factory))
        else:  # the rank reaches W₂'s size: a full W₂ is smaller and exact
            self.lokr_w2 = nn.Parameter(torch.zeros(self.o2, cols, **factory))

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2
        w2 = w2.reshape(self.o2, self.i2, -1)
        # kron over (out, in) with the kernel carried by W₂: ΔW[a·o₂+b, c·i₂+d, k] = W₁[a, c] · W₂[b, d, k]
        delta = torch.einsum("ac,bdk->abcdk", self.lokr_w1, w2)
        return self.layout(delta) * self.scaling

    def extra_repr(self) -> str:
        return f"out={self.o1}x{self.o2}, in={self.i1}x{self.i2}, low_rank={self.low_rank}, merged={self.merged}"



register(
    MethodSpec(
        name="loha",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(LoHaLayer),
    )
)

register(
    MethodSpec(
        name="lokr",
        layer_types=ADAPTABLE_TYPES,
        wrap=per_layer_class(LoKrLayer),
    )
)
