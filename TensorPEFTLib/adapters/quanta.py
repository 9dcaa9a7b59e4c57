"""QuanTA on Linear layers, and the tensor-network machinery TenVOO shares with it.

QuanTA (Chen et al., 2024, "Quantum-informed Tensor Adaptation"): the input and output features are each split into
three factors, ``in = i₁·i₂·i₃`` and ``out = o₁·o₂·o₃``, and ΔW is a chain of small operators that each act on two
of the three axes (like two-qubit gates in a circuit)::

    x[a, b, c]  --T₀ on (b, c)-->  --T₁ on (a, c')-->  --T₂ on (a', b')-->  y[a'', b'', c'']

- equal factorisations in and out (e.g. 512 → 512): full "gates" ``T₀ (i₂i₃ × i₂i₃)``, ``T₁ (i₁i₃ × i₁i₃)``,
  ``T₂ (i₁i₂ × i₁i₂)``; ``Σ (f_a·f_b)²`` parameters, the rank is not used (QuanTA's own design);
- different factorisations (e.g. 128 → 512, the DDPM's ``time_emb_proj``): the TenVOO authors' rank-r chain
  ``T₀ (r·r × i₂·i₃)``, ``T₁ (r·o₃ × i₁·r)``, ``T₂ (o₁·o₂ × r·r)``; ``r²·(i₂i₃ + o₃i₁ + o₁o₂)`` parameters.

Both structures are one einsum equation with different sizes (see :func:`quanta_network`).

Shared machinery (also used by :mod:`.tenvoo`):

- :func:`channel_factors`: the TenVOO authors' three-factor table for the sizes it lists, a balanced split for any
  other size, an :class:`AdapterError` for sizes with no sensible split (a large prime factor).
- :class:`ContractionPlan`: an optimal pairwise contraction order for a tensor network, found once per
  (equation, shapes) by dynamic programming over subsets (n ≤ ~12 cores) and cached, then executed as a sequence of
  two-operand ``torch.einsum`` calls (each a single batched matmul). ``opt_einsum`` is not needed.
- :class:`TensorNetworkLayer`: cores as parameters, ΔW = scale · T(θ) built once per forward pass, and the two
  initialisations of the TenVOO paper: ``frozen-copy`` (random cores θ₀, ΔW = scale·(T(θ) − T(θ₀)), zero at start)
  and ``zero`` (the last core starts at zero, ΔW = scale·T(θ) = 0 at start).

Why T(θ₀) is kept as a buffer instead of folded into the base weight (W − T(θ₀)): with the released Kaiming-uniform
cores, T(θ₀) is far larger than W (std ≈ 0.5 on a 512→512 3×3×3 layer at r = 4, against ≈ 0.01 for W), so a folded
float32 residual loses W's low bits: the tiny DDPM's output moved by 1–2e-5 at injection. Keeping W untouched and
T(θ₀) as a non-persistent buffer computed by the very same contraction makes ΔW exactly zero at start, keeps the
pretrained weight intact (merge/unmerge round-trips W itself), and costs one elementwise subtraction per forward pass
plus one weight-sized buffer per adapted layer.

θ₀ and T(θ₀) are *not* written to the adapter file: θ₀ is drawn from a generator seeded by ``(cfg.seed, layer
name)`` (:func:`~.base.seeded_generator`), so ``load_adapter`` (which re-injects before copying the saved θ) rebuilds
it bit for bit. To catch the case where it would not (another torch RNG), each layer's ``layer_meta`` stores a
checksum of θ₀ and re-injection refuses a mismatch instead of silently loading an adapter against the wrong θ₀.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import AdapterLayer
from .config import AdapterConfig, AdapterError
from .registry import MethodSpec, per_layer, register

# --------------------------------------------------------------------------------------------- factorisation

#: The TenVOO authors' channel table (``TENVOO_LIST`` in their release): channels -> [f₁, f₂, f₃].
TENVOO_CHANNEL_TABLE: dict[int, tuple[int, int, int]] = {
    1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 6: (3, 2, 1), 8: (2, 2, 2), 12: (4, 3, 1), 16: (4, 2, 2),
    24: (4, 3, 2), 32: (4, 4, 2), 48: (8, 3, 2), 64: (8, 4, 2), 96: (8, 4, 3), 128: (8, 8, 2), 192: (8, 6, 4),
    256: (8, 8, 4), 384: (8, 8, 6), 512: (16, 8, 4), 768: (16, 8, 6), 1024: (16, 16, 4),
}

#: A split whose largest factor exceeds max(this, ⌈√n⌉) is refused: it would be a nearly dense core (e.g. a prime
#: number of channels), which defeats the point of the factorisation.
MAX_PLAIN_FACTOR = 16


def balanced_factors(n: int) -> tuple[int, int, int]:
    """The split ``n = a·b·c`` (a ≥ b ≥ c) with the smallest largest factor, then the closest b and c."""
    best: tuple[int, int, int] | None = None
    for a in range(1, n + 1):
        if n % a:
            continue
        rest = n // a
        for b in range(1, a + 1):
            if rest % b or rest // b > b:
                continue
            candidate = (a, b, rest // b)
            if best is None or (candidate[0], candidate[1]) < (best[0], best[1]):
                best = candidate
    assert best is not None
    return best


def channel_factors(n: int, overrides: dict | None = None, where: str = "") -> tuple[int, int, int]:
    """Three factors of a channel/feature count ``n`` (largest first).

    Order of precedence: ``overrides`` (the method option ``factors``, keys may be strings as read from JSON), the
    authors' table, a balanced split. Raises :class:`AdapterError` when no sensible split exists.
    """
    if overrides:
        given = overrides.get(n, overrides.get(str(n)))
        if given is not None:
            factors = tuple(int(f) for f in given)
            if len(factors) != 3 or min(factors) < 1 or math.prod(factors) != n:
                raise AdapterError(f"factors option for {n} must be three whole numbers whose product is {n}, got {given!r}")
            return factors  # type: ignore[return-value]
    if n < 1:
        raise AdapterError(f"{where or 'layer'}: cannot factorise {n} channels")
    if n in TENVOO_CHANNEL_TABLE:
        return TENVOO_CHANNEL_TABLE[n]
    factors = balanced_factors(n)
    limit = max(MAX_PLAIN_FACTOR, math.isqrt(n - 1) + 1)
    if factors[0] > limit:
        raise AdapterError(
            f"{where or 'layer'}: {n} channels have no sensible three-factor split (best is "
            f"{'×'.join(map(str, factors))}, a factor above {limit}); give one with options={{'factors': {{{n}: [a, b, c]}}}} "
            f"or leave the layer out of --targets"
        )
    return factors


# --------------------------------------------------------------------------------------------- contraction plans


def _parse(equation: str) -> tuple[list[str], str]:
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    return lhs.split(","), rhs


class ContractionPlan:
    """An optimal pairwise contraction order for ``equation`` at fixed operand shapes.

    Found by dynamic programming over subsets of operands (cost = multiply-adds of each pairwise step, the sum
    minimised), so it costs O(3ⁿ) once - about 30 ms for TenVOO's ten cores - and nothing per call. Each step is a
    two-operand einsum, which torch runs as one (batched) matmul.

    Args:
        equation: ``"ab,bc->ac"`` style, every index a single letter, each output index present in some operand.
        shapes: one shape per operand.
    """

    def __init__(self, equation: str, shapes: Sequence[Sequence[int]]) -> None:
        inputs, output = _parse(equation)
        if len(inputs) != len(shapes):
            raise ValueError(f"{equation}: {len(inputs)} operands but {len(shapes)} shapes")
        sizes: dict[str, int] = {}
        for term, shape in zip(inputs, shapes):
            if len(term) != len(shape):
                raise ValueError(f"{equation}: operand {term} has {len(shape)} dimensions")
            for index, size in zip(term, shape):
                if sizes.setdefault(index, int(size)) != int(size):
                    raise ValueError(f"{equation}: index {index} has sizes {sizes[index]} and {size}")
        self.equation = equation
        self.output = output
        self.sizes = sizes
        n = len(inputs)
        full = (1 << n) - 1
        letters = sorted(sizes)
        bit = {c: 1 << k for k, c in enumerate(letters)}
        term_bits = [sum(bit[c] for c in set(t)) for t in inputs]
        out_bits = sum(bit[c] for c in set(output))
        products: dict[int, int] = {}

        def product(bits: int) -> int:  # size of the index space of a set of indices (memoised)
            value = products.get(bits)
            if value is None:
                value = math.prod(sizes[c] for c in letters if bits & bit[c])
                products[bits] = value
            return value

        # What the contraction of a subset keeps: its indices also used outside it or in the output. A leaf keeps
        # all of its own (dangling ones are summed in its first step).
        inside = [0] * (full + 1)
        for mask in range(1, full + 1):
            low = (mask & -mask).bit_length() - 1
            inside[mask] = inside[mask & (mask - 1)] | term_bits[low]
        kept_bits = [0] * (full + 1)
        for mask in range(1, full + 1):
            kept_bits[mask] = inside[mask] & (inside[full ^ mask] | out_bits)
        for i in range(n):
            kept_bits[1 << i] = term_bits[i]
        cost = [0.0] * (full + 1)
        split: dict[int, tuple[int, int]] = {}
        for mask in sorted(range(1, full + 1), key=lambda m: bin(m).count("1")):
            if mask & (mask - 1) == 0:
                continue
            low = mask & -mask
            rest = mask ^ low
            best_cost, best_split = math.inf, None
            sub = rest
            while True:  # every split (left ∋ lowest operand, right = the others), right non-empty
                left = low | sub
                right = mask ^ left
                if right:
                    c = cost[left] + cost[right] + product(kept_bits[left] | kept_bits[right])
                    if c < best_cost:
                        best_cost, best_split = c, (left, right)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            cost[mask] = best_cost
            split[mask] = best_split  # type: ignore[assignment]

        def letters_of(bits: int) -> str:
            chosen = [c for c in letters if bits & bit[c]]
            return "".join(sorted(chosen, key=lambda c: (output.find(c) if c in output else 99, c)))

        kept = {mask: letters_of(kept_bits[mask]) for mask in range(1, full + 1)}
        for i in range(n):
            kept[1 << i] = inputs[i]
        best = {mask: (cost[mask], split.get(mask)) for mask in range(1, full + 1)}
        kept[full] = output
        self.cost = best[full][0]
        # Flatten the tree into steps over a working list: (position a, position b, two-operand equation).
        steps: list[tuple[int, int, str]] = []
        slots: list[int] = list(range(n))  # which leaf/intermediate (by mask) sits at each working position
        slot_masks: list[int] = [1 << i for i in range(n)]

        def emit(mask: int) -> None:
            if mask in slot_masks:
                return
            left, right = best[mask][1]
            emit(left)
            emit(right)
            a, b = slot_masks.index(left), slot_masks.index(right)
            steps.append((a, b, f"{kept[left]},{kept[right]}->{kept[mask]}"))
            for pos in sorted((a, b), reverse=True):
                slot_masks.pop(pos)
                slots.pop(pos)
            slot_masks.append(mask)
            slots.append(mask)

        emit(full)
        if n == 1:
            steps = []
        self.steps = steps
        self._single = f"{inputs[0]}->{output}" if n == 1 else None

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        if self._single is not None:
            return torch.einsum(self._single, operands[0])
        work = list(operands)
        for a, b, eq in self.steps:
            x, y = work[a], work[b]
            for pos in sorted((a, b), reverse=True):
                work.pop(pos)
            work.append(torch.einsum(eq, x, y))
        return work[0]

    def __repr__(self) -> str:
        return f"ContractionPlan({self.equation!r}, steps={len(self.steps)}, cost={self.cost:.3g})"


_PLANS: dict[tuple[str, tuple[tuple[int, ...], ...]], ContractionPlan] = {}


def contraction_plan(equation: str, shapes: Sequence[Sequence[int]]) -> ContractionPlan:
    """The cached :class:`ContractionPlan`: planned once per (equation, shapes), shared by same-shaped layers."""
    key = (equation, tuple(tuple(int(s) for s in shape) for shape in shapes))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = ContractionPlan(equation, key[1])
    return plan


# --------------------------------------------------------------------------------------------- layers

INIT_MODES = ("frozen-copy", "zero")


def uniform_init_(tensor: torch.Tensor, fan_in: int, gain: float, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform U(-b, b), b = gain·√(3 / fan_in), drawn on the CPU generator (same values on any device)."""
    bound = gain * math.sqrt(3.0 / max(1, fan_in))
    with torch.no_grad():
        values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        tensor.copy_(values.to(tensor.dtype))
    return tensor


class TensorNetworkLayer(AdapterLayer):
    """ΔW = scale · contraction of trainable cores, reshaped to the base weight.

    Subclasses pass the network (equation with the output in the base weight's axis order, core shapes) and the
    initialisation gain. Core ``k`` is initialised Kaiming-uniform with fan-in = the product of its last two sizes
    (the authors' matrix view of a 4-way core), ``gain`` √2 for convolutions and 1 for linear layers, as released.
    """

    #: options key for the init mode
    init_key = "init"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str, equation: str,
                 core_shapes: Sequence[Sequence[int]], gain: float, meta: dict | None = None) -> None:
        super().__init__(base_layer, cfg, name)
        init = str(cfg.options.get(self.init_key, "frozen-copy")).lower()
        if init not in INIT_MODES:
            raise AdapterError(f"{self.method} option init must be one of {', '.join(INIT_MODES)}, got {init!r}")
        self.init_mode = init
        weight = base_layer.weight
        # Planned on first use (injection for frozen-copy, first forward otherwise) and shared by same-shaped layers.
        self._plan_key = (equation, [tuple(int(d) for d in shape) for shape in core_shapes])
        self._plan: ContractionPlan | None = None
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(tuple(shape), device=weight.device, dtype=weight.dtype)) for shape in core_shapes]
        )
        gen = _layer_generator(cfg, name)
        for core in self.cores:
            fan_in = int(core.shape[-1] * core.shape[-2]) if core.dim() >= 2 else int(core.numel())
            uniform_init_(core.data, fan_in, gain, gen)
        self._theta0_checksum: float | None = None
        self.theta0_network: torch.Tensor | None
        if init == "zero":
            with torch.no_grad():
                self.cores[-1].zero_()
            self.register_buffer("theta0_network", None, persistent=False)
        else:
            # T(θ₀) by the same contraction path and dtype as the forward pass, so T(θ) − T(θ₀) is exactly 0 at start
            # (see the module docstring for why it is not folded into W). Not saved: rebuilt from the seed.
            with torch.no_grad():
                self.register_buffer("theta0_network", self.plan(*self.cores).detach().clone(), persistent=False)
            self._theta0_checksum = _checksum(self.cores)
            saved = (meta or {}).get("theta0_checksum")
            if saved is not None and not math.isclose(saved, self._theta0_checksum, rel_tol=1e-9, abs_tol=1e-12):
                raise AdapterError(
                    f"{name}: the frozen copy θ₀ rebuilt from seed {cfg.seed} differs from the one this adapter was trained "
                    f"with (checksum {self._theta0_checksum!r} vs saved {saved!r}; another torch version's random "
                    f"generator?). The adapter cannot be loaded faithfully here"
                )

    @property
    def plan(self) -> ContractionPlan:
        if self._plan is None:
            self._plan = contraction_plan(*self._plan_key)
        return self._plan

    @plan.setter
    def plan(self, value: ContractionPlan) -> None:
        self._plan = value

    def network(self) -> torch.Tensor:
        """T(θ) − T(θ₀) (frozen-copy) or T(θ) (zero init) in the base weight's layout, without scaling.

        Contracted in float32 with autocast off: under bf16/fp16 autocast the chain of einsums runs in low precision
        and T(θ) − T(θ₀), which must cancel exactly at the start, left a residue as large as the weights (benchmarks
        measured ΔW up to 0.034 at injection under bf16)."""
        with torch.autocast(device_type=self.cores[0].device.type, enabled=False):
            t = self.plan(*(core.float() for core in self.cores))
            if self.theta0_network is not None:
                t = t - self.theta0_network.float()
        return t.reshape(self.base_layer.weight.shape).to(self.base_layer.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.network() * self.scaling

    def layer_meta(self) -> dict[str, Any]:
        return {} if self._theta0_checksum is None else {"theta0_checksum": self._theta0_checksum}

    def extra_repr(self) -> str:
        shapes = ", ".join("×".join(map(str, c.shape)) for c in self.cores)
        return f"init={self.init_mode}, cores=[{shapes}], scaling={self.scaling:g}, merged={self.merged}"


def _layer_generator(cfg: AdapterConfig, name: str) -> torch.Generator:
    from .base import seeded_generator

    return seeded_generator(cfg, name)


def _checksum(cores: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for k, core in enumerate(cores):
        values = core.detach().to("cpu", torch.float64)
        total += float(values.sum()) + (k + 1) * float(values.square().sum())
    return total


#: One equation for both QuanTA structures (sizes differ). Input axes a, b, c = i₁, i₂, i₃ (i₁ most significant in
#: the flattened feature index); T₀ maps (b, c) -> (B, C), T₁ maps (a, C) -> (D, E), T₂ maps (D, B) -> (F, G).
#: Output (F, G, E, a, b, c) = (o₁, o₂, o₃, i₁, i₂, i₃), i.e. the weight's (out, in) after a reshape.
QUANTA_EQUATION = "BCbc,DEaC,FGDB->FGEabc"


def quanta_core_shapes(in_factors: Sequence[int], out_factors: Sequence[int], rank: int) -> list[tuple[int, ...]]:
    """Core shapes of QuanTA for ``in = i₁i₂i₃``, ``out = o₁o₂o₃`` (see the module docstring)."""
    i1, i2, i3 = in_factors
    o1, o2, o3 = out_factors
    if tuple(in_factors) == tuple(out_factors):
        return [(i2, i3, i2, i3), (i1, i3, i1, i3), (i1, i2, i1, i2)]
    r = rank
    return [(r, r, i2, i3), (r, o3, i1, r), (o1, o2, r, r)]


def quanta_parameter_count(in_features: int, out_features: int, rank: int, overrides: dict | None = None) -> int:
    """The formula of the reference: Σ (f_a f_b)² for equal splits, else r²(i₂i₃ + o₃i₁ + o₁o₂)."""
    fi = channel_factors(in_features, overrides)
    fo = channel_factors(out_features, overrides)
    if fi == fo:
        return sum((a * b) ** 2 for a, b in itertools.combinations(fi, 2))
    return rank * rank * (fi[1] * fi[2] + fo[2] * fi[0] + fo[0] * fo[1])


class QuanTALayer(TensorNetworkLayer):
    """QuanTA on an ``nn.Linear``: ΔW (out × in) from three two-axis operators."""

    method = "quanta"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "", meta: dict | None = None) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise AdapterError(f"{name}: QuanTA adapts Linear layers only, not {type(base_layer).__name__}")
        overrides = cfg.options.get("factors")
        self.in_factors = channel_factors(base_layer.in_features, overrides, name)
        self.out_factors = channel_factors(base_layer.out_features, overrides, name)
        shapes = quanta_core_shapes(self.in_factors, self.out_factors, cfg.rank)
        # Gain 1 (nonlinearity "linear") as in the QuanTA/TenVOO releases for linear layers.
        super().__init__(base_layer, cfg, name, QUANTA_EQUATION, shapes, gain=1.0, meta=meta)

    def extra_repr(self) -> str:
        return f"in={self.in_factors}, out={self.out_factors}, " + super().extra_repr()


QUANTA = register(
    MethodSpec(
        name="quanta",
        layer_types=(nn.Linear,),
        wrap=per_layer(lambda name, module, cfg, meta: QuanTALayer(module, cfg, name, meta)),
        options={"init": "frozen-copy", "factors": None},
    )
)
