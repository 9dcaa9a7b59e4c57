"""Model-level operations: inject adapters, count, merge/unmerge, save/load.

Injection replaces each selected layer in place by its adapter wrapper, registers cross-layer group modules under
``model.tensorpeft_groups``, freezes everything that should not train, and records what it did in
``model.tensorpeft`` (an :class:`InjectionState`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..atomic import write_bytes_atomically, write_text_atomically
from .base import ADAPTABLE_TYPES, TRANSPOSED_CONV_TYPES, AdapterGroup, AdapterLayer, GroupMemberLayer
from . import methods  # noqa: F401  (registers the built-in methods before any lookup)
from .config import ADAPTER_FORMAT, CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, AdapterError, read_json
from .registry import FAMILIES, MethodSpec, compile_patterns, expand_targets, get_method, model_family, pattern_matches

FORMAT_VERSION = 1
_BASE = ".base_layer"


@dataclass
class InjectionState:
    """What ``inject`` did to a model (kept as ``model.tensorpeft``)."""

    config: AdapterConfig
    family: str
    fingerprint: str
    description: str
    layers: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    trainable_patterns: list[str] = field(default_factory=list)
    bias: str = "none"
    hooks: list[Any] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------------------------------- fingerprint


def architecture_fingerprint(model: nn.Module) -> str:
    """A short hash of the model class and every state-dict entry's name and shape (not values, not dtype), so an
    adapter can tell whether a model is the architecture it was trained on."""
    state = getattr(model, "tensorpeft", None)
    if isinstance(state, InjectionState):
        return state.fingerprint
    digest = hashlib.sha256(type(model).__name__.encode())
    for key, value in model.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)};".encode())
    return digest.hexdigest()[:16]


def describe_model(model: nn.Module) -> str:
    """'UNETR preset unetr-small, 4,112,838 parameters' - what error messages call a model."""
    state = getattr(model, "tensorpeft", None)
    if isinstance(state, InjectionState):
        return state.description
    preset = getattr(model, "tensorpeft_preset", None)
    n_params = sum(p.numel() for p in _unique_parameters(model))
    where = f"preset {preset}" if preset else "custom architecture"
    return f"{type(model).__name__} ({where}, {n_params:,} parameters)"


# ------------------------------------------------------------------------------------------- inject


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def original_name(name: str) -> str:
    """A parameter's name in the un-adapted model (``x.base_layer.weight`` -> ``x.weight``)."""
    return name.replace(_BASE + ".", ".")


def _resolve_targets(model: nn.Module, spec: MethodSpec, cfg: AdapterConfig, family: str,
                     only: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    defaults = FAMILIES[family]
    if cfg.targets is not None and not cfg.targets:
        raise AdapterError("targets is an empty list: name at least one layer pattern, or leave it unset for the defaults")
    keep = None if only is None else set(only)
    default_patterns, explicit_patterns = expand_targets(cfg.targets, family, spec)
    patterns = default_patterns + explicit_patterns
    compile_patterns(patterns, "target")
    selected, unsupported = [], []
    for name, module in model.named_modules():
        if not name or (keep is not None and name not in keep):
            continue
        explicit = any(pattern_matches(p, name) for p in explicit_patterns)
        if not explicit and not any(pattern_matches(p, name) for p in default_patterns):
            continue
        if isinstance(module, AdapterLayer):
            raise AdapterError(f"layer {name} is already adapted; build a fresh model to inject another adapter")
        if not isinstance(module, spec.layer_types):
            if explicit and isinstance(module, ADAPTABLE_TYPES):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        if not explicit:
            # The published defaults never reach a transposed convolution (the generic family's ".*" included):
            # those are adapted only where a target names them, so existing configs adapt what they always did.
            if isinstance(module, TRANSPOSED_CONV_TYPES):
                continue
            if defaults.skip is not None and defaults.skip(name, module):
                continue
        selected.append((name, module))
    if unsupported:
        raise AdapterError(
            f"method {spec.name} adapts {spec.layer_kinds} layers only, but the targets match "
            f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}; narrow --targets"
        )
    if not selected:
        layer_names = [n for n, m in model.named_modules() if isinstance(m, spec.layer_types)]
        example = ", ".join(layer_names[:6]) + (" ..." if len(layer_names) > 6 else "")
        raise AdapterError(
            f"targets {patterns} match no {spec.layer_kinds} layer of this model; "
            f"layers it has: {example or 'none'}"
        )
    if keep is not None:
        lost = sorted(keep - {name for name, _ in selected})
        if lost:
            raise AdapterError(f"the adapter wrapped {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}, which its "
                               f"targets no longer select on this model; load it with the version that saved it")
    return selected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, cfg: AdapterConfig, layer_meta: dict[str, dict] | None = None,
           layers: list[str] | None = None) -> dict[str, Any]:
    """Adapt ``model`` in place and freeze what should not train.

    Args:
        model: a MONAI UNETR, DiffusionModelUNet or any torch module with Linear/Conv layers.
        cfg: the adapter configuration (``targets``/``trainable`` None = the method's published defaults).
        layer_meta: saved per-layer metadata (used by :func:`load_adapter` to rebuild grown ranks); leave unset.
        layers: the layers a saved adapter wrapped (used by :func:`load_adapter`): the targets are narrowed to
            them, so an adapter keeps its layers where target resolution has since widened (transposed
            convolutions became adaptable: an old ``".*"`` would now reach them); leave unset.

    Returns:
        A summary: method, family, number of wrapped layers, total/trainable/adapter parameter counts and the
        trainable percentage.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError("inject() takes an AdapterConfig")
    if isinstance(getattr(model, "tensorpeft", None), InjectionState):
        raise AdapterError("this model already carries an adapter; build or load a fresh model to inject another")
    spec = get_method(cfg.method)
    unknown = sorted(set(cfg.options) - set(spec.options))
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise AdapterError(f"method {spec.name} has no option(s) {', '.join(unknown)}; its options: {known}")
    family = model_family(model)
    defaults = FAMILIES[family]
    fingerprint = architecture_fingerprint(model)
    description = describe_model(model)

    if not spec.adapts_layers:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
        model.tensorpeft = InjectionState(cfg, family, fingerprint, description, bias="all")
        return summary(model)

    selected = _resolve_targets(model, spec, cfg, family, only=layers)
    trainable = list(cfg.trainable) if cfg.trainable is not None else list(spec.trainable.get(family, defaults.trainable))
    trainable_res = compile_patterns(trainable, "trainable")
    bias = cfg.bias or defaults.bias

    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if any(r.search(name) for r in trainable_res):
            p.requires_grad_(True)
        elif bias == "all" and name.endswith(".bias"):
            p.requires_grad_(True)

    wrapped = spec.wrap(selected, cfg, layer_meta or {})
    missing = [n for n, _ in selected if n not in wrapped.layers]
    if missing:
        raise RuntimeError(f"method {spec.name} did not wrap {missing[:3]}")
    for name, layer in wrapped.layers.items():
        _set_submodule(model, name, layer)
        # The adapter trains in the layer's place: its weight stays frozen even where a trainable pattern matches
        # it (UNETR's decoder trains fully by default, and @decoder-upsamplers adapts layers inside it).
        layer.base_layer.weight.requires_grad_(False)
        if bias in ("adapted", "all") and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    if wrapped.groups:
        model.tensorpeft_groups = nn.ModuleDict(wrapped.groups)

    state = InjectionState(cfg, family, fingerprint, description, layers=list(wrapped.layers),
                           groups=list(wrapped.groups), trainable_patterns=trainable, bias=bias)
    if wrapped.groups:
        # Each pass's shared results computed before any block runs and dropped after it (see AdapterGroup).
        state.hooks = [model.register_forward_pre_hook(_begin_pass), model.register_forward_hook(_end_pass)]
    model.tensorpeft = state
    return summary(model)


def _begin_pass(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a model with adapter groups: fresh shared results for this pass, computed here, outside
    every block, so that activation checkpointing never recomputes them (see :class:`~.base.AdapterGroup`). Groups
    whose members are all merged or disabled compute nothing. Module-level (it finds the groups on the model it is
    called with), so a ``copy.deepcopy`` of the model hooks its own groups."""
    groups = adapter_groups(model)
    for group in groups.values():
        group.clear_cache()
    active: dict[int, AdapterGroup] = {}
    for module in model.modules():
        if isinstance(module, GroupMemberLayer) and not module.merged and module.adapter_enabled:
            active.setdefault(id(module.group), module.group)
    for group in active.values():
        group.results()


def _end_pass(model: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: drop the pass's shared results (the graph keeps what backward needs; checkpointed blocks keep
    theirs through ``recompute_context``)."""
    _clear_groups(model)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_groups(model: nn.Module) -> dict[str, AdapterGroup]:
    groups = getattr(model, "tensorpeft_groups", None)
    return dict(groups.items()) if groups is not None else {}


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for _, layer in adapter_layers(model):
        base_ids = {id(p) for p in layer.base_layer.parameters()}
        ids |= {id(p) for p in layer.parameters() if id(p) not in base_ids}
    for group in adapter_groups(model).values():
        ids |= {id(p) for p in group.parameters()}
    return ids


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total", "trainable", "adapter"}``: all parameters, those with gradients, and those the adapter added."""
    adapter_ids = _adapter_param_ids(model)
    params = list(_unique_parameters(model))
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapter": sum(p.numel() for p in params if id(p) in adapter_ids),
    }


def summary(model: nn.Module) -> dict[str, Any]:
    state: InjectionState | None = getattr(model, "tensorpeft", None)
    counts = count_parameters(model)
    base_total = counts["total"] - counts["adapter"]
    # Papers differ on whether the adapted layers' biases count (TenVOO's table counts them for TenVOO-L and not
    # for TenVOO-Q): reported apart so a count can be compared either way.
    adapted_biases = sum(layer.base_layer.bias.numel() for _, layer in adapter_layers(model)
                         if getattr(layer.base_layer, "bias", None) is not None and layer.base_layer.bias.requires_grad)
    return {
        "method": state.config.method if state else None,
        "rank": state.config.rank if state else None,
        "family": state.family if state else model_family(model),
        "layers_wrapped": len(state.layers) if state else 0,
        **counts,
        "bias": state.bias if state else None,
        "trainable_adapted_biases": adapted_biases,
        "base_total": base_total,
        "trainable_percent": 100.0 * counts["trainable"] / max(1, base_total),
    }


# ------------------------------------------------------------------------------------------- merge


def _clear_groups(model: nn.Module) -> None:
    for group in adapter_groups(model).values():
        group.clear_cache()


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weights: the model then runs at exactly the base model's cost."""
    _clear_groups(model)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.merge()
    _clear_groups(model)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weights."""
    _clear_groups(model)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.unmerge()
    _clear_groups(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and take the adapter machinery out: each wrapped layer is replaced by
    its own base layer, the group modules and their hooks go, and ``model.tensorpeft`` is dropped.

    What is left is the base architecture with new weights (same modules, same state-dict keys), so inference costs
    what the base model costs by construction rather than by measurement. There is no way back: use :func:`merge`
    when the adapter must stay separable. Returns ``model`` (changed in place)."""
    merge(model)
    for name, layer in list(adapter_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    state: InjectionState | None = getattr(model, "tensorpeft", None)
    if state is not None:
        for hook in state.hooks:
            hook.remove()
        del model.tensorpeft
    if hasattr(model, "tensorpeft_groups"):
        del model.tensorpeft_groups
    return model


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in adapter_layers(model))


# ------------------------------------------------------------------------------------------- save / load


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters and buffers, plus every other trainable parameter, under their un-adapted names."""
    chosen: dict[str, torch.Tensor] = {}
    adapter_ids = _adapter_param_ids(model)
    for name, p in model.named_parameters():
        if id(p) in adapter_ids or p.requires_grad:
            chosen[original_name(name)] = p
    for owner_name, owner in [*adapter_layers(model), *(("tensorpeft_groups." + k, g) for k, g in adapter_groups(model).items())]:
        base = getattr(owner, "base_layer", None)
        base_ids = {id(b) for b in base.buffers()} if base is not None else set()
        for buf_name, buf in owner.named_buffers():
            if id(buf) in base_ids or buf_name in getattr(owner, "_non_persistent_buffers_set", set()):
                continue
            chosen[f"{owner_name}.{buf_name}"] = buf
    return chosen


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> str:
    """Write ``adapter.safetensors`` (adapter tensors and extra trainable parameters only) and
    ``adapter_config.json`` (config, base architecture fingerprint, per-layer metadata) into ``folder``.

    The model must not be merged (merged weights would be saved as if they were the base's).
    """
    from safetensors.torch import save as save_tensors

    state: InjectionState | None = getattr(model, "tensorpeft", None)
    if state is None:
        raise AdapterError("this model has no adapter to save; inject one first")
    if is_merged(model):
        raise AdapterError("unmerge the model before saving its adapter")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _tensors_to_save(model).items()}
    meta = {name: layer.layer_meta() for name, layer in adapter_layers(model) if layer.layer_meta()}
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "family": state.family,
        "base_fingerprint": state.fingerprint,
        "base_model": state.description,
        "base_preset": getattr(model, "tensorpeft_preset", None),
        "layers": state.layers,
        "layer_meta": meta,
        "counts": count_parameters(model),
        **(extra or {}),
    }
    # Serialise in memory and write the bytes with Python's own file API: a full disk then raises OSError(ENOSPC),
    # which callers can tell apart and answer (safetensors' and torch's writers raise their own error types).
    blob = save_tensors(tensors, metadata={"format": "pt"})
    write_bytes_atomically(os.path.join(folder, WEIGHTS_FILE), blob)
    write_text_atomically(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The saved ``adapter_config.json`` of an adapter folder, checked for the essentials."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise AdapterError(f"{folder}: adapter folder not found (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    path = os.path.join(folder, CONFIG_FILE)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != ADAPTER_FORMAT or "config" not in data:
        raise AdapterError(f"{path}: not a TensorPEFT adapter config (missing 'format' or 'config')")
    return data


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> dict[str, Any]:
    """Load a saved adapter onto ``model``: injects it first if the model has none, refuses another architecture.

    Returns the injection summary.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = read_adapter_config(folder)
    cfg = AdapterConfig.from_dict(saved["config"], source=os.path.join(os.fspath(folder), CONFIG_FILE))
    fingerprint = architecture_fingerprint(model)
    if fingerprint != saved.get("base_fingerprint"):
        raise AdapterError(
            f"adapter {os.fspath(folder)} was trained on {saved.get('base_model', 'another model')} "
            f"[{saved.get('base_fingerprint')}], but this model is {describe_model(model)} [{fingerprint}]; "
            f"load it onto the model it was trained on"
        )
    state: InjectionState | None = getattr(model, "tensorpeft", None)
    if state is None:
        inject(model, cfg, layer_meta=saved.get("layer_meta") or {}, layers=saved.get("layers"))
    elif state.config.to_dict() != cfg.to_dict():
        raise AdapterError(
            f"this model already carries a {state.config.method} adapter (rank {state.config.rank}) that differs from "
            f"{os.fspath(folder)} ({cfg.method}, rank {cfg.rank}); load it onto a fresh model"
        )
    weights = os.path.join(os.fspath(folder), WEIGHTS_FILE)
    try:
        tensors = load_file(weights)
    except FileNotFoundError:
        raise AdapterError(f"{weights}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err})") from None
    was_merged = is_merged(model)
    if was_merged:
        unmerge(model)
    targets = _tensors_to_save(model)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise AdapterError(
            f"{weights} does not fit this adapter: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for key, target in targets.items():
            value = tensors[key]
            if value.shape != target.shape:
                raise AdapterError(f"{weights}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    _clear_groups(model)
    if was_merged:
        merge(model)
    return summary(model)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in _unique_parameters(model) if p.requires_grad]


def adapter_state_names(model: nn.Module) -> list[str]:
    """Names (un-adapted naming) of every tensor ``save_adapter`` writes."""
    return sorted(_tensors_to_save(model))

