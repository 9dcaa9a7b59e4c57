"""The user's label values and the model's classes.

A model predicts classes ``0 .. C-1`` (0 = background). People label with whatever values their tool writes:
1 and 2 for a left and a right structure, FreeSurfer's 17 and 53 for the left and right hippocampus, 255 for a
binary mask, a Slicer segmentation with named segments. A :class:`LabelMap` says which values each class stands
for; ``finetune`` builds one from the training labels (or ``--labels``), trains on classes, records the map in the
adapter, and ``segment`` writes the masks back in the user's values and names.

Numpy only (no torch): the data layer and the GUIs share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["LabelMap", "LabelSpecError", "parse_label_specs", "LATERAL_OFFSET_MM", "lateral_classes"]

#: a structure whose centre lies at least this far (mm, along the patient's left-right axis) to one side of the head's
#: centre in every training case is lateral (a left or a right structure: hippocampi lie 25-30 mm off the midline)
LATERAL_OFFSET_MM = 10.0

_SPEC = re.compile(r"^(?:(?P<name>[^=]+)=)?(?P<values>\d+(?:\+\d+)*)$")


class LabelSpecError(ValueError):
    """A ``--labels`` entry that cannot be read (user error; the message names it)."""


@dataclass(frozen=True)
class LabelMap:
    """Class ``k`` (1..K) stands for the label values ``values[k-1]`` (several: merged into one structure) and is
    named ``names[k-1]`` (None: unnamed). Class 0 is background: value 0 and every value not listed."""

    values: tuple[tuple[int, ...], ...]
    names: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", (None,) * len(self.values))
        if len(self.names) != len(self.values):
            raise ValueError("one name per class")

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.values) + 1

    @property
    def is_identity(self) -> bool:
        """True when class k is label value k (1..K): the files already hold classes."""
        return all(v == (k,) for k, v in enumerate(self.values, start=1))

    @property
    def listed(self) -> set[int]:
        return {v for group in self.values for v in group}

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Label values → classes (uint8); values not listed become background."""
        labels = np.asarray(labels)
        lut_size = max(max(self.listed, default=0), int(labels.max(initial=0))) + 1
        lut = np.zeros(lut_size, dtype=np.uint8)
        for k, group in enumerate(self.values, start=1):
            lut[list(group)] = k
        return lut[np.clip(np.rint(labels), 0, lut_size - 1).astype(np.int64)]

    def output_values(self) -> list[int]:
        """The value each class is written back as: its first label value (0 for background)."""
        return [0] + [group[0] for group in self.values]

    def to_values(self, classes: np.ndarray) -> np.ndarray:
        """Classes → the user's label values (a merged class: its first value). Classes the map does not know (a
        model head with more classes than the labels had) become background. Smallest integer dtype that holds them."""
        out = self.output_values()
        top = max(out)
        dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
        lut = np.zeros(max(int(np.max(classes, initial=0)), len(out) - 1) + 1, dtype=dtype)
        lut[: len(out)] = out
        return lut[np.asarray(classes, dtype=np.int64)]

    def segment_names(self) -> dict[int, str]:
        """Output value → name (unnamed classes are called by their value), for ``.seg.nrrd`` masks and GUIs."""
        return {value: name or f"label {value}" for value, name in zip(self.output_values()[1:], self.names)}

    def describe(self) -> str:
        parts = []
        for k, (group, name) in enumerate(zip(self.values, self.names), start=1):
            what = "+".join(map(str, group))
            parts.append(f"{k} = {name} ({what})" if name else f"{k} = {what}")
        return "classes " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"values": [list(g) for g in self.values], "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "LabelMap | None":
        if not data:
            return None
        values = tuple(tuple(int(v) for v in group) for group in data["values"])
        names = tuple(data.get("names") or (None,) * len(values))
        return cls(values, names)

    @classmethod
    def identity(cls, classes: int) -> "LabelMap":
        """Class k = value k for k in 1..classes-1 (how labels were taken before label maps existed)."""
        return cls(tuple((k,) for k in range(1, classes)))

    @classmethod
    def from_found(cls, values: Iterable[int], names: Mapping[int, str] | None = None) -> "LabelMap":
        """Every non-zero value found, one class each in ascending order, named as the label files name them."""
        found = sorted({int(v) for v in values if int(v) != 0})
        names = names or {}
        return cls(tuple((v,) for v in found), tuple(names.get(v) for v in found))


def parse_label_specs(specs: Sequence[str], found_names: Mapping[int, str] | None = None) -> LabelMap:
    """``--labels`` entries, one class each in order: ``17`` (a value), ``17+53`` (values merged into one
    structure), ``hippocampus=17+53`` or ``left=17`` (named). Unnamed classes take the name the label files give
    their first value (a Slicer segmentation's segment name), if any."""
    groups: list[tuple[int, ...]] = []
    names: list[str | None] = []
    seen: dict[int, str] = {}
    for spec in specs:
        for item in str(spec).replace(",", " ").split():
            m = _SPEC.match(item.strip())
            if not m:
                raise LabelSpecError(f"--labels {item!r}: write a label value (17), values merged into one structure "
                                     "(17+53) or a named one (left=17)")
            group = tuple(int(v) for v in m.group("values").split("+"))
            for v in group:
                if v == 0:
                    raise LabelSpecError(f"--labels {item!r}: 0 is the background; list the structures' values")
                if v in seen:
                    raise LabelSpecError(f"--labels {item!r}: value {v} is already in {seen[v]!r}")
                seen[v] = item
            groups.append(group)
            name = (m.group("name") or "").strip() or (found_names or {}).get(group[0])
            names.append(name)
    if not groups:
        raise LabelSpecError("--labels: give at least one label value, e.g. --labels 1")
    if len(groups) > 254:
        raise LabelSpecError(f"--labels: {len(groups)} structures; at most 254 classes fit a mask")
    return LabelMap(tuple(groups), tuple(names))


def lateral_classes(label_map: LabelMap, centroids: Sequence[Mapping[int, Sequence[float]]],
                    image_centres: Sequence[Sequence[float] | None] | None = None,
                    offset_mm: float = LATERAL_OFFSET_MM) -> list[int]:
    """The classes (1..K) that always lie on one side: in every case that labels them, the class's centre is at least
    ``offset_mm`` to the same side (patient's left or right) of the case's image centre (its head; without one, the
    centre of the case's labelled structures together, which needs two structures).

    A left-right flip of such a training patch shows the left structure on the right still called "left": it teaches
    the model that side does not matter, which is wrong for exactly these labels (and test-time mirroring then mixes
    the two). ``centroids``: per case, label value → its centre in RAS world mm (x = patient left → right);
    ``image_centres``: per case, the image's centre in the same frame (see ``datasets.image_centre``).
    """
    sides: dict[int, set[int]] = {}
    for index, case in enumerate(centroids):
        centres = {}
        for k, group in enumerate(label_map.values, start=1):
            points = [np.asarray(case[v], dtype=np.float64) for v in group if v in case]
            if points:
                centres[k] = np.mean(points, axis=0)
        middle = image_centres[index] if image_centres is not None and index < len(image_centres) else None
        if middle is None:
            if len(centres) < 2:
                continue
            middle = np.mean(list(centres.values()), axis=0)
        for k, centre in centres.items():
            offset = float(centre[0] - np.asarray(middle, dtype=np.float64)[0])
            sides.setdefault(k, set()).add(0 if abs(offset) < offset_mm else int(np.sign(offset)))
    return sorted(k for k, side in sides.items() if len(side) == 1 and 0 not in side)
