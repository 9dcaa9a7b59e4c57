"""SeLoRA: LoRA whose per-layer rank grows during training (Mao et al., 2024).

Every layer starts at rank ``init_rank`` (1, as in the paper). Every ``every`` optimiser steps the trainer calls
:meth:`SeLoRAGrowth.step` after ``loss.backward()``; for each layer below its cap it compares the empirical Fisher
score of its factors, FI = ‖∇A‖² + ‖∇B‖², with that of a trial copy one rank larger (new row of A Kaiming-uniform,
new column of B zero, so the output does not move), both on the same batch. A layer keeps the extra rank when
FI_new / FI ≥ ``threshold`` (λ). The scale α / r_init is not changed by growth.

Because the new column of B is zero, the trial does not change the loss, so all layers are tested with one extra
forward/backward pass and each layer's decision is the one it would get tested alone.

New rank components start Adam afresh: PyTorch's Adam keeps one step count per parameter, and a grown factor is one
parameter whose old rows carry hundreds of steps. With the carried count the bias correction of a new component's
zero moments is wrong and its first steps run at 0.5×-3× the learning rate of a fresh parameter. The old components
keep their moments and step count untouched; each new component's start step is recorded in the optimiser state,
and a step post-hook replaces, for the new components only, the update Adam made with the carried count by the one
a fresh Adam would make with the component's own count (see :func:`_fresh_adam_start`). Other optimisers have no
bias correction (SGD's momentum starts at zero either way) and are left as they are.

Data-parallel training (``torch.distributed`` initialised, several ranks): each rank's gradients come from its own
slice of the batch, so before the Fisher scores are taken the candidate factors' gradients are averaged over the
ranks (both passes): the scores are those of the global batch, as one process on the whole batch would get them. The
keep/grow decisions are then taken from rank 0, so every rank grows the same layers at the same step even if a
score differed in its last bit; the trainer rebuilds its DDP wrapper after a growth.

Grown ranks are per-layer metadata (:meth:`SeLoRALayer.layer_meta`), saved in ``adapter_config.json``; ``load_adapter``
re-injects with them, so the loaded shapes match the saved tensors.

``cfg.rank`` is not used: the rank is learned (start ``init_rank``, cap ``max_rank``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import CONV_TYPES, AdapterLayer, flat_shape, kaiming_uniform_, seeded_generator
from .config import AdapterConfig, AdapterError
from .registry import MethodSpec, per_layer, register

#: Paper-code defaults: test every 40 steps. λ = 1.1 is our default (keep a rank whose gradient energy adds at least
#: 10 % to the layer's Fisher score); the value could not be checked against the released code here.
#: Idle layers keep their rank (not in the paper; ``idle_fraction=0, fisher_floor=0`` restore the paper's rule): their
#: FI_new / FI is a ratio of float rounding noise that lands on either side of λ from one machine to the next.
#: ``idle_fraction``: a layer whose Fisher score has fallen below this fraction of its own peak (over the tests so
#: far) has converged. ``fisher_floor``: a layer whose Fisher score is below this absolute value has a gradient norm
#: under 1e-8, Adam's ε, which then sets its step more than the gradient does; this catches the layer whose score was
#: tiny from the start (its own peak is tiny too, so ``idle_fraction`` cannot).
DEFAULTS = {"every": 40, "threshold": 1.1, "max_rank": None, "init_rank": 1, "idle_fraction": 1e-4,
            "fisher_floor": 1e-16}

#: optimiser-state key: {"axis": rank axis of the factor, "starts": the step count at which each rank component
#: joined (0 for the components the parameter was created with)}
COMPONENT_STARTS = "selora_component_starts"

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class SeLoRALayer(AdapterLayer):
    """LoRA (LoCon on ConvNd) with a growable rank.

    Shapes: ``lora_A`` (r × in·prod(kernel)), ``lora_B`` (out × r). On a convolution A runs as a conv with the base
    layer's kernel, stride, padding and dilation to r channels, and B as a 1×1 conv back to the output channels.
    """

    method = "selora"

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, name: str = "", rank: int | None = None) -> None:
        super().__init__(base_layer, cfg, name)
        if isinstance(base_layer, CONV_TYPES) and base_layer.groups != 1:
            raise AdapterError(f"{name}: grouped convolutions (groups={base_layer.groups}) are not supported by selora; "
                               f"leave this layer out of --targets")
        options = {**DEFAULTS, **cfg.options}
        init_rank = int(options["init_rank"])
        out_dim, in_flat = flat_shape(base_layer)
        self.rank_limit = min(out_dim, in_flat)
        cap = options["max_rank"]
        self.max_rank = self.rank_limit if cap is None else min(int(cap), self.rank_limit)
        if init_rank < 1 or init_rank > self.max_rank:
            raise AdapterError(f"{name}: selora init_rank {init_rank} must be between 1 and the cap {self.max_rank}")
        self.rank = int(rank) if rank is not None else init_rank
        if not 1 <= self.rank <= self.rank_limit:
            raise AdapterError(f"{name}: saved selora rank {self.rank} does not fit this layer (1..{self.rank_limit})")
        # α / r_init, fixed for the whole run (growth does not rescale the existing update).
        self.scaling = (float(cfg.alpha) if cfg.alpha is not None else float(init_rank)) / init_rank
        self._cfg = cfg
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, in_flat, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, self.rank, device=weight.device, dtype=weight.dtype))
        kaiming_uniform_(self.lora_A, in_flat, seeded_generator(cfg, name))

    # ----------------------------------------------------------------- update
    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).reshape(self.base_layer.weight.shape) * self.scaling

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = self.dropout(x)
        if self.is_conv:
            nd = len(self.kernel_size)
            a = self.lora_A.reshape(self.rank, self.in_dim, *self.kernel_size)
            h = base._conv_forward(h, a, None)
            h = _CONV_FN[nd](h, self.lora_B.reshape(self.out_dim, self.rank, *([1] * nd)))
        else:
            h = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return base(x) + h * self.scaling

    # ----------------------------------------------------------------- growth
    def fisher_score(self) -> float:
        """‖∇A‖² + ‖∇B‖² from the current gradients (0 where there are none)."""
        total = 0.0
        for p in (self.lora_A, self.lora_B):
            if p.grad is not None:
                total += float(p.grad.detach().float().square().sum())
        return total

    def expanded(self) -> tuple[nn.Parameter, nn.Parameter]:
        """Rank r+1 copies of A and B: the new row of A Kaiming-uniform (seeded by layer and rank), new column of B
        zero, so B'A' = BA exactly."""
        gen = seeded_generator(self._cfg, f"{self.layer_name}#rank{self.rank + 1}")
        row = torch.empty(1, self.lora_A.shape[1], device=self.lora_A.device, dtype=self.lora_A.dtype)
        kaiming_uniform_(row, self.lora_A.shape[1], gen)
        new_a = nn.Parameter(torch.cat([self.lora_A.detach(), row], 0))
        new_b = nn.Parameter(torch.cat([self.lora_B.detach(), torch.zeros_like(self.lora_B[:, :1])], 1))
        return new_a, new_b

    def set_factors(self, a: nn.Parameter, b: nn.Parameter) -> None:
        self.lora_A, self.lora_B = a, b
        self.rank = int(a.shape[0])

    def layer_meta(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, max_rank={self.max_rank}, scaling={self.scaling:g}, merged={self.merged}"


def _ranks() -> int:
    """How many processes train together (1 without an initialised torch.distributed process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in one all-reduce (no-op in one process)."""
    ranks = _ranks()
    if ranks == 1 or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= ranks
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _decisions_of_rank_zero(keep: list[bool], device: torch.device) -> list[bool]:
    """Rank 0's grow/keep decisions on every rank (no-op in one process)."""
    if _ranks() == 1 or not keep:
        return keep
    import torch.distributed as dist

    flags = torch.tensor([1 if k else 0 for k in keep], dtype=torch.int64, device=device)
    dist.broadcast(flags, src=0)
    return [bool(f) for f in flags.tolist()]


def selora_layers(model: nn.Module) -> dict[str, SeLoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SeLoRALayer)}


def selora_ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of every SeLoRA layer, by module name."""
    return {name: layer.rank for name, layer in selora_layers(model).items()}


def _swap_in_optimizer(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, new: nn.Parameter, axis: int) -> None:
    """Replace ``old`` by ``new`` in the optimiser's groups and carry its state: every state tensor shaped like the
    parameter (Adam's exp_avg / exp_avg_sq / max_exp_avg_sq, SGD's momentum_buffer) is copied into the leading part
    of a zero tensor of the new shape along ``axis``; scalars (Adam's step) are kept as they are. Where the state
    has a step count, the new components' start step is recorded under :data:`COMPONENT_STARTS` so
    :func:`_fresh_adam_start` can give them a fresh bias correction."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return  # never stepped: the optimiser will create a fresh state for every component
    carried: dict[str, Any] = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            grown = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
            grown.narrow(axis, 0, old.shape[axis]).copy_(value)
            carried[key] = grown
        else:
            carried[key] = value
    if "step" in state:
        starts = list(state.get(COMPONENT_STARTS, {}).get("starts", [0] * old.shape[axis]))
        step = int(float(state["step"]))
        carried[COMPONENT_STARTS] = {"axis": axis, "starts": starts + [step] * (new.shape[axis] - old.shape[axis])}
    optimizer.state[new] = carried


#: optimisers whose step post-hook :func:`_fresh_adam_start` is registered (once each)
_HOOKED: weakref.WeakSet = weakref.WeakSet()


def _hook_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """Register :func:`_fresh_adam_start` on ``optimizer`` once, however many growth hooks bind to it (the
    correction must run once per step)."""
    if optimizer is None or optimizer in _HOOKED or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    optimizer.register_step_post_hook(_fresh_adam_start)
    _HOOKED.add(optimizer)


def _fresh_adam_start(optimizer: torch.optim.Optimizer, args: Any = None, kwargs: Any = None) -> None:
    """After an Adam/AdamW step: give the rank components added by growth the update of a fresh parameter.

    Adam's update is ``-lr · m̂ / (√v̂ + ε)`` with ``m̂ = m / (1 − β₁ᵗ)``, ``v̂ = v / (1 − β₂ᵗ)``, t the parameter's
    step count. A new component's moments started at zero when it joined at step t₀, exactly as a fresh
    parameter's do, so they are the fresh parameter's moments; only t differs (the fresh count is k = t − t₀). So
    the optimiser's update with t is replaced by the one with k, for those components only: the old components,
    and every moment, stay exactly as Adam left them. Weight decay (Adam's L2 or AdamW's decoupled one) is the same
    with either count and needs nothing. Why a correction rather than separate parameters per growth: a grown factor
    stays one tensor, so saved adapters, merging and a resumed optimiser (whose state must match the parameter list)
    work as before; the start steps travel in the optimiser state and survive ``state_dict`` / ``load_state_dict``.
    """
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, lr = float(group["eps"]), float(group["lr"])
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state or COMPONENT_STARTS not in state:
                continue  # Adam skipped it this step, or it never grew
            axis, starts = state[COMPONENT_STARTS]["axis"], state[COMPONENT_STARTS]["starts"]
            first_new = next((i for i, s in enumerate(starts) if s > 0), len(starts))
            if first_new == len(starts):
                continue
            t = float(state["step"])
            count = len(starts) - first_new
            shape = [1] * p.dim()
            shape[axis] = count
            own = t - torch.tensor(starts[first_new:], dtype=torch.float64)  # each component's fresh step count
            m = state["exp_avg"].narrow(axis, first_new, count)
            v = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"].narrow(axis, first_new, count)

            def update(steps: torch.Tensor) -> torch.Tensor:
                step_size = (lr / (1 - beta1 ** steps)).reshape(shape).to(device=m.device, dtype=m.dtype)
                root_bc2 = ((1 - beta2 ** steps) ** 0.5).reshape(shape).to(device=m.device, dtype=m.dtype)
                return -step_size * m / (v.sqrt() / root_bc2 + eps)

            with torch.no_grad():
                p.narrow(axis, first_new, count).add_(update(own) - update(torch.full_like(own, t)))


class SeLoRAGrowth:
    """The trainer hook that grows SeLoRA ranks.

    Usage (the closure must recompute the loss on *the same batch*, same noise and timesteps for a DDPM)::

        growth = SeLoRAGrowth(model, optimizer)               # options default to the adapter config's
        for batch in loader:
            loss = compute_loss(batch); optimizer.zero_grad(); loss.backward()
            grown = growth.step(lambda: compute_loss(batch))  # {layer: new rank} when a test ran
            optimizer.step()

    On a test step the layers that keep an extra rank get new ``lora_A``/``lora_B`` parameters whose gradients are
    the trial pass's (for the existing rows/columns these equal the ones just computed, since the trial leaves the
    loss unchanged), the optimiser's param groups point at them and its state (Adam moments, step) is carried over
    with zeros for the new row/column, which Adam then steps as a fresh parameter would (module docstring). Every
    other parameter keeps the gradient it had.

    Args:
        model: a model carrying a ``selora`` adapter.
        optimizer: the optimiser over its trainable parameters (None: only the model is changed).
        every: test every this many calls to :meth:`step` (default: the config's option, 40).
        threshold: λ, keep the extra rank when FI_new / FI ≥ λ (default: the config's option).
        idle_fraction: a layer whose FI fell below this fraction of its own peak FI keeps its rank
            (default: the config's option, 1e-4; 0 = no such rule).
        fisher_floor: a layer whose FI is below this absolute value keeps its rank (default: the config's option,
            1e-16; 0 = no floor; both 0 = the paper's rule).
        max_rank: per-layer cap overriding the config's (never above min(out, in·kernel)).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, every: int | None = None,
                 threshold: float | None = None, max_rank: int | None = None,
                 idle_fraction: float | None = None, fisher_floor: float | None = None) -> None:
        state = getattr(model, "tensorpeft", None)
        options = {**DEFAULTS, **(state.config.options if state is not None else {})}
        self.model = model
        self.optimizer = optimizer
        self.every = int(every if every is not None else options["every"])
        self.threshold = float(threshold if threshold is not None else options["threshold"])
        self.idle_fraction = float(idle_fraction if idle_fraction is not None else options["idle_fraction"])
        self.fisher_floor = float(fisher_floor if fisher_floor is not None else options["fisher_floor"])
        if self.every < 1 or not self.threshold > 0:
            raise AdapterError(f"selora needs every >= 1 and threshold > 0, got every={self.every}, threshold={self.threshold}")
        if not (self.idle_fraction >= 0 and self.fisher_floor >= 0):
            raise AdapterError(f"selora needs idle_fraction >= 0 and fisher_floor >= 0, got {self.idle_fraction}, "
                               f"{self.fisher_floor}")
        self.layers = selora_layers(model)
        if not self.layers:
            raise AdapterError("SeLoRAGrowth: this model has no selora layers; inject method 'selora' first")
        if max_rank is not None:
            for layer in self.layers.values():
                layer.max_rank = min(int(max_rank), layer.rank_limit)
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self.peak_fisher: dict[str, float] = {}
        _hook_optimizer(optimizer)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Point the hook at the optimiser a trainer built after injection (its state is carried on growth)."""
        self.optimizer = optimizer
        _hook_optimizer(optimizer)

    def after_step(self, step: int, batch: Any, closure: Callable[[], torch.Tensor]) -> dict[str, Any]:
        """Trainer hook, called after the optimiser step ``step`` (1-based) with a closure that recomputes the loss
        on that step's batch. The trainer has cleared the gradients, so on a test step the Fisher scores come from a
        fresh backward pass on the same batch. Uses the trainer's step count (not calls) so a resumed run tests on
        the same steps. Returns ``{"selora_ranks": {...}}`` on test steps for the progress events."""
        if step % self.every:
            return {}
        self.calls = step  # test() writes it into its history rows
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = None
        with torch.enable_grad():
            closure().backward()
        grown = self.test(closure)
        for p in self.model.parameters():
            p.grad = None
        return {"selora_ranks": self.ranks(), "selora_grew": sorted(grown)}

    def step(self, closure: Callable[[], torch.Tensor]) -> dict[str, int]:
        """Count one training step; on every ``every``-th run the Fisher test. Returns {layer: new rank} for the
        layers that grew (empty when none did or no test ran)."""
        self.calls += 1
        if self.calls % self.every:
            return {}
        return self.test(closure)

    def test(self, closure: Callable[[], torch.Tensor]) -> dict[str, int]:
        """The Fisher-score test on the current gradients and one trial pass of ``closure()``."""
        candidates = {n: l for n, l in self.layers.items() if l.rank < l.max_rank}
        if not candidates:
            return {}
        _average_over_ranks(_factor_grads(candidates.values()))  # data-parallel: the global batch's gradients
        before = {n: l.fisher_score() for n, l in candidates.items()}
        originals = {n: (l.lora_A, l.lora_B) for n, l in candidates.items()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        saved_grads = {id(p): p.grad for p in trainable}
        for layer in candidates.values():
            layer.set_factors(*layer.expanded())
        was_training = self.model.training
        try:
            for p in trainable:
                p.grad = None
            with torch.enable_grad():
                loss = closure()
                loss.backward()
        except BaseException:
            for name, layer in candidates.items():
                layer.set_factors(*originals[name])
            for p in trainable:
                p.grad = saved_grads[id(p)]
            raise
        finally:
            self.model.train(was_training)
        _average_over_ranks(_factor_grads(candidates.values()))
        scores: dict[str, tuple[float, float, bool, bool]] = {}
        for name, layer in candidates.items():
            after = layer.fisher_score()
            fi = before[name]
            self.peak_fisher[name] = max(fi, self.peak_fisher.get(name, 0.0))
            idle = fi < self.idle_fraction * self.peak_fisher[name] or fi < self.fisher_floor
            keep = not idle and after > 0 and (after / fi >= self.threshold if fi > 0 else True)
            scores[name] = (fi, after, idle, keep)
        device = next(iter(candidates.values())).lora_A.device
        agreed = _decisions_of_rank_zero([s[3] for s in scores.values()], device)
        grown: dict[str, int] = {}
        for (name, layer), keep in zip(candidates.items(), agreed):
            fi, after, idle, _ = scores[name]
            old_a, old_b = originals[name]
            if keep:
                _swap_in_optimizer(self.optimizer, old_a, layer.lora_A, axis=0)
                _swap_in_optimizer(self.optimizer, old_b, layer.lora_B, axis=1)
                grown[name] = layer.rank
            else:
                layer.set_factors(old_a, old_b)
            self.history.append({"call": self.calls, "layer": name, "fisher": fi, "fisher_new": after, "grew": keep,
                                 "idle": idle})
        # Everything but the new factors gets back the gradient of the real step (the trial pass accumulated into it).
        new_ids = {id(self.layers[n].lora_A) for n in grown} | {id(self.layers[n].lora_B) for n in grown}
        for p in trainable:
            if id(p) not in new_ids:
                p.grad = saved_grads[id(p)]
        return grown


def _factor_grads(layers: Any) -> list[torch.Tensor]:
    """The gradients of the layers' factors (those that have one: the same on every rank, the graph being one)."""
    return [p.grad for layer in layers for p in (layer.lora_A, layer.lora_B) if p.grad is not None]


def trainer_hook(model: nn.Module, cfg: AdapterConfig) -> SeLoRAGrowth:
    """The growth hook for a training loop (``bind(optimizer)`` then ``after_step(step, batch, closure)``)."""
    del cfg  # the options travel on the model's adapter state
    return SeLoRAGrowth(model)


def _selora_factory(name: str, module: nn.Module, cfg: AdapterConfig, meta: dict) -> SeLoRALayer:
    return SeLoRALayer(module, cfg, name, rank=meta.get("rank"))


SELORA = register(
    MethodSpec(
        name="selora",
        wrap=per_layer(_selora_factory),
        options=dict(DEFAULTS),
        training_hooks=lambda model, cfg: [trainer_hook(model, cfg)],
    )
)

__all__ = ["SeLoRALayer", "SeLoRAGrowth", "trainer_hook", "selora_ranks", "selora_layers", "SELORA"]
