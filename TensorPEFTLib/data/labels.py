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

__all__ = ["LabelMap", "LabelSpecError", "parse_label_specs", "LATERAL_OFFSET_MM", "lateral_classes",
           "MIRROR_TOLERANCE_MM", "MIRROR_VOLUME_RATIO", "mirror_pairs", "mirror_permutation", "left_right_structures",
           "FREESURFER_ASEG_NAMES"]

#: a structure whose centre lies at least this far (mm, along the patient's left-right axis) to one side of the head's
#: centre in every training case is lateral (a left or a right structure: hippocampi lie 25-30 mm off the midline,
#: thalami 10-11 mm, 9-10 mm in a head tilted 12 degrees; a midline structure's centre lies within a few mm of it)
LATERAL_OFFSET_MM = 5.0

#: a left and a right structure are each other's mirror image when the one's centre, reflected across the head's
#: centre, lies within this distance (mm, mean over the cases) of the other's: the reflection ignores the head's tilt,
#: so on the demo's subjects (heads tilted up to 15 degrees) a left and a right hippocampus measure 8-20 mm, mean 14
MIRROR_TOLERANCE_MM = 25.0
#: ... and their volumes differ by at most this factor (mean over the cases): a hippocampus and its neighbour the
#: amygdala, whose centres lie about 20 mm apart, differ by about 2x
MIRROR_VOLUME_RATIO = 1.6

#: FreeSurfer's names of the values ``aseg.mgz`` holds (FreeSurferColorLUT.txt, FreeSurfer 7): a label in FreeSurfer's
#: own format (.mgz / .mgh) without segment names is named by them, as Freeview shows it
FREESURFER_ASEG_NAMES = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle", 5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex", 10: "Left-Thalamus", 11: "Left-Caudate",
    12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem",
    17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF", 26: "Left-Accumbens-area", 28: "Left-VentralDC",
    30: "Left-vessel", 31: "Left-choroid-plexus", 41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum",
    53: "Right-Hippocampus", 54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC",
    62: "Right-vessel", 63: "Right-choroid-plexus", 72: "5th-Ventricle", 77: "WM-hypointensities",
    85: "Optic-Chiasm", 251: "CC_Posterior", 252: "CC_Mid_Posterior", 253: "CC_Central", 254: "CC_Mid_Anterior",
    255: "CC_Anterior"}


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


def _class_offsets(label_map: LabelMap, centroids: Sequence[Mapping[int, Sequence[float]]],
                   image_centres: Sequence[Sequence[float] | None] | None) -> list[dict[int, np.ndarray]]:
    """Per case, each class's centre relative to the case's image centre (RAS mm; without an image centre, the centre
    of the case's labelled structures together, which needs two structures; else the case is left out)."""
    cases: list[dict[int, np.ndarray]] = []
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
        cases.append({k: centre - np.asarray(middle, dtype=np.float64) for k, centre in centres.items()})
    return cases


def _sides(cases: Sequence[Mapping[int, np.ndarray]], offset_mm: float) -> list[int]:
    """The classes whose centre lies at least ``offset_mm`` to the same side in every case that labels them."""
    sides: dict[int, set[int]] = {}
    for case in cases:
        for k, offset in case.items():
            sides.setdefault(k, set()).add(0 if abs(offset[0]) < offset_mm else int(np.sign(offset[0])))
    return sorted(k for k, side in sides.items() if len(side) == 1 and 0 not in side)


def _pair_up(cases: Sequence[Mapping[int, np.ndarray]], lateral: Sequence[int],
             sizes: Sequence[Mapping[int, float]], tolerance_mm: float, volume_ratio: float) -> list[tuple[int, int]]:
    """The mirror-image pairs among ``lateral``, the closest first (some classes may stay unpaired)."""
    candidates = []
    for i, a in enumerate(lateral):
        for b in lateral[i + 1:]:
            both = [case for case in cases if a in case and b in case]
            if not both or any(np.sign(case[a][0]) == np.sign(case[b][0]) for case in both):
                continue
            gap = float(np.mean([np.linalg.norm(case[a] * (-1.0, 1.0, 1.0) - case[b]) for case in both]))
            if gap <= tolerance_mm and _alike_in_volume(sizes, a, b, volume_ratio):
                candidates.append((gap, a, b))
    return _best_pairs(candidates)


def _alike_in_volume(sizes: Sequence[Mapping[int, float]], a: int, b: int, volume_ratio: float) -> bool:
    """Classes ``a`` and ``b`` differ in volume by at most ``volume_ratio`` on average (True without volumes)."""
    ratios = [max(size[a], size[b]) / min(size[a], size[b]) for size in sizes if min(size[a], size[b]) > 0]
    return not ratios or float(np.mean(ratios)) <= volume_ratio


def _best_pairs(candidates: Sequence[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """Pairs from (score, a, b) candidates, the lowest score first, each class in one pair at most."""
    pairs, used = [], set()
    for _, a, b in sorted(candidates):
        if a not in used and b not in used:
            pairs.append((a, b))
            used.update((a, b))
    return sorted(pairs)


def _across_pairs(cases: Sequence[Mapping[int, np.ndarray]], sizes: Sequence[Mapping[int, float]],
                  offset_mm: float, volume_ratio: float, max_angle_deg: float = 30.0) -> list[tuple[int, int]]:
    """Mirror-image pairs found without a midline, to place the first one: two classes that lie across the head from
    each other in every case labelling both (the line between their centres within ``max_angle_deg`` of left-right,
    at least ``2 * offset_mm`` apart, the same one always on the left) and of like volume. A turned head turns that
    line with it (up to ~20 degrees in the demo's subjects), while an image centre can be 20 mm off the head's
    midline; a pair found here gives the midline where it crosses the head, and several give its turn."""
    classes = sorted({k for case in cases for k in case})
    limit = np.cos(np.deg2rad(max_angle_deg))
    candidates = []
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            gaps = [case[b] - case[a] for case in cases if a in case and b in case]
            if not gaps or len({bool(g[0] > 0) for g in gaps}) != 1:
                continue
            if any(abs(g[0]) < 2 * offset_mm or abs(g[0]) < limit * np.linalg.norm(g) for g in gaps):
                continue
            if _alike_in_volume(sizes, a, b, volume_ratio):  # scored by how far off left-right: the least first
                candidates.append((float(np.mean([np.linalg.norm(g[1:]) for g in gaps])), a, b))
    return _best_pairs(candidates)


def _from_midline(cases: Sequence[Mapping[int, np.ndarray]],
                  pairs: Sequence[tuple[int, int]]) -> list[dict[int, np.ndarray]]:
    """Each case's offsets measured from its midsagittal plane, where the pairs' midpoints lie, instead of from the
    image centre. A head turned about its vertical axis (yaw) moves the midline sideways by ~0.3 mm per mm front to
    back at 17 degrees: in the demo's subjects a right caudate lay 1.6 mm right of the image centre, a left one 4.1 mm
    left, so neither counted as lateral, while thalami, 28 mm further back, were 8-12 mm off. The plane is
    x = c + a*y + b*z through the midpoints (least squares; a term only where they spread 10 mm or more along its
    axis, its slope at most tan 30 degrees; one pair: its midpoint's x)."""
    corrected = []
    for case in cases:
        midpoints = np.array([(case[a] + case[b]) / 2 for a, b in pairs if a in case and b in case])
        if not len(midpoints):
            corrected.append(dict(case))
            continue
        axes = [axis for axis in (1, 2) if np.ptp(midpoints[:, axis]) >= 10.0]
        design = np.column_stack([np.ones(len(midpoints))] + [midpoints[:, axis] for axis in axes])
        limit = np.tan(np.deg2rad(30.0))
        slopes = np.clip(np.linalg.lstsq(design, midpoints[:, 0], rcond=None)[0][1:], -limit, limit)
        intercept = float(np.mean(midpoints[:, 0] - midpoints[:, axes] @ slopes))  # refitted when a slope is cut
        corrected.append({k: offset - np.array([intercept + float(offset[axes] @ slopes), 0.0, 0.0])
                          for k, offset in case.items()})
    return corrected


def left_right_structures(label_map: LabelMap, centroids: Sequence[Mapping[int, Sequence[float]]],
                          image_centres: Sequence[Sequence[float] | None] | None = None,
                          volumes: Sequence[Mapping[int, float]] | None = None, *,
                          offset_mm: float = LATERAL_OFFSET_MM, tolerance_mm: float = MIRROR_TOLERANCE_MM,
                          volume_ratio: float = MIRROR_VOLUME_RATIO,
                          ) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The lateral classes (1..K: a left or a right structure, always on one side) and their mirror-image pairs
    (None when some lateral class has no partner, [] when none is lateral).

    A class is lateral when, in every case that labels it, its centre lies at least ``offset_mm`` to the same side
    (patient's left or right) of the head's midline. A left-right flip of such a training patch shows the left
    structure on the right still called "left": it teaches the model that side does not matter, which is wrong for
    exactly these labels (and test-time mirroring then mixes the two) — unless the flip also swaps each left class
    with its right partner. Two lateral classes pair when they lie on opposite sides, the one's centre reflected
    across the midline lands within ``tolerance_mm`` of the other's and (with ``volumes``: per case, label value →
    mL) their volumes differ by at most ``volume_ratio``, each the mean over the cases that label both; the closest
    pairs are taken first.

    The midline is first the plane through the pairs that lie across the head from each other (:func:`_across_pairs`,
    found without a midline), else the case's image centre (its head; without one, the centre of the case's labelled
    structures together, which needs two structures), then the plane through the pairs found (:func:`_from_midline`:
    a turned head moves the midline sideways front to back), and the classes are judged again from it until the
    answer holds (at most three rounds). ``centroids``: per case, label value → its centre in RAS world mm (x =
    patient left → right); ``image_centres``: per case, the image's centre in the same frame (see
    ``datasets.image_centre``).
    """
    measured = _class_offsets(label_map, centroids, image_centres)
    sizes = [{k: sum(float(case.get(v, 0.0)) for v in group) for k, group in enumerate(label_map.values, start=1)}
             for case in volumes] if volumes is not None else []
    across = _across_pairs(measured, sizes, offset_mm, volume_ratio)
    cases: list[dict[int, np.ndarray]] = _from_midline(measured, across) if across else measured
    answer: tuple[list[int], list[tuple[int, int]]] = ([], [])
    for _ in range(3):
        lateral = _sides(cases, offset_mm)
        pairs = _pair_up(cases, lateral, sizes, tolerance_mm, volume_ratio)
        if (lateral, pairs) == answer or not pairs:
            answer = (lateral, pairs)
            break
        answer = (lateral, pairs)
        cases = _from_midline(measured, pairs)
    lateral, pairs = answer
    paired = {k for pair in pairs for k in pair}
    return lateral, (pairs if paired == set(lateral) else None)


def lateral_classes(label_map: LabelMap, centroids: Sequence[Mapping[int, Sequence[float]]],
                    image_centres: Sequence[Sequence[float] | None] | None = None,
                    volumes: Sequence[Mapping[int, float]] | None = None) -> list[int]:
    """The classes (1..K) that always lie on one side of the head's midline (:func:`left_right_structures`)."""
    return left_right_structures(label_map, centroids, image_centres, volumes)[0]


def mirror_pairs(label_map: LabelMap, centroids: Sequence[Mapping[int, Sequence[float]]],
                 image_centres: Sequence[Sequence[float] | None] | None = None,
                 volumes: Sequence[Mapping[int, float]] | None = None) -> list[tuple[int, int]] | None:
    """The lateral classes as mirror-image pairs ``(a, b)`` (a left and a right hippocampus), or None when some lateral
    class has no partner (a left structure labelled alone, or a left and a right structure of different kinds); []
    when none is lateral (:func:`left_right_structures`). With every lateral class paired, a left-right flip stays a
    true training example once each pair's classes are swapped: the flipped left hippocampus *is* a right one."""
    return left_right_structures(label_map, centroids, image_centres, volumes)[1]


def mirror_permutation(pairs: Sequence[Sequence[int]], num_classes: int) -> list[int]:
    """Class ``k``'s mirror image for each k in 0..num_classes-1 (itself unless paired): index a label map or the
    class axis of a prediction with it after a left-right flip."""
    permutation = list(range(num_classes))
    for a, b in pairs:
        permutation[int(a)], permutation[int(b)] = int(b), int(a)
    return permutation
