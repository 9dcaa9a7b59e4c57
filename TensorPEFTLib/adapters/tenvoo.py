"""TenVOO-L and TenVOO-Q: a 3D convolution's update as a tensor network (the TenVOO paper).

A Conv3d kernel W (Cout × Cin × kD × kH × kW) is seen as a 9-way tensor over ``Cin = i₁·i₂·i₃``,
``Cout = o₁·o₂·o₃`` (:func:`~.quanta.channel_factors`: the authors' table, else a balanced split) and the three
kernel axes, each spatial axis on its own core. ΔW is the contraction of ten cores joined by bonds of size r.
The two networks of the paper (index letters: a b c = i₁ i₂ i₃, x y z = kD kH kW, A B C = o₁ o₂ o₃, the rest bonds):

TenVOO-L (a ring through the kernel cores with three r⁴/r³ "loop" cores)::

    bade · cefg · xghi · yijk · zklm · Cmno · BopA · fdqh · lrpn · jqr
    params = i₁i₂r² + i₃r³ + (kD+kH+kW)r³ + o₃r³ + o₁o₂r² + 2r⁴ + r³

TenVOO-Q (three r⁴ loop cores; the kH core has two bonds, its third is summed out as in the released code)::

    bade · cefg · xghi · yjk · zjlm · Cmop · BpqA · oqrs · dftr · hlst
    params = i₁i₂r² + i₃r³ + kD·r³ + kH·r² + kW·r³ + o₃r³ + o₁o₂r² + 3r⁴

In TenVOO-Q the index ``i`` of the kD core and ``k`` of the kH core join nothing else (the release stores the kH core
as kH×1×r×r and lets einsum broadcast); they are summed, which keeps the paper's parameter count. Every rank works,
odd ones included (the release's init reshapes a 3-way core as (r²/2, 2r), which fails for odd r; here each core's
fan-in is the product of its last two sizes).

The contraction order is planned once per layer shape (:class:`~.quanta.ContractionPlan`) and the forward pass
builds ΔW once, then runs a single convolution with W + ΔW.

Linear target layers (the DDPM's ``time_emb_proj``, ``time_embed.2``, attention ``to_q``/``to_v``) get QuanTA, as the
TenVOO release does (option ``linear="quanta"``); ``linear="skip"`` leaves them out.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .config import AdapterConfig, AdapterError
from .quanta import QuanTALayer, TensorNetworkLayer, channel_factors
from .registry import MethodSpec, Wrapped, register

#: (equation, output = base weight order (Cout, Cin, kD, kH, kW) with Cout = (A,B,C), Cin = (a,b,c))
TENVOO_EQUATIONS = {
    "l": "bade,cefg,xghi,yijk,zklm,Cmno,BopA,fdqh,lrpn,jqr->ABCabcxyz",
    "q": "bade,cefg,xghi,yjk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->ABCabcxyz",
}


def tenvoo_core_shapes(variant: str, in_factors: Sequence[int], out_factors: Sequence[int],
                       kernel: Sequence[int], rank: int) -> list[tuple[int, ...]]:
    """Shapes of the ten cores, in the order of :data:`TENVOO_EQUATIONS`."""
    i1, i2, i3 = in_factors
    o1, o2, o3 = out_factors
    kd, kh, kw = kernel
    r = rank
    head = [(i2, i1, r, r), (i3, r, r, r), (kd, r, r, r)]
    if variant == "l":
        return head + [(kh, r, r, r), (kw, r, r, r), (o3, r, r, r), (o2, r, r, o1), (r, r, r, r), (r, r, r, r), (r, r, r)]
    if variant == "q":
        return head + [(kh, r, r), (kw, r, r, r), (o3, r, r, r), (o2, r, r, o1), (r, r, r, r), (r, r, r, r), (r, r, r, r)]
    raise ValueError(f"unknown TenVOO variant {variant!r}")


def tenvoo_parameter_count(variant: str, in_channels: int, out_channels: int, kernel: Sequence[int], rank: int,
                           overrides: dict | None = None) -> int:
    """The paper's formula for one Conv3d layer (see the module docstring)."""
    i1, i2, i3 = channel_factors(in_channels, overrides)
    o1, o2, o3 = channel_factors(out_channels, overrides)
    kd, kh, kw = kernel
    r = rank
    if variant == "l":
        return i1 * i2 * r**2 + i3 * r**3 + (kd + kh + kw) * r**3 + o3 * r**3 + o1 * o2 * r**2 + 2 * r**4 + r**3
    if variant == "q":
        return i1 * i2 * r**2 + i3 * r**3 + kd * r**3 + kh * r**2 + kw * r**3 + o3 * r**3 + o1 * o2 * r**2 + 3 * r**4
    raise ValueError(f"unknown TenVOO variant {variant!r}")


class TenVOOLayer(TensorNetworkLayer):
    """TenVOO-L / TenVOO-Q on an ``nn.Conv3d`` (ungrouped)."""

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "", variant: str = "l",
                 meta: dict | None = None) -> None:
        if not isinstance(base_layer, nn.Conv3d):
            raise AdapterError(f"{name}: TenVOO adapts Conv3d layers (and Linear via QuanTA), not {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise AdapterError(f"{name}: grouped convolutions (groups={base_layer.groups}) are not supported by TenVOO; "
                               f"leave this layer out of --targets")
        self.method = f"tenvoo-{variant}"
        self.variant = variant
        overrides = cfg.options.get("factors")
        self.in_factors = channel_factors(base_layer.in_channels, overrides, name)
        self.out_factors = channel_factors(base_layer.out_channels, overrides, name)
        shapes = tenvoo_core_shapes(variant, self.in_factors, self.out_factors, base_layer.kernel_size, cfg.rank)
        # Gain √2 (nonlinearity "relu") as in the release's Conv3d cores.
        super().__init__(base_layer, cfg, name, TENVOO_EQUATIONS[variant], shapes, gain=2**0.5, meta=meta)

    def extra_repr(self) -> str:
        return f"in={self.in_factors}, out={self.out_factors}, " + super().extra_repr()


def _tenvoo_wrap(variant: str):
    """Dispatch by layer type: Conv3d -> TenVOO, Linear -> QuanTA (the release's choice for dense layers)."""

    def wrap(selected: list[tuple[str, nn.Module]], cfg: AdapterConfig, meta: dict[str, dict]) -> Wrapped:
        layers: dict[str, Any] = {}
        for name, module in selected:
            if isinstance(module, nn.Linear):
                layers[name] = QuanTALayer(module, cfg, name, meta.get(name, {}))
            else:
                layers[name] = TenVOOLayer(module, cfg, name, variant, meta.get(name, {}))
        return Wrapped(layers)

    return wrap


for _variant in ("l", "q"):
    register(
        MethodSpec(
            name=f"tenvoo-{_variant}",
            layer_types=(nn.Conv3d, nn.Linear),
            wrap=_tenvoo_wrap(_variant),
            options={"init": "frozen-copy", "factors": None},
        )
    )
