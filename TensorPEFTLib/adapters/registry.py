"""The method registry and each model family's published defaults.

A leaf: it imports no method file. Each method file registers its :class:`MethodSpec` when imported (the way peft's
``register_peft_method`` works); :mod:`.methods` imports the built-in ones, so "every method" means "after
``methods`` was imported" — :mod:`.model` and the package's public names do that. Names, summaries and references
live in the torch-free :mod:`.catalog`; ``register`` refuses a method the catalog does not describe.

The *family* of a model (``unetr``, ``ddpm`` or ``generic``) decides the default targets and extra trainable
parameters, i.e. what the source papers trained; a method may override them per family. A family also names layer
sets a target list can include as ``@name`` (UNETR's ``@decoder-upsamplers``), next to ``@defaults`` for the method's
published targets: ``--targets @defaults @decoder-upsamplers`` adapts both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .base import LINEAR_AND_CONV, AdapterGroup, AdapterLayer
from .catalog import METHODS as CATALOG
from .config import AdapterConfig, AdapterError

LayerFactory = Callable[[str, nn.Module, AdapterConfig, dict], AdapterLayer]


@dataclass
class Wrapped:
    """What a method's ``wrap`` returns: the new layers by module name and any group modules by group name."""

    layers: dict[str, AdapterLayer]
    groups: dict[str, AdapterGroup] = field(default_factory=dict)


WrapFunction = Callable[[list[tuple[str, nn.Module]], AdapterConfig, dict[str, dict]], Wrapped]
#: builds the objects a training loop calls for this method (``bind(optimizer)``, ``after_step(...)``)
HookFactory = Callable[[nn.Module, AdapterConfig], list]


def no_training_hooks(model: nn.Module, cfg: AdapterConfig) -> list:
    return []


@dataclass(frozen=True)
class MethodSpec:
    """A registered adaptation method.

    Attributes:
        name: registry name (``--method``); its summary and reference come from :mod:`.catalog`.
        layer_types: module types it can wrap.
        wrap: builds adapter layers for the selected ``(name, module)`` pairs. The third argument holds saved
            per-layer metadata when an adapter is reloaded (empty on a fresh injection).
        options: method-specific options and their defaults, validated against ``AdapterConfig.options``.
        targets: per-family default target patterns overriding the family's.
        trainable: per-family default extra-trainable patterns overriding the family's.
        adapts_layers: False for ``full`` (no adapter: every parameter trains).
        training_hooks: what the training loop must call besides the optimiser (SeLoRA grows its ranks); the
            engine asks every method the same way, so it has no per-method branch.
    """

    name: str
    layer_types: tuple[type, ...] = LINEAR_AND_CONV
    wrap: WrapFunction | None = None
    options: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
    trainable: dict[str, list[str]] = field(default_factory=dict)
    adapts_layers: bool = True
    training_hooks: HookFactory = no_training_hooks

    @property
    def summary(self) -> str:
        return CATALOG[self.name].summary

    @property
    def reference(self) -> str:
        return CATALOG[self.name].reference

    @property
    def layer_kinds(self) -> str:
        """``Linear/Conv1d/2d/3d/ConvTranspose1d/2d/3d``: a family's 1d/2d/3d written once, so the listing stays
        readable now that six methods take transposed convolutions too."""
        if not self.adapts_layers:
            return "all parameters"
        names, stem = [], None
        for layer_type in self.layer_types:
            name = layer_type.__name__
            if stem is not None and name[:-2] == stem:  # Conv2d after Conv1d -> "2d"
                names.append(name[-2:])
            else:
                names.append(name)
            stem = name[:-2] if name[-1] == "d" and name[-2].isdigit() else None
        return "/".join(names)


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.name not in CATALOG:
        raise ValueError(f"method {spec.name!r} has no entry in adapters/catalog.py (summary and reference)")
    _METHODS[spec.name] = spec
    return spec


def per_layer(factory: LayerFactory) -> WrapFunction:
    """A ``wrap`` for methods whose layers are independent: one factory call per selected layer."""

    def wrap(selected: list[tuple[str, nn.Module]], cfg: AdapterConfig, meta: dict[str, dict]) -> Wrapped:
        return Wrapped({name: factory(name, module, cfg, meta.get(name, {})) for name, module in selected})

    return wrap


def per_layer_class(cls: type[AdapterLayer]) -> WrapFunction:
    """A ``wrap`` that builds ``cls(module, cfg, name)`` for every selected layer."""
    return per_layer(lambda name, module, cfg, meta: cls(module, cfg, name))


def get_method(name: str) -> MethodSpec:
    key = str(name).strip().lower()
    if key not in _METHODS:
        raise AdapterError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[key]


def method_names() -> list[str]:
    """The registered methods in the catalog's order (whatever order their files were imported in)."""
    return [name for name in CATALOG if name in _METHODS]


def all_methods() -> list[MethodSpec]:
    return [_METHODS[name] for name in method_names()]


# --------------------------------------------------------------------------------------------- model families


@dataclass(frozen=True)
class FamilyDefaults:
    """What the source papers adapt and train on one kind of model."""

    targets: list[str]
    trainable: list[str]
    bias: str
    #: a module the default targets match but that must be skipped (e.g. single-channel convolutions)
    skip: Callable[[str, nn.Module], bool] | None = None
    #: named layer sets a target list may include as ``@name`` (see :func:`expand_targets`)
    target_sets: dict[str, list[str]] = field(default_factory=dict)


def _single_channel_conv(name: str, module: nn.Module) -> bool:
    return module.weight.dim() > 2 and (module.weight.shape[0] == 1 or module.weight.shape[1] == 1)


FAMILIES: dict[str, FamilyDefaults] = {
    # LoRA-PT / tCURLoRA: every linear layer of the ViT's transformer blocks; the decoder path trains fully.
    "unetr": FamilyDefaults(
        targets=[r"vit\.blocks\.\d+\.attn\.(qkv|out_proj)", r"vit\.blocks\.\d+\.mlp\.linear[12]"],
        trainable=[r"^(decoder[2-5]|out)\."],
        bias="none",
        # MONAI's UNETR up-samples only with ConvTranspose3d (kernel 2, stride 2): each decoder block's transp_conv,
        # and in encoder2-4 the transposed convolutions that bring the ViT's tokens up to the skip resolutions.
        # Not in any default (no paper adapts them, and the decoder trains fully by default); named so that an
        # adapter-only run (--adapter-only) can reach the decoder's up-sampling.
        target_sets={
            "decoder-upsamplers": [r"decoder[2-5]\.transp_conv\.conv"],
            "upsamplers": [r"decoder[2-5]\.transp_conv\.conv", r"encoder[2-4]\.transp_conv_init\.conv",
                           r"encoder[2-4]\.blocks\.\d+\.0\.conv"],
        },
    ),
    # TenVOO: resnet convolutions, attention q/v, the time-embedding projections; norms and adapted biases train.
    # The authors select layers with ".*resnets.*.conv1.conv", ".*attentions.*.to_q", ".*resnets.*.time_emb_proj"...
    # on MONAI Generative's U-Net, whose middle block names its parts resnet_1 / attention / resnet_2: the middle
    # block is *not* adapted (4 convs, 2 time_emb_proj, its to_q/to_v). Only this reading reproduces all three
    # published counts on ddpm-paper (TenVOO-L r4 601,024; TenVOO-Q r4 603,904; LoCon r2 824,192), so the patterns
    # below exclude the middle block the same way (resnets.N / attentions.N exist in the down/up blocks only).
    "ddpm": FamilyDefaults(
        targets=[
            r".*resnets\.\d+\.conv[12]\.conv",
            r".*attentions\.\d+\.attn\.to_[qv]",
            r".*resnets\.\d+\.time_emb_proj",
            r"time_embed\.2",
        ],
        trainable=[r"(^|\.)norm\d*\."],
        bias="adapted",
        skip=_single_channel_conv,
    ),
    # Anything else: every Linear and convolution, nothing else trains.
    "generic": FamilyDefaults(targets=[r".*"], trainable=[], bias="none"),
}


#: how a target list names a layer set instead of giving a regular expression
TARGET_SET_PREFIX = "@"
#: the set every family has: the method's default targets for it (what ``targets=None`` adapts)
DEFAULTS_SET = "defaults"


def expand_targets(targets: list[str] | None, family: str, spec: MethodSpec) -> tuple[list[str], list[str]]:
    """Split a target list into (default patterns, explicit patterns).

    ``None`` and ``@defaults`` give the method's published patterns for ``family``; they keep the defaults' rules
    (the family's skip, no transposed convolutions). Regular expressions and named sets (``@decoder-upsamplers``)
    are explicit: what they match is adapted, or refused by name if the method cannot adapt it.
    """
    method_defaults = list(spec.targets.get(family, FAMILIES[family].targets))
    if targets is None:
        return method_defaults, []
    sets = {DEFAULTS_SET: None, **FAMILIES[family].target_sets}
    defaults, explicit = [], []
    for item in targets:
        if not item.startswith(TARGET_SET_PREFIX):
            explicit.append(item)
            continue
        key = item[len(TARGET_SET_PREFIX):]
        if key not in sets:
            known = ", ".join(TARGET_SET_PREFIX + k for k in sets)
            raise AdapterError(f"target set {item!r} is not defined for a {family} model; its sets: {known} "
                               f"(or give regular expressions on module names)")
        if key == DEFAULTS_SET:
            defaults.extend(method_defaults)
        else:
            explicit.extend(sets[key])
    return defaults, explicit


def model_family(model: nn.Module) -> str:
    """``unetr`` for MONAI UNETR (and subclasses), ``ddpm`` for MONAI DiffusionModelUNet, else ``generic``."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "UNETR" in names:
        return "unetr"
    if "DiffusionModelUNet" in names:
        return "ddpm"
    return "generic"


def pattern_matches(pattern: str, name: str) -> bool:
    """A target pattern matches a module name if it matches the whole name or a whole dotted suffix of it."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise AdapterError(f"target pattern {pattern!r} is not a valid regular expression ({err})") from None
    if regex.fullmatch(name):
        return True
    parts = name.split(".")
    return any(regex.fullmatch(".".join(parts[i:])) for i in range(1, len(parts)))


def compile_patterns(patterns: list[str], what: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise AdapterError(f"{what} pattern {pattern!r} is not a valid regular expression ({err})") from None
    return compiled
