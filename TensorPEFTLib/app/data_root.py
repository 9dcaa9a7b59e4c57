"""The one folder a browser user may read and write: every path the page sends is checked here first.

The page sends paths *relative to* ``--data-root`` ("cohort/hippocampus"). :meth:`DataRoot.resolve` refuses
absolute paths, ``..`` components, and anything whose real path (symlinks followed) lands outside the root, so a
link inside the root cannot lead out of it. Torch-free and trame-free: the security tests run without a browser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional


class PathRefused(ValueError):
    """A path from the page that would leave the data root (one line naming it)."""


@dataclass
class DataRoot:
    root: str

    def __post_init__(self) -> None:
        self.root = os.path.realpath(self.root)

    def resolve(self, relative: str, *, must_exist: bool = True) -> str:
        """The real absolute path of ``relative`` under the root; PathRefused if it is absolute, climbs with ``..``
        or leads (through a symlink) outside the root."""
        text = str(relative or "").strip()
        if "\x00" in text:
            raise PathRefused(f"{text!r}: not a valid path")
        if text.startswith(("/", "\\", "~")) or PureWindowsPath(text).drive or PurePosixPath(text).is_absolute():
            raise PathRefused(f"{text}: absolute paths are not accepted; choose a folder under the data root")
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts:
            raise PathRefused(f"{text}: '..' is not accepted; choose a folder under the data root")
        candidate = os.path.join(self.root, *[p for p in parts if p not in ("", ".")])
        real = os.path.realpath(candidate)  # follows every symlink on the way
        if real != self.root and not real.startswith(self.root + os.sep):
            raise PathRefused(f"{text}: leads outside the data root (a symbolic link?); choose a folder under it")
        if must_exist and not os.path.exists(real):
            raise PathRefused(f"{text}: not found under the data root")
        return real

    def relative(self, path: str) -> str:
        """``path`` (under the root) as the page shows it: relative, with ``/``."""
        rel = os.path.relpath(os.path.realpath(path), self.root)
        return "" if rel == "." else Path(rel).as_posix()

    def folders(self, relative: str = "") -> List[str]:
        """Sub-folders of ``relative`` (relative paths, sorted); links that lead outside are left out."""
        base = self.resolve(relative)
        found = []
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                found.append(self.relative(self.resolve(self.relative(entry.path), must_exist=True)))
            except PathRefused:
                continue
        return found

    def all_folders(self, max_depth: int = 3) -> List[str]:
        """Every folder down to ``max_depth`` levels (the picker's list), the root itself as ``""``."""
        found, frontier = [""], [""]
        for _ in range(max_depth):
            frontier = [child for folder in frontier for child in self.folders(folder)]
            found += frontier
        return found

    def writable_folder(self, relative: str) -> str:
        """A folder to write into (created if missing), under the root."""
        path = self.resolve(relative, must_exist=False)
        os.makedirs(path, exist_ok=True)
        return self.resolve(relative)


#: label file name endings for loose files: ``case.nii.gz`` pairs with ``case_label.nii.gz``, ``case.seg.nrrd`` ...
LABEL_MARKS = ("_label", "_labels", "_seg", "_mask", "-label", "-seg", ".seg")


@dataclass
class FolderCases:
    """What a folder holds, paired: ``cases`` [{name, image, label or None}], and whether it can train."""

    folder: str
    layout: str  # "decathlon" | "loose" | "dicom" (the folder is one DICOM series)
    cases: List[Dict[str, Optional[str]]] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return sum(1 for case in self.cases if case.get("label"))


def scan_folder(folder: str) -> FolderCases:
    """The cases of a Decathlon folder (``imagesTr``/``labelsTr``, ``imagesTs``), of one DICOM series folder (one
    image), or of loose volume files and DICOM series folders side by side, images paired with labels by name
    (``case.nii.gz`` or ``case/`` with ``case_label.nii.gz``). ValueError (one line naming the folder) when it holds
    no volume."""
    from ..data.datasets import DataError, case_name, find_cases
    from ..data.dicom import is_dicom_series
    from ..data.io import is_volume_file

    if os.path.isdir(os.path.join(folder, "imagesTr")) or os.path.isdir(os.path.join(folder, "imagesTs")):
        found = FolderCases(folder, "decathlon")
        for split in ("training", "test"):
            try:
                cases = find_cases(folder, split, require_labels=False)
            except DataError:
                continue  # no such split here
            for case in cases:
                found.cases.append({"name": str(case["name"]), "image": case["image"], "label": case.get("label")})
        if found.cases:
            return found
    if is_dicom_series(folder):  # the scanner's or PACS's export of one series: one image
        return FolderCases(folder, "dicom", [{"name": os.path.basename(os.path.normpath(folder)), "image": folder,
                                              "label": None}])
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    files = [e.path for e in entries if e.is_file() and is_volume_file(e.path)]
    # "case.seg.nrrd" (Slicer's segmentation file) is the label of "case.nrrd": keep its ".seg" so the names differ
    names = {case_name(path) + (".seg" if path.lower().endswith(".seg.nrrd") else ""): path for path in files}
    for entry in entries:  # a DICOM series folder beside them is one more image, named after its folder
        if entry.is_dir() and not entry.name.startswith(".") and is_dicom_series(entry.path):
            names[entry.name if entry.name not in names else f"{entry.name} (DICOM)"] = entry.path
    labels = {}
    for name, path in names.items():
        for mark in LABEL_MARKS:
            if name.endswith(mark) and name[: -len(mark)] in names and os.path.isfile(path):
                labels[name[: -len(mark)]] = path
    found = FolderCases(folder, "loose")
    for name, path in sorted(names.items()):
        if path in labels.values():
            continue
        found.cases.append({"name": name, "image": path, "label": labels.get(name)})
    if not found.cases and os.path.isfile(os.path.join(folder, "dataset.json")):
        try:
            find_cases(folder)
        except DataError as err:  # e.g. the demo's cohort folder: it names the task folders to choose
            raise ValueError(str(err).splitlines()[0]) from None
    if not found.cases:
        raise ValueError(f"{folder}: no volumes here (.nii, .nii.gz, .nrrd, .mgz, DICOM series folders, or a "
                         "Decathlon folder with imagesTr/)")
    return found
