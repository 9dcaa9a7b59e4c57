"""The adapter registry's shape: a leaf that method files register into, one catalog of names and summaries, the
engine asking every method for its training hooks the same way, and lazy packages a GUI can read without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from TensorPEFTLib.adapters import AdapterConfig, get_method, method_names
from TensorPEFTLib.adapters.catalog import METHODS as CATALOG

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "TensorPEFTLib" / "adapters"
METHOD_FILES = ("full", "lora", "lycoris", "ssf", "tensor_stack", "tenvoo", "quanta", "selora")


def _imports(path: Path) -> set:
    """Modules of this package a file imports (``from .x import`` / ``from . import x``), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_registry_is_a_leaf_and_methods_register_themselves():
    assert not _imports(ADAPTERS / "registry.py") & set(METHOD_FILES)  # no circle: the registry imports no method
    for name in METHOD_FILES:
        assert "registry" in _imports(ADAPTERS / f"{name}.py"), name
    assert set(METHOD_FILES) <= _imports(ADAPTERS / "methods.py")


def test_every_catalogued_method_is_registered_in_catalog_order():
    assert method_names() == list(CATALOG)
    spec = get_method("lora-pt")
    assert (spec.summary, spec.reference) == CATALOG["lora-pt"]


def test_training_hooks_come_from_the_method_spec(unetr):
    from TensorPEFTLib.adapters import inject
    from TensorPEFTLib.engine.jobs import growth_hooks

    assert growth_hooks(unetr, AdapterConfig(method="lora", rank=2)) == []
    cfg = AdapterConfig(method="selora", rank=1)
    inject(unetr, cfg)
    hooks = growth_hooks(unetr, cfg)
    assert [type(h).__name__ for h in hooks] == ["SeLoRAGrowth"]
    engine = (ROOT / "TensorPEFTLib" / "engine" / "jobs.py").read_text(encoding="utf-8")
    assert "== \"selora\"" not in engine and "!= \"selora\"" not in engine  # no per-method branch


def test_check_rank_lives_in_the_shared_base():
    from TensorPEFTLib.adapters import base, lora, lycoris

    assert lora.check_rank is base.check_rank and lycoris.check_rank is base.check_rank


def test_package_constants_load_without_torch():
    code = ("import sys; from TensorPEFTLib.adapters.catalog import METHODS; from TensorPEFTLib.adapters.config import "
            "ADAPTER_FILES; from TensorPEFTLib.engine.events import EVENT_KINDS, EXIT_CANCELLED; "
            "from TensorPEFTLib.models.presets import PRESETS, TASK_OF_FAMILY; import TensorPEFTLib.engine, "
            "TensorPEFTLib.adapters, TensorPEFTLib.models; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"


def test_dead_code_is_gone():
    import TensorPEFTLib.adapters.tensor_stack as tensor_stack
    import TensorPEFTLib.cli as cli

    assert not hasattr(cli, "COMMANDS") and not hasattr(tensor_stack, "stack_adapter_size")
    assert "__import__" not in (ROOT / "TensorPEFTLib" / "cli.py").read_text(encoding="utf-8")
    assert "not built yet" not in (ADAPTERS / "registry.py").read_text(encoding="utf-8")
