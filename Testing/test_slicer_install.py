"""Issue 16's numbered items: installing into Slicer 5.8–5.12, one error dialog, empty path fields, the self-test's
message, Python 3.9. Slicer's own modules are stood in where the application would be needed; the module file is
also loaded against Slicer's real parameterNodeWrapper and ScriptedLoadableModule when a Slicer source checkout is
named in TENSORPEFT_SLICER_SOURCES (os.pathsep-separated; e.g. checkouts at v5.8.0, v5.10.0 and main)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from TensorPEFTLib.frontend import environment, slicer_setup
from TensorPEFTLib.frontend.requests import RequestError

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "TensorPEFT" / "TensorPEFT.py"
HOST = ROOT / "Testing" / "slicer_host.py"
REQUIREMENTS = ROOT / "TensorPEFT" / "Resources" / "requirements.txt"


# ------------------------------------------------------------------------------------------- 1. a torch MONAI can use


def test_torch_older_than_monai_needs_is_a_missing_dependency(monkeypatch):
    assert environment.TORCH_REQUIREMENT == ">=2.4.1"
    assert environment.torch_problem("2.4.1+cu121") is None and environment.torch_problem("2.13.0+cpu") is None
    assert environment.torch_problem("2.4.0") == "torch>=2.4.1 (installed: 2.4.0, too old for MONAI)"
    assert environment.torch_problem("2.2.2") is not None
    assert environment.torch_problem(None) == "torch (PyTorch extension)"
    versions = {"torch": "2.3.1"}
    monkeypatch.setattr(environment, "installed_version", lambda name: versions.get(name, "99"))
    assert environment.missing_dependencies(str(REQUIREMENTS))[0].startswith("torch>=2.4.1 (installed: 2.3.1")


class FakePyTorchUtils:
    """The PyTorch extension's module: ``PyTorchUtilsLogic().installTorch(...)`` records its arguments."""

    def __init__(self, returns, on_install=lambda: None):
        self.calls, self.returns, self.on_install = [], returns, on_install

    def PyTorchUtilsLogic(self):  # noqa: N802 - the extension's name
        outer = self

        class Logic:
            def installTorch(self, **kwargs):  # noqa: N802
                outer.calls.append(kwargs)
                outer.on_install()
                return outer.returns

        return Logic()


def _importer(modules):
    def import_module(name):
        if name in modules:
            return modules[name]
        raise ImportError(name)

    return import_module


def test_an_old_torch_is_upgraded_through_the_pytorch_extension(monkeypatch):
    versions = {"torch": "2.3.1"}  # e.g. left by another extension: find_spec alone would skip the install
    monkeypatch.setattr(slicer_setup, "installed_version", lambda name: versions.get(name))
    utils = FakePyTorchUtils(types.SimpleNamespace(__version__="2.5.1"), lambda: versions.update(torch="2.5.1"))
    slicer_setup.ensure_torch(_importer({"PyTorchUtils": utils}))
    assert utils.calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.4.1"}]
    slicer_setup.ensure_torch(_importer({"PyTorchUtils": utils}))  # fits now: not asked again
    assert len(utils.calls) == 1


def test_torch_install_failures_are_one_line(monkeypatch):
    monkeypatch.setattr(slicer_setup, "installed_version", lambda name: "2.2.0" if name == "torch" else None)
    with pytest.raises(RequestError, match="PyTorch extension is not installed"):
        slicer_setup.ensure_torch(_importer({}))
    with pytest.raises(RequestError, match="installation was cancelled"):
        slicer_setup.ensure_torch(_importer({"PyTorchUtils": FakePyTorchUtils(None)}))
    # another extension imported an old torch: the new one is on disk but the old one stays loaded
    with pytest.raises(RequestError, match=r"torch 2\.2\.0 is still loaded .* restart Slicer"):
        slicer_setup.ensure_torch(_importer({"PyTorchUtils": FakePyTorchUtils(types.SimpleNamespace(__version__="2.2.0"))}))


# ------------------------------------------------------------------------------ 2., 3. pip_ensure (5.12+) or pip_install


def _fake_slicer():
    calls = []
    util = types.SimpleNamespace(pip_install=lambda args: calls.append(("pip_install", args)))
    return types.SimpleNamespace(util=util), calls


def test_slicer_5_12_installs_with_pip_ensure_without_a_second_prompt_even_in_testing_mode():
    slicer, calls = _fake_slicer()
    packaging = types.SimpleNamespace(pip_ensure=lambda reqs, **kw: calls.append(("pip_ensure", reqs, kw)))
    slicer_setup.install_requirements(slicer, ["monai>=1.5,<2"], "/w/constraints.txt",
                                      _importer({"slicer.packaging": packaging}))
    assert calls == [("pip_ensure", ["monai>=1.5,<2"], {"constraints": "/w/constraints.txt", "prompt_install": False,
                                                         "skip_in_testing": False, "requester": "TensorPEFT"})]


def test_slicer_5_8_and_5_10_install_with_pip_install_and_the_constraints_file():
    slicer, calls = _fake_slicer()
    slicer_setup.install_requirements(slicer, ["monai>=1.5,<2", "pynrrd>=1.0,<2"], "/my path/constraints.txt",
                                      _importer({}))
    assert calls == [("pip_install", ["-c", "/my path/constraints.txt", "monai>=1.5,<2", "pynrrd>=1.0,<2"])]


def test_install_pins_what_slicer_ships(monkeypatch, tmp_path):
    slicer, calls = _fake_slicer()
    monkeypatch.setattr(slicer_setup, "installed_version", lambda name: "2.5.1" if name == "torch" else None)
    monkeypatch.setattr(slicer_setup, "missing_requirements", lambda reqs: ["monai>=1.5,<2"])
    monkeypatch.setattr(slicer_setup, "shipped_constraints", lambda: ["numpy==1.26.4", "torch==2.5.1"])
    asked = slicer_setup.install_dependencies(slicer, str(REQUIREMENTS), str(tmp_path), _importer({}))
    assert asked == ["monai>=1.5,<2"]
    assert (tmp_path / "constraints.txt").read_text().split() == ["numpy==1.26.4", "torch==2.5.1"]


def test_no_slicer_pydeps_anywhere():
    """``slicer.pydeps`` never existed in Slicer: neither the code nor the documentation may send anyone there."""
    for path in (MODULE, ROOT / "TensorPEFTLib" / "frontend" / "slicer_setup.py", ROOT / "docs" / "slicer.md"):
        assert "pydeps" not in path.read_text(encoding="utf-8"), path


# ------------------------------------------------------------------------------------------- 4. one error dialog


def _methods(tree: ast.Module) -> dict:
    return {f.name: f for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
            if isinstance(f, ast.FunctionDef)}


def _walk_now(node: ast.AST):
    """``ast.walk`` without the bodies of nested functions and lambdas: callbacks run later, not inside the block."""
    todo = list(ast.iter_child_nodes(node))
    while todo:
        current = todo.pop()
        yield current
        if not isinstance(current, (ast.FunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(current))


def _opens_error_display(function: ast.FunctionDef) -> bool:
    return any(isinstance(n, ast.With) and "tryWithErrorDisplay" in ast.unparse(n.items[0].context_expr)
               for n in _walk_now(function))


def _self_calls(node: ast.AST) -> set:
    """Methods ``node`` calls or hands on (``self.prepareFinetune`` passed to ``runButton``) right away."""
    return {n.attr for n in _walk_now(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self"}


def test_no_error_display_inside_another():
    """``tryWithErrorDisplay`` shows a dialog and re-raises: a method called inside one must not open its own, or a
    failure shows two dialogs (the install inside Fine-tune did)."""
    methods = _methods(ast.parse(MODULE.read_text(encoding="utf-8")))
    for name, method in methods.items():
        blocks = [n for n in _walk_now(method) if isinstance(n, ast.With)
                  and "tryWithErrorDisplay" in ast.unparse(n.items[0].context_expr)]
        for block in blocks:
            seen, todo = set(), set().union(*[_self_calls(statement) for statement in block.body])
            while todo:
                callee = todo.pop()
                if callee in seen or callee not in methods:
                    continue
                seen.add(callee)
                assert not _opens_error_display(methods[callee]), f"{name} → {callee} opens a second error display"
                todo |= _self_calls(methods[callee])
    assert "installDependencies" in _self_calls(methods["ensureDependencies"])  # the path of the old bug is checked


# ------------------------------------------------------------------------------------------- 5. empty path fields


def test_path_fields_are_text_not_pathlib():
    """Slicer's Path connector shows an unset ``pathlib.Path()`` as "."; the panel's path fields are text."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TensorPEFTParameterNode")
    kinds = {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    assert {kinds[name] for name in ("checkpointPath", "dataFolder", "adapterFolder")} == {"str"}
    assert not [name for name, kind in kinds.items() if "Path" in kind]


def _host(check: str, source: Path | None = None, python: str = sys.executable) -> dict:
    args = [python, str(HOST)] + (["--slicer-source", str(source)] if source else []) + [check]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


SOURCES = [Path(p) for p in os.environ.get("TENSORPEFT_SLICER_SOURCES", "").split(os.pathsep) if p]
needs_slicer = pytest.mark.skipif(not SOURCES, reason="set TENSORPEFT_SLICER_SOURCES to Slicer source checkouts")


@needs_slicer
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_module_builds_its_parameter_node_with_slicers_own_wrapper(source):
    pytest.importorskip("slicer", reason="the host needs the slicer-core wheel's MRML classes")
    report = _host("parameter-node", source)
    assert not report["torch_loaded"]
    assert report["shown_unset"] == {"checkpointPathLineEdit": "", "dataFolderPathLineEdit": "",
                                     "adapterFolderPathLineEdit": ""}
    assert report["shown_set"] == "/runs/a" and report["data_folder"] == "/data/train"
    assert report["defaults"]["method"] == "lora-pt" and report["defaults"]["dataSource"].startswith("Volumes")
    assert report["finetune_args"][:7] == ["finetune", "--model", "demo-unetr", "--data", "/data/train", "--out",
                                           "/runs/a"]


# ------------------------------------------------------------------------------------ 6. the self-test's message


@pytest.mark.parametrize("source", [None, *SOURCES], ids=["stand-ins", *[p.name for p in SOURCES]])
def test_self_test_without_dependencies_fails_with_its_message_first(source):
    pytest.importorskip("slicer", reason="the host needs the slicer-core wheel's MRML classes")
    report = _host("self-test", source)
    assert report["failure"] == ("install the dependencies first (TensorPEFT panel → Install dependencies): "
                                 "pynrrd>=1.0,<2")
    assert report["ran"] == []  # no step ran (each would fail on an import, e.g. "No module named 'nrrd'")


# ------------------------------------------------------------------------------------------------- 7. Python 3.9


def _python39():
    """A working Python 3.9 (pyenv's, or one on PATH), or None."""
    for candidate in (os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python"), shutil.which("python3.9")):
        if candidate and os.path.isfile(candidate) and subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True).returncode == 0:
            return candidate
    return None


SLICER_SIDE = [MODULE, *sorted((ROOT / "TensorPEFTLib" / "frontend").glob("*.py"))]


def test_python_floor_is_slicer_5_8s():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == ">=3.9"
    assert any(d.startswith("torch>=2.4.1") for d in project["dependencies"])
    assert "Slicer 5.8" in (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8")


def test_runtime_annotations_avoid_python_3_10_unions():
    """``X | None`` in an annotation is evaluated on 3.9 unless the file defers annotations, and the parameter node's
    are always evaluated (Slicer's wrapper calls get_type_hints)."""
    for path in sorted((ROOT / "TensorPEFTLib").rglob("*.py")) + [MODULE]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deferred = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                       any(a.name == "annotations" for a in n.names) for n in tree.body)
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
        unions = [ast.unparse(a) for a in annotations if any(isinstance(b, ast.BinOp) for b in ast.walk(a))]
        assert deferred or not unions, f"{path.name}: {unions[:3]} need 'from __future__ import annotations'"
    assert "__future__" not in MODULE.read_text(encoding="utf-8")  # the parameter node's hints must evaluate on 3.9


@pytest.mark.skipif(_python39() is None, reason="no Python 3.9 interpreter here")
def test_library_compiles_and_front_end_runs_on_python_3_9(tmp_path):
    python = _python39()
    files = [str(p) for p in sorted((ROOT / "TensorPEFTLib").rglob("*.py"))] + [str(MODULE)]
    done = subprocess.run([python, "-m", "py_compile", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    code = textwrap.dedent("""
        import sys
        from TensorPEFTLib.frontend import adapter_folders, device, environment, jobs, probes, progress, requests, slicer_setup
        r = requests.FinetuneRequest(dataFolder=".", adapterFolder="out", method="lora", rank=4)
        print(sys.version_info[:2], r.asArgList()[:4], requests.ParameterCountRequest().asArgList()[2],
              device.cpu_warning("unetr-small", 10)[:6], environment.torch_problem("2.4.0") is not None)
    """)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "(3, 9) ['finetune', '--model', 'demo-unetr', '--data'] demo-unetr No GPU True"
    # the module file itself, against the stand-ins, needs slicer-core's MRML (not installed for 3.9 here)


def test_requirements_name_the_torch_pin():
    text = (ROOT / "TensorPEFT" / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    assert not re.search(r"^torch", text, re.M)  # torch comes from the PyTorch extension, never plain pip
