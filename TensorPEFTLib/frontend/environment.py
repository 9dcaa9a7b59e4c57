"""What a front-end checks before it starts a worker: the Python packages (torch included, with a version MONAI
can use) and the worker's environment. Torch-free: versions come from package metadata, never from an import.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence

#: every MONAI the requirements allow (>= 1.5) needs torch >= 2.4.1 (MONAI 1.6 needs 2.8 and Python 3.10, and pip
#: picks 1.5.x when the installed torch is older). Asked of Slicer's PyTorch extension, and checked before any job.
TORCH_REQUIREMENT = ">=2.4.1"
#: packages that Slicer ships (scipy since 5.x; pydicom for its DICOM module) or that come from its PyTorch extension:
#: pinned, never replaced by pip
SHIPPED_PACKAGES = ("numpy", "SimpleITK", "scipy", "pydicom", "torch")


def installed_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets ``specifier`` (e.g. ``">=2.4.1"``); local tags such as ``+cu121`` are ignored."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return SpecifierSet(specifier).contains(Version(version).public, prereleases=True)
    except ImportError:  # pragma: no cover - Slicer and pip environments have packaging
        pass
    match = re.fullmatch(r">=\s*([\d.]+)", specifier.strip())
    if match is None:
        raise ValueError(f"cannot check {specifier!r} without the 'packaging' module")

    def parts(text: str) -> List[int]:
        return [int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3]]

    return parts(version) >= parts(match.group(1))


def torch_problem(version: Optional[str]) -> Optional[str]:
    """One line saying why this torch cannot run the worker, or None when it can."""
    if version is None:
        return "torch (PyTorch extension)"
    if not version_satisfies(version, TORCH_REQUIREMENT):
        return f"torch{TORCH_REQUIREMENT} (installed: {version}, too old for MONAI)"
    return None


def read_requirements(path: str) -> List[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.split("#")[0].strip() for line in handle if line.split("#")[0].strip()
                and not line.strip().startswith("-")]


def missing_requirements(requirements: Sequence[str]) -> List[str]:
    """Requirement strings not satisfied in this Python (checked with importlib.metadata; no subprocess)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer and pip environments have packaging
        Requirement = None  # type: ignore[assignment,misc]
    missing = []
    for text in requirements:
        if Requirement is not None:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
            name, spec = req.name, str(req.specifier)
        else:
            name, spec = re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0], ""
        version = installed_version(name)
        if version is None or (spec and not version_satisfies(version, spec)):
            missing.append(text)
    return missing


def missing_dependencies(requirements_path: str) -> List[str]:
    """Everything the worker still needs: torch first (missing or too old), then the unmet requirements."""
    torch = torch_problem(installed_version("torch"))
    return ([torch] if torch else []) + missing_requirements(read_requirements(requirements_path))


def shipped_constraints() -> List[str]:
    """``name==version`` for each installed shipped package: a pip constraints file that forbids replacing them."""
    return [f"{name}=={version}" for name in SHIPPED_PACKAGES for version in [installed_version(name)] if version]


def worker_environment(library_parent: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the worker: ``library_parent`` (the folder holding TensorPEFTLib/) first on PYTHONPATH,
    unbuffered output, and torch's thread pools sized by the CLI rather than by the environment."""
    env = dict(os.environ if base is None else base)
    paths = [library_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != library_parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env
