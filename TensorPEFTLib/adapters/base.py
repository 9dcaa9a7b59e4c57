"""Shared layer machinery: the wrapper every adapter builds on, and the group module of cross-layer methods.

An adapter layer wraps one ``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd`` (the *base layer*, frozen) and adds
a weight update ΔW. The effective weight is ``base_layer.weight + delta_weight()``; ``merge`` folds ΔW in so
inference costs exactly the base layer, ``unmerge`` takes it out again.

Transposed convolutions store their weight as (in, out, *kernel), the other way round from a convolution's
(out, in, *kernel). Adapters build their update in the (out, in, *kernel) view - "out" is always the layer's output
channels - and :meth:`AdapterLayer.layout` turns it into the base layer's own layout, so one factorisation serves
both (:func:`out_in_view`, :func:`out_in_shape`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, AdapterError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_AND_CONV = (nn.Linear, *CONV_TYPES)
#: every layer kind an adapter layer can wrap; a method opts in to transposed convolutions in its ``layer_types``
ADAPTABLE_TYPES = (*LINEAR_AND_CONV, *TRANSPOSED_CONV_TYPES)
#: the convolution with a transposed convolution's number of spatial dimensions (pointwise factors use it)
CONV_OF_TRANSPOSED = dict(zip(TRANSPOSED_CONV_TYPES, CONV_TYPES))
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def is_conv(layer: nn.Module) -> bool:
    """True for convolutions and transposed convolutions (channel-first activations)."""
    return isinstance(layer, CONV_TYPES + TRANSPOSED_CONV_TYPES)


def is_transposed(layer: nn.Module) -> bool:
    return isinstance(layer, TRANSPOSED_CONV_TYPES)


def out_in_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight's shape seen as (out, in, *kernel); a transposed convolution stores it as (in, out, *kernel)."""
    shape = tuple(int(n) for n in layer.weight.shape)
    return (shape[1], shape[0], *shape[2:]) if is_transposed(layer) else shape


def out_in_view(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in ``layer``'s weight layout seen as (out, in, *kernel) (a view; swapping the first two axes is its
    own inverse, so the same call turns an (out, in, *kernel) tensor back into a transposed layer's layout)."""
    return tensor.transpose(0, 1) if is_transposed(layer) else tensor


def channel_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) channels or features of a Linear/ConvNd/ConvTransposeNd, ``in`` per group for grouped convolutions."""
    shape = out_in_shape(layer)
    return shape[0], shape[1]


def flat_shape(layer: nn.Module) -> tuple[int, int]:
    """The weight seen as a matrix: (out, in · prod(kernel)). Linear weights are already (out, in)."""
    shape = out_in_shape(layer)
    return shape[0], math.prod(shape[1:])


def check_rank(name: str, layer: nn.Module, rank: int, method: str) -> None:
    """Refuse a rank the flattened weight cannot hold (rank > min(out, in · kernel))."""
    out_dim, in_flat = flat_shape(layer)
    limit = min(out_dim, in_flat)
    if rank > limit:
        raise AdapterError(
            f"rank {rank} is too large for {method} on {name} (weight {out_dim}×{in_flat} allows at most {limit}); "
            f"lower --rank or narrow --targets"
        )


def seeded_generator(cfg: AdapterConfig, layer_name: str) -> torch.Generator:
    """A CPU generator seeded from the config seed and the layer name: the same config gives the same init on any
    device, so an adapter's frozen random parts can be rebuilt instead of stored."""
    import zlib

    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(cfg.seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63))
    return gen


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator, a: float = math.sqrt(5)) -> torch.Tensor:
    """``nn.init.kaiming_uniform_`` with an explicit fan-in and generator (the default init of nn.Linear)."""
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / max(1, fan_in))
    with torch.no_grad():
        values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        tensor.copy_(values.to(tensor.dtype))
    return tensor


class AdapterLayer(nn.Module):
    """Wraps one Linear/ConvNd/ConvTransposeNd layer with a trainable weight update.

    Subclasses implement :meth:`delta_weight` (and :meth:`delta_bias` if they shift the bias). The default forward
    runs the base operation once with ``W + ΔW``; low-rank subclasses override :meth:`adapter_forward` where the
    activation path is cheaper. A transposed convolution's ``output_size`` argument reaches :meth:`adapter_forward`.
    """

    #: Short method name, set by subclasses (used in reprs and error messages).
    method: str = "?"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE_TYPES):
            raise AdapterError(f"{name or 'layer'}: {type(base_layer).__name__} cannot be adapted "
                               f"(Linear, ConvNd or ConvTransposeNd only)")
        if is_transposed(base_layer) and base_layer.groups != 1:
            # A grouped transposed weight is (in, out/groups, *k): its (out, in) view is block-diagonal, which no
            # factorisation here keeps. Refused rather than silently adapting a different layer.
            raise AdapterError(
                f"{name or 'layer'}: grouped transposed convolutions (groups={base_layer.groups}) cannot be adapted; "
                f"leave this layer out of --targets"
            )
        self.base_layer = base_layer
        self.layer_name = name
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.adapter_enabled = True

    # ----------------------------------------------------------------- geometry
    @property
    def weight(self) -> torch.Tensor:
        """The base weight (frozen); some MONAI blocks read ``layer.weight`` directly."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_conv(self) -> bool:
        """True for convolutions and transposed convolutions (their activations are channel-first)."""
        return is_conv(self.base_layer)

    @property
    def is_transposed(self) -> bool:
        return is_transposed(self.base_layer)

    @property
    def out_dim(self) -> int:
        return out_in_shape(self.base_layer)[0]

    @property
    def in_dim(self) -> int:
        return out_in_shape(self.base_layer)[1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.base_layer.weight.shape[2:])

    def layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An update built as (out, in, *kernel) (or flattened to (out, in · kernel)) in the base weight's layout."""
        return out_in_view(self.base_layer, delta.reshape(out_in_shape(self.base_layer)))

    def per_out_channel(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-channel ``values`` (out,) shaped to broadcast over the base weight (axis 1 when transposed)."""
        shape = [1] * self.base_layer.weight.dim()
        shape[1 if self.is_transposed else 0] = -1
        return values.reshape(shape)

    def call_base(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        """The base layer on ``x`` (a transposed convolution's ``output_size`` passed on when given)."""
        return self.base_layer(x) if output_size is None else self.base_layer(x, output_size)

    def base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                output_size: Any = None) -> torch.Tensor:
        """The base layer's operation with another weight/bias (stride, padding, padding mode, groups kept; for a
        transposed convolution also output padding and dilation, with ``output_size`` as its own forward takes it)."""
        base = self.base_layer
        if self.is_transposed:
            nd = len(base.kernel_size)
            output_padding = base._output_padding(x, output_size, list(base.stride), list(base.padding),
                                                  list(base.kernel_size), nd, list(base.dilation))
            return _CONV_TRANSPOSE_FN[nd](x, weight, bias, base.stride, base.padding, output_padding, base.groups,
                                          base.dilation)
        if self.is_conv:
            return base._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    # ----------------------------------------------------------------- update
    def delta_weight(self) -> torch.Tensor:
        """ΔW with the shape (and layout) of ``base_layer.weight`` (scaling included)."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def adapter_forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        """Forward with the adapter active (not merged)."""
        base = self.base_layer
        delta = self.delta_weight()
        delta_b = self.delta_bias()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = base.bias if delta_b is None else (delta_b if base.bias is None else base.bias + delta_b)
            return self.base_op(x, base.weight + delta.to(base.weight.dtype), bias, output_size)
        # Dropout applies to the adapter path only, so the update is a separate operation here.
        return self.call_base(x, output_size) + self.base_op(self.dropout(x), delta.to(base.weight.dtype), delta_b,
                                                             output_size)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:  # only a transposed convolution takes more than its input: output_size
            return self.adapter_forward(x, *args, **kwargs)
        return self.adapter_forward(x)

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW (and Δb) into the base layer: inference then costs exactly the base layer."""
        if self.merged:
            return
        base = self.base_layer
        base.weight.add_(self.delta_weight().to(base.weight.dtype))
        delta_b = self.delta_bias()
        if delta_b is not None:
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros_like(delta_b), requires_grad=False)
                self._created_bias = True
            base.bias.add_(delta_b.to(base.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base layer (the inverse of :meth:`merge`)."""
        if not self.merged:
            return
        base = self.base_layer
        base.weight.sub_(self.delta_weight().to(base.weight.dtype))
        delta_b = self.delta_bias()
        if delta_b is not None:
            if getattr(self, "_created_bias", False):
                base.bias = None
                self._created_bias = False
            else:
                base.bias.sub_(delta_b.to(base.bias.dtype))
        self.merged = False

    # ----------------------------------------------------------------- persistence
    def layer_meta(self) -> dict[str, Any]:
        """Per-layer facts saved in ``adapter_config.json`` that :meth:`inject` needs to rebuild this layer's shapes
        (e.g. SeLoRA's grown rank). Empty for fixed-shape adapters."""
        return {}

    def extra_repr(self) -> str:
        return f"method={self.method}, merged={self.merged}"


class AdapterGroup(nn.Module):
    """Factors shared by a stack of layers (LoRA-PT, tCURLoRA, LoTR).

    The group computes what its members share in one batched operation and keeps the result for the current
    forward pass; each member layer reads its part through :meth:`delta` (or a subclass's factored form).

    Lifetime of a pass's results: ``inject`` installs hooks on the adapted model that compute them in a forward
    pre-hook, before any block runs, and drop them after the forward, so every pass builds a fresh graph (gradient
    accumulation safe) and no full-size tensors are held between steps. Computing them before the blocks matters
    under activation checkpointing: a checkpointed block that computed them would compute them again when it is
    recomputed in backward, which torch refuses (``CheckpointError: Recomputed values ... different metadata``).
    The recomputed block must instead read this pass's very tensors, which :func:`recompute_context` gives it.
    A member used outside the model's forward (a block called alone) computes them on first use.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: Any = None

    def compute_deltas(self) -> Any:
        """All members' updates at once; indexed by :meth:`delta`'s ``index``."""
        raise NotImplementedError

    def results(self) -> Any:
        """This pass's shared results, computed now unless the model's pre-hook has already done so."""
        if self._cache is None:
            self._cache = self.compute_deltas()
        return self._cache

    def delta(self, index: Any) -> torch.Tensor:
        return self.results()[index]

    def clear_cache(self) -> None:
        self._cache = None


class _BoundResults:
    """A context manager in which the given groups hold the given results (and afterwards what they held before).

    Entering it again is allowed: a graph kept with ``retain_graph=True`` and back-propagated twice recomputes its
    checkpointed blocks twice."""

    def __init__(self, bound: list[tuple[AdapterGroup, Any]]) -> None:
        self._bound = bound
        self._before: list[list[Any]] = []

    def __enter__(self) -> "_BoundResults":
        self._before.append([group._cache for group, _ in self._bound])
        for group, results in self._bound:
            group._cache = results
        return self

    def __exit__(self, *exc: Any) -> bool:
        for (group, _), before in zip(self._bound, self._before.pop()):
            group._cache = before
        return False


def recompute_context(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The ``context_fn`` of ``torch.utils.checkpoint`` (non-reentrant) for a checkpointed ``module``: nothing in
    the forward; in the recomputation, the adapter groups of the members inside ``module`` hold again the results
    they held when the forward ran (captured now), however many passes ran since.

    Without it a recomputed block would find the results already dropped (or another pass's) and compute its own:
    extra saved tensors, which torch refuses, and a graph not connected to the forward's. A group that had no
    results yet at the forward (the block computed them itself) gets none again, so the recomputation repeats that
    computation too, as the forward did.
    """
    groups: dict[int, AdapterGroup] = {}
    for layer in module.modules():
        if isinstance(layer, GroupMemberLayer):
            groups.setdefault(id(layer.group), layer.group)
    if not groups:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _BoundResults([(group, group._cache) for group in groups.values()])


class GroupMemberLayer(AdapterLayer):
    """A layer whose ΔW is a slice of an :class:`AdapterGroup`'s result. It owns no parameters of its own."""

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str, group: AdapterGroup, index: Any) -> None:
        super().__init__(base_layer, cfg, name)
        # Held in a tuple so the group is not registered twice (it lives once on the model).
        self._group_ref = (group,)
        self.index = index

    @property
    def group(self) -> AdapterGroup:
        return self._group_ref[0]

    def delta_weight(self) -> torch.Tensor:
        return self.group.delta(self.index).reshape(self.base_layer.weight.shape)

    def extra_repr(self) -> str:
        return f"method={self.method}, group={type(self.group).__name__}, index={self.index}, merged={self.merged}"
