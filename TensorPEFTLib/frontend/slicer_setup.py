"""Installing the worker's dependencies into 3D Slicer's Python (on the main thread, from the module's button).

torch comes from Slicer's PyTorch extension (``PyTorchUtils``, which picks the build that fits the GPU driver),
asked for a version MONAI can use; the rest comes from pip with a constraints file that pins what Slicer ships and
the installed torch. Slicer 5.12+ installs through ``slicer.packaging.pip_ensure`` (its progress dialog and restart
check), without its own confirmation: the user already confirmed in the module. Older Slicers use
``slicer.util.pip_install``. ``slicer`` and ``import_module`` are arguments so tests can pass stand-ins.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, List

from .environment import (TORCH_REQUIREMENT, installed_version, missing_requirements, read_requirements,
                          shipped_constraints, torch_problem)
from .requests import RequestError

REQUESTER = "TensorPEFT"


def ensure_torch(import_module: Callable[[str], Any] = importlib.import_module) -> None:
    """Install or upgrade torch through the PyTorch extension unless the installed one fits ``TORCH_REQUIREMENT``."""
    if torch_problem(installed_version("torch")) is None:
        return
    try:
        pytorch_utils = import_module("PyTorchUtils")
    except ImportError:
        raise RequestError("the PyTorch extension is not installed: install 'PyTorch' from the Extensions Manager, "
                           "restart Slicer, then click 'Install dependencies' again") from None
    torch = pytorch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                           torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RequestError("PyTorch installation was cancelled; TensorPEFT cannot run without it")
    importlib.invalidate_caches()  # the new torch's metadata must be seen below
    loaded = getattr(torch, "__version__", None)
    if torch_problem(loaded) is not None or torch_problem(installed_version("torch")) is not None:
        # an older torch imported earlier (by another extension) stays loaded until Slicer restarts
        raise RequestError(f"torch {loaded} is still loaded and MONAI needs torch{TORCH_REQUIREMENT}: restart Slicer, "
                           "then click 'Install dependencies' again")


def install_requirements(slicer: Any, requirements: List[str], constraints: str,
                         import_module: Callable[[str], Any] = importlib.import_module) -> None:
    """pip-install ``requirements`` under ``constraints``: ``pip_ensure`` on Slicer 5.12+, else ``pip_install``."""
    try:
        packaging = import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # the module asked already; in testing mode pip_ensure would otherwise install nothing
        packaging.pip_ensure(requirements, constraints=constraints, prompt_install=False, skip_in_testing=False,
                             requester=REQUESTER)
    else:
        slicer.util.pip_install(["-c", constraints, *requirements])  # a list: paths with spaces stay one argument


def install_dependencies(slicer: Any, requirements_path: str, work_folder: str,
                         import_module: Callable[[str], Any] = importlib.import_module) -> List[str]:
    """torch first, then the missing requirements; returns the requirements pip was asked for."""
    ensure_torch(import_module)
    requirements = missing_requirements(read_requirements(requirements_path))
    if not requirements:
        return []
    constraints = os.path.join(work_folder, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as handle:
        handle.write("\n".join(shipped_constraints()) + "\n")
    install_requirements(slicer, requirements, constraints, import_module)
    importlib.invalidate_caches()
    return requirements
