"""Lazy public names for a package: ``name`` is imported from its home submodule on first use, so importing the
package (a GUI reading constants, ``tensorpeft --help``) does not import torch. ``adapters`` keeps its own copy:
it imports nothing of ours."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Tuple


def lazy_exports(package: str, homes: Mapping[str, str], namespace: Dict[str, Any]
                 ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in ``.homes[name]``; a name once
    imported is stored in ``namespace`` (the package's globals), so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            value = getattr(importlib.import_module(f".{homes[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
