"""Cross-layer tensor adapters for transformer stacks: LoRA-PT, tCURLoRA and LoTR.

The linear layers of a ViT's transformer blocks are stacked by role into three real 3-way tensors (slice-first
layout ``(n, d_out, d_in)``, see :mod:`.tensor_algebra`):

* ``sa`` - self-attention: per block ``out_proj``, ``q``, ``k``, ``v`` (MONAI fuses q, k, v into one ``qkv`` Linear
  whose weight rows are [q; k; v]; it is split into its three row blocks). 4 slices of d × d per block.
* ``up`` - ``mlp.linear1``: one slice of d_mlp × d per block.
* ``down`` - ``mlp.linear2``: one slice of d × d_mlp per block.

For the paper's UNETR (12 blocks, d = 768, d_mlp = 3072) that is 48 slices of 768 × 768 and 12 + 12 slices of
3072 × 768 / 768 × 3072, as in LoRA-PT and tCURLoRA.

One :class:`~.base.AdapterGroup` per stack owns the trainable factors and computes the update of every slice at once
per forward pass (rfft of the small factors, one batched product per frequency, one irfft); each wrapped layer is a
:class:`~.base.GroupMemberLayer` reading its slice (``qkv`` reads three consecutive slices, a free reshape since
they are adjacent in the stack). Methods:

* ``lora-pt`` (He et al., 2024): truncated t-SVD ``W ≈ U * S * Vᵀ`` at tubal rank r; U, S (f-diagonal, stored as
  its diagonal tubes) and V train, the residual ``W − U₀ * S₀ * V₀ᵀ`` is folded into the frozen base weights, so
  the output is unchanged at start. Adapter size per stack: n·(d_out·r + d_in·r + r).
* ``tcurlora`` (He et al., 2025): tensor CUR. Columns I and rows J chosen deterministically from the Fourier-domain
  tensor; ``C = W(:, I, :)``, ``R = W(J, :, :)`` frozen; U (r × r per slice) trains, starting at
  ``U₀ = W(J, I, :)⁺`` (t-pseudo-inverse); ``ΔW = C * (U − U₀) * R``, zero at start. Adapter size: n·r² per stack.
* ``lotr`` (Bershatsky et al., 2024): Tucker-2 update ``ΔW_l = (α/r) · L · M_l · Rᵀ`` with ``L`` (d_out × r) and
  ``R`` (d_in × r) shared by the stack and ``M_l`` (r × r) per slice, zero at start. L and R start with orthonormal
  columns (QR of a seeded Gaussian), so with M = 0 the gradient of every M_l, ``Lᵀ G_l R``, is non-zero.
  Adapter size per stack: d_out·r + d_in·r + n·r². Option ``stacks``: ``sa-up-down`` (default, the stacks above)
  or ``qkv-proj-up-down`` (four stacks, qkv fused: the grouping behind the LoRA-PT paper's LoTR count; see
  :data:`STACK_LAYOUTS`).

All factors are ``nn.Parameter`` s of the group modules, which ``inject`` registers on the model under
``model.tensorpeft_groups``: optimisers and ``state_dict`` see them. (The authors' released LoRA-PT / tCURLoRA
scripts keep their factors in a Python list outside the model and the optimiser, so their adapters never train.)
Frozen helpers (C, R, U₀, the selected indices) are non-persistent buffers: ``inject`` recomputes them from the base
weights, so saved adapters hold only what trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterGroup, GroupMemberLayer, seeded_generator
from .config import AdapterConfig, AdapterError
from .registry import MethodSpec, Wrapped, register
from .tensor_algebra import (
    CIRCULANT_MAX_INNER,
    circulant_operands,
    t_diag_transpose_product,
    t_pinv,
    t_product,
    truncated_t_svd,
)

# Last two components of a module name -> (stack, role). MONAI's TransformerBlock: attn (SABlock) and mlp (MLPBlock).
_ROLES: dict[str, tuple[str, str]] = {
    "attn.out_proj": ("sa", "out_proj"),
    "attn.qkv": ("sa", "qkv"),
    "mlp.linear1": ("up", "linear1"),
    "mlp.linear2": ("down", "linear2"),
}
#: How the layers are grouped into stacks: layout -> {stack name: roles in slice order within a block}.
#:
#: * ``sa-up-down`` (LoRA-PT's and tCURLoRA's layout, the default of all three methods): three stacks; the fused
#:   ``qkv`` weight is split into its q, k, v row blocks, which join ``out_proj`` in the ``sa`` stack (the papers'
#:   order: out_proj, q, k, v).
#: * ``qkv-proj-up-down`` (``lotr`` option ``stacks``): one stack per weight shape, each layer's whole weight one
#:   slice, ``qkv`` kept fused (2304 × 768 on the paper UNETR). This is the grouping the LoRA-PT paper's LoTR count
#:   fits: at r = 2, 24,768 adapter + 2,678,562 decoder = 2,703,330 trainable (paper 2.7033M), where the default
#:   layout gives 18,720 + 2,678,562 = 2,697,282.
STACK_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sa-up-down": {"sa": ("out_proj", "qkv"), "up": ("linear1",), "down": ("linear2",)},
    "qkv-proj-up-down": {"qkv": ("qkv",), "proj": ("out_proj",), "up": ("linear1",), "down": ("linear2",)},
}
DEFAULT_LAYOUT = "sa-up-down"
#: layouts that split the fused qkv weight into three slices (q, k, v)
_SPLITS_QKV = {"sa-up-down": True, "qkv-proj-up-down": False}
_ROLE_LIST = ", ".join(_ROLES)

#: default targets on models that are not UNETR (e.g. a bare MONAI ViT): every transformer-block linear layer
VIT_TARGETS = [r"blocks\.\d+\.attn\.(qkv|out_proj)", r"blocks\.\d+\.mlp\.linear[12]"]


# --------------------------------------------------------------------------------------------- stacking


@dataclass
class StackMember:
    """One wrapped layer's place in a stack: slices ``start .. start + count − 1``."""

    name: str
    layer: nn.Linear
    start: int
    count: int



@dataclass
class LayerStack:
    """The layers of one role stacked into a 3-way tensor of ``n`` slices of ``rows × cols``."""

    name: str
    members: list[StackMember]
    n: int
    rows: int
    cols: int

    def weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stacked base weights, a detached copy ``(n, rows, cols)``."""
        parts = [m.layer.weight.detach().to(dtype).reshape(m.count, self.rows, self.cols) for m in self.members]
        return torch.cat(parts, dim=0)


def build_stacks(selected: list[tuple[str, nn.Module]], method: str, layout: str = DEFAULT_LAYOUT) -> list[LayerStack]:
    """Group the selected transformer-block layers into the stacks of ``layout`` (see :data:`STACK_LAYOUTS`;
    the default gives ``sa``, ``up`` and ``down``).

    A stack is built from whatever roles the targets select (narrowing the targets to attention gives only ``sa``),
    but every block in a stack must contribute the same roles and every slice must have the same shape; anything
    else cannot be stacked and raises :class:`AdapterError` naming the layers.
    """
    blocks: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in selected:
        key = ".".join(name.split(".")[-2:])
        if key not in _ROLES or not isinstance(module, nn.Linear):
            raise AdapterError(
                f"{method} stacks the linear layers of transformer blocks ({_ROLE_LIST}); {name} "
                f"({type(module).__name__}) is none of these - leave it out of --targets"
            )
        block = name[: -len(key)].rstrip(".")
        blocks.setdefault(block, {})[_ROLES[key][1]] = (name, module)

    if layout not in STACK_LAYOUTS:
        raise AdapterError(f"{method}: option stacks must be one of {', '.join(STACK_LAYOUTS)}, got {layout!r}")
    stacks = []
    for stack_name, roles in STACK_LAYOUTS[layout].items():
        in_stack = [b for b, found in blocks.items() if any(r in found for r in roles)]
        if not in_stack:
            continue
        present = [r for r in roles if any(r in blocks[b] for b in in_stack)]
        members: list[StackMember] = []
        shapes: dict[tuple[int, int], str] = {}
        for block in in_stack:
            missing = [r for r in present if r not in blocks[block]]
            if missing:
                raise AdapterError(
                    f"{method} cannot stack the {stack_name} layers: block {block or '(root)'} has no selected "
                    f"{', '.join(missing)}, which other blocks have; select the same layers in every block"
                )
            for role in present:
                name, layer = blocks[block][role]
                count = 3 if role == "qkv" and _SPLITS_QKV[layout] else 1
                out_dim, in_dim = layer.weight.shape
                if out_dim % count:
                    raise AdapterError(f"{method}: {name} has {out_dim} outputs, not divisible into {count} equal "
                                       f"blocks (q, k, v)")
                shapes.setdefault((out_dim // count, in_dim), name)
                members.append(StackMember(name, layer, sum(m.count for m in members), count))
        if len(shapes) > 1:
            listed = "; ".join(f"{r}×{c} ({where})" for (r, c), where in shapes.items())
            raise AdapterError(
                f"{method} cannot stack the {stack_name} layers: their slices differ in size ({listed}); "
                f"all blocks of the ViT must have the same width - use a per-layer method such as lora instead"
            )
        (rows, cols), = shapes
        stacks.append(LayerStack(stack_name, members, sum(m.count for m in members), rows, cols))
    return stacks


# --------------------------------------------------------------------------------------------- groups


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # CPU FFTs have no half precision; reduced-precision models compute their updates in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class StackSlices(Sequence[torch.Tensor]):
    """One forward pass's updates of a stack's members; item i is member i's ``(count_i, rows, cols)`` ΔW.

    Either *factored* - ``ΔW`` of slice c of member i is ``left @ rights[i][c]`` with ``left (rows, k)`` shared by
    the stack and ``rights[i] (count_i, k, cols)`` - or given as ``full`` pieces; :meth:`factored` lets a member apply
    its update to activations without materialising it.

    A factored item is materialised by the member reading it, each time it is read, and not kept: every member
    reads its own item once per pass, and under activation checkpointing a recomputed block must repeat exactly
    the operations of its forward, so its reads must not find a result left from the forward (the shared
    ``left``/``rights``, computed before the blocks, are the part that is kept).
    """

    def __init__(self, sizes: list[int], left: torch.Tensor | None = None,
                 rights: Sequence[torch.Tensor] | None = None, full: Sequence[torch.Tensor] | None = None) -> None:
        self._sizes = sizes
        self._left, self._rights, self._full = left, rights, full

    def factored(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(left (rows, k), right (count, k, cols))`` of member ``index``, or None when not factored."""
        if self._rights is None:
            return None
        return self._left, self._rights[index]

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < len(self._sizes):
            raise IndexError(index)
        if self._full is not None:
            return self._full[index]
        right = self._rights[index]
        left = self._left
        if right.shape[0] == 1:
            return (left @ right[0]).unsqueeze(0)
        return torch.bmm(left.expand(right.shape[0], *left.shape), right)  # in place, no fold-and-copy

    def __len__(self) -> int:
        return len(self._sizes)


class TensorStackGroup(AdapterGroup):
    """Factors of one stack.

    Per forward pass the group prepares once what its members share (:meth:`compute_deltas`: small FFTs, the
    circulant arrangement of a thin factor, split per member in single operations) as a :class:`StackSlices`;
    member i reads its ``(count, rows, cols)`` update from it (scaling included; a fused qkv layer gets its three
    adjacent slices, reshaped to its ``(3·rows, cols)`` weight), or its factored form.

    Why not one ``(n, rows, cols)`` tensor indexed by the members: measured on the paper UNETR, materialising the
    whole stack spent most of its time outside arithmetic - allocating and copying the full-size result and, with
    per-member indexing, autograd building a full-size zero gradient per member. And in training the members use
    the factored form ``ΔW_k = left @ right_k`` on activations when that is cheaper (see
    :meth:`StackMemberLayer.adapter_forward`), which also spares the full weight gradient of every ViT layer.
    """

    method: str = "?"

    def __init__(self, stack: LayerStack, cfg: AdapterConfig) -> None:
        super().__init__()
        self.stack_name = stack.name
        self.n, self.rows, self.cols = stack.n, stack.rows, stack.cols
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        self.member_names = [m.name for m in stack.members]
        self.member_sizes = [m.count for m in stack.members]

    def compute_deltas(self) -> StackSlices:
        """This pass's updates of all members (prepared once; see :class:`StackSlices`)."""
        raise NotImplementedError

    def factored(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.results().factored(index)

    def stack_delta(self) -> torch.Tensor:
        """ΔW of every slice, ``(n, rows, cols)`` (for inspection and tests)."""
        slices = self.compute_deltas()
        return torch.cat([slices[i] for i in range(len(slices))], dim=0)

    def extra_repr(self) -> str:
        return (f"stack={self.stack_name}, slices={self.n}, slice={self.rows}×{self.cols}, rank={self.rank}, "
                f"scaling={self.scaling:g}")


def thin_product_members(a: torch.Tensor, b: torch.Tensor, sizes: list[int]) -> StackSlices:
    """``A * B`` for a thin inner size, as runs of ``sizes`` consecutive slices.

    ``n · inner ≤ CIRCULANT_MAX_INNER``: factored through the circulant operands (``(A*B)_k = a_row @ b_circ[k]``),
    prepared once and split per member in one operation (its backward is one concatenation of small blocks).
    Larger: one FFT product for the stack, split.
    """
    n, _, inner = a.shape
    if n * inner > CIRCULANT_MAX_INNER:
        return StackSlices(sizes, full=t_product(a, b).split(sizes, dim=0))
    a_row, b_circ = circulant_operands(a, b)
    return StackSlices(sizes, left=a_row, rights=b_circ.split(sizes, dim=0))


class LoRAPTGroup(TensorStackGroup):
    """LoRA-PT: trainable principal t-SVD factors; the frozen residual lives in the base weights.

    Parameters: ``U (n, rows, r)``, ``S (n, r)`` (diagonal tubes of the f-diagonal core), ``V (n, cols, r)``, all real.
    ``ΔW = scaling · U * f_diagonal(S) * Vᵀ``; S starts at S₀ / scaling so ΔW starts at the principal part.
    """

    method = "lora-pt"

    def __init__(self, stack: LayerStack, cfg: AdapterConfig, weights: torch.Tensor, power_iters: int | None) -> None:
        super().__init__(stack, cfg)
        dtype = weights.dtype
        u, s, v = truncated_t_svd(weights.to(_compute_dtype(dtype)), cfg.rank, power_iters=power_iters,
                                  generator=seeded_generator(cfg, f"lora-pt.{stack.name}"))
        self.U = nn.Parameter(u.to(dtype))
        self.S = nn.Parameter((s / self.scaling).to(dtype))
        self.V = nn.Parameter(v.to(dtype))

    def compute_deltas(self) -> StackSlices:
        dtype = _compute_dtype(self.U.dtype)
        right = t_diag_transpose_product(self.S.to(dtype) * self.scaling, self.V.to(dtype))  # S * Vᵀ, (n, r, cols)
        return thin_product_members(self.U.to(dtype), right, self.member_sizes)


class TCURLoRAGroup(TensorStackGroup):
    """tCURLoRA: ``ΔW = scaling · C * (U − U₀) * R`` with C, R, U₀ frozen buffers and U ``(n, r, r)`` trainable."""

    method = "tcurlora"

    def __init__(self, stack: LayerStack, cfg: AdapterConfig, weights: torch.Tensor) -> None:
        super().__init__(stack, cfg)
        dtype = weights.dtype
        w = weights.to(_compute_dtype(dtype))
        cols, rows = select_columns_rows(w, cfg.rank)
        core = w[:, rows][:, :, cols]  # W(J, I, :), (n, r, r)
        u0 = t_pinv(core)
        # All recomputable from the base weights: not saved with the adapter.
        self.register_buffer("col_index", cols, persistent=False)
        self.register_buffer("row_index", rows, persistent=False)
        self.register_buffer("C", w[:, :, cols].to(dtype), persistent=False)  # (n, rows, r)
        self.register_buffer("R", w[:, rows, :].to(dtype), persistent=False)  # (n, r, cols)
        self.register_buffer("U0", u0.to(dtype), persistent=False)  # (n, r, r)
        self.U = nn.Parameter(u0.to(dtype).clone())

    def compute_deltas(self) -> StackSlices:
        dtype = _compute_dtype(self.U.dtype)
        # The thin factor C * (U − U₀) (n, rows, r) by FFT (small); then the thin product with R per member.
        left = t_product(self.C.to(dtype), (self.U - self.U0).to(dtype) * self.scaling)
        return thin_product_members(left, self.R.to(dtype), self.member_sizes)


def select_columns_rows(weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tCURLoRA's deterministic choice of columns I and rows J (as in the authors' released code).

    Columns: the ``rank`` largest column norms of the Fourier-domain tensor, summed over all n frequency slices.
    Rows: the ``rank`` largest row norms of the column-restricted Fourier-domain tensor ``Ŵ(:, I, :)``.
    Only the rfft half is computed; the mirrored bins n−f have the same norms, so inner bins count twice.
    Ties are broken by the lower index (stable sort), so the choice repeats exactly.

    Args:
        weights: real ``(n, rows, cols)``.

    Returns:
        ``(I, J)``: int64 index tensors of length ``rank`` (in order of decreasing score).
    """
    n = weights.shape[0]
    w_hat = torch.fft.rfft(weights, dim=0)  # (F, rows, cols)
    mult = torch.full((w_hat.shape[0],), 2.0, dtype=weights.dtype, device=weights.device)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    col_score = (w_hat.abs().pow(2).sum(dim=1).sqrt() * mult[:, None]).sum(dim=0)  # (cols,)
    cols = torch.sort(col_score, descending=True, stable=True).indices[:rank]
    row_score = (w_hat[:, :, cols].abs().pow(2).sum(dim=2).sqrt() * mult[:, None]).sum(dim=0)  # (rows,)
    rows = torch.sort(row_score, descending=True, stable=True).indices[:rank]
    return cols, rows


class LoTRGroup(TensorStackGroup):
    """LoTR: ``ΔW_l = scaling · L · M_l · Rᵀ``; L ``(rows, r)`` and R ``(cols, r)`` shared, M ``(n, r, r)`` per slice."""

    method = "lotr"

    def __init__(self, stack: LayerStack, cfg: AdapterConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(stack, cfg)
        r = cfg.rank
        self.L = nn.Parameter(_orthonormal(self.rows, r, seeded_generator(cfg, f"lotr.{stack.name}.L")).to(device, dtype))
        self.R = nn.Parameter(_orthonormal(self.cols, r, seeded_generator(cfg, f"lotr.{stack.name}.R")).to(device, dtype))
        self.M = nn.Parameter(torch.zeros(self.n, r, r, device=device, dtype=dtype))

    def compute_deltas(self) -> StackSlices:
        # ΔW_l = (scaling·L) @ (M_l Rᵀ): the shared left factor and small (r × cols) right factors, split per member.
        rights = torch.matmul(self.M, self.R.mT).split(self.member_sizes, dim=0)
        return StackSlices(self.member_sizes, left=self.L * self.scaling, rights=rights)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``rows × cols`` matrix with orthonormal columns (rows ≥ cols), from the QR of a seeded Gaussian."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    # Sign-fix so the result depends on the generator only, not on the QR implementation's sign convention.
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))).float()


# --------------------------------------------------------------------------------------------- wrapping


class StackMemberLayer(GroupMemberLayer):
    """A transformer-block Linear whose ΔW is its slice(s) of a stack group's result."""

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str, group: TensorStackGroup, index: Any) -> None:
        super().__init__(base_layer, cfg, name, group, index)
        self.method = group.method

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + x ΔWᵀ`` through the factored form ``ΔW_c = left @ right_c`` when it is cheaper.

        Per slice, with T tokens and inner size k: the factored path costs about 3·T·k·(rows + cols) multiply-adds
        forward and backward; materialising ΔW costs 3·rows·k·cols to form it and T·rows·cols for the weight's
        gradient, which the factored path never needs (the base weight is frozen). For the paper UNETR (T = 216 at
        96³, k = n·r) the factored path is several times cheaper.
        """
        factored = self.group.factored(self.index)
        if factored is None:
            return super().adapter_forward(x)
        left, right = factored  # (rows, k), (count, k, cols)
        count, k, cols = right.shape
        rows = left.shape[0]
        tokens = x.numel() // max(1, cols)
        if 3 * tokens * k * (rows + cols) > 3 * rows * k * cols + tokens * rows * cols:
            return super().adapter_forward(x)
        dtype = self.base_layer.weight.dtype
        h = self.dropout(x)
        z = F.linear(h, right.reshape(count * k, cols).to(dtype))  # (..., count·k)
        z = z.unflatten(-1, (count, k)) @ left.mT.to(dtype)  # (..., count, rows): q, k, v blocks in order
        return self.base_layer(x) + z.flatten(-2)


def _check_rank(stack: LayerStack, rank: int, method: str) -> None:
    limit = min(stack.rows, stack.cols)
    if rank > limit:
        raise AdapterError(
            f"rank {rank} is too large for {method} on the {stack.name} stack (slices {stack.rows}×{stack.cols} "
            f"allow at most {limit}); lower --rank"
        )


def _svd_iters(cfg: AdapterConfig) -> int | None:
    """The ``svd_iters`` option: ``"auto"`` (default) or ``"exact"``: the exact top-r triplets of every frequency;
    or a number of power iterations of a randomized SVD.

    Exact on every size, because the randomized SVD is the paper's init only on weights whose spectrum decays
    (6e-7 off on trained weights): on the randomly initialised paper UNETR the old 8-iteration default's principal
    part was 95-122 % off the exact one (relative Frobenius norm per stack: another top direction). Measured there
    (r = 1, CPU time, one thread): exact 11.6 s for the three stacks (sa 6.4, up 2.5, down 2.6), LAPACK's full SVD
    15.0 s, randomized 4.7 s; once per injection, against ~17 s for one training step at 128³ on the same CPU.
    """
    value = cfg.options.get("svd_iters", "auto")
    if value in (None, "auto", "exact"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AdapterError(f"option svd_iters must be 'auto', 'exact' or a whole number >= 0, got {value!r}")
    return value


def _stack_wrap(method: str, make_group: Callable[[LayerStack, AdapterConfig], TensorStackGroup],
                fold_residual: bool = False) -> Callable[[list[tuple[str, nn.Module]], AdapterConfig, dict], Wrapped]:
    """A registry ``wrap``: build the stacks, one group per stack, one member layer per selected layer.

    With ``fold_residual`` the group's initial update is subtracted from the base weights (LoRA-PT), using the very
    same ``compute_deltas`` the forward pass uses, so base + ΔW reproduces W to rounding.
    """

    def wrap(selected: list[tuple[str, nn.Module]], cfg: AdapterConfig, meta: dict[str, dict]) -> Wrapped:
        stacks = build_stacks(selected, method, cfg.options.get("stacks", DEFAULT_LAYOUT))
        layers: dict[str, GroupMemberLayer] = {}
        groups: dict[str, AdapterGroup] = {}
        for stack in stacks:
            _check_rank(stack, cfg.rank, method)
            group = make_group(stack, cfg)
            if fold_residual:
                with torch.no_grad():
                    initial = group.compute_deltas()
                    for i, m in enumerate(stack.members):
                        weight = m.layer.weight
                        weight.sub_(initial[i].reshape(weight.shape).to(weight.dtype))
            groups[stack.name] = group
            for i, m in enumerate(stack.members):
                layers[m.name] = StackMemberLayer(m.layer, cfg, m.name, group, i)
        return Wrapped(layers=layers, groups=groups)

    return wrap


def _make_lora_pt(stack: LayerStack, cfg: AdapterConfig) -> TensorStackGroup:
    dtype = stack.members[0].layer.weight.dtype
    return LoRAPTGroup(stack, cfg, stack.weights(dtype), _svd_iters(cfg))


def _make_tcurlora(stack: LayerStack, cfg: AdapterConfig) -> TensorStackGroup:
    return TCURLoRAGroup(stack, cfg, stack.weights(stack.members[0].layer.weight.dtype))


def _make_lotr(stack: LayerStack, cfg: AdapterConfig) -> TensorStackGroup:
    weight = stack.members[0].layer.weight
    return LoTRGroup(stack, cfg, weight.dtype, weight.device)


LORA_PT = register(
    MethodSpec(
        name="lora-pt",
        layer_types=(nn.Linear,),
        wrap=_stack_wrap("lora-pt", _make_lora_pt, fold_residual=True),
        options={"svd_iters": "auto"},
        targets={"generic": VIT_TARGETS},
    )
)

TCURLORA = register(
    MethodSpec(
        name="tcurlora",
        layer_types=(nn.Linear,),
        wrap=_stack_wrap("tcurlora", _make_tcurlora),
        targets={"generic": VIT_TARGETS},
    )
)

LOTR = register(
    MethodSpec(
        name="lotr",
        layer_types=(nn.Linear,),
        wrap=_stack_wrap("lotr", _make_lotr),
        options={"stacks": DEFAULT_LAYOUT},
        targets={"generic": VIT_TARGETS},
    )
)
