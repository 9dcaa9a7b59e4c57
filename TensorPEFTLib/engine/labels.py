"""Fine-tuning on the labels a user has: which values are the structures, how many classes the model's output layer
needs, and whether left-right flips are safe for them. :mod:`TensorPEFTLib.data.labels` has the value ↔ class map
itself; this module decides it from the checked training labels and applies it to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from ..data.labels import LabelMap, LabelSpecError, left_right_structures, parse_label_specs
from .events import Events
from .runtime import EngineError

__all__ = ["LabelPlan", "check_label_specs", "plan_labels", "apply_label_plan", "resolve_flip", "flip_swaps",
           "adapter_label_map", "prepare_adapter_model", "FLIP_CHOICES"]

#: ``--flip`` choices; ``auto`` = ``lr`` (swapping each left label with its right partner when the labels tell left
#: from right), or ``none`` when a left or right structure has no partner
FLIP_CHOICES = ("auto", "all", "lr", "none")


@dataclass
class LabelPlan:
    """How a fine-tune reads its labels: ``label_map`` (value ↔ class), the values found in the training and
    validation labels, those left as background, the classes that always lie on one side of the head, and those
    lateral classes as mirror-image pairs (None: some lateral class has no partner)."""

    label_map: LabelMap
    found: list[int]
    ignored: list[int] = field(default_factory=list)
    lateral: list[int] = field(default_factory=list)
    pairs: list[tuple[int, int]] | None = field(default_factory=list)

    def class_name(self, k: int) -> str:
        return self.label_map.names[k - 1] or "+".join(map(str, self.label_map.values[k - 1]))

    @property
    def plain(self) -> bool:
        """The label files already hold classes 1..K and nothing else: no mapping needed."""
        return self.label_map.is_identity and not self.ignored

    def describe(self) -> str:
        text = f"labels: {self.label_map.describe()}"
        if self.ignored:
            text += f"; values {', '.join(map(str, self.ignored))} are background (not in --labels)"
        return text


def check_label_specs(specs: Sequence[str]) -> None:
    """``--labels`` entries that cannot be read, as an EngineError (one line), before any data are read."""
    try:
        parse_label_specs(specs)
    except LabelSpecError as err:
        raise EngineError(str(err)) from None


def plan_labels(report: Sequence[dict[str, Any]], specs: Sequence[str] | None) -> LabelPlan:
    """The label plan from :func:`~TensorPEFTLib.data.validate_cases`' report of the training + validation cases and
    ``--labels`` (None: every non-zero value found, one class each). Raises EngineError for a ``--labels`` value no
    label has, or an entry that cannot be read."""
    found = sorted({int(v) for case in report for v in case.get("label_values") or []})
    names: dict[int, str] = {}
    for case in report:
        for value, name in (case.get("label_names") or {}).items():
            names.setdefault(int(value), name)
    try:
        label_map = parse_label_specs(specs, names) if specs else LabelMap.from_found(found, names)
    except LabelSpecError as err:
        raise EngineError(str(err)) from None
    missing = sorted(label_map.listed - set(found))
    if missing:
        raise EngineError(f"--labels: no training label has the value(s) {', '.join(map(str, missing))} (values "
                          f"found: {', '.join(map(str, found))}); list values that are in the labels")
    if not label_map.values:
        raise EngineError("the training labels have no foreground (every voxel is 0)")
    if label_map.num_classes > 255:
        raise EngineError(f"the training labels have {len(label_map.values)} different values; at most 254 "
                          "structures fit a mask: choose the ones to learn with --labels")
    ignored = sorted(set(found) - label_map.listed - {0})
    centroids = [{int(v): c for v, c in (case.get("label_centroids") or {}).items()} for case in report]
    centres = [case.get("image_centre") for case in report]
    volumes = [{int(v): ml for v, ml in (case.get("label_volumes_ml") or {}).items()} for case in report]
    lateral, pairs = left_right_structures(label_map, centroids, centres, volumes if any(volumes) else None)
    return LabelPlan(label_map, found, ignored, lateral, pairs)


def apply_label_plan(model: nn.Module, plan: LabelPlan, events: Events) -> int:
    """Give the model's output layer room for the plan's classes (a wider layer when the labels have more structures
    than the model predicts; never narrower); returns the class count training uses."""
    from ..models.heads import output_classes, set_output_classes

    before = output_classes(model)
    needed = plan.label_map.num_classes
    if needed <= before:
        return before
    set_output_classes(model, needed)
    events.message(f"the model predicts {before - 1} structure(s); your labels have {needed - 1}: its output layer is replaced "
        f"by one with {needed} classes (started from the old one), which trains with the adapter")
    return needed


def resolve_flip(flip: str, plan: LabelPlan | None, events: Events) -> str:
    """``--flip auto``: left-right flips. When the labels tell a left from a right structure, a flipped training
    patch shows the left one on the right: the flip then swaps each left class with its mirror-image partner
    (:attr:`LabelPlan.pairs`, see :func:`flip_swaps`), and without a partner for every such class (a left
    structure labelled alone) there are no left-right flips. An explicit choice stands, with a warning when it flips
    unpaired lateral labels."""
    lateral = plan.lateral if plan is not None else []
    paired = plan is not None and plan.pairs is not None
    if lateral and paired and flip in ("auto", "lr", "all"):
        swaps = ", ".join(f"{plan.class_name(a)} <-> {plan.class_name(b)}" for a, b in plan.pairs)
        events.message(f"left-right flips swap your left and right labels ({swaps}): a flipped left structure is "
                       "a right one")
        return "lr" if flip == "auto" else flip
    names = ", ".join(plan.class_name(k) for k in lateral) if plan is not None else ""
    if flip == "auto":
        if lateral:
            events.message(f"no left-right flips: your labels tell left from right ({names} always on one side, "
                           "not all of them with a mirror-image partner), and a flipped patch would teach the "
                           "opposite (--flip lr to flip anyway)")
            return "none"
        return "lr"
    if lateral and flip in ("lr", "all"):
        events.warn(f"--flip {flip} flips left and right, but your labels tell them apart ({names}): a flipped "
            "patch shows a left structure on the right under its left label")
    return flip


def flip_swaps(flip: str, plan: LabelPlan | None) -> list[tuple[int, int]]:
    """The class pairs a left-right flip exchanges in this fine-tune (recorded as the adapter's ``mirror_pairs``;
    ``segment`` exchanges the same classes when it mirrors)."""
    if plan is None or not plan.pairs or flip not in ("lr", "all"):
        return []
    return [(int(a), int(b)) for a, b in plan.pairs]


def adapter_label_map(saved: dict[str, Any], classes: int) -> LabelMap:
    """The label map an adapter was trained with; adapters from before label maps: class k = value k."""
    recorded = LabelMap.from_dict(saved.get("label_map"))
    return recorded if recorded is not None else LabelMap.identity(classes)


def prepare_adapter_model(model: nn.Module, saved: dict[str, Any]) -> None:
    """Before loading a segmentation adapter: the output layer it was trained with (a fine-tune on more structures
    than the base model predicts replaced it)."""
    from ..models.heads import output_classes, output_layer, set_output_classes

    classes = saved.get("num_classes")
    if saved.get("task") != "segmentation" or not classes or output_layer(model) is None:
        return
    if int(classes) != output_classes(model):
        set_output_classes(model, int(classes))
